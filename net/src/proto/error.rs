//! Protocol errors and the error codes that travel in `Error` frames.

use std::fmt;

use super::{NameError, TransferId};

/// Why a transfer stopped, as one `u16` on the wire (in `Error` frames).
///
/// Codes are stable: a new code needs a new [`super::PROTOCOL_VERSION`], and
/// an unknown code in an `Error` frame is a malformed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame or header could not be parsed.
    BadFrame = 1,
    /// A frame announced a payload over the receiver's limit.
    FrameTooLong = 2,
    /// A frame type this version does not know.
    UnknownFrame = 3,
    /// The peer speaks another protocol or encoding version.
    UnsupportedVersion = 4,
    /// The manifest is malformed or inconsistent.
    BadManifest = 5,
    /// A file name in the manifest is refused.
    BadFileName = 6,
    /// The manifest lists more files than the receiver accepts.
    TooManyFiles = 7,
    /// The manifest lists more chunks than the receiver accepts.
    TooManyChunks = 8,
    /// The manifest or receipt signature does not verify.
    BadSignature = 9,
    /// A chunk's bytes do not match the manifest's digest.
    ChunkDigestMismatch = 10,
    /// A chunk failed more often than the retry limit allows.
    TooManyRetries = 11,
    /// The receiver's policy refused the transfer.
    Refused = 12,
    /// An internal error on the side that sent the code.
    Internal = 13,
    /// The receiver has no space left for the transfer.
    NoSpace = 14,
    /// The frame or chunk names a transfer the peer is not handling.
    UnknownTransfer = 15,
    /// A frame arrived that the protocol does not allow at this point.
    UnexpectedFrame = 16,
    /// A chunk header is malformed or does not match the manifest.
    BadChunkHeader = 17,
    /// The receipt does not match the transfer.
    BadReceipt = 18,
    /// The appliance is shutting down; try again later.
    ShuttingDown = 19,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLong,
        ErrorCode::UnknownFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::BadManifest,
        ErrorCode::BadFileName,
        ErrorCode::TooManyFiles,
        ErrorCode::TooManyChunks,
        ErrorCode::BadSignature,
        ErrorCode::ChunkDigestMismatch,
        ErrorCode::TooManyRetries,
        ErrorCode::Refused,
        ErrorCode::Internal,
        ErrorCode::NoSpace,
        ErrorCode::UnknownTransfer,
        ErrorCode::UnexpectedFrame,
        ErrorCode::BadChunkHeader,
        ErrorCode::BadReceipt,
        ErrorCode::ShuttingDown,
    ];

    /// The wire value.
    pub fn to_u16(self) -> u16 {
        self as u16
    }

    /// The code for a wire value, or `None` if this version does not know it.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.to_u16() == value)
    }

    /// Whether the side that receives this code should try the transfer again later.
    ///
    /// Retryable: the receiver is shutting down ([`ErrorCode::ShuttingDown`]), its spool is
    /// full ([`ErrorCode::NoSpace`], the transfer pauses), or it had a fault of its own that
    /// is not about this transfer ([`ErrorCode::Internal`]: an I/O error, its HSM). The
    /// transfer resumes from the chunks already durable. Every other code is final: the
    /// receiver refused the transfer for what it is (its signature, manifest, limits, a
    /// file it cannot store: [`ErrorCode::Refused`]), and sending it again gets the same
    /// answer.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::ShuttingDown | ErrorCode::NoSpace | ErrorCode::Internal
        )
    }

    /// A short English description for logs and operators.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "malformed frame",
            ErrorCode::FrameTooLong => "frame too long",
            ErrorCode::UnknownFrame => "unknown frame type",
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::BadManifest => "malformed or inconsistent manifest",
            ErrorCode::BadFileName => "refused file name",
            ErrorCode::TooManyFiles => "too many files",
            ErrorCode::TooManyChunks => "too many chunks",
            ErrorCode::BadSignature => "signature does not verify",
            ErrorCode::ChunkDigestMismatch => "chunk digest mismatch",
            ErrorCode::TooManyRetries => "chunk retry limit reached",
            ErrorCode::Refused => "transfer refused",
            ErrorCode::Internal => "internal error",
            ErrorCode::NoSpace => "no space left",
            ErrorCode::UnknownTransfer => "unknown transfer",
            ErrorCode::UnexpectedFrame => "unexpected frame",
            ErrorCode::BadChunkHeader => "bad chunk header",
            ErrorCode::BadReceipt => "receipt does not match the transfer",
            ErrorCode::ShuttingDown => "shutting down",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Everything that can go wrong in the protocol: malformed input, limits,
