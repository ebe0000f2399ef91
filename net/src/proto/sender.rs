//! The sending end of one transfer (the edge).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::wire::truncate_str;
use super::{
    ChunkSet, Digest, ErrorCode, Frame, MAX_SENT_TEXT_LEN, Manifest, PROTOCOL_VERSION, ProtoError,
    Receipt, sha256,
};

/// Tuning for a [`Sender`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderConfig {
    /// Most chunks sent but not yet acknowledged with `ChunkOk` (at least 1).
    pub max_in_flight: usize,
    /// How often one chunk may be sent again after `ChunkBad` or a failed
    /// stream before the transfer fails.
    pub max_chunk_retries: u32,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_chunk_retries: 3,
        }
    }
}

/// What the caller of a [`Sender`] must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderAction {
    /// Write this frame to the control stream.
    SendFrame(Frame),
    /// Open a data stream and send chunk `index`: a [`super::ChunkHeader`],
    /// then the bytes at [`Manifest::chunk`]`(index)`. Report the outcome with
    /// [`Sender::chunk_written`] or [`Sender::chunk_stream_failed`].
    SendChunk {
        /// The chunk.
        index: u32,
    },
    /// Every chunk is acknowledged and the receiver sent its receipt, which
    /// matches this transfer. The caller verifies `signature` over `receipt`
    /// with the gateway's public key before recording it.
    Done {
        /// The receipt bytes ([`Receipt::to_bytes`]).
        receipt: Bytes,
        /// The gateway's signature over them.
        signature: Bytes,
    },
    /// The transfer stopped. Any `Error` frame to tell the peer was queued
    /// before this. Nothing follows.
    Failed(ProtoError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Offer queued; waiting for the receiver's `Have`.
    AwaitHave,
    /// Sending chunks and collecting acknowledgements and the receipt.
    Sending,
    /// `Done` or `Failed` was queued.
    Finished,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::AwaitHave => "waiting for the receiver's Have",
            State::Sending => "sending chunks",
            State::Finished => "finished",
        }
    }
}

/// The sender's state machine for one transfer over one connection.
///
/// Feed it control frames ([`Sender::handle_frame`]) and data stream
/// outcomes, and carry out what [`Sender::poll_action`] returns. After a lost
/// connection, drop it and make a new one from the same manifest: the
/// receiver's `Have` then limits the work to the missing chunks.
///
/// Duplicated or reordered acknowledgements are tolerated (a `ChunkBad`
/// after that chunk's `ChunkOk` is stale and ignored; a `Receipt` before the
/// last `ChunkOk` is held until it arrives).
#[derive(Debug)]
pub struct Sender {
    manifest: Arc<Manifest>,
    manifest_digest: Digest,
    cfg: SenderConfig,
    state: State,
    /// The `Have` bitmap acted on, to recognise a repeat of it.
    have: Option<Bytes>,
    /// Chunks the receiver holds: in its `Have`, or acknowledged since.
    acked: ChunkSet,
    /// Chunks ever handed to `SendChunk` on this connection.
    sent: ChunkSet,
    /// Chunks sent and not yet acknowledged or reported bad.
    outstanding: ChunkSet,
    /// Chunks waiting to be sent (resends at the front).
    queue: VecDeque<u32>,
    queued: ChunkSet,
    /// Failed attempts per chunk.
    failures: HashMap<u32, u32>,
    receipt: Option<(Bytes, Bytes)>,
    actions: VecDeque<SenderAction>,
    wire_bytes: u64,
    streams_written: u64,
}

impl Sender {
    /// A sender for `manifest`, whose canonical bytes and edge signature are
    /// `manifest_bytes` and `signature`. Its first action is the `Offer`.
    pub fn new(
        manifest: Arc<Manifest>,
        manifest_bytes: Bytes,
        signature: Bytes,
        cfg: SenderConfig,
    ) -> Self {
        let n = manifest.chunk_count();
        let manifest_digest = sha256(&manifest_bytes);
        debug_assert_eq!(
            manifest_digest,
            manifest.digest(),
            "manifest_bytes must be manifest.to_bytes()"
        );
        let mut actions = VecDeque::new();
        actions.push_back(SenderAction::SendFrame(Frame::Offer {
            manifest: manifest_bytes,
            signature,
        }));
        Self {
            // What the receiver's Manifest::digest() gives for these bytes
            // (the encoding is canonical).
            manifest_digest,
            manifest,
            cfg: SenderConfig {
                max_in_flight: cfg.max_in_flight.max(1),
                ..cfg
            },
            state: State::AwaitHave,
            have: None,
            acked: ChunkSet::new(n),
            sent: ChunkSet::new(n),
            outstanding: ChunkSet::new(n),
            queue: VecDeque::new(),
            queued: ChunkSet::new(n),
            failures: HashMap::new(),
            receipt: None,
            actions,
            wire_bytes: 0,
            streams_written: 0,
        }
    }

