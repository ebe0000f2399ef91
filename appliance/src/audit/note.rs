//! Checkpoints: C2SP `tlog-checkpoint` bodies in C2SP `signed-note` envelopes.
//!
//! The body (the "note text") is
//!
//! ```text
//! baylink.audit/<appliance id>      origin: names this log
//! <tree size>                       decimal, no leading zeros
//! <base64 root hash>                RFC 6962 root over the records
//! time <unix ms>                    extension line: when the HSM signed it
//! ```
//!
//! followed by a blank line and one signature line per signer:
//! `— <key name> <base64(key id || signature)>`. The key name is the origin. The signature
//! type is the signed-note spec's ECDSA type (`0x02`, as the transparency-dev witness
//! implements it): an ASN.1 DER ECDSA P-256 signature over SHA-256 of the note text, and a
//! key id that is the first four bytes of SHA-256 over the key's DER SubjectPublicKeyInfo.
//! The HSM signs exactly the note text (no context prefix: the origin line is the domain
//! separation, and no other signed object of baylink starts with `baylink.audit/`). The HSM
//! returns raw `r || s`; it is re-encoded as DER for the note.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use baylink_hsm::PublicKey;
use baylink_net::proto::Digest;

/// Prefix of every baylink audit log origin line.
pub const ORIGIN_PREFIX: &str = "baylink.audit/";

/// Largest signed note read (body, blank line and signature lines).
pub const MAX_NOTE: usize = 8 * 1024;

/// Most signature lines read in one note (the spec asks verifiers to accept at least 16).
pub const MAX_SIGNATURES: usize = 32;

/// The origin (and key name) of an appliance's log: spaces and `+` are not allowed in key
/// names, so they become `_`.
pub fn origin(appliance_id: &str) -> String {
    let id: String = appliance_id
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '+' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("{ORIGIN_PREFIX}{id}")
}

/// The signed-note key id of an ECDSA key: SHA-256 of its DER SPKI, first four bytes.
pub fn key_id(key: &PublicKey) -> [u8; 4] {
    let d = digest(&SHA256, &key.to_spki_der());
    let mut id = [0u8; 4];
    id.copy_from_slice(&d.as_ref()[..4]);
    id
}

/// A tree head: what a checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line.
    pub origin: String,
    /// Number of records covered.
    pub size: u64,
    /// RFC 6962 root over those records.
    pub root: Digest,
    /// When it was signed (unix ms), from the `time` extension line.
    pub time_ms: Option<u64>,
}

impl Checkpoint {
    /// The note text (body) to sign, ending in a newline.
    pub fn body(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        );
        if let Some(t) = self.time_ms {
            s.push_str(&format!("time {t}\n"));
        }
        s
    }

    /// Parses a note text as a checkpoint body.
    pub fn parse_body(text: &str) -> Result<Checkpoint, String> {
        let body = text
            .strip_suffix('\n')
            .ok_or("the note text does not end in a newline")?;
        let mut lines = body.split('\n');
        let origin = lines.next().unwrap_or_default();
        if origin.is_empty() {
            return Err("empty origin line".into());
        }
        let size_line = lines.next().ok_or("no tree size line")?;
        if size_line.is_empty()
            || !size_line.bytes().all(|b| b.is_ascii_digit())
            || (size_line.len() > 1 && size_line.starts_with('0'))
        {
            return Err(format!("tree size `{size_line}` is not a decimal number"));
        }
        let size: u64 = size_line
            .parse()
            .map_err(|_| format!("tree size `{size_line}` is out of range"))?;
        let root_line = lines.next().ok_or("no root hash line")?;
        let root: Digest = STANDARD
            .decode(root_line)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("the root hash is not base64 of 32 bytes")?;
        let mut time_ms = None;
        for ext in lines {
            if ext.is_empty() {
                return Err("empty line inside the checkpoint body".into());
            }
            if let Some(t) = ext.strip_prefix("time ") {
                time_ms = Some(t.parse().map_err(|_| format!("bad time line `{ext}`"))?);
            }
        }
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            time_ms,
        })
    }
}

/// The signature line for `raw` (an HSM `r || s` signature over `body`).
pub fn signature_line(key_name: &str, key: &PublicKey, raw: &[u8; 64]) -> String {
    let mut blob = key_id(key).to_vec();
    blob.extend_from_slice(&raw_to_der(raw));
    format!("\u{2014} {key_name} {}\n", STANDARD.encode(blob))
}

/// A whole signed note: body, blank line, signature line.
pub fn signed_note(body: &str, key_name: &str, key: &PublicKey, raw: &[u8; 64]) -> String {
    format!("{body}\n{}", signature_line(key_name, key, raw))
}

