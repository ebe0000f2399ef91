//! Edge side: streaming a transfer's chunks to the gateway while it is still being sealed.
//!
//! A new transfer's seal reads, hashes and copies every byte before the HSM signs the
//! manifest, and only a signed manifest can be offered. Rather than leave the link idle
//! that long, the edge dials the gateway as the seal starts, announces the transfer on a
//! control stream (`Hello`, then `Announce` with the transfer id and its layout: chunk size
//! and file sizes) and, as the seal hashes each chunk, sends a copy of its bytes on a chunk
//! stream of its own ([`Announcer`] is the seal's [`ChunkTap`]). Once the seal is done the
//! same control stream carries the signed `Offer`; the gateway's `Have` then lists the
//! streamed chunks whose digests match the manifest, and only the rest is sent, from the
//! spool, as for any transfer ([`super::send`]).
//!
//! Streaming is an optimisation and never a condition: a chunk that finds the link slower
//! than the seal (more than [`MAX_STREAMING_BYTES`] unacknowledged), a connection that is
//! not up yet or has failed, or a gateway that does not take the announcement only means
//! those chunks are sent after the offer. The gateway counts nothing streamed until the
//! signed manifest says what it must be ([`crate::gateway`]'s staging).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use baylink_net::proto::{ChunkHeader, Frame, Layout, Limits, TransferId};
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use super::{FrameWriter, LinkError, spawn_frame_reader};
use crate::seal::ChunkTap;

/// Most bytes of streamed chunks not yet acknowledged by the gateway: beyond this the seal
/// is outrunning the link, and the chunks it reads meanwhile are sent after the offer.
pub const MAX_STREAMING_BYTES: u64 = 64 * 1024 * 1024;

/// The control stream and connection an announced transfer continues on.
#[derive(Debug)]
pub struct EarlyLink {
    /// The connection the chunks were streamed on.
    pub conn: quinn::Connection,
    /// Its control stream, `Hello` and `Announce` sent.
    pub writer: FrameWriter,
    /// Frames from the gateway on that stream.
    pub frames: mpsc::Receiver<Result<baylink_net::proto::Frame, LinkError>>,
    /// Chunks whose streams the gateway's transport acknowledged whole (not necessarily
    /// read by the gateway yet, nor taken: its `Have` says).
    pub streamed: Vec<u32>,
}

/// Announces one transfer and streams its chunks as the seal reads them.
#[derive(Debug)]
pub struct Announcer {
    id: TransferId,
    layout: Layout,
    /// The connection, once dialled and announced.
    link: Mutex<Option<Announced>>,
    /// Set when streaming stops: sealing is done, or the link failed.
    stopped: AtomicBool,
    /// Bytes of chunks being streamed and not yet acknowledged.
    in_flight: Arc<AtomicU64>,
    /// The chunk each file is streaming now, if it is being streamed.
    current: Mutex<HashMap<usize, Current>>,
    /// The chunk streams' tasks.
    tasks: Mutex<Vec<tokio::task::JoinHandle<Option<u32>>>>,
    /// Where streamed payload bytes are counted ([`super::send::SendStats::wire_bytes`]).
    wire_bytes: Arc<super::send::SendStats>,
}

#[derive(Debug)]
struct Announced {
    conn: quinn::Connection,
    writer: FrameWriter,
    frames: mpsc::Receiver<Result<Frame, LinkError>>,
}

#[derive(Debug)]
struct Current {
    index: u32,
    /// Bytes of the chunk still to come.
    remaining: u64,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Announcer {
    /// An announcer for transfer `id` of `layout`, not yet connected; chunks read before
    /// [`Announcer::connect`] succeeds are sent after the offer.
    pub fn new(id: TransferId, layout: Layout, stats: Arc<super::send::SendStats>) -> Self {
        Announcer {
            id,
            layout,
            link: Mutex::new(None),
            stopped: AtomicBool::new(false),
            in_flight: Arc::new(AtomicU64::new(0)),
            current: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            wire_bytes: stats,
        }
    }

    /// Announces the transfer on `conn`: opens the control stream, sends `Hello` and
    /// `Announce`. From then on chunks the seal reads are streamed.
    pub async fn connect(&self, conn: quinn::Connection, our_id: &str) -> Result<(), LinkError> {
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send);
        writer
            .send(&Frame::Hello {
                version: baylink_net::proto::PROTOCOL_VERSION,
                appliance_id: our_id.to_owned(),
            })
            .await?;
        writer
            .send(&Frame::Announce {
                transfer_id: self.id,
                layout: self.layout.clone(),
            })
            .await?;
        let mut frames = spawn_frame_reader(recv, Limits::default());
        // Nothing is streamed before the gateway has its staging ready, or at all if it does
        // not take the announcement (the connection still carries the offer).
        let taken = match frames.recv().await {
            Some(Ok(Frame::Announced { transfer_id, taken })) if transfer_id == self.id => taken,
            Some(Ok(other)) => {
                conn.close(super::CLOSE_PROTOCOL.into(), b"announcement refused");
                return Err(LinkError::Lost(format!(
                    "the gateway answered the announcement with {}",
                    other.kind()
                )));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(LinkError::Lost("control stream reader ended".into())),
        };
        if !taken {
            debug!(transfer = %self.id, "the gateway does not take chunks before the offer");
            self.stopped.store(true, Ordering::SeqCst);
        }
        *self.link.lock().expect("announcer lock poisoned") = Some(Announced {
            conn,
            writer,
            frames,
        });
        Ok(())
    }

    /// Ends streaming: no chunk starts any more; waits until every chunk stream has been
    /// read by the gateway or has failed, and hands over the connection and control stream
    /// the offer continues on. `None` when there is none to continue on: never connected,
    /// the connection closed, or the gateway already answered the announcement (an error:
    /// a gateway that does not know `Announce`), so the offer goes on a fresh connection.
    pub async fn finish(&self) -> Option<EarlyLink> {
        self.stopped.store(true, Ordering::SeqCst);
        // Chunks cut short by the end of streaming are reset by their tasks.
        self.current
            .lock()
            .expect("announcer lock poisoned")
            .clear();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("announcer lock poisoned"));
        let mut streamed = Vec::new();
        for task in tasks {
            if let Ok(Some(index)) = task.await {
                streamed.push(index);
            }
        }
        let mut link = self.link.lock().expect("announcer lock poisoned").take()?;
        if link.conn.close_reason().is_some() {
            return None;
        }
        // Nothing is due from the gateway between its answer to the announcement and the
        // offer: anything here is an error (a gateway that stopped the transfer).
        if let Ok(frame) = link.frames.try_recv() {
            debug!(
                ?frame,
                "the gateway answered the announcement; offering on a new connection"
            );
            link.conn
                .close(super::CLOSE_PROTOCOL.into(), b"announcement refused");
            return None;
        }
        streamed.sort_unstable();
        Some(EarlyLink {
            conn: link.conn,
            writer: link.writer,
            frames: link.frames,
            streamed,
        })
    }

