//! The `quinn` contestant: raw quinn, memory → memory, the ceiling baylink is measured
//! against.
//!
//! It has baylink's protocol shape and exactly baylink's transport set-up
//! (`baylink_net::transport`: the same TLS, windows, socket buffers and congestion
//! controller, from the dev-env's configs), but no disk, no hashing and no signatures:
//!
//! - the source opens one bidirectional control stream and sends a [`ControlHeader`];
//! - then one unidirectional stream per chunk (an 8-byte [`StreamHeader`], then the chunk
//!   bytes straight from one memory buffer), at most `max_in_flight` chunks unacknowledged;
//! - the sink reads every chunk stream to its end with `read_chunk`, counting and discarding,
//!   and acknowledges the chunk's index (u32, big-endian) on the control stream;
//! - with `--sha256` (the `quinn_sha256` contestant) the source computes each chunk's SHA-256
//!   before it connects and sends it after the stream header, and the sink hashes every byte
//!   as it arrives and acknowledges a chunk only when the digests match. That is the least a
//!   receiver that verifies every byte on arrival must do, and so the ceiling for baylink's
//!   gateway on the same machine: what it costs here is the price of verification, not of
//!   baylink;
//! - chunk latency is stream open → acknowledgement received, at the source.
//!
//! Sink and source run as two child processes of the bench (`quinn-sink`, `quinn-source`),
//! each on a two-worker tokio runtime like the appliance, and each prints one JSON line when
//! it ends, with its own CPU time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use baylink_net::transport::{self, Congestion, LinkTuning, TlsIdentity};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::payload::PseudoRandom;
use crate::proc;

/// Largest chunk the sink accepts (the protocol's `Limits::max_chunk_size` default).
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;
/// Most chunks one transfer may have (bounds the sink's bitmap: 2 MiB).
pub const MAX_CHUNKS: u32 = 1 << 24;
/// How long the sink waits for the source to close after the last acknowledgement.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long a child may take to start (sink: until it listens).
const START_LIMIT: Duration = Duration::from_secs(30);
/// Extra time the parent grants over the source's own time limit before killing it.
const KILL_GRACE: Duration = Duration::from_secs(30);

/// First message on the control stream: what the source is about to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlHeader {
    /// Number of chunks (= unidirectional streams).
    pub chunks: u32,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// Total payload bytes.
    pub total: u64,
    /// Every stream header is followed by the chunk's SHA-256, which the sink checks.
    pub sha256: bool,
}

impl ControlHeader {
    /// Magic and version.
    const MAGIC: [u8; 4] = *b"BLQ1";
    /// Encoded length.
    pub const LEN: usize = 21;
    /// Flags bit: chunks carry a SHA-256.
    const FLAG_SHA256: u8 = 1;

    /// The header for `total` bytes in chunks of `chunk_size`, without digests.
    pub fn new(total: u64, chunk_size: u32) -> anyhow::Result<ControlHeader> {
        ensure!(
            (1..=MAX_CHUNK_SIZE).contains(&chunk_size),
            "chunk size {chunk_size} is not in 1..={MAX_CHUNK_SIZE}"
        );
        let chunks = total.div_ceil(u64::from(chunk_size));
        let chunks = u32::try_from(chunks)
            .ok()
            .filter(|&c| c <= MAX_CHUNKS)
            .with_context(|| format!("{chunks} chunks is more than {MAX_CHUNKS}"))?;
        Ok(ControlHeader {
            chunks,
            chunk_size,
            total,
            sha256: false,
        })
    }

    /// Wire form: magic, chunks, chunk size, total (big-endian), flags.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&Self::MAGIC);
        out[4..8].copy_from_slice(&self.chunks.to_be_bytes());
        out[8..12].copy_from_slice(&self.chunk_size.to_be_bytes());
        out[12..20].copy_from_slice(&self.total.to_be_bytes());
        out[20] = if self.sha256 { Self::FLAG_SHA256 } else { 0 };
        out
    }

    /// Parses and checks a header from the wire.
    pub fn decode(bytes: &[u8; Self::LEN]) -> anyhow::Result<ControlHeader> {
        ensure!(bytes[..4] == Self::MAGIC, "bad control header magic");
        let word = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut total = [0u8; 8];
        total.copy_from_slice(&bytes[12..20]);
        let flags = bytes[20];
        ensure!(
            flags & !Self::FLAG_SHA256 == 0,
            "unknown control header flags {flags:#04x}"
        );
        let claimed = ControlHeader {
            chunks: word(4),
            chunk_size: word(8),
            total: u64::from_be_bytes(total),
            sha256: flags & Self::FLAG_SHA256 != 0,
        };
        let expected = ControlHeader {
            sha256: claimed.sha256,
            ..ControlHeader::new(claimed.total, claimed.chunk_size)?
        };
        ensure!(
            expected == claimed,
            "control header claims {} chunks, size and chunk size give {}",
            claimed.chunks,
            expected.chunks
        );
        Ok(claimed)
    }

    /// Length of chunk `index` (the last one may be short). `index` must be < `chunks`.
    pub fn chunk_len(&self, index: u32) -> u32 {
        let start = u64::from(index) * u64::from(self.chunk_size);
        let len = self
            .total
            .saturating_sub(start)
            .min(u64::from(self.chunk_size));
        // len <= chunk_size, a u32.
        u32::try_from(len).unwrap_or(self.chunk_size)
    }
}

