//! The gateway as a witness of the edge's audit log.
//!
//! After the edge signs a checkpoint it sends it to the gateway (`Witness` frame on a control
//! stream of its own) with an RFC 6962 consistency proof from the checkpoint the gateway
//! cosigned last. The gateway checks the edge's signature against its pinned edge key and the
//! proof against the checkpoint it cosigned last, then cosigns with its own HSM key; the edge
//! stores the cosignature. An edge that shows a rewritten history is refused (and the gateway
//! counts `baylink_audit_witness_refusals_total`): it cannot show different histories to
//! different parties without one of them holding an inconsistent cosigned checkpoint.
//!
//! Cosignature format: the C2SP tlog-cosignature v1 signed message (`cosignature/v1`, a
//! `time <unix s>` line, then the checkpoint's note text), signed with ECDSA P-256 (DER)
//! instead of Ed25519, as a signed-note signature line
//! `— baylink.witness/<gateway id> base64(key id || u64 big-endian time || DER signature)`.
//! Signed-note assigns no type byte to ECDSA cosignatures, so the key id uses the reserved
//! `0xff` type followed by a longer identifier, as the signed-note spec recommends:
//! `SHA-256(name || 0x0A || 0xff || "baylink/ecdsa-p256-cosignature/v1" || DER SPKI)[:4]`.
//!
//! The first checkpoint a gateway sees from an edge is trusted on first use; from then on
//! every new one must extend it. What was cosigned last is kept in `audit.dir/witness/` and
//! in the gateway's HSM ([`WITNESS_STATE_LABEL`]), so a rewind of the directory alone does
//! not make the witness trust a forked log on first use again.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{Context, SHA256};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use baylink_hsm::PublicKey;
use baylink_net::merkle::{consistency_proof_from_leaf_hashes, verify_consistency};
use baylink_net::proto::{Digest, ErrorCode};

use super::note::{self, Checkpoint};
use super::{AuditError, Log, append_durably, io};
use crate::transfer_dir::write_atomic;

/// Identifier following the `0xff` signature type in the cosignature key id.
pub const COSIGNATURE_TYPE_ID: &[u8] = b"baylink/ecdsa-p256-cosignature/v1";
/// Prefix of every witness key name.
pub const WITNESS_PREFIX: &str = "baylink.witness/";
/// Edge: every cosignature received, one JSON line each (append-only).
pub const COSIGNATURES_FILE: &str = "cosignatures.log";
/// Edge: the checkpoint the gateway cosigned last (plain note).
pub const WITNESSED_FILE: &str = "witnessed";
/// Edge: why the gateway's witness refused the log last (present until a cosignature is
/// stored again); the edge sends nothing while it exists.
pub const REFUSED_FILE: &str = "witness-refused";
/// Gateway: per witnessed log, the checkpoint it cosigned last.
pub const WITNESS_DIR: &str = "witness";
/// Gateway: `CKA_LABEL` of the HSM data object holding, per witnessed log
/// (`CKA_APPLICATION` = its origin), the checkpoint cosigned last.
pub const WITNESS_STATE_LABEL: &str = "baylink-witness-state";

/// The witness key name of a gateway.
pub fn witness_name(gateway_id: &str) -> String {
    let origin = note::origin(gateway_id);
    format!(
        "{WITNESS_PREFIX}{}",
        origin.trim_start_matches(note::ORIGIN_PREFIX)
    )
}

/// The cosignature key id of `key` under `name`.
pub fn cosignature_key_id(name: &str, key: &PublicKey) -> [u8; 4] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n\xff");
    ctx.update(COSIGNATURE_TYPE_ID);
    ctx.update(&key.to_spki_der());
    let d = ctx.finish();
    let mut id = [0u8; 4];
    id.copy_from_slice(&d.as_ref()[..4]);
    id
}

/// The message a cosignature signs (tlog-cosignature v1 layout).
pub fn cosigned_message(time_s: u64, note_text: &str) -> String {
    format!("cosignature/v1\ntime {time_s}\n{note_text}")
}

