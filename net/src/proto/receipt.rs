//! The receipt: what the gateway's HSM signs once a transfer is committed.
//!
//! # Encoding (version 2, big-endian)
//!
//! ```text
//! magic "BLRC" | u16 version | 16 transfer id | 32 merkle root
//! | 32 manifest digest | u16 len, process id (UTF-8)
//! | u16 len, receiver (UTF-8) | u64 committed_unix_ms
//! ```
//!
//! The process id is the manifest's (the consent reference the transfer was
//! allowed under), so the signed receipt names the consent too. Version 1
//! had none and is refused.
//!
//! The magic differs from the manifest's, so neither can be passed off as
//! the other even under the same key.

use bytes::BufMut;

use super::wire::{Reader, put_str16};
use super::{Digest, MAX_PROCESS_ID_LEN, ProtoError, TransferId, check_process_id};

/// The first four bytes of an encoded receipt.
pub const RECEIPT_MAGIC: [u8; 4] = *b"BLRC";
/// The receipt encoding version this build writes and reads.
pub const RECEIPT_VERSION: u16 = 2;

/// The gateway's statement that a transfer is committed durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The transfer.
    pub transfer_id: TransferId,
    /// The manifest's Merkle root, as verified over the received chunks.
    pub merkle_root: Digest,
    /// [`super::Manifest::digest`] of the manifest committed.
    pub manifest_digest: Digest,
    /// The manifest's [`super::Manifest::process_id`].
    pub process_id: String,
    /// The receiving appliance's identity.
    pub receiver: String,
    /// When the commit happened, in milliseconds since the Unix epoch.
    pub committed_unix_ms: u64,
}

impl Receipt {
    /// The canonical encoding: what the gateway signs. A receiver name over
    /// `u16::MAX` bytes is cut (keep it short).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + 2 + 16 + 32 + 32 + 2 + self.process_id.len() + 2 + self.receiver.len() + 8,
        );
        out.put_slice(&RECEIPT_MAGIC);
        out.put_u16(RECEIPT_VERSION);
        out.put_slice(&self.transfer_id.0);
        out.put_slice(&self.merkle_root);
        out.put_slice(&self.manifest_digest);
        put_str16(&mut out, &self.process_id);
        put_str16(&mut out, &self.receiver);
        out.put_u64(self.committed_unix_ms);
        out
    }

    /// Decodes a receipt; refuses another magic or version, a process id
    /// that [`check_process_id`] refuses, and trailing bytes. Allocates only
    /// the two texts, whose lengths are checked against the bytes present
    /// first.
    pub fn from_bytes(bytes: &[u8]) -> Result<Receipt, ProtoError> {
        let mut r = Reader::new(bytes, "receipt");
        r.header(RECEIPT_MAGIC, RECEIPT_VERSION)?;
        let transfer_id = TransferId(r.array()?);
        let merkle_root = r.array()?;
        let manifest_digest = r.array()?;
        let process_id = r
            .str16(MAX_PROCESS_ID_LEN, "receipt process id")?
            .to_owned();
        check_process_id(&process_id)?;
        let receiver = r.str16(u16::MAX, "receipt receiver")?.to_owned();
        let committed_unix_ms = r.u64()?;
        r.finish()?;
        Ok(Receipt {
            transfer_id,
            merkle_root,
            manifest_digest,
            process_id,
            receiver,
            committed_unix_ms,
        })
    }
}

impl serde::Serialize for Receipt {
    /// The human-readable form (digests in hex) for APIs and files.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            transfer_id: TransferId,
            merkle_root: String,
            manifest_digest: String,
            process_id: &'a str,
            receiver: &'a str,
            committed_unix_ms: u64,
        }
        Json {
            transfer_id: self.transfer_id,
            merkle_root: hex::encode(self.merkle_root),
            manifest_digest: hex::encode(self.manifest_digest),
            process_id: &self.process_id,
            receiver: &self.receiver,
            committed_unix_ms: self.committed_unix_ms,
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Receipt {
        Receipt {
            transfer_id: TransferId::new_v7(),
            merkle_root: [1; 32],
            manifest_digest: [2; 32],
            process_id: "C-2026-0042".into(),
            receiver: "gateway-hk-1".into(),
            committed_unix_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn roundtrip_and_refusals() {
        let r = sample();
        let b = r.to_bytes();
        assert_eq!(Receipt::from_bytes(&b).unwrap(), r);
        assert_eq!(&b[..4], b"BLRC");
        for cut in 0..b.len() {
            assert!(Receipt::from_bytes(&b[..cut]).is_err());
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            Receipt::from_bytes(&long),
            Err(ProtoError::TrailingBytes { .. })
        ));
        let mut v1 = b.clone();
        v1[5] = 1;
        assert!(matches!(
            Receipt::from_bytes(&v1),
            Err(ProtoError::UnsupportedVersion { version: 1, .. })
        ));
        for bad in [String::new(), "x".repeat(129), "C-1\n".into()] {
            let r = Receipt {
                process_id: bad,
                ..sample()
            };
            assert!(matches!(
                Receipt::from_bytes(&r.to_bytes()),
                Err(ProtoError::BadProcessId { .. } | ProtoError::TooLong { .. })
            ));
        }
        let mut manifest_magic = b.clone();
        manifest_magic[..4].copy_from_slice(b"BLMF");
        assert_eq!(
            Receipt::from_bytes(&manifest_magic),
            Err(ProtoError::BadMagic { what: "receipt" })
        );
    }

    #[test]
    fn json_form() {
        let r = sample();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["merkle_root"], hex::encode([1u8; 32]));
        assert_eq!(v["receiver"], "gateway-hk-1");
        assert_eq!(v["process_id"], "C-2026-0042");
        assert_eq!(v["transfer_id"], r.transfer_id.to_string());
    }

    proptest! {
        #[test]
        fn prop_roundtrip(id in any::<[u8; 16]>(), root in any::<[u8; 32]>(), md in any::<[u8; 32]>(), pid in "[A-Za-z0-9-]{1,128}", who in ".{0,40}", t in any::<u64>()) {
            let r = Receipt { transfer_id: TransferId(id), merkle_root: root, manifest_digest: md, process_id: pid, receiver: who, committed_unix_ms: t };
            prop_assert_eq!(Receipt::from_bytes(&r.to_bytes()).unwrap(), r);
        }

        #[test]
        fn prop_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Receipt::from_bytes(&bytes);
        }
    }
}
