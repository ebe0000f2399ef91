//! Offline checks: the whole log ([`verify`]), inclusion proofs ([`prove`],
//! [`verify_proof`]). Read-only; they need the files and the public key, never the HSM.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use baylink_hsm::PublicKey;
use baylink_net::merkle::{
    consistency_proof_from_leaf_hashes, inclusion_proof_from_leaf_hashes, leaf_hash,
    root_from_leaf_hashes, verify_consistency, verify_inclusion,
};
use baylink_net::proto::Digest;
use serde::{Deserialize, Serialize};

use super::note::{self, Checkpoint};
use super::read::{lines, read_records};
use super::record::Record;
use super::{AuditError, CHECKPOINTS_FILE, RECORDS_FILE};

/// What a clean log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Number of records.
    pub records: u64,
    /// RFC 6962 root over all records.
    pub root: Digest,
    /// Number of checkpoints, each verified.
    pub checkpoints: usize,
    /// Tree size of the latest checkpoint (0 without any).
    pub signed_size: u64,
    /// The log's origin (from its checkpoints), if any checkpoint exists.
    pub origin: Option<String>,
}

/// Format version of a proof file.
pub const PROOF_VERSION: u32 = 1;
/// Most records one proof may carry.
pub const MAX_PROOF_RECORDS: usize = 1024;
/// Largest proof file read.
pub const MAX_PROOF_BYTES: u64 = 4 * 1024 * 1024;

/// An inclusion proof for a transfer's records (the JSON of `baylink audit prove`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    /// [`PROOF_VERSION`].
    pub version: u32,
    /// The transfer id.
    pub transfer: String,
    /// The signed checkpoint (C2SP signed note) the records are proven against.
    pub checkpoint: String,
    /// The transfer's records, each with its inclusion proof.
    pub records: Vec<ProvenRecord>,
    /// The witness cosignature lines (C2SP tlog-cosignature) the edge stored for
    /// `checkpoint`, if it has any; checked by [`verify_proof_cosigned`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cosignatures: Vec<String>,
}

/// One record and its inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvenRecord {
    /// Leaf index (= the record's seq).
    pub index: u64,
    /// The record's canonical JSON (its leaf hash is RFC 6962 `leaf_hash` of these bytes).
    pub record: String,
    /// Audit path from the leaf to the checkpoint's root, hex, leaf side first.
    pub inclusion: Vec<String>,
}

/// What a valid proof showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofSummary {
    /// The transfer.
    pub transfer: String,
    /// The records, verified.
    pub records: Vec<Record>,
    /// The checkpoint they are included in.
    pub checkpoint: Checkpoint,
}

/// The note carried by one line of the checkpoints file.
pub(super) fn checkpoint_note(line: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        note: String,
    }
    serde_json::from_slice::<Line>(line)
        .map(|l| l.note)
        .map_err(|e| format!("not a checkpoint line: {e}"))
}

/// Reads the checkpoint notes with their offsets (not yet verified).
fn read_checkpoints(dir: &Path) -> Result<Vec<(u64, String)>, AuditError> {
    let mut out = Vec::new();
    let count = std::cell::Cell::new(0usize);
    lines(
        &dir.join(CHECKPOINTS_FILE),
        |offset, line| {
            count.set(count.get() + 1);
            let note = checkpoint_note(line).map_err(|reason| AuditError::BadCheckpoint {
                index: out.len() + 1,
                offset,
                reason,
            })?;
            out.push((offset, note));
            Ok(())
        },
        |offset, reason| AuditError::BadCheckpoint {
            index: count.get() + 1,
            offset,
            reason,
        },
    )?;
    Ok(out)
}

/// Checks the whole log in `dir` against the appliance's public key: every record's framing,
/// leaf hash, canonical form and sequence; every checkpoint's signature; that consecutive
/// checkpoints are consistent (RFC 6962 consistency proofs over the records); and that each
/// checkpoint's root is the tree of the records at its size. The error names the first bad
/// record (seq and byte offset) or checkpoint.
pub fn verify(dir: &Path, key: &PublicKey) -> Result<Summary, AuditError> {
    verify_kept(dir, key, &[])
}

