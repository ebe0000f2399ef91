//! Edge sealing: payload into the spool (hashed on the way), manifest, HSM signature.
//!
//! A transfer is *sealed* once `manifest.bin` exists in its spool directory: the payload is
//! durable under `data/`, the manifest lists every chunk digest and the Merkle root, and
//! `manifest.sig` holds the edge HSM's signature. A sealed transfer can always be (re)sent from
//! the spool alone, which is what `send --resume` and the edge's start-up recovery do.
//!
//! Because `manifest.bin` is what makes a transfer sendable, it appears only after the
//! `sealed` audit record is durable: the signed manifest is first staged as
//! `manifest.pending`, the record appended, then the staged file renamed into place
//! ([`sign_and_write_manifest`]). A crash between the record and the rename leaves a staged
//! manifest that [`finish_interrupted_seal`] puts in place at the next start (appending the
//! record first if the crash came before it), so the log shows every sealed transfer before
//! anything can send it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use baylink_net::proto::{
    ChunkHasher, Limits, Manifest, ManifestBuilder, TransferId, validate_file_name,
};
use baylink_net::spool::{Spool, SpoolBuf, SpoolError, SpoolFile};
use bytes::Bytes;

use crate::audit::{self, Event, Kind};
use crate::failpoint;
use crate::link::send::Outgoing;
use crate::policy::Declaration;
use crate::signing::{MANIFEST_CONTEXT, Sign};
use crate::transfer_dir::{TransferDir, sync_dir, write_atomic};

/// Observes sealing progress (bytes placed in the spool and hashed).
pub trait SealProgress: Send + Sync {
    /// `bytes` more payload bytes are in the spool and hashed.
    fn copied(&self, bytes: u64);
    /// A file of `bytes` bytes was placed in the spool as a copy-on-write clone of its
    /// source instead of being copied (a source on the spool's file system, where that file
    /// system shares blocks). Its bytes are reported through
    /// [`SealProgress::copied`] too, as they are hashed.
    fn cloned(&self, bytes: u64) {
        let _ = bytes;
    }
}

/// Sees every byte a seal reads, as it is hashed: what streams chunks to the gateway while
/// the seal goes on ([`crate::link::early`]).
pub trait ChunkTap: Send + Sync {
    /// `data` was read at `offset` of file number `file` (in the job's order). Each file's
    /// bytes come in order, from offset 0; several files may be read at once.
    fn read(&self, file: usize, offset: u64, data: &[u8]);
}

/// What to seal.
pub struct SealJob<'a> {
    /// The new transfer's id.
    pub id: TransferId,
    /// This appliance's id (the manifest's sender).
    pub sender: &'a str,
    /// The declaration as the checkpoint allowed it (naming its consent).
    pub declaration: &'a Declaration,
    /// The source files.
    pub files: &'a [PathBuf],
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Sees the bytes as they are hashed.
    pub tap: Option<&'a dyn ChunkTap>,
}

impl std::fmt::Debug for SealJob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealJob")
            .field("id", &self.id)
            .field("sender", &self.sender)
            .field("files", &self.files)
            .field("chunk_size", &self.chunk_size)
            .field("tap", &self.tap.is_some())
            .finish_non_exhaustive()
    }
}

