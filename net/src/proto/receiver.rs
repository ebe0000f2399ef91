//! The receiving end of one transfer (the gateway).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::wire::truncate_str;
use super::{
    ChunkHeader, ChunkLocation, ChunkSet, Digest, ErrorCode, Frame, Layout, Limits,
    MAX_ANNOUNCED_FILES, MAX_SENT_TEXT_LEN, Manifest, PROTOCOL_VERSION, ProtoError, TransferId,
};

/// Tuning for a [`Receiver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// How often one chunk may fail its digest check before the transfer
    /// fails.
    pub max_chunk_retries: u32,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            max_chunk_retries: 3,
        }
    }
}

/// What the caller of a [`Receiver`] must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverAction {
    /// A well-formed offer arrived. Verify `signature` over `manifest_bytes`
    /// with the sender's pinned key, check policy, prepare the spool and load
    /// the chunks already held durably; then call
    /// [`Receiver::offer_accepted`] or [`Receiver::offer_refused`].
    VerifyOffer {
        /// The decoded, checked manifest.
        manifest: Arc<Manifest>,
        /// Its canonical bytes, as signed.
        manifest_bytes: Bytes,
        /// The sender's signature.
        signature: Bytes,
    },
    /// The sender announced a transfer whose manifest is not signed yet (`Announce`), or
    /// more of its files: chunk streams for it may come before the `Offer`. Hold them aside
    /// (the caller decides where, and how much it takes) and answer `Announced`; none counts
    /// until the offer is accepted and its digest equals the manifest's. The caller may also
    /// not take the announcement: its chunk streams are then refused like any for an unknown
    /// transfer, and the sender sends them after the offer.
    Stage {
        /// The transfer the `Offer` will name.
        transfer_id: TransferId,
        /// Where its chunks go: every file announced so far.
        layout: Layout,
        /// Whether this grows an announcement already staged (else it is the first).
        extends: bool,
    },
    /// Write this frame to the control stream.
    SendFrame(Frame),
    /// Every chunk is good. Fsync the files, check the Merkle root, rename
    /// into place, sign a receipt, then call [`Receiver::committed`] (or
    /// [`Receiver::abort`] if that fails).
    Commit,
    /// The transfer stopped. Any `Error` frame to tell the peer was queued
    /// before this. Nothing follows.
    Failed(ProtoError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitOffer,
    /// `VerifyOffer` queued; waiting for the caller's verdict.
    Verifying,
    Receiving,
    /// `Commit` queued; waiting for [`Receiver::committed`].
    Committing,
    /// Receipt sent.
    Committed,
    /// `Failed` queued.
    Failed,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::AwaitOffer => "waiting for an Offer",
            State::Verifying => "verifying the offer",
            State::Receiving => "receiving chunks",
            State::Committing => "committing",
            State::Committed => "committed",
            State::Failed => "failed",
        }
    }
}

/// The receiver's state machine for one transfer over one connection.
///
/// A chunk is good only when the digest of its bytes equals the manifest's;
/// nothing else makes it good. The caller records good chunks durably
/// (after fsync) so that a new `Receiver` on the next connection can start
/// from them ([`Receiver::offer_accepted`]).
#[derive(Debug)]
pub struct Receiver {
    limits: Limits,
    cfg: ReceiverConfig,
    state: State,
    offer: Option<(Bytes, Bytes)>,
    /// What was announced before the offer, if anything: the transfer and every file
    /// announced so far, or `None` in its place once an announcement was not taken (the
    /// sender announces nothing more after that).
    announced: Option<(TransferId, Option<Layout>)>,
    manifest: Option<Arc<Manifest>>,
    good: ChunkSet,
    /// Chunks whose stream passed [`Receiver::chunk_header`] and has not
    /// finished yet.
    arriving: ChunkSet,
    failures: HashMap<u32, u32>,
    actions: VecDeque<ReceiverAction>,
}

