//! Cut-through to the gateway: an open transfer's files stream across the link while the
//! hospital is still uploading the rest, so that its commit (or the end of its C-STORE
//! association) leaves little more than the signed offer to send.
//!
//! When the first file of an open transfer is stored, a streamer dials the gateway and
//! announces the transfer with that file (`link::early`); every file stored after it is
//! announced after the ones before, in the order they were stored (which is the order the
//! manifest lists them in), and its chunks are read back from `data/` and streamed. A file
//! is stored once it is durable with its digest record and past the transfer's DICOM gate
//! (patient check, de-identification), which is what the hospital's answer waits for: only such bytes leave, and `data/` files
//! never change afterwards. When the transfer's send gets its slot, the streamer stops and
//! hands its connection to the send ([`IngestStore::take_stream`]), which offers the signed
//! manifest on it; the gateway counts a streamed chunk only where the manifest's digest
//! says so, and the send sends whatever was not streamed.
//!
//! Streaming is an optimisation, never a condition: a transfer whose streamer cannot dial,
//! is not taken by the gateway, falls behind or is one more than `transport.max_transfers`
//! streaming at once is simply sent after its commit, as before. A transfer that stores no
//! file for [`IDLE_LIMIT`] stops streaming and gives up its connection (and what the gateway
//! staged), so an open transfer a hospital leaves alone holds nothing on the link.
//! `transport.stream_while_sealing = false` turns it off.
//!
//! What this file must not do: stream a byte that is not in a stored file, or make an
//! upload, a commit or a send wait on the link (the hand-over waits at most
//! [`HANDOVER_WAIT`] for the streamer to stop, and not for chunks under way).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baylink_net::proto::{Layout, Limits, TransferId};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{IngestStore, lock};
use crate::link::early::{Announcer, Early};
use crate::link::send::SendStats;
use crate::transfer_dir::TransferDir;

/// Longest a send waits for its transfer's streamer to stop before it offers on a new
/// connection instead (a streamer still dialling a gateway that does not answer).
pub(super) const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// Longest a streamer waits for the next stored file: then it ends, and its connection
/// closes.
pub(super) const IDLE_LIMIT: Duration = Duration::from_secs(120);

/// The streamers of open transfers.
#[derive(Debug, Default)]
pub(super) struct Streams {
    by_transfer: Mutex<HashMap<TransferId, Streamer>>,
}

/// One open transfer's streaming.
#[derive(Debug)]
struct Streamer {
    /// The hospital whose transfer it is.
    hospital: String,
    /// Files stored after the first, in order: `(name, size)`.
    files: mpsc::UnboundedSender<(String, u64)>,
    announcer: Arc<Announcer>,
    /// Dials, announces and streams; ends when the files stop coming or streaming stops.
    pump: tokio::task::JoinHandle<()>,
    /// Bytes it put on the link.
    stats: Arc<SendStats>,
}