/// Copies the job's files into the spool, hashing every byte once, then signs the manifest
/// in the HSM and seals it ([`sign_and_write_manifest`], which records `sealed` in `audit`).
pub async fn seal_files(
    spool: &Spool,
    dir: &TransferDir,
    job: &SealJob<'_>,
    keys: &dyn Sign,
    audit: &audit::Log,
    progress: &dyn SealProgress,
) -> anyhow::Result<Outgoing> {
    let SealJob {
        id,
        sender,
        declaration,
        files,
        chunk_size,
        tap,
    } = *job;
    if files.is_empty() {
        bail!("nothing to send: give at least one file");
    }
    let mut names = std::collections::HashSet::new();
    let mut planned = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no usable file name", path.display()))?;
        validate_file_name(name).with_context(|| format!("file name {name:?}"))?;
        if !names.insert(name.to_owned()) {
            bail!("two files are named {name:?}; names must be unique within a transfer");
        }
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        planned.push((path.clone(), name.to_owned(), meta.len(), meta.dev()));
    }

    dir.create()
        .with_context(|| format!("cannot create {}", dir.root().display()))?;
    let declaration_json = serde_json::to_vec_pretty(declaration)?;
    write_atomic(&dir.declaration(), &declaration_json)?;

    let mut builder = ManifestBuilder::new(
        id,
        sender.to_owned(),
        declaration.digest(),
        allowed_consent(declaration)?,
        chunk_size,
    );
    // Several files at once: a study of a thousand instances is mostly per-file waits (open,
    // create, fsync), which overlap; one large file is read ahead within itself. Each file
    // takes up to `READ_AHEAD` buffers before it gives one back, so no more files run than
    // the pool can fill at once: files waiting for their last read buffer, each holding the
    // others, would wait for ever.
    let in_flight = (spool.buffer_count() / READ_AHEAD).clamp(1, SEAL_FILES_IN_FLIGHT);
    let cloning = &CloneRefusals::default();
    for (b, batch) in planned.chunks(in_flight).enumerate() {
        let mut placed = Vec::with_capacity(batch.len());
        for (i, (src, name, expected, device)) in batch.iter().enumerate() {
            let file = b * in_flight + i;
            placed.push(async move {
                place_hashed(
                    spool,
                    src,
                    (*expected, *device),
                    &dir.data_file(name),
                    chunk_size,
                    cloning,
                    (progress, tap.map(|t| (t, file))),
                )
                .await
                .with_context(|| format!("cannot copy {} into the spool", src.display()))
            });
        }
        let placed = futures_util::future::try_join_all(placed).await?;
        for ((_, name, _, _), (size, digests)) in batch.iter().zip(placed) {
            builder.add_file(name.clone(), size, digests)?;
        }
    }
    // Each file was fsynced by `place_hashed`; this makes their names in `data/` durable.
    let data = dir.data_dir();
    tokio::task::spawn_blocking(move || sync_dir(&data))
        .await?
        .with_context(|| format!("cannot fsync {}", dir.data_dir().display()))?;
    failpoint::hit(failpoint::SEAL_AFTER_DATA);
    let manifest = builder.finish(now_unix_ms())?;
    let sealed = Event::declared(Kind::Sealed, Some(id.to_string()), declaration);
    let (bytes, signature) = sign_and_write_manifest(dir, &manifest, keys, audit, sealed).await?;
    open_outgoing(
        spool,
        dir,
        Arc::new(manifest),
        bytes.into(),
        signature.into(),
        false,
        // Written with O_DIRECT (where the file system allows): not in the page cache.
        true,
    )
    .await
}

/// The consent reference an allowed declaration names: the manifest's process id. The
/// compliance checkpoint fills it in before a declaration is stored, so a declaration without
/// one was never allowed and is not sealed.
pub fn allowed_consent(declaration: &Declaration) -> anyhow::Result<String> {
    declaration.consent_ref.clone().context(
        "the declaration names no consent reference, so the compliance checkpoint never \
         allowed it; not sealed",
    )
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The sealing step shared by `send` and the hospital API: signs the manifest in the HSM
/// (`keys`: [`crate::signing::Keys`] outside unit tests),
/// writes `manifest.sig`, `manifest.json` and the staged `manifest.pending`, appends the
/// `sealed` record (`sealed`: the event to record, its kind, Merkle root and manifest digest
/// filled in here), and only then renames the staged file to `manifest.bin`, whose presence
/// marks the transfer as sealed and sendable. If the record cannot be appended, the staged
/// manifest is removed and sealing fails: nothing is sendable that the log does not show as
/// sealed. Returns the canonical manifest bytes and the signature.
pub async fn sign_and_write_manifest(
    dir: &TransferDir,
    manifest: &Manifest,
    keys: &dyn Sign,
    audit: &audit::Log,
    sealed: Event,
) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let bytes = manifest.to_bytes();
    let signature = keys
        .sign(MANIFEST_CONTEXT, &bytes)
        .await
        .context("cannot sign the manifest")?;
    let json = serde_json::to_vec_pretty(manifest)?;
    let (d, b, sig) = (dir.clone(), bytes.clone(), signature.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        write_atomic(&d.manifest_sig(), &sig)?;
        write_atomic(&d.manifest_json(), &json)?;
        write_atomic(&d.manifest_pending(), &b)
    })
    .await?
    .context("cannot write the manifest")?;
    failpoint::hit(failpoint::SEAL_AFTER_MANIFEST);
    // audit: `sealed` (the HSM-signed manifest's digests) is durable before `manifest.bin`
    // makes the transfer sendable.
    let event = Event {
        kind: Kind::Sealed,
        merkle_root: Some(manifest.merkle_root),
        manifest_digest: Some(manifest.digest()),
        ..sealed
    };
    if let Err(e) = audit.append(event).await {
        let _ = std::fs::remove_file(dir.manifest_pending());
        return Err(anyhow::Error::from(e).context("the seal cannot be recorded; not sealed"));
    }
    failpoint::hit(failpoint::SEAL_AFTER_SEALED);
    publish_manifest(dir.clone()).await?;
    failpoint::hit(failpoint::SEAL_AFTER_PUBLISH);
    metrics::counter!("baylink_transfers_total", "stage" => "sealed", "outcome" => "ok")
        .increment(1);
    crate::telemetry::stage_bytes("sealed", manifest.total_bytes());
    Ok((bytes, signature))
}

