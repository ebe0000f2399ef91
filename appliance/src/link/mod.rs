//! The transfer protocol over QUIC: drives `baylink_net::proto`'s state machines with real
//! streams and the io_uring spool.
//!
//! One bidirectional control stream per transfer carries frames; every chunk travels on its
//! own unidirectional stream (header, then exactly the chunk's bytes). The state machines
//! decide; this module only moves bytes and reports events back to them.
//!
//! Here: the edge's sending side ([`send`]) and the glue both roles share (errors, frame
//! writer and reader, the check at rest). The gateway's receiving side is
//! [`crate::gateway`].

pub mod early;
pub mod send;

use std::time::Duration;

use baylink_net::proto::{
    ChunkLocation, Digest, ErrorCode, Frame, FrameDecoder, Limits, ProtoError,
};
use baylink_net::spool::{Spool, SpoolError, SpoolFile};
use bytes::BytesMut;
use tokio::sync::mpsc;

/// QUIC application error code: normal close.
pub const CLOSE_OK: u32 = 0;
/// QUIC application error code: a data stream was not wanted (duplicate or stale).
pub const STOP_UNWANTED: u32 = 1;
/// QUIC application error code: a protocol violation.
pub const CLOSE_PROTOCOL: u32 = 2;
/// QUIC application error code: the appliance is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// QUIC application error code: a chunk stream was refused because its transfer was offered
/// on another connection (the transfer itself is not touched).
pub const STOP_OTHER_CONNECTION: u32 = 4;
/// QUIC application error code: a chunk stream brought no bytes for the stall timeout and
/// was reset; the chunk is sent again.
pub const STOP_STALLED: u32 = 5;

/// Something went wrong on the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection or a stream failed: the link is lost, retrying may help.
    #[error("link lost: {0}")]
    Lost(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtoError),
}

impl From<quinn::ConnectionError> for LinkError {
    fn from(e: quinn::ConnectionError) -> Self {
        LinkError::Lost(e.to_string())
    }
}
impl From<quinn::WriteError> for LinkError {
    fn from(e: quinn::WriteError) -> Self {
        LinkError::Lost(e.to_string())
    }
}
impl From<quinn::ReadError> for LinkError {
    fn from(e: quinn::ReadError) -> Self {
        LinkError::Lost(e.to_string())
    }
}
impl From<quinn::ReadExactError> for LinkError {
    fn from(e: quinn::ReadExactError) -> Self {
        LinkError::Lost(e.to_string())
    }
}
impl From<quinn::ClosedStream> for LinkError {
    fn from(e: quinn::ClosedStream) -> Self {
        LinkError::Lost(e.to_string())
    }
}

/// Writes frames on a control stream.
#[derive(Debug)]
pub struct FrameWriter {
    stream: quinn::SendStream,
    buf: BytesMut,
}

impl FrameWriter {
    /// Wraps the send half of a control stream.
    pub fn new(stream: quinn::SendStream) -> Self {
        FrameWriter {
            stream,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Encodes and writes one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        self.buf.clear();
        baylink_net::proto::encode(frame, &mut self.buf);
        self.stream.write_all(&self.buf).await?;
        Ok(())
    }

    /// Finishes the stream (no more frames).
    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }

    /// Ends the transfer from this side for a reason of its own: sends `Error` with `code`
    /// and `text`, finishes the stream and waits (at most [`GIVE_UP_TIMEOUT`]) until the
    /// peer acknowledged it. Stream data is retransmitted until acknowledged, unlike a
    /// connection's close frame, which a full receive buffer can drop: the peer then learns
    /// at once that the transfer is over instead of at its idle timeout. Best effort: a
    /// link that is already gone is not waited for.
    pub async fn give_up(&mut self, code: ErrorCode, text: &str) {
        let frame = Frame::Error {
            code,
            text: text.chars().take(1024).collect(),
        };
        if self.send(&frame).await.is_err() || self.stream.finish().is_err() {
            return;
        }
        let _ = tokio::time::timeout(GIVE_UP_TIMEOUT, self.stream.stopped()).await;
    }
}

/// How long [`FrameWriter::give_up`] waits for the peer to acknowledge the `Error` frame.
pub const GIVE_UP_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads frames from the receive half of a control stream on its own task, so a driver can
/// `select!` on frames and local events without cancelling a read half-way.
pub fn spawn_frame_reader(
    mut stream: quinn::RecvStream,
    limits: Limits,
) -> mpsc::Receiver<Result<Frame, LinkError>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut decoder = FrameDecoder::new(limits);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        if tx.send(Ok(frame)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(LinkError::Protocol(e))).await;
                        return;
                    }
                }
            }
            match stream.read(&mut buf).await {
                Ok(Some(n)) => decoder.push(&buf[..n]),
                Ok(None) => {
                    let _ = tx
                        .send(Err(LinkError::Lost("control stream closed by peer".into())))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    });
    rx
}

/// Reads one chunk back from a spool file and hashes it: the check against corruption at
/// rest (a disk that no longer returns what was written). With `uncached`, the file's cached
/// pages are dropped first so the bytes come from the device, not from the page cache that
/// served the read that failed.
pub async fn digest_at_rest(
    spool: &Spool,
    file: &SpoolFile,
    loc: &ChunkLocation,
    uncached: bool,
) -> Result<Digest, SpoolError> {
    if uncached {
        drop_cached_pages(file.path(), loc);
    }
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let end = loc.offset + u64::from(loc.len);
    let mut offset = loc.offset;
    while offset < end {
        let buf = spool.buffer().await;
        let want = usize::try_from((end - offset).min(buf.capacity() as u64))
            .expect("bounded by the buffer size");
        let buf = spool.read_at(file, offset, buf, want).await?;
        hasher.update(&buf);
        offset += buf.len() as u64;
        if buf.len() < want {
            break; // short file: the digest cannot match, which is the answer
        }
    }
    Ok(hasher
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes"))
}

/// Best effort: asks the kernel to forget the cached pages of a chunk (written-back pages
/// only; dirty ones stay, which is right: they are what was written).
fn drop_cached_pages(path: &std::path::Path, loc: &ChunkLocation) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    if let Ok(f) = std::fs::File::open(path) {
        let Ok(off) = i64::try_from(loc.offset) else {
            return;
        };
        let _ = posix_fadvise(
            &f,
            off,
            i64::from(loc.len),
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}
