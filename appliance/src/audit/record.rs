//! One audit record, its canonical encoding, and the framed line it is stored as.
//!
//! A record is serialised as JSON with a fixed field order, no whitespace, and every field
//! present (`null` when it does not apply). Those bytes are the record's canonical encoding:
//! the Merkle leaf is `leaf_hash(canonical bytes)` (RFC 6962), and a reader refuses a record
//! whose bytes are not exactly what re-encoding it gives.
//!
//! On disk each record is one line: the leaf hash in hex, a space, the canonical JSON, a
//! newline. A line without its newline is a torn tail (a crash mid-append); a line whose
//! leaf hash does not match its JSON was edited.

use baylink_net::merkle::leaf_hash;
use baylink_net::proto::{Digest, Manifest};
use serde::{Deserialize, Serialize};

use crate::policy::Declaration;

/// Version written in every record (`v`).
pub const RECORD_VERSION: u32 = 1;

/// The longest line (leaf hash, space, JSON, newline) the log accepts or reads.
pub const MAX_LINE: usize = 16 * 1024;

/// Longest `detail` text kept in a record (longer text is cut at a character boundary).
pub const MAX_DETAIL: usize = 512;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The edge accepted a declaration (the compliance checkpoint allowed it).
    Declared,
    /// The compliance checkpoint refused a declaration (`rule` names the rule).
    Refused,
    /// The edge sealed the transfer (Merkle root and manifest digest signed by its HSM).
    Sealed,
    /// Every chunk reached the gateway and its receipt came back.
    Sent,
    /// The gateway committed the transfer (recorded before its receipt is sent).
    Committed,
    /// The edge verified the gateway's signed receipt.
    Receipted,
    /// The gateway delivered the transfer downstream.
    Delivered,
    /// The edge verified and stored the gateway's signed delivery notice (`detail`: the
    /// outcome, the digest of the store's answer, and the answer's beginning).
    Notified,
    /// A transfer was dropped because it expired.
    Expired,
    /// The transfer stopped with an error (`detail` says which).
    Failed,
}

impl Kind {
    /// Every kind, for the series created at start.
    pub const ALL: [Kind; 10] = [
        Kind::Declared,
        Kind::Refused,
        Kind::Sealed,
        Kind::Sent,
        Kind::Committed,
        Kind::Receipted,
        Kind::Delivered,
        Kind::Notified,
        Kind::Expired,
        Kind::Failed,
    ];
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// What a caller records. The log adds the version, sequence number, time and appliance id,
/// and replaces the patient id with its keyed hash: the raw id is never written.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened.
    pub kind: Kind,
    /// The transfer id, when the event belongs to a transfer.
    pub transfer: Option<String>,
    /// The hospital that declared the transfer (its certificate subject), if known.
    pub hospital: Option<String>,
    /// The other appliance involved (the sending edge, on the gateway).
    pub peer: Option<String>,
    /// The patient id, hashed with the appliance's audit key before it is written.
    pub patient_id: Option<String>,
    /// Data category.
    pub category: Option<String>,
    /// Purpose of the transfer.
    pub purpose: Option<String>,
    /// Destination system.
    pub destination: Option<String>,
    /// Consent record relied on (the process id of the transfer).
    pub consent_ref: Option<String>,
    /// SHA-256 of the declaration.
    pub declaration_digest: Option<Digest>,
    /// Merkle root over the chunk digests.
    pub merkle_root: Option<Digest>,
    /// SHA-256 of the signed manifest.
    pub manifest_digest: Option<Digest>,
    /// The policy rule that refused (for `refused`).
    pub rule: Option<String>,
    /// A short reason (for `failed`); cut to [`MAX_DETAIL`] bytes.
    pub detail: Option<String>,
}

impl Event {
    /// An event of `kind` with nothing else filled in.
    pub fn new(kind: Kind) -> Event {
        Event {
            kind,
            transfer: None,
            hospital: None,
            peer: None,
            patient_id: None,
            category: None,
            purpose: None,
            destination: None,
            consent_ref: None,
            declaration_digest: None,
            merkle_root: None,
            manifest_digest: None,
            rule: None,
            detail: None,
        }
    }

    /// The same event with another kind (the transfer's later steps reuse its fields).
    pub fn clone_as(&self, kind: Kind) -> Event {
        Event {
            kind,
            ..self.clone()
        }
    }

    /// An event of `kind` about a received transfer, as the gateway knows it: its id, sender,
    /// process id (the consent reference), declaration digest, Merkle root and manifest
    /// digest.
    pub fn of_manifest(kind: Kind, m: &Manifest) -> Event {
        Event {
            transfer: Some(m.transfer_id.to_string()),
            peer: Some(m.sender.clone()),
            consent_ref: Some(m.process_id.clone()),
            declaration_digest: Some(m.declaration_digest),
            merkle_root: Some(m.merkle_root),
            manifest_digest: Some(m.digest()),
            ..Event::new(kind)
        }
    }

    /// An event of `kind` for a transfer, with the declaration's fields and digest.
    pub fn declared(kind: Kind, transfer: Option<String>, d: &Declaration) -> Event {
        Event {
            transfer,
            patient_id: Some(d.patient_id.clone()),
            category: Some(d.category.clone()),
            purpose: Some(d.purpose.clone()),
            destination: Some(d.destination.clone()),
            consent_ref: d.consent_ref.clone(),
            declaration_digest: Some(d.digest()),
            ..Event::new(kind)
        }
    }
}