/// Renames the staged `manifest.pending` to `manifest.bin` and fsyncs the directory: from
/// here on the transfer is sealed. Call only once its `sealed` record is durable.
async fn publish_manifest(dir: TransferDir) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        std::fs::rename(dir.manifest_pending(), dir.manifest_bin()).with_context(|| {
            format!(
                "cannot rename {} to manifest.bin",
                dir.manifest_pending().display()
            )
        })?;
        sync_dir(dir.root()).with_context(|| format!("cannot fsync {}", dir.root().display()))
    })
    .await?
}

/// Finishes a seal that a crash interrupted between staging the manifest and putting it in
/// place: appends the `sealed` record unless the log already holds it (the crash came after
/// the append), then renames `manifest.pending` to `manifest.bin`. Returns whether there was
/// such a seal. Run it at start-up and before a resume, holding the transfer's lock.
pub async fn finish_interrupted_seal(
    dir: &TransferDir,
    audit: &audit::Log,
) -> anyhow::Result<bool> {
    if dir.manifest_bin().exists() || !dir.manifest_pending().exists() {
        return Ok(false);
    }
    let bytes = std::fs::read(dir.manifest_pending())
        .with_context(|| format!("cannot read {}", dir.manifest_pending().display()))?;
    let manifest = Manifest::from_bytes(&bytes, &Limits::default()).with_context(|| {
        format!(
            "{} is not a valid manifest",
            dir.manifest_pending().display()
        )
    })?;
    let id = manifest.transfer_id.to_string();
    let (log, t) = (audit.clone(), id.clone());
    let recorded = tokio::task::spawn_blocking(move || log.has_record(&t, Kind::Sealed)).await??;
    if !recorded {
        let declaration = load_declaration(dir)?;
        // audit: the `sealed` record the crash kept from being appended, before
        // `manifest.bin` makes the transfer sendable.
        audit
            .append(Event {
                hospital: std::fs::read_to_string(dir.owner()).ok(),
                merkle_root: Some(manifest.merkle_root),
                manifest_digest: Some(manifest.digest()),
                detail: Some(
                    "recorded after a restart: the process stopped after signing the manifest"
                        .to_owned(),
                ),
                ..Event::declared(Kind::Sealed, Some(id), &declaration)
            })
            .await?;
    }
    publish_manifest(dir.clone()).await?;
    Ok(true)
}

