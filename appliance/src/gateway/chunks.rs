//! Chunk streams: one unidirectional stream per chunk, its bytes hashed as they arrive and
//! written into the transfer's `.part` files; and the check at rest of chunks a previous
//! process made durable.
//!
//! Owns the path from a stream's first byte to the receiver state machine's verdict on the
//! chunk, and the periodic checkpoint it triggers. A chunk stream is taken only for a
//! transfer offered on the same connection, and only while its bytes keep coming (the
//! stall timeout); otherwise it is stopped with a code saying why, and the transfer is not
//! touched. It must not answer the edge (the control stream sends `ChunkOk`/`ChunkBad`) nor
//! decide whether a transfer is complete.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use baylink_net::proto::{ChunkHeader, ChunkSet, ErrorCode, Manifest, ProtoError, TransferId};
use baylink_net::spool::SpoolFile;
use bytes::{Buf, Bytes};
use tracing::{debug, warn};

use super::commit::checkpoint;
use super::{Active, Gateway};
use crate::link::{LinkError, STOP_OTHER_CONNECTION, STOP_STALLED, STOP_UNWANTED};
use crate::transfer_dir::TransferDir;

/// Verified bytes after which the receiver makes its progress durable (fsync + state file).
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

/// Reads back every chunk the state file lists as durable (written before this process
/// started, so never hashed by it) and forgets those that no longer match their digest: they
/// are fetched again instead of being committed.
pub(super) async fn check_at_rest(
    gw: &Gateway,
    dir: &TransferDir,
    manifest: &Manifest,
    have: &mut ChunkSet,
) -> Result<(), (ErrorCode, String)> {
    let mut opened: HashMap<usize, SpoolFile> = HashMap::new();
    let mut bad = Vec::new();
    for index in have.iter().collect::<Vec<_>>() {
        let Some(loc) = manifest.chunk(index) else {
            continue;
        };
        let part = dir.part_file(&manifest.files[loc.file].name);
        let file = match opened.entry(loc.file) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                if !part.exists() {
                    // Renamed to its final name by an interrupted commit: complete and checked.
                    continue;
                }
                let file = gw.spool.open(&part).await.map_err(|e| spool_refusal(&e))?;
                e.insert(file)
            }
        };
        let digest = crate::link::digest_at_rest(&gw.spool, file, &loc, false)
            .await
            .map_err(|e| spool_refusal(&e))?;
        if manifest.chunk_digests.get(index as usize) != Some(&digest) {
            warn!(transfer = %manifest.transfer_id, chunk = index, file = %part.display(),
                  "chunk no longer matches its digest at rest (disk fault?): fetching it again");
            metrics::counter!("baylink_chunks_corrupt_at_rest_total").increment(1);
            bad.push(index);
        }
    }
    for (_, file) in opened {
        let _ = gw.spool.close(file).await;
    }
    if !bad.is_empty() {
        for index in bad {
            have.remove(index);
        }
        let (dir, set) = (dir.clone(), have.clone());
        tokio::task::spawn_blocking(move || dir.store_state(&set))
            .await
            .map_err(|e| (ErrorCode::Internal, format!("spool: {e}")))?
            .map_err(|e| (ErrorCode::Internal, format!("cannot store the state: {e}")))?;
    }
    Ok(())
}

/// The code and text a spool failure is answered with ([`super::storage_code`]).
pub(super) fn spool_refusal(e: &baylink_net::spool::SpoolError) -> (ErrorCode, String) {
    (super::storage_code(&e.source), super::spool_text(e))
}

/// Why a chunk stream ended before its chunk was taken.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    /// The link failed, or the chunk was not wanted (no such transfer, a duplicate, a header
    /// the state machine refused, bytes that do not fit).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The chunk's transfer was offered on another connection: it is not this one's to feed.
    #[error("chunk for transfer {0}, which was offered on another connection: refused")]
    OtherConnection(TransferId),
    /// No bytes arrived for the stall timeout (`transport.chunk_stall_timeout`).
    #[error("chunk stream stalled: no bytes for {} s (transport.chunk_stall_timeout)", .0.as_secs_f64())]
    Stalled(Duration),
}