impl IngestStore {
    /// File `name` of `size` bytes, number `number` in `hospital`'s transfer `id`'s stored
    /// order, was stored: the first starts the transfer's streamer (when streaming is on and
    /// [`may_stream`] allows it), the others go to it. Called with the transfer's state
    /// locked, so that files reach the streamer in their stored order.
    pub(super) fn file_stored(
        &self,
        hospital: &str,
        id: &TransferId,
        number: usize,
        name: &str,
        size: u64,
    ) {
        let mut streams = lock(&self.inner.streams.by_transfer);
        if number > 0 {
            if let Some(s) = streams.get(id) {
                let _ = s.files.send((name.to_owned(), size));
            }
            return;
        }
        let cfg = self.inner.edge.config();
        if !cfg.transport.stream_while_sealing
            || cfg.transport.connect.is_none()
            || !may_stream(
                streams.values().map(|s| s.hospital.as_str()),
                hospital,
                cfg.transport.max_transfers,
            )
            || streams.contains_key(id)
        {
            return;
        }
        let Ok(layout) = Layout::new(cfg.transport.chunk_size, vec![size], &Limits::default())
        else {
            return;
        };
        let stats = Arc::new(SendStats::default());
        // As many unacknowledged bytes as a send keeps in flight, not the seal's larger
        // window: several open transfers stream at once, each from the spool's buffers.
        let budget = (cfg.transport.max_in_flight as u64)
            .saturating_mul(u64::from(cfg.transport.chunk_size));
        let announcer = Arc::new(Announcer::new(*id, layout, stats.clone()).with_budget(budget));
        let (files, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(run(
            self.clone(),
            *id,
            name.to_owned(),
            announcer.clone(),
            rx,
        ));
        streams.insert(
            *id,
            Streamer {
                hospital: hospital.to_owned(),
                files,
                announcer,
                pump,
                stats,
            },
        );
    }

    /// Stops transfer `id`'s streamer and gives its hand-over, for the send to offer on:
    /// the streamer gets at most [`HANDOVER_WAIT`] to stop, then the chunk streams under way
    /// end (the send waits for them within its own stops, the drain's and its slot's), and
    /// the connection comes, or `None` if there is none that can carry the offer.
    pub(super) fn take_stream(&self, id: &TransferId) -> Option<Early> {
        let s = lock(&self.inner.streams.by_transfer).remove(id)?;
        let Streamer {
            files,
            announcer,
            mut pump,
            stats,
            ..
        } = s;
        drop(files);
        announcer.stop();
        let id = *id;
        Some(Early::HandOver(Box::pin(async move {
            if tokio::time::timeout(HANDOVER_WAIT, &mut pump)
                .await
                .is_err()
            {
                info!(transfer = %id, "the streamer did not stop in time; the offer goes on a new connection");
                pump.abort();
            }
            let early = announcer.finish().await;
            info!(transfer = %id, streamed_wire_bytes = stats.wire_bytes(),
                  chunks = early.as_ref().map_or(0, |e| e.streamed.len()),
                  "streaming before the offer ended");
            early
        })))
    }

    /// Ends transfer `id`'s streaming without a send (the transfer was abandoned or
    /// expired, or will not be offered): the connection closes, and the gateway throws away
    /// what it staged.
    pub(super) fn drop_stream(&self, id: &TransferId) {
        let Some(s) = lock(&self.inner.streams.by_transfer).remove(id) else {
            return;
        };
        s.pump.abort();
        s.announcer.close();
    }

    /// Removes `announcer`'s streamer from the table, if it is still there.
    fn forget_stream(&self, id: &TransferId, announcer: &Arc<Announcer>) {
        let mut streams = lock(&self.inner.streams.by_transfer);
        if streams
            .get(id)
            .is_some_and(|s| Arc::ptr_eq(&s.announcer, announcer))
        {
            streams.remove(id);
        }
    }
}

/// Whether `hospital` may start one more streamer beside those of `streaming` (their
/// hospitals): at most `max` (`transport.max_transfers`) stream, and one hospital holds at
/// most half of them, rounded up, so that another hospital's transfer can stream beside a
/// hospital uploading many at once (when `max` is 2 or more).
fn may_stream<'a>(streaming: impl Iterator<Item = &'a str>, hospital: &str, max: usize) -> bool {
    let (mut all, mut theirs) = (0, 0);
    for h in streaming {
        all += 1;
        if h == hospital {
            theirs += 1;
        }
    }
    all < max && theirs < max.div_ceil(2)
}

/// How a streamer's pump ended.
enum PumpEnd {
    /// The files stopped coming (the send took the connection, or the transfer ended), or
    /// streaming stopped: the connection, if up, waits for the hand-over.
    Done,
    /// No file was stored for [`IDLE_LIMIT`], and no streamed chunk waits for the gateway.
    Idle,
}

