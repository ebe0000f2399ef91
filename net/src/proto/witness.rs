//! The audit-log witness exchange: the edge asks ([`WitnessAsker`]), the gateway answers
//! ([`WitnessAnswerer`]).
//!
//! ```text
//! edge                                       gateway
//!   Witness{version, checkpoint,       ──▶  Cosign → caller checks the checkpoint against
//!           old_size, proof}                the one it cosigned last, cosigns
//!                                      ◀──  Cosigned{version, signature} | Error{code, text}
//! ```
//!
//! The exchange has a control stream of its own, opened with `Witness` and carrying nothing
//! else. The witness's refusals travel as `Error` frames: [`ErrorCode::BadSignature`] (the
//! checkpoint is malformed or not signed by the pinned edge key) and [`ErrorCode::Refused`]
//! (it does not extend the checkpoint cosigned last: a rewound or forked log) refuse the
//! log; any other code is the witness failing to answer, and asking again may help.
//!
//! Checking and cosigning the checkpoint, storing the cosignature and the stream itself are
//! the callers'.

use std::collections::VecDeque;

use super::wire::truncate_str;
use super::{Digest, ErrorCode, Frame, MAX_SENT_TEXT_LEN, ProtoError, WITNESS_VERSION};

/// Whether an `Error` answering `Witness` with `code` is the witness refusing the log (the
/// same checkpoint gets the same answer), not the witness failing to answer.
pub fn is_witness_refusal(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Refused | ErrorCode::BadSignature)
}

/// What the caller of a [`WitnessAsker`] must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessAskerAction {
    /// Write this frame (the `Witness` request) to the stream.
    SendFrame(Frame),
    /// The witness cosigned: one signed-note signature line. The caller verifies it against
    /// the witness's key before storing it. Nothing follows.
    Cosigned {
        /// The cosignature line (without its newline).
        signature: String,
    },
    /// The witness refused the log ([`is_witness_refusal`]). Nothing follows.
    Refused {
        /// [`ErrorCode::Refused`] or [`ErrorCode::BadSignature`].
        code: ErrorCode,
        /// The witness's reason.
        text: String,
    },
    /// The exchange failed otherwise: the witness could not answer
    /// ([`ProtoError::Peer`]) or broke the protocol. Nothing is sent back; the caller ends
    /// the stream. Nothing follows.
    Failed(ProtoError),
}

/// The edge's side of one witness exchange.
///
/// Its first action sends the `Witness` request; feed it the answer
/// ([`WitnessAsker::handle_frame`]) and carry out what [`WitnessAsker::poll_action`]
/// returns. Frames after the answer are ignored.
#[derive(Debug)]
pub struct WitnessAsker {
    finished: bool,
    actions: VecDeque<WitnessAskerAction>,
}

impl WitnessAsker {
    /// Asks the witness to cosign `checkpoint` (a signed note), consistent by `proof` with
    /// the checkpoint of tree size `old_size` it cosigned last (0 for the first).
    pub fn new(checkpoint: String, old_size: u64, proof: Vec<Digest>) -> Self {
        let mut actions = VecDeque::new();
        actions.push_back(WitnessAskerAction::SendFrame(Frame::Witness {
            version: WITNESS_VERSION,
            checkpoint,
            old_size,
            proof,
        }));
        Self {
            finished: false,
            actions,
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<WitnessAskerAction> {
        self.actions.pop_front()
    }

    /// Whether the answer was handled (`Cosigned`, `Refused` or `Failed` queued).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Handles the witness's answer. On `Err` the log was not cosigned: the queued action
    /// says whether it was refused ([`ProtoError::Peer`] with a refusal code) or the exchange
    /// failed.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtoError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        match frame {
            Frame::Cosigned { version, signature } => {
                if version != WITNESS_VERSION {
                    return self.fail(ProtoError::UnsupportedVersion {
                        what: "witness frame",
                        version: u16::from(version),
                        supported: u16::from(WITNESS_VERSION),
                    });
                }
                self.actions
                    .push_back(WitnessAskerAction::Cosigned { signature });
                Ok(())
            }
            Frame::Error { code, text } if is_witness_refusal(code) => {
                self.actions.push_back(WitnessAskerAction::Refused {
                    code,
                    text: text.clone(),
                });
                Err(ProtoError::Peer { code, text })
            }
            Frame::Error { code, text } => self.fail(ProtoError::Peer { code, text }),
            other => self.fail(ProtoError::UnexpectedFrame {
                frame: other.kind(),
                state: "waiting for the witness's answer",
            }),
        }
    }

    fn fail(&mut self, err: ProtoError) -> Result<(), ProtoError> {
        self.actions
            .push_back(WitnessAskerAction::Failed(err.clone()));
        Err(err)
    }
}

