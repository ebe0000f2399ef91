//! The on-disk record of one transfer in an appliance's spool: `spool/<id>/`.
//!
//! ```text
//! spool/<id>/declaration.json   edge: what the sender declared
//! spool/<id>/manifest.bin       canonical manifest bytes (what the edge's HSM signed)
//! spool/<id>/manifest.pending   edge: the same bytes, staged until the `sealed` record is
//!                               durable (then renamed to manifest.bin; see `seal`)
//! spool/<id>/manifest.sig       the edge's signature over it
//! spool/<id>/manifest.json      the same manifest for people
//! spool/<id>/data/<key>         edge: sealed payload; gateway: committed payload
//! spool/<id>/data/<key>.part    gateway: payload being received
//! spool/<id>/state              gateway: chunks that are verified and durable (versioned)
//! spool/<id>/receipt.bin|.sig   gateway: the commit; edge: the verified receipt
//! spool/<id>/delivered          gateway: delivery finished
//! spool/<id>/undeliverable      gateway: the store refused it (the reason)
//! spool/<id>/notice.bin|.sig    gateway: the signed delivery notice; edge: the verified one
//! spool/<id>/notice.pending     gateway: the notice is owed to the edge (until it acknowledges)
//! spool/<id>/pruned             the payload (`data/`) was removed under `spool.retain`
//! spool/<id>/parts/             edge: hospital uploads in progress (see `ingest::store`)
//! spool/<id>/owner              edge: the hospital that declared it through the API
//! spool/<id>/expired            edge: an upload closed by `ingest.open_timeout` (the reason)
//! ```
//!
//! `<key>` is [`payload_key`] of the file's name: 64 hex digits the appliance chooses (the
//! SHA-256 of the name), never the hospital's name itself, so every name the protocol
//! accepts (up to 255 bytes, any UTF-8) is storable, `.part` included, on any file system
//! with the usual 255-byte name limit. The hospital's name stays in the signed manifest (and
//! is what delivery writes). A spool written by a version that stored payload under the
//! hospital's name is adopted on first use ([`TransferDir::adopt_legacy_names`]).
//!
//! Small records are written atomically (temporary file, fsync, rename, directory fsync), so a
//! crash leaves either the old record or the new one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use baylink_net::proto::{ChunkSet, Limits, Manifest, TransferId};

/// Paths of one transfer's records.
#[derive(Debug, Clone)]
pub struct TransferDir {
    root: PathBuf,
}

/// A state file that cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Could not read it.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Read it, but it is not a valid state file for this transfer.
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

const STATE_MAGIC: &[u8; 8] = b"BLSTATE\0";
const STATE_VERSION: u16 = 1;

impl TransferDir {
    /// The directory of transfer `id` under `spool`.
    pub fn new(spool: &Path, id: &TransferId) -> TransferDir {
        TransferDir {
            root: spool.join(id.to_string()),
        }
    }

    /// `spool/<id>`.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `declaration.json`.
    pub fn declaration(&self) -> PathBuf {
        self.root.join("declaration.json")
    }
    /// `manifest.bin`.
    pub fn manifest_bin(&self) -> PathBuf {
        self.root.join("manifest.bin")
    }
    /// `manifest.pending`: the edge's signed manifest before its `sealed` audit record is
    /// durable (renamed to `manifest.bin` after it).
    pub fn manifest_pending(&self) -> PathBuf {
        self.root.join("manifest.pending")
    }
    /// `manifest.sig`.
    pub fn manifest_sig(&self) -> PathBuf {
        self.root.join("manifest.sig")
    }
    /// `manifest.json`.
    pub fn manifest_json(&self) -> PathBuf {
        self.root.join("manifest.json")
    }
    /// `data/`.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    /// `data/<key>`: where the payload of the manifest's file `name` is stored
    /// ([`payload_key`]).
    pub fn data_file(&self, name: &str) -> PathBuf {
        self.data_dir().join(payload_key(name))
    }
    /// `data/<key>.part`: the gateway's payload of file `name` while it is received.
    pub fn part_file(&self, name: &str) -> PathBuf {
        self.data_dir().join(format!("{}.part", payload_key(name)))
    }