    /// Chunks this side streamed on this connection before the `Offer`, under an
    /// `Announce` (see [`Frame::Announce`]). The receiver may have taken them, or may still
    /// be verifying one when its `Have` goes out: a `ChunkOk` or `ChunkBad` for them is
    /// then expected even before they are sent again. Call before the first frame is
    /// handled; indices past the manifest's chunks are ignored.
    pub fn streamed_before_offer(&mut self, streamed: impl IntoIterator<Item = u32>) {
        for index in streamed {
            if index < self.manifest.chunk_count() {
                self.sent.insert(index);
            }
        }
    }

    /// The manifest being sent.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Chunks the receiver is known to hold.
    pub fn acked(&self) -> &ChunkSet {
        &self.acked
    }

    /// Payload bytes of all the chunks handed out in `SendChunk` actions
    /// (resends included).
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Whether `Done` or `Failed` has been queued.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<SenderAction> {
        self.actions.pop_front()
    }

    /// Handles a frame from the receiver. On `Err` the transfer has failed:
    /// the queued actions end with `Failed` (after an `Error` frame for the
    /// peer when the fault is the peer's). Frames after that are ignored.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtoError> {
        if self.state == State::Finished {
            return Ok(());
        }
        match frame {
            Frame::Hello { version, .. } => {
                if version != PROTOCOL_VERSION {
                    return self.fail(
                        ProtoError::UnsupportedVersion {
                            what: "protocol",
                            version,
                            supported: PROTOCOL_VERSION,
                        },
                        true,
                    );
                }
            }
            Frame::Have { transfer_id, have } => {
                if transfer_id != self.manifest.transfer_id {
                    return self.fail(
                        ProtoError::UnknownTransfer {
                            expected: self.manifest.transfer_id,
                            got: transfer_id,
                        },
                        true,
                    );
                }
                match &self.have {
                    Some(first) if *first == have => {}
                    Some(_) => return self.fail(ProtoError::Conflicting { what: "Have" }, true),
                    None => {
                        let set = match ChunkSet::from_bytes(self.manifest.chunk_count(), &have) {
                            Ok(set) => set,
                            Err(e) => return self.fail(e, true),
                        };
                        self.have = Some(have);
                        self.start(set);
                    }
                }
            }
            Frame::ChunkOk { index } => {
                self.check_index(index, "ChunkOk")?;
                if !self.acked.contains(index) {
                    if !self.sent.contains(index) {
                        return self.fail(
                            ProtoError::UnexpectedFrame {
                                frame: "ChunkOk (for a chunk never sent)",
                                state: self.state.describe(),
                            },
                            true,
                        );
                    }
                    self.acked.insert(index);
                    self.outstanding.remove(index);
                    self.queued.remove(index);
                }
            }
            Frame::ChunkBad { index, reason } => {
                self.check_index(index, "ChunkBad")?;
                // Stale (after ChunkOk) or a repeat while a resend is
                // already queued: nothing to do.
                if !self.acked.contains(index) && !self.queued.contains(index) {
                    if !self.sent.contains(index) {
                        return self.fail(
                            ProtoError::UnexpectedFrame {
                                frame: "ChunkBad (for a chunk never sent)",
                                state: self.state.describe(),
                            },
                            true,
                        );
                    }
                    let reason = format!("receiver says {:?}", truncate_str(&reason, 200));
                    self.retry(index, reason)?;
                }
            }
            Frame::Receipt { receipt, signature } => {
                // A receipt may overtake the Have or the last ChunkOk on a
                // reordering path; it is held until every chunk is acked.
                if let Err(e) = self.check_receipt(&receipt) {
                    return self.fail(e, true);
                }
                match &self.receipt {
                    Some((r, s)) if *r == receipt && *s == signature => {}
                    Some(_) => return self.fail(ProtoError::Conflicting { what: "Receipt" }, true),
                    None => self.receipt = Some((receipt, signature)),
                }
            }
            Frame::Error { code, text } => {
                return self.fail(ProtoError::Peer { code, text }, false);
            }
            Frame::Offer { .. } => return self.unexpected("Offer"),
            Frame::Witness { .. } => return self.unexpected("Witness"),
            Frame::Cosigned { .. } => return self.unexpected("Cosigned"),
            Frame::Notices { .. } => return self.unexpected("Notices"),
            Frame::Notice { .. } => return self.unexpected("Notice"),
            Frame::NoticeAck { .. } => return self.unexpected("NoticeAck"),
            Frame::Announce { .. } => return self.unexpected("Announce"),
            Frame::Announced { .. } => return self.unexpected("Announced"),
            Frame::AnnounceMore { .. } => return self.unexpected("AnnounceMore"),
        }
        self.pump();
        Ok(())
    }

    /// The data stream for chunk `index` was written completely. (The chunk
    /// stays outstanding until the receiver's `ChunkOk`.)
    pub fn chunk_written(&mut self, index: u32) {
        if self.outstanding.contains(index) {
            self.streams_written += 1;
        }
    }

    /// Data streams reported written with [`Sender::chunk_written`].
    pub fn streams_written(&self) -> u64 {
        self.streams_written
    }

    /// The data stream for chunk `index` failed before it was written (reset,
    /// stopped by the receiver, or a local read error): send it again,
    /// within the retry limit.
    pub fn chunk_stream_failed(&mut self, index: u32) {
        if self.state != State::Sending || !self.outstanding.contains(index) {
            return;
        }
        if self.retry(index, "data stream failed".into()).is_ok() {
            self.pump();
        }
    }

    fn start(&mut self, have: ChunkSet) {
        self.state = State::Sending;
        self.queue.extend(have.missing());
        for i in have.missing() {
            self.queued.insert(i);
        }
        self.acked = have;
    }

    fn retry(&mut self, index: u32, reason: String) -> Result<(), ProtoError> {
        self.outstanding.remove(index);
        let failures = self.failures.entry(index).or_insert(0);
        *failures += 1;
        if *failures > self.cfg.max_chunk_retries {
            let err = ProtoError::TooManyRetries {
                index,
                attempts: *failures,
                limit: self.cfg.max_chunk_retries,
                last: reason,
            };
            return self.fail(err, true);
        }
        self.queued.insert(index);
        self.queue.push_front(index);
        Ok(())
    }

    /// Hands out chunks while the in-flight window has room, and finishes
    /// once everything is acknowledged and the receipt is in.
    fn pump(&mut self) {
        if self.state != State::Sending {
            return;
        }
        while (self.outstanding.count() as usize) < self.cfg.max_in_flight {
            let Some(index) = self.queue.pop_front() else {
                break;
            };
            if !self.queued.remove(index) || self.acked.contains(index) {
                continue;
            }
            let len = self.manifest.chunk(index).map_or(0, |c| c.len);
            self.wire_bytes += u64::from(len);
            self.sent.insert(index);
            self.outstanding.insert(index);
            self.actions.push_back(SenderAction::SendChunk { index });
        }
        if self.acked.is_full()
            && let Some((receipt, signature)) = self.receipt.take()
        {
            self.state = State::Finished;
            self.actions
                .push_back(SenderAction::Done { receipt, signature });
        }
    }

    fn check_receipt(&self, bytes: &[u8]) -> Result<(), ProtoError> {
        let r = Receipt::from_bytes(bytes)?;
        if r.transfer_id != self.manifest.transfer_id {
            return Err(ProtoError::ReceiptMismatch {
                what: "transfer id",
            });
        }
        if r.merkle_root != self.manifest.merkle_root {
            return Err(ProtoError::ReceiptMismatch {
                what: "Merkle root",
            });
        }
        if r.manifest_digest != self.manifest_digest {
            return Err(ProtoError::ReceiptMismatch {
                what: "manifest digest",
            });
        }
        if r.process_id != self.manifest.process_id {
            return Err(ProtoError::ReceiptMismatch {
                what: "process id (consent reference)",
            });
        }
        Ok(())
    }

    fn check_index(&mut self, index: u32, frame: &'static str) -> Result<(), ProtoError> {
        if self.state != State::Sending {
            return self.unexpected(frame);
        }
        if index >= self.manifest.chunk_count() {
            return self.fail(
                ProtoError::ChunkIndexOutOfRange {
                    index,
                    count: self.manifest.chunk_count(),
                },
                true,
            );
        }
        Ok(())
    }

    fn unexpected(&mut self, frame: &'static str) -> Result<(), ProtoError> {
        let state = self.state.describe();
        self.fail(ProtoError::UnexpectedFrame { frame, state }, true)
    }

    /// Stops the transfer from this side with `code` (e.g. shutting down):
    /// queues an `Error` frame for the peer, then `Failed`.
    pub fn abort(&mut self, code: ErrorCode, text: impl Into<String>) {
        if self.state != State::Finished {
            let text = text.into();
            let _ = self.fail(ProtoError::Local { code, text }, true);
        }
    }

    fn fail(&mut self, err: ProtoError, tell_peer: bool) -> Result<(), ProtoError> {
        self.state = State::Finished;
        self.queue.clear();
        if tell_peer {
            let text = match &err {
                ProtoError::Local { text, .. } => text.clone(),
                other => other.to_string(),
            };
            self.actions
                .push_back(SenderAction::SendFrame(Frame::Error {
                    code: err.code(),
                    text: truncate_str(&text, MAX_SENT_TEXT_LEN).to_owned(),
                }));
        }
        self.actions.push_back(SenderAction::Failed(err.clone()));
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifest::tests::build;
    use super::*;

    fn sender(sizes: &[u64], cs: u32, cfg: SenderConfig) -> Sender {
        let (m, _) = build(sizes, cs);
        let bytes = Bytes::from(m.to_bytes());
        Sender::new(Arc::new(m), bytes, Bytes::from_static(b"sig"), cfg)
    }

    fn drain(s: &mut Sender) -> Vec<SenderAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn have(s: &Sender, set: &ChunkSet) -> Frame {
        Frame::have(s.manifest().transfer_id, set)
    }

    fn receipt_for(m: &Manifest) -> Bytes {
        Receipt {
            transfer_id: m.transfer_id,
            merkle_root: m.merkle_root,
            manifest_digest: m.digest(),
            process_id: m.process_id.clone(),
            receiver: "gw".into(),
            committed_unix_ms: 1,
        }
        .to_bytes()
        .into()
    }

    #[test]
    fn offers_first_then_respects_the_window_and_have_set() {
        let cfg = SenderConfig {
            max_in_flight: 2,
            max_chunk_retries: 1,
        };
        let mut s = sender(&[10, 10], 4, cfg); // chunks: 0,1,2 | 3,4,5
        assert!(matches!(
            drain(&mut s)[..],
            [SenderAction::SendFrame(Frame::Offer { .. })]
        ));
        let mut held = ChunkSet::new(6);
        held.insert(0);
        held.insert(4);
        s.handle_frame(have(&s, &held)).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![
                SenderAction::SendChunk { index: 1 },
                SenderAction::SendChunk { index: 2 }
            ]
        );
        s.handle_frame(Frame::ChunkOk { index: 2 }).unwrap();
        assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 3 }]);
        // A repeated Have is ignored; a different one is a protocol error.
        s.handle_frame(have(&s, &held)).unwrap();
        assert!(drain(&mut s).is_empty());
        s.handle_frame(Frame::ChunkOk { index: 1 }).unwrap();
        s.handle_frame(Frame::ChunkOk { index: 1 }).unwrap();
        s.handle_frame(Frame::ChunkOk { index: 3 }).unwrap();
        assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 5 }]);
        assert_eq!(s.wire_bytes(), 4 + 2 + 4 + 2);
    }

    #[test]
    fn a_verdict_on_a_chunk_streamed_before_the_offer_is_expected() {
        let cfg = SenderConfig {
            max_in_flight: 1,
            max_chunk_retries: 1,
        };
        // Chunks 0..3; 1 and 2 were streamed under an announcement, 0 was taken (in the
        // Have), 1 and 2 were not yet verified when the Have went out.
        let mut s = sender(&[16], 4, cfg);
        s.streamed_before_offer([1, 2, 99]);
        drain(&mut s);
        let mut held = ChunkSet::new(4);
        held.insert(0);
        s.handle_frame(have(&s, &held)).unwrap();
        assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 1 }]);
        // The late verdict on the streamed copy of 2 arrives before 2 is sent again: taken.
        s.handle_frame(Frame::ChunkOk { index: 2 }).unwrap();
        s.handle_frame(Frame::ChunkOk { index: 1 }).unwrap();
        assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 3 }]);
        s.handle_frame(Frame::ChunkOk { index: 3 }).unwrap();
        assert!(s.acked().is_full());
        assert_eq!(s.wire_bytes(), 8);

        // Without the streamed chunks named, the same verdict is a protocol error.
        let mut s = sender(&[16], 4, cfg);
        drain(&mut s);
        s.handle_frame(have(&s, &held)).unwrap();
        drain(&mut s);
        assert!(matches!(
            s.handle_frame(Frame::ChunkOk { index: 2 }),
            Err(ProtoError::UnexpectedFrame { .. })
        ));
    }

    #[test]
    fn bad_chunks_are_resent_then_fail_after_the_retry_limit() {
        let cfg = SenderConfig {
            max_in_flight: 8,
            max_chunk_retries: 2,
        };
        let mut s = sender(&[4], 4, cfg);
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::new(1))).unwrap();
        assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 0 }]);
        for _ in 0..2 {
            s.handle_frame(Frame::ChunkBad {
                index: 0,
                reason: "digest mismatch".into(),
            })
            .unwrap();
            assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 0 }]);
        }
        let err = s
            .handle_frame(Frame::ChunkBad {
                index: 0,
                reason: "digest mismatch".into(),
            })
            .unwrap_err();
        assert!(matches!(
            err,
            ProtoError::TooManyRetries {
                index: 0,
                attempts: 3,
                limit: 2,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("chunk 0 failed 3 times") && msg.contains("digest mismatch"),
            "{msg}"
        );
        let actions = drain(&mut s);
        assert!(matches!(
            &actions[..],
            [
                SenderAction::SendFrame(Frame::Error {
                    code: ErrorCode::TooManyRetries,
                    ..
                }),
                SenderAction::Failed(_)
            ]
        ));
        assert!(s.is_finished());
        assert_eq!(s.wire_bytes(), 12);
    }

    #[test]
    fn stream_failures_resend_within_the_limit() {
        let cfg = SenderConfig {
            max_in_flight: 1,
            max_chunk_retries: 1,
        };
        let mut s = sender(&[8], 4, cfg);
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::new(2))).unwrap();
        assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 0 }]);
        s.chunk_stream_failed(0);
        assert_eq!(drain(&mut s), vec![SenderAction::SendChunk { index: 0 }]);
        s.chunk_stream_failed(7); // not outstanding: ignored
        s.chunk_stream_failed(0);
        assert!(matches!(
            drain(&mut s).last(),
            Some(SenderAction::Failed(ProtoError::TooManyRetries { .. }))
        ));
    }

    #[test]
    fn done_needs_every_ack_and_a_matching_receipt() {
        let mut s = sender(&[5], 4, SenderConfig::default());
        let m = s.manifest().clone();
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::new(2))).unwrap();
        drain(&mut s);
        s.handle_frame(Frame::ChunkOk { index: 0 }).unwrap();
        // The receipt overtaking the last ChunkOk is held.
        let receipt = receipt_for(&m);
        s.handle_frame(Frame::Receipt {
            receipt: receipt.clone(),
            signature: Bytes::from_static(b"s"),
        })
        .unwrap();
        assert!(drain(&mut s).is_empty());
        s.handle_frame(Frame::ChunkOk { index: 1 }).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![SenderAction::Done {
                receipt,
                signature: Bytes::from_static(b"s")
            }]
        );
    }

    #[test]
    fn a_full_have_goes_straight_to_waiting_for_the_receipt() {
        let mut s = sender(&[5, 0], 4, SenderConfig::default());
        let m = s.manifest().clone();
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::full(2))).unwrap();
        assert!(drain(&mut s).is_empty());
        s.handle_frame(Frame::Receipt {
            receipt: receipt_for(&m),
            signature: Bytes::new(),
        })
        .unwrap();
        assert!(matches!(drain(&mut s)[..], [SenderAction::Done { .. }]));
        assert_eq!(s.wire_bytes(), 0);
    }

    #[test]
    fn mismatching_receipts_and_peer_errors_fail() {
        let mut s = sender(&[5], 4, SenderConfig::default());
        let mut other = s.manifest().as_ref().clone();
        other.merkle_root = [0; 32];
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::full(2))).unwrap();
        let err = s
            .handle_frame(Frame::Receipt {
                receipt: receipt_for(&other),
                signature: Bytes::new(),
            })
            .unwrap_err();
        assert_eq!(
            err,
            ProtoError::ReceiptMismatch {
                what: "Merkle root"
            }
        );

        // A receipt for the right manifest that names another consent.
        let mut s = sender(&[5], 4, SenderConfig::default());
        let m = s.manifest().clone();
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::full(2))).unwrap();
        let mut r = Receipt::from_bytes(&receipt_for(&m)).unwrap();
        r.process_id = "C-other".into();
        let err = s
            .handle_frame(Frame::Receipt {
                receipt: r.to_bytes().into(),
                signature: Bytes::new(),
            })
            .unwrap_err();
        assert_eq!(
            err,
            ProtoError::ReceiptMismatch {
                what: "process id (consent reference)"
            }
        );

        let mut s = sender(&[5], 4, SenderConfig::default());
        drain(&mut s);
        let err = s
            .handle_frame(Frame::Error {
                code: ErrorCode::BadSignature,
                text: "no".into(),
            })
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadSignature);
        // No echo to the peer for its own error.
        assert_eq!(drain(&mut s), vec![SenderAction::Failed(err)]);
        s.handle_frame(Frame::ChunkOk { index: 0 }).unwrap();
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn protocol_violations_fail_and_tell_the_peer() {
        let cases: Vec<Frame> = vec![
            Frame::ChunkOk { index: 0 }, // before Have
            Frame::Offer {
                manifest: Bytes::new(),
                signature: Bytes::new(),
            },
            Frame::Hello {
                version: 9,
                appliance_id: "x".into(),
            },
            Frame::Have {
                transfer_id: super::super::TransferId([0; 16]),
                have: Bytes::new(),
            },
        ];
        for f in cases {
            let mut s = sender(&[5], 4, SenderConfig::default());
            drain(&mut s);
            let kind = f.kind();
            assert!(s.handle_frame(f).is_err(), "{kind}");
            let actions = drain(&mut s);
            assert!(
                matches!(
                    &actions[..],
                    [
                        SenderAction::SendFrame(Frame::Error { .. }),
                        SenderAction::Failed(_)
                    ]
                ),
                "{kind}: {actions:?}"
            );
        }
        // A bitmap of the wrong size, an index out of range, an ack for a
        // chunk never sent.
        let mut s = sender(&[5], 4, SenderConfig::default());
        drain(&mut s);
        let id = s.manifest().transfer_id;
        assert!(
            s.handle_frame(Frame::Have {
                transfer_id: id,
                have: Bytes::from_static(&[0, 0])
            })
            .is_err()
        );
        let mut s = sender(
            &[5],
            4,
            SenderConfig {
                max_in_flight: 1,
                max_chunk_retries: 1,
            },
        );
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::new(2))).unwrap();
        assert!(matches!(
            s.handle_frame(Frame::ChunkOk { index: 2 }),
            Err(ProtoError::ChunkIndexOutOfRange { .. })
        ));
        let mut s = sender(
            &[5],
            4,
            SenderConfig {
                max_in_flight: 1,
                max_chunk_retries: 1,
            },
        );
        drain(&mut s);
        s.handle_frame(have(&s, &ChunkSet::new(2))).unwrap();
        assert!(matches!(
            s.handle_frame(Frame::ChunkOk { index: 1 }),
            Err(ProtoError::UnexpectedFrame { .. })
        ));
    }

    #[test]
    fn abort_tells_the_peer() {
        let mut s = sender(&[5], 4, SenderConfig::default());
        drain(&mut s);
        s.abort(ErrorCode::ShuttingDown, "draining");
        let actions = drain(&mut s);
        assert_eq!(
            actions[0],
            SenderAction::SendFrame(Frame::Error {
                code: ErrorCode::ShuttingDown,
                text: "draining".into()
            })
        );
        assert!(matches!(
            actions[1],
            SenderAction::Failed(ProtoError::Local {
                code: ErrorCode::ShuttingDown,
                ..
            })
        ));
    }
}
