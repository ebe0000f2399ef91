//! A transfer's life in the store: declare (the compliance checkpoint), commit (size check,
//! seal from the recorded digests, HSM signature), abandon, expire (`ingest.open_timeout`),
//! and the reload of open transfers at start-up. A C-STORE association's transfer is sealed
//! whatever ended the association ([`IngestStore::seal_association`]; a failed seal is
//! retried in the background, and start-up seals what a crash left open).
//!
//! Every step here is audited before it takes effect. What this file must not do: touch
//! payload bytes (uploads are [`super::upload`]'s), write `status.json` other than through
//! `add_stage` and `set_association_end` ([`super::status`]), or send anything (it hands sealed transfers to
//! [`super::send`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use baylink_net::proto::{Digest, ManifestBuilder, TransferId};
use tracing::{error, info, warn};

use super::{
    AssociationEnd, FileRecord, IngestError, IngestStore, OpenState, OpenTransfer, Stage,
    TransferState, TransferStatus, association_path, blocking, files_dir, internal, lock,
    now_rfc3339, owner_path, record_path, status_path,
};
use crate::audit::{Event, Kind};
use crate::policy::{Decision, Declaration, Refusal};
use crate::seal;
use crate::transfer_dir::{TransferDir, write_atomic};

/// The longest pause between two attempts to seal a C-STORE association's transfer.
const SEAL_RETRY_MAX: Duration = Duration::from_secs(60);

/// What became of a C-STORE association's transfer when the association ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssociationOutcome {
    /// Sealed with this many instances; it is sent in the background.
    Sealed {
        /// Instances in the transfer.
        files: usize,
    },
    /// No instance was answered Success: the transfer was dropped, nothing is sent.
    Empty,
    /// Sealing failed for a reason that may pass (HSM, audit log, disk): the transfer stays
    /// open in the spool and is sealed again in the background (and at the next start).
    Retrying {
        /// Why the first attempt failed.
        error: String,
    },
}

/// Whether a failed seal is worth retrying: an internal failure or a full disk may pass; a
/// refusal, a conflict or a missing transfer will not.
fn transient(e: &IngestError) -> bool {
    matches!(e, IngestError::Internal(_) | IngestError::NoSpace)
}

impl IngestStore {
    /// Runs the compliance checkpoint and creates the transfer, durably, owned by
    /// `hospital`.
    pub async fn declare(
        &self,
        hospital: &str,
        decl: Declaration,
    ) -> Result<TransferId, IngestError> {
        self.declare_as(hospital, decl, None).await
    }

    /// [`IngestStore::declare`] for the transfer of C-STORE association `association`: the
    /// `association` marker is durable before the transfer exists, so start-up seals the
    /// transfer (what was answered Success) instead of reopening it after a crash.
    pub async fn declare_association(
        &self,
        hospital: &str,
        decl: Declaration,
        association: &str,
    ) -> Result<TransferId, IngestError> {
        self.declare_as(hospital, decl, Some(association.to_owned()))
            .await
    }

    /// Records durably that a declaration of `hospital` was refused by the policy (an audit
    /// `refused` record naming the rule and, keyed-hashed, the patient, under transfer id
    /// `id`, which is never opened); the caller then answers the refusal.
    async fn record_refused_declaration(
        &self,
        hospital: &str,
        id: &TransferId,
        decl: &Declaration,
        r: &Refusal,
        detail: Option<String>,
    ) -> Result<(), IngestError> {
        metrics::counter!("baylink_transfers_total", "stage" => "declared", "outcome" => "refused")
            .increment(1);
        info!(hospital, rule = r.rule, reason = %r.reason, "declaration refused");
        // audit: the refusal is recorded before it is answered.
        self.audit(Event {
            rule: Some(r.rule.to_owned()),
            hospital: Some(hospital.to_owned()),
            detail,
            ..Event::declared(Kind::Refused, Some(id.to_string()), decl)
        })
        .await
    }

