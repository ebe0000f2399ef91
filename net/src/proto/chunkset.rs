//! A set of chunk indices as a bitmap: the receiver's have-list.

use super::ProtoError;

/// A set of chunk indices `0..len()`, stored as a bitmap.
///
/// On the wire (in `Have` frames) it is `ceil(len / 8)` bytes, chunk `i`
/// being bit `i % 8` (least significant first) of byte `i / 8`; the padding
/// bits past `len()` must be zero, so each set has exactly one encoding.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkSet {
    len: u32,
    count: u32,
    bits: Vec<u8>,
}

impl std::fmt::Debug for ChunkSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkSet({}/{})", self.count, self.len)
    }
}

impl ChunkSet {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Self {
        Self {
            len,
            count: 0,
            bits: vec![0; Self::encoded_len(len)],
        }
    }

    /// A set over `len` chunks holding all of them.
    pub fn full(len: u32) -> Self {
        let mut set = Self::new(len);
        for i in 0..len {
            set.insert(i);
        }
        set
    }

    /// The size of the bitmap encoding for `len` chunks.
    pub fn encoded_len(len: u32) -> usize {
        len.div_ceil(8) as usize
    }

    /// Adds `index`; returns whether it was newly added. Indices out of range
    /// are ignored (and return `false`).
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.len {
            return false;
        }
        let (byte, mask) = Self::position(index);
        let fresh = self.bits[byte] & mask == 0;
        if fresh {
            self.bits[byte] |= mask;
            self.count += 1;
        }
        fresh
    }

    /// Removes `index`; returns whether it was present.
    pub fn remove(&mut self, index: u32) -> bool {
        if !self.contains(index) {
            return false;
        }
        let (byte, mask) = Self::position(index);
        self.bits[byte] &= !mask;
        self.count -= 1;
        true
    }

    /// Whether `index` is in the set (`false` when out of range).
    pub fn contains(&self, index: u32) -> bool {
        if index >= self.len {
            return false;
        }
        let (byte, mask) = Self::position(index);
        self.bits[byte] & mask != 0
    }

    /// The number of chunks the set ranges over (not the number held; see
    /// [`ChunkSet::count`]).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the set ranges over no chunks at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of chunks held.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether every chunk is held.
    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    /// The indices not held, in increasing order.
    pub fn missing(&self) -> Indices<'_> {
        Indices {
            set: self,
            next: 0,
            want: false,
        }
    }

    /// The indices held, in increasing order.
    pub fn iter(&self) -> Indices<'_> {
        Indices {
            set: self,
            next: 0,
            want: true,
        }
    }

    /// The canonical bitmap encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bits.clone()
    }

    /// Decodes a bitmap over `len` chunks: exactly
    /// [`ChunkSet::encoded_len`]`(len)` bytes with zero padding bits.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Self, ProtoError> {
        let expected = Self::encoded_len(len);
        let refuse = || ProtoError::BadChunkSet {
            chunks: len,
            expected,
            actual: bytes.len(),
        };
        if bytes.len() != expected {
            return Err(refuse());
        }
        let used = len % 8;
        if used != 0 && bytes[expected - 1] >> used != 0 {
            return Err(refuse());
        }
        let count = bytes.iter().map(|b| b.count_ones()).sum();
        Ok(Self {
            len,
            count,
            bits: bytes.to_vec(),
        })
    }

    fn position(index: u32) -> (usize, u8) {
        ((index / 8) as usize, 1 << (index % 8))
    }
}

/// An iterator over the indices a [`ChunkSet`] holds (from
/// [`ChunkSet::iter`]) or lacks (from [`ChunkSet::missing`]). Whole bytes
/// that cannot match are skipped.
#[derive(Debug, Clone)]
pub struct Indices<'a> {
    set: &'a ChunkSet,
    next: u32,
    want: bool,
}

impl Iterator for Indices<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let skip = if self.want { 0x00 } else { 0xff };
        while self.next < self.set.len {
            let i = self.next;
            if i.is_multiple_of(8) && self.set.bits[(i / 8) as usize] == skip {
                self.next = i.saturating_add(8);
                continue;
            }
            self.next += 1;
            if self.set.contains(i) == self.want {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_and_zero_sized_sets() {
        let s = ChunkSet::new(0);
        assert!(s.is_empty() && s.is_full());
        assert_eq!(s.to_bytes(), Vec::<u8>::new());
        assert_eq!(s.missing().count(), 0);
        assert_eq!(ChunkSet::from_bytes(0, &[]).unwrap(), s);
        assert!(ChunkSet::from_bytes(0, &[0]).is_err());
    }

    #[test]
    fn insert_remove_contains_count() {
        let mut s = ChunkSet::new(10);
        assert!(s.insert(3));
        assert!(!s.insert(3));
        assert!(!s.insert(10));
        assert!(s.insert(9));
        assert_eq!(s.count(), 2);
        assert!(s.contains(3) && s.contains(9) && !s.contains(4) && !s.contains(1000));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 9]);
        assert_eq!(
            s.missing().collect::<Vec<_>>(),
            vec![0, 1, 2, 4, 5, 6, 7, 8]
        );
        assert!(s.remove(3));
        assert!(!s.remove(3));
        assert_eq!(s.count(), 1);
        assert_eq!(s.to_bytes(), vec![0, 0b10]);
        assert!(ChunkSet::full(10).is_full());
        assert_eq!(ChunkSet::full(10).to_bytes(), vec![0xff, 0b11]);
    }

    #[test]
    fn refuses_wrong_length_and_padding() {
        assert!(ChunkSet::from_bytes(10, &[0]).is_err());
        assert!(ChunkSet::from_bytes(10, &[0, 0, 0]).is_err());
        assert!(ChunkSet::from_bytes(10, &[0, 0b100]).is_err());
        assert!(ChunkSet::from_bytes(16, &[0xff, 0xff]).unwrap().is_full());
    }

    proptest! {
        #[test]
        fn bytes_roundtrip(len in 0u32..300, members in proptest::collection::vec(any::<u32>(), 0..300)) {
            let mut s = ChunkSet::new(len);
            let mut model = std::collections::BTreeSet::new();
            for m in members {
                if len > 0 {
                    let i = m % len;
                    prop_assert_eq!(s.insert(i), model.insert(i));
                }
            }
            prop_assert_eq!(s.count() as usize, model.len());
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(
                s.missing().collect::<Vec<_>>(),
                (0..len).filter(|i| !model.contains(i)).collect::<Vec<_>>()
            );
            let back = ChunkSet::from_bytes(len, &s.to_bytes()).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn from_bytes_never_panics(len in any::<u32>(), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ChunkSet::from_bytes(len % 600, &bytes);
        }
    }
}
