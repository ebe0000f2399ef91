//! The hospital API over HTTPS: axum routes served by hyper over rustls, client certificate
//! required.
//!
//! Every TCP connection is accepted at once and gets a TLS handshake, bounded by
//! `ingest.handshake_timeout`; until it is done the connection counts against its source
//! address (`ingest.max_unidentified_per_source`, [`crate::admission`]), never against a slot.
//! The hospital is the subject CN of the verified client certificate; only then does the
//! connection take one of `ingest.max_connections` slots (none free: one `503` answer with
//! `Retry-After`, then close). HTTP/1.1 runs with hyper's header read timeout
//! (`ingest.header_timeout`: a client that sends half a header and stalls is disconnected). Request bodies stream: each frame goes to the spool before
//! the next is read, so memory stays bounded whatever the size or number of uploads.
//!
//! Drain (SIGTERM, [`crate::drain::Drain`]): when it starts, the listener is closed (new
//! connections are refused by the kernel), handshakes under way are dropped, idle keep-alive
//! connections close, a request in progress goes on and its connection closes after the
//! answer, and a long-polling status request answers at once. When it ends
//! (`drain.timeout`), an upload whose body is still arriving is answered 503 with
//! `Retry-After` and its partial file discarded; the transfer stays open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json};
use baylink_net::proto::TransferId;
use baylink_net::transport::{TlsIdentity, common_name, load_ca, root_store};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::server::WebPkiClientVerifier;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::api::{ApiError, AppState, Hospital, drain_body, only_param};
use super::store::{IngestError, IngestStore};
use super::stow::StowLimits;
use crate::admission::{SourceLimiter, Unidentified};
use crate::config::Config;
use crate::drain::{Activity, Drain};
use crate::policy::Declaration;
use crate::tls_reload::Swap;

/// Largest declaration body accepted.
const MAX_DECLARATION_BYTES: usize = 64 * 1024;

/// The rustls configuration of the hospital listener: the client certificate is required
/// and verified against `tls.ca`; TLS 1.3 and 1.2; aws-lc-rs with X25519MLKEM768 preferred;
/// ALPN `http/1.1`.
pub fn tls_config(cfg: &Config, identity: &TlsIdentity) -> anyhow::Result<rustls::ServerConfig> {
    tls_config_from(&cfg.tls.ca, identity)
}

/// [`tls_config`] from the CA file and the identity (certificate and key, PEM or HSM-held).
pub fn tls_config_from(
    ca: &std::path::Path,
    identity: &TlsIdentity,
) -> anyhow::Result<rustls::ServerConfig> {
    tls_config_with_roots(&load_ca(ca)?, identity)
        .with_context(|| format!("CA certificate in {} refused", ca.display()))
}