/// [`verify`], then each checkpoint kept outside the directory, `(what, signed note)`: it must
/// be signed by `key` for this log, cover no more records than the log holds nor than its
/// latest checkpoint, and its root must be the root of the log's first records
/// ([`super::anchor::check_kept`]). A log truncated with its checkpoints to an earlier state,
/// or emptied, passes [`verify`] but not this.
pub fn verify_kept(
    dir: &Path,
    key: &PublicKey,
    kept: &[(&str, &str)],
) -> Result<Summary, AuditError> {
    let records = read_records(dir)?;
    let leaves: Vec<Digest> = records.iter().map(|(_, l)| *l).collect();
    let notes = read_checkpoints(dir)?;
    let mut previous: Option<Checkpoint> = None;
    let mut origin: Option<String> = None;
    for (i, (offset, text)) in notes.iter().enumerate() {
        let bad = |reason: String| AuditError::BadCheckpoint {
            index: i + 1,
            offset: *offset,
            reason,
        };
        let cp = note::open(text, key, origin.as_deref()).map_err(bad)?;
        origin.get_or_insert_with(|| cp.origin.clone());
        if let Some(prev) = &previous {
            if cp.size < prev.size {
                return Err(bad(format!(
                    "tree size {} is smaller than the previous checkpoint's {}",
                    cp.size, prev.size
                )));
            }
            // Consistency between the two signed heads, with the proof computed from the
            // records: a log that forked between them fails here even if each head matched
            // some version of the records.
            let within = usize::try_from(cp.size).ok().filter(|&n| n <= leaves.len());
            if let Some(n) = within {
                let proof = consistency_proof_from_leaf_hashes(prev.size, &leaves[..n])
                    .map_err(|e| bad(e.to_string()))?;
                verify_consistency(prev.size, cp.size, &prev.root, &cp.root, &proof).map_err(
                    |_| {
                        bad(format!(
                            "not consistent with checkpoint {} (tree size {}): the log was rewritten",
                            i,
                            prev.size
                        ))
                    },
                )?;
            }
        }
        let n = usize::try_from(cp.size)
            .ok()
            .filter(|&n| n <= leaves.len())
            .ok_or_else(|| {
                bad(format!(
                    "signs {} records but the log holds {} (records were removed)",
                    cp.size,
                    leaves.len()
                ))
            })?;
        if root_from_leaf_hashes(&leaves[..n]) != cp.root {
            return Err(bad(format!(
                "its root is not the tree of records 0..{} (a record was changed)",
                cp.size
            )));
        }
        previous = Some(cp);
    }
    let signed_size = previous.as_ref().map_or(0, |c| c.size);
    for (what, text) in kept {
        super::anchor::check_kept(what, text, key, origin.as_deref(), &leaves, signed_size)?;
    }
    Ok(Summary {
        records: leaves.len() as u64,
        root: root_from_leaf_hashes(&leaves),
        checkpoints: notes.len(),
        signed_size,
        origin,
    })
}

/// Builds the inclusion proof of every record of `transfer` against the latest checkpoint
/// that covers them. Checks the records as [`verify`] does (but not the signatures: the
/// proof carries the note and [`verify_proof`] checks it).
pub fn prove(dir: &Path, transfer: &str) -> Result<Proof, AuditError> {
    let records = read_records(dir)?;
    let leaves: Vec<Digest> = records.iter().map(|(_, l)| *l).collect();
    let notes = read_checkpoints(dir)?;
    let mine: Vec<u64> = records
        .iter()
        .enumerate()
        .filter(|(_, (json, _))| {
            Record::from_canonical(json).is_ok_and(|r| r.transfer.as_deref() == Some(transfer))
        })
        .map(|(i, _)| i as u64)
        .collect();
    let Some(&last) = mine.last() else {
        return Err(AuditError::NotFound(format!(
            "no record of transfer {transfer} in {}",
            dir.join(RECORDS_FILE).display()
        )));
    };
    // Prefer the newest checkpoint that covers the records and that the witness cosigned;
    // else the newest checkpoint.
    let stored = stored_cosignatures(dir)?;
    let covers = |t: &str| {
        note::split_note(t)
            .ok()
            .and_then(|(body, _)| Checkpoint::parse_body(body).ok())
            .is_some_and(|cp| cp.size > last)
    };
    let witnessed = notes
        .iter()
        .enumerate()
        .rev()
        .find(|(_, (_, t))| covers(t) && stored.iter().any(|(c, _)| c == t));
    let (index, offset, text) = witnessed
        .or_else(|| notes.iter().enumerate().next_back())
        .map(|(i, (o, t))| (i + 1, *o, t.clone()))
        .ok_or_else(|| {
            AuditError::NotFound("no signed checkpoint yet (run `baylink audit checkpoint`)".into())
        })?;
    let cosignatures: Vec<String> = stored
        .into_iter()
        .filter(|(c, _)| *c == text)
        .map(|(_, line)| line)
        .collect();
    let bad = |reason: String| AuditError::BadCheckpoint {
        index,
        offset,
        reason,
    };
    let (body, _) = note::split_note(&text).map_err(bad)?;
    let cp = Checkpoint::parse_body(body).map_err(bad)?;
    if cp.size <= last {
        return Err(AuditError::NotFound(format!(
            "record {last} of transfer {transfer} is not yet covered by a signed checkpoint \
             (latest signs {} records; run `baylink audit checkpoint`)",
            cp.size
        )));
    }
    let n = usize::try_from(cp.size)
        .ok()
        .filter(|&n| n <= leaves.len())
        .ok_or_else(|| {
            bad(format!(
                "signs {} records but the log holds {}",
                cp.size,
                leaves.len()
            ))
        })?;
    if root_from_leaf_hashes(&leaves[..n]) != cp.root {
        return Err(bad("its root is not the tree of the records".into()));
    }
    let mut out = Vec::with_capacity(mine.len().min(MAX_PROOF_RECORDS));
    for &i in mine.iter().rev().take(MAX_PROOF_RECORDS).rev() {
        let path = inclusion_proof_from_leaf_hashes(i, &leaves[..n])
            .map_err(|e| AuditError::BadProof(e.to_string()))?;
        let json = &records[i as usize].0;
        out.push(ProvenRecord {
            index: i,
            record: String::from_utf8(json.clone())
                .map_err(|_| AuditError::BadProof("record is not UTF-8".into()))?,
            inclusion: path.iter().map(hex::encode).collect(),
        });
    }
    Ok(Proof {
        version: PROOF_VERSION,
        transfer: transfer.to_owned(),
        checkpoint: text,
        records: out,
        cosignatures,
    })
}