impl StreamEnd {
    /// The QUIC code the stream is stopped with: it tells the edge why.
    fn stop_code(&self) -> u32 {
        match self {
            StreamEnd::Link(_) => STOP_UNWANTED,
            StreamEnd::OtherConnection(_) => STOP_OTHER_CONNECTION,
            StreamEnd::Stalled(_) => STOP_STALLED,
        }
    }
}

impl From<ProtoError> for StreamEnd {
    fn from(e: ProtoError) -> Self {
        StreamEnd::Link(e.into())
    }
}

/// Awaits one read of a chunk stream, at most `limit`: a stream that brings nothing for
/// that long has stalled.
async fn within<T, E>(
    limit: Duration,
    read: impl Future<Output = Result<T, E>>,
) -> Result<T, StreamEnd>
where
    LinkError: From<E>,
{
    match tokio::time::timeout(limit, read).await {
        Ok(res) => res.map_err(|e| StreamEnd::Link(e.into())),
        Err(_) => Err(StreamEnd::Stalled(limit)),
    }
}

/// Receives one chunk stream of the connection `conn_id` (its `stable_id`).
pub(super) async fn data_stream(gw: Arc<Gateway>, conn_id: usize, mut recv: quinn::RecvStream) {
    if let Err(e) = receive_chunk(&gw, conn_id, &mut recv).await {
        match &e {
            StreamEnd::Link(_) => debug!(error = %e, "chunk stream ended early"),
            StreamEnd::OtherConnection(_) => {
                warn!(error = %e, "chunk stream refused");
                metrics::counter!("baylink_chunk_streams_refused_total", "reason" => "other_connection")
                    .increment(1);
            }
            StreamEnd::Stalled(_) => {
                warn!(error = %e, "chunk stream reset");
                metrics::counter!("baylink_chunk_streams_refused_total", "reason" => "stalled")
                    .increment(1);
            }
        }
        let _ = recv.stop(e.stop_code().into());
    }
}

async fn receive_chunk(
    gw: &Arc<Gateway>,
    conn_id: usize,
    recv: &mut quinn::RecvStream,
) -> Result<(), StreamEnd> {
    let mut raw = [0u8; ChunkHeader::LEN];
    within(gw.chunk_stall_timeout, recv.read_exact(&mut raw)).await?;
    let header = ChunkHeader::decode(&raw)?;
    let active = gw
        .active
        .lock()
        .expect("registry lock poisoned")
        .get(&header.transfer_id)
        .cloned();
    let Some(active) = active else {
        let staged = gw
            .staged
            .lock()
            .expect("registry lock poisoned")
            .get(&header.transfer_id)
            .cloned();
        if let Some(staged) = staged {
            return receive_staged(gw, conn_id, &staged, &header, recv).await;
        }
        return Err(LinkError::Lost(format!("no active transfer {}", header.transfer_id)).into());
    };
    // Before the state machine sees the header: a stream from another connection must not
    // be able to fail, or feed, a transfer it did not offer.
    if active.conn.stable_id() != conn_id {
        return Err(StreamEnd::OtherConnection(header.transfer_id));
    }
    let loc = {
        let res = active
            .receiver
            .lock()
            .expect("receiver lock poisoned")
            .chunk_header(&header);
        match res {
            Ok(loc) => loc,
            Err(e) => {
                active.wake.notify_one();
                return Err(e.into());
            }
        }
    };
    let digest = match gather_chunk(gw, &active, &loc, &header, recv).await {
        Ok(d) => d,
        Err(e) => {
            // The receiver must learn that this chunk is no longer arriving, or it would
            // refuse the resend as busy. A stalled stream is reset by us: the edge may have
            // written all of it already and waits for a verdict, so it is asked to resend.
            {
                let mut receiver = active.receiver.lock().expect("receiver lock poisoned");
                match &e {
                    StreamEnd::Stalled(_) => receiver.chunk_reset(header.index, &e.to_string()),
                    _ => receiver.chunk_aborted(header.index),
                }
            }
            active.wake.notify_one();
            return Err(e);
        }
    };
    let good = active.manifest.chunk_digests.get(header.index as usize) == Some(&digest);
    active
        .receiver
        .lock()
        .expect("receiver lock poisoned")
        .chunk_received(header.index, digest);
    active.wake.notify_one();
    metrics::counter!("baylink_bytes_total", "direction" => "received")
        .increment(u64::from(loc.len));
    if good {
        crate::telemetry::stage_bytes("verified", u64::from(loc.len));
        let due = {
            let mut u = active.unsynced.lock().expect("unsynced lock poisoned");
            u.0.push(header.index);
            u.1 += u64::from(loc.len);
            u.1 >= CHECKPOINT_BYTES
        };
        if due {
            let gw = gw.clone();
            let active = active.clone();
            tokio::spawn(async move {
                if let Err(e) = checkpoint(&gw, &active).await {
                    warn!(error = %e, "checkpoint failed");
                }
            });
        }
    } else {
        metrics::counter!("baylink_chunk_retransmits_total").increment(1);
    }
    Ok(())
}