    /// The connection, if streaming can go on (announced, taken, not finished).
    fn conn(&self) -> Option<quinn::Connection> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let link = self.link.lock().expect("announcer lock poisoned");
        let conn = &link.as_ref()?.conn;
        conn.close_reason().is_none().then(|| conn.clone())
    }

    /// Starts streaming chunk `index` of `len` bytes, if the link is up and has room.
    fn start_chunk(&self, index: u32, len: u32) -> Option<mpsc::UnboundedSender<Bytes>> {
        let conn = self.conn()?;
        let len64 = u64::from(len);
        let reserved = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n + len64 <= MAX_STREAMING_BYTES).then_some(n + len64)
            });
        reserved.ok()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let header = ChunkHeader {
            transfer_id: self.id,
            index,
            len,
        };
        let stats = self.wire_bytes.clone();
        let release = ReleaseOnDrop {
            counter: self.in_flight.clone(),
            bytes: len64,
        };
        let task = tokio::spawn(async move {
            let _release = release;
            match stream_chunk(&conn, header, rx, &stats).await {
                Ok(()) => Some(index),
                Err(e) => {
                    debug!(chunk = index, error = %e, "chunk not streamed; it is sent after the offer");
                    None
                }
            }
        });
        self.tasks
            .lock()
            .expect("announcer lock poisoned")
            .push(task);
        Some(tx)
    }
}

/// Gives a streamed chunk's bytes back to the budget when its task ends.
struct ReleaseOnDrop {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl ChunkTap for Announcer {
    fn read(&self, file: usize, offset: u64, data: &[u8]) {
        let chunk_size = u64::from(self.layout.chunk_size());
        let Some(first) = self.layout.first_chunk(file) else {
            return;
        };
        let mut current = self.current.lock().expect("announcer lock poisoned");
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let within = at % chunk_size;
            let take = usize::try_from((chunk_size - within).min(rest.len() as u64))
                .expect("bounded by the slice");
            let (piece, tail) = rest.split_at(take);
            let index = u32::try_from(at / chunk_size)
                .ok()
                .and_then(|k| first.checked_add(k));
            if within == 0 {
                // A chunk starts: stream it if the link can take it.
                current.remove(&file);
                if let Some(index) = index
                    && let Some(loc) = self.layout.chunk(index).filter(|l| l.file == file)
                    && let Some(tx) = self.start_chunk(index, loc.len)
                {
                    current.insert(
                        file,
                        Current {
                            index,
                            remaining: u64::from(loc.len),
                            tx,
                        },
                    );
                }
            }
            if let Some(c) = current.get_mut(&file)
                && Some(c.index) == index
            {
                if piece.len() as u64 > c.remaining {
                    // The file grew since it was announced: this chunk is not what the
                    // layout says; dropping the sender resets its stream.
                    current.remove(&file);
                } else {
                    c.remaining -= piece.len() as u64;
                    let _ = c.tx.send(Bytes::copy_from_slice(piece));
                    if c.remaining == 0 {
                        current.remove(&file);
                    }
                }
            }
            at += take as u64;
            rest = tail;
        }
    }
}

/// Streams one chunk: its header, then its bytes as the seal hands them over. A chunk
/// whose bytes stop coming before its length (streaming ended, the file was shorter than
/// announced) is reset. Returns once the gateway's transport has acknowledged the whole
/// stream.
async fn stream_chunk(
    conn: &quinn::Connection,
    header: ChunkHeader,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    stats: &super::send::SendStats,
) -> Result<(), LinkError> {
    let mut stream = conn.open_uni().await?;
    stream.write_all(&header.encode()).await?;
    let mut left = u64::from(header.len);
    while left > 0 {
        let Some(bytes) = rx.recv().await else {
            let _ = stream.reset(super::STOP_UNWANTED.into());
            return Err(LinkError::Lost(
                "streaming ended before the chunk did".into(),
            ));
        };
        left = left.saturating_sub(bytes.len() as u64);
        stats
            .wire_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        stream.write_chunk(bytes).await?;
    }
    stream.finish()?;
    match stream.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(LinkError::Lost(format!(
            "the gateway stopped the stream (code {code})"
        ))),
        Err(e) => Err(LinkError::Lost(e.to_string())),
    }
}
