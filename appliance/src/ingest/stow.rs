//! DICOMweb STOW-RS: `POST /dicom-web/studies` with a `multipart/related;
//! type="application/dicom"` body. One request is one transfer.
//!
//! Each part streams into the spool as it arrives; only its first bytes (at most
//! [`MAX_PREFIX`]) are held to read the SOP UIDs and the PatientID. The first well-formed
//! instance names the patient: the declaration (`diagnostic-image`, `care`, `hk-ehealth`) goes
//! through the compliance checkpoint, and the transfer is declared. Instances of another
//! patient, malformed ones, duplicates and those over the size limit are listed in the
//! FailedSOPSequence with a FailureReason; the others are stored, and the transfer is
//! committed when the request ends. The answer is the standard STOW-RS response in DICOM JSON
//! with the transfer id in `X-Baylink-Transfer`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::BytesMut;
use serde_json::{Map, Value, json};
use tracing::{info, warn};

use super::http::{ApiError, AppState, Hospital};
use super::multipart::{MultipartReader, boundary};
use super::part10::{self, Instance, Part10Error};
use super::store::IngestError;
use crate::policy::Declaration;
use baylink_net::proto::TransferId;

/// The most bytes of one part held in memory to find its PatientID.
pub const MAX_PREFIX: usize = 1024 * 1024;

/// FailureReason: processing failure (used for a refused patient).
pub const PROCESSING_FAILURE: u16 = 0x0110;
/// FailureReason: duplicate SOP instance within the request.
pub const DUPLICATE_INSTANCE: u16 = 0x0111;
/// FailureReason: out of resources (size limit, disk full).
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// FailureReason: cannot understand (malformed DICOM).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;

/// The declaration STOW-RS instances travel under (the rule until the compliance issue
/// lands: the patient has a consent record that allows it), for `purpose` (`care` unless the
/// request names another with `?purpose=`).
pub fn declaration_for(patient_id: &str, purpose: &str) -> Declaration {
    Declaration {
        patient_id: patient_id.to_owned(),
        category: "diagnostic-image".into(),
        purpose: purpose.to_owned(),
        destination: "hk-ehealth".into(),
        consent_ref: None,
    }
}

struct Failed {
    class: Option<String>,
    instance: Option<String>,
    reason: u16,
}

fn uid(tag: &str, value: &str) -> (String, Value) {
    (tag.to_owned(), json!({ "vr": "UI", "Value": [value] }))
}

fn response_json(stored: &[Instance], failed: &[Failed]) -> Value {
    let mut top = Map::new();
    if !stored.is_empty() {
        let items: Vec<Value> = stored
            .iter()
            .map(|i| {
                Value::Object(Map::from_iter([
                    uid("00081150", &i.sop_class),
                    uid("00081155", &i.sop_instance),
                ]))
            })
            .collect();
        top.insert("00081199".into(), json!({ "vr": "SQ", "Value": items }));
    }
    if !failed.is_empty() {
        let items: Vec<Value> = failed
            .iter()
            .map(|f| {
                let mut m = Map::new();
                if let Some(c) = &f.class {
                    let (k, v) = uid("00081150", c);
                    m.insert(k, v);
                }
                if let Some(i) = &f.instance {
                    let (k, v) = uid("00081155", i);
                    m.insert(k, v);
                }
                m.insert(
                    "00081197".into(),
                    json!({ "vr": "US", "Value": [f.reason] }),
                );
                Value::Object(m)
            })
            .collect();
        top.insert("00081198".into(), json!({ "vr": "SQ", "Value": items }));
    }
    Value::Object(top)
}

/// The purpose a STOW-RS request declares: `?purpose=<name>` (e.g. `research`, whose
/// instances are de-identified), `care` when absent.
pub fn purpose_from_query(query: Option<&str>) -> Result<String, ApiError> {
    let Some(v) = super::http::only_param(query, "purpose")? else {
        return Ok("care".to_owned());
    };
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "purpose= must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    Ok(v.to_owned())
}

