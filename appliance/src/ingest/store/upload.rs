//! One file streamed into an open transfer ([`FileUpload`]: gathered into spool buffers,
//! hashed in order, written through the io_uring thread, fsynced and renamed beside its
//! digest record), and the DICOM gate glue every door goes through: the transfer's
//! [`GateRules`], stored instance names, per-file refusals and size checks.
//!
//! What this file must not do: seal, send or remove a transfer (that is
//! [`super::lifecycle`]), or let a byte reach the spool without passing the transfer's
//! [`DicomGate`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use baylink_net::proto::{ChunkHasher, TransferId};
use baylink_net::spool::{Spool, SpoolBuf, SpoolError, SpoolFile};
use bytes::Bytes;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{
    FileRecord, IngestError, IngestStore, OpenTransfer, TransferState, blocking, check_file_name,
    internal, lock, record_path,
};
use crate::audit::{Event, Kind};
use crate::dicom::deid::{DeidError, DicomGate, GateRules};
use crate::policy::{Declaration, Refusal};
use crate::transfer_dir::{TransferDir, write_staged};

impl IngestStore {
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
                .then(|| {
                    let options = self
                        .inner
                        .deidentify_options
                        .get(&decl.purpose)
                        .copied()
                        .unwrap_or_default();
                    self.inner
                        .deid_key
                        .for_transfer(id)
                        .with_options(&decl.patient_id, options)
                }),
        }
    }

    /// Whether one more file `name` of `len` bytes keeps open transfer `id` within the
    /// policy's size limits (`policy.max_files`, `policy.max_transfer_bytes`). A refusal is
    /// recorded (`refused`, rule `size-limit`, naming the file) before it is returned. For
    /// doors that answer per file before the commit: C-STORE acknowledges every instance, so
    /// a limit found only at A-RELEASE would drop instances the modality was told are stored.
    /// A file being uploaded counts itself: see [`FileUpload::check_room`].
    pub async fn check_room(
        &self,
        hospital: &str,
        id: &TransferId,
        name: &str,
        len: u64,
    ) -> Result<(), IngestError> {
        let transfer = self.open_transfer(hospital, id)?;
        self.check_size_with(hospital, id, &transfer, name, 1, len)
            .await
    }

    /// The policy's size limits for open transfer `id` (`transfer`) with `files` more files
    /// and `bytes` more bytes than it counts now (its stored files and those being
    /// uploaded); a refusal naming file `name` is recorded before it is returned.
    async fn check_size_with(
        &self,
        hospital: &str,
        id: &TransferId,
        transfer: &OpenTransfer,
        name: &str,
        files: u64,
        bytes: u64,
    ) -> Result<(), IngestError> {
        let counted = {
            let st = lock(&transfer.state);
            (st.files.len() + st.uploading.len()) as u64
        };
        let held = transfer.bytes.load(Ordering::Relaxed);
        match self
            .inner
            .edge
            .policy()
            .check_size(counted.saturating_add(files), held.saturating_add(bytes))
        {
            Ok(()) => Ok(()),
            Err(r) => {
                self.refuse_file(hospital, id, name, None, &r).await?;
                Err(IngestError::Refused(r))
            }
        }
    }

    /// Whether the files of open transfer `id` are de-identified on their way into the spool
    /// (its purpose is in `policy.deidentify_purposes`).
    pub fn deidentifies(&self, id: &TransferId) -> bool {
        lock(&self.inner.open).get(id).is_some_and(|t| {
            self.inner
                .deidentify_purposes
                .contains(&t.declaration.purpose)
        })
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
}

/// Spool writes one upload keeps in flight. One was not enough: the connection's task then
/// waited for each write's device latency before it could hand over the next buffer.
const WRITES_IN_FLIGHT: usize = 4;

