//! The delivery notice: what the gateway's HSM signs once a committed transfer has left its
//! hands, either into the record store (`delivered`) or set aside because the store refused it
//! (`undeliverable`).
//!
//! # Encoding (version 1, big-endian)
//!
//! ```text
//! magic "BLDN" | u16 version | 16 transfer id | 32 merkle root
//! | 32 manifest digest | u8 outcome (1 delivered, 2 undeliverable)
//! | 32 answer digest | u16 len, answer (UTF-8) | u16 len, gateway (UTF-8)
//! | u64 decided_unix_ms
//! ```
//!
//! `answer` is the store's answer as the gateway recorded it: where the transfer went (the
//! directory, or the STOW-RS RetrieveURL) when delivered, the store's status and reasons (for
//! STOW-RS, the FailureReason of each refused instance) when undeliverable. `answer_digest` is
//! the SHA-256 of the whole recorded answer; `answer` itself is cut to
//! [`MAX_NOTICE_ANSWER_LEN`] bytes at a character boundary, so the digest names the full text
//! even when the notice carries only its beginning.
//!
//! The magic differs from the manifest's and the receipt's, so no encoding can be passed off
//! as another even under the same key; the signature carries its own context prefix too.

use bytes::BufMut;

use super::wire::{Reader, put_str16};
use super::{Digest, ProtoError, TransferId};

/// The first four bytes of an encoded delivery notice.
pub const NOTICE_MAGIC: [u8; 4] = *b"BLDN";
/// The notice encoding version this build writes and reads.
pub const NOTICE_VERSION: u16 = 1;
/// Longest store answer a notice carries, in bytes (the digest covers the whole answer).
pub const MAX_NOTICE_ANSWER_LEN: usize = 16 * 1024;
/// Longest gateway name a notice carries, in bytes.
pub const MAX_NOTICE_GATEWAY_LEN: u16 = 255;

/// What became of a committed transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The record store holds it.
    Delivered,
    /// The record store refused it; the gateway set it aside.
    Undeliverable,
}

impl Outcome {
    fn to_u8(self) -> u8 {
        match self {
            Outcome::Delivered => 1,
            Outcome::Undeliverable => 2,
        }
    }

    fn from_u8(b: u8) -> Option<Outcome> {
        match b {
            1 => Some(Outcome::Delivered),
            2 => Some(Outcome::Undeliverable),
            _ => None,
        }
    }

    /// `delivered` or `undeliverable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Undeliverable => "undeliverable",
        }
    }
}

/// The gateway's signed statement of what the record store did with a committed transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryNotice {
    /// The transfer.
    pub transfer_id: TransferId,
    /// The manifest's Merkle root (as in the receipt).
    pub merkle_root: Digest,
    /// [`super::Manifest::digest`] of the manifest delivered.
    pub manifest_digest: Digest,
    /// Delivered or set aside.
    pub outcome: Outcome,
    /// SHA-256 of the store's whole answer as the gateway recorded it.
    pub answer_digest: Digest,
    /// The store's answer (its first [`MAX_NOTICE_ANSWER_LEN`] bytes).
    pub answer: String,
    /// The gateway's identity.
    pub gateway: String,
    /// When the gateway recorded the store's answer, in milliseconds since the Unix epoch.
    pub decided_unix_ms: u64,
}

/// `text` cut to at most `max` bytes at a character boundary.
pub fn cut_text(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl DeliveryNotice {
    /// A notice for `answer` (the whole recorded answer: its digest is taken here, and the
    /// text kept is cut to [`MAX_NOTICE_ANSWER_LEN`] bytes).
    pub fn new(
        transfer_id: TransferId,
        merkle_root: Digest,
        manifest_digest: Digest,
        outcome: Outcome,
        answer: &[u8],
        gateway: &str,
        decided_unix_ms: u64,
    ) -> DeliveryNotice {
        let text = String::from_utf8_lossy(answer);
        DeliveryNotice {
            transfer_id,
            merkle_root,
            manifest_digest,
            outcome,
            answer_digest: super::sha256(answer),
            answer: cut_text(&text, MAX_NOTICE_ANSWER_LEN).to_owned(),
            gateway: cut_text(gateway, usize::from(MAX_NOTICE_GATEWAY_LEN)).to_owned(),
            decided_unix_ms,
        }
    }

    /// The canonical encoding: what the gateway signs. Over-long texts are cut (see
    /// [`DeliveryNotice::new`], which keeps them within bounds).
    pub fn to_bytes(&self) -> Vec<u8> {
        let answer = cut_text(&self.answer, MAX_NOTICE_ANSWER_LEN);
        let gateway = cut_text(&self.gateway, usize::from(MAX_NOTICE_GATEWAY_LEN));
        let mut out = Vec::with_capacity(
            4 + 2 + 16 + 32 + 32 + 1 + 32 + 2 + answer.len() + 2 + gateway.len() + 8,
        );
        out.put_slice(&NOTICE_MAGIC);
        out.put_u16(NOTICE_VERSION);
        out.put_slice(&self.transfer_id.0);
        out.put_slice(&self.merkle_root);
        out.put_slice(&self.manifest_digest);
        out.put_u8(self.outcome.to_u8());
        out.put_slice(&self.answer_digest);
        put_str16(&mut out, answer);
        put_str16(&mut out, gateway);
        out.put_u64(self.decided_unix_ms);
        out
    }

    /// Decodes a notice; refuses another magic or version, an unknown outcome, over-long
    /// texts and trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<DeliveryNotice, ProtoError> {
        let mut r = Reader::new(bytes, "delivery notice");
        r.header(NOTICE_MAGIC, NOTICE_VERSION)?;
        let transfer_id = TransferId(r.array()?);
        let merkle_root = r.array()?;
        let manifest_digest = r.array()?;
        let raw = r.u8()?;
        let outcome = Outcome::from_u8(raw).ok_or(ProtoError::UnknownOutcome(raw))?;
        let answer_digest = r.array()?;
        let max_answer = u16::try_from(MAX_NOTICE_ANSWER_LEN).expect("fits u16");
        let answer = r.str16(max_answer, "delivery notice answer")?.to_owned();
        let gateway = r
            .str16(MAX_NOTICE_GATEWAY_LEN, "delivery notice gateway")?
            .to_owned();
        let decided_unix_ms = r.u64()?;
        r.finish()?;
        Ok(DeliveryNotice {
            transfer_id,
            merkle_root,
            manifest_digest,
            outcome,
            answer_digest,
            answer,
            gateway,
            decided_unix_ms,
        })
    }
}