/// First 8 bytes of every chunk stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// Chunk index.
    pub index: u32,
    /// Chunk length (bytes that follow).
    pub len: u32,
}

impl StreamHeader {
    /// Encoded length.
    pub const LEN: usize = 8;

    /// Wire form: index, len (big-endian).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&self.index.to_be_bytes());
        out[4..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Parses a header and checks it against the transfer.
    pub fn decode(
        bytes: &[u8; Self::LEN],
        control: &ControlHeader,
    ) -> anyhow::Result<StreamHeader> {
        let index = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        ensure!(index < control.chunks, "chunk index {index} out of range");
        ensure!(
            len == control.chunk_len(index),
            "chunk {index} claims {len} bytes, expected {}",
            control.chunk_len(index)
        );
        Ok(StreamHeader { index, len })
    }
}

/// TLS identity and trust of one side (PEM files; the dev-env's `pki/`).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// CA certificate(s) to trust for the peer.
    #[arg(long)]
    pub ca: PathBuf,
    /// This side's certificate chain.
    #[arg(long)]
    pub cert: PathBuf,
    /// This side's private key.
    #[arg(long)]
    pub key: PathBuf,
}

impl TlsArgs {
    fn load(
        &self,
    ) -> anyhow::Result<(Vec<rustls_pki_types::CertificateDer<'static>>, TlsIdentity)> {
        let ca = transport::load_ca(&self.ca)?;
        let identity = TlsIdentity::from_pem_files(&self.cert, &self.key)?;
        Ok((ca, identity))
    }

    fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        for (flag, path) in [
            ("--ca", &self.ca),
            ("--cert", &self.cert),
            ("--key", &self.key),
        ] {
            out.push(flag.into());
            out.push(path.into());
        }
        out
    }
}

/// Congestion controller (as in the appliance's `link.congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CongestionArg {
    /// CUBIC.
    Cubic,
    /// BBR (quinn's experimental BBRv1).
    Bbr,
    /// baylink's `link` controller (rate-capped at the link rate, delay-based).
    Link,
}

/// `baylink_net::transport::LinkTuning` on the command line (the appliance's `[link]`).
#[derive(Debug, Clone, Args)]
pub struct TuningArgs {
    /// Expected link rate (sizes the windows).
    #[arg(long, default_value_t = 1000)]
    pub link_rate_mbit: u64,
    /// Expected round-trip time (sizes the windows).
    #[arg(long, default_value_t = 10)]
    pub link_rtt_ms: u64,
    /// Congestion controller.
    #[arg(long, value_enum, default_value = "cubic")]
    pub congestion: CongestionArg,
    /// Requested SO_RCVBUF/SO_SNDBUF.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub socket_buffer_bytes: usize,
    /// IP MTU the link is known to carry (`link.mtu`); unset: probe from 1200-byte packets.
    #[arg(long)]
    pub mtu: Option<u16>,
    /// Largest IP MTU probed for (`link.max_mtu`).
    #[arg(long, default_value_t = baylink_net::transport::DEFAULT_MAX_MTU)]
    pub max_mtu: u16,
    /// Wait after a read that emptied the socket, ms (`link.receive_hold_ms`; default: as
    /// baylink chooses for --link-rtt-ms).
    #[arg(long)]
    pub receive_hold_ms: Option<u64>,
}

impl TuningArgs {
    /// The tuning these flags describe.
    pub fn tuning(&self) -> LinkTuning {
        LinkTuning {
            rate_mbit: self.link_rate_mbit,
            rtt_ms: self.link_rtt_ms,
            congestion: match self.congestion {
                CongestionArg::Cubic => Congestion::Cubic,
                CongestionArg::Bbr => Congestion::Bbr,
                CongestionArg::Link => Congestion::Link,
            },
            socket_buffer_bytes: self.socket_buffer_bytes,
            mtu: self.mtu,
            max_mtu: self.max_mtu,
            receive_hold: LinkTuning::receive_hold_for(self.receive_hold_ms, self.link_rtt_ms),
        }
    }

    /// Flags that reproduce `tuning` in a child.
    pub fn to_args(tuning: &LinkTuning) -> Vec<std::ffi::OsString> {
        let congestion = tuning.congestion.name();
        [
            "--link-rate-mbit".to_owned(),
            tuning.rate_mbit.to_string(),
            "--link-rtt-ms".to_owned(),
            tuning.rtt_ms.to_string(),
            "--congestion".to_owned(),
            congestion.to_owned(),
            "--socket-buffer-bytes".to_owned(),
            tuning.socket_buffer_bytes.to_string(),
            "--max-mtu".to_owned(),
            tuning.max_mtu.to_string(),
            "--receive-hold-ms".to_owned(),
            tuning.receive_hold_ms().to_string(),
        ]
        .into_iter()
        .chain(
            tuning
                .mtu
                .into_iter()
                .flat_map(|m| ["--mtu".to_owned(), m.to_string()]),
        )
        .map(Into::into)
        .collect()
    }
}

