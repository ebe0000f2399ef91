//! The log's anchor outside `audit.dir`: the latest checkpoint this appliance signed and the
//! latest witness cosignature it stored, kept in its own HSM token.
//!
//! Whoever can rewrite `audit.dir` can truncate `records.log` and `checkpoints.log` together
//! to an earlier checkpoint (or empty both), and every remaining checkpoint still verifies.
//! The anchor is what such a rewind cannot reach: a private token object (`CKO_DATA`,
//! label [`ANCHOR_LABEL`], `CKA_APPLICATION` = the log's origin), replaced under the log's
//! lock each time a checkpoint is signed or a cosignature stored. Its value is JSON
//! ([`Anchor`]); it needs no integrity protection of its own, since only a logged-in user of
//! the token can write it and every checkpoint in it is verified against the appliance key
//! when read.
//!
//! [`check_kept`] is the one rule every kept checkpoint is held to (the anchor's, and one an
//! auditor kept from the other side): signed by the appliance key, no larger than the log
//! (and than the log's own latest checkpoint), and its root is the root of the log's first
//! `size` records.

use baylink_hsm::PublicKey;
use baylink_net::merkle::root_from_leaf_hashes;
use baylink_net::proto::Digest;
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::note::{self, Checkpoint};
use crate::signing::DataObjects;

/// `CKA_LABEL` of the anchor data object (its `CKA_APPLICATION` is the log's origin).
pub const ANCHOR_LABEL: &str = "baylink-audit-head";
/// Format version of the anchor's value.
pub const ANCHOR_VERSION: u32 = 1;
/// Largest anchor value read (two notes of at most 8 KiB and a cosignature line).
pub const MAX_ANCHOR_BYTES: usize = 32 * 1024;

/// What [`check_kept`] calls the anchor's checkpoint in its errors.
pub const ANCHORED: &str = "the HSM-anchored checkpoint";
/// What [`check_kept`] calls the anchor's cosigned checkpoint in its errors.
pub const ANCHORED_COSIGNED: &str = "the HSM-anchored cosigned checkpoint";

/// The value of the anchor object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// [`ANCHOR_VERSION`].
    pub version: u32,
    /// The latest checkpoint the appliance signed (a signed note).
    pub checkpoint: String,
    /// The latest checkpoint the peer's witness cosigned, with its cosignature (edge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cosigned: Option<Cosigned>,
}

/// A checkpoint and the witness cosignature line over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cosigned {
    /// The cosigned checkpoint (a signed note by the appliance key).
    pub checkpoint: String,
    /// The witness's cosignature line (`— baylink.witness/<id> …`).
    pub cosignature: String,
}

impl Anchor {
    /// The checkpoints the log must still hold, each named for error messages.
    pub fn kept(&self) -> Vec<(&'static str, &str)> {
        let mut kept = vec![(ANCHORED, self.checkpoint.as_str())];
        if let Some(c) = &self.cosigned {
            kept.push((ANCHORED_COSIGNED, c.checkpoint.as_str()));
        }
        kept
    }
}

fn hsm(what: &'static str) -> impl FnOnce(baylink_hsm::HsmError) -> AuditError {
    move |e| AuditError::BadAnchor {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// Reads the anchor of the log `origin` from `token`; `None` before its first checkpoint.
pub fn read(token: &dyn DataObjects, origin: &str) -> Result<Option<Anchor>, AuditError> {
    let values = token
        .data_values(ANCHOR_LABEL, origin)
        .map_err(hsm("cannot read the audit anchor from the HSM"))?;
    let bad = |reason: String| AuditError::BadAnchor {
        what: format!(
            "the audit anchor \"{ANCHOR_LABEL}\" of {origin} on token \"{}\"",
            token.label()
        ),
        reason,
    };
    let mut anchors = Vec::with_capacity(values.len());
    for value in values {
        if value.len() > MAX_ANCHOR_BYTES {
            return Err(bad(format!(
                "{} bytes, more than {MAX_ANCHOR_BYTES}",
                value.len()
            )));
        }
        let anchor: Anchor =
            serde_json::from_slice(&value).map_err(|e| bad(format!("not an anchor: {e}")))?;
        if anchor.version != ANCHOR_VERSION {
            return Err(bad(format!("unknown version {}", anchor.version)));
        }
        anchors.push(anchor);
    }
    // Two objects only if a writer stopped between creating one and destroying the other:
    // the later one holds the larger checkpoint and cosigned checkpoint.
    let size = |text: &str| {
        note::split_note(text)
            .and_then(|(body, _)| Checkpoint::parse_body(body))
            .map(|c| c.size)
            .map_err(&bad)
    };
    let mut latest: Option<((u64, u64), Anchor)> = None;
    for a in anchors {
        let cosigned = a.cosigned.as_ref().map_or(Ok(0), |c| size(&c.checkpoint))?;
        let n = (size(&a.checkpoint)?, cosigned);
        if latest.as_ref().is_none_or(|(m, _)| n > *m) {
            latest = Some((n, a));
        }
    }
    Ok(latest.map(|(_, a)| a))
}

/// Replaces the anchor of the log `origin` on `token`. Call under the log's lock.
pub(super) fn write(
    token: &dyn DataObjects,
    origin: &str,
    anchor: &Anchor,
) -> Result<(), AuditError> {
    let value = serde_json::to_vec(anchor).map_err(|e| AuditError::BadAnchor {
        what: "the audit anchor".to_owned(),
        reason: e.to_string(),
    })?;
    token
        .replace_data(ANCHOR_LABEL, origin, &value)
        .map_err(hsm("cannot write the audit anchor to the HSM"))
}

/// Checks that a log still holds a checkpoint kept outside its directory: `note` is signed
/// by `key` (for `origin`, when given), covers no more records than `leaves` and no more than
/// the log's latest checkpoint (`signed_size`), and its root is the root of the first `size`
/// leaves. `what` names the kept checkpoint in the error ("the HSM-anchored checkpoint").
pub fn check_kept(
    what: &str,
    note: &str,
    key: &PublicKey,
    origin: Option<&str>,
    leaves: &[Digest],
    signed_size: u64,
) -> Result<Checkpoint, AuditError> {
    let cp = note::open(note, key, origin).map_err(|reason| AuditError::BadAnchor {
        what: what.to_owned(),
        reason,
    })?;
    let records = leaves.len() as u64;
    let n = usize::try_from(cp.size)
        .ok()
        .filter(|&n| n <= leaves.len())
        .ok_or_else(|| AuditError::Rewound {
            what: what.to_owned(),
            records,
            size: cp.size,
        })?;
    if root_from_leaf_hashes(&leaves[..n]) != cp.root {
        return Err(AuditError::Rewritten {
            what: what.to_owned(),
            size: cp.size,
        });
    }
    if cp.size > signed_size {
        return Err(AuditError::CheckpointsRemoved {
            what: what.to_owned(),
            signed: signed_size,
            size: cp.size,
        });
    }
    Ok(cp)
}
