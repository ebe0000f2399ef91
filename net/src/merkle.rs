//! RFC 6962 (Certificate Transparency) Merkle trees over SHA-256.
//!
//! A leaf's hash is `SHA-256(0x00 || data)`, an interior node's is
//! `SHA-256(0x01 || left || right)`, the empty tree's is `SHA-256("")`, and a
//! tree of `n > 1` leaves splits at the largest power of two below `n`
//! (RFC 6962 §2.1). Proof verification follows RFC 9162 §2.1.3.2 and
//! §2.1.4.2.
//!
//! Two families of functions:
//! - [`root`], [`inclusion_proof`], [`consistency_proof`] take *chunk
//!   digests*: each 32-byte digest is the leaf's data, hashed with
//!   [`leaf_hash`] inside. This is the manifest's tree.
//! - The `*_from_leaf_hashes` variants take leaf hashes that the caller
//!   computed with [`leaf_hash`] over data of any length (the audit log's
//!   records).
//!
//! The verifiers take a *leaf hash*: for a chunk digest `d`, pass
//! `leaf_hash(&d)`.

use aws_lc_rs::digest::{Context, SHA256};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Digest {
    let d = aws_lc_rs::digest::digest(&SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Why a proof was refused, or could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is outside a tree of {size} leaves")]
    IndexOutOfRange {
        /// The index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The old tree is larger than the new one.
    #[error("a tree of {old} leaves cannot be a prefix of one of {new}")]
    SizeOutOfRange {
        /// The old size.
        old: u64,
        /// The new size.
        new: u64,
    },
    /// The proof has the wrong number of hashes for these sizes.
    #[error("the proof has the wrong number of hashes")]
    WrongLength,
    /// The proof leads to a different root.
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
}

/// `SHA-256(0x00 || data)`: the hash of one leaf.
pub fn leaf_hash(data: &[u8]) -> Digest {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(data);
    finish(ctx)
}

/// `SHA-256(0x01 || left || right)`: the hash of an interior node.
pub fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

fn finish(ctx: Context) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The root of the empty tree, `SHA-256("")`.
pub fn empty_root() -> Digest {
    sha256(b"")
}

/// The root of the tree whose leaves are the given chunk digests.
pub fn root(leaves: &[Digest]) -> Digest {
    root_of(leaves.iter().map(|d| leaf_hash(d)))
}

/// The root of the tree with the given leaf hashes.
pub fn root_from_leaf_hashes(leaf_hashes: &[Digest]) -> Digest {
    root_of(leaf_hashes.iter().copied())
}

/// Streams leaf hashes into a stack of perfect subtrees (sizes strictly
/// decreasing from bottom to top), then folds the stack from the right: the
/// RFC 6962 tree is exactly the perfect subtrees of the binary expansion of
/// `n`, largest on the left. Memory is O(log n).
fn root_of(leaf_hashes: impl Iterator<Item = Digest>) -> Digest {
    let mut stack: Vec<(u64, Digest)> = Vec::new();
    for hash in leaf_hashes {
        let mut current = (1u64, hash);
        while let Some(&(size, left)) = stack.last() {
            if size != current.0 {
                break;
            }
            stack.pop();
            current = (size * 2, node_hash(&left, &current.1));
        }
        stack.push(current);
    }
    let Some((_, mut acc)) = stack.pop() else {
        return empty_root();
    };
    while let Some((_, left)) = stack.pop() {
        acc = node_hash(&left, &acc);
    }
    acc
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The inclusion proof (audit path) for leaf `index` in the tree of the given
/// chunk digests, deepest sibling first.
pub fn inclusion_proof(index: u64, leaves: &[Digest]) -> Result<Vec<Digest>, ProofError> {
    let hashes: Vec<Digest> = leaves.iter().map(|d| leaf_hash(d)).collect();
    inclusion_proof_from_leaf_hashes(index, &hashes)
}

/// The inclusion proof for leaf `index` in the tree of the given leaf hashes.
pub fn inclusion_proof_from_leaf_hashes(
    index: u64,
    leaf_hashes: &[Digest],
) -> Result<Vec<Digest>, ProofError> {
    let size = leaf_hashes.len() as u64;
    let m = usize::try_from(index)
        .ok()
        .filter(|&m| m < leaf_hashes.len())
        .ok_or(ProofError::IndexOutOfRange { index, size })?;
    let mut out = Vec::new();
    path(m, leaf_hashes, &mut out);
    Ok(out)
}

/// RFC 6962 §2.1.1 `PATH(m, D[n])`.
fn path(m: usize, d: &[Digest], out: &mut Vec<Digest>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &d[..k], out);
        out.push(root_from_leaf_hashes(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(root_from_leaf_hashes(&d[..k]));
    }
}

/// Checks that `leaf_hash` is leaf `index` of the tree of `tree_size` leaves
/// with root `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Digest,
    index: u64,
    tree_size: u64,
    proof: &[Digest],
    root: &Digest,
) -> Result<(), ProofError> {
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange {
            index,
            size: tree_size,
        });
    }
    let (mut f, mut s) = (index, tree_size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The consistency proof that the tree of the first `old_size` chunk digests
/// is a prefix of the tree of all `leaves`.
pub fn consistency_proof(old_size: u64, leaves: &[Digest]) -> Result<Vec<Digest>, ProofError> {
    let hashes: Vec<Digest> = leaves.iter().map(|d| leaf_hash(d)).collect();
    consistency_proof_from_leaf_hashes(old_size, &hashes)
}

/// The consistency proof between the first `old_size` leaf hashes and all of
/// them (RFC 6962 §2.1.2). Empty when `old_size` is 0 or the whole tree.
pub fn consistency_proof_from_leaf_hashes(
    old_size: u64,
    leaf_hashes: &[Digest],
) -> Result<Vec<Digest>, ProofError> {
    let new = leaf_hashes.len() as u64;
    let m = usize::try_from(old_size)
        .ok()
        .filter(|&m| m <= leaf_hashes.len())
        .ok_or(ProofError::SizeOutOfRange { old: old_size, new })?;
    let mut out = Vec::new();
    if m > 0 && m < leaf_hashes.len() {
        subproof(m, leaf_hashes, true, &mut out);
    }
    Ok(out)
}

/// RFC 6962 §2.1.2 `SUBPROOF(m, D[n], b)`.
fn subproof(m: usize, d: &[Digest], complete: bool, out: &mut Vec<Digest>) {
    let n = d.len();
    if m == n {
        if !complete {
            out.push(root_from_leaf_hashes(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], complete, out);
        out.push(root_from_leaf_hashes(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root_from_leaf_hashes(&d[..k]));
    }
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix
/// of the tree of `new_size` leaves with root `new_root` (RFC 9162 §2.1.4.2).
/// Any tree is consistent with the empty tree (with an empty proof).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Digest,
    new_root: &Digest,
    proof: &[Digest],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizeOutOfRange {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootMismatch);
        }
        return Ok(());
    }
    let mut path = proof.iter();
    let start = if old_size.is_power_of_two() {
        *old_root
    } else {
        *path.next().ok_or(ProofError::WrongLength)?
    };
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (start, start);
    for c in path {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr != *old_root || sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Digest {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The leaves of the Certificate Transparency reference tests.
    fn ct_leaf_hashes() -> Vec<Digest> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|s| leaf_hash(&hex::decode(s).unwrap()))
        .collect()
    }

    /// Roots of the CT reference tree for sizes 0..=8.
    const CT_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// RFC 6962's recursive definition, written out literally, as an
    /// independent check on the streaming [`root_of`].
    fn mth(d: &[Digest]) -> Digest {
        match d.len() {
            0 => sha256(b""),
            1 => d[0],
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    fn synthetic(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| leaf_hash(&(i as u32).to_be_bytes()))
            .collect()
    }

    #[test]
    fn ct_reference_roots() {
        let leaves = ct_leaf_hashes();
        for (n, want) in CT_ROOTS.iter().enumerate() {
            assert_eq!(root_from_leaf_hashes(&leaves[..n]), h(want), "size {n}");
            assert_eq!(mth(&leaves[..n]), h(want), "size {n}");
        }
        assert_eq!(empty_root(), h(CT_ROOTS[0]));
        assert_eq!(root(&[]), h(CT_ROOTS[0]));
    }

    #[test]
    fn ct_reference_inclusion_proofs() {
        let leaves = ct_leaf_hashes();
        let cases: &[(u64, usize, &[&str])] = &[
            (0, 1, &[]),
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                3,
                &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for &(index, size, want) in cases {
            let want: Vec<Digest> = want.iter().map(|s| h(s)).collect();
            let tree = &leaves[..size];
            let proof = inclusion_proof_from_leaf_hashes(index, tree).unwrap();
            assert_eq!(proof, want, "leaf {index} of {size}");
            verify_inclusion(
                &tree[index as usize],
                index,
                size as u64,
                &proof,
                &h(CT_ROOTS[size]),
            )
            .unwrap();
        }
    }

    #[test]
    fn ct_reference_consistency_proofs() {
        let leaves = ct_leaf_hashes();
        let cases: &[(u64, usize, &[&str])] = &[
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
            (
                2,
                8,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
        ];
        for &(old, size, want) in cases {
            let want: Vec<Digest> = want.iter().map(|s| h(s)).collect();
            let proof = consistency_proof_from_leaf_hashes(old, &leaves[..size]).unwrap();
            assert_eq!(proof, want, "{old} -> {size}");
            verify_consistency(
                old,
                size as u64,
                &h(CT_ROOTS[old as usize]),
                &h(CT_ROOTS[size]),
                &proof,
            )
            .unwrap();
        }
    }

    #[test]
    fn streaming_root_matches_the_recursive_definition() {
        let all = synthetic(300);
        for n in 0..=300 {
            assert_eq!(root_from_leaf_hashes(&all[..n]), mth(&all[..n]), "size {n}");
        }
    }

    #[test]
    fn chunk_digest_roots_hash_each_digest_as_a_leaf() {
        let digests: Vec<Digest> = (0..5u8).map(|i| sha256(&[i])).collect();
        let leaf_hashes: Vec<Digest> = digests.iter().map(|d| leaf_hash(d)).collect();
        assert_eq!(root(&digests), mth(&leaf_hashes));
        assert_eq!(root(&digests[..1]), leaf_hash(&digests[0]));
        assert_ne!(root(&digests[..1]), digests[0]);
    }

    #[test]
    fn split_is_the_largest_power_of_two_below() {
        for (n, k) in [(2, 1), (3, 2), (4, 2), (5, 4), (8, 4), (9, 8), (1000, 512)] {
            assert_eq!(split(n), k, "{n}");
        }
    }

    fn tampered(proof: &[Digest]) -> Vec<Vec<Digest>> {
        let mut out = Vec::new();
        for i in 0..proof.len() {
            let mut p = proof.to_vec();
            p[i][0] ^= 1;
            out.push(p);
            let mut p = proof.to_vec();
            p.remove(i);
            out.push(p);
        }
        if !proof.is_empty() {
            let mut p = proof.to_vec();
            p.swap(0, proof.len() - 1);
            if p != proof {
                out.push(p);
            }
        }
        let mut p = proof.to_vec();
        p.push([7u8; 32]);
        out.push(p);
        out
    }

    #[test]
    fn inclusion_proofs_for_all_sizes_verify_and_tampering_is_caught() {
        let all = synthetic(33);
        for n in 1..=33usize {
            let tree = &all[..n];
            let r = root_from_leaf_hashes(tree);
            let size = n as u64;
            for i in 0..n {
                let idx = i as u64;
                let proof = inclusion_proof_from_leaf_hashes(idx, tree).unwrap();
                assert!(proof.len() <= 6);
                verify_inclusion(&tree[i], idx, size, &proof, &r).unwrap();
                for bad in tampered(&proof) {
                    assert!(verify_inclusion(&tree[i], idx, size, &bad, &r).is_err());
                }
                // Wrong leaf, wrong index, wrong root. (A wrong tree size is
                // not always caught by the proof alone: leaf 0 of 3 and of 4
                // have the same path shape. The size is bound by the signed
                // tree head, not by the proof.)
                let other = leaf_hash(b"not in the tree");
                assert!(verify_inclusion(&other, idx, size, &proof, &r).is_err());
                if n > 1 {
                    let j = (idx + 1) % size;
                    assert!(verify_inclusion(&tree[i], j, size, &proof, &r).is_err());
                }
                assert!(verify_inclusion(&tree[i], idx, size, &proof, &other).is_err());
                assert!(verify_inclusion(&tree[i], size, size, &proof, &r).is_err());
            }
            assert_eq!(
                inclusion_proof_from_leaf_hashes(size, tree),
                Err(ProofError::IndexOutOfRange { index: size, size })
            );
        }
    }

    #[test]
    fn consistency_proofs_for_all_sizes_verify_and_tampering_is_caught() {
        let all = synthetic(33);
        let roots: Vec<Digest> = (0..=33).map(|n| root_from_leaf_hashes(&all[..n])).collect();
        for n in 1..=33usize {
            for m in 0..=n {
                let (old, new) = (m as u64, n as u64);
                let proof = consistency_proof_from_leaf_hashes(old, &all[..n]).unwrap();
                verify_consistency(old, new, &roots[m], &roots[n], &proof).unwrap();
                if m == 0 || m == n {
                    assert!(proof.is_empty());
                    continue;
                }
                for bad in tampered(&proof) {
                    assert!(
                        verify_consistency(old, new, &roots[m], &roots[n], &bad).is_err(),
                        "{m} -> {n}"
                    );
                }
                // A root that is not the old tree's, or not the new tree's.
                assert!(verify_consistency(old, new, &roots[m - 1], &roots[n], &proof).is_err());
                assert!(verify_consistency(old, new, &roots[m], &roots[n - 1], &proof).is_err());
                // The same proof claimed for other sizes.
                if m + 1 < n {
                    assert!(
                        verify_consistency(old + 1, new, &roots[m + 1], &roots[n], &proof).is_err()
                    );
                }
            }
            assert!(consistency_proof_from_leaf_hashes(n as u64 + 1, &all[..n]).is_err());
        }
        assert_eq!(
            verify_consistency(3, 2, &roots[3], &roots[2], &[]),
            Err(ProofError::SizeOutOfRange { old: 3, new: 2 })
        );
        assert_eq!(
            verify_consistency(4, 4, &roots[4], &roots[3], &[]),
            Err(ProofError::RootMismatch)
        );
    }

    #[test]
    fn chunk_digest_proofs_match_leaf_hash_proofs() {
        let digests: Vec<Digest> = (0..11u8).map(|i| sha256(&[i])).collect();
        let leaf_hashes: Vec<Digest> = digests.iter().map(|d| leaf_hash(d)).collect();
        let r = root(&digests);
        for i in 0..11u64 {
            let p = inclusion_proof(i, &digests).unwrap();
            assert_eq!(
                p,
                inclusion_proof_from_leaf_hashes(i, &leaf_hashes).unwrap()
            );
            verify_inclusion(&leaf_hash(&digests[i as usize]), i, 11, &p, &r).unwrap();
        }
        let p = consistency_proof(5, &digests).unwrap();
        verify_consistency(5, 11, &root(&digests[..5]), &r, &p).unwrap();
    }

    proptest! {
        #[test]
        fn verifiers_never_panic(
            index in any::<u64>(),
            size in any::<u64>(),
            old in any::<u64>(),
            proof in proptest::collection::vec(any::<[u8; 32]>(), 0..70),
        ) {
            let leaf = [1u8; 32];
            let r = [2u8; 32];
            let _ = verify_inclusion(&leaf, index, size, &proof, &r);
            let _ = verify_consistency(old, size, &leaf, &r, &proof);
            let _ = verify_inclusion(&leaf, index % 64, size % 64, &proof, &r);
            let _ = verify_consistency(old % 64, size % 64, &leaf, &r, &proof);
        }
    }
}
