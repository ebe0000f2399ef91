//! Edge side: offer a sealed transfer, send the chunks the gateway lacks, take the receipt.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;

use baylink_net::proto::{
    ChunkHeader, Frame, Limits, Manifest, ProtoError, Sender, SenderAction, SenderConfig,
};
use baylink_net::spool::{Spool, SpoolFile};
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{FrameWriter, LinkError, spawn_frame_reader};

/// A sealed transfer ready to send: manifest, signature and the spool files to read.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The manifest.
    pub manifest: Arc<Manifest>,
    /// Its canonical bytes (what was signed).
    pub manifest_bytes: Bytes,
    /// The edge HSM's signature over them.
    pub signature: Bytes,
    /// One open spool file per manifest file, in manifest order; none for a transfer that
    /// already has its receipt (it is reported, not sent).
    pub files: Arc<Vec<Arc<SpoolFile>>>,
    /// Read every chunk back and check its digest before sending it. Set for transfers
    /// sealed by an earlier process (resume, start-up recovery): their bytes have rested on
    /// disk. A transfer sealed by this process was hashed on its way into the spool moments
    /// ago; its chunks are checked only when one is sent a second time (the gateway found it
    /// bad, or its stream failed).
    pub check_at_rest: bool,
}

/// How one attempt ended well.
#[derive(Debug)]
pub struct Delivered {
    /// The gateway's receipt, canonical bytes.
    pub receipt: Bytes,
    /// The gateway HSM's signature over it.
    pub signature: Bytes,
}

/// How one attempt ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The link went away; the transfer can resume on a new connection.
    #[error("{0}")]
    Link(#[from] LinkError),
    /// The gateway refused the transfer: final.
    #[error("gateway refused: {0}")]
    Refused(String),
    /// A spool chunk could not be read (disk fault or truncation): final.
    #[error("spool: {0}")]
    Spool(String),
}

/// Figures of a send across all its attempts.
#[derive(Debug)]
pub struct SendStats {
    /// Chunk payload bytes written to the link.
    pub wire_bytes: AtomicU64,
    /// Chunk latency in microseconds: chunk stream opened → gateway's `ChunkOk`.
    pub chunk_latency_us: Mutex<Histogram<u64>>,
    /// Time this side waited for its HSM, in microseconds.
    pub hsm_wait_us: AtomicU64,
    /// quinn's figures of every link connection an attempt used, added up.
    pub link: Mutex<LinkTotals>,
}

/// quinn's connection statistics of a send's link connections, summed over its attempts
/// (each attempt dials a connection of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkTotals {
    /// Connections (attempts that got one).
    pub connections: u64,
    /// UDP datagrams sent.
    pub udp_tx_datagrams: u64,
    /// UDP payload bytes sent (QUIC packets, headers and retransmissions included).
    pub udp_tx_bytes: u64,
    /// QUIC packets sent.
    pub sent_packets: u64,
    /// Packets quinn declared lost (and whose frames it sent again).
    pub lost_packets: u64,
    /// Bytes of the packets declared lost.
    pub lost_bytes: u64,
    /// Congestion events (the controller's window cuts).
    pub congestion_events: u64,
}

impl LinkTotals {
    /// Adds one connection's statistics, as they stand when its attempt ends.
    pub fn add(&mut self, s: &quinn::ConnectionStats) {
        self.connections += 1;
        self.udp_tx_datagrams += s.udp_tx.datagrams;
        self.udp_tx_bytes += s.udp_tx.bytes;
        self.sent_packets += s.path.sent_packets;
        self.lost_packets += s.path.lost_packets;
        self.lost_bytes += s.path.lost_bytes;
        self.congestion_events += s.path.congestion_events;
    }
}

impl Default for SendStats {
    fn default() -> Self {
        SendStats {
            wire_bytes: AtomicU64::new(0),
            hsm_wait_us: AtomicU64::new(0),
            link: Mutex::new(LinkTotals::default()),
            chunk_latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid"),
            ),
        }
    }
}

impl SendStats {
    /// Chunk payload bytes sent so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }

    /// Records the statistics of an attempt's connection once the attempt is over.
    pub fn add_connection(&self, conn: &quinn::Connection) {
        self.link
            .lock()
            .expect("stats lock poisoned")
            .add(&conn.stats());
    }

    /// The link connections' totals so far.
    pub fn link(&self) -> LinkTotals {
        *self.link.lock().expect("stats lock poisoned")
    }
}