/// Loads a sealed transfer from the spool (for `--resume`, recovery, and the hospital
/// doors' commits). With `check_at_rest`, every chunk is read back and checked against the
/// manifest before its first send; without, only chunks sent a second time are.
pub async fn load_sealed(
    spool: &Spool,
    dir: &TransferDir,
    check_at_rest: bool,
) -> anyhow::Result<Outgoing> {
    let bytes = std::fs::read(dir.manifest_bin()).with_context(|| {
        format!(
            "{} is not a sealed transfer (no manifest.bin)",
            dir.root().display()
        )
    })?;
    let signature = std::fs::read(dir.manifest_sig())
        .with_context(|| format!("cannot read {}", dir.manifest_sig().display()))?;
    let manifest = Manifest::from_bytes(&bytes, &Limits::default())
        .with_context(|| format!("{} is not a valid manifest", dir.manifest_bin().display()))?;
    // A transfer sealed by a version that stored payload under the hospital's names.
    dir.adopt_legacy_names(manifest.files.iter().map(|f| f.name.as_str()))
        .context("cannot adopt the payload of an older spool layout")?;
    open_outgoing(
        spool,
        dir,
        Arc::new(manifest),
        bytes.into(),
        signature.into(),
        check_at_rest,
        true,
    )
    .await
}