/// `baylink-bench quinn-sink`: accept one connection, receive, acknowledge, report.
#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
    /// UDP address to listen on (port 0: any free port; the ready line names it).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// `baylink-bench quinn-source`: connect, send `size` bytes from memory, report.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub tuning: TuningArgs,
    /// The sink's UDP address.
    #[arg(long)]
    pub connect: SocketAddr,
    /// TLS server name to verify the sink's certificate against.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Payload bytes.
    #[arg(long)]
    pub size: u64,
    /// Chunk size (one stream per chunk).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub chunk_size: u32,
    /// Chunks in flight (sent, not yet acknowledged).
    #[arg(long, default_value_t = 8)]
    pub max_in_flight: usize,
    /// Stop after this many seconds and report what was acknowledged by then.
    #[arg(long, default_value_t = 300.0)]
    pub time_limit: f64,
    /// Send each chunk's SHA-256 ahead of it; the sink hashes every byte and checks it.
    #[arg(long)]
    pub sha256: bool,
}

/// The sink's first line: where it listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkReady {
    /// Bound address.
    pub listening: SocketAddr,
}

/// The sink's last line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkReport {
    /// Always `sink`.
    pub role: String,
    /// Chunk payload bytes received in complete chunks.
    pub bytes: u64,
    /// Chunks received and acknowledged.
    pub chunks: u32,
    /// Whether every announced chunk arrived.
    pub complete: bool,
    /// getrusage(RUSAGE_SELF) user + system at exit.
    pub cpu_seconds: f64,
}

/// Chunk latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LatencyUs {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

impl LatencyUs {
    fn from_histogram(h: &Histogram<u64>) -> Option<LatencyUs> {
        (!h.is_empty()).then(|| LatencyUs {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        })
    }
}

/// quinn's view of the path at the end of the transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathReport {
    /// Smoothed RTT in microseconds.
    pub rtt_us: u64,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Congestion events.
    pub congestion_events: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes of the packets declared lost (their frames were sent again).
    #[serde(default)]
    pub lost_bytes: u64,
    /// UDP payload bytes sent (every QUIC packet, headers and retransmissions included).
    #[serde(default)]
    pub udp_tx_bytes: u64,
    /// Path MTU in use.
    pub mtu: u16,
}

/// The source's last line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceReport {
    /// Always `source`.
    pub role: String,
    /// Payload bytes acknowledged by the sink.
    pub bytes: u64,
    /// Chunks acknowledged.
    pub chunks: u32,
    /// Connect → last acknowledgement (or → the time limit).
    pub seconds: f64,
    /// Whether the time limit stopped the transfer.
    pub timed_out: bool,
    /// Chunk latency (stream open → acknowledgement).
    pub chunk_latency_us: Option<LatencyUs>,
    /// getrusage(RUSAGE_SELF) user + system at exit.
    pub cpu_seconds: f64,
    /// quinn path statistics.
    pub path: PathReport,
}

/// The runtime both children use: multi-thread, two workers, like the appliance.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn print_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Entry point of `baylink-bench quinn-sink`.
pub fn sink_main(args: &SinkArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let mut report = rt.block_on(run_sink(args, |listening| {
        print_line(&SinkReady { listening })
    }))?;
    drop(rt);
    report.cpu_seconds = proc::self_cpu_seconds()?;
    print_line(&report)
}

/// Entry point of `baylink-bench quinn-source`.
pub fn source_main(args: &SourceArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let mut report = rt.block_on(run_source(args))?;
    drop(rt);
    report.cpu_seconds = proc::self_cpu_seconds()?;
    print_line(&report)
}

/// Bytes and chunks the sink has fully received.
#[derive(Debug, Default)]
struct SinkTally {
    bytes: AtomicU64,
    chunks: AtomicU32,
}

/// Listens, calls `ready` with the bound address, receives one transfer and returns the
/// report (its `cpu_seconds` is left 0 for the caller to fill).
pub async fn run_sink(
    args: &SinkArgs,
    ready: impl FnOnce(SocketAddr) -> anyhow::Result<()>,
) -> anyhow::Result<SinkReport> {
    let (ca, identity) = args.tls.load()?;
    let endpoint = transport::server_endpoint(
        args.listen,
        &ca,
        &transport::ClientNames::AnyFromCa,
        &identity,
        &args.tuning.tuning(),
    )?;
    ready(endpoint.local_addr().context("no local address")?)?;
    let incoming = endpoint.accept().await.context("endpoint closed")?;
    let connection = incoming.await.context("QUIC handshake")?;

    let tally = Arc::new(SinkTally::default());
    let outcome = receive(&connection, &tally).await;
    let complete = match outcome {
        Ok(()) => true,
        // The source stopped early (time limit) and closed the connection.
        Err(_) if closed_by_peer(&connection) => false,
        Err(e) => return Err(e),
    };
    // The source closes once it has every acknowledgement.
    let _ = tokio::time::timeout(CLOSE_WAIT, connection.closed()).await;
    endpoint.close(0u32.into(), b"done");
    Ok(SinkReport {
        role: "sink".to_owned(),
        bytes: tally.bytes.load(Ordering::SeqCst),
        chunks: tally.chunks.load(Ordering::SeqCst),
        complete,
        cpu_seconds: 0.0,
    })
}

