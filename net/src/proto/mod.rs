//! The baylink transfer protocol, without I/O.
//!
//! Everything here is plain data and state machines: no sockets, no files, no
//! clocks, no async. The QUIC glue feeds bytes and events in and carries the
//! resulting actions out, the way `quinn` drives `quinn-proto`. That makes the
//! protocol testable with a simulated network in microseconds (see the
//! `sim` test module) and fuzzable (see `fuzz/`).
//!
//! # Pieces
//!
//! - [`Manifest`]: what a transfer consists of (files, sizes, per-chunk SHA-256
//!   digests, their [`crate::merkle`] root, the sender and the declaration digest).
//!   Its canonical binary encoding ([`Manifest::to_bytes`]) is what the edge's
//!   HSM signs. [`ManifestBuilder`] and [`ChunkHasher`] build one.
//! - [`Receipt`]: what the gateway's HSM signs once a transfer is committed.
//! - [`DeliveryNotice`]: what the gateway's HSM signs once the record store took a committed
//!   transfer, or refused it.
//! - [`Frame`], [`encode`] and [`FrameDecoder`]: the control stream.
//!   Every frame is `u8 type | u32 BE payload length | payload`; the decoder
//!   checks the length against [`Limits::max_frame_len`] before buffering
//!   anything for it.
//! - [`ChunkHeader`]: the fixed-size header opening each data stream (one QUIC
//!   unidirectional stream per chunk), followed by exactly `len` payload bytes.
//! - [`ChunkSet`]: a bitmap of chunk indices (the receiver's have-list).
//! - [`Sender`] and [`Receiver`]: the two ends of one transfer, fed events and
//!   polled for actions.
//! - [`WitnessAsker`] and [`WitnessAnswerer`]: the two ends of the audit-log witness
//!   exchange (a control stream of its own: `Witness`, answered `Cosigned` or `Error`), in
//!   the same style.
//!
//! # Conversation
//!
//! ```text
//! sender                                   receiver
//!   Hello{version, appliance id}   ──▶  (either side, optional, checked)
//!   Offer{manifest, signature}     ──▶  VerifyOffer → caller checks signature,
//!                                       prepares spool, loads durable have-set
//!                                  ◀──  Have{transfer id, chunk bitmap}
//!   data stream: ChunkHeader+bytes ──▶  chunk_header → hash → chunk_received
//!                                  ◀──  ChunkOk{index} | ChunkBad{index, reason}
//!   (resend bad chunks, bounded)
//!                                       Commit → caller fsyncs, renames, signs
//!                                  ◀──  Receipt{receipt, signature}
//!   Done{receipt, signature}
//!   either side at any time: Error{code, text}, then both stop.
//! ```
//!
//! A lost connection is handled by building a fresh [`Sender`] and
//! [`Receiver`] for the same manifest: the receiver's caller passes the chunks
//! it holds durably to [`Receiver::offer_accepted`], and the sender only sends
//! what the resulting `Have` frame says is missing.
//!
//! # Not here
//!
//! Signatures (the caller verifies them with the HSM crate's public keys),
//! timeouts (QUIC's idle timeout and the caller's deadlines), file I/O (the
//! spool), and stream scheduling (quinn).

mod chunkset;
mod error;
mod frame;
mod layout;
mod manifest;
mod name;
mod notice;
mod receipt;
mod receiver;
mod sender;
#[cfg(test)]
mod sim;
mod wire;
mod witness;

use std::fmt;
use std::str::FromStr;

pub use chunkset::{ChunkSet, Indices};
pub use error::{ErrorCode, ProtoError};
pub use frame::{
    ChunkHeader, FRAME_HEADER_LEN, Frame, FrameDecoder, MAX_CONSISTENCY_HASHES,
    MAX_WITNESS_NOTE_LEN, NOTICES_VERSION, WITNESS_VERSION, encode,
};
pub use layout::{Layout, MAX_ANNOUNCED_FILES};
pub use manifest::{
    ChunkHasher, ChunkLocation, FileEntry, MANIFEST_MAGIC, MANIFEST_VERSION, Manifest,
    ManifestBuilder, check_process_id,
};
pub use name::{MAX_FILE_NAME_LEN, NameError, validate_file_name};
pub use notice::{
    DeliveryNotice, MAX_NOTICE_ANSWER_LEN, MAX_NOTICE_REFUSED, NOTICE_MAGIC, NOTICE_VERSION,
    Outcome, RefusedInstance, cut_text,
};
pub use receipt::{RECEIPT_MAGIC, RECEIPT_VERSION, Receipt};
pub use receiver::{Receiver, ReceiverAction, ReceiverConfig};
pub use sender::{Sender, SenderAction, SenderConfig};
pub use witness::{
    WitnessAnswerer, WitnessAnswererAction, WitnessAsker, WitnessAskerAction, is_witness_refusal,
};