/// Loads the declaration stored with a sealed transfer.
pub fn load_declaration(dir: &TransferDir) -> anyhow::Result<Declaration> {
    let text = std::fs::read(dir.declaration())
        .with_context(|| format!("cannot read {}", dir.declaration().display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a declaration", dir.declaration().display()))
}

async fn open_outgoing(
    spool: &Spool,
    dir: &TransferDir,
    manifest: Arc<Manifest>,
    manifest_bytes: Bytes,
    signature: Bytes,
    check_at_rest: bool,
    cold: bool,
) -> anyhow::Result<Outgoing> {
    // A payload that is not known to be in the page cache (an upload written with O_DIRECT,
    // a transfer sealed before a restart) is read with O_DIRECT too: no copy out of the
    // cache, and no gigabytes of cache filled with bytes sent once. The sender reads at
    // chunk and buffer boundaries, which must then be aligned.
    let direct = cold
        && manifest
            .chunk_size
            .is_multiple_of(baylink_net::spool::DIRECT_ALIGN as u32)
        && spool.buffers_allow_direct();
    let mut files = Vec::with_capacity(manifest.files.len());
    // A transfer that has its receipt is reported from it, never sent again: its payload is
    // not opened (`spool.retain` may have removed it).
    let payload = if dir.has_receipt() {
        &[][..]
    } else {
        &manifest.files[..]
    };
    for f in payload {
        let path = dir.data_file(&f.name);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("sealed payload {} is missing", path.display()))?
            .len();
        if len != f.size {
            bail!(
                "sealed payload {} has {len} bytes, its manifest says {}",
                path.display(),
                f.size
            );
        }
        let file = if direct {
            spool.open_direct(&path).await?
        } else {
            spool.open(&path).await?
        };
        files.push(Arc::new(file));
    }
    Ok(Outgoing {
        manifest,
        manifest_bytes,
        signature,
        files: Arc::new(files),
        check_at_rest,
    })
}

/// Takes a buffer (waiting for one if need be), then reads `input` at `at` into it in a task
/// of its own.
async fn start_read(
    spool: &Spool,
    input: &Arc<SpoolFile>,
    at: u64,
) -> tokio::task::JoinHandle<Result<SpoolBuf, SpoolError>> {
    let buf = spool.buffer().await;
    let (spool, input) = (spool.clone(), input.clone());
    tokio::spawn(async move {
        let want = buf.capacity();
        spool.read_at(&input, at, buf, want).await
    })
}

/// Reads in flight while sealing (see [`read_hashed`]).
const READ_AHEAD: usize = 8;

/// Places `src` (expected to hold `size` bytes) in the spool as `dst` and hashes what `dst`
/// holds, chunk by chunk; `dst` is durable when this returns.
///
/// Where the file system shares blocks between files (XFS with reflink, btrfs) and `src`
/// is on the spool's file system, `dst` becomes a copy-on-write clone of `src`
/// ([`clone_file`]): no byte is written, and the hashing reads the clone. The clone cannot
/// change underneath: a later write to `src` (or to any other file sharing the blocks) gets
/// blocks of its own, so `dst` keeps the bytes of the moment of the clone, and those are the
/// bytes hashed, signed and sent. Elsewhere (ext4, another file system, any refusal) the
/// bytes are copied while they are hashed; where the file systems cannot clone at all, that
/// is remembered for `src`'s device (`device`, with `size` in the second argument) for the
/// rest of the seal.
async fn place_hashed(
    spool: &Spool,
    src: &Path,
    (size, device): (u64, u64),
    dst: &Path,
    chunk_size: u32,
    cloning: &CloneRefusals,
    seen: (&dyn SealProgress, Option<(&dyn ChunkTap, usize)>),
) -> anyhow::Result<(u64, Vec<baylink_net::proto::Digest>)> {
    if !cloning.refused(device) {
        let (s, d) = (src.to_owned(), dst.to_owned());
        match tokio::task::spawn_blocking(move || clone_file(&s, &d)).await?? {
            Cloned::Yes => {
                let (len, digests) = read_hashed(spool, dst, size, None, chunk_size, seen).await?;
                seen.0.cloned(len);
                return Ok((len, digests));
            }
            Cloned::Unable => cloning.refuse(device),
            Cloned::NotThisFile => {}
        }
    }
    read_hashed(spool, src, size, Some(dst), chunk_size, seen).await
}

/// Most files sealed at once ([`seal_files`]; fewer with a pool of fewer than
/// `SEAL_FILES_IN_FLIGHT × READ_AHEAD` buffers).
const SEAL_FILES_IN_FLIGHT: usize = 8;

/// The source devices (`st_dev`) from which one seal found the spool cannot clone (the
/// file systems cannot share blocks): the rest of their files are copied without trying
/// again (on ext4 each try creates and removes a file).
#[derive(Debug, Default)]
struct CloneRefusals(std::sync::Mutex<Vec<u64>>);

impl CloneRefusals {
    fn refused(&self, device: u64) -> bool {
        self.0
            .lock()
            .expect("clone refusals lock poisoned")
            .contains(&device)
    }

    fn refuse(&self, device: u64) {
        let mut devices = self.0.lock().expect("clone refusals lock poisoned");
        if !devices.contains(&device) {
            devices.push(device);
        }
    }
}

/// Makes `dst` (created, or truncated) a copy-on-write clone of all of `src` with one
/// `FICLONE` ioctl, then fsyncs it. Returns false, leaving no `dst`, where the file systems
/// cannot clone (`src` elsewhere than `dst`'s file system, or one without shared blocks such
/// as ext4 or tmpfs). The clone is taken whole at one moment: the file system flushes and
/// locks both files while it shares the blocks.
fn clone_file(src: &Path, dst: &Path) -> anyhow::Result<Cloned> {
    let input =
        std::fs::File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    let output =
        std::fs::File::create(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    if let Err(e) = rustix::fs::ioctl_ficlone(&output, &input) {
        drop(output);
        std::fs::remove_file(dst).with_context(|| format!("cannot remove {}", dst.display()))?;
        tracing::debug!(source = %src.display(), error = %e, "not cloned into the spool; copying");
        // What says the two file systems cannot share blocks at all, as against a refusal
        // of this one file (busy, a swap file, another file system's own reason).
        use rustix::io::Errno;
        let unable = [
            Errno::OPNOTSUPP,
            Errno::XDEV,
            Errno::INVAL,
            Errno::NOTTY,
            Errno::NOSYS,
        ];
        return Ok(if unable.contains(&e) {
            Cloned::Unable
        } else {
            Cloned::NotThisFile
        });
    }
    output
        .sync_all()
        .with_context(|| format!("cannot fsync {}", dst.display()))?;
    Ok(Cloned::Yes)
}

/// What [`clone_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cloned {
    /// `dst` is a clone of `src`, durable.
    Yes,
    /// The file systems cannot clone between them (`src`'s device will not be tried again
    /// in this seal); no `dst`.
    Unable,
    /// This file could not be cloned; others may be. No `dst`.
    NotThisFile,
}

/// Reads `src` (expected to hold `size` bytes, which only sizes the read-ahead: the read
/// ends where the file does) through the io_uring spool, hashing chunk by chunk, and with
/// `copy_to` writes what it read there too and fsyncs it.
async fn read_hashed(
    spool: &Spool,
    src: &Path,
    size: u64,
    copy_to: Option<&Path>,
    chunk_size: u32,
    (progress, tap): (&dyn SealProgress, Option<(&dyn ChunkTap, usize)>),
) -> anyhow::Result<(u64, Vec<baylink_net::proto::Digest>)> {
    // Both sides straight to the device (O_DIRECT) when the pool's buffers allow it. Every
    // read and write then starts at a multiple of the buffer size. Measured on the sealing
    // of 1 GiB: buffered writes through io_uring are punted to kernel workers that copy into
    // fresh page-cache pages, 2.8 CPU-seconds of the sender's 5.6; buffered reads of the
    // source cost another 0.4. The send that follows reads the copy back with O_DIRECT too.
    let direct = spool.buffers_allow_direct();
    let input = if direct {
        spool.open_direct(src).await?
    } else {
        spool.open(src).await?
    };
    let output = match copy_to {
        Some(dst) if direct => Some(Arc::new(spool.create_direct(dst).await?)),
        Some(dst) => Some(Arc::new(spool.create(dst).await?)),
        None => None,
    };
    let mut hasher = ChunkHasher::new(chunk_size);
    let mut writes = tokio::task::JoinSet::new();
    // Reads ahead: direct reads get no readahead from the kernel, and a single read in
    // flight leaves the device idle while a buffer is hashed. With the copy's writes sharing
    // the device, `READ_AHEAD` reads in flight keep it busy. Measured on the sealing of
    // 1 GiB: one read ahead 1.7-1.85 s, eight 1.45-1.7 s; the same read and write alone
    // (fio, io_uring, eight deep) take 1.23-1.35 s on that disk.
    let input = Arc::new(input);
    // Each read's buffer is taken here, in file order, before its task starts: a read
    // that waited inside its task for a buffer could let later reads take the last free ones
    // while the loop below waits for the first.
    let read = |at: u64| start_read(spool, &input, at);
    let buffer_size = spool.buffer_size() as u64;
    // A small file needs fewer: its buffers and one read that finds the end.
    let ahead =
        usize::try_from(size.div_ceil(buffer_size) + 1).map_or(READ_AHEAD, |n| n.min(READ_AHEAD));
    let mut reads = std::collections::VecDeque::new();
    let mut next_read = 0u64;
    for _ in 0..ahead {
        reads.push_back(read(next_read).await);
        next_read += buffer_size;
    }
    let mut offset = 0u64;
    while let Some(reading) = reads.pop_front() {
        let buf = reading.await??;
        let n = buf.len();
        if n == 0 {
            break;
        }
        hasher.update(&buf);
        if let Some((tap, file)) = tap {
            tap.read(file, offset, &buf);
        }
        let at = offset;
        offset += n as u64;
        if let Some(output) = &output {
            let (spool2, out2) = (spool.clone(), output.clone());
            writes.spawn(async move { spool2.write_at(&out2, at, buf).await.map(drop) });
        }
        while writes.len() > 8 {
            writes.join_next().await.expect("set is not empty")??;
        }
        progress.copied(n as u64);
        // A short read is the end of the file: the reads after it find nothing.
        if n < buffer_size as usize {
            break;
        }
        reads.push_back(read(next_read).await);
        next_read += buffer_size;
    }
    // Reads past the end return nothing; each must finish before the input is closed.
    for reading in reads {
        reading.await??;
    }
    while let Some(res) = writes.join_next().await {
        res??;
    }
    if let Some(output) = output {
        // Cuts the zeros a direct write padded the last buffer with.
        spool.sync_to_len(&output, offset).await?;
        if let Ok(output) = Arc::try_unwrap(output) {
            spool.close(output).await?;
        }
    }
    // Every read was awaited, so no task holds the input any more.
    if let Ok(input) = Arc::try_unwrap(input) {
        spool.close(input).await?;
    }
    Ok((offset, hasher.finish()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit::testing::Fixture;
    use crate::test_support::CHUNK;

    fn declaration() -> Declaration {
        Declaration {
            patient_id: "P-1".into(),
            category: "diagnostic-image".into(),
            purpose: "care".into(),
            destination: "hk-ehealth".into(),
            consent_ref: Some("C-1".into()),
        }
    }

    struct NoProgress;
    impl SealProgress for NoProgress {
        fn copied(&self, _: u64) {}
    }

    #[tokio::test]
    async fn copies_files_of_every_size_byte_for_byte_with_their_digests() {
        let spool = crate::test_support::spool();
        let buffer = spool.buffer_size() as u64;
        let free = spool.free_buffers();
        let dir = tempfile::tempdir().unwrap();
        // Empty, one buffer, one past it, and more buffers than reads are kept in flight.
        for size in [0, buffer, buffer + 1, 20 * buffer + 7] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let (src, dst) = (
                dir.path().join("src"),
                dir.path().join(format!("dst{size}")),
            );
            std::fs::write(&src, &data).unwrap();
            // The size only sizes the read-ahead: a wrong guess still copies the whole file.
            for guess in [size, 0] {
                let _ = std::fs::remove_file(&dst);
                let (copied, digests) =
                    read_hashed(&spool, &src, guess, Some(&dst), CHUNK, (&NoProgress, None))
                        .await
                        .unwrap();
                assert_eq!(copied, size);
                assert_eq!(std::fs::read(&dst).unwrap(), data, "size {size}");
                let mut expected = ChunkHasher::new(CHUNK);
                expected.update(&data);
                assert_eq!(digests, expected.finish(), "size {size}");
            }
        }
        assert_eq!(
            spool.free_buffers(),
            free,
            "every buffer went back to the pool"
        );
    }

    /// A transfer as a crash after step 3 of sealing leaves it: manifest signed (here: any
    /// signature bytes) and staged, no `manifest.bin`.
    fn staged(spool: &Path, decl: &Declaration) -> (TransferDir, Manifest) {
        let id = TransferId::new_v7();
        let dir = TransferDir::new(spool, &id);
        dir.create().unwrap();
        write_atomic(&dir.declaration(), &serde_json::to_vec(decl).unwrap()).unwrap();
        let mut b = ManifestBuilder::new(id, "edge", decl.digest(), "C-1", 1024);
        b.add_file("a.bin", 10, vec![[7; 32]]).unwrap();
        let manifest = b.finish(1).unwrap();
        write_atomic(&dir.manifest_sig(), b"sig").unwrap();
        write_atomic(&dir.manifest_pending(), &manifest.to_bytes()).unwrap();
        (dir, manifest)
    }

    fn sealed_records(f: &Fixture, id: &TransferId) -> Vec<crate::audit::Record> {
        std::fs::read_to_string(f.path(crate::audit::RECORDS_FILE))
            .unwrap_or_default()
            .lines()
            .map(|l| crate::audit::record::parse_line(l.as_bytes()).unwrap().0)
            .filter(|r| r.kind == Kind::Sealed && r.transfer == Some(id.to_string()))
            .collect()
    }

    #[tokio::test]
    #[serial_test::serial]
    async fn an_interrupted_seal_is_recorded_once_then_made_sendable() {
        let f = Fixture::new();
        let log = f.open(100);
        let spool = tempfile::tempdir().unwrap();
        let decl = declaration();

        // Crash before the record: it is appended, then manifest.bin appears.
        let (dir, manifest) = staged(spool.path(), &decl);
        let id = manifest.transfer_id;
        assert!(finish_interrupted_seal(&dir, &log).await.unwrap());
        let recs = sealed_records(&f, &id);
        assert_eq!(recs.len(), 1);
        assert_eq!(
            recs[0].manifest_digest,
            Some(hex::encode(manifest.digest()))
        );
        assert!(
            recs[0]
                .detail
                .as_deref()
                .unwrap()
                .contains("after a restart")
        );
        assert_eq!(
            std::fs::read(dir.manifest_bin()).unwrap(),
            manifest.to_bytes()
        );
        assert!(!dir.manifest_pending().exists());
        assert!(
            !finish_interrupted_seal(&dir, &log).await.unwrap(),
            "done once"
        );

        // Crash after the record: it is not appended a second time.
        let (dir, manifest) = staged(spool.path(), &decl);
        let id = manifest.transfer_id;
        log.append(Event {
            merkle_root: Some(manifest.merkle_root),
            manifest_digest: Some(manifest.digest()),
            ..Event::declared(Kind::Sealed, Some(id.to_string()), &decl)
        })
        .await
        .unwrap();
        assert!(finish_interrupted_seal(&dir, &log).await.unwrap());
        assert_eq!(sealed_records(&f, &id).len(), 1);
        assert!(dir.manifest_bin().exists());
        assert!(f.verify().is_ok());
    }
}
