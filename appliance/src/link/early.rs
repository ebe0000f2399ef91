//! Edge side: streaming a transfer's chunks to the gateway before its manifest is signed.
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
//! A transfer of the hospital doors streams the same way while its files are still
//! arriving: each file, once stored (durable with its digest record, past the transfer's
//! DICOM gate; the hospital's answer follows), is announced after the ones before it ([`Announcer::announce_more`])
//! and its chunks are read back from the spool and streamed
//! ([`Announcer::stream_stored`]); the transfer's manifest lists its files in that order
//! (`crate::ingest`'s `stream`).
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
use baylink_net::spool::{DIRECT_ALIGN, Spool, SpoolFile};
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
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

/// The connection a transfer's chunks were streamed on before its offer: at hand (the seal
/// ended, [`Announcer::finish`] done), or still to be handed over (a hospital transfer's
/// streamer stopping: its chunk streams end first, which a send waits for inside its own
/// stops).
pub enum Early {
    /// At hand.
    Link(EarlyLink),
    /// Resolves to the link once the streamer has stopped and its chunk streams have ended.
    HandOver(std::pin::Pin<Box<dyn std::future::Future<Output = Option<EarlyLink>> + Send>>),
}

impl std::fmt::Debug for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Early::Link(l) => f.debug_tuple("Link").field(l).finish(),
            Early::HandOver(_) => f.write_str("HandOver"),
        }
    }
}

impl Early {
    /// The link, waiting for the hand-over if need be.
    pub async fn link(self) -> Option<EarlyLink> {
        match self {
            Early::Link(l) => Some(l),
            Early::HandOver(h) => h.await,
        }
    }
}

