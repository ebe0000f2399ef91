//! The manifest: what one transfer consists of, in a canonical binary
//! encoding that the edge's HSM signs.
//!
//! # Encoding (version 2, all integers big-endian)
//!
//! ```text
//! magic "BLMF" | u16 version | 16 transfer id | u16 len, sender (UTF-8)
//! | u64 created_unix_ms | 32 declaration digest
//! | u16 len, process id (UTF-8, 1..=MAX_PROCESS_ID_LEN bytes) | u32 chunk_size
//! | u32 file count | per file: (u16 len, name (UTF-8), u64 size)
//! | u32 chunk count | chunk count × 32 digest | 32 merkle root
//! ```
//!
//! Every field has exactly one encoding and nothing may follow the root, so
//! equal manifests have equal bytes and [`Manifest::digest`] identifies one.
//! Chunks are per file, in file order; a file of size `s` has
//! `ceil(s / chunk_size)` chunks (none when empty), so per-file chunk counts
//! are implied by the sizes rather than stored.
//!
//! The process id is the reference of the patient's consent record that the
//! compliance checkpoint allowed the transfer under; it travels into the
//! receipt and every audit record of the transfer. Version 1 had no process
//! id and is refused.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use aws_lc_rs::digest::{Context, SHA256};
use bytes::BufMut;

use super::wire::{Reader, count_u32, put_str16};
use super::{
    Digest, Limits, MAX_FILE_NAME_LEN, MAX_PROCESS_ID_LEN, ProtoError, TransferId, sha256,
};
use crate::merkle;

/// The first four bytes of an encoded manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"BLMF";
/// The manifest encoding version this build writes and reads.
pub const MANIFEST_VERSION: u16 = 2;

/// Bytes of an encoded manifest outside the sender, process id, files and
/// digests.
const FIXED_LEN: u64 = 4 + 2 + 16 + 2 + 8 + 32 + 2 + 4 + 4 + 4 + 32;
/// The smallest possible encoded file entry (a one-byte name).
const MIN_FILE_ENTRY_LEN: usize = 2 + 1 + 8;

/// The encoded size of the largest manifest `limits` accept.
pub(crate) fn max_encoded_len(limits: &Limits) -> u64 {
    let name = u64::from(limits.max_name_len).min(MAX_FILE_NAME_LEN as u64);
    FIXED_LEN
        + u64::from(limits.max_text_len)
        + u64::from(MAX_PROCESS_ID_LEN)
        + u64::from(limits.max_files) * (2 + name + 8)
        + u64::from(limits.max_chunks) * 32
}

/// One file of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileEntry {
    /// The file's name: one plain path component (see
    /// [`super::validate_file_name`]).
    pub name: String,
    /// The file's size in bytes.
    pub size: u64,
}

/// Where a chunk's bytes are: `len` bytes at `offset` in file number `file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLocation {
    /// Index into [`Manifest::files`].
    pub file: usize,
    /// Byte offset in that file.
    pub offset: u64,
    /// Length in bytes (the chunk size, or less for a file's last chunk).
    pub len: u32,
}

/// What one transfer consists of. Made by [`ManifestBuilder`] or
/// [`Manifest::from_bytes`], both of which check every invariant.
///
/// The fields are public for reading. Changing them afterwards is possible
/// but leaves the chunk lookup ([`Manifest::chunk`], [`Manifest::file_chunks`])
/// describing the old files; re-encode and decode instead.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Encoding version ([`MANIFEST_VERSION`]).
    pub version: u16,
    /// The transfer this manifest describes.
    pub transfer_id: TransferId,
    /// The sending appliance's identity.
    pub sender: String,
    /// When the manifest was sealed, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// SHA-256 of the hospital's declaration for this transfer.
    pub declaration_digest: Digest,
    /// The reference of the consent record the transfer was allowed under
    /// (see [`check_process_id`]).
    pub process_id: String,
    /// Chunk size in bytes; every chunk but a file's last is this long.
    pub chunk_size: u32,
    /// The files, in order.
    pub files: Vec<FileEntry>,
    /// SHA-256 of each chunk, file 0's chunks first.
    pub chunk_digests: Vec<Digest>,
    /// [`merkle::root`] of `chunk_digests`.
    pub merkle_root: Digest,
    /// First global chunk index of each file, then the chunk count
    /// (`files.len() + 1` entries).
    first_chunk: Vec<u32>,
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("version", &self.version)
            .field("transfer_id", &self.transfer_id)
            .field("sender", &self.sender)
            .field("created_unix_ms", &self.created_unix_ms)
            .field("process_id", &self.process_id)
            .field("chunk_size", &self.chunk_size)
            .field("files", &self.files.len())
            .field("chunks", &self.chunk_digests.len())
            .field("total_bytes", &self.total_bytes())
            .field("merkle_root", &hex::encode(self.merkle_root))
            .finish()
    }
}