/// What the caller of a [`WitnessAnswerer`] must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessAnswererAction {
    /// A well-formed request arrived. Check that `checkpoint` is signed by the asking edge's
    /// pinned key and extends, by `proof`, the checkpoint of size `old_size` cosigned last;
    /// cosign it and make that durable; then call [`WitnessAnswerer::cosigned`] or
    /// [`WitnessAnswerer::cosign_refused`].
    Cosign {
        /// The edge's signed checkpoint note.
        checkpoint: String,
        /// Tree size of the checkpoint the edge says was cosigned last.
        old_size: u64,
        /// RFC 6962 consistency proof from `old_size` to the checkpoint's size.
        proof: Vec<Digest>,
    },
    /// Write this frame to the stream.
    SendFrame(Frame),
    /// The exchange stopped without a cosignature. Any `Error` frame to tell the peer was
    /// queued before this. Nothing follows.
    Failed(ProtoError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswererState {
    AwaitWitness,
    /// `Cosign` queued; waiting for the caller's result.
    Cosigning,
    /// `Cosigned` queued.
    Answered,
    /// `Failed` queued.
    Failed,
}

impl AnswererState {
    fn describe(self) -> &'static str {
        match self {
            AnswererState::AwaitWitness => "waiting for a Witness",
            AnswererState::Cosigning => "cosigning",
            AnswererState::Answered => "finished",
            AnswererState::Failed => "failed",
        }
    }
}

/// The gateway's side of one witness exchange.
///
/// Feed it the stream's frames ([`WitnessAnswerer::handle_frame`]) and the cosigning's
/// outcome, and carry out what [`WitnessAnswerer::poll_action`] returns. The first frame
/// must be `Witness`; any frame after it is answered with [`ErrorCode::UnexpectedFrame`].
#[derive(Debug)]
pub struct WitnessAnswerer {
    state: AnswererState,
    actions: VecDeque<WitnessAnswererAction>,
}

impl Default for WitnessAnswerer {
    fn default() -> Self {
        Self::new()
    }
}