/// Progress of a send, observed by the caller (progress bar, metrics).
pub trait Progress: Send + Sync {
    /// The gateway confirmed `bytes` more payload bytes as verified.
    fn confirmed(&self, bytes: u64);
    /// The gateway's have-list says `bytes` were already there.
    fn already_there(&self, bytes: u64);
}

enum ChunkEvent {
    Written(u32),
    /// The gateway stopped the chunk's stream (a duplicate, or one it is already receiving).
    Stopped(u32),
    /// The gateway reset the chunk's stream because it stalled (`STOP_STALLED`); its
    /// `ChunkBad` for the chunk follows, or came first.
    Reset(u32),
    Failed(u32, SendError),
}

/// Runs one attempt of sending `out` on `conn`.
pub async fn run(
    conn: &quinn::Connection,
    spool: &Spool,
    out: &Outgoing,
    cfg: SenderConfig,
    our_id: &str,
    progress: &dyn Progress,
    stats: &Arc<SendStats>,
) -> Result<Delivered, SendError> {
    let (send, recv) = conn.open_bi().await.map_err(LinkError::from)?;
    let mut writer = FrameWriter::new(send);
    let frames = spawn_frame_reader(recv, Limits::default());
    writer
        .send(&Frame::Hello {
            version: baylink_net::proto::PROTOCOL_VERSION,
            appliance_id: our_id.to_owned(),
        })
        .await?;
    run_on(
        conn,
        (writer, frames),
        &[],
        spool,
        out,
        cfg,
        progress,
        stats,
    )
    .await
}