/// Per-file first chunk indices plus the total, from sizes already checked
/// to need at most `u32::MAX` chunks.
fn first_chunks(files: &[FileEntry], chunk_size: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(files.len() + 1);
    let mut next: u32 = 0;
    out.push(0);
    for f in files {
        let n = chunks_for(f.size, chunk_size);
        next = next.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        out.push(next);
    }
    out
}

/// `ceil(size / chunk_size)`.
pub(super) fn chunks_for(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

pub(super) fn check_chunk_size(chunk_size: u32, limits: &Limits) -> Result<(), ProtoError> {
    if chunk_size == 0 || chunk_size > limits.max_chunk_size {
        return Err(ProtoError::BadChunkSize {
            size: chunk_size,
            max: limits.max_chunk_size,
        });
    }
    Ok(())
}

/// Checks a process id: 1 to [`MAX_PROCESS_ID_LEN`] bytes, no control
/// characters (it is printed in logs and audit records).
pub fn check_process_id(process_id: &str) -> Result<(), ProtoError> {
    if process_id.is_empty()
        || process_id.len() > usize::from(MAX_PROCESS_ID_LEN)
        || process_id.chars().any(char::is_control)
    {
        return Err(ProtoError::BadProcessId {
            len: process_id.len(),
        });
    }
    Ok(())
}

fn check_name(name: &str, limits: &Limits) -> Result<(), ProtoError> {
    let bad = |source| ProtoError::BadFileName {
        name: name.to_owned(),
        source,
    };
    if name.len() > usize::from(limits.max_name_len) {
        return Err(bad(super::NameError::TooLong { len: name.len() }));
    }
    super::validate_file_name(name).map_err(bad)
}

impl Manifest {
    /// The canonical encoding: what the edge signs and sends in `Offer`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let names: usize = self.files.iter().map(|f| 10 + f.name.len()).sum();
        let mut out = Vec::with_capacity(
            FIXED_LEN as usize
                + self.sender.len()
                + self.process_id.len()
                + names
                + 32 * self.chunk_digests.len(),
        );
        out.put_slice(&MANIFEST_MAGIC);
        out.put_u16(self.version);
        out.put_slice(&self.transfer_id.0);
        put_str16(&mut out, &self.sender);
        out.put_u64(self.created_unix_ms);
        out.put_slice(&self.declaration_digest);
        put_str16(&mut out, &self.process_id);
        out.put_u32(self.chunk_size);
        out.put_u32(count_u32(self.files.len()));
        for f in &self.files {
            put_str16(&mut out, &f.name);
            out.put_u64(f.size);
        }
        out.put_u32(count_u32(self.chunk_digests.len()));
        for d in &self.chunk_digests {
            out.put_slice(d);
        }
        out.put_slice(&self.merkle_root);
        out
    }

    /// Decodes and checks a manifest: magic and version, every count and
    /// length against `limits` (and against the bytes present) before
    /// allocating, names valid and unique, at least one file, the digest
    /// count consistent with the file sizes, and the Merkle root.
    pub fn from_bytes(bytes: &[u8], limits: &Limits) -> Result<Manifest, ProtoError> {
        let mut r = Reader::new(bytes, "manifest");
        r.header(MANIFEST_MAGIC, MANIFEST_VERSION)?;
        let transfer_id = TransferId(r.array()?);
        let sender = r.str16(limits.max_text_len, "manifest sender")?.to_owned();
        let created_unix_ms = r.u64()?;
        let declaration_digest = r.array()?;
        let process_id = r
            .str16(MAX_PROCESS_ID_LEN, "manifest process id")?
            .to_owned();
        check_process_id(&process_id)?;
        let chunk_size = r.u32()?;
        check_chunk_size(chunk_size, limits)?;

        let file_count = r.u32()?;
        if file_count == 0 {
            return Err(ProtoError::NoFiles);
        }
        if file_count > limits.max_files {
            return Err(ProtoError::TooManyFiles {
                count: file_count.into(),
                max: limits.max_files,
            });
        }
        let file_count = file_count as usize;
        if file_count > r.remaining() / MIN_FILE_ENTRY_LEN {
            return Err(ProtoError::Truncated { what: "manifest" });
        }
        let mut files = Vec::with_capacity(file_count);
        let mut names = HashSet::with_capacity(file_count);
        let mut needed: u64 = 0;
        for _ in 0..file_count {
            let name = r.str16(limits.max_name_len, "file name")?;
            check_name(name, limits)?;
            if !names.insert(name) {
                return Err(ProtoError::DuplicateFileName { name: name.into() });
            }
            let size = r.u64()?;
            needed = needed.saturating_add(chunks_for(size, chunk_size));
            if needed > limits.max_chunks.into() {
                return Err(ProtoError::TooManyChunks {
                    count: needed,
                    max: limits.max_chunks,
                });
            }
            files.push(FileEntry {
                name: name.to_owned(),
                size,
            });
        }

        let chunk_count = r.u32()?;
        if chunk_count > limits.max_chunks {
            return Err(ProtoError::TooManyChunks {
                count: chunk_count.into(),
                max: limits.max_chunks,
            });
        }
        if u64::from(chunk_count) != needed {
            return Err(ProtoError::ChunkTotalMismatch {
                expected: needed,
                actual: chunk_count.into(),
            });
        }
        let chunk_count = chunk_count as usize;
        if chunk_count > r.remaining() / 32 {
            return Err(ProtoError::Truncated { what: "manifest" });
        }
        let mut chunk_digests = Vec::with_capacity(chunk_count);
        for _ in 0..chunk_count {
            chunk_digests.push(r.array()?);
        }
        let merkle_root = r.array()?;
        r.finish()?;
        if merkle::root(&chunk_digests) != merkle_root {
            return Err(ProtoError::MerkleRootMismatch);
        }
        let first_chunk = first_chunks(&files, chunk_size);
        Ok(Manifest {
            version: MANIFEST_VERSION,
            transfer_id,
            sender,
            created_unix_ms,
            declaration_digest,
            process_id,
            chunk_size,
            files,
            chunk_digests,
            merkle_root,
            first_chunk,
        })
    }

    /// SHA-256 of [`Manifest::to_bytes`]: the manifest's identity, quoted in
    /// receipts.
    pub fn digest(&self) -> Digest {
        sha256(&self.to_bytes())
    }

    /// The number of chunks in the transfer.
    pub fn chunk_count(&self) -> u32 {
        count_u32(self.chunk_digests.len())
    }

    /// The sum of the file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .fold(0u64, |sum, f| sum.saturating_add(f.size))
    }

    /// Where chunk `index` lives, or `None` past the last chunk.
    /// O(log files).
    pub fn chunk(&self, index: u32) -> Option<ChunkLocation> {
        if index >= self.chunk_count() {
            return None;
        }
        // The last file whose first chunk is <= index; empty files share
        // their first index with the next file and are skipped over.
        let file = self.first_chunk.partition_point(|&first| first <= index) - 1;
        let entry = self.files.get(file)?;
        let offset = u64::from(index - self.first_chunk[file]) * u64::from(self.chunk_size);
        let len = entry
            .size
            .checked_sub(offset)?
            .min(u64::from(self.chunk_size));
        Some(ChunkLocation {
            file,
            offset,
            len: u32::try_from(len).ok()?,
        })
    }

    /// The global chunk indices of file number `file` (empty for an empty
    /// file, and for a file index out of range).
    pub fn file_chunks(&self, file: usize) -> Range<u32> {
        match (self.first_chunk.get(file), self.first_chunk.get(file + 1)) {
            (Some(&start), Some(&end)) => start..end,
            _ => {
                let n = self.chunk_count();
                n..n
            }
        }
    }

    /// The expected digest of chunk `index`.
    pub fn chunk_digest(&self, index: u32) -> Option<&Digest> {
        self.chunk_digests.get(index as usize)
    }
}

