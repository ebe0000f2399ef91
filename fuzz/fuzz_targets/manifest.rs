//! `Manifest::from_bytes` (and `Receipt::from_bytes`, `DeliveryNotice::from_bytes`) on
//! arbitrary bytes.
//!
//! Byte 0 picks the mode:
//! - even: the rest is decoded as it is;
//! - odd: the rest is a recipe for a valid manifest (chunk size, names,
//!   sizes) built with `ManifestBuilder`, encoded, then damaged at one
//!   fuzz-chosen byte and decoded, so the fuzzer explores the decoder past
//!   the Merkle root check it could never satisfy by chance.
//!
//! Checks, beyond not panicking: an accepted manifest re-encodes to exactly
//! the input (canonical), its chunks tile every file, and an accepted receipt
//! or delivery notice re-encodes to the input.
#![no_main]

use baylink_net::proto::{
    DeliveryNotice, Digest, Limits, Manifest, ManifestBuilder, Receipt, TransferId, sha256,
};
use libfuzzer_sys::fuzz_target;

fn limits() -> Limits {
    Limits {
        max_files: 64,
        max_chunks: 4096,
        ..Limits::default()
    }
}

fn check(bytes: &[u8]) {
    let Ok(m) = Manifest::from_bytes(bytes, &limits()) else {
        return;
    };
    assert_eq!(m.to_bytes(), bytes, "accepted manifest is not canonical");
    let mut next = 0u32;
    for (f, entry) in m.files.iter().enumerate() {
        let range = m.file_chunks(f);
        assert_eq!(range.start, next);
        let mut offset = 0u64;
        for i in range.clone() {
            let loc = m.chunk(i).expect("chunk in range");
            assert_eq!((loc.file, loc.offset), (f, offset));
            assert!(loc.len > 0 && loc.len <= m.chunk_size);
            offset += u64::from(loc.len);
        }
        assert_eq!(offset, entry.size);
        next = range.end;
    }
    assert_eq!(next, m.chunk_count());
    assert!(m.chunk(next).is_none());
}

/// Builds a manifest from a recipe; `None` when the builder refuses it.
fn from_recipe(recipe: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let (&cs, mut rest) = recipe.split_first()?;
    let chunk_size = u32::from(cs % 64) + 1;
    let mut builder = ManifestBuilder::new(TransferId([7; 16]), "edge", [1; 32], "C-1", chunk_size)
        .with_limits(limits());
    let mut index = 0u32;
    while let [name_len, size, tail @ ..] = rest {
        let name_len = usize::from(name_len % 12).min(tail.len());
        let name = String::from_utf8_lossy(&tail[..name_len]).into_owned();
        rest = &tail[name_len..];
        let size = u64::from(*size) * 3;
        let chunks = size.div_ceil(u64::from(chunk_size));
        let digests: Vec<Digest> = (0..chunks)
            .map(|_| {
                index += 1;
                sha256(&index.to_be_bytes())
            })
            .collect();
        if builder.add_file(name, size, digests).is_err() {
            return None;
        }
        if rest.first() == Some(&0) {
            rest = &rest[1..];
            break;
        }
    }
    let manifest = builder.finish(12345).ok()?;
    Some((manifest.to_bytes(), rest))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check(rest);
        if let Ok(r) = Receipt::from_bytes(rest) {
            assert_eq!(r.to_bytes(), rest, "accepted receipt is not canonical");
        }
        if let Ok(n) = DeliveryNotice::from_bytes(rest) {
            assert_eq!(n.to_bytes(), rest, "accepted delivery notice is not canonical");
        }
        return;
    }
    let Some((mut bytes, damage)) = from_recipe(rest) else {
        return;
    };
    let limits = limits();
    let m = Manifest::from_bytes(&bytes, &limits).expect("built manifests decode");
    assert_eq!(m.to_bytes(), bytes);
    check(&bytes);
    if let [a, b, c, ..] = damage {
        let at = (usize::from(*a) << 8 | usize::from(*b)) % bytes.len();
        bytes[at] ^= c | 1;
        check(&bytes);
    }
});
