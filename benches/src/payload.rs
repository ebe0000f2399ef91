//! Benchmark payloads: pseudo-random bytes (incompressible, reproducible), written once per
//! invocation as one or more files, with their SHA-256 so every delivered copy can be checked.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use aws_lc_rs::digest;

/// Block size for writing and hashing files.
const BLOCK: usize = 1 << 20;

/// A small, fast pseudo-random generator (xorshift64*): incompressible bytes at memcpy-like
/// speed. Not for anything secret.
#[derive(Debug, Clone)]
pub struct PseudoRandom(u64);

impl PseudoRandom {
    /// A generator from `seed` (a zero seed is replaced: xorshift never leaves zero).
    pub fn new(seed: u64) -> PseudoRandom {
        PseudoRandom(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut words = buf.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.fill(&mut buf);
        buf
    }
}

/// One payload file.
#[derive(Debug, Clone)]
pub struct PayloadFile {
    /// File name (what the gateway delivers it as).
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents.
    pub sha256: [u8; 32],
}

/// Sizes of `files` files that add up to `total` (the first `total % files` get one byte more).
pub fn split_sizes(total: u64, files: u32) -> Vec<u64> {
    let files = u64::from(files.max(1));
    let (base, extra) = (total / files, total % files);
    (0..files).map(|i| base + u64::from(i < extra)).collect()
}

/// Writes `total` pseudo-random bytes split into `files` files in `dir`, named
/// `payload.bin` (one file) or `payload-0000.bin`, `payload-0001.bin`, ...
pub fn generate(dir: &Path, total: u64, files: u32, seed: u64) -> anyhow::Result<Vec<PayloadFile>> {
    let sizes = split_sizes(total, files);
    let mut rng = PseudoRandom::new(seed);
    let mut block = vec![0u8; BLOCK];
    let mut out = Vec::with_capacity(sizes.len());
    for (i, size) in sizes.into_iter().enumerate() {
        let name = if files <= 1 {
            "payload.bin".to_owned()
        } else {
            format!("payload-{i:04}.bin")
        };
        let path = dir.join(&name);
        let mut file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut hash = digest::Context::new(&digest::SHA256);
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left).map_or(BLOCK, |l| l.min(BLOCK));
            rng.fill(&mut block[..n]);
            hash.update(&block[..n]);
            file.write_all(&block[..n])
                .with_context(|| format!("cannot write {}", path.display()))?;
            left -= n as u64;
        }
        file.sync_all()
            .with_context(|| format!("cannot sync {}", path.display()))?;
        out.push(PayloadFile {
            name,
            path,
            size,
            sha256: finish(hash),
        });
    }
    Ok(out)
}

/// SHA-256 and length of a file.
pub fn sha256_file(path: &Path) -> anyhow::Result<([u8; 32], u64)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut block = vec![0u8; BLOCK];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut block)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&block[..n]);
        len += n as u64;
    }
    Ok((finish(hash), len))
}

fn finish(hash: digest::Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_up() {
        assert_eq!(split_sizes(10, 1), vec![10]);
        assert_eq!(split_sizes(10, 3), vec![4, 3, 3]);
        assert_eq!(split_sizes(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split_sizes(7, 0), vec![7]);
        let sizes = split_sizes((1 << 30) + 5, 7);
        assert_eq!(sizes.iter().sum::<u64>(), (1 << 30) + 5);
    }

    #[test]
    fn pseudo_random_is_reproducible_and_not_constant() {
        let a = PseudoRandom::new(7).bytes(1003);
        let b = PseudoRandom::new(7).bytes(1003);
        assert_eq!(a, b);
        assert_ne!(PseudoRandom::new(8).bytes(1003), a);
        let zeros = a.iter().filter(|&&x| x == 0).count();
        assert!(zeros < 20, "{zeros} zero bytes in 1003");
    }

    #[test]
    fn generated_files_hash_as_reported() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), 3 * BLOCK as u64 + 17, 2, 1).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].name, "payload-0000.bin");
        assert_eq!(files[0].size + files[1].size, 3 * BLOCK as u64 + 17);
        for f in &files {
            let (sha, len) = sha256_file(&f.path).unwrap();
            assert_eq!(len, f.size);
            assert_eq!(sha, f.sha256);
        }
        let one = generate(&dir.path().join("."), 5, 1, 1);
        assert_eq!(one.unwrap()[0].name, "payload.bin");
    }
}