/// [`tls_config`] from CA certificates already read (a reload reads `tls.ca` once for every
/// door, so all of them trust the same file contents).
pub fn tls_config_with_roots(
    ca: &[rustls_pki_types::CertificateDer<'static>],
    identity: &TlsIdentity,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = root_store(ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .context("cannot build the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.resolver());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The state of the router: what every handler is served with, and the STOW-RS limits.
#[derive(Debug, Clone)]
struct RouterState {
    app: AppState,
    stow: StowLimits,
}

impl FromRef<RouterState> for AppState {
    fn from_ref(state: &RouterState) -> AppState {
        state.app.clone()
    }
}

impl FromRef<RouterState> for StowLimits {
    fn from_ref(state: &RouterState) -> StowLimits {
        state.stow.clone()
    }
}

/// The routes of the hospital API (the caller adds the [`Hospital`] extension).
pub fn router(
    store: IngestStore,
    idle_timeout: Duration,
    stow: StowLimits,
    drain: Drain,
) -> Router {
    Router::new()
        .route("/v1/transfers", post(declare))
        .route("/v1/transfers/{id}", get(status))
        .route("/v1/transfers/{id}/files/{*name}", put(upload))
        .route("/v1/transfers/{id}/commit", post(commit))
        .route("/v1/transfers/{id}/receipt", get(receipt))
        .route("/v1/transfers/{id}/delivery", get(delivery))
        .route("/v1/transfers/{id}/proof", get(proof))
        .route("/dicom-web/studies", post(super::stow::stow))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no such route: {}", uri.path()),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_DECLARATION_BYTES))
        .with_state(RouterState {
            app: AppState {
                store,
                idle_timeout,
                drain,
            },
            stow,
        })
}

/// Binds `ingest.listen`; the returned future serves the hospital API until the drain
/// starts (then closes the listener and returns). Each connection counts in `active` until
/// it is closed. Each connection's handshake uses the configuration in force in `tls` when it
/// was accepted (a SIGHUP reload replaces it; see [`tls_config`]).
pub async fn bind(
    cfg: &Config,
    store: IngestStore,
    tls: Swap<rustls::ServerConfig>,
    drain: Drain,
    active: Activity,
) -> anyhow::Result<(SocketAddr, impl Future<Output = ()> + use<>)> {
    let listen = cfg.ingest.listen.context("ingest.listen is not set")?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (ingest.listen)"))?;
    let local = listener.local_addr()?;
    let header_timeout = cfg.ingest.header_timeout;
    let handshake_timeout = cfg.ingest.handshake_timeout;
    let app = router(
        store,
        cfg.ingest.idle_timeout,
        StowLimits::new(cfg.ingest.stow_max_parts, cfg.ingest.stow_max_failed_listed),
        drain.clone(),
    );
    let slots = Arc::new(Semaphore::new(cfg.ingest.max_connections));
    let sources = SourceLimiter::new(cfg.ingest.max_unidentified_per_source);
    let serve = async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = drain.started.wait() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // No slot yet: an unidentified connection counts only against its own address.
            let Some(pending) = sources.admit(peer.ip()) else {
                debug!(%peer, "connection closed: ingest.max_unidentified_per_source reached for its address");
                metrics::counter!("baylink_ingest_connections_refused_total", "door" => "https", "reason" => "unidentified-per-source").increment(1);
                drop(tcp);
                continue;
            };
            let tls = tokio_rustls::TlsAcceptor::from(tls.current());
            let (app, slots, drain) = (app.clone(), slots.clone(), drain.clone());
            let counted = active.enter();
            tokio::spawn(async move {
                let _counted = counted;
                let conn = Connection {
                    peer,
                    header_timeout,
                    handshake_timeout,
                };
                conn.serve(tcp, pending, tls, app, slots, drain).await;
            });
        }
        // Closing the listener makes the kernel refuse new connections at once.
        drop(listener);
        info!("hospital API: listener closed for the drain");
    };
    Ok((local, serve))
}

/// One hospital connection and its time bounds.
struct Connection {
    peer: SocketAddr,
    header_timeout: Duration,
    handshake_timeout: Duration,
}

impl Connection {
    /// TLS handshake within `ingest.handshake_timeout` (counted against the source address),
    /// then a slot of `ingest.max_connections` for the identified hospital, or one `503`
    /// answer when none is free.
    async fn serve(
        self,
        tcp: tokio::net::TcpStream,
        pending: Unidentified,
        tls: tokio_rustls::TlsAcceptor,
        app: Router,
        slots: Arc<Semaphore>,
        drain: Drain,
    ) {
        let peer = self.peer;
        let _ = tcp.set_nodelay(true);
        // Pinned here, so the socket it holds is closed when this function returns, after a
        // time-out is counted: a client that sees the close finds the count.
        let accept = tls.accept(tcp);
        tokio::pin!(accept);
        let handshake = tokio::select! {
            r = tokio::time::timeout(self.handshake_timeout, accept.as_mut()) => r,
            // A connection that has not sent a request yet is not served once the drain started.
            () = drain.started.wait() => return,
        };
        let stream = match handshake {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                info!(%peer, error = %e, "hospital TLS handshake refused");
                return;
            }
            Err(_) => {
                info!(%peer, "hospital TLS handshake timed out (ingest.handshake_timeout)");
                metrics::counter!("baylink_ingest_connections_refused_total", "door" => "https", "reason" => "handshake-timeout").increment(1);
                return;
            }
        };
        let Some(cn) = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(common_name)
        else {
            info!(%peer, "client certificate has no usable common name");
            return;
        };
        // Identified: it no longer counts against its address, and may take a slot.
        drop(pending);
        let http = {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(self.header_timeout);
            b
        };
        let Ok(_permit) = slots.try_acquire_owned() else {
            info!(%peer, hospital = %cn, "hospital connection answered 503: ingest.max_connections reached");
            metrics::counter!("baylink_ingest_connections_refused_total", "door" => "https", "reason" => "busy").increment(1);
            let busy = TowerToHyperService::new(Router::new().fallback(busy));
            let mut http = http;
            let _ = http
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), busy)
                .await;
            return;
        };
        debug!(%peer, hospital = %cn, "hospital connected");
        let svc = TowerToHyperService::new(app.layer(Extension(Hospital(Arc::from(cn)))));
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let res = tokio::select! {
            r = conn.as_mut() => r,
            () = drain.started.wait() => {
                // The request in progress is answered (an upload still arriving when the drain
                // ends is answered 503 by its handler), then the connection closes; an idle
                // keep-alive connection closes at once.
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(e) = res {
            debug!(%peer, error = %e, "hospital connection ended");
        }
    }
}

/// The answer of a connection that found every slot taken: `503`, try again shortly.
async fn busy() -> Response {
    let mut r = ApiError::limit(
        StatusCode::SERVICE_UNAVAILABLE,
        "ingest.max_connections",
        "the edge is busy: every connection slot is taken; try again shortly",
    )
    .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

fn transfer_id(s: &str) -> Result<TransferId, ApiError> {
    s.parse::<TransferId>()
        .map_err(|_| ApiError::from(IngestError::NotFound))
}

/// Parses a declaration, naming the first bad field.
pub fn parse_declaration(body: &[u8]) -> Result<Declaration, ApiError> {
    let bad = |field: &str, why: &str| ApiError::field(field, format!("{field}: {why}"));
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::field("", format!("body is not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(bad("", "the declaration must be a JSON object"));
    };
    const FIELDS: [&str; 5] = [
        "patient_id",
        "category",
        "purpose",
        "destination",
        "consent_ref",
    ];
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad(unknown, "unknown field"));
    }
    let text = |field: &'static str, required: bool| -> Result<Option<String>, ApiError> {
        match map.get(field) {
            None | Some(Value::Null) if required => Err(bad(field, "missing")),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Err(bad(field, "empty")),
            Some(Value::String(s)) if s.len() > 256 => Err(bad(field, "longer than 256 bytes")),
            Some(Value::String(s)) if s.chars().any(char::is_control) => {
                Err(bad(field, "contains control characters"))
            }
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(field, "must be a string")),
        }
    };
    let required = |field: &'static str| -> Result<String, ApiError> {
        Ok(text(field, true)?.unwrap_or_default())
    };
    Ok(Declaration {
        patient_id: required("patient_id")?,
        category: required("category")?,
        purpose: required("purpose")?,
        destination: required("destination")?,
        consent_ref: text("consent_ref", false)?,
    })
}

