//! `baylink-bench`: end-to-end benchmark harness for baylink.
//!
//! `baylink-bench fairness` measures how two hospitals share the edge's send slots: hospital
//! B's study latency alone and beside hospital A's large transfer (see [`fairness`]).
//!
//! `baylink-bench orthanc` measures a CT study from the first C-STORE to the last instance
//! stored in Orthanc through baylink, beside `storescu` straight into the same Orthanc (see
//! [`orthanc`]).
//!
//! `baylink-bench handshake` measures QUIC handshakes per second and CPU per handshake with
//! PEM and HSM-held TLS keys (see [`handshake`]).
//!
//! `baylink-bench e2e` measures baylink (disk → disk, with policy, sealing, HSM signatures,
//! receipt verification and fsync) against raw quinn with the same transport set-up (memory →
//! memory, the ceiling) on one loopback deployment, and writes the figures as JSON and as a
//! table. The hidden subcommands `quinn-sink` and `quinn-source` are the two processes of the
//! quinn contestant; the bench runs itself as them.
//!
//! `--rtt-ms`, `--loss` and `--rate-mbit` put every contestant on an emulated link: the
//! `impair` subcommand (a userspace forwarder between two network namespaces, see
//! [`impair`]) runs as a child, receivers in namespace B, senders in namespace A. The scp
//! baselines (`scp_cubic`, `scp_bbr`) copy the same payload to an sshd the bench starts.

#![forbid(unsafe_code)]

mod baylink_run;
mod e2e;
mod env_config;
mod fairness;
mod handshake;
mod impair;
mod ingest;
mod orthanc;
mod payload;
mod proc;
mod quinn_pair;
mod report;
mod scp;
mod share;
/// Byte sizes on the command line, shared with `cargo xtask` (one parser for both).
#[path = "../../xtask/src/size.rs"]
#[allow(
    dead_code,
    reason = "`human` serves xtask; the benches print their own units"
)]
mod size;
mod sweep;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