/// Checks a cosignature line over a signed checkpoint note by the witness `key`; returns the
/// cosignature's time (unix seconds).
pub fn verify_cosignature(checkpoint: &str, line: &str, key: &PublicKey) -> Result<u64, String> {
    let (text, _) = note::split_note(checkpoint)?;
    let rest = line
        .strip_prefix("\u{2014} ")
        .ok_or("the cosignature line does not start with an em dash")?;
    let (name, b64) = rest
        .split_once(' ')
        .ok_or("the cosignature line has no signature")?;
    if !name.starts_with(WITNESS_PREFIX) || name.contains(['+', ' ']) {
        return Err(format!("`{name}` is not a baylink witness name"));
    }
    let blob = STANDARD
        .decode(b64)
        .map_err(|_| "the cosignature is not base64".to_owned())?;
    if blob.len() < 4 + 8 + 8 || blob[..4] != cosignature_key_id(name, key) {
        return Err(format!(
            "the cosignature is not by the given key as `{name}`"
        ));
    }
    let time = u64::from_be_bytes(blob[4..12].try_into().expect("8 bytes"));
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.sec1().as_slice())
        .verify(cosigned_message(time, text).as_bytes(), &blob[12..])
        .map_err(|_| "the cosignature does not verify".to_owned())?;
    Ok(time)
}

/// Why the witness would not cosign.
#[derive(Debug, thiserror::Error)]
pub enum WitnessRefusal {
    /// The checkpoint is malformed or not signed by the pinned edge key.
    #[error("checkpoint refused: {0}")]
    BadCheckpoint(String),
    /// The checkpoint does not extend the one cosigned last: a rewritten or forked log.
    #[error("inconsistent checkpoint refused: {0}")]
    Inconsistent(String),
    /// The witness could not sign or store (HSM, disk).
    #[error("witness failed: {0}")]
    Internal(String),
}