/// Runs the pump, then lets go of a streamer whose connection is gone or idle, so that it
/// holds no slot.
async fn run(
    store: IngestStore,
    id: TransferId,
    first: String,
    announcer: Arc<Announcer>,
    files: mpsc::UnboundedReceiver<(String, u64)>,
) {
    let end = pump(store.clone(), id, first, announcer.clone(), files).await;
    let idle = matches!(end, PumpEnd::Idle);
    if idle || !announcer.has_link() {
        store.forget_stream(&id, &announcer);
        if idle {
            info!(transfer = %id, idle = ?IDLE_LIMIT, "no file stored for a while: streaming ended");
            announcer.close();
        }
    }
}

/// Dials the gateway, announces the transfer with its first file `first` and streams it;
/// then announces and streams each file stored after it, several at once when they came
/// while the last announcement was answered.
async fn pump(
    store: IngestStore,
    id: TransferId,
    first: String,
    announcer: Arc<Announcer>,
    mut files: mpsc::UnboundedReceiver<(String, u64)>,
) -> PumpEnd {
    let edge = &store.inner.edge;
    let spool = edge.spool().clone();
    let dir = TransferDir::new(&store.inner.spool_dir, &id);
    if !edge.announce(&announcer).await {
        return PumpEnd::Done;
    }
    let mut number = 0;
    let mut batch = vec![first];
    loop {
        for name in batch.drain(..) {
            announcer
                .stream_stored(&spool, number, &dir.data_file(&name))
                .await;
            number += 1;
        }
        let next = match next_file(&announcer, &mut files).await {
            Ok(next) => next,
            Err(end) => return end,
        };
        let mut sizes = vec![next.1];
        batch.push(next.0);
        while let Ok((name, size)) = files.try_recv() {
            sizes.push(size);
            batch.push(name);
        }
        match announcer.announce_more(&sizes).await {
            Ok(true) => {}
            // Streaming stopped (not taken, or handed over): the connection waits for the
            // offer, as long as it is up and files keep coming.
            Ok(false) => loop {
                if let Err(end) = next_file(&announcer, &mut files).await {
                    return end;
                }
            },
            Err(e) => {
                debug!(transfer = %id, error = %e, "streaming stopped; the rest is sent after the commit");
                return PumpEnd::Done;
            }
        }
    }
}

/// The next stored file; or how the pump ends: the files stop coming, the connection
/// closed, or [`IDLE_LIMIT`] passed without a file and with every streamed chunk
/// acknowledged (a slow link still carrying chunks is not idle).
async fn next_file(
    announcer: &Announcer,
    files: &mut mpsc::UnboundedReceiver<(String, u64)>,
) -> Result<(String, u64), PumpEnd> {
    loop {
        tokio::select! {
            next = files.recv() => return next.ok_or(PumpEnd::Done),
            () = announcer.closed() => return Err(PumpEnd::Done),
            () = tokio::time::sleep(IDLE_LIMIT) => {
                if announcer.is_idle() {
                    return Err(PumpEnd::Idle);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::may_stream;

    #[test]
    fn one_hospital_takes_at_most_half_the_streaming_slots() {
        let none: [&str; 0] = [];
        assert!(may_stream(none.into_iter(), "a", 4));
        assert!(may_stream(["a"].into_iter(), "a", 4));
        assert!(!may_stream(["a", "a"].into_iter(), "a", 4));
        // Another hospital still streams beside it, up to the slots.
        assert!(may_stream(["a", "a"].into_iter(), "b", 4));
        assert!(may_stream(["a", "a", "b"].into_iter(), "b", 4));
        assert!(!may_stream(["a", "a", "b", "b"].into_iter(), "c", 4));
        // Half rounded up: with 3 slots, 2; with 1, the one.
        assert!(may_stream(["a"].into_iter(), "a", 3));
        assert!(!may_stream(["a", "a"].into_iter(), "a", 3));
        assert!(may_stream(none.into_iter(), "a", 1));
        assert!(!may_stream(["b"].into_iter(), "a", 1));
    }
}