const FIGURES: &str = "\
Figures (per contestant; the JSON also lists every run):
  Gbit/s         payload bits / seconds of the link phase, median of the runs (min, max:
                 slowest and fastest run).
                 quinn:   connect -> last chunk acknowledged, memory -> memory.
                 quinn_sha256: the same, but each chunk carries its SHA-256 and the sink
                          hashes every byte and acknowledges only a match: the most any
                          receiver that verifies each byte on arrival can reach here.
                 baylink: `transmit_seconds` of `baylink send`, end of the seal -> verified
                          receipt, which includes the gateway's fsync, commit and HSM-signed
                          receipt; when the send streamed chunks while sealing
                          (`streamed_bytes` > 0, the default) the link phase starts with the
                          seal, and the figure is the whole send's, sealing included.
  Gbit/s incl. seal
                 baylink only (JSON `gbit_per_s_including_seal`): payload bits / `seconds`,
                 the whole send, including sealing (copy into the edge spool + hashing).
  CPU s/GiB      CPU seconds (user + system) per GiB of payload, per side, median of runs.
                 quinn:   each child's own getrusage(RUSAGE_SELF) at exit (whole process,
                          TLS handshake included).
                 baylink: sender = getrusage(RUSAGE_CHILDREN) delta around the `send` child
                          (so sealing, hashing and HSM signing count); receiver = the gateway's
                          utime + stime from /proc/<pid>/stat, before the send and after the
                          delivered files appeared.
  chunk p50/p99  chunk latency in ms: stream open -> chunk acknowledged, at the sender,
                 recorded in an hdrhistogram per run; the figure is the median over runs of
                 each run's percentile.
  ratio_vs_quinn (JSON) median baylink Gbit/s / median quinn Gbit/s of the same invocation.
  ratio_vs_quinn_sha256, quinn_sha256_vs_quinn
                 (JSON) baylink / quinn_sha256, and quinn_sha256 / quinn: how much of the gap
                 to raw quinn is the cost of verifying every byte, and how much is baylink's.
  ratio_vs_scp*  (JSON) median baylink Gbit/s / median scp Gbit/s (cubic, bbr, and the
                 faster of the two for ratio_vs_scp).
  scp_cubic, scp_bbr
                 scp of the same files to an sshd started by the bench (own host key, checked
                 against a known_hosts file; own authorized key), TCP congestion control set
                 in the namespaces scp and sshd run in. Gbit/s: bytes at the destination /
                 seconds (at the time box if it overran). CPU: sender = scp + ssh
                 (RUSAGE_CHILDREN), receiver = sshd's reaped children (cutime + cstime).
  congestion     (JSON, per contestant and run) the congestion controller: quinn and
                 baylink `[link] congestion` (baylink's as `send --stats` reports it), scp the
                 TCP controller of its namespaces.
  retransmit     (JSON, per run; the summary has the medians retransmit_ratio and
                 retransmitted_bytes; the table's `retx` column is the ratio in % of payload)
                 quinn: the source's connection stats, path.lost_bytes (bytes of packets
                          declared lost, whose frames went out again), lost/sent packets,
                          udp_tx bytes.
                 baylink: the same figures from `baylink send --stats` (`link`), summed over
                          the send's connections.
                 scp:     an estimate: Tcp RetransSegs delta of the sender's namespace
                          (/proc/net/snmp) x MSS (MTU 1500 - 52).
                 ratio = retransmitted bytes / payload bytes.
  link.forwarder (JSON) the impairment forwarder's settings and per-direction counters
                 (forwarded, dropped_loss, dropped_queue, ...), totals over all contestants.

Runs alternate (quinn, quinn_sha256, baylink, quinn, ...) so drift of the machine hits both alike. Every
baylink run's delivered files are compared with the source by SHA-256. Each run is time-boxed
(--time-limit): quinn reports the rate it reached by then, a baylink run is killed and marked
timed_out. Exit status: 0 all runs gave figures or timed out, 1 a run failed, 2 the requested
link cannot be emulated here (needs root, /dev/net/tun and iproute2).";

/// End-to-end benchmark harness for baylink.
#[derive(Debug, Parser)]
#[command(name = "baylink-bench", version, after_help = FIGURES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compare baylink with raw quinn (the ceiling) on one loopback deployment.
    #[command(after_help = FIGURES)]
    E2e(e2e::E2eArgs),
    /// Emulate a network link between two network namespaces (delay, jitter, loss,
    /// reordering, duplication, rate) with a userspace forwarder.
    #[command(after_help = impair::IMPAIR_HELP)]
    Impair(impair::ImpairArgs),
    /// Upload files over the hospital HTTPS API with concurrent clients; throughput, latency,
    /// edge memory, and the ratio against `baylink send` of one large file.
    Ingest(ingest::IngestArgs),
    /// Two hospitals share the edge's send slots: one large transfer of hospital A, small
    /// studies of hospital B; B's latency alone and beside A, and A's throughput.
    Fairness(fairness::FairnessArgs),
    /// A CT study by C-STORE into the edge until its last instance is in Orthanc, beside
    /// storescu straight into the same Orthanc (the baseline a hospital has today).
    Orthanc(orthanc::OrthancArgs),
    /// QUIC + mutual-TLS handshakes per second and CPU per handshake on loopback, with PEM
    /// TLS keys and with TLS keys held in a SoftHSM token (same run).
    Handshake(handshake::HandshakeArgs),
    /// `baylink send` and one TCP flow (iperf3, BBR) through the same emulated link at once:
    /// each one's throughput over the overlap and the split; TCP alone and baylink alone for
    /// reference (needs root and iperf3).
    Share(share::ShareArgs),
    /// Every e2e contestant over the emulated link for a series of loss rates and of RTTs
    /// (one time-boxed e2e per point); JSON plus two SVG charts (needs root).
    Sweep(sweep::SweepArgs),
    /// (internal) The receiving process of the quinn contestant.
    #[command(hide = true)]
    QuinnSink(quinn_pair::SinkArgs),
    /// (internal) The sending process of the quinn contestant.
    #[command(hide = true)]
    QuinnSource(quinn_pair::SourceArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::E2e(args) => run_e2e(args),
        Command::Impair(args) => impair::main(&args),
        Command::Ingest(args) => run_ingest(args),
        Command::Fairness(args) => run_fairness(args),
        Command::Orthanc(args) => run_orthanc(args),
        Command::Share(args) => run_until_signal(share::run(args)),
        Command::Sweep(args) => run_until_signal(sweep::run(args)),
        Command::Handshake(args) => handshake::main(&args).map(|()| ExitCode::SUCCESS),
        Command::QuinnSink(args) => quinn_pair::sink_main(&args).map(|()| ExitCode::SUCCESS),
        Command::QuinnSource(args) => quinn_pair::source_main(&args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("baylink-bench: {e:#}");
        ExitCode::FAILURE
    })
}

/// The orchestrator itself is mostly idle: one thread is enough and keeps it off the cores
/// the contestants use.
fn run_e2e(args: e2e::E2eArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            result = e2e::run(args) => result,
            // Dropping the run kills every child (kill_on_drop) and removes the work dir.
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        }
    })
}

fn run_ingest(args: ingest::IngestArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            result = ingest::run(args) => result.map(|()| ExitCode::SUCCESS),
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = terminated() => anyhow::bail!("terminated"),
        }
    })
}

fn run_fairness(args: fairness::FairnessArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            result = fairness::run(args) => result.map(|()| ExitCode::SUCCESS),
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = terminated() => anyhow::bail!("terminated"),
        }
    })
}

fn run_orthanc(args: orthanc::OrthancArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            result = orthanc::run(args) => result.map(|()| ExitCode::SUCCESS),
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = terminated() => anyhow::bail!("terminated"),
        }
    })
}

/// Runs a bench on a one-thread runtime until it ends or SIGINT/SIGTERM (dropping it kills
/// its children, which are `kill_on_drop`).
fn run_until_signal(
    bench: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::select! {
            result = bench => result,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            _ = terminated() => anyhow::bail!("terminated"),
        }
    })
}

/// Resolves on SIGTERM (so `timeout` ends the run with its children killed on drop).
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