/// Announces one transfer and streams its chunks: as the seal reads them
/// ([`ChunkTap`]), or from the spool as its files are stored ([`Announcer::stream_stored`]).
#[derive(Debug)]
pub struct Announcer {
    id: TransferId,
    /// The files announced so far (and those about to be, before [`Announcer::connect`]);
    /// replaced, never changed in place, so a reader copies only the `Arc`.
    layout: Mutex<Arc<Layout>>,
    /// The connection, once dialled and announced.
    link: Mutex<Option<Announced>>,
    /// The connection from the moment it is dialled, whoever holds `link`: closed when the
    /// announcer goes without handing it over (an aborted streamer, a failed seal), so no
    /// connection outlives its use.
    conn: std::sync::OnceLock<quinn::Connection>,
    /// Set once [`Announcer::finish`] handed the connection over.
    handed_over: AtomicBool,
    /// Set when streaming stops: sealing is done, or the link failed.
    stopped: AtomicBool,
    /// Bytes of chunks being streamed and not yet acknowledged.
    in_flight: Arc<AtomicU64>,
    /// Most bytes `in_flight` may hold ([`MAX_STREAMING_BYTES`] unless set lower).
    budget: u64,
    /// Signalled when chunk bytes leave `in_flight`, and when streaming stops.
    room: Arc<Notify>,
    /// The chunk each file is streaming now, if it is being streamed.
    current: Mutex<HashMap<usize, Current>>,
    /// The chunk streams' tasks still running (or not yet reaped).
    tasks: Mutex<JoinSet<()>>,
    /// Chunks whose streams the gateway's transport acknowledged whole; each task records
    /// its chunk as it ends.
    streamed: Arc<Mutex<Vec<u32>>>,
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
            layout: Mutex::new(Arc::new(layout)),
            link: Mutex::new(None),
            conn: std::sync::OnceLock::new(),
            handed_over: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            in_flight: Arc::new(AtomicU64::new(0)),
            budget: MAX_STREAMING_BYTES,
            room: Arc::new(Notify::new()),
            current: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            streamed: Arc::default(),
            wire_bytes: stats,
        }
    }

    /// At most `bytes` unacknowledged instead of [`MAX_STREAMING_BYTES`] (at least one
    /// chunk): for transfers that stream several at once, each holding its unacknowledged
    /// chunks in memory.
    pub fn with_budget(mut self, bytes: u64) -> Self {
        let chunk = u64::from(self.chunk_size());
        self.budget = bytes.max(chunk);
        self
    }

    /// Announces the transfer on `conn`: opens the control stream, sends `Hello` and
    /// `Announce`. From then on chunks the seal reads are streamed.
    pub async fn connect(&self, conn: quinn::Connection, our_id: &str) -> Result<(), LinkError> {
        let _ = self.conn.set(conn.clone());
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send);
        writer
            .send(&Frame::Hello {
                version: baylink_net::proto::PROTOCOL_VERSION,
                appliance_id: our_id.to_owned(),
            })
            .await?;
        let layout = self.layout.lock().expect("announcer lock poisoned").clone();
        let frames = spawn_frame_reader(recv, Limits::default());
        let mut link = Announced {
            conn,
            writer,
            frames,
        };
        let taken = self.announce(&mut link, 0, layout.file_sizes()).await?;
        if !taken {
            self.stop();
        }
        *self.link.lock().expect("announcer lock poisoned") = Some(link);
        Ok(())
    }

    /// Announces `sizes`, files after the `first_file` announced before, and waits for the
    /// gateway's answer: whether it takes their chunks. Nothing of them is streamed before
    /// the gateway has its staging ready, or at all if it does not take them (the
    /// connection still carries the offer).
    async fn announce(
        &self,
        link: &mut Announced,
        first_file: usize,
        sizes: &[u64],
    ) -> Result<bool, LinkError> {
        let frame = if first_file == 0 {
            Frame::Announce {
                transfer_id: self.id,
                chunk_size: self.chunk_size(),
                file_sizes: sizes.to_vec(),
            }
        } else {
            Frame::AnnounceMore {
                transfer_id: self.id,
                first_file: u32::try_from(first_file).unwrap_or(u32::MAX),
                file_sizes: sizes.to_vec(),
            }
        };
        link.writer.send(&frame).await?;
        let taken = match link.frames.recv().await {
            Some(Ok(Frame::Announced { transfer_id, taken })) if transfer_id == self.id => taken,
            Some(Ok(other)) => {
                link.conn
                    .close(super::CLOSE_PROTOCOL.into(), b"announcement refused");
                return Err(LinkError::Lost(format!(
                    "the gateway answered the announcement with {}",
                    other.kind()
                )));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(LinkError::Lost("control stream reader ended".into())),
        };
        if !taken {
            debug!(transfer = %self.id, first_file, "the gateway does not take these chunks before the offer");
        }
        Ok(taken)
    }

    /// Announces `sizes` more files after those announced, on the connection
    /// [`Announcer::connect`] announced the first ones on, and waits for the answer. `false`
    /// when they are not streamed: streaming has stopped, or the gateway does not take them
    /// (streaming then stops; what was streamed stays). An error leaves the connection to
    /// the offer no more: it goes on a new one.
    pub async fn announce_more(&self, sizes: &[u64]) -> Result<bool, LinkError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let Some(mut link) = self.link.lock().expect("announcer lock poisoned").take() else {
            return Ok(false);
        };
        let (first_file, grown) = {
            let layout = self.layout.lock().expect("announcer lock poisoned");
            (
                layout.file_count(),
                layout.extended(sizes, &Limits::default()),
            )
        };
        let Ok(grown) = grown else {
            // Over the protocol's limits: the gateway would not take it either.
            self.stop();
            *self.link.lock().expect("announcer lock poisoned") = Some(link);
            return Ok(false);
        };
        let taken = self.announce(&mut link, first_file, sizes).await?;
        if taken {
            *self.layout.lock().expect("announcer lock poisoned") = Arc::new(grown);
        } else {
            self.stop();
        }
        *self.link.lock().expect("announcer lock poisoned") = Some(link);
        Ok(taken)
    }

    /// Whether no streamed chunk waits for the gateway's acknowledgement.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Returns once the connection has closed (never, before it is dialled).
    pub async fn closed(&self) {
        match self.conn.get() {
            Some(conn) => {
                conn.closed().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Closes the connection now (the transfer will not be offered on it): the gateway
    /// throws away what it staged.
    pub fn close(&self) {
        self.stop();
        if let Some(conn) = self.conn.get() {
            conn.close(super::CLOSE_SHUTDOWN.into(), b"streaming ended");
        }
    }

    /// Whether the connection is still up (dialled, announced, not closed), whether or not
    /// streaming goes on.
    pub fn has_link(&self) -> bool {
        self.link
            .lock()
            .expect("announcer lock poisoned")
            .as_ref()
            .is_some_and(|l| l.conn.close_reason().is_none())
    }

    /// The files announced (or to be announced first).
    pub fn file_count(&self) -> usize {
        self.layout
            .lock()
            .expect("announcer lock poisoned")
            .file_count()
    }

    fn chunk_size(&self) -> u32 {
        self.layout
            .lock()
            .expect("announcer lock poisoned")
            .chunk_size()
    }

    /// Stops streaming: no chunk starts any more (those under way go on until
    /// [`Announcer::finish`]).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.room.notify_waiters();
    }

    /// Streams the chunks of announced file number `file` from `path` in the spool (the
    /// stored file, which nothing changes any more), each as soon as the unacknowledged
    /// bytes leave room for it. Returns when every chunk has started, or streaming stopped,
    /// or the file cannot be read (logged; its chunks are sent after the offer).
    pub async fn stream_stored(&self, spool: &Spool, file: usize, path: &std::path::Path) {
        let (chunks, chunk_size) = {
            let layout = self.layout.lock().expect("announcer lock poisoned").clone();
            let Some(first) = layout.first_chunk(file) else {
                return;
            };
            let end = layout.first_chunk(file + 1).unwrap_or(layout.chunk_count());
            (first..end, layout.chunk_size())
        };
        let opened =
            if spool.buffers_allow_direct() && (chunk_size as usize).is_multiple_of(DIRECT_ALIGN) {
                spool.open_direct(path).await
            } else {
                spool.open(path).await
            };
        let stored = match opened {
            Ok(f) => Arc::new(f),
            Err(e) => {
                debug!(transfer = %self.id, error = %e, "cannot read a stored file to stream it");
                return;
            }
        };
        for index in chunks {
            let Some(loc) = self
                .layout
                .lock()
                .expect("announcer lock poisoned")
                .chunk(index)
            else {
                return;
            };
            let Some(reserved) = self.reserve(u64::from(loc.len)).await else {
                return;
            };
            let Some(conn) = self.conn() else {
                return;
            };
            let header = ChunkHeader {
                transfer_id: self.id,
                index,
                len: loc.len,
            };
            let (spool, stored, stats) = (spool.clone(), stored.clone(), self.wire_bytes.clone());
            self.spawn(index, async move {
                let _release = reserved;
                stream_stored_chunk(&conn, &spool, &stored, header, loc.offset, &stats).await
            });
        }
    }

    /// Waits until `len` more bytes fit the unacknowledged budget and reserves them; `None`
    /// once streaming stops.
    async fn reserve(&self, len: u64) -> Option<ReleaseOnDrop> {
        loop {
            let room = self.room.notified();
            if self.stopped.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(r) = self.try_reserve(len) {
                return Some(r);
            }
            room.await;
        }
    }

    /// Reserves `len` bytes of the unacknowledged budget if they fit.
    fn try_reserve(&self, len: u64) -> Option<ReleaseOnDrop> {
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n + len <= self.budget).then_some(n + len)
            })
            .ok()?;
        Some(ReleaseOnDrop {
            counter: self.in_flight.clone(),
            room: self.room.clone(),
            bytes: len,
        })
    }

    /// Runs the task that streams chunk `index`; it records the chunk as streamed if it
    /// ends well. (Finished tasks are reaped first.)
    fn spawn(
        &self,
        index: u32,
        task: impl std::future::Future<Output = Result<(), LinkError>> + Send + 'static,
    ) {
        let streamed = self.streamed.clone();
        let mut tasks = self.tasks.lock().expect("announcer lock poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            match task.await {
                Ok(()) => streamed
                    .lock()
                    .expect("announcer lock poisoned")
                    .push(index),
                Err(e) => {
                    debug!(chunk = index, error = %e, "chunk not streamed; it is sent after the offer");
                }
            }
        });
    }

    /// Ends streaming: no chunk starts any more; waits until every chunk stream has been
    /// read by the gateway or has failed, and hands over the connection and control stream
    /// the offer continues on. `None` when there is none to continue on: never connected,
    /// the connection closed, or the gateway already answered the announcement (an error:
    /// a gateway that does not know `Announce`), so the offer goes on a fresh connection.
    pub async fn finish(&self) -> Option<EarlyLink> {
        self.stop();
        // Chunks cut short by the end of streaming are reset by their tasks.
        self.current
            .lock()
            .expect("announcer lock poisoned")
            .clear();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("announcer lock poisoned"));
        while tasks.join_next().await.is_some() {}
        let mut streamed =
            std::mem::take(&mut *self.streamed.lock().expect("announcer lock poisoned"));
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
        self.handed_over.store(true, Ordering::SeqCst);
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
        let release = self.try_reserve(u64::from(len))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let header = ChunkHeader {
            transfer_id: self.id,
            index,
            len,
        };
        let stats = self.wire_bytes.clone();
        self.spawn(index, async move {
            let _release = release;
            stream_chunk(&conn, header, rx, &stats).await
        });
        Some(tx)
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        if !self.handed_over.load(Ordering::SeqCst) {
            self.close();
        }
    }
}