async fn declare(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let decl = parse_declaration(&body)?;
    let id = app.store.declare(&hospital, decl).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/transfers/{id}"))],
        Json(json!({ "id": id.to_string() })),
    )
        .into_response())
}

/// Longest `?wait=` a status request may hold its answer.
pub const MAX_STATUS_WAIT: Duration = Duration::from_secs(300);

/// `?wait=SECONDS` of `GET /v1/transfers/{id}` (0 when absent): how long to hold the answer
/// for the state to change.
fn wait_from_query(query: Option<&str>) -> Result<Duration, ApiError> {
    let Some(v) = only_param(query, "wait")? else {
        return Ok(Duration::ZERO);
    };
    v.parse::<u64>()
        .ok()
        .filter(|s| *s <= MAX_STATUS_WAIT.as_secs())
        .map(Duration::from_secs)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "wait= must be whole seconds from 0 to {}",
                    MAX_STATUS_WAIT.as_secs()
                ),
            )
        })
}

async fn status(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let id = transfer_id(&id)?;
    let wait = wait_from_query(uri.query())?;
    // A long poll does not hold the drain: it answers with the state as it is.
    let st = tokio::select! {
        st = app.store.status_after_change(&hospital, &id, wait) => st?,
        () = app.drain.started.wait() => app.store.status(&hospital, &id).await?,
    };
    Ok(Json(st).into_response())
}

async fn receipt(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = transfer_id(&id)?;
    Ok(Json(app.store.receipt(&hospital, &id).await?).into_response())
}

async fn delivery(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = transfer_id(&id)?;
    Ok(Json(app.store.delivery(&hospital, &id).await?).into_response())
}

