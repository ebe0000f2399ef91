//! The background sender: sealed transfers go to the gateway one at a time, in commit order,
//! through [`crate::edge::Edge::send`]; the outcome is recorded in the transfer's status.
//! Start-up hands transfers sealed before a restart to [`IngestStore::resume`].
//!
//! What this file must not do: seal or change a transfer's files (it only reads what
//! [`super::lifecycle`] sealed), or report an outcome other than through `add_stage`.

use baylink_net::proto::TransferId;
use tracing::{info, warn};

use super::{IngestStore, TransferState};
use crate::edge::{SendFailure, SendRequest};

impl IngestStore {
    /// Sends a transfer sealed before a restart in the background (at start-up), checking
    /// its chunks at rest first, and records the outcome in its status.
    pub fn resume(&self, id: TransferId) {
        self.send_in_background(id, true);
    }

    /// Sends sealed transfer `id` in the background, one transfer at a time, recording the
    /// outcome in its status. `check_at_rest`: it was sealed before this process started,
    /// so its chunks are read back and checked first ([`SendRequest::Resume`]); otherwise
    /// this process hashed them on their way in moments ago ([`SendRequest::SealedHere`]).
    pub(super) fn send_in_background(&self, id: TransferId, check_at_rest: bool) {
        let request = if check_at_rest {
            SendRequest::Resume(id)
        } else {
            SendRequest::SealedHere(id)
        };
        let store = self.clone();
        let sending = self.inner.sending.clone();
        // Queued sends count for the drain as well as the running one.
        let queued = self.inner.edge.sending().enter();
        tokio::spawn(async move {
            let _queued = queued;
            let Ok(_turn) = sending.acquire_owned().await else {
                return;
            };
            store.add_stage(&id, TransferState::Sending, None).await;
            let res = store
                .inner
                .edge
                .send(request, false, &Default::default())
                .await;
            match res {
                Ok(summary) => {
                    info!(
                        transfer = %id,
                        wire_bytes = summary.wire_bytes,
                        transmit_seconds = summary.transmit_seconds,
                        seconds = summary.seconds,
                        "transfer receipted"
                    );
                    store.add_stage(&id, TransferState::Committed, None).await;
                }
                Err(SendFailure::Stopped) => {
                    // Still sealed: the next start resumes it (its status stays `sending`).
                    info!(transfer = %id, "send stopped by the shutdown; it resumes at the next start");
                }
                Err(e) => {
                    warn!(transfer = %id, error = %e, "transfer not sent");
                    // `refused` is the checkpoint's answer to the declaration; a transfer the
                    // gateway refused (final: a retry cannot fix it) has `failed`, with the
                    // gateway's reason as its `error`.
                    let state = match e {
                        SendFailure::Refused(_) => TransferState::Refused,
                        _ => TransferState::Failed,
                    };
                    store.add_stage(&id, state, Some(e.to_string())).await;
                }
            }
        });
    }
}