    /// Adopts payload stored by an older version under the hospital's own names
    /// (`data/<name>`, `data/<name>.part`): each is renamed to its key ([`Self::data_file`],
    /// [`Self::part_file`]) unless the keyed file already exists, and the directory is
    /// fsynced. Idempotent, and safe to interrupt (each rename is atomic; a rerun finishes
    /// the rest). Returns how many files were renamed. A transfer in flight during an upgrade
    /// therefore resumes where it stopped, on either side.
    pub fn adopt_legacy_names<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<usize> {
        let data = self.data_dir();
        if !data.is_dir() {
            return Ok(0);
        }
        let mut renamed = 0;
        for name in names {
            let pairs = [
                (data.join(name), self.data_file(name)),
                (data.join(format!("{name}.part")), self.part_file(name)),
            ];
            for (legacy, keyed) in pairs {
                // `symlink_metadata`: a name the old version could not store (over NAME_MAX)
                // simply is not there.
                if legacy == keyed || fs::symlink_metadata(&legacy).is_err() || keyed.exists() {
                    continue;
                }
                fs::rename(&legacy, &keyed).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot adopt {} as {}: {e}",
                            legacy.display(),
                            keyed.display()
                        ),
                    )
                })?;
                renamed += 1;
            }
        }
        if renamed > 0 {
            sync_dir(&data)?;
        }
        Ok(renamed)
    }

    /// [`Self::adopt_legacy_names`] for the files of this transfer's manifest (none without a
    /// `manifest.bin`).
    pub fn adopt_legacy_layout(&self) -> anyhow::Result<usize> {
        if !self.manifest_bin().exists() || !self.data_dir().is_dir() {
            return Ok(0);
        }
        let manifest = self.manifest()?;
        Ok(self.adopt_legacy_names(manifest.files.iter().map(|f| f.name.as_str()))?)
    }
    /// `state`.
    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }
    /// `receipt.bin`.
    pub fn receipt_bin(&self) -> PathBuf {
        self.root.join("receipt.bin")
    }
    /// `receipt.sig`.
    pub fn receipt_sig(&self) -> PathBuf {
        self.root.join("receipt.sig")
    }
    /// `delivered`.
    pub fn delivered(&self) -> PathBuf {
        self.root.join("delivered")
    }
    /// `undeliverable`: the store refused the transfer; holds the reason.
    pub fn undeliverable(&self) -> PathBuf {
        self.root.join("undeliverable")
    }
    /// `stow.acked`: the files of a STOW-RS delivery that the store has already confirmed,
    /// batch by batch, so that a retry or a restart does not send them again.
    pub fn stow_acked(&self) -> PathBuf {
        self.root.join("stow.acked")
    }

    /// `notice.bin`: the delivery notice (gateway: signed here; edge: verified and stored).
    pub fn notice_bin(&self) -> PathBuf {
        self.root.join("notice.bin")
    }
    /// `notice.sig`: the gateway's signature over `notice.bin`.
    pub fn notice_sig(&self) -> PathBuf {
        self.root.join("notice.sig")
    }
    /// `notice.pending` (gateway): the delivery notice is owed to the edge; removed once the
    /// edge acknowledged it.
    pub fn notice_pending(&self) -> PathBuf {
        self.root.join("notice.pending")
    }
    /// Whether the delivery notice (both files) is stored.
    pub fn has_notice(&self) -> bool {
        self.notice_sig().exists() && self.notice_bin().exists()
    }

    /// `pruned`: the payload was removed under `spool.retain`; holds the reason.
    pub fn pruned(&self) -> PathBuf {
        self.root.join("pruned")
    }

    /// `parts/`: hospital uploads in progress (edge).
    pub fn parts_dir(&self) -> PathBuf {
        self.root.join("parts")
    }

    /// `owner`: the hospital that declared the transfer through the hospital API (edge).
    pub fn owner(&self) -> PathBuf {
        self.root.join("owner")
    }

    /// Whether the transfer was opened through the hospital API (its `owner` exists).
    pub fn is_ingest_transfer(&self) -> bool {
        self.owner().exists()
    }

    /// `expired`: a hospital upload closed by `ingest.open_timeout` (edge); holds the reason.
    pub fn expired(&self) -> PathBuf {
        self.root.join("expired")
    }

    /// Removes each of `dirs` (directories inside this transfer's) with everything in it, a
    /// missing one being fine, then fsyncs the transfer's directory: the removal is durable.
    pub fn remove_dirs(&self, dirs: &[PathBuf]) -> io::Result<()> {
        for path in dirs {
            match fs::remove_dir_all(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot remove {}: {e}", path.display()),
                    ));
                }
                _ => {}
            }
        }
        sync_dir(&self.root)
    }

    /// Reads and decodes `manifest.bin` (default limits: the manifest was checked when it was
    /// written).
    pub fn manifest(&self) -> anyhow::Result<Manifest> {
        use anyhow::Context;
        let bytes = fs::read(self.manifest_bin())
            .with_context(|| format!("cannot read {}", self.manifest_bin().display()))?;
        Manifest::from_bytes(&bytes, &Limits::default())
            .with_context(|| format!("{} is not a valid manifest", self.manifest_bin().display()))
    }

    /// Creates `spool/<id>/data/` (and the spool if it is missing), durably.
    pub fn create(&self) -> io::Result<()> {
        create_dir_durably(&self.data_dir())
    }

    /// Whether the receipt (the commit on the gateway, the confirmation on the edge) exists.
    pub fn has_receipt(&self) -> bool {
        self.receipt_sig().exists() && self.receipt_bin().exists()
    }

    /// Loads the durable chunk set; a missing file means nothing is durable yet.
    pub fn load_state(&self, chunk_count: u32) -> Result<ChunkSet, StateError> {
        let path = self.state();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ChunkSet::new(chunk_count)),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let corrupt = |reason| StateError::Corrupt {
            path: path.clone(),
            reason,
        };
        if bytes.len() < 8 + 2 + 4 + 32 {
            return Err(corrupt("too short"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body).as_ref() != digest {
            return Err(corrupt("checksum does not match"));
        }
        if &body[..8] != STATE_MAGIC {
            return Err(corrupt("not a baylink state file"));
        }
        let version = u16::from_be_bytes([body[8], body[9]]);
        if version != STATE_VERSION {
            return Err(corrupt("unknown version"));
        }
        let count = u32::from_be_bytes([body[10], body[11], body[12], body[13]]);
        if count != chunk_count {
            return Err(corrupt("chunk count differs from the manifest"));
        }
        ChunkSet::from_bytes(chunk_count, &body[14..]).map_err(|_| corrupt("bad chunk bitmap"))
    }

    /// Stores the durable chunk set atomically.
    pub fn store_state(&self, set: &ChunkSet) -> io::Result<()> {
        let bitmap = set.to_bytes();
        let mut out = Vec::with_capacity(14 + bitmap.len() + 32);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_be_bytes());
        out.extend_from_slice(&set.len().to_be_bytes());
        out.extend_from_slice(&bitmap);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &out);
        out.extend_from_slice(digest.as_ref());
        write_atomic(&self.state(), &out)
    }
}

