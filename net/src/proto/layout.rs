//! The shape of a transfer before its manifest exists: chunk size and file sizes.
//!
//! A sender that streams chunks before its manifest is signed (see [`super::Frame::Announce`])
//! tells the receiver this much first, so the receiver knows where each chunk's bytes go.
//! It says nothing about what the bytes must be: only the signed manifest does, and a chunk
//! received under an announcement counts once its digest equals the manifest's.
//!
//! A layout may grow: a sender whose files are still arriving announces each one as it is
//! complete ([`Layout::extended`]). Files are only ever added at the end, so a chunk keeps
//! its index, and the manifest that ends the transfer begins with the announced files in
//! the announced order ([`Layout::is_prefix_of`]).

use super::manifest::{ChunkLocation, Manifest, check_chunk_size, chunks_for};

/// Most files one transfer may announce before its offer (all its announcements together): a
/// receiver holds each one open until the offer, and a transfer of more files sends the
/// rest after it. Bounds, too, what a sender can make a receiver redo per announcement.
pub const MAX_ANNOUNCED_FILES: usize = 1024;
use super::{Limits, ProtoError};

/// Chunk size and file sizes, in manifest order, checked against [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    chunk_size: u32,
    file_sizes: Vec<u64>,
    /// Per file, its first global chunk index; then the total.
    first_chunk: Vec<u32>,
}

impl Layout {
    /// A layout of `file_sizes` cut into `chunk_size` chunks: at least one file, at most
    /// `limits.max_files`, at most `limits.max_chunks` chunks in all.
    pub fn new(chunk_size: u32, file_sizes: Vec<u64>, limits: &Limits) -> Result<Self, ProtoError> {
        check_chunk_size(chunk_size, limits)?;
        if file_sizes.is_empty() {
            return Err(ProtoError::NoFiles);
        }
        if file_sizes.len() > limits.max_files as usize {
            return Err(ProtoError::TooManyFiles {
                count: file_sizes.len() as u64,
                max: limits.max_files,
            });
        }
        let mut first_chunk = Vec::with_capacity(file_sizes.len() + 1);
        let mut next: u64 = 0;
        for &size in &file_sizes {
            first_chunk.push(next as u32);
            next = next.saturating_add(chunks_for(size, chunk_size));
            if next > u64::from(limits.max_chunks) {
                return Err(ProtoError::TooManyChunks {
                    count: next,
                    max: limits.max_chunks,
                });
            }
        }
        first_chunk.push(next as u32);
        Ok(Layout {
            chunk_size,
            file_sizes,
            first_chunk,
        })
    }

    /// The layout a manifest describes.
    pub fn of(manifest: &Manifest) -> Self {
        let file_sizes: Vec<u64> = manifest.files.iter().map(|f| f.size).collect();
        let first_chunk = (0..manifest.files.len())
            .map(|f| manifest.file_chunks(f).start)
            .chain(std::iter::once(manifest.chunk_count()))
            .collect();
        Layout {
            chunk_size: manifest.chunk_size,
            file_sizes,
            first_chunk,
        }
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The file sizes, in manifest order.
    pub fn file_sizes(&self) -> &[u64] {
        &self.file_sizes
    }

    /// The sum of the file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.file_sizes
            .iter()
            .fold(0u64, |sum, &size| sum.saturating_add(size))
    }

    /// Total chunks.
    pub fn chunk_count(&self) -> u32 {
        *self.first_chunk.last().expect("a layout has a total")
    }

    /// The global index of the first chunk of file number `file`.
    pub fn first_chunk(&self, file: usize) -> Option<u32> {
        self.first_chunk
            .get(..self.file_sizes.len())?
            .get(file)
            .copied()
    }

    /// The number of files.
    pub fn file_count(&self) -> usize {
        self.file_sizes.len()
    }

    /// This layout with `more` files after its own, checked against `limits` as a whole.
    pub fn extended(&self, more: &[u64], limits: &Limits) -> Result<Layout, ProtoError> {
        let mut sizes = Vec::with_capacity(self.file_sizes.len() + more.len());
        sizes.extend_from_slice(&self.file_sizes);
        sizes.extend_from_slice(more);
        Layout::new(self.chunk_size, sizes, limits)
    }

    /// Whether `manifest` begins with this layout: the same chunk size, and its first files
    /// are these, in this order, with these sizes. Every chunk of the layout then has the
    /// same index and place in the manifest.
    pub fn is_prefix_of(&self, manifest: &Manifest) -> bool {
        manifest.chunk_size == self.chunk_size
            && manifest.files.len() >= self.file_sizes.len()
            && manifest
                .files
                .iter()
                .zip(&self.file_sizes)
                .all(|(f, &size)| f.size == size)
    }