/// A chunk stream of an announced transfer, before its offer: its bytes go into the staging
/// file and its digest is noted there; the offer decides whether it counts
/// ([`super::staging`]). A stream the announcement does not want is stopped.
async fn receive_staged(
    gw: &Arc<Gateway>,
    conn_id: usize,
    staged: &Arc<super::staging::Staged>,
    header: &ChunkHeader,
    recv: &mut quinn::RecvStream,
) -> Result<(), StreamEnd> {
    if staged.conn_id() != conn_id {
        return Err(StreamEnd::OtherConnection(header.transfer_id));
    }
    let (loc, file) = staged
        .begin(header)
        .map_err(|why| StreamEnd::Link(LinkError::Lost(why)))?;
    let res = gather(gw, &file, &loc, header, &|| staged.discarded(), recv).await;
    match res {
        Ok(digest) => {
            staged.end(header.index, Some(digest));
            metrics::counter!("baylink_bytes_total", "direction" => "received")
                .increment(u64::from(loc.len));
            Ok(())
        }
        Err(e) => {
            staged.end(header.index, None);
            Err(match e {
                Gather::End(e) => e,
                Gather::Write(e) => {
                    debug!(transfer = %header.transfer_id, error = %e, cause = %e.source,
                           "staging write failed; the chunk is sent after the offer");
                    LinkError::Lost(format!("staging write failed: {e}: {}", e.source)).into()
                }
            })
        }
    }
}

/// Why [`gather`] stopped.
enum Gather {
    /// The stream ended, failed or broke the protocol.
    End(StreamEnd),
    /// A write into the spool failed.
    Write(baylink_net::spool::SpoolError),
}

impl<E: Into<StreamEnd>> From<E> for Gather {
    fn from(e: E) -> Self {
        Gather::End(e.into())
    }
}

/// Reads the chunk's bytes from its stream into the transfer's spool file, hashing them on
/// the way; a failed write is answered as its cause says (a full spool pauses the transfer,
/// a file this spool cannot hold refuses it).
async fn gather_chunk(
    gw: &Arc<Gateway>,
    active: &Arc<Active>,
    loc: &baylink_net::proto::ChunkLocation,
    header: &ChunkHeader,
    recv: &mut quinn::RecvStream,
) -> Result<[u8; 32], StreamEnd> {
    let Some(file) = active.files.get(loc.file).and_then(Option::as_ref) else {
        return Err(LinkError::Lost(format!(
            "file {} of transfer {} is already final",
            loc.file, header.transfer_id
        ))
        .into());
    };
    let e = match gather(gw, file, loc, header, &|| active.cancelled(), recv).await {
        Ok(digest) => return Ok(digest),
        Err(Gather::End(e)) => return Err(e),
        Err(Gather::Write(e)) => e,
    };
    match super::storage_code(&e.source) {
        ErrorCode::NoSpace => {
            active.no_space.store(true, Ordering::SeqCst);
            metrics::counter!("baylink_spool_full_total").increment(1);
        }
        ErrorCode::Refused => {
            // This transfer cannot be stored here, whatever is retried: refuse it now with
            // the cause (the control stream records the refusal and sends it; the edge
            // stops at once).
            let f = &active.manifest.files[loc.file];
            let text = format!(
                "the gateway cannot store file {} of the transfer ({} bytes): {}",
                loc.file + 1,
                f.size,
                e.source
            );
            warn!(transfer = %header.transfer_id, error = %e, cause = %e.source,
                  "spool write refused: the transfer is refused");
            active
                .receiver
                .lock()
                .expect("receiver lock poisoned")
                .abort(ErrorCode::Refused, text);
        }
        _ => warn!(error = %e, cause = %e.source, "spool write failed"),
    }
    Err(LinkError::Lost(format!("spool write failed: {e}: {}", e.source)).into())
}