/// Gives a streamed chunk's bytes back to the budget when its task ends.
#[derive(Debug)]
struct ReleaseOnDrop {
    counter: Arc<AtomicU64>,
    room: Arc<Notify>,
    bytes: u64,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::SeqCst);
        self.room.notify_waiters();
    }
}

impl ChunkTap for Announcer {
    fn read(&self, file: usize, offset: u64, data: &[u8]) {
        // The seal's layout is whole from the start.
        let layout = self.layout.lock().expect("announcer lock poisoned").clone();
        let chunk_size = u64::from(layout.chunk_size());
        let Some(first) = layout.first_chunk(file) else {
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
                    && let Some(loc) = layout.chunk(index).filter(|l| l.file == file)
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
    acknowledged(stream).await
}

/// Streams one chunk of a stored file: its header, then its bytes read from the spool.
/// Returns once the gateway's transport has acknowledged the whole stream.
async fn stream_stored_chunk(
    conn: &quinn::Connection,
    spool: &Spool,
    file: &SpoolFile,
    header: ChunkHeader,
    offset: u64,
    stats: &super::send::SendStats,
) -> Result<(), LinkError> {
    let mut stream = conn.open_uni().await?;
    stream.write_all(&header.encode()).await?;
    super::send::write_from_spool(
        conn,
        &mut stream,
        spool,
        file,
        offset,
        header.len,
        &stats.wire_bytes,
    )
    .await
    .map_err(|e| LinkError::Lost(e.to_string()))?;
    acknowledged(stream).await
}

/// Finishes a chunk stream and returns once the gateway's transport has acknowledged all of
/// it; an error if the gateway stopped it or the connection failed.
async fn acknowledged(mut stream: quinn::SendStream) -> Result<(), LinkError> {
    stream.finish()?;
    match stream.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(LinkError::Lost(format!(
            "the gateway stopped the stream (code {code})"
        ))),
        Err(e) => Err(LinkError::Lost(e.to_string())),
    }
}