impl WitnessRefusal {
    /// The protocol error code sent to the edge.
    pub fn code(&self) -> ErrorCode {
        match self {
            WitnessRefusal::BadCheckpoint(_) => ErrorCode::BadSignature,
            WitnessRefusal::Inconsistent(_) => ErrorCode::Refused,
            WitnessRefusal::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Gateway side: checks and cosigns edge checkpoints. Serialised by the gateway audit log's
/// lock; state under `audit.dir/witness/`.
#[derive(Debug, Clone)]
pub struct Witness {
    log: Log,
    name: String,
    edge_key: PublicKey,
}

impl Witness {
    /// A witness named after `gateway_id`, storing its state next to the gateway's log,
    /// signing with the log's HSM signer, trusting checkpoints signed by `edge_key`.
    pub fn new(log: Log, gateway_id: &str, edge_key: PublicKey) -> Witness {
        Witness {
            log,
            name: witness_name(gateway_id),
            edge_key,
        }
    }

    /// Verifies `checkpoint` (edge signature, origin naming `edge_id` — the authenticated
    /// peer, so an edge cannot open a second, separately witnessed log under another name —
    /// and consistency with the last cosigned one by `proof` from `old_size`), cosigns it,
    /// remembers it; returns the cosignature line. Blocking (HSM and files).
    pub fn cosign(
        &self,
        edge_id: &str,
        checkpoint: &str,
        old_size: u64,
        proof: &[Digest],
    ) -> Result<String, WitnessRefusal> {
        let cp = note::open(checkpoint, &self.edge_key, Some(&note::origin(edge_id)))
            .map_err(WitnessRefusal::BadCheckpoint)?;
        let internal = |e: AuditError| WitnessRefusal::Internal(e.to_string());
        let result = self.log.locked(|inner, _| {
            let dir = inner.dir.join(WITNESS_DIR);
            std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
            let state = dir.join(cp.origin.replace('/', "_"));
            let last = match std::fs::read_to_string(&state) {
                Ok(text) => Some(
                    note::split_note(&text)
                        .and_then(|(body, _)| Checkpoint::parse_body(body))
                        .map_err(|e| AuditError::Io {
                            what: "unreadable witness state",
                            path: state.clone(),
                            source: std::io::Error::other(e),
                        })?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io("cannot read", &state)(e)),
            };
            // The HSM keeps the same state out of reach of a rewind of `audit.dir`: the
            // larger of the two is what was cosigned last.
            let token = inner.signer.token();
            let held = token
                .data_values(WITNESS_STATE_LABEL, &cp.origin)
                .map_err(AuditError::Hsm)?
                .iter()
                .filter_map(|v| {
                    let text = std::str::from_utf8(v).ok()?;
                    let (body, _) = note::split_note(text).ok()?;
                    Checkpoint::parse_body(body).ok()
                })
                .max_by_key(|c| c.size);
            let last = match (last, held) {
                (Some(file), Some(hsm)) if hsm.size > file.size => {
                    tracing::warn!(
                        origin = %cp.origin,
                        file = file.size,
                        hsm = hsm.size,
                        "witness state in audit.dir is older than the HSM's copy (rewound?); the HSM's holds"
                    );
                    Some(hsm)
                }
                (file @ Some(_), _) => file,
                (None, hsm) => hsm,
            };
            if let Some(last) = &last {
                let refuse = |why: String| Ok(Err(WitnessRefusal::Inconsistent(why)));
                if cp.size < last.size {
                    return refuse(format!(
                        "tree size {} is smaller than the {} already cosigned",
                        cp.size, last.size
                    ));
                }
                if old_size != last.size {
                    return refuse(format!(
                        "the proof starts at size {old_size}, the witness last cosigned size {}",
                        last.size
                    ));
                }
                if verify_consistency(last.size, cp.size, &last.root, &cp.root, proof).is_err() {
                    return refuse(format!(
                        "tree {} is not an extension of the cosigned tree {} (root {})",
                        cp.size,
                        last.size,
                        hex::encode(last.root)
                    ));
                }
            }
            let time_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let (text, _) = note::split_note(checkpoint).map_err(AuditError::BadProof)?;
            let sig = inner
                .signer
                .sign(cosigned_message(time_s, text).as_bytes())?;
            let mut blob = cosignature_key_id(&self.name, inner.signer.public_key()).to_vec();
            blob.extend_from_slice(&time_s.to_be_bytes());
            blob.extend_from_slice(&note::raw_to_der(&sig.0));
            token.replace_data(WITNESS_STATE_LABEL, &cp.origin, checkpoint.as_bytes())?;
            write_atomic(&state, checkpoint.as_bytes()).map_err(io("cannot write", &state))?;
            Ok(Ok(format!(
                "\u{2014} {} {}",
                self.name,
                STANDARD.encode(blob)
            )))
        });
        let outcome = result.map_err(internal)?;
        if outcome.is_err() {
            metrics::counter!("baylink_audit_witness_refusals_total").increment(1);
        }
        outcome
    }
}

/// Edge side: what to send to the witness, if the latest checkpoint is not cosigned yet:
/// the checkpoint note, the size the witness cosigned last, and the consistency proof.
pub fn request(log: &Log) -> Result<Option<(String, u64, Vec<Digest>)>, AuditError> {
    log.locked(|inner, st| {
        let latest_path = inner.dir.join(super::LATEST_CHECKPOINT_FILE);
        let latest = match std::fs::read_to_string(&latest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot read", &latest_path)(e)),
        };
        let size_of = |text: &str, path: &std::path::Path| {
            note::split_note(text)
                .and_then(|(body, _)| Checkpoint::parse_body(body))
                .map(|c| c.size)
                .map_err(|e| AuditError::Io {
                    what: "unreadable checkpoint",
                    path: path.to_owned(),
                    source: std::io::Error::other(e),
                })
        };
        let new = size_of(&latest, &latest_path)?;
        let witnessed_path = inner.dir.join(WITNESSED_FILE);
        let old = match std::fs::read_to_string(&witnessed_path) {
            Ok(t) => size_of(&t, &witnessed_path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io("cannot read", &witnessed_path)(e)),
        };
        if new == old {
            return Ok(None);
        }
        let n = usize::try_from(new)
            .ok()
            .filter(|&n| n <= st.leaves.len())
            .ok_or_else(|| {
                AuditError::NotFound(format!("checkpoint of {new} records beyond the log"))
            })?;
        let proof = consistency_proof_from_leaf_hashes(old, &st.leaves[..n])
            .map_err(|e| AuditError::BadProof(e.to_string()))?;
        Ok(Some((latest, old, proof)))
    })
}

/// Edge side: checks the witness's cosignature with the pinned gateway key and stores it
/// (appended to `cosignatures.log`, `witnessed` replaced, then the HSM anchor's cosigned
/// checkpoint replaced when this one is newer).
pub fn store(
    log: &Log,
    checkpoint: &str,
    cosignature: &str,
    gateway_key: &PublicKey,
) -> Result<(), AuditError> {
    verify_cosignature(checkpoint, cosignature, gateway_key)
        .map_err(|e| AuditError::BadProof(format!("witness cosignature: {e}")))?;
    log.locked(|inner, _| {
        let path = inner.dir.join(COSIGNATURES_FILE);
        let mut line = serde_json::to_vec(
            &serde_json::json!({ "checkpoint": checkpoint, "cosignature": cosignature }),
        )
        .expect("strings always serialise");
        line.push(b'\n');
        append_durably(&path, &line)?;
        let witnessed = inner.dir.join(WITNESSED_FILE);
        write_atomic(&witnessed, checkpoint.as_bytes()).map_err(io("cannot write", &witnessed))?;
        let size = |text: &str| {
            note::split_note(text)
                .and_then(|(body, _)| Checkpoint::parse_body(body))
                .map(|c| c.size)
        };
        let new = size(checkpoint).map_err(AuditError::BadProof)?;
        let token = inner.signer.token();
        let held = super::anchor::read(token, &inner.origin)?;
        let newer = held
            .as_ref()
            .and_then(|a| a.cosigned.as_ref())
            .is_none_or(|c| size(&c.checkpoint).is_ok_and(|old| old < new));
        if newer {
            let cosigned = Some(super::anchor::Cosigned {
                checkpoint: checkpoint.to_owned(),
                cosignature: cosignature.to_owned(),
            });
            let anchor = match held {
                Some(a) => super::anchor::Anchor { cosigned, ..a },
                // Only a checkpoint this log signed is cosigned; it anchors the log too.
                None => super::anchor::Anchor {
                    version: super::anchor::ANCHOR_VERSION,
                    checkpoint: checkpoint.to_owned(),
                    cosigned,
                },
            };
            super::anchor::write(token, &inner.origin, &anchor)?;
        }
        // Cosigned again: the witness accepts the log as it is now.
        let refused = inner.dir.join(REFUSED_FILE);
        match std::fs::remove_file(&refused) {
            Ok(()) => {
                crate::transfer_dir::sync_dir(&inner.dir).map_err(io("cannot fsync", &inner.dir))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &refused)(e)),
        }
    })
}

/// Edge side: records that the witness refused the log (the reason, as the gateway gave it).
pub fn set_refused(log: &Log, reason: &str) -> Result<(), AuditError> {
    let path = log.dir().join(REFUSED_FILE);
    write_atomic(&path, format!("{reason}\n").as_bytes()).map_err(io("cannot write", &path))
}

/// Edge side: why the witness refused the log, if it did and has not cosigned since. A file
/// that cannot be read counts as a refusal (fail closed).
pub fn refused(dir: &std::path::Path) -> Option<String> {
    let path = dir.join(REFUSED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim_end().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("cannot read {}: {e}", path.display())),
    }
}

/// What the stored cosignatures show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignatureSummary {
    /// Number of cosignatures, each verified.
    pub count: usize,
    /// Largest tree size cosigned (0 without any).
    pub cosigned_size: u64,
}