/// `POST /dicom-web/studies`.
pub(super) async fn stow(
    State(app): State<AppState>,
    Extension(Hospital(hospital)): Extension<Hospital>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let purpose = purpose_from_query(uri.query())?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let lower = content_type.to_ascii_lowercase();
    if !lower.starts_with("multipart/related") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "STOW-RS needs Content-Type multipart/related; type=\"application/dicom\"",
        ));
    }
    if let Some(t) = lower
        .split(';')
        .skip(1)
        .find_map(|p| p.split_once('=').filter(|(k, _)| k.trim() == "type"))
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        && t != "application/dicom"
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("type={t} is not accepted; only application/dicom parts"),
        ));
    }
    let boundary = boundary(&content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "Content-Type has no usable boundary parameter",
        )
    })?;
    let mut reader = MultipartReader::new(body.into_data_stream(), &boundary, app.idle_timeout);
    let mut transfer: Option<(TransferId, String)> = None;
    let mut refused = false;
    let mut stored: Vec<Instance> = Vec::new();
    let mut failed: Vec<Failed> = Vec::new();
    let bad_body = |e: super::multipart::MultipartError| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("multipart body: {e}"))
    };

    while let Some(part) = reader.next_part().await.map_err(bad_body)? {
        if let Some(ct) = &part.content_type
            && !ct.starts_with("application/dicom")
        {
            failed.push(Failed {
                class: None,
                instance: None,
                reason: CANNOT_UNDERSTAND,
            });
            continue;
        }
        // Gather the prefix until the routing facts are in it.
        let mut prefix = BytesMut::new();
        let parsed = loop {
            match part10::parse_prefix(&prefix) {
                Ok(i) => break Ok(i),
                Err(Part10Error::Malformed(why)) => break Err(why),
                Err(Part10Error::NeedMore) if prefix.len() >= MAX_PREFIX => {
                    break Err(format!("no PatientID within the first {MAX_PREFIX} bytes"));
                }
                Err(Part10Error::NeedMore) => match reader.read_chunk().await.map_err(bad_body)? {
                    Some(c) => prefix.extend_from_slice(&c),
                    None => break Err("the instance ends before its PatientID".into()),
                },
            }
        };
        let inst = match parsed {
            Ok(i) => i,
            Err(why) => {
                info!(hospital = %hospital, reason = %why, "STOW-RS part refused as malformed");
                failed.push(Failed {
                    class: None,
                    instance: None,
                    reason: CANNOT_UNDERSTAND,
                });
                continue;
            }
        };
        let fail = |reason| Failed {
            class: Some(inst.sop_class.clone()),
            instance: Some(inst.sop_instance.clone()),
            reason,
        };
        if transfer.is_none() && !refused {
            match app
                .store
                .declare(&hospital, declaration_for(&inst.patient_id, &purpose))
                .await
            {
                Ok(id) => transfer = Some((id, inst.patient_id.clone())),
                Err(IngestError::Refused(r)) => {
                    info!(hospital = %hospital, rule = r.rule, reason = %r.reason, "STOW-RS refused by policy");
                    refused = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some((id, patient)) = &transfer else {
            failed.push(fail(PROCESSING_FAILURE));
            continue;
        };
        if &inst.patient_id != patient {
            info!(transfer = %id, "STOW-RS part for another patient refused");
            let refusal = crate::policy::Refusal::new(
                crate::dicom::deid::RULE_PATIENT_MISMATCH,
                "the instance's PatientID differs from the request's transfer",
            );
            let name = format!("{}.dcm", inst.sop_instance);
            // audit: the refusal is durable before it is answered.
            app.store
                .refuse_file(&hospital, id, &name, Some(&inst.patient_id), &refusal)
                .await?;
            failed.push(fail(PROCESSING_FAILURE));
            continue;
        }
        // A de-identified instance is stored under its new SOP Instance UID.
        let name = app
            .store
            .instance_file_name(id, &format!("{}.dcm", inst.sop_instance));
        let mut upload = match app.store.begin_file(&hospital, id, &name).await {
            Ok(u) => u,
            Err(IngestError::Conflict(_)) => {
                failed.push(fail(DUPLICATE_INSTANCE));
                continue;
            }
            Err(e) => {
                warn!(transfer = %id, error = %e, "STOW-RS part not stored");
                failed.push(fail(PROCESSING_FAILURE));
                continue;
            }
        };
        let mut outcome = upload.write(prefix.freeze()).await;
        while outcome.is_ok() {
            match reader.read_chunk().await.map_err(bad_body)? {
                Some(c) => outcome = upload.write(c).await,
                None => break,
            }
        }
        let outcome = match outcome {
            Ok(()) => upload.finish().await.map(drop),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => stored.push(inst),
            Err(e @ (IngestError::TooLarge { .. } | IngestError::NoSpace)) => {
                info!(transfer = %id, error = %e, "STOW-RS part not stored");
                failed.push(fail(OUT_OF_RESOURCES));
            }
            Err(e) => {
                warn!(transfer = %id, error = %e, "STOW-RS part not stored");
                failed.push(fail(PROCESSING_FAILURE));
            }
        }
    }

    if let Some((id, _)) = &transfer
        && !stored.is_empty()
    {
        app.store.commit(&hospital, id).await?;
    }
    let status = if stored.is_empty() {
        StatusCode::CONFLICT
    } else if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut response = (status, Json(response_json(&stored, &failed))).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    if let Some((id, _)) = &transfer
        && let Ok(v) = HeaderValue::from_str(&id.to_string())
    {
        h.insert("x-baylink-transfer", v);
    }
    Ok(response)
}