/// The name under which the payload of the manifest's file `name` is stored in `data/`: the
/// SHA-256 of the name, 64 lowercase hex digits. Chosen by the appliance, so its length is
/// fixed whatever the hospital named the file (a 255-byte name plus `.part` would be over
/// the file system's limit), and it can never be a path, a dot file or a `.part` of another.
pub fn payload_key(name: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes());
    hex::encode(d.as_ref())
}

/// The transfers in a spool whose directory passes `keep`, oldest first (transfer ids are
/// UUIDv7, so their text sorts by creation time). Entries that are not transfer ids are
/// ignored; an unreadable spool lists nothing.
pub fn list(spool: &Path, keep: impl Fn(&TransferDir) -> bool) -> Vec<TransferId> {
    let Ok(entries) = fs::read_dir(spool) else {
        return Vec::new();
    };
    let mut ids: Vec<TransferId> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<TransferId>().ok())
        .filter(|id| keep(&TransferDir::new(spool, id)))
        .collect();
    ids.sort_by_key(|id| id.to_string());
    ids
}

/// Writes `bytes` to `path` so that a crash leaves the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = write_staged(path, bytes)?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The first half of [`write_atomic`]: writes `bytes` to a temporary name beside `path`
/// (`.<name>.tmp`) and fsyncs it. Renaming it to `path` and fsyncing the directory is the
/// caller's (several such renames can share one directory fsync).
pub fn write_staged(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(tmp)
}

