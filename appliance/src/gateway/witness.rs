//! The gateway as witness of the edge's audit log: a control stream that opens with
//! `Witness` is answered here with `Cosigned` or an `Error` naming the refusal.
//!
//! Owns only the hand-over to `audit::witness` (which checks and cosigns under the log's
//! lock) on the blocking pool. It must not touch transfers: a witness stream carries nothing
//! else.

use baylink_net::proto::{ErrorCode, Frame};
use tracing::warn;

use super::Gateway;

/// Cosigns the edge's checkpoint (`peer` is its authenticated TLS name) or says why not:
/// the frame to send back.
pub(super) async fn answer(
    gw: &Gateway,
    peer: String,
    checkpoint: String,
    old_size: u64,
    proof: Vec<[u8; 32]>,
) -> Frame {
    let witness =
        crate::audit::witness::Witness::new(gw.audit.clone(), &gw.id, gw.keys.peer.clone());
    match tokio::task::spawn_blocking(move || witness.cosign(&peer, &checkpoint, old_size, &proof))
        .await
    {
        Ok(Ok(signature)) => Frame::Cosigned {
            version: baylink_net::proto::WITNESS_VERSION,
            signature,
        },
        Ok(Err(refusal)) => {
            warn!(error = %refusal, "audit witness refused");
            Frame::Error {
                code: refusal.code(),
                text: refusal.to_string(),
            }
        }
        Err(e) => Frame::Error {
            code: ErrorCode::Internal,
            text: format!("witness failed: {e}"),
        },
    }
}
