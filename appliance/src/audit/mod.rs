//! The tamper-evident audit log of one appliance.
//!
//! Every step of a transfer that the appliance acknowledges (declared, refused, sealed,
//! sent, committed, receipted, delivered, failed) is first appended here, durably. Records
//! are the leaves of an RFC 6962 Merkle tree (hashing and proofs from
//! `baylink_net::merkle`); the HSM signs the tree head as a C2SP `tlog-checkpoint`
//! in a `signed-note` envelope ([`note`]) every `audit.checkpoint_every` records, every
//! `audit.checkpoint_interval` while serving, and at shutdown.
//!
//! Files in `audit.dir`:
//! - `records.log`: one line per record ([`record`]); append-only.
//! - `checkpoints.log`: one JSON line `{"note": "<signed note>"}` per checkpoint; append-only.
//! - `checkpoint`: the latest signed note, as plain text (replaced atomically), for tools.
//! - `lock`: `flock`ed around every append, so `send` and `serve` never interleave.
//!
//! Outside `audit.dir`, the HSM token holds the log's [`anchor`]: the latest checkpoint
//! signed and the latest witness cosignature stored. [`Log::open`] and every checkpoint
//! refuse a log that no longer holds it (rewound or rewritten), and `audit verify` checks it.
//!
//! Not in `audit.dir`: the secret key of the keyed patient hash (`audit.patient_key`), so a
//! copy of the directory given to an auditor does not carry it. A `patient.key` found in
//! `audit.dir` (its place before) stops the log from opening until it is moved out.
//!
//! [`verify`], [`prove`] and [`verify_proof`] need only the files and the public key.
//!
//! What this module does not do: keep records of patient ids or names (only an HMAC), or
//! trust anything it reads back without recomputing it.

pub mod anchor;
pub mod note;
pub mod settings;
pub use settings::LogSettings;
mod read;
pub mod record;
mod verify;
pub mod witness;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use baylink_hsm::HsmError;
use baylink_net::merkle::root_from_leaf_hashes;
use baylink_net::proto::Digest;
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use crate::transfer_dir::write_atomic;

pub use record::{Event, Kind, Record};
pub use verify::{
    MAX_PROOF_BYTES, MAX_PROOF_RECORDS, PROOF_VERSION, Proof, ProofSummary, ProvenRecord, Summary,
    prove, read_proof, verify, verify_kept, verify_proof, verify_proof_cosigned,
};

/// The records file in `audit.dir`.
pub const RECORDS_FILE: &str = "records.log";
/// The checkpoints file in `audit.dir`.
pub const CHECKPOINTS_FILE: &str = "checkpoints.log";
/// The latest checkpoint, plain signed note.
pub const LATEST_CHECKPOINT_FILE: &str = "checkpoint";
/// The patient-hash key's file name in `audit.dir` before it moved out: refused there now.
pub const PATIENT_KEY_FILE: &str = "patient.key";
const LOCK_FILE: &str = "lock";