/// [`run`] on a control stream already open, `Hello` sent: the one an announcement opened
/// ([`super::early`]), whose chunk streams brought `streamed` to the gateway before the
/// offer.
#[allow(clippy::too_many_arguments)] // `run`'s, plus the stream and what it streamed
pub async fn run_on(
    conn: &quinn::Connection,
    (mut writer, mut frames): (FrameWriter, mpsc::Receiver<Result<Frame, LinkError>>),
    streamed: &[u32],
    spool: &Spool,
    out: &Outgoing,
    cfg: SenderConfig,
    progress: &dyn Progress,
    stats: &Arc<SendStats>,
) -> Result<Delivered, SendError> {
    let mut sender = Sender::new(
        out.manifest.clone(),
        out.manifest_bytes.clone(),
        out.signature.clone(),
        cfg,
    );
    sender.streamed_before_offer(streamed.iter().copied());
    let sender = Arc::new(Mutex::new(sender));
    let (events_tx, mut events) = mpsc::unbounded_channel::<ChunkEvent>();
    let chunk_len = |index: u32| out.manifest.chunk(index).map_or(0, |c| u64::from(c.len));
    let mut have_seen = false;
    let mut started: HashMap<u32, Instant> = HashMap::new();
    let mut sent_before: HashSet<u32> = HashSet::new();

    loop {
        // Act on everything the state machine wants done now.
        loop {
            let action = sender.lock().expect("sender lock poisoned").poll_action();
            let Some(action) = action else { break };
            match action {
                SenderAction::SendFrame(frame) => writer.send(&frame).await?,
                SenderAction::SendChunk { index } => {
                    let conn = conn.clone();
                    let spool = spool.clone();
                    let out = out.clone();
                    let tx = events_tx.clone();
                    let stats = stats.clone();
                    started.insert(index, Instant::now());
                    let check = out.check_at_rest || !sent_before.insert(index);
                    tokio::spawn(async move {
                        let ev =
                            match send_chunk(&conn, &spool, &out, index, check, &stats.wire_bytes)
                                .await
                            {
                                Ok(()) => ChunkEvent::Written(index),
                                // The gateway reset a stalled stream and asks for the chunk
                                // again with `ChunkBad`: that frame alone drives the resend, so
                                // one stall costs one retry, not two (a second copy would meet
                                // the first on the gateway as busy and be stopped in turn).
                                Err(ChunkError::Stopped(code)) if code == super::STOP_STALLED => {
                                    ChunkEvent::Reset(index)
                                }
                                Err(ChunkError::Stopped(_)) => ChunkEvent::Stopped(index),
                                Err(ChunkError::Failed(e)) => ChunkEvent::Failed(index, e),
                            };
                        let _ = tx.send(ev);
                    });
                }
                SenderAction::Done { receipt, signature } => {
                    writer.finish();
                    return Ok(Delivered { receipt, signature });
                }
                SenderAction::Failed(e) => return Err(refusal(e)),
            }
        }

        tokio::select! {
            frame = frames.recv() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(LinkError::Lost("control stream reader ended".into()).into()),
                };
                match &frame {
                    Frame::ChunkOk { index } => {
                        progress.confirmed(chunk_len(*index));
                        if let Some(t) = started.remove(index) {
                            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                            let _ = stats.chunk_latency_us.lock().expect("stats lock poisoned").record(us);
                        }
                    }
                    Frame::Have { have, .. } if !have_seen => {
                        have_seen = true;
                        if let Ok(set) = baylink_net::proto::ChunkSet::from_bytes(out.manifest.chunk_count(), have) {
                            let bytes: u64 = (0..out.manifest.chunk_count()).filter(|i| set.contains(*i)).map(chunk_len).sum();
                            progress.already_there(bytes);
                        }
                    }
                    Frame::Error { code, text } => {
                        debug!(?code, %text, "gateway sent an error frame");
                    }
                    _ => {}
                }
                sender.lock().expect("sender lock poisoned").handle_frame(frame).map_err(refusal)?;
            }
            ev = events.recv() => {
                match ev.expect("we hold a sender half") {
                    ChunkEvent::Written(i) => sender.lock().expect("sender lock poisoned").chunk_written(i),
                    ChunkEvent::Stopped(i) => sender.lock().expect("sender lock poisoned").chunk_stream_failed(i),
                    ChunkEvent::Reset(i) => debug!(chunk = i, "gateway reset a stalled chunk stream; its ChunkBad asks for the resend"),
                    ChunkEvent::Failed(i, SendError::Link(e)) => {
                        warn!(chunk = i, error = %e, "chunk stream failed");
                        return Err(SendError::Link(e));
                    }
                    ChunkEvent::Failed(_, e) => {
                        // A final failure of this side (its spool): the gateway lets go of the
                        // transfer as soon as it reads why.
                        writer.give_up(baylink_net::proto::ErrorCode::Internal, &format!("edge {e}")).await;
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// A failure reported by the state machine. An error frame from the gateway is final, a
/// refusal in the gateway's own words, unless its code says a retry can help
/// ([`baylink_net::proto::ErrorCode::is_retryable`]: shutting down, out of space, a fault of the gateway's own):
/// those are retried like a lost link, and the transfer resumes.
fn refusal(e: ProtoError) -> SendError {
    match e {
        ProtoError::Peer { code, text } if code.is_retryable() => {
            SendError::Link(LinkError::Lost(format!("gateway: {text}")))
        }
        // The gateway's words, kept to one printable line.
        ProtoError::Peer { text, .. } => {
            SendError::Refused(text.chars().filter(|c| !c.is_control()).collect())
        }
        other => SendError::Refused(other.to_string()),
    }
}

/// Why a chunk stream ended early.
#[derive(Debug)]
pub(super) enum ChunkError {
    /// The gateway stopped the stream, with this application code.
    Stopped(u32),
    Failed(SendError),
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::Stopped(code) => write!(f, "the gateway stopped the stream (code {code})"),
            ChunkError::Failed(e) => e.fmt(f),
        }
    }
}

impl From<SendError> for ChunkError {
    fn from(e: SendError) -> Self {
        ChunkError::Failed(e)
    }
}

impl From<quinn::WriteError> for ChunkError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => {
                ChunkError::Stopped(u32::try_from(code.into_inner()).unwrap_or(u32::MAX))
            }
            other => ChunkError::Failed(SendError::Link(other.into())),
        }
    }
}

async fn send_chunk(
    conn: &quinn::Connection,
    spool: &Spool,
    out: &Outgoing,
    index: u32,
    check_at_rest: bool,
    wire_bytes: &AtomicU64,
) -> Result<(), ChunkError> {
    let loc = out
        .manifest
        .chunk(index)
        .ok_or_else(|| SendError::Spool(format!("chunk {index} is not in the manifest")))?;
    let header = ChunkHeader {
        transfer_id: out.manifest.transfer_id,
        index,
        len: loc.len,
    };
    let file = &out.files[loc.file];
    if check_at_rest {
        check_chunk_at_rest(spool, out, file, index, &loc).await?;
    }
    let mut stream = conn
        .open_uni()
        .await
        .map_err(|e| SendError::Link(e.into()))?;
    stream.write_all(&header.encode()).await?;
    write_from_spool(
        conn,
        &mut stream,
        spool,
        file,
        loc.offset,
        loc.len,
        wire_bytes,
    )
    .await
    .map_err(|e| match e {
        ChunkError::Failed(SendError::Spool(text)) => {
            ChunkError::Failed(SendError::Spool(format!("chunk {index}: {text}")))
        }
        other => other,
    })?;
    stream
        .finish()
        .map_err(|e| SendError::Link(LinkError::from(e)))?;
    Ok(())
}