impl Receiver {
    /// A receiver waiting for an `Offer`, enforcing `limits` on it.
    pub fn new(limits: Limits, cfg: ReceiverConfig) -> Self {
        Self {
            limits,
            cfg,
            state: State::AwaitOffer,
            offer: None,
            announced: None,
            manifest: None,
            good: ChunkSet::new(0),
            arriving: ChunkSet::new(0),
            failures: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// The offered manifest, once a well-formed offer arrived.
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    /// The chunks known good: those given to [`Receiver::offer_accepted`]
    /// plus those verified since.
    pub fn good(&self) -> &ChunkSet {
        &self.good
    }

    /// Whether the receipt was sent.
    pub fn is_committed(&self) -> bool {
        self.state == State::Committed
    }

    /// Whether the transfer failed.
    pub fn is_failed(&self) -> bool {
        self.state == State::Failed
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<ReceiverAction> {
        self.actions.pop_front()
    }

    /// Handles a frame from the sender. On `Err` the transfer has failed: the
    /// queued actions end with `Failed` (after an `Error` frame for the peer
    /// when the fault is the peer's). Frames after that are ignored.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtoError> {
        if self.state == State::Failed {
            return Ok(());
        }
        match frame {
            Frame::Hello { version, .. } => {
                if version != PROTOCOL_VERSION {
                    return self.fail(ProtoError::UnsupportedVersion {
                        what: "protocol",
                        version,
                        supported: PROTOCOL_VERSION,
                    });
                }
                Ok(())
            }
            Frame::Offer {
                manifest,
                signature,
            } => self.offer(manifest, signature),
            Frame::Announce {
                transfer_id,
                chunk_size,
                file_sizes,
            } if self.state == State::AwaitOffer => {
                if self.announced.is_some() {
                    return self.fail(ProtoError::Conflicting { what: "Announce" });
                }
                let layout = Layout::new(chunk_size, file_sizes, &self.limits);
                self.stage(transfer_id, layout, false);
                Ok(())
            }
            Frame::AnnounceMore {
                transfer_id,
                first_file,
                file_sizes,
            } if self.state == State::AwaitOffer => {
                let grown = match &self.announced {
                    Some((id, Some(layout)))
                        if *id == transfer_id && layout.file_count() == first_file as usize =>
                    {
                        layout.extended(&file_sizes, &self.limits)
                    }
                    _ => {
                        return self.fail(ProtoError::Conflicting {
                            what: "AnnounceMore",
                        });
                    }
                };
                self.stage(transfer_id, grown, true);
                Ok(())
            }
            Frame::Error { code, text } => {
                let err = ProtoError::Peer { code, text };
                self.state = State::Failed;
                self.actions.push_back(ReceiverAction::Failed(err.clone()));
                Err(err)
            }
            other => {
                let frame = other.kind();
                let state = self.state.describe();
                self.fail(ProtoError::UnexpectedFrame { frame, state })
            }
        }
    }

    /// An announcement's layout, every file announced so far: staged if it is within the
    /// limits (and [`MAX_ANNOUNCED_FILES`]), else answered "not taken" here. The stream goes
    /// on to the offer either way, which is judged on its own.
    fn stage(
        &mut self,
        transfer_id: TransferId,
        layout: Result<Layout, ProtoError>,
        extends: bool,
    ) {
        match layout {
            Ok(layout) if layout.file_count() <= MAX_ANNOUNCED_FILES => {
                self.announced = Some((transfer_id, Some(layout.clone())));
                self.actions.push_back(ReceiverAction::Stage {
                    transfer_id,
                    layout,
                    extends,
                });
            }
            _ => {
                self.announcement_not_taken(transfer_id);
                self.actions
                    .push_back(ReceiverAction::SendFrame(Frame::Announced {
                        transfer_id,
                        taken: false,
                    }));
            }
        }
    }

    /// The caller did not take the last announcement of `transfer_id` (after
    /// [`ReceiverAction::Stage`]) and answered so: the sender announces nothing more, and a
    /// further announcement is a protocol error.
    pub fn announcement_not_taken(&mut self, transfer_id: TransferId) {
        self.announced = Some((transfer_id, None));
    }

    fn offer(&mut self, manifest_bytes: Bytes, signature: Bytes) -> Result<(), ProtoError> {
        if let Some((m, s)) = &self.offer {
            if *m == manifest_bytes && *s == signature {
                return Ok(());
            }
            return self.fail(ProtoError::Conflicting { what: "Offer" });
        }
        let manifest = match Manifest::from_bytes(&manifest_bytes, &self.limits) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                // Structural faults inside the manifest are manifest faults.
                let code = match e.code() {
                    ErrorCode::BadFrame => ErrorCode::BadManifest,
                    c => c,
                };
                return self.fail_with(e, Some(code));
            }
        };
        let n = manifest.chunk_count();
        self.good = ChunkSet::new(n);
        self.arriving = ChunkSet::new(n);
        self.offer = Some((manifest_bytes.clone(), signature.clone()));
        self.manifest = Some(manifest.clone());
        self.state = State::Verifying;
        self.actions.push_back(ReceiverAction::VerifyOffer {
            manifest,
            manifest_bytes,
            signature,
        });
        Ok(())
    }