/// Reads a chunk's `loc.len` bytes from its stream into `file` at `loc.offset`, hashing them
/// on the way; stops when `cancelled` says so. Returns only once every write it started has
/// finished, whatever the outcome: a write still on its way after the chunk was given up
/// could land over the bytes of a later, verified copy of the same chunk.
async fn gather(
    gw: &Arc<Gateway>,
    file: &Arc<SpoolFile>,
    loc: &baylink_net::proto::ChunkLocation,
    header: &ChunkHeader,
    cancelled: &(dyn Fn() -> bool + Sync),
    recv: &mut quinn::RecvStream,
) -> Result<[u8; 32], Gather> {
    let mut writes = tokio::task::JoinSet::new();
    let read = read_chunk(gw, file, loc, header, cancelled, recv, &mut writes).await;
    let mut failed = None;
    while let Some(res) = writes.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed.get_or_insert(Gather::Write(e));
            }
            Err(e) => {
                failed.get_or_insert(LinkError::Lost(format!("spool write task: {e}")).into());
            }
        }
    }
    let digest = read?;
    match failed {
        Some(e) => Err(e),
        None => Ok(digest),
    }
}

/// The reading half of [`gather`]: the stream's bytes, hashed, each full buffer's write
/// started in `writes`.
async fn read_chunk(
    gw: &Arc<Gateway>,
    file: &Arc<SpoolFile>,
    loc: &baylink_net::proto::ChunkLocation,
    header: &ChunkHeader,
    cancelled: &(dyn Fn() -> bool + Sync),
    recv: &mut quinn::RecvStream,
    writes: &mut tokio::task::JoinSet<Result<(), baylink_net::spool::SpoolError>>,
) -> Result<[u8; 32], Gather> {
    let stall = gw.chunk_stall_timeout;
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut offset = loc.offset;
    let mut remaining = loc.len as usize;
    let mut buf = Some(gw.spool.buffer().await);
    // quinn hands out about one packet per piece; taking a batch per call keeps the
    // connection lock and the task wake-ups per packet down. Each full pool buffer is hashed
    // in one pass, then written.
    let mut pieces: [Bytes; 32] = Default::default();
    while remaining > 0 {
        let Some(n) = within(stall, recv.read_chunks(&mut pieces)).await? else {
            return Err(
                LinkError::Lost(format!("chunk {} stream ended short", header.index)).into(),
            );
        };
        for piece in &mut pieces[..n] {
            let mut data = std::mem::take(piece);
            if data.len() > remaining {
                return Err(ProtoError::TrailingBytes {
                    what: "chunk stream",
                    count: data.len() - remaining,
                }
                .into());
            }
            while !data.is_empty() {
                let b = buf.as_mut().expect("a buffer is held while bytes remain");
                let taken = b.fill_from(&data);
                data.advance(taken);
                remaining -= taken;
                if !b.is_full() && remaining > 0 {
                    continue;
                }
                if cancelled() {
                    return Err(LinkError::Lost("transfer taken over".into()).into());
                }
                let full = buf.take().expect("held");
                hasher.update(&full);
                let at = offset;
                offset += full.len() as u64;
                let spool = gw.spool.clone();
                let file = file.clone();
                writes.spawn(async move { spool.write_at(&file, at, full).await.map(drop) });
                if remaining > 0 {
                    buf = Some(gw.spool.buffer().await);
                }
            }
        }
    }
    // Nothing may follow the chunk's bytes on its stream.
    if within(stall, recv.read_chunk(1, true)).await?.is_some() {
        return Err(ProtoError::TrailingBytes {
            what: "chunk stream",
            count: 1,
        }
        .into());
    }
    Ok(hasher
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes"))
}