/// Splits a signed note into its text and its signature lines.
pub fn split_note(note: &str) -> Result<(&str, Vec<&str>), String> {
    if note.len() > MAX_NOTE {
        return Err(format!("longer than {MAX_NOTE} bytes"));
    }
    if note.bytes().any(|b| b < 0x20 && b != b'\n') {
        return Err("control characters in the note".into());
    }
    // The text ends at the last blank line; the text keeps its final newline.
    let cut = note
        .rfind("\n\n")
        .ok_or("no blank line between text and signatures")?;
    let text = &note[..=cut];
    let sigs_part = &note[cut + 2..];
    let sigs_part = sigs_part
        .strip_suffix('\n')
        .ok_or("the signature lines do not end in a newline")?;
    let sigs: Vec<&str> = sigs_part.split('\n').collect();
    if sigs.is_empty() || sigs.len() > MAX_SIGNATURES {
        return Err(format!("{} signature lines", sigs.len()));
    }
    Ok((text, sigs))
}

/// Verifies the note's signature by `key` under the name `expected_name` (or, with `None`,
/// the note's own origin, which must start with [`ORIGIN_PREFIX`]) and parses the checkpoint.
///
/// Signatures by other keys are ignored; at least one by `key` must be present and every
/// one by `key` must verify.
pub fn open(
    note: &str,
    key: &PublicKey,
    expected_name: Option<&str>,
) -> Result<Checkpoint, String> {
    let (text, sigs) = split_note(note)?;
    let cp = Checkpoint::parse_body(text)?;
    if !cp.origin.starts_with(ORIGIN_PREFIX) {
        return Err(format!("origin `{}` is not a baylink audit log", cp.origin));
    }
    let name = expected_name.unwrap_or(&cp.origin);
    if cp.origin != name {
        return Err(format!(
            "origin `{}` is not the expected `{name}`",
            cp.origin
        ));
    }
    let id = key_id(key);
    let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.sec1().as_slice());
    let mut verified = 0usize;
    for line in sigs {
        let rest = line
            .strip_prefix("\u{2014} ")
            .ok_or("a signature line does not start with an em dash")?;
        let (sig_name, b64) = rest
            .split_once(' ')
            .ok_or("a signature line has no signature")?;
        let blob = STANDARD
            .decode(b64)
            .map_err(|_| format!("the signature of `{sig_name}` is not base64"))?;
        if blob.len() < 5 {
            return Err(format!("the signature of `{sig_name}` is too short"));
        }
        if sig_name != name || blob[..4] != id {
            continue; // another signer (e.g. a witness): not ours to check here
        }
        verifier
            .verify(text.as_bytes(), &blob[4..])
            .map_err(|_| format!("the signature of `{sig_name}` does not verify"))?;
        verified += 1;
    }
    if verified == 0 {
        return Err(format!(
            "no signature by `{name}` with key id {} (the public key given)",
            hex::encode(id)
        ));
    }
    Ok(cp)
}

/// DER `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` from raw `r || s`.
pub(super) fn raw_to_der(raw: &[u8; 64]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, v: &[u8]) {
        let first = v.iter().position(|&b| b != 0).unwrap_or(v.len() - 1);
        let v = &v[first..];
        let pad = v[0] & 0x80 != 0;
        out.push(0x02);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(72);
    integer(&mut body, &raw[..32]);
    integer(&mut body, &raw[32..]);
    let mut der = Vec::with_capacity(body.len() + 2);
    der.push(0x30);
    der.push(body.len() as u8); // at most 70 bytes: short form
    der.extend_from_slice(&body);
    der
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips() {
        let cp = Checkpoint {
            origin: origin("edge one+two"),
            size: 12,
            root: [7u8; 32],
            time_ms: Some(1_700_000_000_123),
        };
        assert_eq!(cp.origin, "baylink.audit/edge_one_two");
        let body = cp.body();
        assert_eq!(
            body,
            format!(
                "baylink.audit/edge_one_two\n12\n{}\ntime 1700000000123\n",
                STANDARD.encode([7u8; 32])
            )
        );
        assert_eq!(Checkpoint::parse_body(&body).unwrap(), cp);
        assert!(Checkpoint::parse_body("o\n012\nAAAA\n").is_err());
        assert!(Checkpoint::parse_body("o\n12\nAAAA\n").is_err());
        assert!(Checkpoint::parse_body("o\n12").is_err());
    }

    #[test]
    fn der_encoding_is_minimal() {
        let mut raw = [0u8; 64];
        raw[31] = 1; // r = 1
        raw[32] = 0x80; // s has the high bit set: needs a zero pad
        let der = raw_to_der(&raw);
        assert_eq!(&der[..5], &[0x30, 0x26, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 0x21, 0x00]);
        assert_eq!(der.len(), 2 + 3 + 3 + 32);
    }

    #[test]
    fn split_finds_the_last_blank_line() {
        let note = "a\n\nb\n\n\u{2014} k AAAA\n";
        let (text, sigs) = split_note(note).unwrap();
        assert_eq!(text, "a\n\nb\n");
        assert_eq!(sigs, vec!["\u{2014} k AAAA"]);
        assert!(split_note("a\n\u{2014} k AAAA\n").is_err());
        assert!(split_note("a\n\n\u{2014} k AAAA").is_err());
    }
}
