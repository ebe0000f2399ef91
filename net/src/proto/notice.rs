//! The delivery notice: what the gateway's HSM signs once a committed transfer has left its
//! hands: into the record store whole (`delivered`), into it but for the instances the store
//! refused (`partial`), or not at all (`undeliverable`: set aside, the store refused it).
//!
//! # Encoding (version 2, big-endian)
//!
//! ```text
//! magic "BLDN" | u16 version (2) | 16 transfer id | 32 merkle root
//! | 32 manifest digest | u8 outcome (1 delivered, 2 undeliverable, 3 partial)
//! | 32 answer digest | u16 len, answer (UTF-8) | u16 len, gateway (UTF-8)
//! | u64 decided_unix_ms
//! | u32 refused_total | u16 count, then count × refused instance:
//!     u16 len, file name (UTF-8, ≤ 255) | u8 len, SOP Instance UID (≤ 64)
//!     | u8 len, SOP Class UID (≤ 64) | u8 has_code (0 or 1) [| u16 FailureReason]
//!     | u16 len, reason (UTF-8, ≤ 512)
//! ```
//!
//! `answer` is the store's answer as the gateway recorded it: where the transfer went (the
//! directory, or the STOW-RS RetrieveURL) when delivered, the store's status and reasons (for
//! STOW-RS, the FailureReason of each refused instance) when undeliverable. `answer_digest` is
//! the SHA-256 of the whole recorded answer; `answer` itself is cut to
//! [`MAX_NOTICE_ANSWER_LEN`] bytes at a character boundary, so the digest names the full text
//! even when the notice carries only its beginning.
//!
//! The refused instances (version 2) are the instances the store refused, each with its
//! file name (as in the manifest), SOP Instance and Class UIDs where known (empty when not),
//! the store's FailureReason (0008,1197) where it gave one, and the reason in words; at most
//! [`MAX_NOTICE_REFUSED`] are listed, `refused_total` counts them all. A `delivered` notice
//! lists none, a `partial` one at least one; an `undeliverable` one may list none (the store
//! refused the transfer as a whole: the reason is in `answer`).
//!
//! Version 1 (the same without the outcome `partial`, `refused_total` and the list) is still
//! read, so notices stored before an upgrade stay readable; it re-encodes as it came.
//!
//! The magic differs from the manifest's and the receipt's, so no encoding can be passed off
//! as another even under the same key; the signature carries its own context prefix too.

use bytes::BufMut;

use super::wire::{Reader, put_str16};
use super::{Digest, ProtoError, TransferId};

/// The first four bytes of an encoded delivery notice.
pub const NOTICE_MAGIC: [u8; 4] = *b"BLDN";
/// The notice encoding version this build writes (it reads this one and version 1).
pub const NOTICE_VERSION: u16 = 2;
/// The first notice encoding version: no refused instances, no `partial` outcome.
const NOTICE_VERSION_1: u16 = 1;
/// Longest store answer a notice carries, in bytes (the digest covers the whole answer).
pub const MAX_NOTICE_ANSWER_LEN: usize = 16 * 1024;
/// Longest gateway name a notice carries, in bytes.
pub const MAX_NOTICE_GATEWAY_LEN: u16 = 255;
/// Most refused instances a notice lists (`refused_total` counts them all).
pub const MAX_NOTICE_REFUSED: usize = 1000;
/// Longest file name of a refused instance, in bytes (the manifest's own bound).
pub const MAX_REFUSED_FILE_LEN: usize = 255;
/// Longest UID of a refused instance, in bytes (PS3.5 9.1).
pub const MAX_REFUSED_UID_LEN: usize = 64;
/// Longest reason of a refused instance, in bytes.
pub const MAX_REFUSED_REASON_LEN: usize = 512;

/// What became of a committed transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The record store holds every instance.
    Delivered,
    /// The record store holds none of it (it refused the transfer, or every instance); the
    /// gateway set it aside.
    Undeliverable,
    /// The record store holds every instance but those it refused (listed in the notice).
    Partial,
}

impl Outcome {
    fn to_u8(self) -> u8 {
        match self {
            Outcome::Delivered => 1,
            Outcome::Undeliverable => 2,
            Outcome::Partial => 3,
        }
    }

