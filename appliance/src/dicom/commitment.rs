//! Storage Commitment Push Model SCP (PS3.4 Annex J) on the edge's DICOM doors.
//!
//! A modality (or PACS) asks, with N-ACTION (Action Type 1), whether the edge takes
//! responsibility for a list of SOP instances. The edge answers the N-ACTION at once and the
//! question later, with N-EVENT-REPORT, per instance:
//!
//! - **success** only once the gateway's signed delivery notice of the transfer that carried
//!   the instance (verified and stored by the edge, `notice.bin`) says the record store holds
//!   it: outcome `delivered`, or `partial` without this instance among the refused;
//! - **failure** when the notice lists it refused (the store's reason said as a Storage
//!   Commitment Failure Reason, [`failure_reason_for_store`]), when the transfer ended `undeliverable`/`failed`/`refused`, or at once
//!   (0x0112 No such object instance) when this edge never answered Success to a C-STORE of it
//!   from the same hospital.
//!
//! Until every instance of a request is resolved the request waits, durably: it is written
//! atomically under `spool/.commitment/pending/` (bounded per peer), picked up again at
//! start-up, and removed only once the modality has answered the N-EVENT-REPORT-RQ. The
//! worker wakes on the ingest store's status changes (a delivery notice moves a transfer), never
//! by polling.
//!
//! The map from SOP Instance UID to the transfer that carried it is this module's own
//! index, `spool/.commitment/index/<transfer id>`: one line per instance, appended and
//! fdatasynced by the sink before the instance is answered Success. A transfer's lines are
//! dropped once `spool.retain` has removed its payload and its delivery notice is stored
//! ([`Commitments::forget_pruned`]): from then on a request for those instances is answered
//! 0x0112, as for one never received, and the index holds no more than the spool does.
//!
//! Where the report goes: on the association of the N-ACTION when it is still open and the
//! modality took the SCP role for this SOP class through SCP/SCU Role Selection; otherwise on a
//! new association to the peer's `commitment_host`/`commitment_port`/`commitment_ae_title`
//! (`[[ingest.dicom_peers]]`), retried with backoff while the modality is unreachable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baylink_net::proto::{Outcome, TransferId};
use dicom_ul::association::Association as _;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu, PresentationContextResultReason};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::dimse;
use super::part10::{trim_padding, validate_uid};
use super::reader::long_length;
use super::settings::DicomPeer;
use crate::ingest::{IngestStore, TransferState};
use crate::tls_reload::Swap;
use crate::transfer_dir::{TransferDir, create_dir_durably, sync_dir, write_atomic};

/// Storage Commitment Push Model SOP Class.
pub const STORAGE_COMMITMENT_PUSH: &str = "1.2.840.10008.1.20.1";
/// Its well-known SOP Instance.
pub const STORAGE_COMMITMENT_INSTANCE: &str = "1.2.840.10008.1.20.1.1";
/// Most instances one request may name.
pub const MAX_REFERENCES: usize = 10_000;
/// Largest N-ACTION data set accepted (10 000 references need about 1.3 MB).
pub const MAX_ACTION_BYTES: usize = 4 * 1024 * 1024;
/// Deepest sequence nesting read in an N-ACTION data set.
const MAX_DEPTH: usize = 8;
/// Implicit VR Little Endian.
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
/// The first retry of an undelivered report; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to deliver a report.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Time allowed to connect, negotiate, and for each answer, on the report's association.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Statuses of N-ACTION-RSP and Failure Reasons (0008,1197) used here (PS3.4 J.3.2, PS3.7 C).
pub mod status {
    /// Processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// No such object instance (never received by this edge).
    pub const NO_SUCH_OBJECT_INSTANCE: u16 = 0x0112;
    /// Invalid object instance (the N-ACTION's Requested SOP Instance is not the well-known one).
    pub const INVALID_OBJECT_INSTANCE: u16 = 0x0117;
    /// Missing attribute.
    pub const MISSING_ATTRIBUTE: u16 = 0x0120;
    /// Invalid attribute value.
    pub const INVALID_ATTRIBUTE_VALUE: u16 = 0x0106;
    /// No such action type.
    pub const NO_SUCH_ACTION: u16 = 0x0123;
    /// Resource limitation (too many instances, too many pending requests).
    pub const RESOURCE_LIMITATION: u16 = 0x0213;
    /// Referenced SOP Class not supported.
    pub const REFERENCED_SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Class / Instance conflict.
    pub const CLASS_INSTANCE_CONFLICT: u16 = 0x0119;
}

/// The Failure Reason (0008,1197) a report gives for an instance the record store refused
/// with `store` (its STOW-RS Failure Reason, when it gave one).
///
/// A report may only carry the values Storage Commitment defines (PS3.3 C.14.1.1); the
/// store's reasons are storage statuses (PS3.4 B.2.3, PS3.18), which a modality need not
/// know. A store out of resources (0xA7xx) is a resource limitation; a SOP class the store
/// does not support is said as such; everything else is a processing failure. The store's
/// own reason stays in the delivery notice and the edge's audit log.
pub fn failure_reason_for_store(store: Option<u16>) -> u16 {
    match store {
        Some(code) if code & 0xFF00 == 0xA700 => status::RESOURCE_LIMITATION,
        Some(status::REFERENCED_SOP_CLASS_NOT_SUPPORTED) => {
            status::REFERENCED_SOP_CLASS_NOT_SUPPORTED
        }
        Some(status::CLASS_INSTANCE_CONFLICT) => status::CLASS_INSTANCE_CONFLICT,
        _ => status::PROCESSING_FAILURE,
    }
}

/// One Referenced SOP Sequence item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// Referenced SOP Class UID (0008,1150).
    pub class: String,
    /// Referenced SOP Instance UID (0008,1155).
    pub instance: String,
}

/// A parsed Storage Commitment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRequest {
    /// Transaction UID (0008,1195).
    pub transaction_uid: String,
    /// The instances to commit, in request order.
    pub references: Vec<Reference>,
}

/// Why an N-ACTION was refused: the N-ACTION-RSP status and its Error Comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The status.
    pub status: u16,
    /// Why.
    pub why: String,
}

impl Refused {
    fn new(status: u16, why: impl Into<String>) -> Refused {
        Refused {
            status,
            why: why.into(),
        }
    }
}

/// Checks an N-ACTION-RQ command set against the Storage Commitment Push Model.
pub fn check_command(cmd: &dimse::Command) -> Result<(), Refused> {
    if cmd.requested_sop_class_uid != STORAGE_COMMITMENT_PUSH {
        return Err(Refused::new(
            status::INVALID_ATTRIBUTE_VALUE,
            "Requested SOP Class is not Storage Commitment Push Model",
        ));
    }
    if cmd.requested_sop_instance_uid != STORAGE_COMMITMENT_INSTANCE {
        return Err(Refused::new(
            status::INVALID_OBJECT_INSTANCE,
            "Requested SOP Instance is not 1.2.840.10008.1.20.1.1",
        ));
    }
    if cmd.action_type_id != Some(1) {
        return Err(Refused::new(
            status::NO_SUCH_ACTION,
            "Action Type ID must be 1 (Request Storage Commitment)",
        ));
    }
    if !cmd.has_data_set {
        return Err(Refused::new(
            status::MISSING_ATTRIBUTE,
            "N-ACTION without a data set",
        ));
    }
    Ok(())
}