/// Why the audit log could not be written, read or verified.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be read or written.
    #[error("audit log: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record is missing, edited, out of order or torn.
    #[error("record {seq} at byte {offset} of {RECORDS_FILE}: {reason}")]
    BadRecord {
        /// The sequence number expected at that position.
        seq: u64,
        /// Byte offset of the line in the records file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint is torn, badly signed, or disagrees with the records or another one.
    #[error("checkpoint {index} at byte {offset} of {CHECKPOINTS_FILE}: {reason}")]
    BadCheckpoint {
        /// 1-based position in the checkpoints file.
        index: usize,
        /// Byte offset of its line.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A stored witness cosignature is torn, does not verify, or cosigns another history.
    #[error(
        "cosignature {index} at byte {offset} of {}: {reason}",
        witness::COSIGNATURES_FILE
    )]
    BadCosignature {
        /// 1-based position in the cosignatures file.
        index: usize,
        /// Byte offset of its line.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log holds fewer records than a checkpoint kept outside it (in the HSM, or by the
    /// peer) covers: it was truncated, with its checkpoints, to an earlier state.
    #[error("{RECORDS_FILE} holds {records} records but {what} covers {size}: the log was rewound")]
    Rewound {
        /// The kept checkpoint ("the HSM-anchored checkpoint").
        what: String,
        /// Records in the log.
        records: u64,
        /// Records the kept checkpoint covers.
        size: u64,
    },
    /// The log's own latest checkpoint is older than one kept outside it.
    #[error(
        "the latest checkpoint in {CHECKPOINTS_FILE} covers {signed} records but {what} covers \
         {size}: checkpoints were removed"
    )]
    CheckpointsRemoved {
        /// The kept checkpoint.
        what: String,
        /// Records the log's latest checkpoint covers (0 without any).
        signed: u64,
        /// Records the kept checkpoint covers.
        size: u64,
    },
    /// The log's first records are not the ones a kept checkpoint covers.
    #[error(
        "{what} covers {size} records, but records 0..{size} of {RECORDS_FILE} have another \
         root: the log was rewritten"
    )]
    Rewritten {
        /// The kept checkpoint.
        what: String,
        /// Records it covers.
        size: u64,
    },
    /// A kept checkpoint or the HSM anchor is unreadable, or not signed by the appliance key.
    #[error("{what}: {reason}")]
    BadAnchor {
        /// Which one.
        what: String,
        /// Why.
        reason: String,
    },
    /// The HSM could not sign a checkpoint.
    #[error("audit checkpoint: {0}")]
    Hsm(#[from] HsmError),
    /// A proof file does not prove what it claims.
    #[error("proof: {0}")]
    BadProof(String),
    /// Nothing to prove (unknown transfer, or not yet covered by a checkpoint).
    #[error("{0}")]
    NotFound(String),
    /// The patient-hash key file is unusable.
    #[error("audit patient key {path}: {reason}")]
    PatientKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A record would exceed the line limit.
    #[error("audit record of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.to_owned();
    move |source| AuditError::Io { what, path, source }
}

/// Appends `line` to the append-only file `path` (created 0600) and makes it durable
/// (`fdatasync`) before returning: every audit file grows this way. The append that creates
/// the file also fsyncs its directory, so the file's name is as durable as its first line.
fn append_durably(path: &Path, line: &[u8]) -> Result<(), AuditError> {
    let open = |create_new: bool| {
        OpenOptions::new()
            .append(true)
            .create(!create_new)
            .create_new(create_new)
            .mode(0o600)
            .open(path)
    };
    let (mut f, created) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            (open(false).map_err(io("cannot open", path))?, false)
        }
        Err(e) => return Err(io("cannot create", path)(e)),
    };
    f.write_all(line).map_err(io("cannot write", path))?;
    f.sync_data().map_err(io("cannot fdatasync", path))?;
    if created {
        let dir = path.parent().unwrap_or(Path::new("."));
        crate::transfer_dir::sync_dir(dir).map_err(io("cannot fsync", dir))?;
    }
    Ok(())
}

/// An open audit log; cheap to clone, safe to share between tasks and processes.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.inner.dir)
            .field("origin", &self.inner.origin)
            .finish_non_exhaustive()
    }
}

struct Inner {
    dir: PathBuf,
    appliance: String,
    origin: String,
    signer: crate::signing::LogKey,
    patient_key: hmac::Key,
    every: u64,
    state: Mutex<State>,
}

/// What this process has read of the files (other processes may have appended since).
#[derive(Default)]
struct State {
    leaves: Vec<Digest>,
    records_len: u64,
    checkpoints_len: u64,
    checkpoint_size: u64,
    /// The latest complete line of `checkpoints.log` (its signed note).
    latest_note: Option<String>,
}