/// A record as stored: the canonical JSON's fields, in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Record format version ([`RECORD_VERSION`]).
    pub v: u32,
    /// Position in the log, from 0; equals the Merkle leaf index.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// What happened.
    pub kind: Kind,
    /// The appliance that wrote the record (`id` in its config).
    pub appliance: String,
    /// Transfer id.
    pub transfer: Option<String>,
    /// Hospital (certificate subject).
    pub hospital: Option<String>,
    /// The other appliance.
    pub peer: Option<String>,
    /// HMAC-SHA256 of the patient id under the appliance's audit key, hex.
    pub patient: Option<String>,
    /// Data category.
    pub category: Option<String>,
    /// Purpose.
    pub purpose: Option<String>,
    /// Destination.
    pub destination: Option<String>,
    /// Consent reference.
    pub consent: Option<String>,
    /// Declaration digest, hex.
    pub declaration_digest: Option<String>,
    /// Merkle root, hex.
    pub merkle_root: Option<String>,
    /// Manifest digest, hex.
    pub manifest_digest: Option<String>,
    /// Refusing rule.
    pub rule: Option<String>,
    /// Short reason.
    pub detail: Option<String>,
}

impl Record {
    /// The canonical encoding (the bytes the Merkle leaf hashes).
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record of strings and integers always serialises")
    }

    /// Parses canonical bytes; refuses anything that does not re-encode to the same bytes.
    pub fn from_canonical(bytes: &[u8]) -> Result<Record, String> {
        let r: Record =
            serde_json::from_slice(bytes).map_err(|e| format!("not a valid record: {e}"))?;
        if r.v != RECORD_VERSION {
            return Err(format!("unknown record version {}", r.v));
        }
        if r.canonical() != bytes {
            return Err("not in canonical form".into());
        }
        Ok(r)
    }

    /// The stored line: hex leaf hash, space, canonical JSON, newline; and the leaf hash.
    pub fn line(&self) -> (Vec<u8>, Digest) {
        let json = self.canonical();
        let leaf = leaf_hash(&json);
        let mut line = Vec::with_capacity(json.len() + 66);
        line.extend_from_slice(hex::encode(leaf).as_bytes());
        line.push(b' ');
        line.extend_from_slice(&json);
        line.push(b'\n');
        (line, leaf)
    }
}

/// Parses one stored line (without its newline) into the record, its canonical bytes and
/// its leaf hash; the error says what is wrong with it.
pub fn parse_line(line: &[u8]) -> Result<(Record, Vec<u8>, Digest), String> {
    if line.len() < 66 || line[64] != b' ' {
        return Err("not a record line (leaf hash, space, JSON)".into());
    }
    let mut stored = [0u8; 32];
    hex::decode_to_slice(&line[..64], &mut stored)
        .map_err(|_| "the leaf hash is not hex".to_owned())?;
    let json = &line[65..];
    if leaf_hash(json) != stored {
        return Err("the record does not match its leaf hash (edited)".into());
    }
    let record = Record::from_canonical(json)?;
    Ok((record, json.to_vec(), stored))
}

/// Cuts `text` to at most [`MAX_DETAIL`] bytes at a character boundary.
pub fn cut_detail(text: &str) -> String {
    if text.len() <= MAX_DETAIL {
        return text.to_owned();
    }
    let mut end = MAX_DETAIL;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            v: RECORD_VERSION,
            seq: 3,
            time_ms: 1_700_000_000_000,
            kind: Kind::Sealed,
            appliance: "edge".into(),
            transfer: Some("0190".into()),
            hospital: None,
            peer: None,
            patient: Some("ab".repeat(32)),
            category: Some("diagnostic-image".into()),
            purpose: Some("care".into()),
            destination: Some("hk-ehealth".into()),
            consent: Some("C-1".into()),
            declaration_digest: Some("00".repeat(32)),
            merkle_root: Some("11".repeat(32)),
            manifest_digest: Some("22".repeat(32)),
            rule: None,
            detail: Some("a \"quoted\" ü".into()),
        }
    }

    #[test]
    fn line_round_trips_and_field_order_is_fixed() {
        let r = sample();
        let (line, leaf) = r.line();
        assert_eq!(line.last(), Some(&b'\n'));
        let (back, json, l2) = parse_line(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, r);
        assert_eq!(l2, leaf);
        assert_eq!(leaf, leaf_hash(&json));
        let text = String::from_utf8(json).unwrap();
        assert!(text.starts_with(r#"{"v":1,"seq":3,"time_ms":1700000000000,"kind":"sealed","#));
        assert!(
            text.contains(r#""hospital":null"#),
            "absent fields are explicit: {text}"
        );
    }

    #[test]
    fn edits_and_non_canonical_forms_are_refused() {
        let (line, _) = sample().line();
        let body = &line[..line.len() - 1];
        let mut edited = body.to_vec();
        let at = edited.len() - 5;
        edited[at] ^= 0x01;
        assert!(parse_line(&edited).unwrap_err().contains("edited"));

        // Same record with whitespace: hash recomputed, still refused as non-canonical.
        let json = String::from_utf8(sample().canonical())
            .unwrap()
            .replace(",\"seq\"", ", \"seq\"");
        let leaf = leaf_hash(json.as_bytes());
        let spaced = format!("{} {json}", hex::encode(leaf));
        assert!(
            parse_line(spaced.as_bytes())
                .unwrap_err()
                .contains("canonical")
        );
        assert!(parse_line(b"short").is_err());
    }

    #[test]
    fn detail_is_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_DETAIL);
        let cut = cut_detail(&long);
        assert!(cut.len() <= MAX_DETAIL);
        assert!(long.starts_with(&cut));
    }
}