const UNDEFINED: u32 = u32::MAX;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const TRANSACTION_UID: (u16, u16) = (0x0008, 0x1195);
const REFERENCED_SOP_SEQUENCE: (u16, u16) = (0x0008, 0x1199);
const FAILED_SOP_SEQUENCE: (u16, u16) = (0x0008, 0x1198);
const REFERENCED_SOP_CLASS: (u16, u16) = (0x0008, 0x1150);
const REFERENCED_SOP_INSTANCE: (u16, u16) = (0x0008, 0x1155);
const FAILURE_REASON: (u16, u16) = (0x0008, 0x1197);

/// A bounded little-endian reader of one data set.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    explicit: bool,
}

struct Element {
    tag: (u16, u16),
    vr: Option<[u8; 2]>,
    len: u32,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| "the data set ends inside an element".to_owned())?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn header(&mut self) -> Result<Element, String> {
        let tag = (self.u16()?, self.u16()?);
        if tag.0 == 0xFFFE || !self.explicit {
            return Ok(Element {
                tag,
                vr: None,
                len: self.u32()?,
            });
        }
        let vr: [u8; 2] = self.take(2)?.try_into().expect("two bytes");
        let len = if long_length(&vr) {
            self.take(2)?;
            self.u32()?
        } else {
            u32::from(self.u16()?)
        };
        Ok(Element {
            tag,
            vr: Some(vr),
            len,
        })
    }

    fn value(&mut self, e: &Element) -> Result<&'a [u8], String> {
        if e.len == UNDEFINED {
            return Err(format!(
                "({:04X},{:04X}) has an undefined length",
                e.tag.0, e.tag.1
            ));
        }
        self.take(e.len as usize)
    }

    /// Skips the value of `e` (any length, nested sequences included).
    fn skip(&mut self, e: &Element, depth: usize) -> Result<(), String> {
        if e.len != UNDEFINED {
            self.take(e.len as usize)?;
            return Ok(());
        }
        self.items(depth + 1, |r, _| {
            // An item of an undefined-length value: skip its elements.
            r.elements_of_item(depth + 1, |r, e, d| r.skip(&e, d))
        })
    }

    /// Reads the items of an undefined-length sequence up to its delimiter, or of a defined one
    /// (`self.buf` cut to its end by the caller).
    fn items(
        &mut self,
        depth: usize,
        mut each: impl FnMut(&mut Reader<'a>, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("sequences nested too deep".into());
        }
        let mut n = 0usize;
        loop {
            if self.pos == self.buf.len() {
                return Ok(());
            }
            let h = self.header()?;
            match h.tag {
                SEQUENCE_END => return Ok(()),
                ITEM => {
                    n += 1;
                    if h.len == UNDEFINED {
                        each(self, n)?;
                    } else {
                        let body = self.take(h.len as usize)?;
                        let mut inner = Reader {
                            buf: body,
                            pos: 0,
                            explicit: self.explicit,
                        };
                        each(&mut inner, n)?;
                    }
                }
                (g, e) => return Err(format!("({g:04X},{e:04X}) where an item was expected")),
            }
        }
    }

    /// Reads the elements of the current item up to its delimiter or the end of its bytes.
    fn elements_of_item(
        &mut self,
        depth: usize,
        mut each: impl FnMut(&mut Reader<'a>, Element, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        while self.pos < self.buf.len() {
            let h = self.header()?;
            if h.tag == ITEM_END {
                return Ok(());
            }
            each(self, h, depth)?;
        }
        Ok(())
    }

    /// Runs `each` over the items of sequence element `e`.
    fn sequence(
        &mut self,
        e: &Element,
        depth: usize,
        each: impl FnMut(&mut Reader<'a>, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        if let Some(vr) = e.vr
            && &vr != b"SQ"
            && &vr != b"UN"
        {
            return Err(format!(
                "({:04X},{:04X}) is not a sequence",
                e.tag.0, e.tag.1
            ));
        }
        if e.len == UNDEFINED {
            return self.items(depth + 1, each);
        }
        let body = self.take(e.len as usize)?;
        // A sequence written as UN (or implicit) is read as implicit VR items.
        let explicit = self.explicit && e.vr != Some(*b"UN");
        let mut inner = Reader {
            buf: body,
            pos: 0,
            explicit,
        };
        inner.items(depth + 1, each)
    }
}

fn uid_value(v: &[u8]) -> Result<String, String> {
    let s = std::str::from_utf8(v).map_err(|_| "a UID is not ASCII".to_owned())?;
    let s = trim_padding(s).to_owned();
    validate_uid(&s).map_err(|e| format!("UID `{s}`: {e}"))?;
    Ok(s)
}

/// Parses an N-ACTION-RQ data set (Request Storage Commitment) in implicit or explicit VR
/// little endian, within [`MAX_ACTION_BYTES`] and [`MAX_REFERENCES`].
pub fn parse_action(data: &[u8], explicit: bool) -> Result<ActionRequest, Refused> {
    if data.len() > MAX_ACTION_BYTES {
        return Err(Refused::new(
            status::RESOURCE_LIMITATION,
            format!("data set over {MAX_ACTION_BYTES} bytes"),
        ));
    }
    let invalid = |e: String| Refused::new(status::INVALID_ATTRIBUTE_VALUE, e);
    let mut r = Reader {
        buf: data,
        pos: 0,
        explicit,
    };
    let mut transaction = None;
    let mut references: Option<Vec<Reference>> = None;
    let mut too_many = false;
    while r.pos < r.buf.len() {
        let e = r.header().map_err(invalid)?;
        match e.tag {
            TRANSACTION_UID => {
                let v = r.value(&e).map_err(invalid)?;
                transaction = Some(uid_value(v).map_err(invalid)?);
            }
            REFERENCED_SOP_SEQUENCE => {
                let mut refs = Vec::new();
                r.sequence(&e, 0, |item, _| {
                    if refs.len() >= MAX_REFERENCES {
                        too_many = true;
                        return Err("too many".into());
                    }
                    let (mut class, mut instance) = (None, None);
                    item.elements_of_item(1, |item, el, depth| match el.tag {
                        REFERENCED_SOP_CLASS => {
                            class = Some(uid_value(item.value(&el)?)?);
                            Ok(())
                        }
                        REFERENCED_SOP_INSTANCE => {
                            instance = Some(uid_value(item.value(&el)?)?);
                            Ok(())
                        }
                        _ => item.skip(&el, depth),
                    })?;
                    match (class, instance) {
                        (Some(class), Some(instance)) => {
                            refs.push(Reference { class, instance });
                            Ok(())
                        }
                        _ => Err(
                            "a Referenced SOP Sequence item lacks its SOP Class or Instance UID"
                                .into(),
                        ),
                    }
                })
                .map_err(|e| {
                    if too_many {
                        Refused::new(
                            status::RESOURCE_LIMITATION,
                            format!("more than {MAX_REFERENCES} instances in one request"),
                        )
                    } else {
                        invalid(e)
                    }
                })?;
                references = Some(refs);
            }
            _ => r.skip(&e, 0).map_err(invalid)?,
        }
    }
    let transaction_uid = transaction
        .ok_or_else(|| Refused::new(status::MISSING_ATTRIBUTE, "no Transaction UID (0008,1195)"))?;
    let references = references.filter(|r| !r.is_empty()).ok_or_else(|| {
        Refused::new(
            status::MISSING_ATTRIBUTE,
            "no Referenced SOP Sequence (0008,1199) item",
        )
    })?;
    Ok(ActionRequest {
        transaction_uid,
        references,
    })
}