impl Log {
    /// Opens (creating if needed) the log, repairing a torn tail left by a crash mid-append.
    /// Fails if a complete record or checkpoint line is damaged: the log was tampered with,
    /// and the appliance must not write on top of it.
    pub fn open(
        settings: &LogSettings,
        signer: impl Into<crate::signing::LogKey>,
    ) -> Result<Log, AuditError> {
        let dir = &settings.dir;
        crate::transfer_dir::create_dir_durably(dir).map_err(io("cannot create", dir))?;
        refuse_key_in_dir(dir, &settings.patient_key)?;
        let key = load_or_create_key(&settings.patient_key)?;
        let log = Log {
            inner: Arc::new(Inner {
                dir: dir.clone(),
                appliance: settings.appliance_id.clone(),
                origin: note::origin(&settings.appliance_id),
                signer: signer.into(),
                patient_key: hmac::Key::new(hmac::HMAC_SHA256, &key),
                every: settings.checkpoint_every.max(1),
                state: Mutex::new(State::default()),
            }),
        };
        log.locked(|inner, st| inner.check_anchor(st).map(drop))?;
        Ok(log)
    }

    /// The log's origin line (and checkpoint key name).
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends `event` durably (written and `fdatasync`ed) and returns its sequence number;
    /// signs a checkpoint when the log reaches a multiple of `audit.checkpoint_every`.
    /// Blocking: use [`Log::append`] from async code.
    pub fn append_blocking(&self, event: Event) -> Result<u64, AuditError> {
        self.locked(|inner, st| {
            let record = inner.record(event, st.leaves.len() as u64);
            let (line, leaf) = record.line();
            if line.len() > record::MAX_LINE {
                return Err(AuditError::TooLarge {
                    len: line.len(),
                    limit: record::MAX_LINE,
                });
            }
            append_durably(&inner.dir.join(RECORDS_FILE), &line)?;
            st.leaves.push(leaf);
            st.records_len += line.len() as u64;
            metrics::counter!("baylink_audit_records_total", "kind" => record.kind.to_string())
                .increment(1);
            if record.kind == Kind::Refused {
                crate::telemetry::refusal(record.rule.as_deref().unwrap_or("unknown"));
            }
            if (st.leaves.len() as u64).is_multiple_of(inner.every)
                && let Err(e) = inner.checkpoint_locked(st)
            {
                // The record itself is durable; the next checkpoint covers it.
                warn!(error = %e, "audit checkpoint failed");
                metrics::counter!("baylink_audit_checkpoint_failures_total").increment(1);
            }
            Ok(record.seq)
        })
    }