/// Auditor side: checks every cosignature the edge stored in `dir`: the checkpoint is signed
/// by `edge_key`, the cosignature by `witness_key`, and the cosigned root is the tree of the
/// log's records at that size (a log rewritten after it was witnessed fails here).
pub fn verify_cosignatures(
    dir: &std::path::Path,
    edge_key: &PublicKey,
    witness_key: &PublicKey,
) -> Result<CosignatureSummary, AuditError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        checkpoint: String,
        cosignature: String,
    }
    let leaves: Vec<Digest> = super::read::read_records(dir)?
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let mut summary = CosignatureSummary {
        count: 0,
        cosigned_size: 0,
    };
    let count = std::cell::Cell::new(0usize);
    super::read::lines(
        &dir.join(COSIGNATURES_FILE),
        |offset, line| {
            count.set(count.get() + 1);
            let bad = |reason: String| AuditError::BadCosignature {
                index: count.get(),
                offset,
                reason,
            };
            let l: Line = serde_json::from_slice(line)
                .map_err(|e| bad(format!("not a cosignature line: {e}")))?;
            let cp = note::open(&l.checkpoint, edge_key, None).map_err(bad)?;
            verify_cosignature(&l.checkpoint, &l.cosignature, witness_key).map_err(bad)?;
            let n = usize::try_from(cp.size)
                .ok()
                .filter(|&n| n <= leaves.len())
                .ok_or_else(|| {
                    bad(format!(
                        "cosigns {} records but the log holds {}",
                        cp.size,
                        leaves.len()
                    ))
                })?;
            if super::root_from_leaf_hashes(&leaves[..n]) != cp.root {
                return Err(bad(format!(
                    "the witness cosigned another history of records 0..{}",
                    cp.size
                )));
            }
            summary.count += 1;
            summary.cosigned_size = summary.cosigned_size.max(cp.size);
            Ok(())
        },
        |offset, reason| AuditError::BadCosignature {
            index: count.get() + 1,
            offset,
            reason,
        },
    )?;
    Ok(summary)
}