/// Writes one element (little endian; explicit VR when `explicit`).
fn put(out: &mut Vec<u8>, explicit: bool, tag: (u16, u16), vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    if explicit {
        out.extend_from_slice(vr);
        if long_length(vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
    } else {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(value);
}

fn ui(uid: &str) -> Vec<u8> {
    let mut v = uid.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    v
}

fn sequence(out: &mut Vec<u8>, explicit: bool, tag: (u16, u16), items: &[Vec<u8>]) {
    let mut body = Vec::new();
    for item in items {
        body.extend_from_slice(&ITEM.0.to_le_bytes());
        body.extend_from_slice(&ITEM.1.to_le_bytes());
        body.extend_from_slice(&(item.len() as u32).to_le_bytes());
        body.extend_from_slice(item);
    }
    put(out, explicit, tag, b"SQ", &body);
}

/// The N-EVENT-REPORT-RQ data set: Transaction UID, Failed SOP Sequence (with Failure
/// Reasons) and Referenced SOP Sequence, in tag order; and its Event Type ID (1: all
/// committed, 2: failures exist).
pub fn encode_report(
    transaction_uid: &str,
    committed: &[Reference],
    failed: &[(Reference, u16)],
    explicit: bool,
) -> (u16, Vec<u8>) {
    let mut out = Vec::new();
    put(
        &mut out,
        explicit,
        TRANSACTION_UID,
        b"UI",
        &ui(transaction_uid),
    );
    let item = |r: &Reference, reason: Option<u16>| {
        let mut i = Vec::new();
        put(&mut i, explicit, REFERENCED_SOP_CLASS, b"UI", &ui(&r.class));
        put(
            &mut i,
            explicit,
            REFERENCED_SOP_INSTANCE,
            b"UI",
            &ui(&r.instance),
        );
        if let Some(code) = reason {
            put(&mut i, explicit, FAILURE_REASON, b"US", &code.to_le_bytes());
        }
        i
    };
    if !failed.is_empty() {
        let items: Vec<_> = failed.iter().map(|(r, c)| item(r, Some(*c))).collect();
        sequence(&mut out, explicit, FAILED_SOP_SEQUENCE, &items);
    }
    if !committed.is_empty() {
        let items: Vec<_> = committed.iter().map(|r| item(r, None)).collect();
        sequence(&mut out, explicit, REFERENCED_SOP_SEQUENCE, &items);
    }
    (if failed.is_empty() { 1 } else { 2 }, out)
}

/// A resolved request: what the N-EVENT-REPORT says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Transaction UID of the request.
    pub transaction_uid: String,
    /// Instances the record store holds.
    pub committed: Vec<Reference>,
    /// Instances that failed, with their Failure Reason.
    pub failed: Vec<(Reference, u16)>,
}

/// A report handed to the association that asked for it (same-association path): the
/// association sends it and says how the modality answered.
#[derive(Debug)]
pub struct SameAssociationJob {
    /// What to send.
    pub report: Report,
    /// `Ok` once the modality answered N-EVENT-REPORT-RSP with Success.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Sends `report` as N-EVENT-REPORT-RQ (message `message_id`) on presentation context
/// `pc` (transfer syntax `ts`) of any association, in PDVs that fit `max_pdu`.
pub fn report_pdus(report: &Report, pc: u8, ts: &str, message_id: u16, max_pdu: u32) -> Vec<Pdu> {
    let explicit = ts != IMPLICIT_LE;
    let (event, data) = encode_report(
        &report.transaction_uid,
        &report.committed,
        &report.failed,
        explicit,
    );
    let cmd = dimse::event_report_request(
        STORAGE_COMMITMENT_PUSH,
        STORAGE_COMMITMENT_INSTANCE,
        message_id,
        event,
    );
    // A PDV item takes 6 bytes of the PDU's variable field besides its data.
    let chunk = (if max_pdu == 0 {
        16 * 1024
    } else {
        max_pdu as usize
    })
    .max(1024)
        - 6;
    let mut pdus = vec![Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Command,
            is_last: true,
            data: cmd,
        }],
    }];
    let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
    for (i, piece) in pieces.iter().enumerate() {
        pdus.push(Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Data,
                is_last: i + 1 == pieces.len(),
                data: piece.to_vec(),
            }],
        });
    }
    pdus
}

/// A request waiting for its report, as kept in `spool/.commitment/pending/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    /// The file's id.
    id: String,
    /// Transaction UID (0008,1195).
    transaction_uid: String,
    /// The hospital of the peer that asked (whose instances alone can be committed).
    hospital: String,
    /// The peer's calling AE title.
    ae_title: String,
    /// The peer's configured address (the plain door), if it came that way.
    address: Option<IpAddr>,
    /// `dicom` or `dicom-tls`.
    door: String,
    /// When it arrived.
    received_unix_ms: u64,
    /// The instances.
    references: Vec<Reference>,
}

impl Pending {
    /// The peer that asked: its hospital and calling AE title.
    fn peer(&self) -> (&str, &str) {
        (&self.hospital, &self.ae_title)
    }
}

/// One instance an association's transfer holds, from the index.
#[derive(Debug, Clone)]
struct Held {
    hospital: String,
    transfer: TransferId,
    /// Its file name in the transfer (`<SOP Instance UID>.dcm`, the new UID if de-identified).
    stored: String,
}

#[derive(Debug)]
struct Entry {
    req: Pending,
    attempts: u32,
    next_attempt: Option<tokio::time::Instant>,
    attached: Option<mpsc::Sender<SameAssociationJob>>,
    /// Its report is being delivered (by a task of its own).
    sending: bool,
}

#[derive(Debug, Default)]
struct State {
    index: HashMap<String, Vec<Held>>,
    pending: BTreeMap<String, Entry>,
}

/// What the edge knows of a transfer, for resolving instances.
#[derive(Debug, Clone)]
enum Known {
    /// Not decided yet (no notice, not failed).
    Waiting,
    /// Notice `delivered`.
    Delivered,
    /// Notice `partial`: the refused instances by file name and SOP Instance UID, and whether
    /// the list is complete.
    Partial {
        refused: Vec<(String, String, Option<u16>)>,
        complete: bool,
    },
    /// Undeliverable, failed or refused.
    Failed,
}