/// The source went away: it closed the connection, or (on a lossy emulated link, where its
/// single CONNECTION_CLOSE can be lost) the connection idled out after it stopped. Whether
/// the run counts is decided from the source's own report (time limit or not).
fn closed_by_peer(connection: &quinn::Connection) -> bool {
    matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::TimedOut)
    )
}

/// Which chunks arrived (a duplicate is a protocol error).
#[derive(Debug)]
struct ChunkBitmap(Mutex<Vec<u64>>);

impl ChunkBitmap {
    fn new(chunks: u32) -> ChunkBitmap {
        // chunks <= MAX_CHUNKS, checked by ControlHeader::decode.
        ChunkBitmap(Mutex::new(vec![0; (chunks as usize).div_ceil(64)]))
    }

    /// Marks `index`; false if it was already marked.
    fn insert(&self, index: u32) -> bool {
        let mut words = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        match words.get_mut(word) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                true
            }
            _ => false,
        }
    }
}

async fn receive(connection: &quinn::Connection, tally: &Arc<SinkTally>) -> anyhow::Result<()> {
    let (mut control_send, mut control_recv) =
        connection.accept_bi().await.context("no control stream")?;
    let mut head = [0u8; ControlHeader::LEN];
    control_recv
        .read_exact(&mut head)
        .await
        .context("cannot read the control header")?;
    let header = ControlHeader::decode(&head)?;
    let seen = Arc::new(ChunkBitmap::new(header.chunks));

    // Every reader reports its chunk index (or its error) here; the ack loop forwards it.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<anyhow::Result<u32>>();
    let mut readers = JoinSet::new();
    let accept_loop = async {
        for _ in 0..header.chunks {
            let stream = connection
                .accept_uni()
                .await
                .context("accepting a chunk stream")?;
            let (done_tx, seen, tally) = (done_tx.clone(), seen.clone(), tally.clone());
            readers.spawn(async move {
                let result = read_chunk_stream(stream, &header, &seen, &tally).await;
                let _ = done_tx.send(result);
            });
        }
        Ok::<(), anyhow::Error>(())
    };
    let ack_loop = async {
        for _ in 0..header.chunks {
            let index = done_rx.recv().await.context("chunk readers vanished")??;
            control_send
                .write_all(&index.to_be_bytes())
                .await
                .context("cannot acknowledge")?;
        }
        control_send.finish()?;
        Ok::<(), anyhow::Error>(())
    };
    tokio::try_join!(accept_loop, ack_loop)?;
    Ok(())
}

async fn read_chunk_stream(
    mut stream: quinn::RecvStream,
    control: &ControlHeader,
    seen: &ChunkBitmap,
    tally: &SinkTally,
) -> anyhow::Result<u32> {
    let mut head = [0u8; StreamHeader::LEN];
    stream
        .read_exact(&mut head)
        .await
        .context("cannot read a chunk header")?;
    let header = StreamHeader::decode(&head, control)?;
    let mut check = if control.sha256 {
        let mut expected = [0u8; 32];
        stream
            .read_exact(&mut expected)
            .await
            .with_context(|| format!("cannot read the digest of chunk {}", header.index))?;
        let hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        Some((expected, hasher))
    } else {
        None
    };
    let mut received = 0u64;
    while let Some(chunk) = stream
        .read_chunk(usize::MAX, true)
        .await
        .with_context(|| format!("reading chunk {}", header.index))?
    {
        if let Some((_, hasher)) = &mut check {
            hasher.update(&chunk.bytes);
        }
        received += chunk.bytes.len() as u64;
        ensure!(
            received <= u64::from(header.len),
            "chunk {} is longer than {} bytes",
            header.index,
            header.len
        );
    }
    ensure!(
        received == u64::from(header.len),
        "chunk {} ended after {received} of {} bytes",
        header.index,
        header.len
    );
    if let Some((expected, hasher)) = check {
        ensure!(
            hasher.finish().as_ref() == expected,
            "chunk {}: the SHA-256 of the bytes received does not match the digest sent with it",
            header.index
        );
    }
    ensure!(
        seen.insert(header.index),
        "chunk {} arrived twice",
        header.index
    );
    tally.bytes.fetch_add(received, Ordering::SeqCst);
    tally.chunks.fetch_add(1, Ordering::SeqCst);
    Ok(header.index)
}

/// What the source has had acknowledged so far (survives a time-limit cut).
#[derive(Debug)]
struct SourceProgress {
    bytes: AtomicU64,
    chunks: AtomicU32,
    latency_us: Mutex<Histogram<u64>>,
    /// Chunks in flight: index → when its stream was opened.
    in_flight: Mutex<HashMap<u32, Instant>>,
}