impl serde::Serialize for Manifest {
    /// The human-readable form written as `manifest.json`: digests in hex,
    /// plus the manifest digest. The canonical form is
    /// [`Manifest::to_bytes`].
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            version: u16,
            transfer_id: TransferId,
            sender: &'a str,
            created_unix_ms: u64,
            declaration_digest: String,
            process_id: &'a str,
            chunk_size: u32,
            total_bytes: u64,
            files: &'a [FileEntry],
            chunk_digests: Vec<String>,
            merkle_root: String,
            manifest_digest: String,
        }
        Json {
            version: self.version,
            transfer_id: self.transfer_id,
            sender: &self.sender,
            created_unix_ms: self.created_unix_ms,
            declaration_digest: hex::encode(self.declaration_digest),
            process_id: &self.process_id,
            chunk_size: self.chunk_size,
            total_bytes: self.total_bytes(),
            files: &self.files,
            chunk_digests: self.chunk_digests.iter().map(hex::encode).collect(),
            merkle_root: hex::encode(self.merkle_root),
            manifest_digest: hex::encode(self.digest()),
        }
        .serialize(serializer)
    }
}

/// Builds a [`Manifest`] file by file, checking each file as it is added.
#[derive(Debug)]
pub struct ManifestBuilder {
    transfer_id: TransferId,
    sender: String,
    declaration_digest: Digest,
    process_id: String,
    chunk_size: u32,
    limits: Limits,
    files: Vec<FileEntry>,
    names: HashSet<String>,
    chunk_digests: Vec<Digest>,
}