impl serde::Serialize for DeliveryNotice {
    /// The human-readable form (digests in hex) for APIs and files.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            transfer_id: TransferId,
            merkle_root: String,
            manifest_digest: String,
            outcome: Outcome,
            answer_digest: String,
            answer: &'a str,
            gateway: &'a str,
            decided_unix_ms: u64,
        }
        Json {
            transfer_id: self.transfer_id,
            merkle_root: hex::encode(self.merkle_root),
            manifest_digest: hex::encode(self.manifest_digest),
            outcome: self.outcome,
            answer_digest: hex::encode(self.answer_digest),
            answer: &self.answer,
            gateway: &self.gateway,
            decided_unix_ms: self.decided_unix_ms,
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(outcome: Outcome) -> DeliveryNotice {
        DeliveryNotice::new(
            TransferId::new_v7(),
            [1; 32],
            [2; 32],
            outcome,
            b"POST http://store/studies: 409: 1.2.3: failure reason 0xa900",
            "gateway-hk-1",
            1_700_000_000_123,
        )
    }

    #[test]
    fn roundtrip_and_refusals() {
        for outcome in [Outcome::Delivered, Outcome::Undeliverable] {
            let n = sample(outcome);
            let b = n.to_bytes();
            assert_eq!(DeliveryNotice::from_bytes(&b).unwrap(), n);
            assert_eq!(&b[..4], b"BLDN");
            for cut in 0..b.len() {
                assert!(DeliveryNotice::from_bytes(&b[..cut]).is_err());
            }
            let mut long = b.clone();
            long.push(0);
            assert!(matches!(
                DeliveryNotice::from_bytes(&long),
                Err(ProtoError::TrailingBytes { .. })
            ));
        }
        let b = sample(Outcome::Delivered).to_bytes();
        let mut v2 = b.clone();
        v2[5] = 2;
        assert!(matches!(
            DeliveryNotice::from_bytes(&v2),
            Err(ProtoError::UnsupportedVersion { version: 2, .. })
        ));
        let mut bad_outcome = b.clone();
        bad_outcome[4 + 2 + 16 + 32 + 32] = 3;
        assert_eq!(
            DeliveryNotice::from_bytes(&bad_outcome),
            Err(ProtoError::UnknownOutcome(3))
        );
        // Neither a receipt nor a manifest decodes as a notice, nor the other way round.
        for magic in [b"BLRC", b"BLMF"] {
            let mut other = b.clone();
            other[..4].copy_from_slice(magic);
            assert_eq!(
                DeliveryNotice::from_bytes(&other),
                Err(ProtoError::BadMagic {
                    what: "delivery notice"
                })
            );
        }
        assert!(super::super::Receipt::from_bytes(&b).is_err());
    }

    #[test]
    fn a_long_answer_is_cut_but_its_digest_covers_all_of_it() {
        let answer = "é".repeat(MAX_NOTICE_ANSWER_LEN); // two bytes each
        let n = DeliveryNotice::new(
            TransferId::new_v7(),
            [0; 32],
            [0; 32],
            Outcome::Undeliverable,
            answer.as_bytes(),
            "gw",
            1,
        );
        assert_eq!(n.answer.len(), MAX_NOTICE_ANSWER_LEN);
        assert_eq!(n.answer_digest, super::super::sha256(answer.as_bytes()));
        assert_eq!(DeliveryNotice::from_bytes(&n.to_bytes()).unwrap(), n);
    }

    #[test]
    fn json_form() {
        let n = sample(Outcome::Undeliverable);
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["outcome"], "undeliverable");
        assert_eq!(v["merkle_root"], hex::encode([1u8; 32]));
        assert_eq!(v["transfer_id"], n.transfer_id.to_string());
        assert_eq!(v["answer_digest"], hex::encode(n.answer_digest));
        assert!(v["answer"].as_str().unwrap().contains("0xa900"));
    }

    proptest! {
        #[test]
        fn prop_roundtrip(id in any::<[u8; 16]>(), root in any::<[u8; 32]>(), md in any::<[u8; 32]>(), delivered in any::<bool>(), answer in ".{0,200}", who in "[a-z0-9-]{0,40}", t in any::<u64>()) {
            let outcome = if delivered { Outcome::Delivered } else { Outcome::Undeliverable };
            let n = DeliveryNotice::new(TransferId(id), root, md, outcome, answer.as_bytes(), &who, t);
            prop_assert_eq!(DeliveryNotice::from_bytes(&n.to_bytes()).unwrap(), n);
        }

        #[test]
        fn prop_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = DeliveryNotice::from_bytes(&bytes);
        }
    }
}