async fn proof(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = transfer_id(&id)?;
    Ok(Json(app.store.proof(&hospital, &id).await?).into_response())
}

async fn commit(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = transfer_id(&id)?;
    app.store.commit(&hospital, &id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id.to_string(), "state": "sealed" })),
    )
        .into_response())
}

/// The declared body length, if any; a malformed header is refused.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "bad Content-Length"))
        })
        .transpose()
}

async fn upload(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // A client that sent `Expect: 100-continue` waits for our answer before it sends the
    // body: reading the body would make hyper send `100 Continue` and invite the very bytes
    // an early refusal wants to avoid (and then reset the connection under them). Once the
    // body was read from, `100 Continue` went out and the client is sending: drain then.
    let waits_for_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut stream = body.into_data_stream();
    let mut body_read = false;
    match receive(
        &app,
        &hospital,
        &id,
        &name,
        &headers,
        &mut stream,
        &mut body_read,
    )
    .await
    {
        Ok(size) => Ok((
            StatusCode::CREATED,
            Json(json!({ "name": name, "bytes": size })),
        )
            .into_response()),
        Err((e, drain)) => {
            if drain && (body_read || !waits_for_continue) {
                drain_body(&mut stream, app.idle_timeout).await;
            }
            Err(e)
        }
    }
}

