//! Control-stream frames and data-stream chunk headers.
//!
//! # Frame encoding (big-endian)
//!
//! ```text
//! u8 type | u32 payload length | payload
//!
//! 0x01 Hello     u16 version | u16 len, appliance id
//! 0x02 Offer     u32 len, manifest | u16 len, signature
//! 0x03 Have      16 transfer id | u32 len, chunk bitmap
//! 0x04 ChunkOk   u32 index
//! 0x05 ChunkBad  u32 index | u16 len, reason
//! 0x06 Receipt   u32 len, receipt | u16 len, signature
//! 0x07 Error     u16 code | u16 len, text
//! 0x08 Witness   u8 version | u16 len, signed checkpoint | u64 old size
//!                | u16 count, count × 32 consistency proof
//! 0x09 Cosigned  u8 version | u16 len, cosignature line
//! 0x0A Notices   u8 version
//! 0x0B Notice    u32 len, delivery notice | u16 len, signature
//! 0x0C NoticeAck 16 transfer id
//! 0x0D Announce  16 transfer id | u32 chunk size | u32 count, count × u64 file sizes
//! 0x0E Announced 16 transfer id | u8 taken (0 or 1)
//! 0x0F AnnounceMore 16 transfer id | u32 first file | u32 count, count × u64 file sizes
//! ```
//!
//! `Witness` opens a control stream of its own (no `Hello`/`Offer`): the edge asks the
//! gateway to witness its audit log's latest checkpoint; the gateway answers `Cosigned` or
//! `Error` ([`super::WitnessAsker`] and [`super::WitnessAnswerer`] hold the exchange).
//!
//! `Notices` opens a control stream of its own too: the edge asks for the gateway's delivery
//! notices of its transfers. The gateway sends a `Notice` for each one not yet acknowledged,
//! then each new one as it is signed, for as long as the stream stays open; the edge answers
//! each notice it has stored (or already had) with `NoticeAck`, after which the gateway
//! forgets it.
//!
//! `Announce` may come before the `Offer` of a transfer whose manifest is not signed yet: it
//! gives the transfer id and the [`Layout`](super::Layout) (chunk size, file sizes) so that the sender can
//! stream chunks while it is still sealing, or while the transfer's files are still
//! arriving. `AnnounceMore` adds files after the last announced (`first file` is the number
//! announced so far), so the layout only grows at its end. The receiver answers each with
//! `Announced`, saying whether it takes chunks of those files; the sender streams none of
//! them before that answer, and announces nothing more after a refusal. What such chunks
//! must hold only the signed `Offer` says.
//!
//! Texts are UTF-8 of at most [`Limits::max_text_len`] bytes. A payload must
//! be consumed exactly. An unknown type, an over-long length, or a malformed
//! payload fails the decoder for good: the control stream has lost framing
//! and the transfer stops.

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{Reader, put_bytes16, put_bytes32, put_str16};
use super::{ChunkSet, ErrorCode, Limits, ProtoError, TransferId};

/// Bytes before a frame's payload: the type byte and the `u32` length.
pub const FRAME_HEADER_LEN: usize = 5;

const HELLO: u8 = 0x01;
const OFFER: u8 = 0x02;
const HAVE: u8 = 0x03;
const CHUNK_OK: u8 = 0x04;
const CHUNK_BAD: u8 = 0x05;
const RECEIPT: u8 = 0x06;
const ERROR: u8 = 0x07;
const WITNESS: u8 = 0x08;
const COSIGNED: u8 = 0x09;
const NOTICES: u8 = 0x0A;
const NOTICE: u8 = 0x0B;
const NOTICE_ACK: u8 = 0x0C;
const ANNOUNCE: u8 = 0x0D;
const ANNOUNCED: u8 = 0x0E;
const ANNOUNCE_MORE: u8 = 0x0F;

/// Version of the `Witness`/`Cosigned` payloads this build speaks.
pub const WITNESS_VERSION: u8 = 1;
/// Version of the `Notices` stream this build speaks.
pub const NOTICES_VERSION: u8 = 1;
/// Largest signed checkpoint note a `Witness` frame may carry.
pub const MAX_WITNESS_NOTE_LEN: u16 = 8192;
/// Most hashes in a `Witness` consistency proof (a tree of 2^64 leaves needs fewer than 128).
pub const MAX_CONSISTENCY_HASHES: u16 = 128;

