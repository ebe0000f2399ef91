//! Transfers opened by hospitals: declare, upload files (cut-through into the spool), commit.
//!
//! Layout added to a transfer's spool directory (see [`crate::transfer_dir`]):
//!
//! ```text
//! spool/<id>/owner                the hospital (client certificate CN) that declared it
//! spool/<id>/status.json          what GET /v1/transfers/{id} answers (stages with times)
//! spool/<id>/parts/<n>            an upload in progress (a number: any file name fits)
//! spool/<id>/files/<name>.digests size and chunk digests of a finished file (JSON)
//! spool/<id>/expired              closed by `ingest.open_timeout` without a commit (why)
//! spool/<id>/association          a C-STORE association's transfer (the association id)
//! ```
//!
//! A finished upload and its digest record are fsynced (side by side), then renamed into
//! place (`data/<key>`, `files/<key>.digests`) and the three directories involved (`parts/`,
//! `data/`, `files/`) fsynced: a file counts only when its record and its payload are both
//! there, and recovery fsyncs `data/` and `files/` before it trusts what it finds. `commit` builds the manifest from the records alone, so the payload is read
//! exactly once, as it arrives.
//!
//! A C-STORE association's transfer is sealed and sent whatever ends the association (the
//! C-STORE guarantee, `docs/dicom.md`): every instance answered Success has its record, and
//! the `association` marker tells start-up to seal such a transfer left open by a crash
//! instead of reopening it. Open transfers without the marker (HTTPS uploads) reopen.
//!
//! This file owns [`IngestStore`] itself (its shared state, the open-transfer table, start-up
//! recovery in [`IngestStore::open`]), its error type and the small helpers and spool paths
//! the other files share. It holds no step of a transfer's life; those are:
//!
//! - `lifecycle`: declare, commit (check, seal), abandon, expire; recovery of open transfers;
//! - `upload`: [`FileUpload`] (one file streamed into the spool) and the DICOM gate glue;
//! - `status`: `status.json` and what the hospital reads (status, receipt, proof);
//! - `send`: the background sender of sealed transfers, its slots shared between hospitals
//!   as `sched` decides;
//! - `stream`: open transfers' files streamed to the gateway as they are stored, before the
//!   commit;
//! - `quota`: `[quota]` and `spool.reserve_bytes`, counted from the open transfers.

mod lifecycle;
mod quota;
mod sched;
mod send;
mod status;
mod stream;
mod upload;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use baylink_net::proto::{MAX_FILE_NAME_LEN, TransferId, validate_file_name};
use baylink_net::spool::SpoolError;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::audit::Event;
use crate::dicom::deid::{DeidKey, ProfileOptions};
use crate::edge::Edge;
use crate::policy::{Declaration, Refusal};
use crate::transfer_dir::{self, TransferDir};

pub use status::{
    AssociationEnd, Downloads, ReceiptDownload, ReceiptInfo, Stage, TransferState, TransferStatus,
};
pub use upload::FileUpload;

pub use lifecycle::AssociationOutcome;

use lifecycle::{recover_open, remove_uploads};

/// Why an ingest operation failed. Each variant maps to one HTTP status in [`super::http`].
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The compliance checkpoint refused the declaration.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// No such transfer for this hospital (unknown, or another hospital's).
    #[error("no such transfer")]
    NotFound,
    /// The request conflicts with the transfer's state (committed, upload in progress).
    #[error("{0}")]
    Conflict(String),
    /// A file name that cannot be used.
    #[error("bad file name: {0}")]
    BadName(String),
    /// Something else the client sent is unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The transfer would exceed `ingest.max_upload_bytes`.
    #[error("the transfer would exceed the upload limit of {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The spool's file system is full; the partial file was removed.
    #[error("the spool is out of space")]
    NoSpace,
    /// The hospital's quota (`[quota]`) does not allow it; `key` names the quota.
    #[error("{message} ({key})")]
    Quota {
        /// The config key of the quota, e.g. `quota.max_open_transfers`.
        key: &'static str,
        /// What was refused.
        message: String,
    },
    /// The upload would eat into the spool's reserve (`spool.reserve_bytes`), kept for
    /// audit appends and sealing.
    #[error(
        "the spool has {available} bytes free, {reserve} of them reserved (spool.reserve_bytes)"
    )]
    Reserve {
        /// Free bytes on the spool's file system.
        available: u64,
        /// `spool.reserve_bytes`.
        reserve: u64,
    },
    /// An internal failure (spool, HSM); the message is for the operator's log too.
    #[error("{0}")]
    Internal(String),
}