/// fsyncs a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, durably: the new directory and the parent of each
/// directory it created are fsynced, so a crash cannot take back a directory (or the files
/// later made durable inside it) that this returned for. An existing directory is fsynced
/// too: the caller may have created it a moment ago without doing so.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    // The ancestors that do not exist yet, deepest first.
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.as_os_str().is_empty() && !at.exists() {
        missing.push(at.to_owned());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
    let synced = |d: &Path| {
        sync_dir(d)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot fsync {}: {e}", d.display())))
    };
    synced(dir)?;
    for created in &missing {
        match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => synced(p)?,
            _ => synced(Path::new("."))?,
        }
    }
    Ok(())
}

/// Sum of the file sizes under `path` (0 when it does not exist).
pub(crate) fn tree_size(path: &Path) -> io::Result<u64> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += tree_size(&entry?.path())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dir_durably_creates_missing_parents_and_accepts_an_existing_dir() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        create_dir_durably(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durably(&deep).unwrap();
        let file = root.path().join("file");
        fs::write(&file, b"x").unwrap();
        let e = create_dir_durably(&file.join("sub")).unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
    }

    #[test]
    fn payload_is_stored_under_a_key_of_fixed_length_whatever_the_name() {
        let spool = tempfile::tempdir().unwrap();
        let dir = TransferDir::new(spool.path(), &TransferId::new_v7());
        dir.create().unwrap();
        // 255 bytes: 85 three-byte characters. The `.part` of it is over NAME_MAX as a name.
        let long = "\u{8a3a}".repeat(85);
        assert_eq!(long.len(), 255);
        for name in [long.as_str(), "a.dcm", "a.dcm.part", ".hidden"] {
            let (fin, part) = (dir.data_file(name), dir.part_file(name));
            assert_eq!(fin.parent().unwrap(), dir.data_dir());
            assert_eq!(fin.file_name().unwrap().len(), 64, "{name}");
            assert_eq!(part.file_name().unwrap().len(), 69, "{name}");
            fs::write(&part, b"x").unwrap();
            fs::rename(&part, &fin).unwrap();
        }
        assert_ne!(dir.data_file("a.dcm.part"), dir.part_file("a.dcm"));
        assert_eq!(fs::read_dir(dir.data_dir()).unwrap().count(), 4);
    }

    #[test]
    fn a_spool_of_the_old_layout_is_adopted_once() {
        let spool = tempfile::tempdir().unwrap();
        let dir = TransferDir::new(spool.path(), &TransferId::new_v7());
        dir.create().unwrap();
        // The old layout: final payload and a `.part` under the hospital's names.
        fs::write(dir.data_dir().join("done.dcm"), b"final").unwrap();
        fs::write(dir.data_dir().join("half.dcm.part"), b"half").unwrap();
        let names = ["done.dcm", "half.dcm", "missing.dcm"];
        assert_eq!(dir.adopt_legacy_names(names).unwrap(), 2);
        assert_eq!(fs::read(dir.data_file("done.dcm")).unwrap(), b"final");
        assert_eq!(fs::read(dir.part_file("half.dcm")).unwrap(), b"half");
        assert!(!dir.data_dir().join("done.dcm").exists());
        // Again: nothing left to do, and a keyed file is never overwritten.
        fs::write(dir.data_dir().join("done.dcm"), b"stale").unwrap();
        assert_eq!(dir.adopt_legacy_names(names).unwrap(), 0);
        assert_eq!(fs::read(dir.data_file("done.dcm")).unwrap(), b"final");
    }

    #[test]
    fn state_roundtrip_and_corruption_is_named() {
        let spool = tempfile::tempdir().unwrap();
        let id = TransferId::new_v7();
        let dir = TransferDir::new(spool.path(), &id);
        dir.create().unwrap();
        assert_eq!(dir.load_state(10).unwrap().count(), 0);
        let mut set = ChunkSet::new(10);
        set.insert(3);
        set.insert(9);
        dir.store_state(&set).unwrap();
        let back = dir.load_state(10).unwrap();
        assert!(back.contains(3) && back.contains(9) && !back.contains(4));

        let e = dir.load_state(11).unwrap_err();
        assert!(e.to_string().contains("chunk count"), "{e}");

        let mut bytes = fs::read(dir.state()).unwrap();
        bytes[15] ^= 1;
        fs::write(dir.state(), &bytes).unwrap();
        let e = dir.load_state(10).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}