/// The upload proper; an error says whether the body may still be arriving (drain it).
async fn receive(
    app: &AppState,
    hospital: &str,
    id: &str,
    name: &str,
    headers: &HeaderMap,
    stream: &mut axum::body::BodyDataStream,
    body_read: &mut bool,
) -> Result<u64, (ApiError, bool)> {
    let early = |e: ApiError| (e, true);
    let id = transfer_id(id).map_err(early)?;
    let declared = content_length(headers).map_err(|e| (e, false))?;
    if let Some(len) = declared
        && len > app.store.max_upload_bytes()
    {
        let limit = app.store.max_upload_bytes();
        return Err(early(IngestError::TooLarge { limit }.into()));
    }
    let mut upload = app
        .store
        .begin_file(hospital, &id, name)
        .await
        .map_err(|e| early(e.into()))?;
    if let Some(len) = declared {
        upload.check_len(len).map_err(|e| early(e.into()))?;
    }
    loop {
        *body_read = true;
        let next = tokio::select! {
            biased;
            // The drain ended with the body still arriving: not durable, not answered success.
            () = app.drain.ended.wait() => {
                info!(transfer = %id, file = %name, "upload cut off by the shutdown; the partial file is discarded");
                return Err((ApiError::stopping(), false));
            }
            next = tokio::time::timeout(app.idle_timeout, stream.next()) => next,
        };
        match next {
            Err(_) => {
                return Err((
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "no body bytes within ingest.idle_timeout; the partial file was discarded",
                    ),
                    false,
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                info!(transfer = %id, file = %name, error = %e, "upload body broke off");
                return Err((
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("the request body broke off: {e}"),
                    ),
                    false,
                ));
            }
            Ok(Some(Ok(data))) => upload.write(data).await.map_err(|e| early(e.into()))?,
        }
    }
    upload.finish().await.map_err(|e| (e.into(), false))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn query_parameters_are_checked_by_name_and_value() {
        assert_eq!(wait_from_query(None).unwrap(), Duration::ZERO);
        assert_eq!(
            wait_from_query(Some("wait=300")).unwrap(),
            Duration::from_secs(300)
        );
        for bad in [
            "wait=x",
            "wait=301",
            "wait=-1",
            "wait",
            "wait=1&wait=1",
            "since=1",
        ] {
            let e = wait_from_query(Some(bad)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
            let said = e.body()["error"].as_str().unwrap().to_owned();
            assert!(said.contains("wait="), "{bad}: {said}");
        }
        use super::super::stow::purpose_from_query;
        assert_eq!(purpose_from_query(None).unwrap(), "care");
        assert_eq!(
            purpose_from_query(Some("purpose=research")).unwrap(),
            "research"
        );
        for bad in ["purpose=", "purpose=a/b", "purpose=a&purpose=b", "wait=1"] {
            let e = purpose_from_query(Some(bad)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    fn field(body: &str) -> String {
        let e = parse_declaration(body.as_bytes()).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        e.body()["field"].as_str().unwrap().to_owned()
    }

    #[test]
    fn declarations_name_the_bad_field() {
        let ok = parse_declaration(
            br#"{"patient_id":"P-1","category":"c","purpose":"p","destination":"d","consent_ref":null}"#,
        )
        .unwrap();
        assert_eq!(ok.patient_id, "P-1");
        assert_eq!(ok.consent_ref, None);
        assert_eq!(field("[]"), "");
        assert_eq!(field("{"), "");
        assert_eq!(
            field(r#"{"category":"c","purpose":"p","destination":"d"}"#),
            "patient_id"
        );
        assert_eq!(
            field(r#"{"patient_id":"","category":"c","purpose":"p","destination":"d"}"#),
            "patient_id"
        );
        assert_eq!(
            field(r#"{"patient_id":"x","category":["c"],"purpose":"p","destination":"d"}"#),
            "category"
        );
        assert_eq!(
            field(r#"{"patient_id":"x","category":"c","purpose":"p\u0007","destination":"d"}"#),
            "purpose"
        );
        assert_eq!(
            field(r#"{"patient_id":"x","category":"c","purpose":"p","destination":"d","x":1}"#),
            "x"
        );
        assert_eq!(
            field(
                r#"{"patient_id":"x","category":"c","purpose":"p","destination":"d","consent_ref":5}"#
            ),
            "consent_ref"
        );
    }

    #[test]
    fn file_names() {
        use crate::ingest::store::check_file_name;
        assert!(check_file_name("scan-1.dcm").is_ok());
        assert!(check_file_name(&"a".repeat(255)).is_ok());
        for bad in [
            "", ".", "..", ".hidden", "a/b", "a\\b", "a\0b", "a\u{1}b", "a\u{7f}b",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name(&"a".repeat(256)).is_err());
    }

    fn pump(
        from: &mut rustls::Connection,
        to: &mut rustls::Connection,
    ) -> Result<(), rustls::Error> {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// An in-memory handshake against the hospital listener's configuration; the server's
    /// view of the client's CN, or the error that ended it.
    fn handshake(
        with_client_cert: bool,
    ) -> Result<(rustls::Connection, rustls::Connection), rustls::Error> {
        use crate::pki::{Authority, LeafKind};
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test CA").unwrap();
        let server = ca.issue("edge", LeafKind::Appliance).unwrap();
        let client = ca.issue("hospital-a", LeafKind::Client).unwrap();
        let w = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_path = w("ca.pem", ca.cert_pem());
        let cert = w("edge.pem", &server.cert_pem);
        let key = w("edge.key", &server.key_pem);
        let config =
            tls_config_from(&ca_path, &TlsIdentity::from_pem_files(&cert, &key).unwrap()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in load_ca(&ca_path).unwrap() {
            roots.add(c).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let client_config = if with_client_cert {
            let id = TlsIdentity::from_pem_files(
                &w("h.pem", &client.cert_pem),
                &w("h.key", &client.key_pem),
            )
            .unwrap();
            builder.with_client_cert_resolver(id.resolver())
        } else {
            builder.with_no_client_auth()
        };
        let mut s: rustls::Connection = rustls::ServerConnection::new(Arc::new(config))
            .unwrap()
            .into();
        let mut c: rustls::Connection = rustls::ClientConnection::new(
            Arc::new(client_config),
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
        )
        .unwrap()
        .into();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            pump(&mut c, &mut s)?;
            pump(&mut s, &mut c)?;
        }
        Ok((c, s))
    }

    #[test]
    fn hospital_tls_prefers_x25519mlkem768_and_requires_a_client_certificate() {
        let (c, s) = handshake(true).unwrap();
        assert!(!c.is_handshaking() && !s.is_handshaking());
        assert_eq!(
            s.negotiated_key_exchange_group().unwrap().name(),
            rustls::NamedGroup::X25519MLKEM768
        );
        let chain = s.peer_certificates().unwrap();
        assert_eq!(common_name(&chain[0]).as_deref(), Some("hospital-a"));
        let err = handshake(false).unwrap_err();
        assert!(
            matches!(err, rustls::Error::NoCertificatesPresented),
            "{err:?}"
        );
    }

    #[test]
    fn content_length_header() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h).unwrap(), None);
        h.insert(header::CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(content_length(&h).unwrap(), Some(12));
        h.insert(header::CONTENT_LENGTH, "-1".parse().unwrap());
        assert!(content_length(&h).is_err());
    }
}