/// One control-stream message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a connection: the protocol version and who is speaking.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the speaker.
        version: u16,
        /// The speaker's appliance id (informational; identity comes from
        /// the mTLS certificate).
        appliance_id: String,
    },
    /// Sender → receiver: the canonical manifest and the edge's signature.
    Offer {
        /// [`super::Manifest::to_bytes`].
        manifest: Bytes,
        /// The edge HSM's signature over `manifest`.
        signature: Bytes,
    },
    /// Receiver → sender: the chunks the receiver already holds durably.
    Have {
        /// The transfer.
        transfer_id: TransferId,
        /// [`ChunkSet::to_bytes`] over the manifest's chunks.
        have: Bytes,
    },
    /// Receiver → sender: chunk `index` arrived and matches its digest.
    ChunkOk {
        /// The chunk.
        index: u32,
    },
    /// Receiver → sender: chunk `index` did not match; send it again.
    ChunkBad {
        /// The chunk.
        index: u32,
        /// Why, for logs.
        reason: String,
    },
    /// Receiver → sender: the signed receipt; the transfer is committed.
    Receipt {
        /// [`super::Receipt::to_bytes`].
        receipt: Bytes,
        /// The gateway HSM's signature over `receipt`.
        signature: Bytes,
    },
    /// Edge → gateway: witness this audit checkpoint (a C2SP signed note), consistent with
    /// the one the gateway cosigned last (`old_size`, 0 for the first) by `proof`.
    Witness {
        /// [`WITNESS_VERSION`].
        version: u8,
        /// The edge's signed checkpoint note.
        checkpoint: String,
        /// Tree size of the checkpoint the gateway cosigned last.
        old_size: u64,
        /// RFC 6962 consistency proof from `old_size` to the checkpoint's size.
        proof: Vec<[u8; 32]>,
    },
    /// Gateway → edge: the witness's cosignature line for the checkpoint.
    Cosigned {
        /// [`WITNESS_VERSION`].
        version: u8,
        /// One signed-note signature line (without its newline).
        signature: String,
    },
    /// Edge → gateway: send me the delivery notices of my transfers (opens a notice stream).
    Notices {
        /// [`NOTICES_VERSION`].
        version: u8,
    },
    /// Gateway → edge: one signed delivery notice.
    Notice {
        /// [`super::DeliveryNotice::to_bytes`].
        notice: Bytes,
        /// The gateway HSM's signature over it.
        signature: Bytes,
    },
    /// Edge → gateway: the notice of this transfer is stored; do not send it again.
    NoticeAck {
        /// The transfer the notice was about.
        transfer_id: TransferId,
    },
    /// Sender → receiver, before the `Offer` of a transfer still being sealed: its id and
    /// layout, so that chunk streams may follow before the manifest exists. The receiver
    /// holds such chunks aside; they count only where their digests equal the signed
    /// manifest's, which the `Offer` brings last.
    Announce {
        /// The transfer the `Offer` will name.
        transfer_id: TransferId,
        /// The chunk size.
        chunk_size: u32,
        /// The sizes of its first files, in manifest order.
        file_sizes: Vec<u64>,
    },
    /// Sender → receiver, after `Announce` was taken and before the `Offer`: more files of
    /// the announced transfer, after those announced before. Answered with `Announced`.
    AnnounceMore {
        /// The transfer announced.
        transfer_id: TransferId,
        /// The number of files announced before.
        first_file: u32,
        /// The sizes of the files announced here, in manifest order.
        file_sizes: Vec<u64>,
    },
    /// Receiver → sender: the answer to `Announce`. With `taken`, chunk streams of the
    /// transfer are held until the offer; without, the sender sends none before it.
    Announced {
        /// The transfer announced.
        transfer_id: TransferId,
        /// Whether chunks streamed before the offer are taken.
        taken: bool,
    },
    /// Either way: the transfer stops.
    Error {
        /// Why, as a stable code.
        code: ErrorCode,
        /// Details for logs.
        text: String,
    },
}