/// inconsistent manifests, protocol violations, and errors reported by the
/// peer. Texts that came from the peer are shown escaped (`{:?}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The input ended inside a field.
    #[error("{what} is truncated")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
    },
    /// The input has bytes after its last field.
    #[error("{what} has {count} unexpected trailing bytes")]
    TrailingBytes {
        /// What was being decoded.
        what: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// A length field is over its limit.
    #[error("{what} is {len} bytes long, over the limit of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// The announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A flag byte is neither 0 nor 1.
    #[error("{what} is {value}, not 0 or 1")]
    BadFlag {
        /// The field.
        what: &'static str,
        /// The byte found.
        value: u8,
    },
    /// A text field is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// The field.
        what: &'static str,
    },
    /// The encoding does not start with the expected magic bytes.
    #[error("{what} does not start with its magic bytes")]
    BadMagic {
        /// What was being decoded.
        what: &'static str,
    },
    /// A version field this build does not speak.
    #[error("{what} version {version} is not supported (this build speaks {supported})")]
    UnsupportedVersion {
        /// What carries the version.
        what: &'static str,
        /// The version found.
        version: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// A frame header announces a payload over [`super::Limits::max_frame_len`].
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLong {
        /// The announced payload length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A frame type byte this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrame(u8),
    /// An `Error` frame carries a code this version does not know.
    #[error("unknown error code {0} in an Error frame")]
    UnknownErrorCode(u16),
    /// A manifest with no files.
    #[error("a transfer needs at least one file")]
    NoFiles,
    /// More files than [`super::Limits::max_files`].
    #[error("{count} files is over the limit of {max}")]
    TooManyFiles {
        /// Files announced (or reached).
        count: u64,
        /// The limit.
        max: u32,
    },
    /// More chunks than [`super::Limits::max_chunks`].
    #[error("{count} chunks is over the limit of {max}")]
    TooManyChunks {
        /// Chunks announced (or needed by the file sizes).
        count: u64,
        /// The limit.
        max: u32,
    },
    /// A chunk size of zero or over [`super::Limits::max_chunk_size`].
    #[error("chunk size {size} is outside 1..={max}")]
    BadChunkSize {
        /// The declared chunk size.
        size: u32,
        /// The limit.
        max: u32,
    },
    /// A file name breaks a naming rule.
    #[error("file name {name:?} refused")]
    BadFileName {
        /// The refused name.
        name: String,
        /// The rule it breaks.
        #[source]
        source: NameError,
    },
    /// Two files with the same name.
    #[error("file name {name:?} appears twice")]
    DuplicateFileName {
        /// The repeated name.
        name: String,
    },
    /// A file's digests do not match the number of chunks its size needs.
    #[error("file {name:?} of {size} bytes needs {expected} chunks, {actual} digests given")]
    ChunkCountMismatch {
        /// The file.
        name: String,
        /// Its size.
        size: u64,
        /// Chunks its size needs.
        expected: u64,
        /// Digests given.
        actual: u64,
    },
    /// The manifest's digest list does not match its files' sizes.
    #[error("manifest lists {actual} chunk digests, its file sizes need {expected}")]
    ChunkTotalMismatch {
        /// Chunks the file sizes need.
        expected: u64,
        /// Digests listed.
        actual: u64,
    },
    /// The manifest's Merkle root is not the root of its chunk digests.
    #[error("manifest Merkle root does not match its chunk digests")]
    MerkleRootMismatch,
    /// A text given to a builder is over [`super::Limits::max_text_len`].
    #[error("{what} of {len} bytes is over the limit of {max}")]
    TextTooLong {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: u16,
    },
    /// A manifest's process id (the consent reference) is empty, over
    /// [`super::MAX_PROCESS_ID_LEN`] bytes or holds control characters.
    #[error(
        "process id (consent reference) of {len} bytes is refused: it must be 1 to {} bytes \
         without control characters",
        super::MAX_PROCESS_ID_LEN
    )]
    BadProcessId {
        /// Its length in bytes.
        len: usize,
    },
    /// A chunk bitmap of the wrong length or with bits set past the end.
    #[error(
        "chunk bitmap for {chunks} chunks must be {expected} bytes with zero padding, got {actual} bytes"
    )]
    BadChunkSet {
        /// Chunks in the transfer.
        chunks: u32,
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A delivery notice with an outcome byte this build does not know.
    #[error("delivery notice outcome {0} is unknown")]
    UnknownOutcome(u8),
    /// A delivery notice whose fields disagree with each other.
    #[error("delivery notice refused: {0}")]
    BadNotice(&'static str),
    /// A frame or chunk for a transfer other than this one.
    #[error("transfer {got} is not this transfer ({expected})")]
    UnknownTransfer {
        /// This transfer.
        expected: TransferId,
        /// The id received.
        got: TransferId,
    },
    /// A chunk index past the end of the transfer.
    #[error("chunk index {index} is out of range (the transfer has {count} chunks)")]
    ChunkIndexOutOfRange {
        /// The index received.
        index: u32,
        /// Chunks in the transfer.
        count: u32,
    },
    /// A chunk header's length differs from the manifest's.
    #[error("chunk {index} announced {got} bytes, the manifest says {expected}")]
    ChunkLenMismatch {
        /// The chunk.
        index: u32,
        /// Length from the manifest.
        expected: u32,
        /// Length announced.
        got: u32,
    },
    /// The chunk is already good: discard this copy silently.
    #[error("chunk {index} is already good")]
    Duplicate {
        /// The chunk.
        index: u32,
    },
    /// Another stream is delivering this chunk right now: stop this one (the
    /// sender sees the stream fail and resends if still needed).
    #[error("chunk {index} is already arriving on another stream")]
    ChunkBusy {
        /// The chunk.
        index: u32,
    },
    /// A chunk arrived before the offer was accepted.
    #[error("chunk {index} arrived before the offer was accepted")]
    UnexpectedChunk {
        /// The chunk.
        index: u32,
    },
    /// A frame the protocol does not allow at this point.
    #[error("unexpected {frame} frame while {state}")]
    UnexpectedFrame {
        /// The frame's type.
        frame: &'static str,
        /// What this side was doing.
        state: &'static str,
    },
    /// The peer sent a second, different copy of a frame that must not change.
    #[error("the peer sent a different {what} for the same transfer")]
    Conflicting {
        /// The frame.
        what: &'static str,
    },
    /// A chunk failed more often than the retry limit allows.
    #[error("chunk {index} failed {attempts} times, over the retry limit of {limit}: {last}")]
    TooManyRetries {
        /// The chunk.
        index: u32,
        /// Failed attempts so far.
        attempts: u32,
        /// Retries allowed.
        limit: u32,
        /// The last failure.
        last: String,
    },
    /// The receipt does not match the transfer.
    #[error("receipt does not match the transfer: {what}")]
    ReceiptMismatch {
        /// The mismatching field.
        what: &'static str,
    },
    /// The peer stopped the transfer with an `Error` frame.
    #[error("peer stopped the transfer: {code} ({text:?})")]
    Peer {
        /// The peer's code.
        code: ErrorCode,
        /// The peer's text.
        text: String,
    },
    /// This side stopped the transfer (offer refused, commit failed, ...).
    #[error("transfer stopped here: {code} ({text})")]
    Local {
        /// The code sent to the peer.
        code: ErrorCode,
        /// The text sent to the peer.
        text: String,
    },
    /// The caller used the state machine out of order (a bug in the caller).
    #[error("protocol state machine misused: {what}")]
    Misuse {
        /// What was wrong.
        what: &'static str,
    },
}

impl ProtoError {
    /// The code to put in the `Error` frame that reports this error to the
    /// peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::Truncated { .. }
            | ProtoError::TrailingBytes { .. }
            | ProtoError::TooLong { .. }
            | ProtoError::BadUtf8 { .. }
            | ProtoError::BadFlag { .. }
            | ProtoError::BadMagic { .. }
            | ProtoError::UnknownErrorCode(_)
            | ProtoError::UnknownOutcome(_)
            | ProtoError::BadNotice(_)
            | ProtoError::BadChunkSet { .. } => ErrorCode::BadFrame,
            ProtoError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtoError::FrameTooLong { .. } => ErrorCode::FrameTooLong,
            ProtoError::UnknownFrame(_) => ErrorCode::UnknownFrame,
            ProtoError::NoFiles
            | ProtoError::BadChunkSize { .. }
            | ProtoError::DuplicateFileName { .. }
            | ProtoError::ChunkCountMismatch { .. }
            | ProtoError::ChunkTotalMismatch { .. }
            | ProtoError::MerkleRootMismatch
            | ProtoError::TextTooLong { .. }
            | ProtoError::BadProcessId { .. } => ErrorCode::BadManifest,
            ProtoError::BadFileName { .. } => ErrorCode::BadFileName,
            ProtoError::TooManyFiles { .. } => ErrorCode::TooManyFiles,
            ProtoError::TooManyChunks { .. } => ErrorCode::TooManyChunks,
            ProtoError::UnknownTransfer { .. } => ErrorCode::UnknownTransfer,
            ProtoError::ChunkIndexOutOfRange { .. }
            | ProtoError::ChunkLenMismatch { .. }
            | ProtoError::Duplicate { .. }
            | ProtoError::ChunkBusy { .. } => ErrorCode::BadChunkHeader,
            ProtoError::UnexpectedChunk { .. }
            | ProtoError::UnexpectedFrame { .. }
            | ProtoError::Conflicting { .. } => ErrorCode::UnexpectedFrame,
            ProtoError::TooManyRetries { .. } => ErrorCode::TooManyRetries,
            ProtoError::ReceiptMismatch { .. } => ErrorCode::BadReceipt,
            ProtoError::Peer { code, .. } | ProtoError::Local { code, .. } => *code,
            ProtoError::Misuse { .. } => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_roundtrip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.to_u16()));
            assert_eq!(ErrorCode::from_u16(code.to_u16()), Some(code));
            assert!(!code.reason().is_empty());
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(ErrorCode::ALL.len() as u16 + 1), None);
    }

    #[test]
    fn only_states_of_the_receiver_are_retryable() {
        let retryable: Vec<ErrorCode> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.is_retryable())
            .collect();
        assert_eq!(
            retryable,
            [
                ErrorCode::Internal,
                ErrorCode::NoSpace,
                ErrorCode::ShuttingDown
            ]
        );
        // What the transfer is cannot change by sending it again.
        for code in [
            ErrorCode::Refused,
            ErrorCode::BadFileName,
            ErrorCode::BadSignature,
            ErrorCode::TooManyFiles,
        ] {
            assert!(!code.is_retryable(), "{code:?}");
        }
    }

    #[test]
    fn peer_text_is_escaped_in_display() {
        let e = ProtoError::Peer {
            code: ErrorCode::Refused,
            text: "line\nbreak\u{1b}[31m".into(),
        };
        let shown = e.to_string();
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert_eq!(e.code(), ErrorCode::Refused);
    }

    #[test]
    fn bad_file_name_keeps_its_source() {
        let e = ProtoError::BadFileName {
            name: "a/b".into(),
            source: NameError::Slash,
        };
        let source = std::error::Error::source(&e).expect("source kept");
        assert_eq!(source.to_string(), NameError::Slash.to_string());
    }
}