    /// [`Log::append_blocking`] on a blocking thread.
    pub async fn append(&self, event: Event) -> Result<u64, AuditError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append_blocking(event))
            .await
            .map_err(|e| AuditError::Io {
                what: "append task failed",
                path: self.inner.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Signs a checkpoint of the whole log now, unless the latest one already covers it.
    /// Returns the tree size signed, or `None` when there was nothing new. Blocking.
    pub fn checkpoint_blocking(&self) -> Result<Option<u64>, AuditError> {
        self.locked(|inner, st| inner.checkpoint_locked(st))
    }

    /// [`Log::checkpoint_blocking`] on a blocking thread.
    pub async fn checkpoint(&self) -> Result<Option<u64>, AuditError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.checkpoint_blocking())
            .await
            .map_err(|e| AuditError::Io {
                what: "checkpoint task failed",
                path: self.inner.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Whether the log holds a record of `kind` for `transfer`. Reads the whole records
    /// file: for start-up recovery, which must know whether a crash came before or after a
    /// step's record was appended (see `seal::finish_interrupted_seal`). Blocking.
    pub fn has_record(&self, transfer: &str, kind: Kind) -> Result<bool, AuditError> {
        self.locked(|inner, st| {
            let path = inner.dir.join(RECORDS_FILE);
            let mut found = false;
            let mut seq = 0u64;
            // `catch_up` has just read and checked every complete line under this lock.
            read_tail(&path, 0, |offset, line| {
                if offset >= st.records_len {
                    return Ok(());
                }
                let (record, _, _) =
                    record::parse_line(line).map_err(|reason| AuditError::BadRecord {
                        seq,
                        offset,
                        reason,
                    })?;
                seq += 1;
                found |= record.kind == kind && record.transfer.as_deref() == Some(transfer);
                Ok(())
            })?;
            Ok(found)
        })
    }

    /// The keyed hash that stands for a patient id in records (hex HMAC-SHA256).
    pub fn patient_ref(&self, patient_id: &str) -> String {
        hex::encode(hmac::sign(&self.inner.patient_key, patient_id.as_bytes()))
    }

    /// Runs `f` holding the log's `flock`, after catching up with what other processes
    /// appended (and repairing a tail torn by one that crashed).
    fn locked<T>(
        &self,
        f: impl FnOnce(&Inner, &mut State) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let inner = &*self.inner;
        let mut st = inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let lock_path = inner.dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| io("cannot lock", &lock_path)(e.into()))?;
        inner.catch_up(&mut st)?;
        f(inner, &mut st)
    }
}

impl Inner {
    fn record(&self, e: Event, seq: u64) -> Record {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let patient = e
            .patient_id
            .as_deref()
            .map(|p| hex::encode(hmac::sign(&self.patient_key, p.as_bytes())));
        // No text field may carry the raw patient id either (a consent reference or an error
        // text may embed it): each occurrence becomes the keyed hash.
        let scrub = |text: Option<String>| -> Option<String> {
            match (text, &e.patient_id, &patient) {
                (Some(t), Some(id), Some(h)) if !id.is_empty() => Some(t.replace(id.as_str(), h)),
                (t, _, _) => t,
            }
        };
        let detail = scrub(e.detail).map(|d| record::cut_detail(&d));
        let (hospital, peer, category, purpose, destination, consent, rule) = (
            scrub(e.hospital),
            scrub(e.peer),
            scrub(e.category),
            scrub(e.purpose),
            scrub(e.destination),
            scrub(e.consent_ref),
            scrub(e.rule),
        );
        Record {
            v: record::RECORD_VERSION,
            seq,
            time_ms,
            kind: e.kind,
            appliance: self.appliance.clone(),
            transfer: e.transfer,
            hospital,
            peer,
            patient,
            category,
            purpose,
            destination,
            consent,
            declaration_digest: e.declaration_digest.map(hex::encode),
            merkle_root: e.merkle_root.map(hex::encode),
            manifest_digest: e.manifest_digest.map(hex::encode),
            rule,
            detail,
        }
    }

    /// Reads what was appended since this process last looked; truncates a torn tail.
    fn catch_up(&self, st: &mut State) -> Result<(), AuditError> {
        let path = self.dir.join(RECORDS_FILE);
        let leaves = &mut st.leaves;
        st.records_len = read_tail(&path, st.records_len, |offset, line| {
            let (record, _, leaf) =
                record::parse_line(line).map_err(|reason| AuditError::BadRecord {
                    seq: leaves.len() as u64,
                    offset,
                    reason,
                })?;
            if record.seq != leaves.len() as u64 {
                return Err(AuditError::BadRecord {
                    seq: leaves.len() as u64,
                    offset,
                    reason: format!("has seq {} (out of order)", record.seq),
                });
            }
            leaves.push(leaf);
            Ok(())
        })?;
        let path = self.dir.join(CHECKPOINTS_FILE);
        let mut index = 0usize;
        let mut size = st.checkpoint_size;
        let mut latest = None;
        st.checkpoints_len = read_tail(&path, st.checkpoints_len, |offset, line| {
            index += 1;
            let note =
                verify::checkpoint_note(line).map_err(|reason| AuditError::BadCheckpoint {
                    index,
                    offset,
                    reason,
                })?;
            let (text, _) =
                note::split_note(&note).map_err(|reason| AuditError::BadCheckpoint {
                    index,
                    offset,
                    reason,
                })?;
            let cp =
                note::Checkpoint::parse_body(text).map_err(|reason| AuditError::BadCheckpoint {
                    index,
                    offset,
                    reason,
                })?;
            size = size.max(cp.size);
            latest = Some(note);
            Ok(())
        })?;
        st.checkpoint_size = size;
        if latest.is_some() {
            st.latest_note = latest;
        }
        Ok(())
    }

    /// Checks the log against its HSM anchor (every checkpoint kept there must still be in
    /// the log: same root, no more records than it holds) and returns the anchor. A log
    /// checkpointed before the anchor existed gets one now, for its latest checkpoint.
    fn check_anchor(&self, st: &State) -> Result<Option<anchor::Anchor>, AuditError> {
        let token = self.signer.token();
        let key = self.signer.public_key();
        let Some(held) = anchor::read(token, &self.origin)? else {
            let Some(latest) = &st.latest_note else {
                return Ok(None);
            };
            let first = anchor::Anchor {
                version: anchor::ANCHOR_VERSION,
                checkpoint: latest.clone(),
                cosigned: None,
            };
            anchor::check_kept(
                "the latest checkpoint",
                latest,
                key,
                Some(&self.origin),
                &st.leaves,
                st.checkpoint_size,
            )?;
            anchor::write(token, &self.origin, &first)?;
            info!(
                size = st.checkpoint_size,
                "audit log anchored in the HSM (it had none)"
            );
            return Ok(Some(first));
        };
        for (what, note) in held.kept() {
            anchor::check_kept(
                what,
                note,
                key,
                Some(&self.origin),
                &st.leaves,
                st.checkpoint_size,
            )?;
        }
        Ok(Some(held))
    }

    fn checkpoint_locked(&self, st: &mut State) -> Result<Option<u64>, AuditError> {
        let size = st.leaves.len() as u64;
        if size == 0 || size <= st.checkpoint_size {
            return Ok(None);
        }
        // Never sign on top of a log that lost what the HSM says was signed before.
        let held = self.check_anchor(st)?;
        let cp = note::Checkpoint {
            origin: self.origin.clone(),
            size,
            root: root_from_leaf_hashes(&st.leaves),
            time_ms: Some(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
            ),
        };
        let body = cp.body();
        // Signed-note signs the note text itself: exactly these bytes go to the HSM.
        let sig = self.signer.sign(body.as_bytes())?;
        let text = note::signed_note(&body, &self.origin, self.signer.public_key(), &sig.0);
        let mut line = serde_json::to_vec(&serde_json::json!({ "note": text }))
            .expect("a string always serialises");
        line.push(b'\n');
        append_durably(&self.dir.join(CHECKPOINTS_FILE), &line)?;
        st.checkpoints_len += line.len() as u64;
        st.checkpoint_size = size;
        st.latest_note = Some(text.clone());
        // The anchor moves only after the checkpoint is durable in the log: it never covers
        // more than the files hold.
        let anchor = anchor::Anchor {
            version: anchor::ANCHOR_VERSION,
            checkpoint: text.clone(),
            cosigned: held.and_then(|a| a.cosigned),
        };
        anchor::write(self.signer.token(), &self.origin, &anchor)?;
        let latest = self.dir.join(LATEST_CHECKPOINT_FILE);
        write_atomic(&latest, text.as_bytes()).map_err(io("cannot write", &latest))?;
        metrics::counter!("baylink_audit_checkpoints_total").increment(1);
        info!(size, root = %hex::encode(cp.root), "audit checkpoint signed");
        Ok(Some(size))
    }
}

/// Reads complete lines of `path` from byte `from` on, calling `line(offset, bytes)` for
/// each (without its newline); truncates an incomplete last line (a crash mid-append).
/// Returns the new length consumed. Call only under the log's lock.
fn read_tail(
    path: &Path,
    from: u64,
    mut line: impl FnMut(u64, &[u8]) -> Result<(), AuditError>,
) -> Result<u64, AuditError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("cannot open", path)(e)),
    };
    let len = file.metadata().map_err(io("cannot stat", path))?.len();
    if len < from {
        // Only a torn, unacknowledged tail is ever cut; acknowledged lines never go away.
        return Err(AuditError::Io {
            what: "acknowledged lines were removed from",
            path: path.to_owned(),
            source: std::io::Error::other(format!("{len} bytes left of {from} already read")),
        });
    }
    let mut r = BufReader::new(file);
    r.seek(SeekFrom::Start(from))
        .map_err(io("cannot seek", path))?;
    let mut offset = from;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut r)
            .take(record::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io("cannot read", path))?;
        if n == 0 {
            return Ok(offset);
        }
        if buf.last() == Some(&b'\n') {
            line(offset, &buf[..buf.len() - 1])?;
            offset += n as u64;
        } else if n > record::MAX_LINE {
            return Err(AuditError::Io {
                what: "a line longer than the limit in",
                path: path.to_owned(),
                source: std::io::Error::other(format!("at byte {offset}")),
            });
        } else {
            // Torn tail: the writer died before the newline (and before acknowledging).
            warn!(
                path = %path.display(),
                offset,
                bytes = n,
                "audit log: removing a torn tail left by a crash mid-append"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io("cannot open", path))?;
            f.set_len(offset).map_err(io("cannot truncate", path))?;
            f.sync_all().map_err(io("cannot fsync", path))?;
            metrics::counter!("baylink_audit_repairs_total").increment(1);
            return Ok(offset);
        }
    }
}