/// The Storage Commitment service of the edge: the index, the pending requests, the worker.
#[derive(Debug)]
pub struct Commitments {
    root: PathBuf,
    spool: PathBuf,
    store: IngestStore,
    ae_title: String,
    peers: Vec<DicomPeer>,
    max_pending_per_peer: usize,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    message_id: AtomicU16,
    /// `spool.retain`: how often the index is swept of pruned transfers (`None`: never).
    retain: Option<Duration>,
    /// The TLS client configuration of reports on a new association over TLS
    /// ([`report_tls_config`]; `None`: the edge has no DICOM TLS port and no peer asks for
    /// TLS). Replaced by a SIGHUP reload.
    tls: Option<Swap<rustls::ClientConfig>>,
}

/// The rustls client configuration of Storage Commitment reports over TLS: the listener's
/// certificate must chain to `tls.ca` (`ca`) and name the peer's `commitment_host`; the edge
/// presents `identity` (its `tls.cert` and `tls.key`); TLS 1.3 or 1.2, no ALPN (PS3.15 B.1).
pub fn report_tls_config(
    ca: &[rustls_pki_types::CertificateDer<'static>],
    identity: &baylink_net::transport::TlsIdentity,
) -> anyhow::Result<rustls::ClientConfig> {
    let roots = baylink_net::transport::root_store(ca)?;
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(identity.resolver()),
    )
}

/// The directory of the service under the spool.
pub fn root_dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join(".commitment")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The transfers the commitment index holds (`index/<transfer id>`) and each one's file;
/// names that are not a transfer id are skipped.
fn index_entries(index: &Path) -> std::io::Result<Vec<(TransferId, PathBuf)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(index)? {
        let entry = entry?;
        if let Some(transfer) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<TransferId>().ok())
        {
            entries.push((transfer, entry.path()));
        }
    }
    Ok(entries)
}

