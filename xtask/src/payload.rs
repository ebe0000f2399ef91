//! Demo payloads: pseudo-random bytes (not zeros, so nothing along the way can get away with
//! compressing or skipping them), written in large blocks with progress every 10 %.
//!
//! xtask runs as an unoptimised build, where a PRNG loop over every 8 bytes manages well under
//! 100 MiB/s. So a payload is assembled from 4 KiB pieces copied (memcpy speed) out of a 1 MiB
//! random pool at random offsets, each piece stamped with a fresh random 64-bit word: every
//! piece is distinct, and writing runs at disk speed.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::size::human;

/// wyrand: a tiny, fast, non-cryptographic generator; plenty for test data.
#[derive(Debug, Clone)]
pub struct WyRand(u64);

impl WyRand {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> WyRand {
        WyRand(seed)
    }

    /// A generator seeded from the clock and the process id.
    pub fn from_entropy() -> WyRand {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        WyRand::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }
}

const BLOCK: usize = 4 << 20;
const POOL: usize = 1 << 20;
const PIECE: usize = 4096;

/// Fast pseudo-random payload bytes (see the module documentation).
#[derive(Debug)]
pub struct PayloadRng {
    rng: WyRand,
    pool: Vec<u8>,
}

impl PayloadRng {
    /// A payload generator whose pool and offsets come from `rng`.
    pub fn new(mut rng: WyRand) -> PayloadRng {
        let mut pool = vec![0u8; POOL + PIECE];
        rng.fill(&mut pool);
        PayloadRng { rng, pool }
    }

    /// Fills `buf` with payload bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for piece in buf.chunks_mut(PIECE) {
            let offset = (self.rng.next_u64() % POOL as u64) as usize;
            piece.copy_from_slice(&self.pool[offset..offset + piece.len()]);
            let stamp = self.rng.next_u64().to_le_bytes();
            let n = piece.len().min(stamp.len());
            piece[..n].copy_from_slice(&stamp[..n]);
        }
    }
}

/// Writes `size` pseudo-random bytes to a new file at `path`, printing progress every 10 %.
pub fn write(path: &Path, size: u64, rng: &mut PayloadRng) -> Result<()> {
    let mut file =
        File::create_new(path).with_context(|| format!("cannot create {}", path.display()))?;
    let start = Instant::now();
    let mut buf = vec![0u8; BLOCK];
    let mut written: u64 = 0;
    let mut next_tenth: u64 = 1;
    println!("payload: writing {} to {}", human(size), path.display());
    while written < size {
        let n = usize::try_from(size - written).map_or(BLOCK, |left| left.min(BLOCK));
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        written += n as u64;
        // Print each 10 % step crossed (u128: no overflow for any u64 size).
        while next_tenth <= 10
            && u128::from(written) * 10 >= u128::from(size) * u128::from(next_tenth)
        {
            println!("payload: {:>3}% ({})", next_tenth * 10, human(written));
            next_tenth += 1;
        }
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "payload: {} written in {secs:.1} s ({:.0} MiB/s)",
        human(size),
        size as f64 / (1 << 20) as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_not_constant() {
        let mut a = WyRand::new(42);
        let mut b = WyRand::new(42);
        let xs: Vec<u64> = (0..64).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..64).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut sorted = xs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), xs.len());
    }

    #[test]
    fn fill_covers_odd_lengths_and_looks_random() {
        let mut rng = WyRand::new(7);
        let mut buf = vec![0u8; 1 << 16];
        rng.fill(&mut buf[..13]);
        assert!(buf[..13].iter().any(|&b| b != 0));
        rng.fill(&mut buf);
        // Every byte value shows up in 64 KiB of decent random data.
        let mut seen = [false; 256];
        for &b in &buf {
            seen[usize::from(b)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        let zeros = buf.iter().filter(|&&b| b == 0).count();
        assert!(zeros < 1000, "{zeros} zero bytes");
    }

    #[test]
    fn payload_pieces_are_distinct_and_not_zero() {
        let mut p = PayloadRng::new(WyRand::new(3));
        let mut buf = vec![0u8; 8 << 20];
        p.fill(&mut buf);
        let mut pieces: Vec<&[u8]> = buf.chunks(PIECE).collect();
        let n = pieces.len();
        pieces.sort_unstable();
        pieces.dedup();
        assert_eq!(pieces.len(), n, "repeated 4 KiB pieces");
        let zeros = buf.iter().filter(|&&b| b == 0).count();
        // About 1/256 of random bytes are zero.
        assert!(zeros < buf.len() / 200, "{zeros} zero bytes");
        // Two generators from different seeds disagree.
        let mut q = PayloadRng::new(WyRand::new(4));
        let mut other = vec![0u8; PIECE];
        q.fill(&mut other);
        assert_ne!(&buf[..PIECE], &other[..]);
    }

    #[test]
    fn writes_exactly_the_size_asked() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0u64, 1, 4095, (BLOCK as u64) + 3] {
            let path = dir.path().join(format!("p{size}"));
            write(&path, size, &mut PayloadRng::new(WyRand::new(size))).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        }
        // Refuses to overwrite.
        let e = write(
            &dir.path().join("p1"),
            1,
            &mut PayloadRng::new(WyRand::new(1)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
    }
}
