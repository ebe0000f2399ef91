//! What the handlers of the hospital API share: the state they are served with
//! (`AppState`), the authenticated [`Hospital`], the error answer ([`ApiError`]), and the
//! request helpers (the one accepted query parameter, draining an unread body). The router
//! ([`super::http`]) and STOW-RS ([`super::stow`]) both use it; it uses neither.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tracing::warn;

use super::store::{IngestError, IngestStore};
use crate::drain::Drain;

/// The authenticated hospital of a connection (its client certificate's CN).
#[derive(Debug, Clone)]
pub struct Hospital(pub Arc<str>);

/// What every handler of the hospital API is served with (STOW-RS adds its own limits).
#[derive(Debug, Clone)]
pub(super) struct AppState {
    pub(super) store: IngestStore,
    pub(super) idle_timeout: Duration,
    pub(super) drain: Drain,
}

/// An error answer: a status and a JSON body `{"error": ..., ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": message.into() }),
        }
    }

    /// The answer to a request cut off by the end of the drain (the edge is stopping):
    /// 503 with `Retry-After` ([`RETRY_AFTER_STOPPING`]); nothing of the request is kept.
    pub(super) fn stopping() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({
                "error": "the edge is shutting down; nothing of this request was kept, send it again",
                "retry_after": RETRY_AFTER_STOPPING,
            }),
        }
    }

    /// The answer's status.
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    /// A refusal of a bad field of the request body: 400, the body names the field
    /// (`{"error": ..., "field": "patient_id"}`; `""` for the body as a whole).
    pub(super) fn field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": message.into(), "field": field }),
        }
    }

    /// The answer's JSON body.
    #[cfg(test)]
    pub(super) fn body(&self) -> &Value {
        &self.body
    }

    /// A refusal of what exceeds a configured limit: the body names the limit's config key
    /// (`{"error": ..., "limit": "ingest.stow_max_parts"}`).
    pub(super) fn limit(
        status: StatusCode,
        key: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            body: json!({ "error": message.into(), "limit": key }),
        }
    }
}

/// Seconds a client is asked to wait (`Retry-After`) after a 503 of a stopping edge: about
/// what a restart takes.
pub const RETRY_AFTER_STOPPING: u64 = 30;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // 503 is only ever [`ApiError::stopping`].
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            return (
                self.status,
                [(header::RETRY_AFTER, RETRY_AFTER_STOPPING.to_string())],
                Json(self.body),
            )
                .into_response();
        }
        (self.status, Json(self.body)).into_response()
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> ApiError {
        let status = match &e {
            IngestError::Refused(r) => {
                return ApiError {
                    status: StatusCode::FORBIDDEN,
                    body: json!({ "error": r.answer(), "rule": r.rule }),
                };
            }
            IngestError::NotFound => StatusCode::NOT_FOUND,
            IngestError::Conflict(_) => StatusCode::CONFLICT,
            IngestError::BadName(_) | IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            IngestError::Quota { key, .. } => {
                return ApiError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    body: json!({ "error": e.to_string(), "quota": key }),
                };
            }
            IngestError::Reserve { .. } => {
                return ApiError {
                    status: StatusCode::INSUFFICIENT_STORAGE,
                    body: json!({ "error": e.to_string(), "quota": "spool.reserve_bytes" }),
                };
            }
            IngestError::Internal(msg) => {
                warn!(error = %msg, "internal error answering a hospital");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

/// The value of query parameter `name`, the only one a request accepts: `None` when the
/// query does not give it, 400 for another parameter or `name` given twice.
pub(super) fn only_param<'q>(
    query: Option<&'q str>,
    name: &str,
) -> Result<Option<&'q str>, ApiError> {
    let mut value = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != name {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown query parameter {k:?}; only {name}= is accepted"),
            ));
        }
        if value.replace(v).is_some() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{name}= must be given once"),
            ));
        }
    }
    Ok(value)
}

/// Most bytes of an unread request body read and thrown away before an early error answer,
/// so the client (still sending) sees the answer instead of a connection reset: a 507 after
/// 16 MiB of a 32 MiB upload must drain 16 MiB. Bounded, like the time below, so a refused
/// client cannot hold the connection for ever.
const DRAIN_BYTES: u64 = 256 * 1024 * 1024;
/// Longest time spent draining (in addition, each read waits at most `ingest.idle_timeout`).
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads and discards up to [`DRAIN_BYTES`] of what the client still sends, for at most
/// [`DRAIN_TIME`].
pub(super) async fn drain_body(stream: &mut axum::body::BodyDataStream, idle: Duration) {
    let mut left = DRAIN_BYTES;
    let drain = async {
        while let Ok(Some(Ok(data))) = tokio::time::timeout(idle, stream.next()).await {
            left = left.saturating_sub(data.len() as u64);
            if left == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}