/// Writes `len` bytes of `file` from `offset` on to `stream`, a buffer read from the spool
/// at a time, counting them in `wire_bytes`. Waiting for a buffer gives up when `conn`
/// closes.
pub(super) async fn write_from_spool(
    conn: &quinn::Connection,
    stream: &mut quinn::SendStream,
    spool: &Spool,
    file: &SpoolFile,
    offset: u64,
    len: u32,
    wire_bytes: &AtomicU64,
) -> Result<(), ChunkError> {
    let mut offset = offset;
    let end = offset + u64::from(len);
    while offset < end {
        // Waiting for a buffer must not keep a dead connection alive: give up when it closes.
        let buf = tokio::select! {
            buf = spool.buffer() => buf,
            e = conn.closed() => return Err(SendError::Link(e.into()).into()),
        };
        let want = usize::try_from((end - offset).min(buf.capacity() as u64))
            .expect("bounded by the buffer size");
        let buf = spool
            .read_at(file, offset, buf, want)
            .await
            .map_err(|e| SendError::Spool(format!("cannot read {}: {e}", file.path().display())))?;
        if buf.len() != want {
            return Err(SendError::Spool(format!(
                "{} is shorter than its manifest says",
                file.path().display()
            ))
            .into());
        }
        // The buffer itself goes into quinn's send buffer (no copy). It leaves the pool for
        // good (quinn frees it once the gateway acknowledged it): buffers held by quinn
        // must never be what the next read waits for.
        stream.write_chunk(buf.into_detached_bytes()).await?;
        wire_bytes.fetch_add(want as u64, Ordering::Relaxed);
        offset += want as u64;
    }
    Ok(())
}

/// Reads a chunk back from the spool and compares it with its manifest digest before it is
/// sent. A mismatch is read once more from the device (cached pages dropped); if it still does
/// not match, the spool copy is corrupt and the transfer cannot be finished from it: a final
/// error naming the chunk, never corrupt bytes on the link.
async fn check_chunk_at_rest(
    spool: &Spool,
    out: &Outgoing,
    file: &SpoolFile,
    index: u32,
    loc: &baylink_net::proto::ChunkLocation,
) -> Result<(), SendError> {
    let want = out.manifest.chunk_digests.get(index as usize);
    for uncached in [false, true] {
        let got = super::digest_at_rest(spool, file, loc, uncached)
            .await
            .map_err(|e| SendError::Spool(format!("cannot read chunk {index}: {e}")))?;
        if want == Some(&got) {
            return Ok(());
        }
        warn!(
            chunk = index,
            file = %file.path().display(),
            uncached,
            "spool chunk does not match its digest"
        );
    }
    metrics::counter!("baylink_chunks_corrupt_at_rest_total").increment(1);
    Err(SendError::Spool(format!(
        "chunk {index} ({} bytes at offset {} of {}) no longer matches its digest: the edge \
         spool copy is corrupt (disk fault?); upload the files again",
        loc.len,
        loc.offset,
        file.path().display()
    )))
}

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn link_totals_add_up_the_attempts_connections() {
        let mut s = quinn::ConnectionStats::default();
        s.udp_tx.datagrams = 10;
        s.udp_tx.bytes = 15_000;
        s.path.sent_packets = 11;
        s.path.lost_packets = 2;
        s.path.lost_bytes = 2_800;
        s.path.congestion_events = 1;
        let mut totals = LinkTotals::default();
        totals.add(&s);
        totals.add(&s);
        assert_eq!(
            totals,
            LinkTotals {
                connections: 2,
                udp_tx_datagrams: 20,
                udp_tx_bytes: 30_000,
                sent_packets: 22,
                lost_packets: 4,
                lost_bytes: 5_600,
                congestion_events: 2,
            }
        );
    }
}