impl Commitments {
    /// Opens the service: loads the index and the pending requests (those of an earlier run
    /// are answered by [`Commitments::run`]).
    pub fn open(
        spool_dir: &Path,
        store: IngestStore,
        ae_title: String,
        peers: Vec<DicomPeer>,
        max_pending_per_peer: usize,
    ) -> std::io::Result<Commitments> {
        let root = root_dir(spool_dir);
        create_dir_durably(&root.join("index"))?;
        create_dir_durably(&root.join("pending"))?;
        let mut state = State::default();
        for (transfer, path) in index_entries(&root.join("index"))? {
            let text = std::fs::read_to_string(&path)?;
            let mut lines = text.lines();
            let Some(hospital) = lines.next().and_then(|l| l.strip_prefix("hospital\t")) else {
                continue;
            };
            for line in lines {
                // A line cut by a crash was never answered Success: skip it.
                if let Some((uid, stored)) = line.split_once('\t')
                    && stored.ends_with(".dcm")
                {
                    state.index.entry(uid.to_owned()).or_default().push(Held {
                        hospital: hospital.to_owned(),
                        transfer,
                        stored: stored.to_owned(),
                    });
                }
            }
        }
        for entry in std::fs::read_dir(root.join("pending"))? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Pending>(&b).map_err(|e| e.to_string()))
            {
                Ok(req) => {
                    info!(transaction_uid = %req.transaction_uid, calling_ae = %req.ae_title, instances = req.references.len(), "storage commitment request pending from before the start");
                    state.pending.insert(
                        req.id.clone(),
                        Entry {
                            req,
                            attempts: 0,
                            next_attempt: None,
                            attached: None,
                            sending: false,
                        },
                    );
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable storage commitment request left in place");
                }
            }
        }
        metrics::gauge!("baylink_dicom_commitment_pending").set(state.pending.len() as f64);
        Ok(Commitments {
            root,
            spool: spool_dir.to_owned(),
            store,
            ae_title,
            peers,
            max_pending_per_peer,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
            message_id: AtomicU16::new(1),
            retain: None,
            tls: None,
        })
    }

    /// Forgets the instances of transfers whose payload `spool.retain` removed (see
    /// [`Commitments::forget_pruned`]), swept as often as the spool is.
    pub fn with_retention(mut self, retain: Option<Duration>) -> Commitments {
        self.retain = retain;
        self
    }

    /// Reports on a new association may go over TLS, with the configuration `tls` holds
    /// ([`report_tls_config`]).
    pub fn with_tls(mut self, tls: Swap<rustls::ClientConfig>) -> Commitments {
        self.tls = Some(tls);
        self
    }

    /// Removes from the index the transfers whose payload the spool's retention removed
    /// (`pruned`) and whose delivery notice is stored: the edge no longer holds those
    /// instances, and a later request for one of them is answered No such object instance,
    /// as for an instance never received. A transfer still waiting for its notice, or named
    /// by a request not yet answered, stays indexed. Blocking.
    /// Returns how many transfers were forgotten.
    pub fn forget_pruned(&self) -> std::io::Result<usize> {
        let index = self.root.join("index");
        // A transfer a waiting request names stays until that request is answered.
        let asked: HashSet<TransferId> = {
            let st = self.lock();
            st.pending
                .values()
                .flat_map(|e| &e.req.references)
                .filter_map(|r| st.index.get(&r.instance))
                .flatten()
                .map(|h| h.transfer)
                .collect()
        };
        let mut gone = HashSet::new();
        for (transfer, path) in index_entries(&index)? {
            let dir = TransferDir::new(&self.spool, &transfer);
            if !asked.contains(&transfer) && dir.pruned().exists() && dir.has_notice() {
                std::fs::remove_file(&path)?;
                gone.insert(transfer);
            }
        }
        if gone.is_empty() {
            return Ok(0);
        }
        sync_dir(&index)?;
        let mut st = self.lock();
        st.index.retain(|_, held| {
            held.retain(|h| !gone.contains(&h.transfer));
            !held.is_empty()
        });
        drop(st);
        info!(
            transfers = gone.len(),
            "storage commitment index: transfers pruned from the spool forgotten"
        );
        Ok(gone.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records durably (fdatasync) that `transfer` of `hospital` holds the instance the SCU
    /// sent as `original` (`<SOP Instance UID>.dcm`), stored as `stored`. Called before the
    /// instance is answered Success.
    pub async fn record_instance(
        &self,
        hospital: &str,
        transfer: &TransferId,
        original: &str,
        stored: &str,
    ) -> std::io::Result<()> {
        let Some(uid) = original.strip_suffix(".dcm") else {
            return Ok(());
        };
        let path = self.root.join("index").join(transfer.to_string());
        let line = format!("{uid}\t{stored}\n");
        let head = format!("hospital\t{hospital}\n");
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let new = !path.exists();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            if new {
                f.write_all(head.as_bytes())?;
            }
            f.write_all(line.as_bytes())?;
            f.sync_data()?;
            if new {
                sync_dir(path.parent().expect("index dir"))?;
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)??;
        self.lock()
            .index
            .entry(uid.to_owned())
            .or_default()
            .push(Held {
                hospital: hospital.to_owned(),
                transfer: *transfer,
                stored: stored.to_owned(),
            });
        Ok(())
    }

    /// Takes a request of `peer` (through `door`): kept durably before it is answered
    /// Success. `attach`: the association it came on, when the modality took the SCP role
    /// there (the report is tried there first).
    pub async fn request(
        &self,
        peer: &DicomPeer,
        door: &str,
        req: ActionRequest,
        attach: Option<mpsc::Sender<SameAssociationJob>>,
    ) -> Result<(), Refused> {
        let waiting = self
            .lock()
            .pending
            .values()
            .filter(|e| e.req.hospital == peer.hospital && e.req.ae_title == peer.ae_title)
            .count();
        if waiting >= self.max_pending_per_peer {
            metrics::counter!("baylink_dicom_commitment_requests_total", "outcome" => "refused")
                .increment(1);
            return Err(Refused::new(
                status::RESOURCE_LIMITATION,
                "too many storage commitment requests pending for this peer",
            ));
        }
        let id = uuid::Uuid::now_v7().to_string();
        let pending = Pending {
            id: id.clone(),
            transaction_uid: req.transaction_uid,
            hospital: peer.hospital.clone(),
            ae_title: peer.ae_title.clone(),
            address: (door == "dicom").then_some(peer.address),
            door: door.to_owned(),
            received_unix_ms: now_ms(),
            references: req.references,
        };
        let path = self.root.join("pending").join(format!("{id}.json"));
        let bytes = serde_json::to_vec_pretty(&pending)
            .map_err(|e| Refused::new(status::PROCESSING_FAILURE, e.to_string()))?;
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| Refused::new(status::PROCESSING_FAILURE, e.to_string()))?
            .map_err(|e| {
                warn!(error = %e, "cannot keep a storage commitment request");
                Refused::new(status::PROCESSING_FAILURE, "cannot keep the request")
            })?;
        info!(transaction_uid = %pending.transaction_uid, calling_ae = %pending.ae_title, hospital = %pending.hospital, instances = pending.references.len(), same_association = attach.is_some(), "storage commitment request accepted");
        metrics::counter!("baylink_dicom_commitment_requests_total", "outcome" => "accepted")
            .increment(1);
        let mut st = self.lock();
        st.pending.insert(
            id,
            Entry {
                req: pending,
                attempts: 0,
                next_attempt: None,
                attached: attach,
                sending: false,
            },
        );
        metrics::gauge!("baylink_dicom_commitment_pending").set(st.pending.len() as f64);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Answers pending requests as their instances are resolved, for ever: wakes on a
    /// transfer's status change (a delivery notice), a new request, or a retry coming due.
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut changes = self.store.subscribe_changes();
        let mut sweep = self.retain.map(|r| {
            let mut t = tokio::time::interval(crate::retention::interval(Some(r)));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            changes.borrow_and_update();
            let mut next_wake: Option<tokio::time::Instant> = None;
            let now = tokio::time::Instant::now();
            let due: Vec<(String, Pending)> = {
                let st = self.lock();
                // One report at a time per peer (hospital and AE title); peers never wait
                // for one another.
                let busy: HashSet<(&str, &str)> = st
                    .pending
                    .values()
                    .filter(|e| e.sending)
                    .map(|e| e.req.peer())
                    .collect();
                st.pending
                    .iter()
                    .filter(|(_, e)| {
                        if e.sending || busy.contains(&e.req.peer()) {
                            return false;
                        }
                        match e.next_attempt {
                            Some(at) if at > now => {
                                next_wake = Some(next_wake.map_or(at, |w| w.min(at)));
                                false
                            }
                            _ => true,
                        }
                    })
                    .map(|(id, e)| (id.clone(), e.req.clone()))
                    .collect()
            };
            let mut known = HashMap::new();
            // Peers whose report went out in this pass.
            let mut sending: HashSet<(&str, &str)> = HashSet::new();
            for (id, req) in &due {
                if sending.contains(&req.peer()) {
                    continue;
                }
                let Some(report) = self.resolve(req, &mut known).await else {
                    continue;
                };
                let attached = {
                    let mut st = self.lock();
                    let Some(e) = st.pending.get_mut(id) else {
                        continue;
                    };
                    e.sending = true;
                    e.attached.take()
                };
                sending.insert(req.peer());
                tokio::spawn(
                    self.clone()
                        .send_report(id.clone(), req.clone(), report, attached),
                );
            }
            let sleep = async {
                match next_wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let tick = async {
                match sweep.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        // The store is gone (shutdown): nothing more will change.
                        return;
                    }
                }
                () = self.wake.notified() => {}
                () = sleep => {}
                () = tick => {
                    let this = self.clone();
                    match tokio::task::spawn_blocking(move || this.forget_pruned()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => warn!(error = %e, "cannot sweep the storage commitment index"),
                        Err(e) => warn!(error = %e, "storage commitment index sweep failed"),
                    }
                }
            }
        }
    }

    /// Delivers one report (its own task, so that a slow or unreachable modality delays no
    /// other peer's reports), then removes the request or schedules its retry, and wakes the
    /// worker.
    async fn send_report(
        self: std::sync::Arc<Self>,
        id: String,
        req: Pending,
        report: Report,
        attached: Option<mpsc::Sender<SameAssociationJob>>,
    ) {
        let event = if report.failed.is_empty() {
            "success"
        } else {
            "failures"
        };
        match self.deliver(&req, &report, attached).await {
            Ok(via) => {
                let path = self.root.join("pending").join(format!("{id}.json"));
                let removed = tokio::task::spawn_blocking(move || {
                    std::fs::remove_file(&path)?;
                    sync_dir(path.parent().expect("pending dir"))
                })
                .await;
                if !matches!(removed, Ok(Ok(()))) {
                    warn!(transaction_uid = %req.transaction_uid, "cannot remove an answered storage commitment request; it may be answered again after a restart");
                }
                // Said once the request is gone, so that the line means it is answered for good.
                info!(transaction_uid = %req.transaction_uid, calling_ae = %req.ae_title, committed = report.committed.len(), failed = report.failed.len(), via, "storage commitment report sent");
                metrics::counter!("baylink_dicom_commitment_reports_total", "result" => "sent", "event" => event).increment(1);
                let mut st = self.lock();
                st.pending.remove(&id);
                metrics::gauge!("baylink_dicom_commitment_pending").set(st.pending.len() as f64);
            }
            Err(e) => {
                metrics::counter!("baylink_dicom_commitment_reports_total", "result" => "failed", "event" => event).increment(1);
                let mut st = self.lock();
                if let Some(entry) = st.pending.get_mut(&id) {
                    entry.sending = false;
                    entry.attempts = entry.attempts.saturating_add(1);
                    let wait = FIRST_BACKOFF
                        .saturating_mul(1 << entry.attempts.min(16).saturating_sub(1))
                        .min(MAX_BACKOFF);
                    entry.next_attempt = Some(tokio::time::Instant::now() + wait);
                    warn!(transaction_uid = %req.transaction_uid, calling_ae = %req.ae_title, error = %e, retry_in = ?wait, "storage commitment report not delivered; it stays pending");
                }
            }
        }
        self.wake.notify_one();
    }

    /// What the edge knows of `transfer` (cached per pass in `known`).
    async fn known(
        &self,
        hospital: &str,
        transfer: &TransferId,
        known: &mut HashMap<TransferId, Known>,
    ) -> Known {
        if let Some(k) = known.get(transfer) {
            return k.clone();
        }
        let dir = TransferDir::new(&self.spool, transfer);
        let notice = tokio::task::spawn_blocking(move || crate::notice::stored(&dir))
            .await
            .ok()
            .flatten();
        let k = match notice {
            Some(n) => match n.outcome {
                Outcome::Delivered => Known::Delivered,
                Outcome::Undeliverable => Known::Failed,
                Outcome::Partial => Known::Partial {
                    complete: n.refused.len() >= n.refused_total as usize,
                    refused: n
                        .refused
                        .into_iter()
                        .map(|r| (r.file, r.sop_instance_uid, r.failure_reason))
                        .collect(),
                },
            },
            None => match self.store.status(hospital, transfer).await {
                Ok(st) if matches!(st.state, TransferState::Failed | TransferState::Refused) => {
                    Known::Failed
                }
                Ok(_) => Known::Waiting,
                // Not this hospital's (or gone): it proves nothing.
                Err(_) => Known::Failed,
            },
        };
        known.insert(*transfer, k.clone());
        k
    }

    /// The report of `req` if every instance is resolved.
    async fn resolve(
        &self,
        req: &Pending,
        known: &mut HashMap<TransferId, Known>,
    ) -> Option<Report> {
        let mut report = Report {
            transaction_uid: req.transaction_uid.clone(),
            committed: Vec::new(),
            failed: Vec::new(),
        };
        for r in &req.references {
            let held: Vec<Held> = self
                .lock()
                .index
                .get(&r.instance)
                .map(|v| {
                    v.iter()
                        .filter(|h| h.hospital == req.hospital)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if held.is_empty() {
                report
                    .failed
                    .push((r.clone(), status::NO_SUCH_OBJECT_INSTANCE));
                continue;
            }
            // Any copy in the record store commits it; it fails only when every copy failed.
            let (mut stored, mut waiting, mut reason) = (false, false, None);
            for h in held {
                match self.known(&req.hospital, &h.transfer, known).await {
                    Known::Waiting => waiting = true,
                    Known::Delivered => stored = true,
                    Known::Failed => {
                        reason.get_or_insert(status::PROCESSING_FAILURE);
                    }
                    Known::Partial { refused, complete } => {
                        let uid = h.stored.strip_suffix(".dcm").unwrap_or(&h.stored);
                        match refused
                            .iter()
                            .find(|(file, sop, _)| file == &h.stored || sop == uid)
                        {
                            Some((_, _, code)) => {
                                reason.get_or_insert(failure_reason_for_store(*code));
                            }
                            // Not listed in a complete list: the store holds it.
                            None if complete => stored = true,
                            // The list was cut: the notice does not say; never claim it.
                            None => {
                                reason.get_or_insert(status::PROCESSING_FAILURE);
                            }
                        }
                    }
                }
            }
            if stored {
                report.committed.push(r.clone());
            } else if waiting {
                return None;
            } else {
                report
                    .failed
                    .push((r.clone(), reason.unwrap_or(status::PROCESSING_FAILURE)));
            }
        }
        Some(report)
    }

    /// Sends the report on the association of the request if it is attached and still open,
    /// else on a new association to the peer's configured commitment address.
    async fn deliver(
        &self,
        req: &Pending,
        report: &Report,
        attached: Option<mpsc::Sender<SameAssociationJob>>,
    ) -> Result<&'static str, String> {
        if let Some(tx) = attached {
            let (done, answer) = oneshot::channel();
            let job = SameAssociationJob {
                report: report.clone(),
                done,
            };
            if tx.send(job).await.is_ok() {
                match tokio::time::timeout(REPORT_TIMEOUT, answer).await {
                    Ok(Ok(Ok(()))) => return Ok("same association"),
                    Ok(Ok(Err(e))) => {
                        info!(transaction_uid = %req.transaction_uid, error = %e, "report on the same association failed; opening a new one")
                    }
                    _ => {
                        info!(transaction_uid = %req.transaction_uid, "the association ended before the report; opening a new one")
                    }
                }
            }
        }
        let peer = self
            .peers
            .iter()
            .find(|p| {
                p.ae_title == req.ae_title
                    && p.hospital == req.hospital
                    && req.address.is_none_or(|a| a == p.address)
            })
            .ok_or("the peer is no longer in ingest.dicom_peers")?;
        let route = peer.commitment.as_ref().ok_or(
            "no commitment_port in the peer's ingest.dicom_peers entry: the report cannot be sent",
        )?;
        // What came over TLS never leaves in the clear.
        if req.door == "dicom-tls" && !route.tls {
            return Err(
                "the request came through the DICOM TLS port, so its report goes only over TLS: \
                 set commitment_tls = true in the peer's ingest.dicom_peers entry"
                    .into(),
            );
        }
        let tls = match (route.tls, &self.tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(tls.current()),
            (true, None) => {
                return Err(
                    "commitment_tls is set but the edge has no TLS client configuration".into(),
                );
            }
        };
        let message_id = self.message_id.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout(
            REPORT_TIMEOUT * 3,
            send_on_new_association(&self.ae_title, route, tls, report, message_id),
        )
        .await
        .map_err(|_| "timed out".to_owned())??;
        Ok(if route.tls {
            "new association over TLS"
        } else {
            "new association"
        })
    }
}

/// Opens an association to `route` (the edge in the SCP role of Storage Commitment, proposed
/// through SCP/SCU Role Selection), over TLS with `tls`, sends the report, reads the
/// N-EVENT-REPORT-RSP, releases.
async fn send_on_new_association(
    ae_title: &str,
    route: &super::settings::CommitmentRoute,
    tls: Option<Arc<rustls::ClientConfig>>,
    report: &Report,
    message_id: u16,
) -> Result<(), String> {
    let host = if route.host.contains(':') {
        format!("[{}]", route.host)
    } else {
        route.host.clone()
    };
    let address = format!("{}@{host}:{}", route.ae_title, route.port);
    let options = dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title(ae_title.to_owned())
        .called_ae_title(route.ae_title.clone())
        .with_presentation_context(STORAGE_COMMITMENT_PUSH, vec![EXPLICIT_LE, IMPLICIT_LE])
        .with_role_selection(STORAGE_COMMITMENT_PUSH, false, true)
        .connection_timeout(REPORT_TIMEOUT)
        .read_timeout(REPORT_TIMEOUT)
        .write_timeout(REPORT_TIMEOUT);
    // dicom-ul's own words ("could not connect to server") hide the cause, a refused TLS
    // certificate say: the log gets every error of the chain (anyhow's `{:#}`).
    let refused = |e: dicom_ul::association::Error| {
        format!(
            "{:#}",
            anyhow::Error::new(e).context(format!("association with {address}"))
        )
    };
    match tls {
        // Nagle's algorithm off, as on the doors: the report's PDUs must not wait for the
        // SCU's delayed acknowledgement of the one before (about 40 ms each).
        None => {
            let mut assoc = options
                .establish_with_async(&address)
                .await
                .map_err(refused)?;
            let _ = assoc.inner_stream().set_nodelay(true);
            report_on(assoc, &address, report, message_id).await
        }
        Some(config) => {
            let mut assoc = options
                .tls_config(config)
                .server_name(&route.host)
                .establish_with_async_tls(&address)
                .await
                .map_err(refused)?;
            let _ = assoc.inner_stream().get_ref().0.set_nodelay(true);
            report_on(assoc, &address, report, message_id).await
        }
    }
}

/// Sends the report on the association `assoc` opened to `address`, reads the
/// N-EVENT-REPORT-RSP, releases (aborts on any failure).
async fn report_on<S>(
    mut assoc: dicom_ul::association::AsyncClientAssociation<S>,
    address: &str,
    report: &Report,
    message_id: u16,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let Some(pc) = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .cloned()
    else {
        let _ = assoc.abort().await;
        return Err(format!(
            "{address} did not accept the Storage Commitment presentation context"
        ));
    };
    let max = assoc.peer_max_pdu_length();
    for pdu in report_pdus(report, pc.id, &pc.transfer_syntax, message_id, max) {
        assoc
            .send(&pdu)
            .await
            .map_err(|e| format!("sending the report to {address}: {e}"))?;
    }
    let answer = async {
        let mut buf = Vec::new();
        loop {
            match assoc.receive().await.map_err(|e| e.to_string())? {
                Pdu::PData { data } => {
                    for pv in data {
                        if pv.value_type != PDataValueType::Command {
                            return Err("data where a response was expected".to_owned());
                        }
                        if buf.len() + pv.data.len() > dimse::MAX_COMMAND_BYTES {
                            return Err("response command set too long".to_owned());
                        }
                        buf.extend_from_slice(&pv.data);
                        if pv.is_last {
                            return dimse::parse_response(&buf).map_err(|e| e.to_string());
                        }
                    }
                }
                other => return Err(format!("unexpected PDU {other:?}")),
            }
        }
    }
    .await;
    match answer {
        Ok(r) if r.field == dimse::N_EVENT_REPORT_RSP && r.responded_to == message_id => {
            let _ = assoc.release().await;
            if r.status == dimse::status::SUCCESS {
                Ok(())
            } else {
                Err(format!("{address} answered status 0x{:04X}", r.status))
            }
        }
        Ok(r) => {
            let _ = assoc.abort().await;
            Err(format!("{address} answered command 0x{:04X}", r.field))
        }
        Err(e) => {
            let _ = assoc.abort().await;
            Err(format!("{address}: {e}"))
        }
    }
}

/// The SCP/SCU Role Selection the SCP accepts: for Storage Commitment, the roles the
/// requestor proposes (taking the SCP role lets the report come on the same association);
/// for other SOP classes none (default roles).
#[derive(Debug, Clone, Copy, Default)]
pub struct Roles;

impl dicom_ul::association::server::Negotiation for Roles {
    fn negotiate_roles(
        &self,
        sop_class_uid: &str,
        scu_role: bool,
        scp_role: bool,
    ) -> Option<dicom_ul::pdu::RequestorRoles> {
        (sop_class_uid.trim_end_matches('\0') == STORAGE_COMMITMENT_PUSH).then_some(
            dicom_ul::pdu::RequestorRoles {
                scu: scu_role,
                scp: scp_role,
            },
        )
    }
}

/// An N-ACTION whose data set is arriving.
#[derive(Debug)]
struct Collecting {
    cmd: dimse::Command,
    context_id: u8,
    explicit: bool,
    data: Vec<u8>,
    /// Why it is refused already (its data set is read and dropped).
    refused: Option<Refused>,
}

/// Storage Commitment on one association: the N-ACTION being received, the reports sent on
/// it and their answers.
#[derive(Debug)]
pub struct OnAssociation {
    service: std::sync::Arc<Commitments>,
    peer: DicomPeer,
    door: &'static str,
    /// The Storage Commitment presentation context and its transfer syntax.
    context: Option<(u8, String)>,
    /// Set when the modality took the SCP role: reports for requests of this association
    /// come here.
    reports: Option<(
        mpsc::Sender<SameAssociationJob>,
        mpsc::Receiver<SameAssociationJob>,
    )>,
    collecting: Option<Collecting>,
    awaiting: HashMap<u16, oneshot::Sender<Result<(), String>>>,
    next_message: u16,
}

/// An answer for the association to send: the response to `cmd` on presentation context
/// `context_id`, with `status` and the Error Comment.
#[derive(Debug)]
pub struct Answer {
    /// Presentation context.
    pub context_id: u8,
    /// The request answered.
    pub cmd: dimse::Command,
    /// Status.
    pub status: u16,
    /// Error Comment.
    pub comment: Option<String>,
}

impl OnAssociation {
    /// Storage Commitment state for an association of `peer` through `door`; `scp_role`:
    /// the requestor took the SCP role for Storage Commitment.
    pub fn new(
        service: std::sync::Arc<Commitments>,
        peer: DicomPeer,
        door: &'static str,
        contexts: &[dicom_ul::pdu::PresentationContextNegotiated],
        scp_role: bool,
    ) -> OnAssociation {
        let context = contexts
            .iter()
            .find(|pc| {
                pc.reason == PresentationContextResultReason::Acceptance
                    && pc.abstract_syntax.trim_end_matches('\0') == STORAGE_COMMITMENT_PUSH
            })
            .map(|pc| (pc.id, pc.transfer_syntax.trim_end_matches('\0').to_owned()));
        OnAssociation {
            service,
            peer,
            door,
            reports: (scp_role && context.is_some()).then(|| mpsc::channel(4)),
            context,
            collecting: None,
            awaiting: HashMap::new(),
            next_message: 1,
        }
    }

    /// Whether an N-ACTION data set is arriving.
    pub fn collecting(&self) -> bool {
        self.collecting.is_some()
    }

    /// An N-ACTION-RQ on presentation context `context_id`: `Some` is an answer to send at
    /// once (a refusal of a request without a data set); otherwise its data set follows.
    pub fn begin(&mut self, cmd: dimse::Command, context_id: u8) -> Option<Answer> {
        let mut refused = check_command(&cmd).err();
        let explicit = match &self.context {
            Some((id, ts)) if *id == context_id => match ts.as_str() {
                IMPLICIT_LE => false,
                EXPLICIT_LE => true,
                _ => {
                    refused.get_or_insert(Refused::new(
                        status::PROCESSING_FAILURE,
                        "Storage Commitment needs implicit or explicit VR little endian",
                    ));
                    false
                }
            },
            _ => {
                refused.get_or_insert(Refused::new(
                    status::INVALID_ATTRIBUTE_VALUE,
                    "N-ACTION outside the Storage Commitment presentation context",
                ));
                false
            }
        };
        if !cmd.has_data_set {
            let r =
                refused.unwrap_or_else(|| Refused::new(status::MISSING_ATTRIBUTE, "no data set"));
            return Some(Answer {
                context_id,
                cmd,
                status: r.status,
                comment: Some(r.why),
            });
        }
        self.collecting = Some(Collecting {
            cmd,
            context_id,
            explicit,
            data: Vec::new(),
            refused,
        });
        None
    }

    /// A data PDV while an N-ACTION data set arrives: `Some` once it is complete (the
    /// request is then kept durably, or refused). `Err`: a protocol error.
    pub async fn data(&mut self, pv: PDataValue) -> Result<Option<Answer>, String> {
        let Some(c) = self.collecting.as_mut() else {
            return Err("data without a command".into());
        };
        if pv.presentation_context_id != c.context_id {
            return Err("data on another presentation context than its command".into());
        }
        if c.refused.is_none() {
            if c.data.len() + pv.data.len() > MAX_ACTION_BYTES {
                c.refused = Some(Refused::new(
                    status::RESOURCE_LIMITATION,
                    format!("N-ACTION data set over {MAX_ACTION_BYTES} bytes"),
                ));
                c.data = Vec::new();
            } else {
                c.data.extend_from_slice(&pv.data);
            }
        }
        if !pv.is_last {
            return Ok(None);
        }
        let c = self.collecting.take().expect("checked above");
        let outcome = match c.refused {
            Some(r) => Err(r),
            None => match parse_action(&c.data, c.explicit) {
                Ok(req) => {
                    let attach = self.reports.as_ref().map(|(tx, _)| tx.clone());
                    self.service
                        .request(&self.peer, self.door, req, attach)
                        .await
                }
                Err(r) => Err(r),
            },
        };
        let (status, comment) = match outcome {
            Ok(()) => (dimse::status::SUCCESS, None),
            Err(r) => {
                warn!(status = format!("0x{:04X}", r.status), reason = %r.why, "storage commitment request refused");
                (r.status, Some(r.why))
            }
        };
        Ok(Some(Answer {
            context_id: c.context_id,
            cmd: c.cmd,
            status,
            comment,
        }))
    }

    /// A command set that may be the modality's answer to a report sent here; `true` if it
    /// was (and is consumed).
    pub fn response(&mut self, bytes: &[u8]) -> bool {
        let Ok(r) = dimse::parse_response(bytes) else {
            return false;
        };
        if r.field != dimse::N_EVENT_REPORT_RSP {
            return false;
        }
        if let Some(done) = self.awaiting.remove(&r.responded_to) {
            let _ = done.send(if r.status == dimse::status::SUCCESS {
                Ok(())
            } else {
                Err(format!("the modality answered status 0x{:04X}", r.status))
            });
        }
        true
    }

    /// The next report to send on this association (never, if the modality did not take the
    /// SCP role).
    pub async fn next_job(this: Option<&mut OnAssociation>) -> SameAssociationJob {
        match this.and_then(|c| c.reports.as_mut()) {
            Some((_, rx)) => match rx.recv().await {
                Some(job) => job,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// The PDUs of `job`'s N-EVENT-REPORT-RQ; its answer will complete the job.
    pub fn pdus(&mut self, job: SameAssociationJob, max_pdu: u32) -> Vec<Pdu> {
        let Some((pc, ts)) = self.context.clone() else {
            let _ = job.done.send(Err("no Storage Commitment context".into()));
            return Vec::new();
        };
        let id = self.next_message;
        self.next_message = self.next_message.wrapping_add(1).max(1);
        self.awaiting.insert(id, job.done);
        report_pdus(&job.report, pc, &ts, id, max_pdu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(explicit: bool, n: usize) -> Vec<u8> {
        let refs: Vec<Reference> = (0..n)
            .map(|i| Reference {
                class: "1.2.840.10008.5.1.4.1.1.2".into(),
                instance: format!("1.2.3.{i}"),
            })
            .collect();
        // A report's layout with no failures is a request's: Transaction UID, then the
        // Referenced SOP Sequence.
        encode_report("1.2.826.0.1.99", &refs, &[], explicit).1
    }

    #[test]
    fn a_store_refusal_is_reported_with_a_storage_commitment_reason() {
        assert_eq!(failure_reason_for_store(None), 0x0110);
        // Data set does not match SOP class, cannot understand, transfer syntax not taken.
        for code in [0xA900, 0xC000, 0xC122, 0x0110, 0x0112] {
            assert_eq!(failure_reason_for_store(Some(code)), 0x0110, "{code:#06x}");
        }
        assert_eq!(failure_reason_for_store(Some(0xA700)), 0x0213);
        assert_eq!(failure_reason_for_store(Some(0xA7FF)), 0x0213);
        assert_eq!(failure_reason_for_store(Some(0x0122)), 0x0122);
        assert_eq!(failure_reason_for_store(Some(0x0119)), 0x0119);
    }

    #[test]
    fn requests_parse_in_both_encodings() {
        for explicit in [false, true] {
            let r = parse_action(&request(explicit, 3), explicit).unwrap();
            assert_eq!(r.transaction_uid, "1.2.826.0.1.99");
            assert_eq!(r.references.len(), 3);
            assert_eq!(r.references[2].instance, "1.2.3.2");
        }
    }

    #[test]
    fn undefined_lengths_are_followed() {
        // Implicit VR: Transaction UID, then an undefined-length sequence of one
        // undefined-length item.
        let mut d = Vec::new();
        put(&mut d, false, TRANSACTION_UID, b"UI", &ui("1.2.3"));
        d.extend_from_slice(&[0x08, 0x00, 0x99, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        put(
            &mut d,
            false,
            REFERENCED_SOP_CLASS,
            b"UI",
            &ui("1.2.840.10008.5.1.4.1.1.7"),
        );
        put(
            &mut d,
            false,
            REFERENCED_SOP_INSTANCE,
            b"UI",
            &ui("1.2.3.4"),
        );
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let r = parse_action(&d, false).unwrap();
        assert_eq!(r.references[0].instance, "1.2.3.4");
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused_with_a_status() {
        let good = request(false, 2);
        for cut in [1, 9, good.len() - 3] {
            assert!(parse_action(&good[..cut], false).is_err(), "cut at {cut}");
        }
        let mut no_refs = Vec::new();
        put(&mut no_refs, false, TRANSACTION_UID, b"UI", &ui("1.2.3"));
        assert_eq!(
            parse_action(&no_refs, false).unwrap_err().status,
            status::MISSING_ATTRIBUTE
        );
        let many = request(false, MAX_REFERENCES + 1);
        assert_eq!(
            parse_action(&many, false).unwrap_err().status,
            status::RESOURCE_LIMITATION
        );
    }

    #[test]
    fn report_carries_failure_reasons_and_event_type() {
        let ok = Reference {
            class: "1.2.840.10008.5.1.4.1.1.2".into(),
            instance: "1.2.3.1".into(),
        };
        let (event, data) = encode_report(
            "1.2.9",
            std::slice::from_ref(&ok),
            &[(ok.clone(), status::NO_SUCH_OBJECT_INSTANCE)],
            true,
        );
        assert_eq!(event, 2);
        assert!(data.windows(2).any(|w| w == b"SQ"));
        assert!(data.windows(2).any(|w| w == [0x12, 0x01]));
        assert_eq!(encode_report("1.2.9", &[ok], &[], true).0, 1);
    }

    proptest::proptest! {
        /// Any bytes: a request or a refusal, never a panic.
        #[test]
        fn arbitrary_data_sets_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), explicit in proptest::bool::ANY) {
            let _ = parse_action(&bytes, explicit);
        }
    }
}