impl Frame {
    /// The frame type's name, for errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Offer { .. } => "Offer",
            Frame::Have { .. } => "Have",
            Frame::ChunkOk { .. } => "ChunkOk",
            Frame::ChunkBad { .. } => "ChunkBad",
            Frame::Receipt { .. } => "Receipt",
            Frame::Error { .. } => "Error",
            Frame::Witness { .. } => "Witness",
            Frame::Cosigned { .. } => "Cosigned",
            Frame::Notices { .. } => "Notices",
            Frame::Notice { .. } => "Notice",
            Frame::NoticeAck { .. } => "NoticeAck",
            Frame::Announce { .. } => "Announce",
            Frame::Announced { .. } => "Announced",
            Frame::AnnounceMore { .. } => "AnnounceMore",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello { .. } => HELLO,
            Frame::Offer { .. } => OFFER,
            Frame::Have { .. } => HAVE,
            Frame::ChunkOk { .. } => CHUNK_OK,
            Frame::ChunkBad { .. } => CHUNK_BAD,
            Frame::Receipt { .. } => RECEIPT,
            Frame::Error { .. } => ERROR,
            Frame::Witness { .. } => WITNESS,
            Frame::Cosigned { .. } => COSIGNED,
            Frame::Notices { .. } => NOTICES,
            Frame::Notice { .. } => NOTICE,
            Frame::NoticeAck { .. } => NOTICE_ACK,
            Frame::Announce { .. } => ANNOUNCE,
            Frame::Announced { .. } => ANNOUNCED,
            Frame::AnnounceMore { .. } => ANNOUNCE_MORE,
        }
    }

    /// A `Have` frame for `have`.
    pub fn have(transfer_id: TransferId, have: &ChunkSet) -> Frame {
        Frame::Have {
            transfer_id,
            have: have.to_bytes().into(),
        }
    }

    /// The frame encoded on its own.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        encode(self, &mut buf);
        buf.freeze()
    }
}

/// Appends `frame` to `buf`. Never fails: a text longer than `u16::MAX`
/// bytes is cut at a character boundary (the state machines keep theirs
/// under [`super::MAX_SENT_TEXT_LEN`]), as is a signature; a manifest or
/// receipt over 4 GiB is cut too (the peer will refuse it).
pub fn encode(frame: &Frame, buf: &mut BytesMut) {
    let start = buf.len();
    buf.put_u8(frame.type_byte());
    buf.put_u32(0);
    match frame {
        Frame::Hello {
            version,
            appliance_id,
        } => {
            buf.put_u16(*version);
            put_str16(buf, appliance_id);
        }
        Frame::Offer {
            manifest,
            signature,
        } => {
            put_bytes32(buf, manifest);
            put_bytes16(buf, signature);
        }
        Frame::Have { transfer_id, have } => {
            buf.put_slice(&transfer_id.0);
            put_bytes32(buf, have);
        }
        Frame::ChunkOk { index } => buf.put_u32(*index),
        Frame::ChunkBad { index, reason } => {
            buf.put_u32(*index);
            put_str16(buf, reason);
        }
        Frame::Receipt { receipt, signature } => {
            put_bytes32(buf, receipt);
            put_bytes16(buf, signature);
        }
        Frame::Error { code, text } => {
            buf.put_u16(code.to_u16());
            put_str16(buf, text);
        }
        Frame::Witness {
            version,
            checkpoint,
            old_size,
            proof,
        } => {
            buf.put_u8(*version);
            put_str16(buf, checkpoint);
            buf.put_u64(*old_size);
            let n = proof.len().min(usize::from(u16::MAX));
            buf.put_u16(n as u16);
            for h in &proof[..n] {
                buf.put_slice(h);
            }
        }
        Frame::Cosigned { version, signature } => {
            buf.put_u8(*version);
            put_str16(buf, signature);
        }
        Frame::Notices { version } => buf.put_u8(*version),
        Frame::Notice { notice, signature } => {
            put_bytes32(buf, notice);
            put_bytes16(buf, signature);
        }
        Frame::NoticeAck { transfer_id } => buf.put_slice(&transfer_id.0),
        Frame::Announce {
            transfer_id,
            chunk_size: first,
            file_sizes,
        }
        | Frame::AnnounceMore {
            transfer_id,
            first_file: first,
            file_sizes,
        } => {
            buf.put_slice(&transfer_id.0);
            buf.put_u32(*first);
            buf.put_u32(u32::try_from(file_sizes.len()).unwrap_or(u32::MAX));
            for &size in file_sizes {
                buf.put_u64(size);
            }
        }
        Frame::Announced { transfer_id, taken } => {
            buf.put_slice(&transfer_id.0);
            buf.put_u8(u8::from(*taken));
        }
    }
    let len = u32::try_from(buf.len() - start - FRAME_HEADER_LEN).unwrap_or(u32::MAX);
    buf[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Decodes frames from a control stream fed in pieces of any size.
///
/// ```
/// use baylink_net::proto::{encode, Frame, FrameDecoder, Limits};
/// let mut wire = bytes::BytesMut::new();
/// encode(&Frame::ChunkOk { index: 7 }, &mut wire);
/// let mut decoder = FrameDecoder::new(Limits::default());
/// decoder.push(&wire[..3]);
/// assert_eq!(decoder.next_frame().unwrap(), None);
/// decoder.push(&wire[3..]);
/// assert_eq!(decoder.next_frame().unwrap(), Some(Frame::ChunkOk { index: 7 }));
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    buf: BytesMut,
    failed: Option<ProtoError>,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: BytesMut::new(),
            failed: None,
        }
    }

    /// Appends bytes read from the stream. Call [`FrameDecoder::next_frame`]
    /// until it returns `Ok(None)` after each push: the decoder only holds
    /// what it has been given, and a frame's announced length is checked
    /// before any of its payload is waited for. Ignored once failed.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes held that are not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the
    /// error that broke the stream (returned again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.decode_next().inspect_err(|e| {
            self.failed = Some(e.clone());
            self.buf = BytesMut::new();
        })
    }

    fn decode_next(&mut self) -> Result<Option<Frame>, ProtoError> {
        let Some(header) = self.buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let kind = header[0];
        if !(HELLO..=ANNOUNCE_MORE).contains(&kind) {
            return Err(ProtoError::UnknownFrame(kind));
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len > self.limits.max_frame_len {
            return Err(ProtoError::FrameTooLong {
                len,
                max: self.limits.max_frame_len,
            });
        }
        let total = FRAME_HEADER_LEN + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let frame = self.buf.split_to(total).freeze();
        decode_payload(kind, frame.slice(FRAME_HEADER_LEN..), &self.limits).map(Some)
    }
}