    /// The caller accepted the offer and holds the chunks in `have` (an empty
    /// set for a new transfer; `have.len()` must be the manifest's chunk
    /// count): those it holds durably, and any it verified against this
    /// manifest on the way and will make durable before the commit (chunks
    /// staged under an `Announce`). Sends `Have`; if nothing is missing, asks
    /// to commit.
    pub fn offer_accepted(&mut self, have: ChunkSet) {
        match self.state {
            State::Verifying => {}
            State::Failed => return,
            _ => {
                let _ = self.fail(ProtoError::Misuse {
                    what: "offer_accepted without an offer being verified",
                });
                return;
            }
        }
        let Some(manifest) = self.manifest.clone() else {
            return;
        };
        if have.len() != manifest.chunk_count() {
            let _ = self.fail(ProtoError::Misuse {
                what: "offer_accepted with a have-set of the wrong size",
            });
            return;
        }
        self.actions
            .push_back(ReceiverAction::SendFrame(Frame::have(
                manifest.transfer_id,
                &have,
            )));
        self.good = have;
        self.state = State::Receiving;
        self.commit_if_complete();
    }

    /// The caller refused the offer (bad signature, policy, no space): sends
    /// `Error { code, text }` and fails.
    pub fn offer_refused(&mut self, code: ErrorCode, text: impl Into<String>) {
        if self.state != State::Failed {
            let text = text.into();
            let _ = self.fail(ProtoError::Local { code, text });
        }
    }

    /// Validates a data stream's header before its bytes are read: the
    /// transfer, the index, the length, and that the chunk is wanted.
    /// Returns where to write the bytes.
    ///
    /// - [`ProtoError::Duplicate`]: the chunk is already good; discard the
    ///   stream silently.
    /// - [`ProtoError::ChunkBusy`]: another stream is delivering this chunk;
    ///   stop this stream (the sender resends if it must).
    /// - Anything else is the peer breaking the protocol: the transfer has
    ///   failed (an `Error` frame and `Failed` are queued).
    pub fn chunk_header(&mut self, header: &ChunkHeader) -> Result<ChunkLocation, ProtoError> {
        let index = header.index;
        let manifest = match (self.state, &self.manifest) {
            (State::Failed, _) => return Err(ProtoError::UnexpectedChunk { index }),
            (State::Receiving | State::Committing | State::Committed, Some(m)) => m.clone(),
            _ => {
                self.fail(ProtoError::UnexpectedChunk { index })?;
                return Err(ProtoError::UnexpectedChunk { index });
            }
        };
        if header.transfer_id != manifest.transfer_id {
            let err = ProtoError::UnknownTransfer {
                expected: manifest.transfer_id,
                got: header.transfer_id,
            };
            self.fail(err.clone())?;
            return Err(err);
        }
        let Some(location) = manifest.chunk(index) else {
            let err = ProtoError::ChunkIndexOutOfRange {
                index,
                count: manifest.chunk_count(),
            };
            self.fail(err.clone())?;
            return Err(err);
        };
        if header.len != location.len {
            let err = ProtoError::ChunkLenMismatch {
                index,
                expected: location.len,
                got: header.len,
            };
            self.fail(err.clone())?;
            return Err(err);
        }
        if self.good.contains(index) {
            return Err(ProtoError::Duplicate { index });
        }
        if !self.arriving.insert(index) {
            return Err(ProtoError::ChunkBusy { index });
        }
        Ok(location)
    }