impl ManifestBuilder {
    /// Starts a manifest, checked against [`Limits::default`] (see
    /// [`ManifestBuilder::with_limits`]). `process_id` is the consent
    /// reference the transfer was allowed under.
    pub fn new(
        transfer_id: TransferId,
        sender: impl Into<String>,
        declaration_digest: Digest,
        process_id: impl Into<String>,
        chunk_size: u32,
    ) -> Self {
        Self {
            transfer_id,
            sender: sender.into(),
            declaration_digest,
            process_id: process_id.into(),
            chunk_size,
            limits: Limits::default(),
            files: Vec::new(),
            names: HashSet::new(),
            chunk_digests: Vec::new(),
        }
    }

    /// Checks against `limits` instead of the defaults. Use the receiver's
    /// limits (or tighter) so it cannot refuse what is built here.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Adds the next file with its chunk digests (from a [`ChunkHasher`]).
    /// Refuses a bad or repeated name, a digest count that does not match the
    /// size, and going over the file or chunk limits; on error nothing is
    /// added.
    pub fn add_file(
        &mut self,
        name: impl Into<String>,
        size: u64,
        chunk_digests: Vec<Digest>,
    ) -> Result<(), ProtoError> {
        let name = name.into();
        check_chunk_size(self.chunk_size, &self.limits)?;
        check_name(&name, &self.limits)?;
        if self.names.contains(&name) {
            return Err(ProtoError::DuplicateFileName { name });
        }
        let files = self.files.len() as u64 + 1;
        if files > self.limits.max_files.into() {
            return Err(ProtoError::TooManyFiles {
                count: files,
                max: self.limits.max_files,
            });
        }
        let expected = chunks_for(size, self.chunk_size);
        if chunk_digests.len() as u64 != expected {
            return Err(ProtoError::ChunkCountMismatch {
                name,
                size,
                expected,
                actual: chunk_digests.len() as u64,
            });
        }
        let total = self.chunk_digests.len() as u64 + expected;
        if total > self.limits.max_chunks.into() {
            return Err(ProtoError::TooManyChunks {
                count: total,
                max: self.limits.max_chunks,
            });
        }
        self.names.insert(name.clone());
        self.files.push(FileEntry { name, size });
        self.chunk_digests.extend(chunk_digests);
        Ok(())
    }

    /// Seals the manifest: computes the Merkle root. Refuses a manifest
    /// without files, a sender over [`Limits::max_text_len`] and a process id
    /// that [`check_process_id`] refuses.
    ///
    /// (The interface sketch had `finish` infallible; it returns a `Result`
    /// so that an empty transfer cannot be built.)
    pub fn finish(self, created_unix_ms: u64) -> Result<Manifest, ProtoError> {
        if self.files.is_empty() {
            return Err(ProtoError::NoFiles);
        }
        if self.sender.len() > usize::from(self.limits.max_text_len) {
            return Err(ProtoError::TextTooLong {
                what: "sender",
                len: self.sender.len(),
                max: self.limits.max_text_len,
            });
        }
        check_process_id(&self.process_id)?;
        let merkle_root = merkle::root(&self.chunk_digests);
        let first_chunk = first_chunks(&self.files, self.chunk_size);
        Ok(Manifest {
            version: MANIFEST_VERSION,
            transfer_id: self.transfer_id,
            sender: self.sender,
            created_unix_ms,
            declaration_digest: self.declaration_digest,
            process_id: self.process_id,
            chunk_size: self.chunk_size,
            files: self.files,
            chunk_digests: self.chunk_digests,
            merkle_root,
            first_chunk,
        })
    }
}

/// Cuts one file's bytes into chunks and hashes each, whatever slices the
/// bytes arrive in (network packets, spool buffers).
pub struct ChunkHasher {
    chunk_size: u64,
    ctx: Context,
    in_chunk: u64,
    total: u64,
    digests: Vec<Digest>,
}

impl fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkHasher")
            .field("chunk_size", &self.chunk_size)
            .field("bytes", &self.total)
            .field("chunks_done", &self.digests.len())
            .finish()
    }
}

