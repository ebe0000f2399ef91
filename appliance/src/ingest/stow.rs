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
//!
//! The work of one request is bounded: at most `ingest.stow_max_parts` parts (more: 413, and
//! the transfer is dropped), at most `ingest.stow_max_failed_listed` failed parts listed in
//! the answer (all counted in `X-Baylink-Failed-Count`), one log line per request whatever
//! its parts. The prefix is parsed incrementally ([`PrefixParser`]) every [`PARSE_STEP`] new
//! bytes, larger walks on the blocking pool behind a small semaphore so a flood of parts
//! never holds the async workers that serve the other hospitals, the DICOM port and sending.

use axum::body::{Body, BodyDataStream};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::BytesMut;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::api::{ApiError, AppState, Hospital, drain_body, only_param};
use super::multipart::{MultipartError, MultipartReader, boundary};
use super::part10::{Instance, Part10Error, PrefixParser};
use super::store::IngestError;
use crate::dicom::reader::{Facts, Reader};
use crate::policy::Declaration;
use baylink_net::proto::TransferId;

/// The most bytes of one part held in memory to find its PatientID.
pub const MAX_PREFIX: usize = 1024 * 1024;
/// New prefix bytes gathered before the prefix is parsed again (also parsed at the part's
/// end and at [`MAX_PREFIX`]).
pub const PARSE_STEP: usize = 64 * 1024;
/// A parse with fewer bytes than this left to walk runs on the request's task (a walk of a
/// few microseconds); a longer one goes to the blocking pool.
const INLINE_PARSE: usize = 4 * 1024;
/// Parts between two yields of a request's task to the scheduler.
const YIELD_EVERY: usize = 64;

pub use super::stow_limits::{
    DEFAULT_STOW_MAX_FAILED_LISTED, DEFAULT_STOW_MAX_PARTS, MAX_STOW_MAX_FAILED_LISTED,
    MAX_STOW_MAX_PARTS, PARSE_SLOTS, StowLimits, max_failed_listed_setting, max_parts_setting,
};

/// FailureReason: processing failure (used for a refused patient).
pub const PROCESSING_FAILURE: u16 = 0x0110;
/// FailureReason: duplicate SOP instance within the request.
pub const DUPLICATE_INSTANCE: u16 = 0x0111;
/// FailureReason: out of resources (size limit, disk full).
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// FailureReason: cannot understand (malformed DICOM, cut in the middle of an element).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
/// FailureReason: the data set does not match its SOP class (a Study, Series or SOP
/// Instance UID missing).
pub const DATA_SET_MISMATCH: u16 = 0xA900;
/// FailureReason: the instance's transfer syntax is not one the edge passes on.
pub const TRANSFER_SYNTAX_NOT_SUPPORTED: u16 = 0xC122;
/// FailureReason: the instance's SOP class is not one the edge accepts (the DICOM door's
/// storage SOP classes, [`crate::dicom::STORAGE_SOP_CLASSES`]).
pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;

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

/// Why a part failed (each counted for the request's log line).
#[derive(Debug, Clone, Copy)]
enum Why {
    /// A part that is not `application/dicom`.
    NotDicom,
    /// No routing facts in its prefix, or the data set is cut or malformed further on.
    Malformed,
    /// A Study, Series or SOP Instance UID is missing.
    Incomplete,
    /// A transfer syntax the edge does not pass on.
    Syntax,
    /// A SOP class the edge does not accept.
    SopClass,
    /// The request's patient was refused by policy.
    Refused,
    /// Another patient than the request's transfer.
    OtherPatient,
    /// The SOP instance came twice.
    Duplicate,
    /// Over the size limit, or the spool is full.
    OutOfResources,
    /// The spool could not store it.
    NotStored,
}

impl Why {
    fn reason(self) -> u16 {
        match self {
            Why::NotDicom | Why::Malformed => CANNOT_UNDERSTAND,
            Why::Incomplete => DATA_SET_MISMATCH,
            Why::Syntax => TRANSFER_SYNTAX_NOT_SUPPORTED,
            Why::SopClass => SOP_CLASS_NOT_SUPPORTED,
            Why::Refused | Why::OtherPatient | Why::NotStored => PROCESSING_FAILURE,
            Why::Duplicate => DUPLICATE_INSTANCE,
            Why::OutOfResources => OUT_OF_RESOURCES,
        }
    }
}

/// The failed parts of a request: listed up to a cap, all counted.
struct Failures {
    listed: Vec<Failed>,
    cap: usize,
    total: usize,
    counts: [usize; 10],
    /// The first problem's text, for the request's log line.
    first_problem: Option<String>,
}

impl Failures {
    fn new(cap: usize) -> Failures {
        Failures {
            listed: Vec::new(),
            cap,
            total: 0,
            counts: [0; 10],
            first_problem: None,
        }
    }