/// Refuses a patient key in the audit directory: `<dir>/patient.key` (where it was kept
/// before it moved out, see [`PATIENT_KEY_FILE`]) or `key` itself, symbolic links resolved.
fn refuse_key_in_dir(dir: &Path, key: &Path) -> Result<(), AuditError> {
    let legacy = dir.join(PATIENT_KEY_FILE);
    if legacy.exists() {
        let how = if key.exists() {
            format!("{} already holds a key: remove the old one", key.display())
        } else {
            format!("mv {} {}", legacy.display(), key.display())
        };
        return Err(AuditError::PatientKey {
            path: legacy,
            reason: format!(
                "a patient key in audit.dir would go to whoever is given a copy of the audit \
                 directory; it belongs at audit.patient_key {} ({how})",
                key.display()
            ),
        });
    }
    let dir = dir.canonicalize().map_err(io("cannot resolve", dir))?;
    let parent = key.parent().and_then(|p| p.canonicalize().ok());
    if parent.is_some_and(|p| p.starts_with(&dir)) {
        return Err(AuditError::PatientKey {
            path: key.to_owned(),
            reason: format!(
                "inside audit.dir {} (through a symbolic link): whoever is given a copy of \
                 the audit directory would hold it; move it out",
                dir.display()
            ),
        });
    }
    Ok(())
}

/// Reads the patient-hash key, or creates it (32 random bytes, mode 0600, its directory
/// 0700 if missing) without ever replacing one another process created first.
fn load_or_create_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    let bad = |reason: String| AuditError::PatientKey {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read(path) {
        Ok(k) if k.len() >= 32 && k.len() <= 1024 => return Ok(k),
        Ok(k) => return Err(bad(format!("{} bytes; need 32 to 1024", k.len()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(e.to_string())),
    }
    let mut key = vec![0u8; 32];
    aws_lc_rs::rand::fill(&mut key).map_err(|_| bad("no randomness".into()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| bad(format!("cannot create its directory: {e}")))?;
    let tmp = dir.join(format!(".patient.key.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| bad(e.to_string()))?;
    f.write_all(&key).map_err(|e| bad(e.to_string()))?;
    f.sync_all().map_err(|e| bad(e.to_string()))?;
    // hard_link never replaces: whoever links first wins, the other reads the winner's key.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            crate::transfer_dir::sync_dir(dir).map_err(|e| bad(e.to_string()))?;
            info!(path = %path.display(), "created the audit patient-hash key");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::read(path).map_err(|e| bad(e.to_string()))
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