fn decode_payload(kind: u8, payload: Bytes, limits: &Limits) -> Result<Frame, ProtoError> {
    let mut r = Reader::new(&payload, "frame payload");
    let text = limits.max_text_len;
    let frame = match kind {
        HELLO => Frame::Hello {
            version: r.u16()?,
            appliance_id: r.str16(text, "appliance id")?.to_owned(),
        },
        OFFER => {
            let manifest = payload.slice_ref(r.bytes32(limits.max_frame_len, "manifest")?);
            let signature = payload.slice_ref(r.bytes16()?);
            Frame::Offer {
                manifest,
                signature,
            }
        }
        HAVE => {
            let transfer_id = TransferId(r.array()?);
            let max = ChunkSet::encoded_len(limits.max_chunks);
            let max = u32::try_from(max).unwrap_or(u32::MAX);
            let have = payload.slice_ref(r.bytes32(max, "chunk bitmap")?);
            Frame::Have { transfer_id, have }
        }
        CHUNK_OK => Frame::ChunkOk { index: r.u32()? },
        CHUNK_BAD => Frame::ChunkBad {
            index: r.u32()?,
            reason: r.str16(text, "ChunkBad reason")?.to_owned(),
        },
        RECEIPT => {
            let receipt = payload.slice_ref(r.bytes32(limits.max_frame_len, "receipt")?);
            let signature = payload.slice_ref(r.bytes16()?);
            Frame::Receipt { receipt, signature }
        }
        ERROR => {
            let raw = r.u16()?;
            let code = ErrorCode::from_u16(raw).ok_or(ProtoError::UnknownErrorCode(raw))?;
            Frame::Error {
                code,
                text: r.str16(text, "Error text")?.to_owned(),
            }
        }
        WITNESS => {
            let version = witness_version(r.u8()?)?;
            let checkpoint = r
                .str16(MAX_WITNESS_NOTE_LEN, "witnessed checkpoint")?
                .to_owned();
            let old_size = r.u64()?;
            let n = r.u16()?;
            if n > MAX_CONSISTENCY_HASHES {
                return Err(ProtoError::TooLong {
                    what: "consistency proof",
                    len: u64::from(n),
                    max: u64::from(MAX_CONSISTENCY_HASHES),
                });
            }
            let proof = (0..n).map(|_| r.array()).collect::<Result<_, _>>()?;
            Frame::Witness {
                version,
                checkpoint,
                old_size,
                proof,
            }
        }
        COSIGNED => Frame::Cosigned {
            version: witness_version(r.u8()?)?,
            signature: r.str16(text, "cosignature")?.to_owned(),
        },
        NOTICES => {
            let version = r.u8()?;
            if version != NOTICES_VERSION {
                return Err(ProtoError::UnsupportedVersion {
                    what: "notices frame",
                    version: u16::from(version),
                    supported: u16::from(NOTICES_VERSION),
                });
            }
            Frame::Notices { version }
        }
        NOTICE => {
            let notice = payload.slice_ref(r.bytes32(limits.max_frame_len, "delivery notice")?);
            let signature = payload.slice_ref(r.bytes16()?);
            Frame::Notice { notice, signature }
        }
        NOTICE_ACK => Frame::NoticeAck {
            transfer_id: TransferId(r.array()?),
        },
        ANNOUNCE | ANNOUNCE_MORE => {
            let transfer_id = TransferId(r.array()?);
            // The chunk size, or the number of files announced before.
            let first = r.u32()?;
            let count = r.u32()?;
            // Bounded by the frame's length; what the limits allow, the receiver decides
            // (and answers: an announcement over them is not taken, not a broken stream).
            if count as usize > r.remaining() / 8 {
                return Err(ProtoError::Truncated {
                    what: "Announce file sizes",
                });
            }
            let file_sizes = (0..count).map(|_| r.u64()).collect::<Result<_, _>>()?;
            if kind == ANNOUNCE {
                Frame::Announce {
                    transfer_id,
                    chunk_size: first,
                    file_sizes,
                }
            } else {
                Frame::AnnounceMore {
                    transfer_id,
                    first_file: first,
                    file_sizes,
                }
            }
        }
        ANNOUNCED => Frame::Announced {
            transfer_id: TransferId(r.array()?),
            taken: match r.u8()? {
                0 => false,
                1 => true,
                value => {
                    return Err(ProtoError::BadFlag {
                        what: "Announced taken flag",
                        value,
                    });
                }
            },
        },
        other => return Err(ProtoError::UnknownFrame(other)),
    };
    r.finish()?;
    Ok(frame)
}