    fn from_u8(b: u8, version: u16) -> Option<Outcome> {
        match b {
            1 => Some(Outcome::Delivered),
            2 => Some(Outcome::Undeliverable),
            3 if version >= NOTICE_VERSION => Some(Outcome::Partial),
            _ => None,
        }
    }

    /// `delivered`, `partial` or `undeliverable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Undeliverable => "undeliverable",
            Outcome::Partial => "partial",
        }
    }
}

/// One instance the record store refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefusedInstance {
    /// Its file name, as in the manifest.
    pub file: String,
    /// Its SOP Instance UID, empty when neither the store nor the file named one.
    pub sop_instance_uid: String,
    /// Its SOP Class UID, empty when unknown.
    pub sop_class_uid: String,
    /// The store's FailureReason (0008,1197), if it gave one.
    pub failure_reason: Option<u16>,
    /// Why, in words (the store's status and answer, or the gateway's own finding).
    pub reason: String,
}

impl RefusedInstance {
    /// The same with every text cut to its bound.
    fn bounded(&self) -> RefusedInstance {
        RefusedInstance {
            file: cut_text(&self.file, MAX_REFUSED_FILE_LEN).to_owned(),
            sop_instance_uid: cut_text(&self.sop_instance_uid, MAX_REFUSED_UID_LEN).to_owned(),
            sop_class_uid: cut_text(&self.sop_class_uid, MAX_REFUSED_UID_LEN).to_owned(),
            failure_reason: self.failure_reason,
            reason: cut_text(&self.reason, MAX_REFUSED_REASON_LEN).to_owned(),
        }
    }

    fn put(&self, out: &mut Vec<u8>) {
        let r = self.bounded();
        put_str16(out, &r.file);
        for uid in [&r.sop_instance_uid, &r.sop_class_uid] {
            out.put_u8(u8::try_from(uid.len()).expect("bounded"));
            out.put_slice(uid.as_bytes());
        }
        match r.failure_reason {
            None => out.put_u8(0),
            Some(code) => {
                out.put_u8(1);
                out.put_u16(code);
            }
        }
        put_str16(out, &r.reason);
    }

    fn read(r: &mut Reader<'_>) -> Result<RefusedInstance, ProtoError> {
        let file = r
            .str16(bound16(MAX_REFUSED_FILE_LEN), "refused instance file")?
            .to_owned();
        let mut uid = |what| -> Result<String, ProtoError> {
            let len = usize::from(r.u8()?);
            if len > MAX_REFUSED_UID_LEN {
                return Err(ProtoError::TooLong {
                    what,
                    len: len as u64,
                    max: MAX_REFUSED_UID_LEN as u64,
                });
            }
            let bytes = r.take(len)?;
            Ok(std::str::from_utf8(bytes)
                .map_err(|_| ProtoError::BadUtf8 { what })?
                .to_owned())
        };
        let sop_instance_uid = uid("refused instance SOP Instance UID")?;
        let sop_class_uid = uid("refused instance SOP Class UID")?;
        let failure_reason = match r.u8()? {
            0 => None,
            1 => Some(r.u16()?),
            _ => {
                return Err(ProtoError::BadNotice(
                    "a refused instance's FailureReason flag is neither 0 nor 1",
                ));
            }
        };
        let reason = r
            .str16(bound16(MAX_REFUSED_REASON_LEN), "refused instance reason")?
            .to_owned();
        Ok(RefusedInstance {
            file,
            sop_instance_uid,
            sop_class_uid,
            failure_reason,
            reason,
        })
    }
}

fn bound16(max: usize) -> u16 {
    u16::try_from(max).expect("fits u16")
}

impl serde::Serialize for RefusedInstance {
    /// `{"file","sop_instance_uid","sop_class_uid","failure_reason","reason"}`; a UID not
    /// known is `null`, the FailureReason is hex (`"0xc000"`) or `null`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            file: &'a str,
            sop_instance_uid: Option<&'a str>,
            sop_class_uid: Option<&'a str>,
            failure_reason: Option<String>,
            reason: &'a str,
        }
        fn known(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        Json {
            file: &self.file,
            sop_instance_uid: known(&self.sop_instance_uid),
            sop_class_uid: known(&self.sop_class_uid),
            failure_reason: self.failure_reason.map(|c| format!("{c:#06x}")),
            reason: &self.reason,
        }
        .serialize(serializer)
    }
}