impl ChunkHasher {
    /// A hasher for chunks of `chunk_size` bytes.
    ///
    /// # Panics
    /// If `chunk_size` is 0 (chunk sizes come from validated configuration).
    pub fn new(chunk_size: u32) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        Self {
            chunk_size: chunk_size.into(),
            ctx: Context::new(&SHA256),
            in_chunk: 0,
            total: 0,
            digests: Vec::new(),
        }
    }

    /// Feeds the next bytes of the file. A digest is emitted (into
    /// [`ChunkHasher::digests`]) as soon as a chunk is complete.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = self.chunk_size - self.in_chunk;
            let n = usize::try_from(room).map_or(data.len(), |room| room.min(data.len()));
            let (head, tail) = data.split_at(n);
            self.ctx.update(head);
            self.in_chunk += n as u64;
            self.total += n as u64;
            data = tail;
            if self.in_chunk == self.chunk_size {
                self.close_chunk();
            }
        }
    }

    fn close_chunk(&mut self) {
        let ctx = std::mem::replace(&mut self.ctx, Context::new(&SHA256));
        let mut d = [0u8; 32];
        d.copy_from_slice(ctx.finish().as_ref());
        self.digests.push(d);
        self.in_chunk = 0;
    }

    /// Digests of the chunks completed so far.
    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.total
    }

    /// Closes the last, partial chunk (if any) and returns every digest: none
    /// for an empty file.
    pub fn finish(mut self) -> Vec<Digest> {
        if self.in_chunk > 0 {
            self.close_chunk();
        }
        self.digests
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic file contents for tests.
    pub(crate) fn content(seed: u64, len: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    pub(crate) fn digests_of(data: &[u8], chunk_size: u32) -> Vec<Digest> {
        data.chunks(chunk_size as usize).map(sha256).collect()
    }

    /// A manifest (and its files' bytes) with the given sizes.
    pub(crate) fn build(sizes: &[u64], chunk_size: u32) -> (Manifest, Vec<Vec<u8>>) {
        let mut b = ManifestBuilder::new(
            TransferId::new_v7(),
            "edge-qianhai-1",
            [9; 32],
            "C-1",
            chunk_size,
        );
        let mut data = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let bytes = content(i as u64 + 1, size);
            b.add_file(format!("file{i}.dcm"), size, digests_of(&bytes, chunk_size))
                .unwrap();
            data.push(bytes);
        }
        (b.finish(1_700_000_000_000).unwrap(), data)
    }

    /// Re-encodes after changing fields, fixing up the root unless told not
    /// to.
    fn reencode(m: &Manifest, fix_root: bool) -> Vec<u8> {
        let mut m = m.clone();
        if fix_root {
            m.merkle_root = merkle::root(&m.chunk_digests);
        }
        m.to_bytes()
    }

    #[test]
    fn roundtrip_is_canonical() {
        let (m, _) = build(&[0, 1, 99, 100, 101, 1000], 100);
        let bytes = m.to_bytes();
        let back = Manifest::from_bytes(&bytes, &Limits::default()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.digest(), sha256(&bytes));
        assert_eq!(&bytes[..4], b"BLMF");
        assert_eq!(
            bytes.len() as u64,
            FIXED_LEN
                + 14
                + 3
                + m.files
                    .iter()
                    .map(|f| 10 + f.name.len() as u64)
                    .sum::<u64>()
                + 32 * u64::from(m.chunk_count())
        );
    }

    #[test]
    fn edge_case_file_sizes_have_the_right_chunks() {
        let cs = 100u32;
        let sizes = [0u64, 1, 99, 100, 101, 0, 250];
        let (m, data) = build(&sizes, cs);
        let expected_chunks = [0u32, 1, 1, 1, 2, 0, 3];
        assert_eq!(m.chunk_count(), expected_chunks.iter().sum::<u32>());
        assert_eq!(m.total_bytes(), sizes.iter().sum::<u64>());
        let mut next = 0;
        for (f, &n) in expected_chunks.iter().enumerate() {
            assert_eq!(m.file_chunks(f), next..next + n, "file {f}");
            for (k, index) in m.file_chunks(f).enumerate() {
                let loc = m.chunk(index).unwrap();
                assert_eq!(loc.file, f);
                assert_eq!(loc.offset, k as u64 * u64::from(cs));
                let want_len = (sizes[f] - loc.offset).min(cs.into());
                assert_eq!(u64::from(loc.len), want_len);
                let bytes = &data[f][loc.offset as usize..][..loc.len as usize];
                assert_eq!(&sha256(bytes), m.chunk_digest(index).unwrap());
            }
            next += n;
        }
        assert_eq!(m.chunk(m.chunk_count()), None);
        assert_eq!(m.chunk(u32::MAX), None);
        assert_eq!(m.file_chunks(99), m.chunk_count()..m.chunk_count());
    }

    #[test]
    fn a_single_empty_file_is_a_transfer_of_no_chunks() {
        let (m, _) = build(&[0], 4096);
        assert_eq!(m.chunk_count(), 0);
        assert_eq!(m.merkle_root, merkle::empty_root());
        let back = Manifest::from_bytes(&m.to_bytes(), &Limits::default()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.chunk(0), None);
    }

    #[test]
    fn builder_refuses_no_files() {
        let b = ManifestBuilder::new(TransferId::new_v7(), "edge", [0; 32], "C-1", 10);
        assert_eq!(b.finish(0).unwrap_err(), ProtoError::NoFiles);
    }

    #[test]
    fn builder_refuses_bad_input() {
        let mut b = ManifestBuilder::new(TransferId::new_v7(), "edge", [0; 32], "C-1", 10);
        assert!(matches!(
            b.add_file("../etc/passwd", 0, vec![]),
            Err(ProtoError::BadFileName { .. })
        ));
        assert!(matches!(
            b.add_file("a", 11, vec![[0; 32]]),
            Err(ProtoError::ChunkCountMismatch {
                expected: 2,
                actual: 1,
                ..
            })
        ));
        b.add_file("a", 10, vec![[0; 32]]).unwrap();
        assert!(matches!(
            b.add_file("a", 0, vec![]),
            Err(ProtoError::DuplicateFileName { .. })
        ));
        let m = b.finish(5).unwrap();
        assert_eq!(m.files.len(), 1);

        let mut zero = ManifestBuilder::new(TransferId::new_v7(), "edge", [0; 32], "C-1", 0);
        assert!(matches!(
            zero.add_file("a", 0, vec![]),
            Err(ProtoError::BadChunkSize { .. })
        ));

        let limits = Limits {
            max_files: 2,
            max_chunks: 3,
            max_text_len: 4,
            ..Limits::default()
        };
        let mut b = ManifestBuilder::new(TransferId::new_v7(), "edge", [0; 32], "C-1", 10)
            .with_limits(limits);
        b.add_file("a", 30, vec![[0; 32]; 3]).unwrap();
        assert!(matches!(
            b.add_file("b", 1, vec![[0; 32]]),
            Err(ProtoError::TooManyChunks { count: 4, max: 3 })
        ));
        b.add_file("b", 0, vec![]).unwrap();
        assert!(matches!(
            b.add_file("c", 0, vec![]),
            Err(ProtoError::TooManyFiles { count: 3, max: 2 })
        ));
        b.finish(0).unwrap();

        let mut b =
            ManifestBuilder::new(TransferId::new_v7(), "sender too long", [0; 32], "C-1", 10)
                .with_limits(limits);
        b.add_file("a", 0, vec![]).unwrap();
        assert!(matches!(
            b.finish(0),
            Err(ProtoError::TextTooLong { what: "sender", .. })
        ));
    }

    #[test]
    fn every_manifest_names_a_valid_process_id() {
        let too_long = "p".repeat(usize::from(MAX_PROCESS_ID_LEN) + 1);
        for bad in ["", "C-1\n", "C-\u{1b}[31m", too_long.as_str()] {
            let mut b = ManifestBuilder::new(TransferId::new_v7(), "edge", [0; 32], bad, 10);
            b.add_file("a", 1, vec![[0; 32]]).unwrap();
            assert_eq!(
                b.finish(0),
                Err(ProtoError::BadProcessId { len: bad.len() }),
                "{bad:?}"
            );
        }
        // The decoder refuses the same, whatever an encoder was made to write.
        let (m, _) = build(&[5], 4);
        for bad in ["", "C-1\n", too_long.as_str()] {
            let mut t = m.clone();
            t.process_id = bad.to_owned();
            assert!(
                matches!(
                    Manifest::from_bytes(&t.to_bytes(), &Limits::default()),
                    Err(ProtoError::BadProcessId { .. } | ProtoError::TooLong { .. })
                ),
                "{bad:?}"
            );
        }
        let back = Manifest::from_bytes(&m.to_bytes(), &Limits::default()).unwrap();
        assert_eq!(back.process_id, "C-1");
        assert_eq!(serde_json::to_value(&back).unwrap()["process_id"], "C-1");
    }

    #[test]
    fn decoder_refuses_bad_names() {
        let (m, _) = build(&[5, 5], 4);
        let limits = Limits::default();
        for (bad, rule) in [
            ("..", super::super::NameError::DotOrDotDot),
            ("a/b", super::super::NameError::Slash),
            ("", super::super::NameError::Empty),
            (".x", super::super::NameError::LeadingDot),
        ] {
            let mut t = m.clone();
            t.files[1].name = bad.into();
            match Manifest::from_bytes(&reencode(&t, true), &limits) {
                Err(ProtoError::BadFileName { source, .. }) => assert_eq!(source, rule),
                Err(ProtoError::Truncated { .. }) if bad.is_empty() => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let mut t = m.clone();
        t.files[1].name = t.files[0].name.clone();
        assert!(matches!(
            Manifest::from_bytes(&reencode(&t, true), &limits),
            Err(ProtoError::DuplicateFileName { .. })
        ));
        let mut t = m.clone();
        t.files[1].name = "x".repeat(20);
        let short = Limits {
            max_name_len: 10,
            ..limits
        };
        assert!(matches!(
            Manifest::from_bytes(&reencode(&t, true), &short),
            Err(ProtoError::TooLong {
                what: "file name",
                len: 20,
                max: 10
            })
        ));
    }

    #[test]
    fn decoder_refuses_inconsistent_chunks_and_roots() {
        let (m, _) = build(&[5, 9], 4);
        let limits = Limits::default();
        // One digest short, root fixed up so only the count is wrong.
        let mut t = m.clone();
        t.chunk_digests.pop();
        assert_eq!(
            Manifest::from_bytes(&reencode(&t, true), &limits),
            Err(ProtoError::ChunkTotalMismatch {
                expected: 5,
                actual: 4
            })
        );
        // A size that needs another chunk.
        let mut t = m.clone();
        t.files[0].size = 9;
        assert!(matches!(
            Manifest::from_bytes(&reencode(&t, true), &limits),
            Err(ProtoError::ChunkTotalMismatch {
                expected: 6,
                actual: 5
            })
        ));
        // A digest changed without fixing the root.
        let mut t = m.clone();
        t.chunk_digests[3][0] ^= 1;
        assert_eq!(
            Manifest::from_bytes(&reencode(&t, false), &limits),
            Err(ProtoError::MerkleRootMismatch)
        );
        let mut t = m.clone();
        t.merkle_root = [0; 32];
        assert_eq!(
            Manifest::from_bytes(&t.to_bytes(), &limits),
            Err(ProtoError::MerkleRootMismatch)
        );
        // No files at all.
        let mut t = m.clone();
        t.files.clear();
        t.chunk_digests.clear();
        assert_eq!(
            Manifest::from_bytes(&reencode(&t, true), &limits),
            Err(ProtoError::NoFiles)
        );
        // Chunk size out of range.
        let mut t = m.clone();
        t.chunk_size = 0;
        assert!(matches!(
            Manifest::from_bytes(&t.to_bytes(), &limits),
            Err(ProtoError::BadChunkSize { .. })
        ));
        t.chunk_size = limits.max_chunk_size + 1;
        assert!(matches!(
            Manifest::from_bytes(&t.to_bytes(), &limits),
            Err(ProtoError::BadChunkSize { .. })
        ));
    }

    #[test]
    fn decoder_refuses_too_many_files_or_chunks_before_allocating() {
        let (m, _) = build(&[5, 9, 0], 4);
        let bytes = m.to_bytes();
        let few_files = Limits {
            max_files: 2,
            ..Limits::default()
        };
        assert_eq!(
            Manifest::from_bytes(&bytes, &few_files),
            Err(ProtoError::TooManyFiles { count: 3, max: 2 })
        );
        let few_chunks = Limits {
            max_chunks: 4,
            ..Limits::default()
        };
        assert!(matches!(
            Manifest::from_bytes(&bytes, &few_chunks),
            Err(ProtoError::TooManyChunks { max: 4, .. })
        ));
        // A header claiming u32::MAX files or chunks in a tiny input.
        let mut huge = m.clone();
        huge.files.truncate(1);
        let mut b = huge.to_bytes();
        let files_at = FIXED_LEN as usize - 4 - 4 - 32 + m.sender.len();
        b[files_at..files_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let open = Limits {
            max_files: u32::MAX,
            max_chunks: u32::MAX,
            ..Limits::default()
        };
        assert_eq!(
            Manifest::from_bytes(&b, &open),
            Err(ProtoError::Truncated { what: "manifest" })
        );
        assert!(matches!(
            Manifest::from_bytes(&b, &Limits::default()),
            Err(ProtoError::TooManyFiles { .. })
        ));
    }

    #[test]
    fn decoder_refuses_versions_magic_and_trailing_bytes() {
        let (m, _) = build(&[5], 4);
        let limits = Limits::default();
        let mut t = m.clone();
        t.version = 1;
        assert_eq!(
            Manifest::from_bytes(&t.to_bytes(), &limits),
            Err(ProtoError::UnsupportedVersion {
                what: "manifest",
                version: 1,
                supported: 2
            })
        );
        let mut b = m.to_bytes();
        b[0] = b'X';
        assert_eq!(
            Manifest::from_bytes(&b, &limits),
            Err(ProtoError::BadMagic { what: "manifest" })
        );
        let mut b = m.to_bytes();
        b.push(0);
        assert!(matches!(
            Manifest::from_bytes(&b, &limits),
            Err(ProtoError::TrailingBytes { count: 1, .. })
        ));
        let b = m.to_bytes();
        for cut in 0..b.len() {
            assert!(
                Manifest::from_bytes(&b[..cut], &limits).is_err(),
                "prefix {cut}"
            );
        }
    }

    #[test]
    fn max_encoded_len_is_exact() {
        let limits = Limits {
            max_files: 3,
            max_chunks: 5,
            max_name_len: 12,
            max_text_len: 7,
            ..Limits::default()
        };
        let process_id = "p".repeat(usize::from(MAX_PROCESS_ID_LEN));
        let mut b =
            ManifestBuilder::new(TransferId::new_v7(), "x".repeat(7), [0; 32], process_id, 1)
                .with_limits(limits);
        b.add_file(format!("a{}", "n".repeat(11)), 5, vec![[1; 32]; 5])
            .unwrap();
        b.add_file(format!("b{}", "n".repeat(11)), 0, vec![])
            .unwrap();
        b.add_file(format!("c{}", "n".repeat(11)), 0, vec![])
            .unwrap();
        let m = b.finish(0).unwrap();
        assert_eq!(m.to_bytes().len() as u64, limits.max_manifest_len());
        Manifest::from_bytes(&m.to_bytes(), &limits).unwrap();
    }

    #[test]
    fn json_form_has_hex_digests() {
        let (m, _) = build(&[5], 4);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["transfer_id"], m.transfer_id.to_string());
        assert_eq!(v["merkle_root"], hex::encode(m.merkle_root));
        assert_eq!(v["manifest_digest"], hex::encode(m.digest()));
        assert_eq!(v["chunk_digests"][1], hex::encode(m.chunk_digests[1]));
        assert_eq!(v["files"][0]["name"], "file0.dcm");
        assert_eq!(v["files"][0]["size"], 5);
        assert_eq!(v["total_bytes"], 5);
    }

    #[test]
    fn chunk_hasher_boundaries() {
        let cs = 10u32;
        for len in [0u64, 1, 9, 10, 11, 20, 25] {
            let data = content(len, len);
            let mut h = ChunkHasher::new(cs);
            h.update(&data);
            assert_eq!(
                h.digests().len() as u64,
                len / 10,
                "complete chunks are emitted at once"
            );
            assert_eq!(h.bytes(), len);
            assert_eq!(h.finish(), digests_of(&data, cs), "len {len}");
        }
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        (
            1u32..64,
            proptest::collection::vec(0u64..300, 1..6),
            ".{0,20}",
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            "[A-Za-z0-9._:/-]{1,128}",
        )
            .prop_map(|(cs, sizes, sender, created, decl, id, process_id)| {
                let mut b = ManifestBuilder::new(TransferId(id), sender, decl, process_id, cs);
                for (i, size) in sizes.into_iter().enumerate() {
                    let data = content(i as u64, size);
                    b.add_file(format!("f{i}"), size, digests_of(&data, cs))
                        .unwrap();
                }
                b.finish(created).unwrap()
            })
    }

    proptest! {
        #[test]
        fn prop_roundtrip(m in arb_manifest()) {
            let bytes = m.to_bytes();
            let back = Manifest::from_bytes(&bytes, &Limits::default()).unwrap();
            prop_assert_eq!(back.to_bytes(), bytes);
            prop_assert_eq!(&back, &m);
            // Every chunk's location is inside its file and they tile it.
            let mut covered = vec![0u64; m.files.len()];
            for i in 0..m.chunk_count() {
                let loc = back.chunk(i).unwrap();
                prop_assert_eq!(loc.offset, covered[loc.file]);
                covered[loc.file] += u64::from(loc.len);
            }
            for (f, entry) in m.files.iter().enumerate() {
                prop_assert_eq!(covered[f], entry.size);
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Manifest::from_bytes(&bytes, &Limits::default());
            let mut with_magic = MANIFEST_MAGIC.to_vec();
            with_magic.extend_from_slice(&[0, 1]);
            with_magic.extend_from_slice(&bytes);
            let _ = Manifest::from_bytes(&with_magic, &Limits::default());
        }

        #[test]
        fn prop_mutations_are_refused_or_canonical(m in arb_manifest(), at in any::<usize>(), xor in 1u8..=255) {
            let mut bytes = m.to_bytes();
            let at = at % bytes.len();
            bytes[at] ^= xor;
            if let Ok(other) = Manifest::from_bytes(&bytes, &Limits::default()) {
                // Only fields the root does not cover can change unnoticed
                // (ids, sender, times, names); the signature covers those.
                prop_assert_eq!(other.to_bytes(), bytes);
                prop_assert_ne!(other, m);
            }
        }

        #[test]
        fn prop_hasher_is_split_independent(len in 0u64..2000, cs in 1u32..300, cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
            let data = content(len, len);
            let mut h = ChunkHasher::new(cs);
            let mut rest = &data[..];
            for c in cuts {
                let c = if rest.is_empty() { 0 } else { c % (rest.len() + 1) };
                h.update(&rest[..c]);
                rest = &rest[c..];
            }
            h.update(rest);
            prop_assert_eq!(h.finish(), digests_of(&data, cs));
        }
    }
}
