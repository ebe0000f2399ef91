//! The gateway as witness of the edge's audit log: a control stream that opens with
//! `Witness` drives `proto::WitnessAnswerer`, which decides what is answered (`Cosigned`, an
//! `Error` naming the refusal, or one for a frame out of place).
//!
//! Owns only the I/O and the hand-over of the answerer's `Cosign` to `audit::witness` (which
//! checks and cosigns under the log's lock) on the blocking pool. It must not touch
//! transfers: a witness stream carries nothing else.

use baylink_net::proto::{ErrorCode, Frame, WitnessAnswerer, WitnessAnswererAction};
use tracing::{debug, info, warn};

use super::Gateway;
use crate::link::FrameWriter;

/// Answers a witness stream whose first frame is `first` (the `Witness` request) from the
/// edge whose authenticated TLS name is `peer`, then finishes the stream.
pub(super) async fn serve_stream(gw: &Gateway, peer: &str, mut writer: FrameWriter, first: Frame) {
    let mut answerer = WitnessAnswerer::new();
    // A refused frame comes back as actions too (its Error frame, then Failed).
    let _ = answerer.handle_frame(first);
    while let Some(action) = answerer.poll_action() {
        match action {
            WitnessAnswererAction::Cosign {
                checkpoint,
                old_size,
                proof,
            } => match cosign(gw, peer.to_owned(), checkpoint, old_size, proof).await {
                Ok(signature) => answerer.cosigned(signature),
                Err((code, text)) => answerer.cosign_refused(code, text),
            },
            WitnessAnswererAction::SendFrame(frame) => {
                if let Err(e) = writer.send(&frame).await {
                    info!(error = %e, "witness stream ended");
                    break;
                }
            }
            WitnessAnswererAction::Failed(e) => debug!(error = %e, "witness exchange ended"),
        }
    }
    writer.finish();
}

/// Cosigns the edge's checkpoint (`peer` is its authenticated TLS name) or says why not:
/// the code and text the answerer sends.
async fn cosign(
    gw: &Gateway,
    peer: String,
    checkpoint: String,
    old_size: u64,
    proof: Vec<[u8; 32]>,
) -> Result<String, (ErrorCode, String)> {
    let witness =
        crate::audit::witness::Witness::new(gw.audit.clone(), &gw.id, gw.keys.peer().clone());
    match tokio::task::spawn_blocking(move || witness.cosign(&peer, &checkpoint, old_size, &proof))
        .await
    {
        Ok(Ok(signature)) => Ok(signature),
        Ok(Err(refusal)) => {
            warn!(error = %refusal, "audit witness refused");
            Err((refusal.code(), refusal.to_string()))
        }
        Err(e) => Err((ErrorCode::Internal, format!("witness failed: {e}"))),
    }
}
