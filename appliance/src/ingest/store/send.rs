//! The background sender: sealed transfers go to the gateway through
//! [`crate::edge::Edge::send_until`], at most `transport.max_transfers` at once, each on its
//! own QUIC connection; the outcome is recorded in the transfer's status. Which transfer
//! gets a free slot, and which gives one up so that a hospital's study does not wait behind
//! another hospital's large transfers, is decided by [`super::sched::Sched`]. Start-up hands
//! transfers sealed before a restart to [`IngestStore::resume`].
//!
//! What this file must not do: seal or change a transfer's files (it only reads what
//! [`super::lifecycle`] sealed), report an outcome other than through `add_stage`, or make
//! one send wait on another's outcome (a failing or retrying send holds its own slot only).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use baylink_net::proto::TransferId;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::sched::{Action, Sched};
use super::{IngestStore, TransferState, lock};
use crate::drain::Flag;
use crate::edge::{SendFailure, SendRequest};

/// The send slots: the scheduler and, for each queued or running transfer, how to give it
/// its turn and how to ask it to yield. Owns no send; the tasks of
/// [`IngestStore::send_in_background`] do.
#[derive(Debug)]
pub(super) struct SendQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug)]
struct QueueState {
    sched: Sched<TransferId>,
    turns: HashMap<TransferId, Turn>,
}

#[derive(Debug)]
struct Turn {
    /// Notified when the transfer gets a slot (a permit is kept if its task is not waiting
    /// yet).
    go: Arc<Notify>,
    /// Set to ask the running send to give its slot up; a fresh one for each turn.
    yield_slot: Flag,
}

impl SendQueue {
    /// `max` slots (`transport.max_transfers`).
    pub(super) fn new(max: usize) -> SendQueue {
        SendQueue {
            state: Mutex::new(QueueState {
                sched: Sched::new(max),
                turns: HashMap::new(),
            }),
        }
    }

    /// Queues `id` of `hospital`; `None` if it is queued or running already.
    fn push(&self, hospital: &str, id: TransferId) -> Option<Arc<Notify>> {
        let mut st = lock(&self.state);
        if st.turns.contains_key(&id) {
            return None;
        }
        let go = Arc::new(Notify::new());
        st.turns.insert(
            id,
            Turn {
                go: go.clone(),
                yield_slot: Flag::default(),
            },
        );
        let actions = st.sched.push(hospital, id);
        st.apply(actions);
        Some(go)
    }

    /// The flag that asks `id`'s current turn to yield.
    fn yield_flag(&self, id: &TransferId) -> Flag {
        lock(&self.state)
            .turns
            .get(id)
            .map(|t| t.yield_slot.clone())
            .unwrap_or_default()
    }

    /// `id`'s send ended: its slot goes to the next.
    fn done(&self, id: &TransferId) {
        let mut st = lock(&self.state);
        st.turns.remove(id);
        let actions = st.sched.done(id);
        st.apply(actions);
    }

    /// `id` gave its slot up as asked: it waits again at the head of its hospital's queue.
    fn yielded(&self, id: &TransferId) {
        let mut st = lock(&self.state);
        let actions = st.sched.yielded(id);
        st.apply(actions);
    }
}

impl QueueState {
    fn apply(&mut self, actions: Vec<Action<TransferId>>) {
        for action in actions {
            match action {
                Action::Start(id) => {
                    if let Some(turn) = self.turns.get_mut(&id) {
                        turn.yield_slot = Flag::default();
                        turn.go.notify_one();
                    }
                }
                Action::Yield(id) => {
                    if let Some(turn) = self.turns.get(&id) {
                        info!(transfer = %id, "asking a send to yield its slot to another hospital");
                        metrics::counter!("baylink_send_yields_total").increment(1);
                        turn.yield_slot.set();
                    }
                }
            }
        }
        metrics::gauge!("baylink_send_queue_transfers", "state" => "waiting")
            .set(self.sched.waiting() as f64);
        metrics::gauge!("baylink_send_queue_transfers", "state" => "running")
            .set(self.sched.running() as f64);
    }
}

impl IngestStore {
    /// Sends a transfer sealed before a restart in the background (at start-up), checking
    /// its chunks at rest first, and records the outcome in its status.
    pub fn resume(&self, id: TransferId) {
        self.send_in_background(id, true);
    }

    /// Queues sealed transfer `id` for a send slot and sends it in the background, recording
    /// the outcome in its status. `check_at_rest`: it was sealed before this process started,
    /// so its chunks are read back and checked first ([`SendRequest::Resume`]); otherwise
    /// this process hashed them on their way in moments ago ([`SendRequest::SealedHere`]).
    /// A send that yields its slot waits for another and resumes from what the gateway
    /// holds, checking what it sends again ([`SendRequest::Resume`]).
    pub(super) fn send_in_background(&self, id: TransferId, check_at_rest: bool) {
        let mut request = if check_at_rest {
            SendRequest::Resume(id)
        } else {
            SendRequest::SealedHere(id)
        };
        let store = self.clone();
        // Queued sends count for the drain as well as the running ones.
        let queued = self.inner.edge.sending().enter();
        let hospital = self.owner(&id).unwrap_or_default();
        let Some(go) = self.inner.sending.push(&hospital, id) else {
            warn!(transfer = %id, "already queued for sending");
            return;
        };
        tokio::spawn(async move {
            let _queued = queued;
            let queue = &store.inner.sending;
            loop {
                go.notified().await;
                let yield_slot = queue.yield_flag(&id);
                store.add_stage(&id, TransferState::Sending, None).await;
                // The connection its files streamed on while they arrived, if any: the
                // first turn offers on it.
                let early = store.take_stream(&id);
                let res = store
                    .inner
                    .edge
                    .send_until(
                        request.clone(),
                        early,
                        &crate::edge::NoObserver,
                        &Default::default(),
                        &yield_slot,
                    )
                    .await;
                match res {
                    Ok(summary) => {
                        info!(
                            transfer = %id,
                            wire_bytes = summary.wire_bytes,
                            transmit_seconds = summary.transmit_seconds,
                            streamed_bytes = summary.streamed_bytes,
                            seconds = summary.seconds,
                            "transfer receipted"
                        );
                        store.add_stage(&id, TransferState::Committed, None).await;
                    }
                    Err(SendFailure::Stopped) if yield_slot.is_set() && !store.edge_stopping() => {
                        // The gateway keeps what it verified; the next turn resumes from it.
                        queue.yielded(&id);
                        request = SendRequest::Resume(id);
                        continue;
                    }
                    Err(SendFailure::Stopped) => {
                        // Still sealed: the next start resumes it (its status stays `sending`).
                        info!(transfer = %id, "send stopped by the shutdown; it resumes at the next start");
                    }
                    Err(e) => {
                        warn!(transfer = %id, error = %e, "transfer not sent");
                        // `refused` is the checkpoint's answer to the declaration; a transfer
                        // the gateway refused (final: a retry cannot fix it) has `failed`,
                        // with the gateway's reason as its `error`.
                        let state = match e {
                            SendFailure::Refused(_) => TransferState::Refused,
                            _ => TransferState::Failed,
                        };
                        store.add_stage(&id, state, Some(e.to_string())).await;
                    }
                }
                queue.done(&id);
                return;
            }
        });
    }

    fn edge_stopping(&self) -> bool {
        self.inner.edge.is_stopping()
    }
}