fn witness_version(v: u8) -> Result<u8, ProtoError> {
    if v == WITNESS_VERSION {
        Ok(v)
    } else {
        Err(ProtoError::UnsupportedVersion {
            what: "witness frame",
            version: u16::from(v),
            supported: u16::from(WITNESS_VERSION),
        })
    }
}

/// The fixed-size header opening each data stream; exactly `len` payload
/// bytes follow it.
///
/// ```text
/// u8 0xC1 (chunk stream, version 1) | 16 transfer id | u32 index | u32 len
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkHeader {
    /// The transfer.
    pub transfer_id: TransferId,
    /// The global chunk index.
    pub index: u32,
    /// Payload bytes following the header.
    pub len: u32,
}

impl ChunkHeader {
    /// Encoded size.
    pub const LEN: usize = 1 + 16 + 4 + 4;
    /// The leading type/version byte: a data stream, version 1.
    pub const TAG: u8 = 0xC1;

    /// The encoding.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = Self::TAG;
        out[1..17].copy_from_slice(&self.transfer_id.0);
        out[17..21].copy_from_slice(&self.index.to_be_bytes());
        out[21..25].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes a header; refuses any other type/version byte. Index and
    /// length are checked against the manifest by
    /// [`super::Receiver::chunk_header`].
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<ChunkHeader, ProtoError> {
        let mut r = Reader::new(bytes, "chunk header");
        let tag = r.u8()?;
        if tag != Self::TAG {
            return Err(ProtoError::UnsupportedVersion {
                what: "chunk stream",
                version: tag.into(),
                supported: Self::TAG.into(),
            });
        }
        Ok(ChunkHeader {
            transfer_id: TransferId(r.array()?),
            index: r.u32()?,
            len: r.u32()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_text() -> impl Strategy<Value = String> {
        proptest::string::string_regex(".{0,40}").unwrap()
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u16>(), arb_text()).prop_map(|(version, appliance_id)| Frame::Hello {
                version,
                appliance_id
            }),
            (arb_bytes(300), arb_bytes(80)).prop_map(|(manifest, signature)| Frame::Offer {
                manifest,
                signature
            }),
            (any::<[u8; 16]>(), arb_bytes(40)).prop_map(|(id, have)| Frame::Have {
                transfer_id: TransferId(id),
                have
            }),
            any::<u32>().prop_map(|index| Frame::ChunkOk { index }),
            (any::<u32>(), arb_text())
                .prop_map(|(index, reason)| Frame::ChunkBad { index, reason }),
            (arb_bytes(200), arb_bytes(80))
                .prop_map(|(receipt, signature)| Frame::Receipt { receipt, signature }),
            (
                proptest::sample::select(ErrorCode::ALL.to_vec()),
                arb_text()
            )
                .prop_map(|(code, text)| Frame::Error { code, text }),
            (
                arb_text(),
                any::<u64>(),
                proptest::collection::vec(any::<[u8; 32]>(), 0..8)
            )
                .prop_map(|(checkpoint, old_size, proof)| Frame::Witness {
                    version: WITNESS_VERSION,
                    checkpoint,
                    old_size,
                    proof
                }),
            arb_text().prop_map(|signature| Frame::Cosigned {
                version: WITNESS_VERSION,
                signature
            }),
            Just(Frame::Notices {
                version: NOTICES_VERSION
            }),
            (arb_bytes(200), arb_bytes(80))
                .prop_map(|(notice, signature)| Frame::Notice { notice, signature }),
            any::<[u8; 16]>().prop_map(|id| Frame::NoticeAck {
                transfer_id: TransferId(id)
            }),
            (
                any::<[u8; 16]>(),
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(any::<u64>(), 0..6)
            )
                .prop_map(|(id, chunk_size, first_file, file_sizes)| {
                    if first_file % 2 == 0 {
                        Frame::Announce {
                            transfer_id: TransferId(id),
                            chunk_size,
                            file_sizes,
                        }
                    } else {
                        Frame::AnnounceMore {
                            transfer_id: TransferId(id),
                            first_file,
                            file_sizes,
                        }
                    }
                }),
            (any::<[u8; 16]>(), any::<bool>()).prop_map(|(id, taken)| Frame::Announced {
                transfer_id: TransferId(id),
                taken
            }),
        ]
    }

    fn decode_all(dec: &mut FrameDecoder) -> Result<Vec<Frame>, ProtoError> {
        let mut out = Vec::new();
        while let Some(f) = dec.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn every_frame_type_roundtrips() {
        let frames = vec![
            Frame::Hello {
                version: 1,
                appliance_id: "edge-1".into(),
            },
            Frame::Offer {
                manifest: Bytes::from_static(b"m"),
                signature: Bytes::from_static(&[7; 64]),
            },
            Frame::Have {
                transfer_id: TransferId([3; 16]),
                have: Bytes::from_static(&[0xff, 1]),
            },
            Frame::ChunkOk { index: u32::MAX },
            Frame::ChunkBad {
                index: 0,
                reason: "digest mismatch".into(),
            },
            Frame::Receipt {
                receipt: Bytes::from_static(b"r"),
                signature: Bytes::new(),
            },
            Frame::Error {
                code: ErrorCode::NoSpace,
                text: String::new(),
            },
            Frame::Witness {
                version: WITNESS_VERSION,
                checkpoint: "baylink.audit/edge\n4\nAAAA\n\n\u{2014} k AAAA\n".into(),
                old_size: 2,
                proof: vec![[1; 32], [2; 32]],
            },
            Frame::Cosigned {
                version: WITNESS_VERSION,
                signature: "\u{2014} baylink.witness/gateway AAAA".into(),
            },
            Frame::Notices {
                version: NOTICES_VERSION,
            },
            Frame::Notice {
                notice: Bytes::from_static(b"BLDN"),
                signature: Bytes::from_static(&[9; 64]),
            },
            Frame::NoticeAck {
                transfer_id: TransferId([4; 16]),
            },
            Frame::Announce {
                transfer_id: TransferId([5; 16]),
                chunk_size: 1 << 20,
                file_sizes: vec![0, 3 << 20, 1],
            },
            Frame::AnnounceMore {
                transfer_id: TransferId([5; 16]),
                first_file: 3,
                file_sizes: vec![7],
            },
            Frame::Announced {
                transfer_id: TransferId([5; 16]),
                taken: true,
            },
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&wire);
        assert_eq!(decode_all(&mut dec).unwrap(), frames);
        assert_eq!(dec.buffered(), 0);
        assert_eq!(
            Frame::ChunkOk { index: 1 }.to_bytes().as_ref(),
            &[4, 0, 0, 0, 4, 0, 0, 0, 1]
        );
    }

    #[test]
    fn witness_frames_are_versioned_and_limited() {
        let mut f = Frame::Witness {
            version: WITNESS_VERSION,
            checkpoint: "c".into(),
            old_size: 0,
            proof: vec![[0; 32]; usize::from(MAX_CONSISTENCY_HASHES) + 1],
        };
        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&f.to_bytes());
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::TooLong {
                what: "consistency proof",
                ..
            })
        ));
        if let Frame::Witness { version, proof, .. } = &mut f {
            *version = 2;
            proof.clear();
        }
        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&f.to_bytes());
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::UnsupportedVersion { version: 2, .. })
        ));
        let long = Frame::Witness {
            version: WITNESS_VERSION,
            checkpoint: "x".repeat(usize::from(MAX_WITNESS_NOTE_LEN) + 1),
            old_size: 0,
            proof: vec![],
        };
        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&long.to_bytes());
        assert!(dec.next_frame().is_err());
    }

    #[test]
    fn notices_frames_are_versioned() {
        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&[NOTICES, 0, 0, 0, 1, 2]);
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::UnsupportedVersion { version: 2, .. })
        ));
        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&[NOTICE_ACK, 0, 0, 0, 15]);
        dec.push(&[0; 15]);
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::Truncated { .. })
        ));
        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&[0x10, 0, 0, 0, 0]);
        assert_eq!(dec.next_frame(), Err(ProtoError::UnknownFrame(0x10)));
    }

    #[test]
    fn announce_frames_decode_whatever_their_layout_and_refuse_an_impossible_count() {
        // The limits are the receiver's to apply: it answers that it does not take the
        // announcement, which a broken stream would not let it do.
        let limits = Limits {
            max_files: 2,
            max_chunks: 4,
            ..Limits::default()
        };
        let mut dec = FrameDecoder::new(limits);
        let mut wire = BytesMut::new();
        encode(
            &Frame::Announce {
                transfer_id: TransferId([1; 16]),
                chunk_size: 0,
                file_sizes: vec![1, 1, 1],
            },
            &mut wire,
        );
        dec.push(&wire);
        assert!(matches!(
            dec.next_frame(),
            Ok(Some(Frame::Announce { chunk_size: 0, .. }))
        ));
        // A count the payload cannot hold is refused before anything is allocated for it.
        let mut dec = FrameDecoder::new(Limits::default());
        let mut p = BytesMut::new();
        p.put_u8(ANNOUNCE_MORE);
        p.put_u32(24);
        p.put_slice(&[1; 16]);
        p.put_u32(4);
        p.put_u32(50_000);
        dec.push(&p);
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn over_long_frame_is_refused_from_its_header_alone() {
        let limits = Limits {
            max_frame_len: 1000,
            ..Limits::default()
        };
        let mut dec = FrameDecoder::new(limits);
        dec.push(&[OFFER, 0, 0, 0x03, 0xe9]); // 1001 bytes announced, none sent
        assert_eq!(
            dec.next_frame(),
            Err(ProtoError::FrameTooLong {
                len: 1001,
                max: 1000
            })
        );
        // Sticky, and nothing more is buffered.
        dec.push(&[0; 4096]);
        assert_eq!(dec.buffered(), 0);
        assert!(dec.next_frame().is_err());

        let mut dec = FrameDecoder::new(Limits::default());
        dec.push(&[OFFER, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::FrameTooLong { len: u32::MAX, .. })
        ));
    }

    #[test]
    fn a_frame_at_the_limit_is_accepted() {
        let limits = Limits {
            max_frame_len: 4 + 100 + 2,
            ..Limits::default()
        };
        let f = Frame::Offer {
            manifest: Bytes::from(vec![1; 100]),
            signature: Bytes::new(),
        };
        let mut dec = FrameDecoder::new(limits);
        dec.push(&f.to_bytes());
        assert_eq!(dec.next_frame().unwrap(), Some(f));
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x00, 0, 0, 0, 0], "unknown type 0"),
            (vec![0x08, 0, 0, 0, 0], "unknown type 8"),
            (vec![CHUNK_OK, 0, 0, 0, 3, 0, 0, 1], "short ChunkOk"),
            (vec![CHUNK_OK, 0, 0, 0, 5, 0, 0, 0, 1, 9], "trailing byte"),
            (
                vec![ERROR, 0, 0, 0, 4, 0xff, 0xff, 0, 0],
                "unknown error code",
            ),
            (vec![HELLO, 0, 0, 0, 5, 0, 1, 0, 1, 0xff], "bad UTF-8"),
            (
                vec![HELLO, 0, 0, 0, 4, 0, 1, 0, 9],
                "string past the payload",
            ),
        ];
        for (bytes, what) in cases {
            let mut dec = FrameDecoder::new(Limits::default());
            dec.push(&bytes);
            assert!(dec.next_frame().is_err(), "{what}");
        }
        // A text over the receiver's limit.
        let limits = Limits {
            max_text_len: 3,
            ..Limits::default()
        };
        let mut dec = FrameDecoder::new(limits);
        dec.push(
            &Frame::ChunkBad {
                index: 1,
                reason: "four".into(),
            }
            .to_bytes(),
        );
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::TooLong { len: 4, max: 3, .. })
        ));
        // A chunk bitmap larger than any transfer can need.
        let limits = Limits {
            max_chunks: 16,
            ..Limits::default()
        };
        let mut dec = FrameDecoder::new(limits);
        dec.push(
            &Frame::Have {
                transfer_id: TransferId([0; 16]),
                have: Bytes::from(vec![0; 3]),
            }
            .to_bytes(),
        );
        assert!(matches!(
            dec.next_frame(),
            Err(ProtoError::TooLong {
                what: "chunk bitmap",
                ..
            })
        ));
    }

    #[test]
    fn texts_are_cut_on_encode_not_panicked_on() {
        let f = Frame::Error {
            code: ErrorCode::Internal,
            text: "é".repeat(40_000),
        };
        let wire = f.to_bytes();
        let limits = Limits {
            max_text_len: u16::MAX,
            ..Limits::default()
        };
        let mut dec = FrameDecoder::new(limits);
        dec.push(&wire);
        match dec.next_frame().unwrap() {
            Some(Frame::Error { text, .. }) => assert_eq!(text.len(), 65_534),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunk_header_roundtrip_and_tag() {
        let h = ChunkHeader {
            transfer_id: TransferId([5; 16]),
            index: 70_000,
            len: 4 << 20,
        };
        let b = h.encode();
        assert_eq!(b.len(), ChunkHeader::LEN);
        assert_eq!(ChunkHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] = 0xC2;
        assert!(matches!(
            ChunkHeader::decode(&bad),
            Err(ProtoError::UnsupportedVersion { version: 0xC2, .. })
        ));
    }

    proptest! {
        #[test]
        fn prop_roundtrip(frames in proptest::collection::vec(arb_frame(), 0..8)) {
            let mut wire = BytesMut::new();
            for f in &frames {
                encode(f, &mut wire);
            }
            let mut dec = FrameDecoder::new(Limits::default());
            dec.push(&wire);
            prop_assert_eq!(decode_all(&mut dec).unwrap(), frames);
        }

        #[test]
        fn prop_any_split_gives_the_same_frames(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                encode(f, &mut wire);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.push(0);
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut dec = FrameDecoder::new(Limits::default());
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                dec.push(&wire[w[0]..w[1]]);
                got.extend(decode_all(&mut dec).unwrap());
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(dec.buffered(), 0);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let limits = Limits { max_frame_len: 256, max_chunks: 64, max_text_len: 32, ..Limits::default() };
            let mut dec = FrameDecoder::new(limits);
            let mut rest = &bytes[..];
            for c in cuts {
                let c = if rest.is_empty() { 0 } else { c % (rest.len() + 1) };
                dec.push(&rest[..c]);
                rest = &rest[c..];
                while let Ok(Some(_)) = dec.next_frame() {}
                prop_assert!(dec.buffered() <= FRAME_HEADER_LEN + 256);
            }
            dec.push(rest);
            while let Ok(Some(_)) = dec.next_frame() {}
        }

        #[test]
        fn prop_length_over_the_limit_is_refused_before_buffering(kind in 1u8..=7, max in 0u32..1_000_000, over in 1u32..1000) {
            let limits = Limits { max_frame_len: max, ..Limits::default() };
            let mut dec = FrameDecoder::new(limits);
            let len = max.saturating_add(over);
            let mut header = vec![kind];
            header.extend_from_slice(&len.to_be_bytes());
            dec.push(&header);
            prop_assert_eq!(dec.next_frame(), Err(ProtoError::FrameTooLong { len, max }));
            prop_assert_eq!(dec.buffered(), 0);
        }

        #[test]
        fn prop_chunk_header_decode_never_panics(bytes in any::<[u8; 25]>()) {
            if let Ok(h) = ChunkHeader::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes);
            }
        }
    }
}