/// The gateway's signed statement of what the record store did with a committed transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryNotice {
    /// The encoding version it was decoded from ([`NOTICE_VERSION`] for a new one).
    pub version: u16,
    /// The transfer.
    pub transfer_id: TransferId,
    /// The manifest's Merkle root (as in the receipt).
    pub merkle_root: Digest,
    /// [`super::Manifest::digest`] of the manifest delivered.
    pub manifest_digest: Digest,
    /// Delivered, partly delivered, or set aside.
    pub outcome: Outcome,
    /// SHA-256 of the store's whole answer as the gateway recorded it.
    pub answer_digest: Digest,
    /// The store's answer (its first [`MAX_NOTICE_ANSWER_LEN`] bytes).
    pub answer: String,
    /// The gateway's identity.
    pub gateway: String,
    /// When the gateway recorded the store's answer, in milliseconds since the Unix epoch.
    pub decided_unix_ms: u64,
    /// How many instances the store refused (the list may hold fewer).
    pub refused_total: u32,
    /// The refused instances, at most [`MAX_NOTICE_REFUSED`].
    pub refused: Vec<RefusedInstance>,
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
    /// text kept is cut to [`MAX_NOTICE_ANSWER_LEN`] bytes), listing no refused instance
    /// (see [`DeliveryNotice::with_refused`]).
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
            version: NOTICE_VERSION,
            transfer_id,
            merkle_root,
            manifest_digest,
            outcome,
            answer_digest: super::sha256(answer),
            answer: cut_text(&text, MAX_NOTICE_ANSWER_LEN).to_owned(),
            gateway: cut_text(gateway, usize::from(MAX_NOTICE_GATEWAY_LEN)).to_owned(),
            decided_unix_ms,
            refused_total: 0,
            refused: Vec::new(),
        }
    }

    /// The same notice listing `refused` (the first [`MAX_NOTICE_REFUSED`] of them, each
    /// text cut to its bound; `refused_total` counts them all).
    pub fn with_refused(mut self, refused: &[RefusedInstance]) -> DeliveryNotice {
        self.refused_total = u32::try_from(refused.len()).unwrap_or(u32::MAX);
        self.refused = refused
            .iter()
            .take(MAX_NOTICE_REFUSED)
            .map(RefusedInstance::bounded)
            .collect();
        self
    }

    /// The canonical encoding: what the gateway signs. Over-long texts and lists are cut
    /// (see [`DeliveryNotice::new`] and [`DeliveryNotice::with_refused`], which keep them
    /// within bounds). A notice decoded from version 1 re-encodes as version 1.
    pub fn to_bytes(&self) -> Vec<u8> {
        let answer = cut_text(&self.answer, MAX_NOTICE_ANSWER_LEN);
        let gateway = cut_text(&self.gateway, usize::from(MAX_NOTICE_GATEWAY_LEN));
        let mut out = Vec::with_capacity(
            4 + 2 + 16 + 32 + 32 + 1 + 32 + 2 + answer.len() + 2 + gateway.len() + 8 + 6,
        );
        let v1 = self.version == NOTICE_VERSION_1;
        out.put_slice(&NOTICE_MAGIC);
        out.put_u16(if v1 { NOTICE_VERSION_1 } else { NOTICE_VERSION });
        out.put_slice(&self.transfer_id.0);
        out.put_slice(&self.merkle_root);
        out.put_slice(&self.manifest_digest);
        out.put_u8(self.outcome.to_u8());
        out.put_slice(&self.answer_digest);
        put_str16(&mut out, answer);
        put_str16(&mut out, gateway);
        out.put_u64(self.decided_unix_ms);
        if !v1 {
            let listed = &self.refused[..self.refused.len().min(MAX_NOTICE_REFUSED)];
            let total = self
                .refused_total
                .max(u32::try_from(listed.len()).expect("bounded"));
            out.put_u32(total);
            out.put_u16(u16::try_from(listed.len()).expect("bounded"));
            for r in listed {
                r.put(&mut out);
            }
        }
        out
    }

    /// Decodes a notice (version 2, or version 1); refuses another magic or version, an
    /// unknown outcome, over-long texts and lists, a list that disagrees with the outcome,
    /// and trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<DeliveryNotice, ProtoError> {
        let mut r = Reader::new(bytes, "delivery notice");
        let version = match r.header(NOTICE_MAGIC, NOTICE_VERSION) {
            Ok(()) => NOTICE_VERSION,
            Err(ProtoError::UnsupportedVersion {
                version: NOTICE_VERSION_1,
                ..
            }) => NOTICE_VERSION_1,
            Err(e) => return Err(e),
        };
        let transfer_id = TransferId(r.array()?);
        let merkle_root = r.array()?;
        let manifest_digest = r.array()?;
        let raw = r.u8()?;
        let outcome = Outcome::from_u8(raw, version).ok_or(ProtoError::UnknownOutcome(raw))?;
        let answer_digest = r.array()?;
        let answer = r
            .str16(bound16(MAX_NOTICE_ANSWER_LEN), "delivery notice answer")?
            .to_owned();
        let gateway = r
            .str16(MAX_NOTICE_GATEWAY_LEN, "delivery notice gateway")?
            .to_owned();
        let decided_unix_ms = r.u64()?;
        let (mut refused_total, mut refused) = (0, Vec::new());
        if version == NOTICE_VERSION {
            refused_total = r.u32()?;
            let count = usize::from(r.u16()?);
            if count > MAX_NOTICE_REFUSED {
                return Err(ProtoError::TooLong {
                    what: "delivery notice refused instances",
                    len: count as u64,
                    max: MAX_NOTICE_REFUSED as u64,
                });
            }
            if u64::from(refused_total) < count as u64 {
                return Err(ProtoError::BadNotice(
                    "it lists more refused instances than it counts",
                ));
            }
            // Bounded by the count just checked; each entry reads at least 8 bytes.
            refused.reserve(count.min(r.remaining() / 8));
            for _ in 0..count {
                refused.push(RefusedInstance::read(&mut r)?);
            }
            match outcome {
                Outcome::Delivered if refused_total != 0 => {
                    return Err(ProtoError::BadNotice(
                        "a delivered notice counts refused instances",
                    ));
                }
                Outcome::Partial if refused_total == 0 => {
                    return Err(ProtoError::BadNotice(
                        "a partial notice counts no refused instance",
                    ));
                }
                _ => {}
            }
            // Canonical: a list shorter than the count only when it is full.
            if count < MAX_NOTICE_REFUSED && u64::from(refused_total) != count as u64 {
                return Err(ProtoError::BadNotice(
                    "it counts refused instances it does not list",
                ));
            }
        }
        r.finish()?;
        Ok(DeliveryNotice {
            version,
            transfer_id,
            merkle_root,
            manifest_digest,
            outcome,
            answer_digest,
            answer,
            gateway,
            decided_unix_ms,
            refused_total,
            refused,
        })
    }
}