impl From<SpoolError> for IngestError {
    fn from(e: SpoolError) -> Self {
        if e.is_no_space() {
            IngestError::NoSpace
        } else {
            IngestError::Internal(e.to_string())
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FileRecord {
    /// The hospital's name of the file (`data/` holds it under its key). Records written
    /// before payload was stored under keys have none: their `data/` entry has the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    size: u64,
    chunk_size: u32,
    digests: Vec<String>,
}

/// The hospital API's view of the edge spool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct IngestStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    edge: Edge,
    spool_dir: PathBuf,
    chunk_size: u32,
    max_upload_bytes: u64,
    open: Mutex<HashMap<TransferId, Arc<OpenTransfer>>>,
    status_lock: tokio::sync::Mutex<()>,
    /// Bumped after every state change of any transfer (status requests with `?wait=`
    /// wait on it, then read their own transfer's status).
    changes: tokio::sync::watch::Sender<u64>,
    next_part: AtomicU64,
    /// The background sends: at most `transport.max_transfers` at once, shared between
    /// hospitals.
    sending: send::SendQueue,
    /// Key of the de-identification (derived from the audit patient key).
    deid_key: DeidKey,
    /// `policy.deidentify_purposes`.
    deidentify_purposes: HashSet<String>,
    /// `policy.deidentify_options`.
    deidentify_options: std::collections::BTreeMap<String, ProfileOptions>,
    /// `[quota]`.
    quota: crate::config::QuotaSection,
    /// `spool.reserve_bytes`.
    reserve_bytes: u64,
    /// Declarations in progress per hospital: they count against `quota.max_open_transfers`
    /// until their transfer is in `open`.
    declaring: Mutex<HashMap<String, usize>>,
    /// Open transfers streaming their stored files to the gateway.
    streams: stream::Streams,
}

/// A transfer that accepts files (declared, not yet committed).
#[derive(Debug)]
struct OpenTransfer {
    hospital: String,
    /// What was declared: the patient every DICOM file must carry, the purpose.
    declaration: Declaration,
    /// Bytes of finished files plus bytes received by uploads in progress.
    bytes: AtomicU64,
    state: Mutex<OpenState>,
    /// When it was declared (or recovered), or an upload of it last began or ended.
    touched: Mutex<Instant>,
    /// The C-STORE association that opened it (its `association` marker), if any: such a
    /// transfer never expires, and is sealed whatever ends the association.
    association: Option<String>,
    /// How that association ended, once it did (for the `sealed` audit record).
    ended: Mutex<Option<AssociationEnd>>,
}

impl OpenTransfer {
    fn touch(&self) {
        *lock(&self.touched) = Instant::now();
    }
}

#[derive(Debug, Default)]
struct OpenState {
    committed: bool,
    uploading: HashSet<String>,
    files: BTreeMap<String, u64>,
    /// The names of `files` in the order they were stored: the manifest's order (the order
    /// they stream to the gateway in). Recovered transfers list them by name.
    order: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
    move |e| IngestError::Internal(format!("{what}: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IngestError> + Send + 'static,
) -> Result<T, IngestError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| IngestError::Internal(format!("blocking task: {e}")))?
}

fn owner_path(dir: &TransferDir) -> PathBuf {
    dir.root().join("owner")
}
fn status_path(dir: &TransferDir) -> PathBuf {
    dir.root().join("status.json")
}
fn association_path(dir: &TransferDir) -> PathBuf {
    dir.root().join("association")
}
fn files_dir(dir: &TransferDir) -> PathBuf {
    dir.root().join("files")
}
fn record_path(dir: &TransferDir, name: &str) -> PathBuf {
    // `<name>.digests` can exceed NAME_MAX for a 255-byte name: the record is named by the
    // same key as the payload in `data/`, and holds the name.
    files_dir(dir).join(format!(
        "{}.digests",
        crate::transfer_dir::payload_key(name)
    ))
}

/// Checks an upload's file name: the protocol's rules (no `/`, `..`, NUL, control or
/// invisible characters, no leading dot) and at most 255 bytes.
pub fn check_file_name(name: &str) -> Result<(), IngestError> {
    if name.len() > MAX_FILE_NAME_LEN {
        return Err(IngestError::BadName(format!(
            "{} bytes long, at most {MAX_FILE_NAME_LEN} allowed",
            name.len()
        )));
    }
    validate_file_name(name).map_err(|e| IngestError::BadName(e.to_string()))
}

/// Whether this spool directory holds a transfer opened through the hospital API.
pub fn is_ingest_transfer(dir: &TransferDir) -> bool {
    dir.is_ingest_transfer()
}

impl IngestStore {
    /// A store over the edge's spool. Recovers open transfers: declared but uncommitted ones
    /// stay open (their unfinished uploads are discarded); sealed ones are left to
    /// [`IngestStore::resume`]. Those of C-STORE associations are reopened too, for
    /// [`IngestStore::seal_interrupted_associations`] to seal.
    pub fn open(edge: Edge) -> Result<IngestStore, IngestError> {
        let cfg = edge.config().clone();
        // A PRF output of the audit patient key under a label no patient id can take
        // (patient ids have no control characters): a secret of its own for de-identification.
        let deid_secret = edge.audit().patient_ref(crate::dicom::deid::KEY_LABEL);
        let store = IngestStore {
            inner: Arc::new(Inner {
                spool_dir: cfg.spool_dir.clone(),
                chunk_size: cfg.transport.chunk_size,
                max_upload_bytes: cfg.ingest.max_upload_bytes,
                edge,
                open: Mutex::new(HashMap::new()),
                status_lock: tokio::sync::Mutex::new(()),
                changes: tokio::sync::watch::Sender::new(0),
                next_part: AtomicU64::new(0),
                sending: send::SendQueue::new(cfg.transport.max_transfers),
                deid_key: DeidKey::from_secret(deid_secret.as_bytes()),
                deidentify_purposes: cfg.policy.deidentify_purposes.iter().cloned().collect(),
                deidentify_options: cfg.policy.deidentify_options.clone(),
                quota: cfg.quota.clone(),
                reserve_bytes: cfg.spool_reserve_bytes,
                declaring: Mutex::new(HashMap::new()),
                streams: stream::Streams::default(),
            }),
        };
        crate::transfer_dir::create_dir_durably(&store.inner.spool_dir)
            .map_err(internal("spool.dir"))?;
        let ids = transfer_dir::list(&store.inner.spool_dir, |d| {
            is_ingest_transfer(d) && !d.manifest_bin().exists()
        });
        let (expired, ids): (Vec<_>, Vec<_>) = ids
            .into_iter()
            .partition(|id| store.dir(id).expired().exists());
        for id in expired {
            // Closed by `ingest.open_timeout`; a crash may have cut the removal short.
            if let Err(e) = remove_uploads(&store.dir(&id)) {
                warn!(transfer = %id, error = %e, "cannot remove the files of an expired transfer");
            }
        }
        for id in ids {
            let dir = TransferDir::new(&store.inner.spool_dir, &id);
            match recover_open(&dir) {
                Ok(t) => {
                    lock(&store.inner.open).insert(id, Arc::new(t));
                }
                Err(e) => warn!(transfer = %id, error = %e, "open transfer not recovered"),
            }
        }
        Ok(store)
    }

    fn dir(&self, id: &TransferId) -> TransferDir {
        TransferDir::new(&self.inner.spool_dir, id)
    }

    /// The open transfer `id` of `hospital`; a committed one is a conflict, an unknown or
    /// foreign one not found.
    fn open_transfer(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<Arc<OpenTransfer>, IngestError> {
        if let Some(t) = lock(&self.inner.open).get(id).cloned() {
            if t.hospital != hospital {
                return Err(IngestError::NotFound);
            }
            return Ok(t);
        }
        if self.owner(id).as_deref() == Some(hospital) {
            if let Ok(why) = std::fs::read_to_string(self.dir(id).expired()) {
                return Err(IngestError::Conflict(format!(
                    "{why}; declare a new transfer"
                )));
            }
            return Err(IngestError::Conflict(
                "the transfer is committed; open a new one".into(),
            ));
        }
        Err(IngestError::NotFound)
    }

    fn owner(&self, id: &TransferId) -> Option<String> {
        std::fs::read_to_string(owner_path(&self.dir(id))).ok()
    }

    /// Appends to the edge's audit log; a failure fails the step it records (fail closed).
    async fn audit(&self, event: Event) -> Result<(), IngestError> {
        self.inner
            .edge
            .audit()
            .append(event)
            .await
            .map(drop)
            .map_err(|e| IngestError::Internal(format!("audit log: {e}")))
    }

    /// A receiver that wakes whenever a transfer's status changes (a stage recorded, a
    /// delivery notice stored): for waiters that must not poll.
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The configured limit on one transfer's payload.
    pub fn max_upload_bytes(&self) -> u64 {
        self.inner.max_upload_bytes
    }
}

#[cfg(test)]
mod tests;