    /// The stream for chunk `index` ended before all its bytes arrived (reset
    /// or connection trouble): the chunk is no longer arriving.
    pub fn chunk_aborted(&mut self, index: u32) {
        self.arriving.remove(index);
    }

    /// This side reset the stream for chunk `index` (it stalled). The sender may already
    /// have written the whole chunk and would then wait for a verdict forever, so it is told
    /// to send the chunk again (`ChunkBad` with `reason`), within the retry limit like a
    /// digest mismatch.
    pub fn chunk_reset(&mut self, index: u32, reason: &str) {
        self.arriving.remove(index);
        if self.state != State::Receiving || self.good.contains(index) {
            return;
        }
        self.resend(index, reason);
    }

    /// All of chunk `index` arrived and its bytes hash to `digest`. Sends
    /// `ChunkOk` if that is the manifest's digest, else `ChunkBad` (the
    /// sender resends) or, past the retry limit, fails. A chunk already good
    /// is left alone.
    pub fn chunk_received(&mut self, index: u32, digest: Digest) {
        self.arriving.remove(index);
        if self.state != State::Receiving || self.good.contains(index) {
            return;
        }
        let Some(expected) = self.manifest.as_ref().and_then(|m| m.chunk_digest(index)) else {
            return;
        };
        if *expected == digest {
            self.good.insert(index);
            self.actions
                .push_back(ReceiverAction::SendFrame(Frame::ChunkOk { index }));
            self.commit_if_complete();
            return;
        }
        self.resend(index, "digest mismatch");
    }

    /// Asks the sender for chunk `index` again (`ChunkBad`), or fails past the retry limit.
    fn resend(&mut self, index: u32, reason: &str) {
        let failures = self.failures.entry(index).or_insert(0);
        *failures += 1;
        if *failures > self.cfg.max_chunk_retries {
            let err = ProtoError::TooManyRetries {
                index,
                attempts: *failures,
                limit: self.cfg.max_chunk_retries,
                last: reason.into(),
            };
            let _ = self.fail(err);
            return;
        }
        self.actions
            .push_back(ReceiverAction::SendFrame(Frame::ChunkBad {
                index,
                reason: reason.into(),
            }));
    }

    /// The commit is durable and `receipt` is signed: sends the receipt.
    pub fn committed(&mut self, receipt: Bytes, signature: Bytes) {
        match self.state {
            State::Committing => {
                self.state = State::Committed;
                self.actions
                    .push_back(ReceiverAction::SendFrame(Frame::Receipt {
                        receipt,
                        signature,
                    }));
            }
            State::Failed => {}
            _ => {
                let _ = self.fail(ProtoError::Misuse {
                    what: "committed before Commit was asked for",
                });
            }
        }
    }

    /// Stops the transfer from this side (commit failed, no space, shutting
    /// down): sends `Error { code, text }` and fails.
    pub fn abort(&mut self, code: ErrorCode, text: impl Into<String>) {
        if self.state != State::Failed {
            let text = text.into();
            let _ = self.fail(ProtoError::Local { code, text });
        }
    }

    fn commit_if_complete(&mut self) {
        if self.state == State::Receiving && self.good.is_full() {
            self.state = State::Committing;
            self.actions.push_back(ReceiverAction::Commit);
        }
    }

    fn fail(&mut self, err: ProtoError) -> Result<(), ProtoError> {
        self.fail_with(err, None)
    }