/// Connects, sends `args.size` bytes as chunk streams, and returns the report (its
/// `cpu_seconds` is left 0 for the caller to fill).
pub async fn run_source(args: &SourceArgs) -> anyhow::Result<SourceReport> {
    let (ca, identity) = args.tls.load()?;
    let header = ControlHeader {
        sha256: args.sha256,
        ..ControlHeader::new(args.size, args.chunk_size)?
    };
    ensure!(
        (1..=transport::MAX_CHUNK_STREAMS as usize).contains(&args.max_in_flight),
        "--max-in-flight {} is not in 1..={}",
        args.max_in_flight,
        transport::MAX_CHUNK_STREAMS
    );
    ensure!(
        args.time_limit.is_finite() && args.time_limit > 0.0,
        "--time-limit must be positive"
    );
    let bind: SocketAddr = if args.connect.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let endpoint = transport::client_endpoint(bind, &ca, &identity, &args.tuning.tuning())?;
    let data = Bytes::from(PseudoRandom::new(0xba71_1ec0).bytes(args.chunk_size as usize));
    // Every chunk is a prefix of `data`: at most two lengths, hashed before the clock starts
    // (baylink hashes while sealing, which its link time does not include either).
    let digests = args.sha256.then(|| ChunkDigests::new(&header, &data));
    let progress = SourceProgress {
        bytes: AtomicU64::new(0),
        chunks: AtomicU32::new(0),
        latency_us: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3)?),
        in_flight: Mutex::new(HashMap::new()),
    };

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.time_limit);
    let connection =
        tokio::time::timeout_at(deadline, endpoint.connect(args.connect, &args.server_name)?)
            .await
            .context("QUIC handshake did not finish within the time limit")?
            .context("QUIC handshake")?;
    let outcome = tokio::time::timeout_at(
        deadline,
        send_chunks(
            &connection,
            &header,
            &data,
            digests.as_ref(),
            args.max_in_flight,
            &progress,
        ),
    )
    .await;
    let seconds = start.elapsed().as_secs_f64();
    let timed_out = match outcome {
        Ok(result) => {
            result?;
            false
        }
        Err(_) => true,
    };
    let all = connection.stats();
    let stats = all.path;
    connection.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;

    let latency = progress
        .latency_us
        .lock()
        .map(|h| LatencyUs::from_histogram(&h))
        .unwrap_or(None);
    Ok(SourceReport {
        role: "source".to_owned(),
        bytes: progress.bytes.load(Ordering::SeqCst),
        chunks: progress.chunks.load(Ordering::SeqCst),
        seconds,
        timed_out,
        chunk_latency_us: latency,
        cpu_seconds: 0.0,
        path: PathReport {
            rtt_us: u64::try_from(stats.rtt.as_micros()).unwrap_or(u64::MAX),
            cwnd: stats.cwnd,
            congestion_events: stats.congestion_events,
            sent_packets: stats.sent_packets,
            lost_packets: stats.lost_packets,
            lost_bytes: stats.lost_bytes,
            udp_tx_bytes: all.udp_tx.bytes,
            mtu: stats.current_mtu,
        },
    })
}

/// The SHA-256 of each chunk length a transfer has (every chunk is a prefix of one buffer).
#[derive(Debug)]
struct ChunkDigests {
    full: [u8; 32],
    last: [u8; 32],
}

impl ChunkDigests {
    fn new(header: &ControlHeader, data: &[u8]) -> ChunkDigests {
        let last = header.chunks.saturating_sub(1);
        ChunkDigests {
            full: sha256(&data[..header.chunk_size as usize]),
            last: sha256(&data[..header.chunk_len(last) as usize]),
        }
    }

