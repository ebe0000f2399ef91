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
//! ```
//!
//! A finished upload is fsynced, renamed to `data/<name>` (directory fsynced), and only then
//! is its digest record written atomically: a file without a record is not part of the
//! transfer. `commit` builds the manifest from the records alone, so the payload is read
//! exactly once, as it arrives.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use baylink_net::proto::{
    ChunkHasher, Digest, MAX_FILE_NAME_LEN, ManifestBuilder, TransferId, validate_file_name,
};
use baylink_net::spool::{Spool, SpoolBuf, SpoolError, SpoolFile};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::audit::{Event, Kind};
use crate::dicom::deid::{DeidError, DeidKey, DicomGate, GateRules};
use crate::edge::{Edge, SendFailure, SendRequest};
use crate::policy::{Decision, Declaration, Refusal};
use crate::seal;
use crate::transfer_dir::{self, TransferDir, write_atomic};

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

/// Where a transfer is (the contract's `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferState {
    /// Declared, accepted by the checkpoint, no file yet.
    Declared,
    /// At least one file upload has begun.
    Receiving,
    /// Committed by the hospital: manifest signed, payload durable in the spool.
    Sealed,
    /// Being sent to the gateway.
    Sending,
    /// The gateway's receipt arrived and verified.
    Committed,
    /// Delivered downstream (reported by the gateway).
    Delivered,
    /// Refused (by policy at send time, or by the gateway).
    Refused,
    /// Gave up (link down longer than `transport.retry_for`, or an internal failure).
    Failed,
}

impl TransferState {
    /// No further state follows (a `committed` transfer may still become `delivered`, but its
    /// receipt is final).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TransferState::Committed
                | TransferState::Delivered
                | TransferState::Refused
                | TransferState::Failed
        )
    }
}

/// One stage a transfer reached, with its time (RFC 3339, UTC).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    /// The state entered.
    pub stage: TransferState,
    /// When.
    pub at: String,
}

/// The gateway's receipt, as the hospital may keep it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceiptInfo {
    /// Merkle root over every chunk digest, hex.
    pub merkle_root: String,
    /// The receipt bytes the gateway's HSM signed, base64.
    pub receipt: String,
    /// The gateway's signature over them, base64.
    pub signature: String,
}

/// What `GET /v1/transfers/{id}` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferStatus {
    /// Transfer id.
    pub id: String,
    /// Current state.
    pub state: TransferState,
    /// Finished files.
    pub files: usize,
    /// Payload bytes of finished files.
    pub bytes: u64,
    /// Every stage reached, oldest first.
    pub stages: Vec<Stage>,
    /// The verified receipt, once committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<ReceiptInfo>,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the receipt and the audit proof can be downloaded, once there is a receipt
    /// (computed when the status is read, never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloads: Option<Downloads>,
}

/// Links to a transfer's downloadable evidence (`GET /v1/transfers/{id}` `downloads`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Downloads {
    /// `/v1/transfers/{id}/receipt`: the gateway's signed receipt.
    pub receipt: String,
    /// `/v1/transfers/{id}/proof`: the audit inclusion proof.
    pub proof: String,
}

/// The gateway's signed receipt as the edge stores it, with what is needed to verify it
/// (`GET /v1/transfers/{id}/receipt`, `application/json`).
#[derive(Debug, Clone, Serialize)]
pub struct ReceiptDownload {
    /// Always `baylink-receipt/1`.
    pub format: &'static str,
    /// Transfer id.
    pub transfer: String,
    /// The receipt bytes (`receipt.bin`), base64.
    pub receipt: String,
    /// The gateway's HSM signature (`receipt.sig`), base64: ECDSA P-256 / SHA-256 as the
    /// PKCS#11 token gives it (r ‖ s, 64 bytes, IEEE P1363), over `signed_prefix` followed
    /// by the receipt bytes.
    pub signature: String,
    /// The domain-separation prefix signed before the receipt bytes.
    pub signed_prefix: String,
    /// The sealed manifest (`manifest.bin`) the receipt confirms, base64.
    pub manifest: String,
    /// The manifest's Merkle root, hex (also inside the receipt).
    pub merkle_root: String,
    /// The process id: the consent reference the transfer was allowed under (also inside
    /// the manifest and the receipt).
    pub process_id: String,
    /// The gateway's public key the edge pinned (`peer.signing_key`), PEM, if readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_public_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileRecord {
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
    /// One background send at a time, in commit order: concurrent sends would each hold
    /// spool buffers while waiting for more (and share one link anyway).
    sending: Arc<tokio::sync::Semaphore>,
    /// Key of the de-identification (derived from the audit patient key).
    deid_key: DeidKey,
    /// `policy.deidentify_purposes`.
    deidentify_purposes: HashSet<String>,
    /// `[quota]`.
    quota: crate::config::QuotaSection,
    /// `spool.reserve_bytes`.
    reserve_bytes: u64,
    /// Declarations in progress per hospital: they count against `quota.max_open_transfers`
    /// until their transfer is in `open`.
    declaring: Mutex<HashMap<String, usize>>,
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
fn files_dir(dir: &TransferDir) -> PathBuf {
    dir.root().join("files")
}
fn record_path(dir: &TransferDir, name: &str) -> PathBuf {
    // `<name>.digests` can exceed NAME_MAX for a 255-byte name: hex-encode the digest of
    // the name instead, and keep the name inside the record's directory listing order.
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes());
    files_dir(dir).join(format!("{}.digests", hex::encode(d.as_ref())))
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
    owner_path(dir).exists()
}