    fn fail_with(&mut self, err: ProtoError, code: Option<ErrorCode>) -> Result<(), ProtoError> {
        self.state = State::Failed;
        let text = match &err {
            ProtoError::Local { text, .. } => text.clone(),
            other => other.to_string(),
        };
        self.actions
            .push_back(ReceiverAction::SendFrame(Frame::Error {
                code: code.unwrap_or_else(|| err.code()),
                text: truncate_str(&text, MAX_SENT_TEXT_LEN).to_owned(),
            }));
        self.actions.push_back(ReceiverAction::Failed(err.clone()));
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifest::tests::build;
    use super::super::{TransferId, sha256};
    use super::*;

    fn drain(r: &mut Receiver) -> Vec<ReceiverAction> {
        std::iter::from_fn(|| r.poll_action()).collect()
    }

    fn offered(
        sizes: &[u64],
        cs: u32,
        cfg: ReceiverConfig,
    ) -> (Receiver, Arc<Manifest>, Vec<Vec<u8>>) {
        let (m, data) = build(sizes, cs);
        let mut r = Receiver::new(Limits::default(), cfg);
        r.handle_frame(Frame::Offer {
            manifest: m.to_bytes().into(),
            signature: Bytes::from_static(b"sig"),
        })
        .unwrap();
        let actions = drain(&mut r);
        let manifest = match &actions[..] {
            [
                ReceiverAction::VerifyOffer {
                    manifest,
                    signature,
                    ..
                },
            ] => {
                assert_eq!(signature.as_ref(), b"sig");
                manifest.clone()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(*manifest, m);
        (r, manifest, data)
    }

    fn header(m: &Manifest, index: u32) -> ChunkHeader {
        ChunkHeader {
            transfer_id: m.transfer_id,
            index,
            len: m.chunk(index).map_or(0, |c| c.len),
        }
    }

    fn announce(id: TransferId, chunk_size: u32, sizes: &[u64]) -> Frame {
        Frame::Announce {
            transfer_id: id,
            chunk_size,
            file_sizes: sizes.to_vec(),
        }
    }

    fn more(id: TransferId, first_file: u32, sizes: &[u64]) -> Frame {
        Frame::AnnounceMore {
            transfer_id: id,
            first_file,
            file_sizes: sizes.to_vec(),
        }
    }

    #[test]
    fn an_announcement_grows_at_its_end_before_the_offer_and_is_refused_after_it() {
        let (m, _) = build(&[6, 0, 3], 4);
        let id = m.transfer_id;
        let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
        r.handle_frame(announce(id, 4, &[6])).unwrap();
        r.handle_frame(more(id, 1, &[0, 3])).unwrap();
        assert_eq!(
            drain(&mut r),
            vec![
                ReceiverAction::Stage {
                    transfer_id: id,
                    layout: Layout::new(4, vec![6], &Limits::default()).unwrap(),
                    extends: false,
                },
                ReceiverAction::Stage {
                    transfer_id: id,
                    layout: Layout::of(&m),
                    extends: true,
                }
            ]
        );
        r.handle_frame(Frame::Offer {
            manifest: m.to_bytes().into(),
            signature: Bytes::from_static(b"sig"),
        })
        .unwrap();
        assert!(matches!(
            &drain(&mut r)[..],
            [ReceiverAction::VerifyOffer { .. }]
        ));
        // Once the offer is in, an announcement is out of place.
        assert!(matches!(
            r.handle_frame(more(id, 3, &[1])),
            Err(ProtoError::UnexpectedFrame {
                frame: "AnnounceMore",
                ..
            })
        ));

        // A second announcement, more files of another transfer, or more files that leave a
        // gap conflict with the first; so do more files of nothing announced.
        for (wrong, what) in [
            (announce(id, 4, &[6]), "Announce"),
            (more(TransferId([9; 16]), 1, &[1]), "AnnounceMore"),
            (more(id, 2, &[1]), "AnnounceMore"),
            (more(id, 0, &[1]), "AnnounceMore"),
        ] {
            let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
            r.handle_frame(announce(id, 4, &[6])).unwrap();
            let err = r.handle_frame(wrong).unwrap_err();
            assert!(matches!(err, ProtoError::Conflicting { what: w } if w == what));
            assert!(r.is_failed());
        }
        let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
        let err = r.handle_frame(more(id, 0, &[6])).unwrap_err();
        assert!(matches!(err, ProtoError::Conflicting { .. }));
    }

    #[test]
    fn an_announcement_over_the_limits_is_answered_not_taken_and_nothing_more_is_announced() {
        let limits = Limits {
            max_files: 2,
            max_chunks: 4,
            ..Limits::default()
        };
        let id = TransferId([3; 16]);
        let not_taken = ReceiverAction::SendFrame(Frame::Announced {
            transfer_id: id,
            taken: false,
        });
        for over in [
            announce(id, 4, &[1, 1, 1]),
            announce(id, 4, &[17]),
            announce(id, 0, &[1]),
            announce(id, 4, &[]),
        ] {
            let mut r = Receiver::new(limits, ReceiverConfig::default());
            r.handle_frame(over).unwrap();
            assert_eq!(drain(&mut r), vec![not_taken.clone()]);
            assert!(!r.is_failed());
            // After a refusal the sender announces nothing more.
            assert!(r.handle_frame(more(id, 1, &[1])).is_err());
        }
        // Growing past the limits is not taken either, and ends the announcing.
        let mut r = Receiver::new(limits, ReceiverConfig::default());
        r.handle_frame(announce(id, 4, &[8])).unwrap();
        r.handle_frame(more(id, 1, &[9])).unwrap();
        let actions = drain(&mut r);
        assert!(matches!(
            actions[0],
            ReceiverAction::Stage { extends: false, .. }
        ));
        assert_eq!(actions[1], not_taken);
        assert!(r.handle_frame(more(id, 1, &[8])).is_err());

        // More files than a receiver holds open for one transfer are not taken either.
        let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
        r.handle_frame(announce(id, 4, &vec![1; MAX_ANNOUNCED_FILES]))
            .unwrap();
        r.handle_frame(more(id, MAX_ANNOUNCED_FILES as u32, &[1]))
            .unwrap();
        assert_eq!(drain(&mut r)[1], not_taken);

        // The caller not taking an announcement ends it the same way.
        let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
        r.handle_frame(announce(id, 4, &[8])).unwrap();
        r.announcement_not_taken(id);
        assert!(r.handle_frame(more(id, 1, &[1])).is_err());
    }

    #[test]
    fn good_chunks_then_commit_then_receipt() {
        let (mut r, m, data) = offered(&[6, 0, 3], 4, ReceiverConfig::default());
        r.offer_accepted(ChunkSet::new(3));
        assert_eq!(
            drain(&mut r),
            vec![ReceiverAction::SendFrame(Frame::have(
                m.transfer_id,
                &ChunkSet::new(3)
            ))]
        );
        for i in 0..3 {
            let loc = r.chunk_header(&header(&m, i)).unwrap();
            let bytes = &data[loc.file][loc.offset as usize..][..loc.len as usize];
            r.chunk_received(i, sha256(bytes));
        }
        assert_eq!(
            drain(&mut r),
            vec![
                ReceiverAction::SendFrame(Frame::ChunkOk { index: 0 }),
                ReceiverAction::SendFrame(Frame::ChunkOk { index: 1 }),
                ReceiverAction::SendFrame(Frame::ChunkOk { index: 2 }),
                ReceiverAction::Commit,
            ]
        );
        assert!(matches!(
            r.chunk_header(&header(&m, 1)),
            Err(ProtoError::Duplicate { index: 1 })
        ));
        r.committed(Bytes::from_static(b"receipt"), Bytes::from_static(b"sig"));
        assert_eq!(
            drain(&mut r),
            vec![ReceiverAction::SendFrame(Frame::Receipt {
                receipt: Bytes::from_static(b"receipt"),
                signature: Bytes::from_static(b"sig")
            })]
        );
        assert!(r.is_committed());
    }

    #[test]
    fn a_bad_digest_is_never_good_and_is_rerequested_within_limits() {
        let (mut r, m, _) = offered(
            &[4],
            4,
            ReceiverConfig {
                max_chunk_retries: 1,
            },
        );
        r.offer_accepted(ChunkSet::new(1));
        drain(&mut r);
        r.chunk_header(&header(&m, 0)).unwrap();
        r.chunk_received(0, [0; 32]);
        assert_eq!(
            drain(&mut r),
            vec![ReceiverAction::SendFrame(Frame::ChunkBad {
                index: 0,
                reason: "digest mismatch".into()
            })]
        );
        assert!(!r.good().contains(0));
        r.chunk_header(&header(&m, 0)).unwrap();
        r.chunk_received(0, [0; 32]);
        let actions = drain(&mut r);
        assert!(matches!(
            &actions[..],
            [
                ReceiverAction::SendFrame(Frame::Error {
                    code: ErrorCode::TooManyRetries,
                    ..
                }),
                ReceiverAction::Failed(ProtoError::TooManyRetries {
                    index: 0,
                    attempts: 2,
                    limit: 1,
                    ..
                })
            ]
        ));
        assert_eq!(r.good().count(), 0);
    }

    #[test]
    fn a_full_have_set_commits_at_once() {
        let (mut r, _, _) = offered(&[9], 4, ReceiverConfig::default());
        r.offer_accepted(ChunkSet::full(3));
        let actions = drain(&mut r);
        assert!(matches!(
            &actions[..],
            [
                ReceiverAction::SendFrame(Frame::Have { .. }),
                ReceiverAction::Commit
            ]
        ));
    }

    #[test]
    fn a_chunk_arriving_twice_at_once_is_busy() {
        let (mut r, m, _) = offered(&[9], 4, ReceiverConfig::default());
        r.offer_accepted(ChunkSet::new(3));
        r.chunk_header(&header(&m, 1)).unwrap();
        assert_eq!(
            r.chunk_header(&header(&m, 1)),
            Err(ProtoError::ChunkBusy { index: 1 })
        );
        r.chunk_aborted(1);
        r.chunk_header(&header(&m, 1)).unwrap();
        assert!(!r.is_failed());
    }

    #[test]
    fn a_reset_chunk_is_asked_for_again_and_may_then_arrive() {
        let (mut r, m, data) = offered(&[4], 4, ReceiverConfig::default());
        r.offer_accepted(ChunkSet::new(1));
        drain(&mut r);
        r.chunk_header(&header(&m, 0)).unwrap();
        r.chunk_reset(0, "stalled");
        assert_eq!(
            drain(&mut r),
            vec![ReceiverAction::SendFrame(Frame::ChunkBad {
                index: 0,
                reason: "stalled".into()
            })]
        );
        // No longer arriving: the resend is taken, not refused as busy.
        r.chunk_header(&header(&m, 0)).unwrap();
        r.chunk_received(0, sha256(&data[0]));
        assert!(matches!(
            &drain(&mut r)[..],
            [
                ReceiverAction::SendFrame(Frame::ChunkOk { index: 0 }),
                ReceiverAction::Commit
            ]
        ));
    }

    #[test]
    fn bad_headers_fail_the_transfer() {
        let (m, _) = build(&[9], 4);
        type Check = fn(&ProtoError) -> bool;
        let cases: Vec<(ChunkHeader, Check)> = vec![
            (
                ChunkHeader {
                    transfer_id: TransferId([1; 16]),
                    index: 0,
                    len: 4,
                },
                |e| matches!(e, ProtoError::UnknownTransfer { .. }),
            ),
            (
                ChunkHeader {
                    transfer_id: m.transfer_id,
                    index: 3,
                    len: 4,
                },
                |e| matches!(e, ProtoError::ChunkIndexOutOfRange { index: 3, count: 3 }),
            ),
            (
                ChunkHeader {
                    transfer_id: m.transfer_id,
                    index: 2,
                    len: 4,
                },
                |e| {
                    matches!(
                        e,
                        ProtoError::ChunkLenMismatch {
                            index: 2,
                            expected: 1,
                            got: 4
                        }
                    )
                },
            ),
        ];
        for (h, check) in cases {
            let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
            r.handle_frame(Frame::Offer {
                manifest: m.to_bytes().into(),
                signature: Bytes::new(),
            })
            .unwrap();
            r.offer_accepted(ChunkSet::new(3));
            drain(&mut r);
            let err = r.chunk_header(&h).unwrap_err();
            assert!(check(&err), "{err:?}");
            assert!(r.is_failed());
            let actions = drain(&mut r);
            assert!(matches!(actions.last(), Some(ReceiverAction::Failed(_))));
        }
        // A chunk before the offer was accepted.
        let (mut r, m, _) = offered(&[9], 4, ReceiverConfig::default());
        assert!(matches!(
            r.chunk_header(&header(&m, 0)),
            Err(ProtoError::UnexpectedChunk { .. })
        ));
        assert!(r.is_failed());
    }

    #[test]
    fn bad_offers_are_refused_with_a_manifest_code() {
        let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
        assert!(
            r.handle_frame(Frame::Offer {
                manifest: Bytes::from_static(b"BLMF"),
                signature: Bytes::new()
            })
            .is_err()
        );
        let actions = drain(&mut r);
        assert!(
            matches!(
                &actions[..],
                [
                    ReceiverAction::SendFrame(Frame::Error {
                        code: ErrorCode::BadManifest,
                        ..
                    }),
                    ReceiverAction::Failed(_)
                ]
            ),
            "{actions:?}"
        );

        let (m, _) = build(&[9, 9, 9], 4);
        let mut r = Receiver::new(
            Limits {
                max_files: 2,
                ..Limits::default()
            },
            ReceiverConfig::default(),
        );
        assert!(
            r.handle_frame(Frame::Offer {
                manifest: m.to_bytes().into(),
                signature: Bytes::new()
            })
            .is_err()
        );
        assert!(matches!(
            drain(&mut r)[0],
            ReceiverAction::SendFrame(Frame::Error {
                code: ErrorCode::TooManyFiles,
                ..
            })
        ));
    }

    #[test]
    fn offers_repeat_idempotently_but_may_not_change() {
        let (mut r, m, _) = offered(&[9], 4, ReceiverConfig::default());
        r.handle_frame(Frame::Offer {
            manifest: m.to_bytes().into(),
            signature: Bytes::from_static(b"sig"),
        })
        .unwrap();
        assert!(drain(&mut r).is_empty());
        assert!(matches!(
            r.handle_frame(Frame::Offer {
                manifest: m.to_bytes().into(),
                signature: Bytes::from_static(b"other")
            }),
            Err(ProtoError::Conflicting { what: "Offer" })
        ));
    }

    #[test]
    fn refusal_and_peer_errors() {
        let (mut r, _, _) = offered(&[9], 4, ReceiverConfig::default());
        r.offer_refused(
            ErrorCode::BadSignature,
            "manifest signature does not verify",
        );
        assert_eq!(
            drain(&mut r),
            vec![
                ReceiverAction::SendFrame(Frame::Error {
                    code: ErrorCode::BadSignature,
                    text: "manifest signature does not verify".into()
                }),
                ReceiverAction::Failed(ProtoError::Local {
                    code: ErrorCode::BadSignature,
                    text: "manifest signature does not verify".into()
                }),
            ]
        );
        // Calls after failing are harmless.
        r.offer_accepted(ChunkSet::new(3));
        r.chunk_received(0, [0; 32]);
        assert!(drain(&mut r).is_empty());

        let (mut r, _, _) = offered(&[9], 4, ReceiverConfig::default());
        let err = r
            .handle_frame(Frame::Error {
                code: ErrorCode::ShuttingDown,
                text: "bye".into(),
            })
            .unwrap_err();
        assert_eq!(
            err,
            ProtoError::Peer {
                code: ErrorCode::ShuttingDown,
                text: "bye".into()
            }
        );
        assert_eq!(drain(&mut r), vec![ReceiverAction::Failed(err)]);
    }

    #[test]
    fn misuse_is_reported_not_ignored() {
        let mut r = Receiver::new(Limits::default(), ReceiverConfig::default());
        r.offer_accepted(ChunkSet::new(0));
        assert!(matches!(
            drain(&mut r).last(),
            Some(ReceiverAction::Failed(ProtoError::Misuse { .. }))
        ));
        let (mut r, _, _) = offered(&[9], 4, ReceiverConfig::default());
        r.offer_accepted(ChunkSet::new(2));
        assert!(matches!(
            drain(&mut r).last(),
            Some(ReceiverAction::Failed(ProtoError::Misuse { .. }))
        ));
    }
}