/// One file being uploaded. Bytes are gathered into whole spool buffers, hashed in order
/// beside the connection's task, and written through the io_uring thread (up to four
/// writes at once while the next buffer fills; each buffer goes back to the pool once
/// written). Dropping it before
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
    /// returns it to the pool.
    writes: JoinSet<Result<(), SpoolError>>,
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

    /// Whether the transfer, with this file at its size so far, stays within the policy's
    /// size limits (`policy.max_files`, `policy.max_transfer_bytes`). A refusal is recorded
    /// (`refused`, rule `size-limit`, naming the file) before it is returned. For doors that
    /// answer per file before the commit: C-STORE acknowledges every instance, so a limit
    /// found only at A-RELEASE would drop instances the modality was told are stored.
    pub async fn check_room(&self) -> Result<(), IngestError> {
        // This file and its bytes so far are already counted among those being uploaded.
        self.store
            .check_size_with(&self.hospital, &self.id, &self.transfer, &self.name, 0, 0)
            .await
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

    /// A buffer for the next bytes, from the pool, once fewer than [`WRITES_IN_FLIGHT`]
    /// writes are out. Each write gives its buffer back to the pool as soon as it is done:
    /// an upload whose client pauses (a C-STORE SCU may send a PDU a minute) holds only the
    /// buffer it is filling, not those of the writes before, which the pool's other users
    /// (other uploads, seals, the link) would otherwise wait for.
    async fn next_buffer(&mut self) -> Result<SpoolBuf, IngestError> {
        while self.writes.len() >= WRITES_IN_FLIGHT {
            self.join_write().await?;
        }
        Ok(self.spool().buffer().await)
    }

    /// The next write to finish, or its error.
    async fn join_write(&mut self) -> Result<(), IngestError> {
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
            self.join_write().await?;
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
            spool.write_at(&file, at, buf).await.map(drop)
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
            self.join_write().await?;
        }
        self.buf = None;
        let file = self.file.take().expect("open until finished");
        let spool = self.spool().clone();
        let size = self.offset;
        let digests = self
            .hasher
            .take()
            .expect("back from the last write")
            .finish();
        let record = FileRecord {
            name: Some(self.name.clone()),
            size,
            chunk_size: self.store.inner.chunk_size,
            digests: digests.iter().map(hex::encode).collect(),
        };
        let path = record_path(&self.dir, &self.name);
        // The payload and its record are made durable side by side, then both renamed into
        // place with one fsync of each directory: an instance is acknowledged after two
        // fsyncs' wait, not five. A crash in between may leave a record whose payload's
        // rename was lost; a record counts only beside its payload in `data/` (recovery,
        // `lifecycle::recover_open`), so the file is then simply not part of the transfer,
        // as before its acknowledgement.
        let staged = blocking(move || {
            let json =
                serde_json::to_vec(&record).map_err(|e| IngestError::Internal(e.to_string()))?;
            write_staged(&path, &json)
                .map(|tmp| (tmp, path))
                .map_err(internal("digest record"))
        });
        let (synced, staged) = tokio::join!(spool.sync_to_len(&file, size), staged);
        synced?;
        let (tmp, path) = staged?;
        if let Ok(file) = Arc::try_unwrap(file) {
            spool.close(file).await?;
        }
        spool
            .commit_renames(vec![
                (self.part.clone(), self.dir.data_file(&self.name)),
                (tmp, path),
            ])
            .await?;
        self.done = true;
        // The file's bytes stay counted against the transfer's limit.
        let mut st = lock(&self.transfer.state);
        st.uploading.remove(&self.name);
        st.files.insert(self.name.clone(), size);
        st.order.push(self.name.clone());
        // Under the state's lock: files reach the streamer in the order they are listed.
        self.store.file_stored(
            &self.hospital,
            &self.id,
            st.order.len() - 1,
            &self.name,
            size,
        );
        drop(st);
        self.transfer.touch();
        info!(transfer = %self.id, file = %self.name, size, "file received");
        metrics::counter!("baylink_bytes_total", "direction" => "ingested").increment(size);
        crate::telemetry::stage_bytes("ingest", size);
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
                // Gone already when an abandoned transfer's directories were removed first.
                if let Err(e) = spool.remove_file(&part).await
                    && e.source.kind() != std::io::ErrorKind::NotFound
                {
                    warn!(transfer = %id, file = %name, error = %e, "cannot remove a partial upload");
                }
                info!(transfer = %id, file = %name, "partial upload discarded");
            });
        } else {
            let _ = std::fs::remove_file(&part);
        }
    }
}
