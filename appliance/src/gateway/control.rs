//! One transfer's control stream: drives the `Receiver` state machine with the frames the
//! edge sends and the events the chunk streams report, and carries out its actions (send a
//! frame, verify an offer, commit, stop). A stream that opens with `Notices` or `Witness` is
//! handed to [`crate::notice::Notices::serve_stream`] or [`super::witness`] instead.
//!
//! Owns the order of things on the stream: a refusal is recorded in the audit log before its
//! error frame goes out; a full spool pauses the transfer; a newer connection's offer for
//! the same transfer ends this one. It must not read chunk bytes (that is
//! [`super::chunks`]) nor decide what is valid (that is the state machine and
//! [`super::offer`]).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use baylink_net::proto::{ErrorCode, Frame, Manifest, ProtoError, Receiver, ReceiverAction};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::commit::{checkpoint, commit, discard};
use super::offer::accept_offer;
use super::{Active, Gateway, audit_refusal, release};
use crate::link::{FrameWriter, LinkError, spawn_frame_reader};

/// What ends one wait of the control loop.
enum Event {
    /// A frame, an error reading one, or the end of the stream (`None`).
    Frame(Option<Result<Frame, LinkError>>),
    /// A chunk stream reported to the state machine: it may have actions.
    Wake,
    /// A newer connection took the transfer over.
    Cancelled,
    /// The transfer announced on this stream has been idle too long before its offer.
    StagingIdle,
}

/// The state of one control stream.
struct Control {
    gw: Arc<Gateway>,
    conn: quinn::Connection,
    /// The edge's TLS name.
    peer: String,
    writer: FrameWriter,
    /// The state machine until the offer is accepted; afterwards it lives in `active`,
    /// shared with the chunk streams.
    receiver: Option<Receiver>,
    /// The transfer, once its offer is accepted.
    active: Option<Arc<Active>>,
    /// The transfer this stream announced, its chunks staged until the offer.
    staged: Option<Arc<super::staging::Staged>>,
    cancel_rx: Option<watch::Receiver<bool>>,
}

/// Drives one transfer's control stream.
pub(super) async fn control_stream(
    gw: Arc<Gateway>,
    conn: quinn::Connection,
    peer: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut frames = spawn_frame_reader(recv, gw.limits);
    let first = match frames.recv().await {
        // A stream that opens with `Notices` collects delivery notices; it carries nothing
        // else.
        Some(Ok(Frame::Notices { .. })) => {
            let notices = gw.notices.clone();
            notices
                .serve_stream(&peer, FrameWriter::new(send), frames)
                .await;
            return;
        }
        // audit: a stream that opens with `Witness` asks this gateway to witness the edge's
        // audit log; it carries nothing else.
        Some(Ok(request @ Frame::Witness { .. })) => {
            super::witness::serve_stream(&gw, &peer, FrameWriter::new(send), request).await;
            return;
        }
        first => first,
    };
    let mut control = Control {
        receiver: Some(Receiver::new(gw.limits, gw.receiver_cfg)),
        gw,
        conn,
        peer,
        writer: FrameWriter::new(send),
        active: None,
        staged: None,
        cancel_rx: None,
    };
    let outcome = match control.on_frame(first).await {
        Ok(ControlFlow::Continue(())) => control.run(&mut frames).await,
        Ok(ControlFlow::Break(())) => Ok(()),
        Err(e) => Err(e),
    };
    control.end(outcome).await;
}

impl Control {
    /// The loop: carry out the state machine's actions, then wait for the next event.
    async fn run(
        &mut self,
        frames: &mut mpsc::Receiver<Result<Frame, LinkError>>,
    ) -> Result<(), LinkError> {
        loop {
            if self.carry_out_actions().await?.is_break() {
                return Ok(());
            }
            if self.pause_if_spool_full().await?.is_break() {
                return Ok(());
            }
            match self.next_event(frames).await {
                Event::Frame(frame) => {
                    if self.on_frame(frame).await?.is_break() {
                        return Ok(());
                    }
                }
                Event::Wake => {}
                Event::StagingIdle => {
                    if let Some(staged) = self.staged.take() {
                        info!(idle = ?super::staging::IDLE_LIMIT, "announced transfer idle before its offer: staged chunks thrown away");
                        super::staging::discard(&self.gw, &staged).await;
                    }
                }
                Event::Cancelled => {
                    info!("taken over by a newer connection for the same transfer");
                    return Ok(());
                }
            }
        }
    }

    /// The next action, from the local receiver before the offer, from the shared one after.
    fn poll_action(&mut self) -> Option<ReceiverAction> {
        match (&mut self.receiver, &self.active) {
            (Some(r), _) => r.poll_action(),
            (None, Some(a)) => a
                .receiver
                .lock()
                .expect("receiver lock poisoned")
                .poll_action(),
            (None, None) => None,
        }
    }