    /// Records durably that the DICOM door refused instance `name` because the policy
    /// refused its declaration (no consent for its patient, a category or purpose on the
    /// negative list), before any transfer of the association was opened or while one of
    /// another outcome is open: an audit `refused` record as the HTTPS door writes for a
    /// refused declaration, under a transfer id of its own that is never opened.
    pub async fn refuse_association_instance(
        &self,
        hospital: &str,
        decl: &Declaration,
        name: &str,
        r: &Refusal,
    ) -> Result<(), IngestError> {
        let detail = Some(format!("instance {name}: {}", r.reason));
        self.record_refused_declaration(hospital, &TransferId::new_v7(), decl, r, detail)
            .await
    }

    async fn declare_as(
        &self,
        hospital: &str,
        decl: Declaration,
        association: Option<String>,
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
                self.record_refused_declaration(hospital, &id, &decl, &r, None)
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
            association_end: None,
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
        let marker = association.clone();
        blocking(move || {
            d2.create()
                .map_err(internal("cannot create the transfer"))?;
            crate::transfer_dir::create_dir_durably(&d2.parts_dir()).map_err(internal("parts/"))?;
            crate::transfer_dir::create_dir_durably(&files_dir(&d2)).map_err(internal("files/"))?;
            let json = serde_json::to_vec_pretty(&decl)
                .map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&d2.declaration(), &json).map_err(internal("declaration.json"))?;
            let st = serde_json::to_vec_pretty(&status)
                .map_err(|e| IngestError::Internal(e.to_string()))?;
            write_atomic(&status_path(&d2), &st).map_err(internal("status.json"))?;
            if let Some(a) = marker {
                write_atomic(&association_path(&d2), a.as_bytes())
                    .map_err(internal("association"))?;
            }
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
                association,
                ended: Mutex::new(None),
            }),
        );
        metrics::counter!("baylink_transfers_total", "stage" => "declared", "outcome" => "ok")
            .increment(1);
        info!(transfer = %id, hospital, "transfer declared");
        Ok(id)
    }

    /// Drops an open (uncommitted) transfer and everything uploaded into it: for a door that
    /// learns the upload was abandoned with nothing in it to keep (a C-STORE association
    /// that ended before any instance was answered Success). Uploads still in progress in it
    /// fail.
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
        self.drop_stream(id);
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
            // In the order they were stored: the files streamed to the gateway lead the
            // manifest in the order they were announced.
            st.order
                .iter()
                .filter_map(|n| st.files.get(n).map(|s| (n.clone(), *s)))
                .collect()
        };
        if let Err(e) = self.check_size(hospital, id, &files).await {
            lock(&transfer.state).committed = false;
            if matches!(e, IngestError::Refused(_)) {
                // It can only grow: nothing streamed of it will be offered.
                self.drop_stream(id);
            }
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
        // audit: `sealed` is durable before `manifest.bin` makes the transfer sendable (the
        // seal appends it between staging the manifest and putting it in place); if it
        // cannot be recorded, the commit fails and nothing is sealed.
        let ended = lock(&self.inner.open).get(id).and_then(|t| *lock(&t.ended));
        let sealed = Event {
            hospital: self.owner(id),
            detail: ended.map(|end| format!("C-STORE association ended: {end}")),
            ..Event::declared(Kind::Sealed, Some(id.to_string()), &decl)
        };
        let log = self.inner.edge.audit();
        seal::sign_and_write_manifest(&dir, &manifest, self.inner.edge.keys(), log, sealed)
            .await
            .map_err(|e| IngestError::Internal(format!("{e:#}")))?;
        Ok(())
    }

    /// Seals the transfer of a C-STORE association that ended as `end`, whatever the end:
    /// every instance answered Success is in it (each is durable, with its digest record,
    /// before its Success). `end` goes into the status (`association_end`) and the `sealed`
    /// audit record. A transfer without instances is dropped instead. A seal that fails for
    /// a reason that may pass is retried in the background until it succeeds (and at the next
    /// start); the transfer is never dropped.
    pub async fn seal_association(
        &self,
        hospital: &str,
        id: &TransferId,
        end: AssociationEnd,
    ) -> Result<AssociationOutcome, IngestError> {
        let transfer = self.open_transfer(hospital, id)?;
        *lock(&transfer.ended) = Some(end);
        let files = lock(&transfer.state).files.len();
        if files == 0 {
            self.abandon(hospital, id).await?;
            return Ok(AssociationOutcome::Empty);
        }
        match self.try_seal_association(hospital, id, end).await {
            Ok(()) => Ok(AssociationOutcome::Sealed { files }),
            Err(e) if transient(&e) => {
                self.keep_sealing(hospital.to_owned(), *id, end);
                Ok(AssociationOutcome::Retrying {
                    error: e.to_string(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// One attempt: the association's end into the status, then the commit (seal, send).
    async fn try_seal_association(
        &self,
        hospital: &str,
        id: &TransferId,
        end: AssociationEnd,
    ) -> Result<(), IngestError> {
        self.set_association_end(id, end).await?;
        self.commit(hospital, id).await
    }

    /// Retries sealing an association's transfer with a growing pause (1 s doubling to
    /// [`SEAL_RETRY_MAX`]) until it is sealed or fails for good (then it stays open in the
    /// spool, and start-up tries again).
    fn keep_sealing(&self, hospital: String, id: TransferId, end: AssociationEnd) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_secs(1);
            loop {
                tokio::time::sleep(pause).await;
                match store.try_seal_association(&hospital, &id, end).await {
                    Ok(()) => {
                        info!(transfer = %id, "association transfer sealed on a retry");
                        return;
                    }
                    Err(e) if transient(&e) => {
                        pause = (pause * 2).min(SEAL_RETRY_MAX);
                        warn!(transfer = %id, error = %e, retry_in = ?pause, "association transfer not sealed yet; retrying");
                    }
                    Err(IngestError::Conflict(_)) => return, // sealed meanwhile
                    Err(e) => {
                        error!(transfer = %id, error = %e, "association transfer not sealed; it stays in the spool and the next start tries again");
                        store.drop_stream(&id);
                        return;
                    }
                }
            }
        });
    }

    /// At start-up, before the C-STORE SCP accepts associations: seals the transfers of
    /// associations a crash or stop left open (`association_end` `interrupted-by-restart`, or
    /// the end already recorded when the association had ended and its seal had failed),
    /// each with the instances that had been answered Success. Returns how many were sealed
    /// (or handed to the background retry).
    pub async fn seal_interrupted_associations(&self) -> usize {
        let due: Vec<(TransferId, String, AssociationEnd)> = lock(&self.inner.open)
            .iter()
            .filter(|(_, t)| t.association.is_some())
            .map(|(id, t)| {
                let end = lock(&t.ended).unwrap_or(AssociationEnd::InterruptedByRestart);
                (*id, t.hospital.clone(), end)
            })
            .collect();
        let mut sealed = 0;
        for (id, hospital, end) in due {
            match self.seal_association(&hospital, &id, end).await {
                Ok(AssociationOutcome::Sealed { files }) => {
                    sealed += 1;
                    info!(transfer = %id, files, association_end = %end, "C-STORE transfer left open by the last run: its acknowledged instances are sealed and sent");
                }
                Ok(AssociationOutcome::Empty) => {
                    info!(transfer = %id, association_end = %end, "C-STORE transfer left open by the last run had no acknowledged instance: dropped");
                }
                Ok(AssociationOutcome::Retrying { error }) => {
                    sealed += 1;
                    warn!(transfer = %id, error, association_end = %end, "C-STORE transfer left open by the last run: sealing failed, retrying in the background");
                }
                Err(e) => {
                    error!(transfer = %id, error = %e, association_end = %end, "C-STORE transfer left open by the last run is not sealed; it stays in the spool");
                }
            }
        }
        sealed
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
            // A C-STORE association's transfer holds instances answered Success: it is
            // sealed, never expired.
            let expire = t.association.is_none()
                && !st.committed
                && st.uploading.is_empty()
                && idle_for >= idle;
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
        self.drop_stream(id);
        let dir = self.dir(id);
        if let Err(e) =
            blocking(move || remove_uploads(&dir).map_err(internal("cannot remove"))).await
        {
            warn!(transfer = %id, error = %e, "expired transfer: files not removed (retried at the next start)");
        }
        Ok(())
    }
}

/// Removes what the hospital uploaded into a transfer that will never be sent: `data/`,
/// `parts/` and the digest records in `files/`. Missing directories are fine.
pub(super) fn remove_uploads(dir: &TransferDir) -> std::io::Result<()> {
    dir.remove_dirs(&[dir.data_dir(), dir.parts_dir(), files_dir(dir)])
}

/// Reloads an open transfer after a restart: finished files from their records; unfinished
/// uploads (parts/) removed.
pub(super) fn recover_open(dir: &TransferDir) -> Result<OpenTransfer, IngestError> {
    let hospital = std::fs::read_to_string(owner_path(dir)).map_err(internal("owner"))?;
    if let Ok(entries) = std::fs::read_dir(dir.parts_dir()) {
        for e in entries.filter_map(Result::ok) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut files = BTreeMap::new();
    // The names found below may be renames a killed process never made durable (the
    // directories are fsynced after both renames of an upload): made durable now, before a
    // seal can sign a manifest that lists them.
    for d in [dir.data_dir(), files_dir(dir)] {
        if d.exists() {
            crate::transfer_dir::sync_dir(&d)
                .map_err(internal("cannot fsync a spool directory"))?;
        }
    }
    // A file counts once its record and its payload are both in place: the record holds the
    // name, `data/` holds the payload under the name's key. A record still under its
    // temporary name (`.<key>.digests.tmp`, a crash before its rename) does not count: the
    // file was never acknowledged.
    if let Ok(entries) = std::fs::read_dir(files_dir(dir)) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().as_encoded_bytes().starts_with(b".") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            if let Ok(text) = std::fs::read(e.path())
                && let Ok(FileRecord {
                    name: Some(name),
                    size,
                    ..
                }) = serde_json::from_slice::<FileRecord>(&text)
                && dir.data_file(&name).exists()
            {
                files.insert(name, size);
            }
        }
    }
    // Records of an older version have no name; its `data/` held each file under the
    // hospital's name: adopt those (renamed to their keys) that have a record.
    let mut legacy = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.data_dir()) {
        for e in entries.filter_map(Result::ok) {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if files.contains_key(&name) {
                continue;
            }
            if let Ok(text) = std::fs::read(record_path(dir, &name))
                && let Ok(r) = serde_json::from_slice::<FileRecord>(&text)
                && r.name.is_none()
            {
                legacy.push((name, r.size));
            }
        }
    }
    if !legacy.is_empty() {
        dir.adopt_legacy_names(legacy.iter().map(|(n, _)| n.as_str()))
            .map_err(internal("cannot adopt the older layout"))?;
        files.extend(legacy);
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
            order: files.keys().cloned().collect(),
            files,
        }),
        // The idle clock starts again at a restart.
        touched: Mutex::new(Instant::now()),
        association: std::fs::read_to_string(association_path(dir)).ok(),
        // An association that ended before the restart, whose seal had failed, keeps its end.
        ended: Mutex::new(recorded_end(dir)),
    })
}

/// The `association_end` already in a transfer's status, if any.
fn recorded_end(dir: &TransferDir) -> Option<AssociationEnd> {
    let text = std::fs::read(status_path(dir)).ok()?;
    serde_json::from_slice::<TransferStatus>(&text)
        .ok()?
        .association_end
}