/// The (checkpoint, cosignature line) pairs of `cosignatures.log`, if the file exists.
fn stored_cosignatures(dir: &Path) -> Result<Vec<(String, String)>, AuditError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        checkpoint: String,
        cosignature: String,
    }
    let path = dir.join(super::witness::COSIGNATURES_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::io("cannot read", &path)(e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Line>(l)
                .map(|l| (l.checkpoint, l.cosignature))
                .map_err(|e| {
                    AuditError::BadProof(format!("{}: not a cosignature line: {e}", path.display()))
                })
        })
        .collect()
}

/// [`verify_proof`], then the witness cosignatures the proof carries, by `witness_key`:
/// at least one is required and every one must verify over the proof's checkpoint. Returns
/// the summary and the number of cosignatures verified.
pub fn verify_proof_cosigned(
    proof: &Proof,
    key: &PublicKey,
    witness_key: &PublicKey,
) -> Result<(ProofSummary, usize), AuditError> {
    let summary = verify_proof(proof, key)?;
    if proof.cosignatures.is_empty() {
        return Err(AuditError::BadProof(
            "the proof carries no witness cosignature of its checkpoint".into(),
        ));
    }
    for (i, line) in proof.cosignatures.iter().enumerate() {
        super::witness::verify_cosignature(&proof.checkpoint, line, witness_key)
            .map_err(|e| AuditError::BadProof(format!("cosignature {}: {e}", i + 1)))?;
    }
    Ok((summary, proof.cosignatures.len()))
}

/// Checks a proof offline: the checkpoint's signature by `key`, then each record's
/// inclusion in the signed tree, and that each record is the transfer's and sits at its
/// index.
pub fn verify_proof(proof: &Proof, key: &PublicKey) -> Result<ProofSummary, AuditError> {
    let bad = |s: String| AuditError::BadProof(s);
    if proof.version != PROOF_VERSION {
        return Err(bad(format!("unknown proof version {}", proof.version)));
    }
    let cp =
        note::open(&proof.checkpoint, key, None).map_err(|e| bad(format!("checkpoint: {e}")))?;
    if proof.records.is_empty() || proof.records.len() > MAX_PROOF_RECORDS {
        return Err(bad(format!(
            "{} records (1..={MAX_PROOF_RECORDS})",
            proof.records.len()
        )));
    }
    let mut out = Vec::with_capacity(proof.records.len());
    for p in &proof.records {
        let what = format!("record {}", p.index);
        if p.inclusion.len() > 64 {
            return Err(bad(format!(
                "{what}: audit path of {} hashes",
                p.inclusion.len()
            )));
        }
        let path: Vec<Digest> = p
            .inclusion
            .iter()
            .map(|h| {
                let mut d = [0u8; 32];
                hex::decode_to_slice(h, &mut d).map(|()| d)
            })
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("{what}: an audit path hash is not 32 bytes of hex")))?;
        let r =
            Record::from_canonical(p.record.as_bytes()).map_err(|e| bad(format!("{what}: {e}")))?;
        if r.seq != p.index {
            return Err(bad(format!("{what}: the record says seq {}", r.seq)));
        }
        if r.transfer.as_deref() != Some(proof.transfer.as_str()) {
            return Err(bad(format!("{what}: belongs to another transfer")));
        }
        verify_inclusion(
            &leaf_hash(p.record.as_bytes()),
            p.index,
            cp.size,
            &path,
            &cp.root,
        )
        .map_err(|e| {
            bad(format!(
                "{what}: not included in the signed checkpoint ({e})"
            ))
        })?;
        out.push(r);
    }
    Ok(ProofSummary {
        transfer: proof.transfer.clone(),
        records: out,
        checkpoint: cp,
    })
}

/// Reads a proof file (bounded size).
pub fn read_proof(path: &Path) -> Result<Proof, AuditError> {
    let f = File::open(path).map_err(super::io("cannot open", path))?;
    let mut text = Vec::new();
    f.take(MAX_PROOF_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(super::io("cannot read", path))?;
    if text.len() as u64 > MAX_PROOF_BYTES {
        return Err(AuditError::BadProof(format!(
            "larger than {MAX_PROOF_BYTES} bytes"
        )));
    }
    serde_json::from_slice(&text).map_err(|e| AuditError::BadProof(format!("not a proof: {e}")))
}