pub use crate::merkle::{Digest, sha256};

/// The protocol version carried in `Hello` frames. A peer speaking another
/// version is refused with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Texts this crate puts into frames (`ChunkBad` reasons, `Error` texts) are
/// cut to at most this many bytes, so they fit any sane
/// [`Limits::max_text_len`] on the peer.
pub const MAX_SENT_TEXT_LEN: usize = 1024;

/// Longest process id (the consent reference a transfer was allowed under)
/// a manifest or receipt carries, in bytes.
pub const MAX_PROCESS_ID_LEN: u16 = 128;

/// The identifier of one transfer: a UUID (version 7 when made here, so ids
/// sort by creation time). Displayed, parsed and serialised as the
/// hyphenated lower-case UUID string, e.g. `0190a0b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub [u8; 16]);

impl TransferId {
    /// A new, time-ordered (UUID v7) transfer id.
    pub fn new_v7() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    /// The 16 raw bytes, as they appear on the wire.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransferId({self})")
    }
}

/// A string that is not a hyphenated UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a transfer id (a hyphenated UUID such as 0190a0b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b): {shown:?}"
)]
pub struct TransferIdError {
    /// The refused input, cut to 64 characters.
    shown: String,
}

impl FromStr for TransferId {
    type Err = TransferIdError;

    /// Parses the hyphenated form only (36 characters, either case); the
    /// other UUID spellings (simple, braced, URN) are refused so that one id
    /// has one spelling in paths and URLs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refuse = || TransferIdError {
            shown: s.chars().take(64).collect(),
        };
        if s.len() != 36 {
            return Err(refuse());
        }
        uuid::Uuid::try_parse(s)
            .map(|u| Self(*u.as_bytes()))
            .map_err(|_| refuse())
    }
}

impl serde::Serialize for TransferId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TransferId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hard limits on everything a peer can make us allocate or process.
///
/// Every length read off the wire is checked against these before any
/// allocation. The defaults are consistent with each other: the largest
/// manifest they allow ([`Limits::max_manifest_len`]) fits in one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest control frame payload, in bytes (default 64 MiB).
    pub max_frame_len: u32,
    /// Most files in one transfer (default 100 000).
    pub max_files: u32,
    /// Most chunks in one transfer (default 1 000 000).
    pub max_chunks: u32,
    /// Largest chunk size a manifest may declare, in bytes (default 64 MiB).
    pub max_chunk_size: u32,
    /// Longest file name, in bytes (default and at most 255).
    pub max_name_len: u16,
    /// Longest free text (sender and appliance ids, error texts), in bytes
    /// (default 4096).
    pub max_text_len: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_len: 64 << 20,
            max_files: 100_000,
            max_chunks: 1_000_000,
            max_chunk_size: 64 << 20,
            max_name_len: MAX_FILE_NAME_LEN as u16,
            max_text_len: 4096,
        }
    }
}

impl Limits {
    /// The encoded size of the largest manifest these limits accept.
    pub fn max_manifest_len(&self) -> u64 {
        manifest::max_encoded_len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_id_text_roundtrip() {
        let id = TransferId::new_v7();
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(s, s.to_lowercase());
        assert_eq!(s.parse::<TransferId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<TransferId>().unwrap(), id);
        assert_eq!(format!("{id:?}"), format!("TransferId({s})"));
    }

    #[test]
    fn transfer_id_refuses_other_spellings() {
        let id = TransferId::new_v7();
        let simple = uuid::Uuid::from_bytes(id.0).simple().to_string();
        let braced = uuid::Uuid::from_bytes(id.0).braced().to_string();
        for bad in [
            simple.as_str(),
            braced.as_str(),
            "",
            "not-a-uuid",
            &"x".repeat(500),
        ] {
            let err = bad.parse::<TransferId>().unwrap_err();
            assert!(err.to_string().contains("not a transfer id"), "{err}");
            assert!(err.shown.chars().count() <= 64);
        }
    }

    #[test]
    fn transfer_ids_sort_by_creation() {
        let a = TransferId::new_v7();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = TransferId::new_v7();
        assert!(a < b);
    }

    #[test]
    fn transfer_id_serde_as_string() {
        let id: TransferId = "0190a0b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"0190a0b2-7c3e-7d4f-8a1b-2c3d4e5f6a7b\"");
        assert_eq!(serde_json::from_str::<TransferId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<TransferId>("\"nope\"").is_err());
    }

    #[test]
    fn default_limits_fit_the_largest_manifest_in_one_frame() {
        let l = Limits::default();
        // An Offer frame carries the manifest plus a 4-byte length, a 2-byte
        // signature length and a signature of at most a few hundred bytes.
        assert!(l.max_manifest_len() + 4 + 2 + 1024 <= u64::from(l.max_frame_len));
    }

    #[test]
    fn sha256_of_empty_is_the_known_value() {
        assert_eq!(
            hex::encode(sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