impl serde::Serialize for DeliveryNotice {
    /// The human-readable form (digests in hex) for APIs and files.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            version: u16,
            transfer_id: TransferId,
            merkle_root: String,
            manifest_digest: String,
            outcome: Outcome,
            answer_digest: String,
            answer: &'a str,
            gateway: &'a str,
            decided_unix_ms: u64,
            refused_total: u32,
            refused: &'a [RefusedInstance],
        }
        Json {
            version: self.version,
            transfer_id: self.transfer_id,
            merkle_root: hex::encode(self.merkle_root),
            manifest_digest: hex::encode(self.manifest_digest),
            outcome: self.outcome,
            answer_digest: hex::encode(self.answer_digest),
            answer: &self.answer,
            gateway: &self.gateway,
            decided_unix_ms: self.decided_unix_ms,
            refused_total: self.refused_total,
            refused: &self.refused,
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

    fn refusal(n: usize) -> RefusedInstance {
        RefusedInstance {
            file: format!("i{n}.dcm"),
            sop_instance_uid: format!("1.2.3.{n}"),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            failure_reason: Some(0xc000),
            reason: "the store answered 400 Bad Request: FailureReason 0xc000".into(),
        }
    }

    fn partial() -> DeliveryNotice {
        let no_uid = RefusedInstance {
            file: "cut.dcm".into(),
            reason: "the store answered 400 Bad Request and did not list it".into(),
            ..RefusedInstance::default()
        };
        sample(Outcome::Partial).with_refused(&[refusal(1), no_uid])
    }

    /// The encoding of a version 1 notice (what a gateway before version 2 signed).
    fn version_1(n: &DeliveryNotice) -> Vec<u8> {
        let mut b = n.to_bytes();
        b[5] = 1;
        b.truncate(b.len() - 6); // refused_total and an empty list
        b
    }

    #[test]
    fn roundtrip_and_refusals() {
        for n in [
            sample(Outcome::Delivered),
            sample(Outcome::Undeliverable),
            partial(),
            sample(Outcome::Undeliverable).with_refused(&[refusal(7)]),
        ] {
            let b = n.to_bytes();
            assert_eq!(DeliveryNotice::from_bytes(&b).unwrap(), n);
            assert_eq!(&b[..4], b"BLDN");
            assert_eq!(&b[4..6], &[0, 2], "written as version 2");
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
        let mut v3 = b.clone();
        v3[5] = 3;
        assert!(matches!(
            DeliveryNotice::from_bytes(&v3),
            Err(ProtoError::UnsupportedVersion {
                version: 3,
                supported: 2,
                ..
            })
        ));
        let mut bad_outcome = b.clone();
        bad_outcome[4 + 2 + 16 + 32 + 32] = 4;
        assert_eq!(
            DeliveryNotice::from_bytes(&bad_outcome),
            Err(ProtoError::UnknownOutcome(4))
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
    fn a_version_1_notice_is_still_read_and_re_encodes_as_it_came() {
        for outcome in [Outcome::Delivered, Outcome::Undeliverable] {
            let v1 = version_1(&sample(outcome));
            let n = DeliveryNotice::from_bytes(&v1).unwrap();
            assert_eq!((n.version, n.outcome), (1, outcome));
            assert!(n.refused.is_empty() && n.refused_total == 0);
            assert_eq!(n.to_bytes(), v1, "canonical");
        }
        // Version 1 knew no `partial`.
        let mut v1 = version_1(&sample(Outcome::Delivered));
        v1[4 + 2 + 16 + 32 + 32] = 3;
        assert_eq!(
            DeliveryNotice::from_bytes(&v1),
            Err(ProtoError::UnknownOutcome(3))
        );
    }

    /// Offset of `refused_total` in the encoding of `n`.
    fn list_at(n: &DeliveryNotice) -> usize {
        4 + 2 + 16 + 32 + 32 + 1 + 32 + 2 + n.answer.len() + 2 + n.gateway.len() + 8
    }

    #[test]
    fn malformed_refusal_lists_are_refused() {
        let n = partial();
        let b = n.to_bytes();
        let at = list_at(&n);
        assert_eq!(&b[at..at + 6], &[0, 0, 0, 2, 0, 2], "total 2, count 2");
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut x = b.clone();
            f(&mut x);
            DeliveryNotice::from_bytes(&x).unwrap_err()
        };
        // More listed than counted; counted but not listed (the list is not full).
        assert!(matches!(
            bad(&|x| x[at + 3] = 1),
            ProtoError::BadNotice(_) | ProtoError::TrailingBytes { .. }
        ));
        assert!(matches!(bad(&|x| x[at + 3] = 3), ProtoError::BadNotice(_)));
        // A count over the bound is refused before anything is read.
        let e = bad(&|x| {
            x[at..at + 4].copy_from_slice(&5000u32.to_be_bytes());
            x[at + 4..at + 6].copy_from_slice(&1001u16.to_be_bytes());
        });
        assert!(matches!(e, ProtoError::TooLong { len: 1001, .. }), "{e}");
        // An over-long UID, a FailureReason flag other than 0 or 1, text that is not UTF-8.
        let entry = at + 6;
        let uid_at = entry + 2 + "i1.dcm".len();
        assert!(matches!(
            bad(&|x| x[uid_at] = 65),
            ProtoError::TooLong { max: 64, .. }
        ));
        let flag_at = uid_at + 1 + "1.2.3.1".len() + 1 + "1.2.840.10008.5.1.4.1.1.2".len();
        assert_eq!(b[flag_at], 1);
        assert!(matches!(bad(&|x| x[flag_at] = 2), ProtoError::BadNotice(_)));
        assert!(matches!(
            bad(&|x| x[entry + 2] = 0xff),
            ProtoError::BadUtf8 { .. }
        ));
        // The outcome and the list must agree.
        let mut delivered = b.clone();
        delivered[4 + 2 + 16 + 32 + 32] = 1;
        assert!(matches!(
            DeliveryNotice::from_bytes(&delivered),
            Err(ProtoError::BadNotice(_))
        ));
        let empty_partial = sample(Outcome::Partial).to_bytes();
        assert!(matches!(
            DeliveryNotice::from_bytes(&empty_partial),
            Err(ProtoError::BadNotice(_))
        ));
    }

    #[test]
    fn long_lists_and_texts_are_bounded() {
        let many: Vec<RefusedInstance> = (0..MAX_NOTICE_REFUSED + 5)
            .map(|i| RefusedInstance {
                file: "é".repeat(300),
                sop_instance_uid: "1".repeat(80),
                sop_class_uid: String::new(),
                failure_reason: None,
                reason: format!("{i} {}", "x".repeat(2000)),
            })
            .collect();
        let n = sample(Outcome::Partial).with_refused(&many);
        assert_eq!(n.refused.len(), MAX_NOTICE_REFUSED);
        assert_eq!(n.refused_total as usize, MAX_NOTICE_REFUSED + 5);
        let r = &n.refused[0];
        assert!(r.file.len() <= MAX_REFUSED_FILE_LEN && r.file.len() >= MAX_REFUSED_FILE_LEN - 1);
        assert_eq!(r.sop_instance_uid.len(), MAX_REFUSED_UID_LEN);
        assert_eq!(r.reason.len(), MAX_REFUSED_REASON_LEN);
        let b = n.to_bytes();
        assert!(b.len() < 1 << 20, "{} bytes", b.len());
        assert_eq!(DeliveryNotice::from_bytes(&b).unwrap(), n);
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
        assert_eq!(v["refused"], serde_json::json!([]));
        let v = serde_json::to_value(partial()).unwrap();
        assert_eq!(v["outcome"], "partial");
        assert_eq!(v["refused_total"], 2);
        assert_eq!(
            v["refused"][0],
            serde_json::json!({
                "file": "i1.dcm",
                "sop_instance_uid": "1.2.3.1",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "failure_reason": "0xc000",
                "reason": "the store answered 400 Bad Request: FailureReason 0xc000",
            })
        );
        assert_eq!(v["refused"][1]["sop_instance_uid"], serde_json::Value::Null);
        assert_eq!(v["refused"][1]["failure_reason"], serde_json::Value::Null);
    }

    proptest! {
        #[test]
        fn prop_roundtrip(id in any::<[u8; 16]>(), root in any::<[u8; 32]>(), md in any::<[u8; 32]>(), outcome in 0u8..3, answer in ".{0,200}", who in "[a-z0-9-]{0,40}", t in any::<u64>(),
                          refused in proptest::collection::vec((".{0,40}", "[0-9.]{0,70}", "[0-9.]{0,64}", any::<Option<u16>>(), ".{0,100}"), 0..5)) {
            let outcome = [Outcome::Delivered, Outcome::Undeliverable, Outcome::Partial][usize::from(outcome)];
            let refused: Vec<RefusedInstance> = match outcome {
                Outcome::Delivered => Vec::new(),
                _ => refused.into_iter().map(|(file, sop_instance_uid, sop_class_uid, failure_reason, reason)| RefusedInstance { file, sop_instance_uid, sop_class_uid, failure_reason, reason }).collect(),
            };
            prop_assume!(outcome != Outcome::Partial || !refused.is_empty());
            let n = DeliveryNotice::new(TransferId(id), root, md, outcome, answer.as_bytes(), &who, t).with_refused(&refused);
            let b = n.to_bytes();
            let back = DeliveryNotice::from_bytes(&b).unwrap();
            prop_assert_eq!(&back, &n);
            prop_assert_eq!(back.to_bytes(), b);
        }

        #[test]
        fn prop_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = DeliveryNotice::from_bytes(&bytes);
        }

        #[test]
        fn prop_damaged_partial_never_panics_and_accepted_is_canonical(at in 0usize..400, byte in any::<u8>()) {
            let mut b = partial().to_bytes();
            let at = at % b.len();
            b[at] = byte;
            if let Ok(n) = DeliveryNotice::from_bytes(&b) {
                prop_assert_eq!(n.to_bytes(), b);
            }
        }
    }
}