    fn of(&self, header: &ControlHeader, index: u32) -> [u8; 32] {
        if index + 1 == header.chunks {
            self.last
        } else {
            self.full
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

async fn send_chunks(
    connection: &quinn::Connection,
    header: &ControlHeader,
    data: &Bytes,
    digests: Option<&ChunkDigests>,
    max_in_flight: usize,
    progress: &SourceProgress,
) -> anyhow::Result<()> {
    let (mut control_send, mut control_recv) = connection
        .open_bi()
        .await
        .context("cannot open the control stream")?;
    control_send.write_all(&header.encode()).await?;
    let window = Semaphore::new(max_in_flight);
    let mut writers = JoinSet::new();

    let send_loop = async {
        for index in 0..header.chunks {
            window.acquire().await?.forget();
            while let Some(done) = writers.try_join_next() {
                done??;
            }
            let len = header.chunk_len(index);
            lock(&progress.in_flight).insert(index, Instant::now());
            let mut stream = connection
                .open_uni()
                .await
                .context("cannot open a chunk stream")?;
            let chunk = data.slice(..len as usize);
            let digest = digests.map(|d| d.of(header, index));
            writers.spawn(async move {
                stream
                    .write_all(&StreamHeader { index, len }.encode())
                    .await?;
                if let Some(digest) = digest {
                    stream.write_all(&digest).await?;
                }
                stream.write_chunk(chunk).await?;
                stream.finish()?;
                Ok::<(), anyhow::Error>(())
            });
        }
        while let Some(done) = writers.join_next().await {
            done??;
        }
        Ok::<(), anyhow::Error>(())
    };
    let ack_loop = async {
        let mut ack = [0u8; 4];
        for _ in 0..header.chunks {
            control_recv
                .read_exact(&mut ack)
                .await
                .context("cannot read an acknowledgement")?;
            let index = u32::from_be_bytes(ack);
            let opened = lock(&progress.in_flight).remove(&index).with_context(|| {
                format!("acknowledgement of chunk {index}, which is not in flight")
            })?;
            let micros = u64::try_from(opened.elapsed().as_micros()).unwrap_or(u64::MAX);
            lock(&progress.latency_us).saturating_record(micros.max(1));
            progress
                .bytes
                .fetch_add(u64::from(header.chunk_len(index)), Ordering::SeqCst);
            progress.chunks.fetch_add(1, Ordering::SeqCst);
            window.add_permits(1);
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::try_join!(send_loop, ack_loop)?;
    control_send.finish()?;
    // The sink finishes its side after the last acknowledgement: once that arrives it has
    // counted everything, and closing the connection cannot cut its report short.
    let rest = control_recv
        .read_to_end(16)
        .await
        .context("waiting for the sink to finish")?;
    ensure!(
        rest.is_empty(),
        "unexpected bytes after the last acknowledgement"
    );
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the parent needs to run one sink/source pair.
#[derive(Debug, Clone)]
pub struct PairSettings {
    /// The bench executable (it runs itself as `quinn-sink` and `quinn-source`).
    pub exe: PathBuf,
    /// The sink's identity (the gateway's).
    pub sink_tls: TlsArgs,
    /// The source's identity (the edge's).
    pub source_tls: TlsArgs,
    /// The sink's link tuning (the gateway config's `[link]`).
    pub sink_tuning: LinkTuning,
    /// The source's link tuning (the edge config's `[link]`).
    pub source_tuning: LinkTuning,
    /// TLS name of the sink.
    pub server_name: String,
    /// Payload bytes.
    pub size: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// Chunks in flight.
    pub max_in_flight: usize,
    /// Chunks carry a SHA-256 that the sink checks (the `quinn_sha256` contestant).
    pub sha256: bool,
    /// The source stops itself after this long.
    pub time_limit: Duration,
    /// Where the children's stderr goes.
    pub log_dir: PathBuf,
    /// Network namespace of the sink (the receiving side of an emulated link), if any.
    pub sink_ns: Option<String>,
    /// Network namespace of the source (the sending side), if any.
    pub source_ns: Option<String>,
    /// Address the sink listens on (127.0.0.1, or side B's address of an emulated link).
    pub sink_ip: std::net::IpAddr,
}

/// Both children's reports for one run.
#[derive(Debug, Clone)]
pub struct PairOutcome {
    /// The source's report (throughput, latency, sender CPU).
    pub source: SourceReport,
    /// The sink's report (receiver CPU).
    pub sink: SinkReport,
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(name);
    std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
}

/// Runs one sink/source pair as child processes and collects their reports.
pub async fn run_pair(settings: &PairSettings, run: u32) -> anyhow::Result<PairOutcome> {
    let sink_log = format!("quinn-sink-{run}.log");
    let mut sink = crate::impair::link::command_in(settings.sink_ns.as_deref(), &settings.exe)
        .arg("quinn-sink")
        .args(settings.sink_tls.to_args())
        .args(TuningArgs::to_args(&settings.sink_tuning))
        .args([
            "--listen",
            &SocketAddr::new(settings.sink_ip, 0).to_string(),
        ])
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(&settings.log_dir, &sink_log)?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start quinn-sink")?;
    let sink_stdout = sink.stdout.take().context("quinn-sink has no stdout")?;
    let mut sink_lines = BufReader::new(sink_stdout).lines();
    let ready_line = tokio::time::timeout(START_LIMIT, sink_lines.next_line())
        .await
        .context("quinn-sink did not report its address in time")??
        .with_context(|| {
            format!(
                "quinn-sink exited before listening: {}",
                log_tail(&settings.log_dir.join(&sink_log))
            )
        })?;
    let ready: SinkReady = serde_json::from_str(&ready_line)
        .with_context(|| format!("quinn-sink said `{ready_line}`"))?;

    let source_log = format!("quinn-source-{run}.log");
    let source = crate::impair::link::command_in(settings.source_ns.as_deref(), &settings.exe)
        .arg("quinn-source")
        .args(settings.source_tls.to_args())
        .args(TuningArgs::to_args(&settings.source_tuning))
        .arg("--connect")
        .arg(ready.listening.to_string())
        .args(["--server-name", &settings.server_name])
        .args(["--size", &settings.size.to_string()])
        .args(["--chunk-size", &settings.chunk_size.to_string()])
        .args(["--max-in-flight", &settings.max_in_flight.to_string()])
        .args(settings.sha256.then_some("--sha256"))
        .args([
            "--time-limit",
            &settings.time_limit.as_secs_f64().to_string(),
        ])
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(&settings.log_dir, &source_log)?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start quinn-source")?;
    let output = tokio::time::timeout(settings.time_limit + KILL_GRACE, source.wait_with_output())
        .await
        .context("quinn-source overran its time limit and was killed")??;
    if !output.status.success() {
        bail!(
            "quinn-source failed ({}): {}",
            output.status,
            log_tail(&settings.log_dir.join(&source_log))
        );
    }
    let source: SourceReport = last_json_line(&output.stdout).context("quinn-source report")?;

    let sink_line = tokio::time::timeout(CLOSE_WAIT + KILL_GRACE, sink_lines.next_line())
        .await
        .context("quinn-sink did not report in time")??
        .with_context(|| {
            format!(
                "quinn-sink failed: {}",
                log_tail(&settings.log_dir.join(&sink_log))
            )
        })?;
    let sink_report: SinkReport = serde_json::from_str(&sink_line)
        .with_context(|| format!("quinn-sink said `{sink_line}`"))?;
    let status = tokio::time::timeout(KILL_GRACE, sink.wait())
        .await
        .context("quinn-sink did not exit")??;
    ensure!(status.success(), "quinn-sink exited with {status}");
    Ok(PairOutcome {
        source,
        sink: sink_report,
    })
}

/// Parses the last non-empty line of `stdout` as JSON.
pub fn last_json_line<T: serde::de::DeserializeOwned>(stdout: &[u8]) -> anyhow::Result<T> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no output")?;
    serde_json::from_str(line).with_context(|| format!("cannot parse `{line}`"))
}

/// The last few lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        format!("(nothing in {})", path.display())
    } else {
        format!("{tail} (log: {})", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    #[test]
    fn control_header_round_trips_and_refuses_lies() {
        let h = ControlHeader::new(10 * 1024 + 1, 1024).unwrap();
        assert_eq!(h.chunks, 11);
        assert_eq!(h.chunk_len(0), 1024);
        assert_eq!(h.chunk_len(10), 1);
        assert_eq!(ControlHeader::decode(&h.encode()).unwrap(), h);

        let empty = ControlHeader::new(0, 1024).unwrap();
        assert_eq!(empty.chunks, 0);

        let mut lie = h.encode();
        lie[7] = 200; // claims 200 chunks
        assert!(ControlHeader::decode(&lie).is_err());
        let mut magic = h.encode();
        magic[0] = b'X';
        assert!(ControlHeader::decode(&magic).is_err());
        let hashed = ControlHeader { sha256: true, ..h };
        assert_eq!(ControlHeader::decode(&hashed.encode()).unwrap(), hashed);
        let mut flags = h.encode();
        flags[20] = 0x02;
        let e = ControlHeader::decode(&flags).unwrap_err().to_string();
        assert!(e.contains("flags 0x02"), "{e}");
        assert!(ControlHeader::new(1, 0).is_err());
        assert!(ControlHeader::new(1, MAX_CHUNK_SIZE + 1).is_err());
        assert!(ControlHeader::new(u64::MAX, 1).is_err());
    }

    #[test]
    fn stream_header_is_checked_against_the_transfer() {
        let control = ControlHeader::new(2500, 1000).unwrap();
        let ok = StreamHeader { index: 2, len: 500 };
        assert_eq!(StreamHeader::decode(&ok.encode(), &control).unwrap(), ok);
        let out_of_range = StreamHeader { index: 3, len: 500 };
        assert!(StreamHeader::decode(&out_of_range.encode(), &control).is_err());
        let wrong_len = StreamHeader { index: 1, len: 500 };
        assert!(StreamHeader::decode(&wrong_len.encode(), &control).is_err());
    }

    #[test]
    fn bitmap_refuses_duplicates() {
        let b = ChunkBitmap::new(130);
        assert!(b.insert(0));
        assert!(b.insert(129));
        assert!(!b.insert(129));
        assert!(!b.insert(9999));
    }

    #[test]
    fn tuning_flags_round_trip() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            tuning: TuningArgs,
        }
        let tuning = LinkTuning {
            rate_mbit: 400,
            rtt_ms: 50,
            congestion: Congestion::Bbr,
            socket_buffer_bytes: 1 << 20,
            mtu: Some(1500),
            max_mtu: 1500,
            receive_hold: std::time::Duration::from_millis(2),
        };
        let mut argv = vec![std::ffi::OsString::from("t")];
        argv.extend(TuningArgs::to_args(&tuning));
        assert_eq!(T::parse_from(argv).tuning.tuning(), tuning);
    }

    /// Writes a CA, a server and a client certificate as PEM files into `dir`.
    fn write_pki(dir: &Path) -> (TlsArgs, TlsArgs) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "bench CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let leaf = |name: &str, server: bool| {
            let key = KeyPair::generate().unwrap();
            let names = if server {
                vec!["localhost".to_owned()]
            } else {
                Vec::new()
            };
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
            TlsArgs {
                ca: dir.join("ca.pem"),
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
            }
        };
        (leaf("gateway", true), leaf("edge", false))
    }

    fn tuning_args() -> TuningArgs {
        TuningArgs {
            link_rate_mbit: 1000,
            link_rtt_ms: 10,
            congestion: CongestionArg::Cubic,
            socket_buffer_bytes: 8 << 20,
            mtu: Some(9000),
            max_mtu: 9000,
            receive_hold_ms: None,
        }
    }

    type SinkTask = tokio::task::JoinHandle<anyhow::Result<SinkReport>>;

    /// Starts a sink; returns its task, its address and the source's TLS arguments.
    async fn start_sink(dir: &Path) -> (SinkTask, SocketAddr, TlsArgs) {
        let (sink_tls, source_tls) = write_pki(dir);
        let sink_args = SinkArgs {
            tls: sink_tls,
            tuning: tuning_args(),
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let sink = tokio::spawn(async move {
            run_sink(&sink_args, |addr| {
                addr_tx.send(addr).map_err(|_| anyhow::anyhow!("test gone"))
            })
            .await
        });
        (sink, addr_rx.await.unwrap(), source_tls)
    }

    async fn pair(
        size: u64,
        chunk_size: u32,
        max_in_flight: usize,
        sha256: bool,
    ) -> (SourceReport, SinkReport) {
        let dir = tempfile::tempdir().unwrap();
        let (sink, connect, tls) = start_sink(dir.path()).await;
        let source_args = SourceArgs {
            tls,
            tuning: tuning_args(),
            connect,
            server_name: "localhost".to_owned(),
            size,
            chunk_size,
            max_in_flight,
            time_limit: 60.0,
            sha256,
        };
        let source = run_source(&source_args).await.unwrap();
        let sink = sink.await.unwrap().unwrap();
        (source, sink)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sink_receives_every_chunk_and_source_times_each() {
        let size = 20 * (1 << 20) + 12_345;
        let (source, sink) = pair(size, 1 << 20, 8, false).await;
        assert_eq!(source.bytes, size);
        assert_eq!(source.chunks, 21);
        assert!(!source.timed_out);
        assert!(source.seconds > 0.0);
        let latency = source.chunk_latency_us.unwrap();
        assert!(latency.p50 >= 1 && latency.p50 <= latency.p99 && latency.p99 <= latency.max);
        assert_eq!(sink.bytes, size);
        assert_eq!(sink.chunks, 21);
        assert!(sink.complete);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_chunk_in_flight_and_an_empty_transfer_work() {
        let (source, sink) = pair(3 * 65_536, 65_536, 1, false).await;
        assert_eq!((source.chunks, sink.chunks), (3, 3));
        let (source, sink) = pair(0, 65_536, 8, false).await;
        assert_eq!((source.bytes, sink.bytes, sink.complete), (0, 0, true));
        assert!(source.chunk_latency_us.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashed_chunks_are_checked_including_a_short_last_one() {
        let size = 5 * (1 << 20) + 777;
        let (source, sink) = pair(size, 1 << 20, 4, true).await;
        assert_eq!((source.bytes, source.chunks), (size, 6));
        assert_eq!((sink.bytes, sink.chunks, sink.complete), (size, 6, true));
        let (source, sink) = pair(0, 65_536, 8, true).await;
        assert_eq!((source.bytes, sink.bytes, sink.complete), (0, 0, true));
    }

    /// A chunk whose bytes do not match the digest sent with it fails the sink, which never
    /// acknowledges it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_that_does_not_match_its_digest_fails_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, connect, tls) = start_sink(dir.path()).await;
        let (ca, identity) = tls.load().unwrap();
        let endpoint = transport::client_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &ca,
            &identity,
            &tuning_args().tuning(),
        )
        .unwrap();
        let connection = endpoint
            .connect(connect, "localhost")
            .unwrap()
            .await
            .unwrap();
        let header = ControlHeader {
            sha256: true,
            ..ControlHeader::new(1000, 1000).unwrap()
        };
        let (mut control, mut acks) = connection.open_bi().await.unwrap();
        control.write_all(&header.encode()).await.unwrap();
        let data = vec![7u8; 1000];
        let mut wrong = sha256(&data);
        wrong[31] ^= 1;
        let mut stream = connection.open_uni().await.unwrap();
        stream
            .write_all(
                &StreamHeader {
                    index: 0,
                    len: 1000,
                }
                .encode(),
            )
            .await
            .unwrap();
        stream.write_all(&wrong).await.unwrap();
        stream.write_all(&data).await.unwrap();
        stream.finish().unwrap();
        let e = sink.await.unwrap().unwrap_err();
        assert!(
            format!("{e:#}").contains("chunk 0: the SHA-256 of the bytes received does not match"),
            "{e:#}"
        );
        let mut ack = [0u8; 4];
        assert!(
            acks.read_exact(&mut ack).await.is_err(),
            "no acknowledgement"
        );
    }

    #[test]
    fn last_json_line_skips_blank_lines() {
        let v: serde_json::Value = last_json_line(b"{\"a\":1}\n{\"b\":2}\n\n").unwrap();
        assert_eq!(v["b"], 2);
        assert!(last_json_line::<serde_json::Value>(b"\n").is_err());
    }
}