impl IngestStore {
    /// A store over the edge's spool. Recovers open transfers: declared but uncommitted ones
    /// stay open (their unfinished uploads are discarded); sealed ones are left to
    /// [`IngestStore::resume`].
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
                sending: Arc::new(tokio::sync::Semaphore::new(1)),
                deid_key: DeidKey::from_secret(deid_secret.as_bytes()),
                deidentify_purposes: cfg.policy.deidentify_purposes.iter().cloned().collect(),
                quota: cfg.quota.clone(),
                reserve_bytes: cfg.spool_reserve_bytes,
                declaring: Mutex::new(HashMap::new()),
            }),
        };
        std::fs::create_dir_all(&store.inner.spool_dir).map_err(internal("spool.dir"))?;
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

    /// Runs the compliance checkpoint and creates the transfer, durably, owned by
    /// `hospital`.
    pub async fn declare(
        &self,
        hospital: &str,
        decl: Declaration,
    ) -> Result<TransferId, IngestError> {
        let _slot = self.take_open_slot(hospital)?;
        let id = TransferId::new_v7();
        let policy = self.inner.edge.policy();
        let decision = match policy.check_hospital(hospital) {
            Err(r) => Decision::Refuse(r),
            Ok(()) => policy.check(&decl, SystemTime::now()),
        };
        let consent_ref = match decision {
            Decision::Refuse(r) => {
                metrics::counter!("baylink_transfers_total", "stage" => "declared", "outcome" => "refused").increment(1);
                info!(hospital, rule = r.rule, reason = %r.reason, "declaration refused");
                // audit: the refusal is recorded before it is answered.
                self.audit(Event {
                    rule: Some(r.rule.to_owned()),
                    hospital: Some(hospital.to_owned()),
                    ..Event::declared(Kind::Refused, Some(id.to_string()), &decl)
                })
                .await?;
                return Err(IngestError::Refused(r));
            }
            Decision::Allow { consent_ref } => consent_ref,
        };
        // Stored as allowed: naming the consent, which becomes the manifest's process id.
        let decl = Declaration {
            consent_ref: Some(consent_ref),
            ..decl
        };
        let dir = self.dir(&id);
        let status = TransferStatus {
            id: id.to_string(),
            state: TransferState::Declared,
            files: 0,
            bytes: 0,
            stages: vec![Stage {
                stage: TransferState::Declared,
                at: now_rfc3339(),
            }],
            receipt: None,
            error: None,
            downloads: None,
        };
        // audit: `declared` is durable before the id is given to the hospital.
        self.audit(Event {
            hospital: Some(hospital.to_owned()),
            ..Event::declared(Kind::Declared, Some(id.to_string()), &decl)
        })
        .await?;
        let owner = hospital.to_owned();
        let d2 = dir.clone();
        let declaration = decl.clone();
        blocking(move || {
            d2.create()
                .map_err(internal("cannot create the transfer"))?;
            std::fs::create_dir_all(d2.parts_dir()).map_err(internal("parts/"))?;
            std::fs::create_dir_all(files_dir(&d2)).map_err(internal("files/"))?;
            let json = serde_json::to_vec_pretty(&decl)
                .map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&d2.declaration(), &json).map_err(internal("declaration.json"))?;
            let st = serde_json::to_vec_pretty(&status)
                .map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&status_path(&d2), &st).map_err(internal("status.json"))?;
            // owner last: it marks the transfer as declared through the hospital API.
            write_atomic(&owner_path(&d2), owner.as_bytes()).map_err(internal("owner"))
        })
        .await?;
        lock(&self.inner.open).insert(
            id,
            Arc::new(OpenTransfer {
                hospital: hospital.to_owned(),
                declaration,
                bytes: AtomicU64::new(0),
                state: Mutex::new(OpenState::default()),
                touched: Mutex::new(Instant::now()),
            }),
        );
        metrics::counter!("baylink_transfers_total", "stage" => "declared", "outcome" => "ok")
            .increment(1);
        info!(transfer = %id, hospital, "transfer declared");
        Ok(id)
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

    /// Starts the upload of file `name` into transfer `id`.
    pub async fn begin_file(
        &self,
        hospital: &str,
        id: &TransferId,
        name: &str,
    ) -> Result<FileUpload, IngestError> {
        let transfer = self.open_transfer(hospital, id)?;
        check_file_name(name)?;
        let first = {
            let mut st = lock(&transfer.state);
            if st.committed {
                return Err(IngestError::Conflict(
                    "the transfer is committed; open a new one".into(),
                ));
            }
            if st.files.contains_key(name) {
                return Err(IngestError::Conflict(format!(
                    "file {name:?} is already uploaded in this transfer"
                )));
            }
            let max_files = self.inner.quota.max_files;
            if (st.files.len() + st.uploading.len()) as u64 >= max_files {
                return Err(IngestError::Quota {
                    key: "quota.max_files",
                    message: format!("the transfer already has {max_files} files"),
                });
            }
            if !st.uploading.insert(name.to_owned()) {
                return Err(IngestError::Conflict(format!(
                    "file {name:?} is being uploaded by another request"
                )));
            }
            st.files.is_empty() && st.uploading.len() == 1
        };
        transfer.touch();
        let dir = self.dir(id);
        let part = dir.parts_dir().join(format!(
            "{}",
            self.inner.next_part.fetch_add(1, Ordering::Relaxed)
        ));
        let rules = self.gate_rules(id, &transfer.declaration);
        let mut upload = FileUpload {
            store: self.clone(),
            transfer,
            id: *id,
            dir,
            name: name.to_owned(),
            part: part.clone(),
            file: None,
            buf: None,
            writes: JoinSet::new(),
            hashed: None,
            offset: 0,
            counted: 0,
            hasher: Some(ChunkHasher::new(self.inner.chunk_size)),
            done: false,
            gate: DicomGate::new(rules),
            hospital: hospital.to_owned(),
        };
        let spool = self.inner.edge.spool();
        // Straight to the device (O_DIRECT) where the buffers keep every write aligned: the
        // kernel's copy into fresh page-cache pages was 40 % of the edge's CPU during an
        // upload. Only the last write can be short; finish cuts its padding.
        let file = if spool.buffers_allow_direct() {
            spool.create_direct(&part).await?
        } else {
            spool.create(&part).await?
        };
        upload.file = Some(Arc::new(file));
        if first {
            self.add_stage(id, TransferState::Receiving, None).await;
        }
        Ok(upload)
    }

    /// What every file of transfer `id` is checked against: the declared patient, and
    /// de-identification when the declared purpose is in `policy.deidentify_purposes`.
    fn gate_rules(&self, id: &TransferId, decl: &Declaration) -> GateRules {
        GateRules {
            patient_id: decl.patient_id.clone(),
            deid: self
                .inner
                .deidentify_purposes
                .contains(&decl.purpose)
                .then(|| self.inner.deid_key.for_transfer(id)),
        }
    }

    /// The stored name of instance file `name` (`<SOP Instance UID>.dcm`) in transfer `id`:
    /// in a de-identified transfer `<new SOP Instance UID>.dcm` (the UID the instance gets),
    /// so the original UID does not travel in the manifest either; otherwise `name`.
    pub fn instance_file_name(&self, id: &TransferId, name: &str) -> String {
        let Some(t) = lock(&self.inner.open).get(id).cloned() else {
            return name.to_owned();
        };
        match (
            self.gate_rules(id, &t.declaration).deid,
            name.strip_suffix(".dcm"),
        ) {
            (Some(d), Some(uid)) => format!("{}.dcm", d.new_uid(uid)),
            _ => name.to_owned(),
        }
    }

    /// Records durably that a file (or DICOM instance) of open transfer `id` was refused by
    /// `refusal` (an audit `refused` record naming the rule, the file and, hashed, the
    /// instance's patient); the caller then answers the refusal.
    pub async fn refuse_file(
        &self,
        hospital: &str,
        id: &TransferId,
        name: &str,
        patient_id: Option<&str>,
        refusal: &Refusal,
    ) -> Result<(), IngestError> {
        let transfer = self.open_transfer(hospital, id)?;
        metrics::counter!("baylink_files_refused_total", "rule" => refusal.rule).increment(1);
        info!(transfer = %id, file = name, rule = refusal.rule, reason = %refusal.reason, "file refused");
        let mut event = Event {
            rule: Some(refusal.rule.to_owned()),
            hospital: Some(hospital.to_owned()),
            detail: Some(format!("file {name}: {}", refusal.reason)),
            ..Event::declared(Kind::Refused, Some(id.to_string()), &transfer.declaration)
        };
        if let Some(p) = patient_id {
            event.patient_id = Some(p.to_owned());
        }
        self.audit(event).await
    }

    /// Whether one more file `name` of `len` bytes keeps open transfer `id` within the
    /// policy's size limits (`policy.max_files`, `policy.max_transfer_bytes`). A refusal is
    /// recorded (`refused`, rule `size-limit`, naming the file) before it is returned. For
    /// doors that answer per file before the commit: C-STORE acknowledges every instance, so
    /// a limit found only at A-RELEASE would drop instances the modality was told are stored.
    pub async fn check_room(
        &self,
        hospital: &str,
        id: &TransferId,
        name: &str,
        len: u64,
    ) -> Result<(), IngestError> {
        let transfer = self.open_transfer(hospital, id)?;
        let files = {
            let st = lock(&transfer.state);
            (st.files.len() + st.uploading.len()) as u64
        };
        let bytes = transfer.bytes.load(Ordering::Relaxed);
        match self
            .inner
            .edge
            .policy()
            .check_size(files.saturating_add(1), bytes.saturating_add(len))
        {
            Ok(()) => Ok(()),
            Err(r) => {
                self.refuse_file(hospital, id, name, None, &r).await?;
                Err(IngestError::Refused(r))
            }
        }
    }

    /// Drops an open (uncommitted) transfer and everything uploaded into it: for a door that
    /// learns the upload was abandoned (a DICOM association aborted after some instances).
    /// Uploads still in progress in it fail.
    pub async fn abandon(&self, hospital: &str, id: &TransferId) -> Result<(), IngestError> {
        let transfer = self.open_transfer(hospital, id)?;
        {
            let mut st = lock(&transfer.state);
            if st.committed {
                return Err(IngestError::Conflict(
                    "the transfer is committed; it cannot be abandoned".into(),
                ));
            }
            st.committed = true; // no further files
        }
        lock(&self.inner.open).remove(id);
        let root = self.dir(id).root().to_path_buf();
        blocking(move || std::fs::remove_dir_all(&root).map_err(internal("cannot remove"))).await?;
        info!(transfer = %id, hospital, "open transfer abandoned");
        Ok(())
    }

    /// Seals transfer `id`: manifest from the recorded digests, HSM signature, manifest files
    /// written (`manifest.bin` last); then sends it in the background.
    pub async fn commit(&self, hospital: &str, id: &TransferId) -> Result<(), IngestError> {
        let transfer = self.open_transfer(hospital, id)?;
        let files: Vec<(String, u64)> = {
            let mut st = lock(&transfer.state);
            if st.committed {
                return Err(IngestError::Conflict(
                    "the transfer is already committed".into(),
                ));
            }
            if !st.uploading.is_empty() {
                return Err(IngestError::Conflict(
                    "uploads are still in progress in this transfer".into(),
                ));
            }
            if st.files.is_empty() {
                return Err(IngestError::BadRequest(
                    "nothing to commit: upload at least one file".into(),
                ));
            }
            st.committed = true;
            st.files.iter().map(|(n, s)| (n.clone(), *s)).collect()
        };
        if let Err(e) = self.check_size(hospital, id, &files).await {
            lock(&transfer.state).committed = false;
            return Err(e);
        }
        match self.seal(id, &files).await {
            Ok(()) => {
                lock(&self.inner.open).remove(id);
                self.add_stage(id, TransferState::Sealed, None).await;
                info!(transfer = %id, files = files.len(), "transfer sealed");
                self.send_in_background(*id, false);
                Ok(())
            }
            Err(e) => {
                lock(&transfer.state).committed = false;
                warn!(transfer = %id, error = %e, "commit failed");
                Err(e)
            }
        }
    }

    /// The policy's size limits (`policy.max_files`, `policy.max_transfer_bytes`) over the
    /// files about to be sealed; a refusal is recorded (`refused`, rule `size-limit`) before
    /// it is answered and leaves the transfer open (the hospital may abandon it).
    async fn check_size(
        &self,
        hospital: &str,
        id: &TransferId,
        files: &[(String, u64)],
    ) -> Result<(), IngestError> {
        let bytes = files
            .iter()
            .map(|(_, s)| *s)
            .fold(0u64, u64::saturating_add);
        let Err(r) = self
            .inner
            .edge
            .policy()
            .check_size(files.len() as u64, bytes)
        else {
            return Ok(());
        };
        metrics::counter!("baylink_transfers_total", "stage" => "sealed", "outcome" => "refused")
            .increment(1);
        info!(hospital, transfer = %id, rule = r.rule, reason = %r.reason, "commit refused");
        let dir = self.dir(id);
        let decl = blocking(move || {
            seal::load_declaration(&dir).map_err(|e| IngestError::Internal(format!("{e:#}")))
        })
        .await?;
        // audit: the refusal is recorded before it is answered.
        self.audit(Event {
            rule: Some(r.rule.to_owned()),
            hospital: Some(hospital.to_owned()),
            detail: Some(r.reason.clone()),
            ..Event::declared(Kind::Refused, Some(id.to_string()), &decl)
        })
        .await?;
        Err(IngestError::Refused(r))
    }

    async fn seal(&self, id: &TransferId, files: &[(String, u64)]) -> Result<(), IngestError> {
        let dir = self.dir(id);
        let d2 = dir.clone();
        let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
        let chunk_size = self.inner.chunk_size;
        let (decl, records) = blocking(move || {
            let decl =
                seal::load_declaration(&d2).map_err(|e| IngestError::Internal(format!("{e:#}")))?;
            let mut records = Vec::with_capacity(names.len());
            for name in names {
                let text =
                    std::fs::read(record_path(&d2, &name)).map_err(internal("digest record"))?;
                let r: FileRecord = serde_json::from_slice(&text)
                    .map_err(|e| IngestError::Internal(format!("digest record of {name}: {e}")))?;
                if r.chunk_size != chunk_size {
                    return Err(IngestError::Internal(format!(
                        "{name} was hashed with chunk size {} but transport.chunk_size is now \
                         {chunk_size}; upload it again in a new transfer",
                        r.chunk_size
                    )));
                }
                records.push((name, r));
            }
            Ok((decl, records))
        })
        .await?;
        let cfg = self.inner.edge.config();
        let process_id =
            seal::allowed_consent(&decl).map_err(|e| IngestError::Internal(format!("{e:#}")))?;
        let mut builder =
            ManifestBuilder::new(*id, cfg.id.clone(), decl.digest(), process_id, chunk_size);
        for (name, r) in records {
            let digests = r
                .digests
                .iter()
                .map(|h| {
                    let mut d: Digest = [0; 32];
                    hex::decode_to_slice(h, &mut d).map(|()| d)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| IngestError::Internal(format!("digest record of {name}: {e}")))?;
            builder
                .add_file(name, r.size, digests)
                .map_err(|e| IngestError::Internal(e.to_string()))?;
        }
        let manifest = builder
            .finish(seal::now_unix_ms())
            .map_err(|e| IngestError::Internal(e.to_string()))?;
        seal::sign_and_write_manifest(&dir, &manifest, self.inner.edge.keys())
            .await
            .map_err(|e| IngestError::Internal(format!("{e:#}")))?;
        // audit: `sealed` (the HSM-signed manifest's digests) before anything is sent. If it
        // cannot be recorded, the seal marker (`manifest.bin`) is removed and the commit
        // fails: nothing is ever sent that the log does not show as sealed.
        let hospital = self.owner(id);
        if let Err(e) = self
            .audit(Event {
                hospital,
                merkle_root: Some(manifest.merkle_root),
                manifest_digest: Some(manifest.digest()),
                ..Event::declared(Kind::Sealed, Some(id.to_string()), &decl)
            })
            .await
        {
            let _ = std::fs::remove_file(dir.manifest_bin());
            return Err(e);
        }
        Ok(())
    }

    /// Closes every open transfer that has had no upload in progress, and none begin or
    /// end, for `idle` (`ingest.open_timeout`): a hospital that declared and never
    /// committed. Each gets an `expired` audit record, then the `expired` marker (the
    /// reason, which later uploads and commits are refused with), the `failed` state in its
    /// status, and its files are removed. Returns how many were closed.
    pub async fn expire_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut due = Vec::new();
        lock(&self.inner.open).retain(|id, t| {
            let mut st = lock(&t.state);
            let idle_for = now.saturating_duration_since(*lock(&t.touched));
            let expire = !st.committed && st.uploading.is_empty() && idle_for >= idle;
            if expire {
                // Under the state lock: an upload that begins now sees a closed transfer.
                st.committed = true;
                due.push((*id, Arc::clone(t)));
            }
            !expire
        });
        let mut closed = 0;
        for (id, t) in due {
            let reason = format!(
                "the transfer expired: not committed within {} of its last upload \
                 (ingest.open_timeout)",
                humantime::format_duration(idle)
            );
            match self.close_expired(&id, &t, &reason).await {
                Ok(()) => {
                    closed += 1;
                    info!(transfer = %id, hospital = %t.hospital, "open transfer expired: files removed");
                    metrics::counter!("baylink_transfers_total", "stage" => "declared", "outcome" => "expired").increment(1);
                }
                Err(e) => {
                    warn!(transfer = %id, error = %e, "cannot close an expired transfer; it stays open");
                    lock(&t.state).committed = false;
                    lock(&self.inner.open).insert(id, t);
                }
            }
        }
        closed
    }

    async fn close_expired(
        &self,
        id: &TransferId,
        t: &OpenTransfer,
        reason: &str,
    ) -> Result<(), IngestError> {
        // audit: the record is durable before anything is removed.
        self.audit(Event {
            hospital: Some(t.hospital.clone()),
            detail: Some(reason.to_owned()),
            ..Event::declared(Kind::Expired, Some(id.to_string()), &t.declaration)
        })
        .await?;
        let (dir, why) = (self.dir(id), reason.to_owned());
        blocking(move || write_atomic(&dir.expired(), why.as_bytes()).map_err(internal("expired")))
            .await?;
        // Closed from here on, whatever follows: the marker is what start-up goes by.
        self.add_stage(id, TransferState::Failed, Some(reason.to_owned()))
            .await;
        let dir = self.dir(id);
        if let Err(e) =
            blocking(move || remove_uploads(&dir).map_err(internal("cannot remove"))).await
        {
            warn!(transfer = %id, error = %e, "expired transfer: files not removed (retried at the next start)");
        }
        Ok(())
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

    /// Sends a transfer sealed before a restart in the background (at start-up), checking
    /// its chunks at rest first, and records the outcome in its status.
    pub fn resume(&self, id: TransferId) {
        self.send_in_background(id, true);
    }

    /// Sends sealed transfer `id` in the background, one transfer at a time, recording the
    /// outcome in its status. `check_at_rest`: it was sealed before this process started,
    /// so its chunks are read back and checked first ([`SendRequest::Resume`]); otherwise
    /// this process hashed them on their way in moments ago ([`SendRequest::SealedHere`]).
    fn send_in_background(&self, id: TransferId, check_at_rest: bool) {
        let request = if check_at_rest {
            SendRequest::Resume(id)
        } else {
            SendRequest::SealedHere(id)
        };
        let store = self.clone();
        let sending = self.inner.sending.clone();
        tokio::spawn(async move {
            let Ok(_turn) = sending.acquire_owned().await else {
                return;
            };
            store.add_stage(&id, TransferState::Sending, None).await;
            let res = store
                .inner
                .edge
                .send(request, false, &Default::default())
                .await;
            match res {
                Ok(summary) => {
                    info!(
                        transfer = %id,
                        wire_bytes = summary.wire_bytes,
                        transmit_seconds = summary.transmit_seconds,
                        seconds = summary.seconds,
                        "transfer receipted"
                    );
                    store.add_stage(&id, TransferState::Committed, None).await;
                }
                Err(e) => {
                    warn!(transfer = %id, error = %e, "transfer not sent");
                    let state = match e {
                        SendFailure::Refused(_) | SendFailure::GatewayRefused(_) => {
                            TransferState::Refused
                        }
                        _ => TransferState::Failed,
                    };
                    store.add_stage(&id, state, Some(e.to_string())).await;
                }
            }
        });
    }

    async fn add_stage(&self, id: &TransferId, state: TransferState, error: Option<String>) {
        let _guard = self.inner.status_lock.lock().await;
        let dir = self.dir(id);
        let res = blocking(move || {
            let path = status_path(&dir);
            let text = std::fs::read(&path).map_err(internal("status.json"))?;
            let mut st: TransferStatus = serde_json::from_slice(&text)
                .map_err(|e| IngestError::Internal(format!("status.json: {e}")))?;
            if st.state == state {
                return Ok(());
            }
            st.state = state;
            st.stages.push(Stage {
                stage: state,
                at: now_rfc3339(),
            });
            if error.is_some() {
                st.error = error;
            }
            if state == TransferState::Committed {
                st.receipt = receipt_info(&dir);
            }
            if matches!(state, TransferState::Sealed) {
                let (files, bytes) = finished_files(&dir);
                st.files = files;
                st.bytes = bytes;
            }
            let out =
                serde_json::to_vec_pretty(&st).map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&path, &out).map_err(internal("status.json"))
        })
        .await;
        if let Err(e) = res {
            warn!(transfer = %id, error = %e, "cannot record the transfer's status");
        }
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// [`IngestStore::status`], answered once the state differs from what it was when asked,
    /// the state is final (`committed`, `delivered`, `refused`, `failed`), or `wait` has
    /// passed, whichever comes first (a long poll: clients need not poll in a loop).
    pub async fn status_after_change(
        &self,
        hospital: &str,
        id: &TransferId,
        wait: Duration,
    ) -> Result<TransferStatus, IngestError> {
        let mut changes = self.inner.changes.subscribe();
        let first = self.status(hospital, id).await?;
        if wait.is_zero() || first.state.is_final() {
            return Ok(first);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    let st = self.status(hospital, id).await?;
                    if st.state != first.state {
                        return Ok(st);
                    }
                }
                Ok(Err(_)) | Err(_) => return self.status(hospital, id).await,
            }
        }
    }

    /// The status of transfer `id` as `hospital` may see it.
    pub async fn status(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<TransferStatus, IngestError> {
        if self.owner(id).as_deref() != Some(hospital) {
            return Err(IngestError::NotFound);
        }
        let open = lock(&self.inner.open).get(id).cloned();
        let _guard = self.inner.status_lock.lock().await;
        let dir = self.dir(id);
        let mut st = blocking(move || {
            let text = std::fs::read(status_path(&dir)).map_err(internal("status.json"))?;
            serde_json::from_slice::<TransferStatus>(&text)
                .map_err(|e| IngestError::Internal(format!("status.json: {e}")))
        })
        .await?;
        if let Some(t) = open {
            let s = lock(&t.state);
            st.files = s.files.len();
            st.bytes = s.files.values().sum();
        }
        if st.receipt.is_some() || self.dir(id).receipt_sig().exists() {
            st.downloads = Some(Downloads {
                receipt: format!("/v1/transfers/{id}/receipt"),
                proof: format!("/v1/transfers/{id}/proof"),
            });
        }
        Ok(st)
    }

    /// The transfer's state, if `hospital` owns it (else [`IngestError::NotFound`]), and a
    /// conflict naming the state unless the receipt is stored.
    async fn receipted(&self, hospital: &str, id: &TransferId) -> Result<(), IngestError> {
        let st = self.status(hospital, id).await?;
        if st.downloads.is_none() {
            return Err(IngestError::Conflict(format!(
                "no receipt yet: the transfer is {}",
                serde_json::to_value(st.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// The gateway's signed receipt of transfer `id` for `hospital` (404 for another
    /// hospital's transfer or an unknown id, 409 before the receipt arrived).
    pub async fn receipt(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<ReceiptDownload, IngestError> {
        self.receipted(hospital, id).await?;
        let dir = self.dir(id);
        let key_path = self.inner.edge.config().peer_signing_key.clone();
        let id = id.to_string();
        blocking(move || {
            let b64 = base64::engine::general_purpose::STANDARD;
            let receipt = std::fs::read(dir.receipt_bin()).map_err(internal("receipt.bin"))?;
            let signature = std::fs::read(dir.receipt_sig()).map_err(internal("receipt.sig"))?;
            let manifest = std::fs::read(dir.manifest_bin()).map_err(internal("manifest.bin"))?;
            let m = baylink_net::proto::Manifest::from_bytes(&manifest, &Default::default())
                .map_err(|e| IngestError::Internal(format!("manifest.bin: {e}")))?;
            Ok(ReceiptDownload {
                format: "baylink-receipt/1",
                transfer: id,
                receipt: b64.encode(receipt),
                signature: b64.encode(signature),
                signed_prefix: String::from_utf8_lossy(crate::signing::RECEIPT_CONTEXT)
                    .into_owned(),
                manifest: b64.encode(&manifest),
                merkle_root: hex::encode(m.merkle_root),
                process_id: m.process_id,
                gateway_public_key: std::fs::read_to_string(&key_path).ok(),
            })
        })
        .await
    }

    /// The audit inclusion proof of transfer `id`'s records (the JSON of `baylink audit
    /// prove --transfer ID`), for `hospital`; signs a checkpoint first so the proof covers
    /// every record written so far.
    pub async fn proof(
        &self,
        hospital: &str,
        id: &TransferId,
    ) -> Result<crate::audit::Proof, IngestError> {
        self.receipted(hospital, id).await?;
        let log = self.inner.edge.audit();
        log.checkpoint()
            .await
            .map_err(|e| IngestError::Internal(format!("audit log: {e}")))?;
        let dir = log.dir().to_owned();
        let id = id.to_string();
        blocking(move || {
            crate::audit::prove(&dir, &id)
                .map_err(|e| IngestError::Internal(format!("audit proof: {e}")))
        })
        .await
    }

    /// The configured limit on one transfer's payload.
    pub fn max_upload_bytes(&self) -> u64 {
        self.inner.max_upload_bytes
    }
}

fn receipt_info(dir: &TransferDir) -> Option<ReceiptInfo> {
    let receipt = std::fs::read(dir.receipt_bin()).ok()?;
    let signature = std::fs::read(dir.receipt_sig()).ok()?;
    let manifest = std::fs::read(dir.manifest_bin()).ok()?;
    let m = baylink_net::proto::Manifest::from_bytes(&manifest, &Default::default()).ok()?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(ReceiptInfo {
        merkle_root: hex::encode(m.merkle_root),
        receipt: b64.encode(receipt),
        signature: b64.encode(signature),
    })
}

fn finished_files(dir: &TransferDir) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(files_dir(dir)) else {
        return (0, 0);
    };
    let mut n = 0;
    let mut bytes = 0;
    for e in entries.filter_map(Result::ok) {
        if let Ok(text) = std::fs::read(e.path())
            && let Ok(r) = serde_json::from_slice::<FileRecord>(&text)
        {
            n += 1;
            bytes += r.size;
        }
    }
    (n, bytes)
}

/// Removes what the hospital uploaded into a transfer that will never be sent: `data/`,
/// `parts/` and the digest records in `files/`. Missing directories are fine.
fn remove_uploads(dir: &TransferDir) -> std::io::Result<()> {
    dir.remove_dirs(&[dir.data_dir(), dir.parts_dir(), files_dir(dir)])
}

/// Reloads an open transfer after a restart: finished files from their records; unfinished
/// uploads (parts/) removed.
fn recover_open(dir: &TransferDir) -> Result<OpenTransfer, IngestError> {
    let hospital = std::fs::read_to_string(owner_path(dir)).map_err(internal("owner"))?;
    if let Ok(entries) = std::fs::read_dir(dir.parts_dir()) {
        for e in entries.filter_map(Result::ok) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut files = BTreeMap::new();
    // Records name files by a digest; the data directory has the names.
    if let Ok(entries) = std::fs::read_dir(dir.data_dir()) {
        for e in entries.filter_map(Result::ok) {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Ok(text) = std::fs::read(record_path(dir, &name))
                && let Ok(r) = serde_json::from_slice::<FileRecord>(&text)
            {
                files.insert(name, r.size);
            }
        }
    }
    let bytes = files.values().sum();
    let declaration =
        seal::load_declaration(dir).map_err(|e| IngestError::Internal(format!("{e:#}")))?;
    Ok(OpenTransfer {
        hospital,
        declaration,
        bytes: AtomicU64::new(bytes),
        state: Mutex::new(OpenState {
            committed: false,
            uploading: HashSet::new(),
            files,
        }),
        // The idle clock starts again at a restart.
        touched: Mutex::new(Instant::now()),
    })
}

/// Spool writes one upload keeps in flight. One was not enough: the connection's task then
/// waited for each write's device latency before it could hand over the next buffer.
const WRITES_IN_FLIGHT: usize = 4;

/// One file being uploaded. Bytes are gathered into whole spool buffers, hashed in order
/// beside the connection's task, and written through the io_uring thread (up to four
/// writes at once while the next buffer fills). Dropping it before
/// [`FileUpload::finish`] discards the partial file; the transfer stays open for a retry of
/// that file.
#[derive(Debug)]
pub struct FileUpload {
    store: IngestStore,
    transfer: Arc<OpenTransfer>,
    id: TransferId,
    dir: TransferDir,
    name: String,
    part: PathBuf,
    file: Option<Arc<SpoolFile>>,
    buf: Option<SpoolBuf>,
    /// Writes in flight; each hashes its buffer first (see `hashed`), then writes it and
    /// gives it back.
    writes: JoinSet<Result<SpoolBuf, SpoolError>>,
    /// The hasher, travelling with the newest write until that write has hashed its buffer.
    hashed: Option<tokio::sync::oneshot::Receiver<ChunkHasher>>,
    offset: u64,
    counted: u64,
    /// With the upload (when not in `hashed`).
    hasher: Option<ChunkHasher>,
    done: bool,
    /// PatientID check and de-identification of DICOM files.
    gate: DicomGate,
    hospital: String,
}

impl FileUpload {
    fn spool(&self) -> &Spool {
        self.store.inner.edge.spool()
    }

    /// Refuses the upload at once if `len` more bytes would exceed the transfer's limit
    /// (the HTTP layer calls it with the Content-Length before reading the body).
    pub fn check_len(&self, len: u64) -> Result<(), IngestError> {
        let limit = self.store.inner.max_upload_bytes;
        let have = self.transfer.bytes.load(Ordering::Relaxed);
        if have.saturating_add(len) > limit {
            return Err(IngestError::TooLarge { limit });
        }
        self.store.check_spool_room(&self.hospital, len)
    }

    /// The file is a DICOM instance whose PatientID the caller checked against the
    /// transfer's with a full parser (the C-STORE door): see [`DicomGate::patient_checked`].
    pub fn patient_checked(&mut self) {
        self.gate.patient_checked();
    }

    /// Takes the next bytes of the file. Waits when the spool is behind (back-pressure).
    ///
    /// The bytes pass the transfer's [`DicomGate`] first: a DICOM file of another patient
    /// is refused (rule `patient-mismatch`, recorded in the audit log), and in a
    /// de-identified transfer what reaches the spool (and the hasher) is the de-identified
    /// instance.
    pub async fn write(&mut self, data: Bytes) -> Result<(), IngestError> {
        let limit = self.store.inner.max_upload_bytes;
        let len = data.len() as u64;
        self.store.check_spool_room(&self.hospital, len)?;
        let before = self.transfer.bytes.fetch_add(len, Ordering::Relaxed);
        self.counted += len;
        if before.saturating_add(len) > limit {
            return Err(IngestError::TooLarge { limit });
        }
        let passed = self.gate.feed(data);
        match self.gated(passed).await? {
            Some(out) => self.write_through(out).await,
            None => Ok(()),
        }
    }

    /// A gate's answer: refusals recorded in the audit log and turned into errors.
    async fn gated(
        &self,
        passed: Result<Option<Bytes>, DeidError>,
    ) -> Result<Option<Bytes>, IngestError> {
        match passed {
            Ok(out) => Ok(out),
            Err(DeidError::Malformed(why)) => Err(IngestError::BadRequest(format!(
                "{}: malformed DICOM instance: {why}",
                self.name
            ))),
            Err(DeidError::Refused {
                refusal,
                patient_id,
            }) => {
                self.store
                    .refuse_file(
                        &self.hospital,
                        &self.id,
                        &self.name,
                        patient_id.as_deref(),
                        &refusal,
                    )
                    .await?;
                Err(IngestError::Refused(refusal))
            }
        }
    }

    /// Writes bytes that passed the gate.
    async fn write_through(&mut self, data: Bytes) -> Result<(), IngestError> {
        let mut rest = &data[..];
        while !rest.is_empty() {
            if self.buf.is_none() {
                self.buf = Some(self.next_buffer().await?);
            }
            let buf = self.buf.as_mut().expect("set above");
            let n = buf.fill_from(rest);
            rest = &rest[n..];
            if buf.is_full() {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// A buffer for the next bytes: a fresh one from the pool while there is one and fewer
    /// than [`WRITES_IN_FLIGHT`] writes are out, else the buffer of the oldest write once it
    /// is done. (Waiting on the pool while holding finished writes' buffers could wait
    /// forever when every upload did the same.)
    async fn next_buffer(&mut self) -> Result<SpoolBuf, IngestError> {
        if self.writes.len() < WRITES_IN_FLIGHT
            && let Some(buf) = self.spool().try_buffer()
        {
            return Ok(buf);
        }
        if self.writes.is_empty() {
            return Ok(self.spool().buffer().await);
        }
        let mut buf = self.join_write().await?;
        buf.clear();
        Ok(buf)
    }

    /// The next write to finish: its buffer, or its error.
    async fn join_write(&mut self) -> Result<SpoolBuf, IngestError> {
        let done = self
            .writes
            .join_next()
            .await
            .ok_or_else(|| IngestError::Internal("no spool write in flight".into()))?;
        Ok(done.map_err(|e| IngestError::Internal(format!("spool write task: {e}")))??)
    }

    /// The hasher, once the newest write has hashed its buffer with it.
    async fn take_hasher(&mut self) -> Result<ChunkHasher, IngestError> {
        if let Some(h) = self.hasher.take() {
            return Ok(h);
        }
        let rx = self
            .hashed
            .take()
            .ok_or_else(|| IngestError::Internal("the upload's hasher is gone".into()))?;
        rx.await
            .map_err(|_| IngestError::Internal("a spool write task ended before hashing".into()))
    }

    /// Hands the filled buffer to a task that hashes it (after the previous buffer: the
    /// hasher goes from task to task) and then writes it; the writes of earlier buffers may
    /// still be in flight.
    async fn flush(&mut self) -> Result<(), IngestError> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        if buf.is_empty() {
            self.buf = Some(buf);
            return Ok(());
        }
        let mut hasher = self.take_hasher().await?;
        while self.writes.len() >= WRITES_IN_FLIGHT {
            drop(self.join_write().await?);
        }
        let file = self.file.clone().expect("open until finished");
        let spool = self.spool().clone();
        let at = self.offset;
        self.offset += buf.len() as u64;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.hashed = Some(rx);
        // Hashing runs beside the connection's task (which decrypts the next bytes).
        self.writes.spawn(async move {
            hasher.update(&buf);
            let _ = tx.send(hasher);
            spool.write_at(&file, at, buf).await
        });
        Ok(())
    }

    /// Writes what is left, fsyncs, renames into `data/<name>` and records the size and
    /// chunk digests durably. Returns the file's size.
    pub async fn finish(mut self) -> Result<u64, IngestError> {
        let passed = self.gate.finish();
        if let Some(out) = self.gated(passed).await? {
            self.write_through(out).await?;
        }
        self.flush().await?;
        self.hasher = Some(self.take_hasher().await?);
        while !self.writes.is_empty() {
            drop(self.join_write().await?);
        }
        self.buf = None;
        let file = self.file.take().expect("open until finished");
        let spool = self.spool().clone();
        let size = self.offset;
        spool.sync_to_len(&file, size).await?;
        if let Ok(file) = Arc::try_unwrap(file) {
            spool.close(file).await?;
        }
        let digests = self
            .hasher
            .take()
            .expect("back from the last write")
            .finish();
        spool
            .commit_rename(&self.part, self.dir.data_file(&self.name))
            .await?;
        let record = FileRecord {
            size,
            chunk_size: self.store.inner.chunk_size,
            digests: digests.iter().map(hex::encode).collect(),
        };
        let path = record_path(&self.dir, &self.name);
        blocking(move || {
            let json =
                serde_json::to_vec(&record).map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&path, &json).map_err(internal("digest record"))
        })
        .await?;
        self.done = true;
        // The file's bytes stay counted against the transfer's limit.
        let mut st = lock(&self.transfer.state);
        st.uploading.remove(&self.name);
        st.files.insert(self.name.clone(), size);
        drop(st);
        self.transfer.touch();
        info!(transfer = %self.id, file = %self.name, size, "file received");
        metrics::counter!("baylink_bytes_total", "direction" => "ingested").increment(size);
        Ok(size)
    }
}

impl Drop for FileUpload {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.transfer
            .bytes
            .fetch_sub(self.counted, Ordering::Relaxed);
        lock(&self.transfer.state).uploading.remove(&self.name);
        self.transfer.touch();
        // The part file has a name of its own: a retry writes elsewhere, so removing this one
        // later cannot touch it.
        let mut writes = std::mem::take(&mut self.writes);
        let file = self.file.take();
        let spool = self.spool().clone();
        let part = self.part.clone();
        let (id, name) = (self.id, self.name.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // Every write ends before the file is closed and removed.
                while writes.join_next().await.is_some() {}
                if let Some(f) = file.and_then(|f| Arc::try_unwrap(f).ok()) {
                    let _ = spool.close(f).await;
                }
                if let Err(e) = spool.remove_file(&part).await {
                    warn!(transfer = %id, file = %name, error = %e, "cannot remove a partial upload");
                }
                info!(transfer = %id, file = %name, "partial upload discarded");
            });
        } else {
            let _ = std::fs::remove_file(&part);
        }
    }
}

/// A declaration in progress, counted against its hospital's `quota.max_open_transfers`.
struct DeclaringSlot<'a> {
    store: &'a IngestStore,
    hospital: String,
}

impl Drop for DeclaringSlot<'_> {
    fn drop(&mut self) {
        let mut declaring = lock(&self.store.inner.declaring);
        if let Some(n) = declaring.get_mut(&self.hospital) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                declaring.remove(&self.hospital);
            }
        }
    }
}

/// Quota accounting (`[quota]`, `spool.reserve_bytes`), from the open transfers themselves.
impl IngestStore {
    /// Takes one of `hospital`'s `quota.max_open_transfers` for a declaration in progress
    /// (open transfers and other declarations in progress hold the others); the slot is
    /// given back when the returned guard drops, by then the transfer is open or refused.
    fn take_open_slot(&self, hospital: &str) -> Result<DeclaringSlot<'_>, IngestError> {
        let max = self.inner.quota.max_open_transfers;
        let open = lock(&self.inner.open);
        let mut declaring = lock(&self.inner.declaring);
        let held = open.values().filter(|t| t.hospital == hospital).count()
            + declaring.get(hospital).copied().unwrap_or(0);
        if held >= max {
            return Err(IngestError::Quota {
                key: "quota.max_open_transfers",
                message: format!("{hospital} already has {held} open transfers"),
            });
        }
        *declaring.entry(hospital.to_owned()).or_default() += 1;
        Ok(DeclaringSlot {
            store: self,
            hospital: hospital.to_owned(),
        })
    }

    /// Refuses `len` more bytes for `hospital` when its open transfers would hold more than
    /// `quota.max_spool_bytes`, or when they would leave less than `spool.reserve_bytes` free.
    fn check_spool_room(&self, hospital: &str, len: u64) -> Result<(), IngestError> {
        let max = self.inner.quota.max_spool_bytes;
        let held: u64 = lock(&self.inner.open)
            .values()
            .filter(|t| t.hospital == hospital)
            .map(|t| t.bytes.load(Ordering::Relaxed))
            .sum();
        if held.saturating_add(len) > max {
            return Err(IngestError::Quota {
                key: "quota.max_spool_bytes",
                message: format!(
                    "{hospital}'s open transfers hold {held} bytes; {len} more would pass {max}"
                ),
            });
        }
        let reserve = self.inner.reserve_bytes;
        if reserve > 0 {
            let (_, available) = crate::retention::spool_space(&self.inner.spool_dir)
                .map_err(internal("spool free space"))?;
            if available < reserve.saturating_add(len) {
                return Err(IngestError::Reserve { available, reserve });
            }
        }
        Ok(())
    }
}
