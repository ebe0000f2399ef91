//! Cut-through to the gateway: an open transfer's files stream across the link while the
//! hospital is still uploading the rest, so that its commit (or the end of its C-STORE
//! association) leaves little more than the signed offer to send.
//!
//! When the first file of an open transfer is stored, a streamer dials the gateway and
//! announces the transfer with that file (`link::early`); every file stored after it is
//! announced after the ones before, in the order they were stored (which is the order the
//! manifest lists them in), and its chunks are read back from `data/` and streamed. A file
//! is stored only once it is durable, acknowledged to the hospital and past the transfer's
//! DICOM gate (patient check, de-identification): only such bytes leave, and `data/` files
//! never change afterwards. When the transfer's send gets its slot, the streamer stops and
//! hands its connection to the send ([`IngestStore::take_stream`]), which offers the signed
//! manifest on it; the gateway counts a streamed chunk only where the manifest's digest
//! says so, and the send sends whatever was not streamed.
//!
//! Streaming is an optimisation, never a condition: a transfer whose streamer cannot dial,
//! is not taken by the gateway, falls behind or is one more than `transport.max_transfers`
//! streaming at once is simply sent after its commit, as before. `transport.stream_while_sealing
//! = false` turns it off.
//!
//! What this file must not do: stream a byte that is not in a stored file, or make an
//! upload, a commit or a send wait on the link (the hand-over waits at most
//! [`HANDOVER_WAIT`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baylink_net::proto::{Layout, Limits, TransferId};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{IngestStore, lock};
use crate::link::early::{Announcer, EarlyLink};
use crate::link::send::SendStats;
use crate::transfer_dir::TransferDir;

/// Longest a send waits for its transfer's streamer to stop before it offers on a new
/// connection instead (a streamer still dialling a gateway that does not answer).
pub(super) const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// The streamers of open transfers.
#[derive(Debug, Default)]
pub(super) struct Streams {
    by_transfer: Mutex<HashMap<TransferId, Streamer>>,
}

/// One open transfer's streaming.
#[derive(Debug)]
struct Streamer {
    /// Files stored after the first, in order: `(name, size)`.
    files: mpsc::UnboundedSender<(String, u64)>,
    announcer: Arc<Announcer>,
    /// Dials, announces and streams; ends when the files stop coming or streaming stops.
    pump: tokio::task::JoinHandle<()>,
    /// Bytes it put on the link.
    stats: Arc<SendStats>,
}

impl IngestStore {
    /// File `name` of `size` bytes, number `number` in transfer `id`'s stored order, was
    /// stored: the first starts the transfer's streamer (when streaming is on and fewer than
    /// `transport.max_transfers` stream), the others go to it. Called with the transfer's
    /// state locked, so that files reach the streamer in their stored order.
    pub(super) fn file_stored(&self, id: &TransferId, number: usize, name: &str, size: u64) {
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
            || streams.len() >= cfg.transport.max_transfers
            || streams.contains_key(id)
        {
            return;
        }
        let Ok(layout) = Layout::new(cfg.transport.chunk_size, vec![size], &Limits::default())
        else {
            return;
        };
        let stats = Arc::new(SendStats::default());
        let announcer = Arc::new(Announcer::new(*id, layout, stats.clone()));
        let (files, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(
            self.clone(),
            *id,
            name.to_owned(),
            announcer.clone(),
            rx,
        ));
        streams.insert(
            *id,
            Streamer {
                files,
                announcer,
                pump,
                stats,
            },
        );
    }

    /// Stops transfer `id`'s streamer and hands over its connection, for the send to offer
    /// on (`None`: it had none, or none that can carry the offer). Waits at most
    /// [`HANDOVER_WAIT`] for the streamer to stop.
    pub(super) async fn take_stream(&self, id: &TransferId) -> Option<EarlyLink> {
        let s = lock(&self.inner.streams.by_transfer).remove(id)?;
        let Streamer {
            files,
            announcer,
            mut pump,
            stats,
        } = s;
        drop(files);
        announcer.stop();
        if tokio::time::timeout(HANDOVER_WAIT, &mut pump)
            .await
            .is_err()
        {
            info!(transfer = %id, "the streamer did not stop in time; the offer goes on a new connection");
            pump.abort();
        }
        let early = announcer.finish().await;
        let wire = stats.wire_bytes();
        info!(transfer = %id, streamed_wire_bytes = wire, chunks = early.as_ref().map_or(0, |e| e.streamed.len()),
              "streaming before the offer ended");
        early
    }

    /// Ends transfer `id`'s streaming without a send (the transfer was abandoned or
    /// expired): the connection closes, and the gateway throws away what it staged.
    pub(super) fn drop_stream(&self, id: &TransferId) {
        let Some(s) = lock(&self.inner.streams.by_transfer).remove(id) else {
            return;
        };
        s.announcer.stop();
        s.pump.abort();
        tokio::spawn(async move {
            if let Some(early) = s.announcer.finish().await {
                early
                    .conn
                    .close(crate::link::CLOSE_SHUTDOWN.into(), b"transfer abandoned");
            }
        });
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
) {
    let edge = &store.inner.edge;
    let spool = edge.spool().clone();
    let dir = TransferDir::new(&store.inner.spool_dir, &id);
    if !edge.announce(&announcer).await {
        return;
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
        let Some(next) = files.recv().await else {
            return;
        };
        let mut sizes = vec![next.1];
        batch.push(next.0);
        while let Ok((name, size)) = files.try_recv() {
            sizes.push(size);
            batch.push(name);
        }
        match announcer.announce_more(&sizes).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                debug!(transfer = %id, error = %e, "streaming stopped; the rest is sent after the commit");
                return;
            }
        }
    }
}