impl WitnessAnswerer {
    /// An answerer waiting for the `Witness` request.
    pub fn new() -> Self {
        Self {
            state: AnswererState::AwaitWitness,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<WitnessAnswererAction> {
        self.actions.pop_front()
    }

    /// Whether the `Cosigned` answer was queued.
    pub fn is_answered(&self) -> bool {
        self.state == AnswererState::Answered
    }

    /// Whether the exchange failed.
    pub fn is_failed(&self) -> bool {
        self.state == AnswererState::Failed
    }

    /// Handles a frame from the edge. On `Err` the exchange has failed: the queued actions
    /// end with `Failed` (after an `Error` frame for the peer when the fault is the peer's).
    /// Frames after that are ignored.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtoError> {
        match (self.state, frame) {
            (AnswererState::Failed, _) => Ok(()),
            (_, Frame::Error { code, text }) => {
                let err = ProtoError::Peer { code, text };
                self.state = AnswererState::Failed;
                self.actions
                    .push_back(WitnessAnswererAction::Failed(err.clone()));
                Err(err)
            }
            (
                AnswererState::AwaitWitness,
                Frame::Witness {
                    version,
                    checkpoint,
                    old_size,
                    proof,
                },
            ) => {
                if version != WITNESS_VERSION {
                    return self.fail(ProtoError::UnsupportedVersion {
                        what: "witness frame",
                        version: u16::from(version),
                        supported: u16::from(WITNESS_VERSION),
                    });
                }
                self.state = AnswererState::Cosigning;
                self.actions.push_back(WitnessAnswererAction::Cosign {
                    checkpoint,
                    old_size,
                    proof,
                });
                Ok(())
            }
            (state, other) => self.fail(ProtoError::UnexpectedFrame {
                frame: other.kind(),
                state: state.describe(),
            }),
        }
    }

    /// The checkpoint is cosigned (and that is durable): sends `Cosigned` with the
    /// cosignature line `signature`.
    pub fn cosigned(&mut self, signature: String) {
        match self.state {
            AnswererState::Cosigning => {
                self.state = AnswererState::Answered;
                self.actions
                    .push_back(WitnessAnswererAction::SendFrame(Frame::Cosigned {
                        version: WITNESS_VERSION,
                        signature,
                    }));
            }
            AnswererState::Failed => {}
            _ => {
                let _ = self.fail(ProtoError::Misuse {
                    what: "cosigned before Cosign was asked for",
                });
            }
        }
    }

    /// The checkpoint was not cosigned (refused, see [`is_witness_refusal`], or the witness
    /// failed): sends `Error { code, text }` and fails.
    pub fn cosign_refused(&mut self, code: ErrorCode, text: impl Into<String>) {
        match self.state {
            AnswererState::Cosigning => {
                let text = text.into();
                let _ = self.fail(ProtoError::Local { code, text });
            }
            AnswererState::Failed => {}
            _ => {
                let _ = self.fail(ProtoError::Misuse {
                    what: "cosign_refused before Cosign was asked for",
                });
            }
        }
    }

    fn fail(&mut self, err: ProtoError) -> Result<(), ProtoError> {
        self.state = AnswererState::Failed;
        let text = match &err {
            ProtoError::Local { text, .. } => text.clone(),
            other => other.to_string(),
        };
        self.actions
            .push_back(WitnessAnswererAction::SendFrame(Frame::Error {
                code: err.code(),
                text: truncate_str(&text, MAX_SENT_TEXT_LEN).to_owned(),
            }));
        self.actions
            .push_back(WitnessAnswererAction::Failed(err.clone()));
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Frame {
        Frame::Witness {
            version: WITNESS_VERSION,
            checkpoint: "origin\n5\nroot\n\n— edge sig\n".into(),
            old_size: 3,
            proof: vec![[7; 32], [8; 32]],
        }
    }

    fn asker() -> WitnessAsker {
        let mut a = WitnessAsker::new(
            "origin\n5\nroot\n\n— edge sig\n".into(),
            3,
            vec![[7; 32], [8; 32]],
        );
        assert_eq!(
            drain_asker(&mut a),
            [WitnessAskerAction::SendFrame(request())]
        );
        assert!(!a.is_finished());
        a
    }

    fn drain_asker(a: &mut WitnessAsker) -> Vec<WitnessAskerAction> {
        std::iter::from_fn(|| a.poll_action()).collect()
    }

    fn drain(w: &mut WitnessAnswerer) -> Vec<WitnessAnswererAction> {
        std::iter::from_fn(|| w.poll_action()).collect()
    }

    /// An answerer that took `request()` and was asked to cosign it.
    fn cosigning() -> WitnessAnswerer {
        let mut w = WitnessAnswerer::new();
        w.handle_frame(request()).unwrap();
        assert_eq!(
            drain(&mut w),
            [WitnessAnswererAction::Cosign {
                checkpoint: "origin\n5\nroot\n\n— edge sig\n".into(),
                old_size: 3,
                proof: vec![[7; 32], [8; 32]],
            }]
        );
        w
    }

    fn sent_error(actions: &[WitnessAnswererAction]) -> (ErrorCode, &str) {
        match actions {
            [
                WitnessAnswererAction::SendFrame(Frame::Error { code, text }),
                WitnessAnswererAction::Failed(_),
            ] => (*code, text),
            other => panic!("expected an Error frame, then Failed: {other:?}"),
        }
    }

    #[test]
    fn asker_takes_the_cosignature() {
        let mut a = asker();
        a.handle_frame(Frame::Cosigned {
            version: WITNESS_VERSION,
            signature: "— gw abc".into(),
        })
        .unwrap();
        assert_eq!(
            drain_asker(&mut a),
            [WitnessAskerAction::Cosigned {
                signature: "— gw abc".into()
            }]
        );
        assert!(a.is_finished());
        // A frame after the answer changes nothing.
        a.handle_frame(Frame::Error {
            code: ErrorCode::Refused,
            text: "late".into(),
        })
        .unwrap();
        assert_eq!(drain_asker(&mut a), []);
    }

    #[test]
    fn asker_passes_a_refusal_through_with_its_code_and_text() {
        for code in [ErrorCode::Refused, ErrorCode::BadSignature] {
            let mut a = asker();
            let text = "inconsistent checkpoint refused: size 2 is below 3";
            let err = a
                .handle_frame(Frame::Error {
                    code,
                    text: text.into(),
                })
                .unwrap_err();
            assert_eq!(err.code(), code);
            assert_eq!(
                drain_asker(&mut a),
                [WitnessAskerAction::Refused {
                    code,
                    text: text.into()
                }]
            );
            assert!(a.is_finished());
        }
    }

    #[test]
    fn asker_fails_when_the_witness_cannot_answer() {
        let mut a = asker();
        let _ = a.handle_frame(Frame::Error {
            code: ErrorCode::Internal,
            text: "witness failed: disk".into(),
        });
        assert_eq!(
            drain_asker(&mut a),
            [WitnessAskerAction::Failed(ProtoError::Peer {
                code: ErrorCode::Internal,
                text: "witness failed: disk".into()
            })]
        );
    }

    #[test]
    fn asker_refuses_another_frame_and_another_version() {
        let mut a = asker();
        let err = a
            .handle_frame(Frame::NoticeAck {
                transfer_id: crate::proto::TransferId([0; 16]),
            })
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
        assert!(
            err.to_string().contains("unexpected NoticeAck frame"),
            "{err}"
        );
        assert_eq!(drain_asker(&mut a), [WitnessAskerAction::Failed(err)]);

        let mut a = asker();
        let err = a
            .handle_frame(Frame::Cosigned {
                version: WITNESS_VERSION + 1,
                signature: "— gw abc".into(),
            })
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
        assert_eq!(drain_asker(&mut a), [WitnessAskerAction::Failed(err)]);
    }

    #[test]
    fn answerer_asks_to_cosign_then_sends_the_cosignature() {
        let mut w = cosigning();
        assert!(!w.is_answered());
        w.cosigned("— gw abc".into());
        assert_eq!(
            drain(&mut w),
            [WitnessAnswererAction::SendFrame(Frame::Cosigned {
                version: WITNESS_VERSION,
                signature: "— gw abc".into()
            })]
        );
        assert!(w.is_answered() && !w.is_failed());
    }

    #[test]
    fn answerer_sends_the_cosigners_refusal_as_given() {
        let mut w = cosigning();
        w.cosign_refused(
            ErrorCode::Refused,
            "inconsistent checkpoint refused: forked",
        );
        let actions = drain(&mut w);
        assert_eq!(
            sent_error(&actions),
            (
                ErrorCode::Refused,
                "inconsistent checkpoint refused: forked"
            )
        );
        assert!(w.is_failed());
        // The cosigning's result is taken once.
        w.cosigned("— gw abc".into());
        assert_eq!(drain(&mut w), []);

        let mut w = cosigning();
        w.cosign_refused(ErrorCode::Internal, "x".repeat(MAX_SENT_TEXT_LEN + 10));
        let actions = drain(&mut w);
        let (code, text) = sent_error(&actions);
        assert_eq!(code, ErrorCode::Internal);
        assert_eq!(text.len(), MAX_SENT_TEXT_LEN);
    }

    #[test]
    fn answerer_refuses_another_version() {
        let mut w = WitnessAnswerer::new();
        let mut req = request();
        if let Frame::Witness { version, .. } = &mut req {
            *version = WITNESS_VERSION + 1;
        }
        let err = w.handle_frame(req).unwrap_err();
        let actions = drain(&mut w);
        let (code, text) = sent_error(&actions);
        assert_eq!(code, ErrorCode::UnsupportedVersion);
        assert_eq!(text, err.to_string());
        assert!(text.contains("witness frame version 2"), "{text}");
    }

    #[test]
    fn answerer_refuses_a_stream_that_does_not_open_with_witness() {
        let mut w = WitnessAnswerer::new();
        let err = w
            .handle_frame(Frame::Cosigned {
                version: WITNESS_VERSION,
                signature: "— gw abc".into(),
            })
            .unwrap_err();
        let actions = drain(&mut w);
        assert_eq!(
            sent_error(&actions),
            (
                ErrorCode::UnexpectedFrame,
                "unexpected Cosigned frame while waiting for a Witness"
            )
        );
        assert_eq!(actions[1], WitnessAnswererAction::Failed(err));
        // Nothing is cosigned after that.
        w.handle_frame(request()).unwrap();
        w.cosigned("— gw abc".into());
        assert_eq!(drain(&mut w), []);
    }

    #[test]
    fn answerer_refuses_a_frame_after_the_request() {
        // While cosigning: the cosigning's result is then dropped.
        let mut w = cosigning();
        let _ = w.handle_frame(request());
        let actions = drain(&mut w);
        assert_eq!(
            sent_error(&actions),
            (
                ErrorCode::UnexpectedFrame,
                "unexpected Witness frame while cosigning"
            )
        );
        w.cosigned("— gw abc".into());
        assert_eq!(drain(&mut w), []);

        // After the answer.
        let mut w = cosigning();
        w.cosigned("— gw abc".into());
        drain(&mut w);
        let _ = w.handle_frame(Frame::Notices {
            version: crate::proto::NOTICES_VERSION,
        });
        let actions = drain(&mut w);
        assert_eq!(
            sent_error(&actions),
            (
                ErrorCode::UnexpectedFrame,
                "unexpected Notices frame while finished"
            )
        );
    }

    #[test]
    fn answerer_stops_quietly_when_the_edge_stops() {
        let mut w = WitnessAnswerer::new();
        let err = w
            .handle_frame(Frame::Error {
                code: ErrorCode::ShuttingDown,
                text: "bye".into(),
            })
            .unwrap_err();
        assert_eq!(drain(&mut w), [WitnessAnswererAction::Failed(err)]);
        assert!(w.is_failed());
    }

    #[test]
    fn answerer_reports_misuse() {
        let mut w = WitnessAnswerer::new();
        w.cosigned("— gw abc".into());
        let actions = drain(&mut w);
        assert_eq!(sent_error(&actions).0, ErrorCode::Internal);
    }
}