    /// Carries out every queued action; `Break` when the stream is done.
    async fn carry_out_actions(&mut self) -> Result<ControlFlow<()>, LinkError> {
        while let Some(action) = self.poll_action() {
            match action {
                ReceiverAction::SendFrame(frame) => self.send_frame(&frame).await?,
                ReceiverAction::Stage {
                    transfer_id,
                    layout,
                    extends,
                } => {
                    let taken = match (&self.staged, extends) {
                        (None, false) => {
                            self.staged = super::staging::announce(
                                &self.gw,
                                self.conn.stable_id(),
                                transfer_id,
                                layout,
                            )
                            .await;
                            self.staged.is_some()
                        }
                        (Some(staged), true) => {
                            super::staging::extend(&self.gw, staged, layout).await
                        }
                        // More files of an announcement this gateway did not take, or
                        // threw away since (idle).
                        _ => false,
                    };
                    if !taken && let Some(r) = &mut self.receiver {
                        r.announcement_not_taken(transfer_id);
                    }
                    // The edge streams nothing of these files before this answer, so no
                    // chunk stream can arrive before its staging is ready.
                    self.send_frame(&Frame::Announced { transfer_id, taken })
                        .await?;
                }
                ReceiverAction::VerifyOffer {
                    manifest,
                    manifest_bytes,
                    signature,
                } => {
                    self.verify_offer(manifest, &manifest_bytes, &signature)
                        .await
                }
                ReceiverAction::Commit => {
                    if self.commit().await?.is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                }
                ReceiverAction::Failed(e) => {
                    let transfer = self
                        .active
                        .as_ref()
                        .map(|a| a.manifest.transfer_id.to_string());
                    warn!(transfer = transfer.as_deref().unwrap_or("-"), error = %e, "transfer failed");
                    metrics::counter!("baylink_transfers_total", "stage" => "receive", "outcome" => "failed")
                        .increment(1);
                    if let Some(a) = &self.active {
                        discard(a).await;
                    }
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Sends a frame the state machine queued.
    async fn send_frame(&mut self, frame: &Frame) -> Result<(), LinkError> {
        // audit: an error frame during a transfer (a chunk that never verified, a frame out
        // of place) is a refusal, recorded before it goes out. Before the offer is accepted
        // the refusal is recorded where it is decided (`verify_offer`, `on_frame`), so it is
        // not recorded twice.
        if let (Frame::Error { code, text }, Some(a)) = (frame, &self.active) {
            audit_refusal(&self.gw, Some(&a.manifest), &self.peer, *code, text).await;
        }
        self.writer.send(frame).await
    }

    /// Checks the offer; on success the receiver moves into the shared transfer.
    async fn verify_offer(&mut self, manifest: Arc<Manifest>, bytes: &Bytes, signature: &Bytes) {
        let mut r = self
            .receiver
            .take()
            .expect("an offer comes before activation");
        let offered = Arc::clone(&manifest);
        let link = super::Link::Quic(self.conn.clone());
        let accepted = accept_offer(
            &self.gw,
            link,
            &self.peer,
            (manifest, bytes, signature),
            &mut self.staged,
        )
        .await;
        // Staged chunks the offer did not take are thrown away, whatever its verdict.
        if let Some(staged) = self.staged.take() {
            super::staging::discard(&self.gw, &staged).await;
        }
        match accepted {
            Ok((a, have)) => {
                r.offer_accepted(have);
                *a.receiver.lock().expect("receiver lock poisoned") = r;
                self.cancel_rx = Some(a.cancel.subscribe());
                self.active = Some(a);
            }
            Err((code, text)) => {
                warn!(%text, "offer refused");
                metrics::counter!("baylink_transfers_total", "stage" => "offer", "outcome" => "refused")
                    .increment(1);
                // audit: the refusal is recorded before the error frame is queued.
                audit_refusal(&self.gw, Some(&offered), &self.peer, code, &text).await;
                r.offer_refused(code, text);
                self.receiver = Some(r);
            }
        }
    }

    /// Commits the transfer; `Break` when the commit failed (the edge was told).
    async fn commit(&mut self) -> Result<ControlFlow<()>, LinkError> {
        let a = self
            .active
            .clone()
            .expect("commit only after an accepted offer");
        match commit(&self.gw, &a).await {
            Ok((receipt, sig)) => {
                a.receiver
                    .lock()
                    .expect("receiver lock poisoned")
                    .committed(receipt, sig);
                Ok(ControlFlow::Continue(()))
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "commit failed");
                // A fault of the gateway (I/O, HSM, audit) is retried by the edge; a file
                // this spool cannot hold is refused, recorded first.
                let code = super::storage_code_of(&e);
                let text = format!("commit failed: {e:#}");
                if !code.is_retryable() {
                    audit_refusal(&self.gw, Some(&a.manifest), &self.peer, code, &text).await;
                }
                self.writer.send(&Frame::Error { code, text }).await?;
                Ok(ControlFlow::Break(()))
            }
        }
    }

    /// A chunk write found the spool full: tell the edge to retry later and end.
    async fn pause_if_spool_full(&mut self) -> Result<ControlFlow<()>, LinkError> {
        let Some(a) = &self.active else {
            return Ok(ControlFlow::Continue(()));
        };
        if !a.no_space.swap(false, Ordering::SeqCst) {
            return Ok(ControlFlow::Continue(()));
        }
        warn!(transfer = %a.manifest.transfer_id,
              "spool is full: transfer paused; the edge retries and it resumes once space is freed");
        metrics::counter!("baylink_transfers_total", "stage" => "receive", "outcome" => "paused_no_space")
            .increment(1);
        self.writer
            .send(&Frame::Error {
                code: ErrorCode::NoSpace,
                text: "gateway spool is full: transfer paused, retry later".into(),
            })
            .await?;
        Ok(ControlFlow::Break(()))
    }

    /// Waits for a frame, a chunk stream's report or a take-over.
    async fn next_event(&mut self, frames: &mut mpsc::Receiver<Result<Frame, LinkError>>) -> Event {
        let active = self.active.as_ref();
        let cancel_rx = self.cancel_rx.as_mut();
        let wake = async {
            match active {
                Some(a) => a.wake.notified().await,
                None => std::future::pending().await,
            }
        };
        let cancelled = async {
            match cancel_rx {
                Some(rx) => {
                    let _ = rx.wait_for(|c| *c).await;
                }
                None => std::future::pending().await,
            }
        };
        let staged = self.staged.clone();
        let idle = async {
            match staged {
                Some(s) => s.idle().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            frame = frames.recv() => Event::Frame(frame),
            () = wake => Event::Wake,
            () = cancelled => Event::Cancelled,
            () = idle => Event::StagingIdle,
        }
    }

    /// Hands a frame to the state machine; `Break` when the stream is done.
    async fn on_frame(
        &mut self,
        frame: Option<Result<Frame, LinkError>>,
    ) -> Result<ControlFlow<()>, LinkError> {
        let committed = self.active.as_ref().is_some_and(|a| {
            a.receiver
                .lock()
                .expect("receiver lock poisoned")
                .is_committed()
        });
        let frame = match frame {
            Some(Ok(f)) => f,
            // The edge closes its side once it holds the receipt.
            Some(Err(LinkError::Lost(_))) | None if committed => {
                return Ok(ControlFlow::Break(()));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(LinkError::Lost("control stream ended".into())),
        };
        let res = match (&mut self.receiver, &self.active) {
            (Some(r), _) => r.handle_frame(frame),
            (None, Some(a)) => a
                .receiver
                .lock()
                .expect("receiver lock poisoned")
                .handle_frame(frame),
            (None, None) => Ok(()),
        };
        if let Err(e) = res {
            // The state machine queued an error frame where one is due; it goes out at the
            // top of the loop, after the refusal is recorded.
            debug!(error = %e, "frame refused");
            // An error frame from the edge is the edge stopping, not a refusal.
            if self.active.is_none() && !matches!(e, ProtoError::Peer { .. }) {
                audit_refusal(&self.gw, None, &self.peer, e.code(), &e.to_string()).await;
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// After the loop: tell the edge about a protocol error, make the verified chunks
    /// durable and release the transfer.
    async fn end(mut self, outcome: Result<(), LinkError>) {
        if let Err(e) = &outcome {
            match e {
                LinkError::Protocol(p) => {
                    // Tell the peer why, on this control stream only: other transfers on the
                    // same connection are not affected. (Closing the connection here would
                    // discard the error frame before it is sent.)
                    warn!(error = %p, "protocol error from the edge");
                    let manifest = self.active.as_ref().map(|a| &*a.manifest);
                    audit_refusal(&self.gw, manifest, &self.peer, p.code(), &p.to_string()).await;
                    let _ = self
                        .writer
                        .send(&Frame::Error {
                            code: p.code(),
                            text: p.to_string(),
                        })
                        .await;
                }
                LinkError::Lost(_) => {}
            }
            info!(error = %e, "control stream ended");
        }
        self.writer.finish();
        if let Some(staged) = self.staged.take() {
            super::staging::discard(&self.gw, &staged).await;
        }
        if let Some(a) = self.active {
            // Make what was verified durable, so a resumed transfer does not resend it.
            if !a.dir.has_receipt()
                && let Err(e) = checkpoint(&self.gw, &a).await
            {
                warn!(error = %e, "cannot checkpoint the transfer");
            }
            release(&self.gw, &a);
        }
    }
}