    /// Where chunk `index` lives, or `None` past the last chunk. O(log files).
    pub fn chunk(&self, index: u32) -> Option<ChunkLocation> {
        if index >= self.chunk_count() {
            return None;
        }
        // The last file whose first chunk is <= index (empty files share their first index
        // with the next file and are skipped over).
        let file = self.first_chunk[..self.file_sizes.len()].partition_point(|&f| f <= index) - 1;
        let size = *self.file_sizes.get(file)?;
        let offset = u64::from(index - self.first_chunk[file]) * u64::from(self.chunk_size);
        let len = size.checked_sub(offset)?.min(u64::from(self.chunk_size));
        Some(ChunkLocation {
            file,
            offset,
            len: u32::try_from(len).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::proto::{ManifestBuilder, TransferId};

    #[test]
    fn locates_chunks_as_the_manifest_of_the_same_files_does() {
        let sizes = [10u64, 0, 4, 9, 0];
        let mut b = ManifestBuilder::new(TransferId([1; 16]), "e", [0; 32], "c", 4);
        for (i, &size) in sizes.iter().enumerate() {
            let n = size.div_ceil(4) as usize;
            b.add_file(format!("f{i}"), size, vec![[0; 32]; n]).unwrap();
        }
        let manifest = b.finish(1).unwrap();
        let layout = Layout::new(4, sizes.to_vec(), &Limits::default()).unwrap();
        assert_eq!(layout, Layout::of(&manifest));
        assert!(layout.is_prefix_of(&manifest));
        assert_eq!(layout.chunk_count(), manifest.chunk_count());
        assert_eq!(layout.total_bytes(), manifest.total_bytes());
        for index in 0..=manifest.chunk_count() {
            assert_eq!(layout.chunk(index), manifest.chunk(index), "chunk {index}");
        }
        assert_eq!(layout.first_chunk(3), Some(4));
        assert_eq!(layout.first_chunk(5), None);

        let other = Layout::new(4, vec![10, 0, 4, 8, 0], &Limits::default()).unwrap();
        assert!(!other.is_prefix_of(&manifest));
        let other = Layout::new(2, sizes.to_vec(), &Limits::default()).unwrap();
        assert!(!other.is_prefix_of(&manifest));
        let longer = layout.extended(&[1], &Limits::default()).unwrap();
        assert!(!longer.is_prefix_of(&manifest));
    }

    #[test]
    fn a_grown_layout_keeps_every_chunk_where_it_was() {
        let sizes = [10u64, 0, 4, 9, 0];
        let limits = Limits::default();
        let mut layout = Layout::new(4, sizes[..1].to_vec(), &limits).unwrap();
        for (n, &size) in sizes.iter().enumerate().skip(1) {
            let before = layout.clone();
            layout = layout.extended(&[size], &limits).unwrap();
            assert_eq!(layout.file_count(), n + 1);
            for index in 0..before.chunk_count() {
                assert_eq!(before.chunk(index), layout.chunk(index), "chunk {index}");
            }
        }
        assert_eq!(layout, Layout::new(4, sizes.to_vec(), &limits).unwrap());

        let mut b = ManifestBuilder::new(TransferId([1; 16]), "e", [0; 32], "c", 4);
        for (i, &size) in sizes.iter().chain(&[7]).enumerate() {
            let n = size.div_ceil(4) as usize;
            b.add_file(format!("f{i}"), size, vec![[0; 32]; n]).unwrap();
        }
        let manifest = b.finish(1).unwrap();
        // The manifest has one file more than was announced: the announced ones lead it.
        assert!(layout.is_prefix_of(&manifest));
        let first = Layout::new(4, vec![10], &limits).unwrap();
        assert!(first.is_prefix_of(&manifest));
        let wrong = Layout::new(4, vec![0], &limits).unwrap();
        assert!(!wrong.is_prefix_of(&manifest));

        let tight = Limits {
            max_files: 2,
            ..Limits::default()
        };
        let two = Layout::new(4, vec![1, 1], &tight).unwrap();
        assert!(matches!(
            two.extended(&[1], &tight),
            Err(ProtoError::TooManyFiles { count: 3, .. })
        ));
    }

    #[test]
    fn refuses_what_the_limits_refuse() {
        let limits = Limits {
            max_files: 2,
            max_chunks: 5,
            max_chunk_size: 8,
            ..Limits::default()
        };
        assert!(matches!(
            Layout::new(0, vec![1], &limits),
            Err(ProtoError::BadChunkSize { .. })
        ));
        assert!(matches!(
            Layout::new(9, vec![1], &limits),
            Err(ProtoError::BadChunkSize { .. })
        ));
        assert!(matches!(
            Layout::new(4, vec![], &limits),
            Err(ProtoError::NoFiles)
        ));
        assert!(matches!(
            Layout::new(4, vec![1, 1, 1], &limits),
            Err(ProtoError::TooManyFiles { .. })
        ));
        assert!(matches!(
            Layout::new(4, vec![20, 4], &limits),
            Err(ProtoError::TooManyChunks { count: 6, .. })
        ));
        assert!(matches!(
            Layout::new(1, vec![u64::MAX], &limits),
            Err(ProtoError::TooManyChunks { .. })
        ));
        assert_eq!(Layout::new(4, vec![20], &limits).unwrap().chunk_count(), 5);
    }
}