    fn add(&mut self, why: Why, inst: Option<&Instance>, problem: impl FnOnce() -> String) {
        let (class, instance) = match inst {
            Some(i) => (Some(i.sop_class.clone()), Some(i.sop_instance.clone())),
            None => (None, None),
        };
        self.add_named(why, class, instance, problem);
    }

    /// As [`Failures::add`], naming the instance by the UIDs its meta group gave (if any).
    fn add_named(
        &mut self,
        why: Why,
        class: Option<String>,
        instance: Option<String>,
        problem: impl FnOnce() -> String,
    ) {
        self.total += 1;
        self.counts[why as usize] += 1;
        if self.first_problem.is_none() {
            self.first_problem = Some(problem());
        }
        if self.listed.len() < self.cap {
            self.listed.push(Failed {
                class,
                instance,
                reason: why.reason(),
            });
        }
    }

    fn count(&self, why: Why) -> usize {
        self.counts[why as usize]
    }
}

/// What one request has done so far.
struct Request {
    transfer: Option<(TransferId, String)>,
    refused: bool,
    parts: usize,
    stored: Vec<Instance>,
    failures: Failures,
}

impl Request {
    /// The request's one log line (never the patient: the transfer id names it).
    fn log(&self, hospital: &str, status: StatusCode) {
        let f = &self.failures;
        let transfer = self
            .transfer
            .as_ref()
            .map_or_else(|| "none".to_owned(), |(id, _)| id.to_string());
        info!(
            hospital,
            transfer,
            status = status.as_u16(),
            parts = self.parts,
            stored = self.stored.len(),
            failed = f.total,
            unlisted = f.total - f.listed.len(),
            not_dicom = f.count(Why::NotDicom),
            malformed = f.count(Why::Malformed),
            incomplete = f.count(Why::Incomplete),
            unsupported_syntax = f.count(Why::Syntax),
            unsupported_class = f.count(Why::SopClass),
            refused = f.count(Why::Refused),
            other_patient = f.count(Why::OtherPatient),
            duplicate = f.count(Why::Duplicate),
            out_of_resources = f.count(Why::OutOfResources),
            not_stored = f.count(Why::NotStored),
            first_problem = f.first_problem.as_deref().unwrap_or("none"),
            "STOW-RS request answered"
        );
    }
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
    let Some(v) = only_param(query, "purpose")? else {
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
    State(limits): State<StowLimits>,
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
    let mut req = Request {
        transfer: None,
        refused: false,
        parts: 0,
        stored: Vec::new(),
        failures: Failures::new(limits.max_failed_listed),
    };
    let received = tokio::select! {
        biased;
        // The drain ended with the body still arriving: nothing of the request is kept.
        () = app.drain.ended.wait() => Err(ApiError::stopping()),
        r = receive(&app, &limits, &hospital, &purpose, &mut reader, &mut req) => r,
    };
    let stopping = received
        .as_ref()
        .is_err_and(|e| e.status() == StatusCode::SERVICE_UNAVAILABLE);
    let received = match received {
        Ok(()) => match &req.transfer {
            Some((id, _)) if !req.stored.is_empty() => app.store.commit(&hospital, id).await,
            _ => Ok(()),
        }
        .map_err(ApiError::from),
        Err(e) => {
            // The client may still be sending: read on a little so it sees the answer (not
            // when the edge is stopping: the drain is over).
            if !stopping && let Some(stream) = reader.unfinished_stream() {
                drain_body(stream, app.idle_timeout).await;
            }
            // Nothing is left open: the transfer this request declared goes with what it held.
            if let Some((id, _)) = &req.transfer
                && let Err(a) = app.store.abandon(&hospital, id).await
            {
                warn!(transfer = %id, error = %a, "STOW-RS transfer of a failed request not dropped");
            }
            Err(e)
        }
    };
    if let Err(e) = received {
        req.log(&hospital, e.status());
        return Err(e);
    }

    let status = if req.stored.is_empty() {
        StatusCode::CONFLICT
    } else if req.failures.total == 0 {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    req.log(&hospital, status);
    let answer = response_json(&req.stored, &req.failures.listed);
    let mut response = (status, Json(answer)).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    if let Some((id, _)) = &req.transfer
        && let Ok(v) = HeaderValue::from_str(&id.to_string())
    {
        h.insert("x-baylink-transfer", v);
    }
    if req.failures.total > 0 {
        h.insert(
            "x-baylink-failed-count",
            HeaderValue::from(req.failures.total),
        );
    }
    Ok(response)
}

fn bad_body(e: MultipartError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, format!("multipart body: {e}"))
}

/// Reads the parts of the body into the request's transfer.
async fn receive(
    app: &AppState,
    limits: &StowLimits,
    hospital: &str,
    purpose: &str,
    reader: &mut MultipartReader<BodyDataStream>,
    req: &mut Request,
) -> Result<(), ApiError> {
    while let Some(part) = reader.next_part().await.map_err(bad_body)? {
        req.parts += 1;
        if req.parts > limits.max_parts {
            return Err(ApiError::limit(
                StatusCode::PAYLOAD_TOO_LARGE,
                "ingest.stow_max_parts",
                format!(
                    "more than {} parts in one STOW-RS request (ingest.stow_max_parts); \
                     nothing of the request is kept",
                    limits.max_parts
                ),
            ));
        }
        if req.parts.is_multiple_of(YIELD_EVERY) {
            // A body of many small parts arrives without waiting: let the others run.
            tokio::task::yield_now().await;
        }
        if let Some(ct) = &part.content_type
            && !ct.starts_with("application/dicom")
        {
            req.failures.add(Why::NotDicom, None, || {
                // The client's text: at most 64 characters of it go to the log.
                let ct: String = ct.chars().take(64).collect();
                format!("a part of type {ct:?}")
            });
            continue;
        }
        let (prefix, parsed) = read_prefix(&limits.parse_slots, reader).await?;
        let inst = match parsed {
            Ok(i) => i,
            Err((why, class, instance)) => {
                req.failures
                    .add_named(Why::Malformed, class, instance, || why);
                continue;
            }
        };
        if !crate::dicom::TRANSFER_SYNTAXES
            .iter()
            .any(|(uid, _)| *uid == inst.transfer_syntax)
        {
            req.failures.add(Why::Syntax, Some(&inst), || {
                format!(
                    "transfer syntax {} is not one the edge passes on",
                    inst.transfer_syntax
                )
            });
            continue;
        }
        // What the DICOM door would not negotiate, this door does not take either.
        if !crate::dicom::STORAGE_SOP_CLASSES
            .iter()
            .any(|(uid, _)| *uid == inst.sop_class)
        {
            req.failures.add(Why::SopClass, Some(&inst), || {
                format!("SOP class {} is not one the edge accepts", inst.sop_class)
            });
            continue;
        }
        if req.transfer.is_none() && !req.refused {
            match app
                .store
                .declare(hospital, declaration_for(&inst.patient_id, purpose))
                .await
            {
                Ok(id) => req.transfer = Some((id, inst.patient_id.clone())),
                Err(IngestError::Refused(r)) => {
                    info!(hospital, rule = r.rule, reason = %r.reason, "STOW-RS refused by policy");
                    req.refused = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some((id, patient)) = &req.transfer else {
            req.failures.add(Why::Refused, Some(&inst), || {
                "the request's patient is refused by policy".into()
            });
            continue;
        };
        if &inst.patient_id != patient {
            let refusal = crate::policy::Refusal::new(
                crate::dicom::deid::RULE_PATIENT_MISMATCH,
                "the instance's PatientID differs from the request's transfer",
            );
            let name = format!("{}.dcm", inst.sop_instance);
            // audit: the refusal is durable before it is answered.
            app.store
                .refuse_file(hospital, id, &name, Some(&inst.patient_id), &refusal)
                .await?;
            req.failures
                .add(Why::OtherPatient, Some(&inst), || refusal.reason.clone());
            continue;
        }
        // A de-identified instance is stored under its new SOP Instance UID.
        let name = app
            .store
            .instance_file_name(id, &format!("{}.dcm", inst.sop_instance));
        let mut upload = match app.store.begin_file(hospital, id, &name).await {
            Ok(u) => u,
            // A quota or the spool reserve refuses the request, not just the part.
            Err(e @ (IngestError::Quota { .. } | IngestError::Reserve { .. })) => {
                return Err(e.into());
            }
            Err(e @ IngestError::Conflict(_)) => {
                req.failures
                    .add(Why::Duplicate, Some(&inst), || e.to_string());
                continue;
            }
            Err(e) => {
                req.failures
                    .add(Why::NotStored, Some(&inst), || e.to_string());
                continue;
            }
        };
        // The whole instance is walked as it streams to the spool: it must end where its
        // last element does and hold the UIDs the record store files it under.
        let mut whole = Reader::new(None);
        let mut walked = whole.feed(&prefix).map(drop);
        let mut outcome = upload.write(prefix.freeze()).await;
        while outcome.is_ok() && walked.is_ok() {
            match reader.read_chunk().await.map_err(bad_body)? {
                Some(c) => {
                    walked = whole.feed(&c).map(drop);
                    if walked.is_ok() {
                        outcome = upload.write(c).await;
                    }
                }
                None => break,
            }
        }
        if outcome.is_ok()
            && let Err(refused) = walked
                .and_then(|()| whole.finish())
                .map_err(|e| {
                    (
                        Why::Malformed,
                        format!("the data set is not well formed: {e}"),
                    )
                })
                .and_then(|()| missing_uids(whole.facts()).map_err(|m| (Why::Incomplete, m)))
        {
            // Dropping the upload removes what it wrote.
            drop(upload);
            let (why, text) = refused;
            req.failures.add(why, Some(&inst), || text);
            continue;
        }
        let outcome = match outcome {
            Ok(()) => upload.finish().await.map(drop),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => req.stored.push(inst),
            Err(e @ (IngestError::Quota { .. } | IngestError::Reserve { .. })) => {
                return Err(e.into());
            }
            Err(e @ (IngestError::TooLarge { .. } | IngestError::NoSpace)) => {
                req.failures
                    .add(Why::OutOfResources, Some(&inst), || e.to_string());
            }
            Err(e) => {
                req.failures
                    .add(Why::NotStored, Some(&inst), || e.to_string());
            }
        }
    }
    Ok(())
}

/// Why a walked instance cannot go to the record store: a Study, Series or SOP Instance UID
/// (0020,000D), (0020,000E), (0008,0018) absent or empty at the top level.
pub fn missing_uids(facts: &Facts) -> Result<(), String> {
    for (value, what) in [
        (&facts.sop_instance, "SOP Instance UID (0008,0018)"),
        (&facts.study_instance, "Study Instance UID (0020,000D)"),
        (&facts.series_instance, "Series Instance UID (0020,000E)"),
    ] {
        if value.as_deref().is_none_or(str::is_empty) {
            return Err(format!("{what} is missing"));
        }
    }
    Ok(())
}

/// A part that yields no instance: why, and its meta group's SOP Class and Instance UIDs
/// when they were readable.
type PrefixFailure = (String, Option<String>, Option<String>);

/// Gathers a part's first bytes until its routing facts are in them: the bytes read, and the
/// instance or why it has none. Parses every [`PARSE_STEP`] new bytes, resuming where the
/// last parse stopped.
async fn read_prefix(
    slots: &Semaphore,
    reader: &mut MultipartReader<BodyDataStream>,
) -> Result<(BytesMut, Result<Instance, PrefixFailure>), ApiError> {
    let mut prefix = BytesMut::new();
    let mut parser = PrefixParser::new();
    let mut parsed_at = 0;
    let mut ended = false;
    loop {
        if ended || prefix.len() - parsed_at >= PARSE_STEP || prefix.len() >= MAX_PREFIX {
            parsed_at = prefix.len();
            let result;
            if prefix.len() - parser.walked() < INLINE_PARSE {
                result = parser.parse(&prefix);
            } else {
                (parser, prefix, result) = parse_in_pool(slots, parser, prefix).await?;
            }
            let why = match result {
                Ok(i) => return Ok((prefix, Ok(i))),
                Err(Part10Error::Malformed(why)) => Some(why),
                Err(Part10Error::NeedMore) if ended => {
                    Some("the instance ends before its PatientID".to_owned())
                }
                Err(Part10Error::NeedMore) if prefix.len() >= MAX_PREFIX => {
                    Some(format!("no PatientID within the first {MAX_PREFIX} bytes"))
                }
                Err(Part10Error::NeedMore) => None,
            };
            if let Some(why) = why {
                let facts = parser.facts();
                let valid = |v: &Option<String>| {
                    v.as_deref()
                        .filter(|u| crate::dicom::part10::validate_uid(u).is_ok())
                        .map(str::to_owned)
                };
                let (class, instance) = (
                    valid(&facts.media_sop_class),
                    valid(&facts.media_sop_instance),
                );
                return Ok((prefix, Err((why, class, instance))));
            }
        }
        match reader.read_chunk().await.map_err(bad_body)? {
            Some(c) => prefix.extend_from_slice(&c),
            None => ended = true,
        }
    }
}

/// Runs one parse on the blocking pool, at most [`PARSE_SLOTS`] at once.
async fn parse_in_pool(
    slots: &Semaphore,
    mut parser: PrefixParser,
    prefix: BytesMut,
) -> Result<(PrefixParser, BytesMut, Result<Instance, Part10Error>), ApiError> {
    let _slot = slots.acquire().await.map_err(|_| {
        ApiError::from(IngestError::Internal(
            "the STOW-RS parse slots are closed".into(),
        ))
    })?;
    tokio::task::spawn_blocking(move || {
        let result = parser.parse(&prefix);
        (parser, prefix, result)
    })
    .await
    .map_err(|e| ApiError::from(IngestError::Internal(format!("STOW-RS prefix parse: {e}"))))
}
