//! `baylink-bench share`: `baylink send` and one TCP flow (iperf3, BBR by default) through
//! the same emulated link at the same time, each one's throughput over the overlap and the
//! split; TCP alone and baylink alone on the same link first, for reference.
//!
//! The TCP flow starts first (`--warmup` seconds ahead, so it has its share of the link when
//! baylink comes), runs until baylink's send has exited, and is then stopped with SIGINT
//! (iperf3 still writes its JSON). The overlap is baylink's link phase: from the send's exit
//! back by its link phase (`transmit_seconds`, or the whole send when it streamed chunks
//! while sealing). TCP's rate over it is the sum
//! of iperf3's per-interval bytes over the intervals wholly inside it; baylink's is its
//! payload over that link phase.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Args;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::baylink_run::{self, BaylinkRun, Deployment, Gateway, RunFailure, SendSettings};
use crate::e2e::{baylink_record, place_on_link, write_json};
use crate::impair::link::{EmulatedLink, Start, command_in};
use crate::impair::{ImpairArgs, Stats};
use crate::payload;
use crate::proc::{self, Machine};
use crate::report::RunRecord;
use crate::scp::AllowedCongestion;
use crate::size::parse_size;

/// iperf3's port inside namespace B.
const IPERF_PORT: u16 = 5201;
/// iperf3's reporting interval, seconds.
const IPERF_INTERVAL: &str = "0.5";

/// `baylink-bench share`.
#[derive(Debug, Clone, Args)]
pub struct ShareArgs {
    /// Emulated round-trip time, ms.
    #[arg(long, default_value_t = 50.0)]
    pub rtt_ms: f64,
    /// Emulated link rate per direction, Mbit/s of IP packets.
    #[arg(long, default_value_t = 400.0)]
    pub rate_mbit: f64,
    /// Emulated loss per direction, percent.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// baylink's payload (one file): bytes, or with a unit (MiB, GiB, ...).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    pub size: u64,
    /// `[link] congestion` of baylink (both sides of the bench's dev-env).
    #[arg(long, default_value = "link", value_parser = ["cubic", "bbr", "link"])]
    pub congestion: String,
    /// The competing TCP flow's congestion controller (iperf3 `-C`).
    #[arg(long, default_value = "bbr")]
    pub tcp_congestion: String,
    /// Seconds of the TCP-alone reference run.
    #[arg(long, default_value_t = 20)]
    pub tcp_seconds: u64,
    /// Seconds the TCP flow runs before baylink starts.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Time box of each baylink send, seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub time_limit: u64,
    /// Skip the two reference runs (TCP alone, baylink alone).
    #[arg(long)]
    pub no_reference: bool,
    /// Where to write the JSON report.
    #[arg(long)]
    pub json: PathBuf,
    /// The baylink binary (default: `baylink` next to this executable).
    #[arg(long)]
    pub baylink: Option<PathBuf>,
    /// Directory for the temporary deployment and payload (default: the system temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the temporary directory (logs, configs, iperf3 JSON).
    #[arg(long)]
    pub keep: bool,
}

/// One iperf3 run, as far as this bench reads it.
#[derive(Debug, Clone, Deserialize)]
struct IperfOutput {
    intervals: Vec<IperfInterval>,
    error: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct IperfInterval {
    sum: IperfSum,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
struct IperfSum {
    start: f64,
    end: f64,
    bytes: u64,
    #[serde(default)]
    retransmits: Option<u64>,
}

/// A TCP flow's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TcpFigures {
    /// Mbit/s of goodput over the window.
    pub mbit_per_s: Option<f64>,
    /// Seconds of the window (the iperf3 intervals counted).
    pub seconds: f64,
    /// Bytes in the window.
    pub bytes: u64,
    /// Segments retransmitted in the window (iperf3's `retransmits`).
    pub retransmits: Option<u64>,
    /// Every interval of the run (seconds since iperf3 started).
    pub intervals: Vec<IntervalFigure>,
}

/// One iperf3 interval.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct IntervalFigure {
    /// Start, seconds since iperf3 started.
    pub start: f64,
    /// End.
    pub end: f64,
    /// Mbit/s.
    pub mbit_per_s: f64,
}

/// TCP's figures over the intervals wholly inside `[from, to]` (seconds since iperf3 started;
/// `None`: every interval).
fn tcp_window(out: &IperfOutput, window: Option<(f64, f64)>) -> TcpFigures {
    let inside = |s: &IperfSum| window.is_none_or(|(from, to)| s.start >= from && s.end <= to);
    let mut bytes = 0;
    let mut seconds = 0.0;
    let mut retransmits: Option<u64> = None;
    for i in out.intervals.iter().map(|i| &i.sum).filter(|s| inside(s)) {
        bytes += i.bytes;
        seconds += i.end - i.start;
        if let Some(r) = i.retransmits {
            *retransmits.get_or_insert(0) += r;
        }
    }
    TcpFigures {
        mbit_per_s: (seconds > 0.0).then(|| bytes as f64 * 8.0 / seconds / 1e6),
        seconds,
        bytes,
        retransmits,
        intervals: out
            .intervals
            .iter()
            .map(|i| IntervalFigure {
                start: i.sum.start,
                end: i.sum.end,
                mbit_per_s: if i.sum.end > i.sum.start {
                    i.sum.bytes as f64 * 8.0 / (i.sum.end - i.sum.start) / 1e6
                } else {
                    0.0
                },
            })
            .collect(),
    }
}

/// The split over the overlap.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Split {
    /// Seconds of the overlap (baylink's `transmit_seconds`).
    pub overlap_seconds: f64,
    /// baylink's payload Mbit/s over its link phase.
    pub baylink_mbit_per_s: Option<f64>,
    /// TCP's goodput over the iperf3 intervals inside the overlap.
    pub tcp_mbit_per_s: Option<f64>,
    /// TCP / (TCP + baylink).
    pub tcp_share: Option<f64>,
    /// TCP / the link rate.
    pub tcp_of_line: Option<f64>,
    /// baylink / the link rate.
    pub baylink_of_line: Option<f64>,
    /// The issue's requirement: TCP keeps at least a quarter of the link.
    pub tcp_keeps_quarter: Option<bool>,
}

fn split(rate_mbit: f64, overlap: f64, baylink: Option<f64>, tcp: Option<f64>) -> Split {
    let of_line = |x: Option<f64>| x.map(|x| x / rate_mbit);
    Split {
        overlap_seconds: overlap,
        baylink_mbit_per_s: baylink,
        tcp_mbit_per_s: tcp,
        tcp_share: match (tcp, baylink) {
            (Some(t), Some(b)) if t + b > 0.0 => Some(t / (t + b)),
            _ => None,
        },
        tcp_of_line: of_line(tcp),
        baylink_of_line: of_line(baylink),
        tcp_keeps_quarter: tcp.map(|t| t >= rate_mbit / 4.0),
    }
}

/// The JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct ShareReport {
    /// The link.
    pub link: ShareLink,
    /// baylink's payload, bytes.
    pub size_bytes: u64,
    /// baylink's congestion controller.
    pub congestion: String,
    /// The TCP flow's congestion controller.
    pub tcp_congestion: String,
    /// TCP alone on the link (reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_alone: Option<TcpFigures>,
    /// baylink alone on the link (reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baylink_alone: Option<RunRecord>,
    /// baylink beside the TCP flow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baylink_shared: Option<RunRecord>,
    /// The TCP flow beside baylink, over the overlap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_shared: Option<TcpFigures>,
    /// The overlap: baylink's link phase relative to the TCP flow's start, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap_window_s: Option<(f64, f64)>,
    /// The split over the overlap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    /// The machine.
    pub machine: Machine,
    /// Why the bench did not finish, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The emulated link of `share`.
#[derive(Debug, Clone, Serialize)]
pub struct ShareLink {
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Rate, Mbit/s.
    pub rate_mbit: f64,
    /// Loss per direction, percent.
    pub loss_pct: f64,
    /// The forwarder's settings and counters, totals over the three phases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarder: Option<Stats>,
}

/// Runs the bench; exit 2 when the link cannot be emulated or iperf3 is missing.
pub async fn run(args: ShareArgs) -> anyhow::Result<ExitCode> {
    let mut report = ShareReport {
        link: ShareLink {
            rtt_ms: args.rtt_ms,
            rate_mbit: args.rate_mbit,
            loss_pct: args.loss,
            forwarder: None,
        },
        size_bytes: args.size,
        congestion: args.congestion.clone(),
        tcp_congestion: args.tcp_congestion.clone(),
        tcp_alone: None,
        baylink_alone: None,
        baylink_shared: None,
        tcp_shared: None,
        overlap_window_s: None,
        split: None,
        machine: Machine::current(),
        error: None,
    };
    ensure!(
        args.rate_mbit > 0.0 && args.rtt_ms >= 0.0 && (0.0..100.0).contains(&args.loss),
        "--rate-mbit must be > 0, --rtt-ms ≥ 0 and --loss a percentage below 100"
    );
    ensure!(args.size > 0, "--size must be at least one byte");
    if which("iperf3").is_none() {
        let message = "iperf3 is not installed (apt-get install iperf3)".to_owned();
        report.error = Some(message.clone());
        write_json(&args.json, &report)?;
        eprintln!("baylink-bench: {message}");
        return Ok(ExitCode::from(2));
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let baylink = args
        .baylink
        .clone()
        .unwrap_or_else(|| exe.with_file_name("baylink"));
    ensure!(
        baylink.is_file(),
        "no baylink binary at {} (build it, or pass --baylink PATH)",
        baylink.display()
    );
    let settings = ImpairArgs {
        rtt_ms: args.rtt_ms,
        jitter_ms: 0.0,
        loss: args.loss,
        reorder: 0.0,
        duplicate: 0.0,
        rate_mbit: args.rate_mbit,
        queue_kib: None,
        seed: 1,
        stats: None,
    }
    .settings();
    let start = {
        let exe = exe.clone();
        tokio::task::spawn_blocking(move || EmulatedLink::start(&exe, &settings)).await??
    };
    let link = match start {
        Start::Up(l) => l,
        Start::Unsupported(reason) => {
            let message = format!("the requested link cannot be emulated here: {reason}");
            report.error = Some(message.clone());
            write_json(&args.json, &report)?;
            eprintln!("baylink-bench: {message}");
            return Ok(ExitCode::from(2));
        }
    };
    eprintln!(
        "emulated link: namespace {} ({}) <-> namespace {} ({})",
        link.ns_a, link.addr_a, link.ns_b, link.addr_b
    );
    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("baylink-bench-share-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a work directory in {}", parent.display()))?;
    let result = phases(&args, &baylink, work.path(), &link, &mut report).await;
    match tokio::task::spawn_blocking(move || link.stop()).await? {
        Ok(stats) => report.link.forwarder = Some(stats),
        Err(e) => eprintln!("warning: impairment forwarder: {e:#}"),
    }
    if args.keep {
        eprintln!("kept {}", work.keep().display());
    }
    if let Err(e) = &result {
        report.error = Some(format!("{e:#}"));
    }
    write_json(&args.json, &report)?;
    print!("{}", table(&report));
    println!("JSON: {}", args.json.display());
    result.map(|()| ExitCode::SUCCESS)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// The three phases: TCP alone, baylink alone, both.
async fn phases(
    args: &ShareArgs,
    baylink: &Path,
    work: &Path,
    link: &EmulatedLink,
    report: &mut ShareReport,
) -> anyhow::Result<()> {
    let dir = work.join("env");
    let deployment = Deployment::create(baylink, &dir, baylink_run::probe_base_port()?).await?;
    drop(deployment);
    place_on_link(
        &dir,
        link.addr_b,
        args.rtt_ms,
        args.rate_mbit,
        Some(&args.congestion),
    )?;
    let deployment = Deployment::load(&dir)?;
    let payload_dir = work.join("payload");
    std::fs::create_dir(&payload_dir)?;
    let size = args.size;
    let files =
        tokio::task::spawn_blocking(move || payload::generate(&payload_dir, size, 1, 0x5ba2_e000))
            .await??;
    let _allowed = AllowedCongestion::ensure(&[args.tcp_congestion.as_str()])?;
    let mut gateway = Gateway::start(baylink, &deployment, work, Some(&link.ns_b)).await?;
    let send = SendSettings {
        baylink: baylink.to_owned(),
        deployment: deployment.clone(),
        payload: files,
        time_limit: Duration::from_secs(args.time_limit),
        work: work.to_owned(),
        sender_ns: Some(link.ns_a.clone()),
    };
    let mut server = command_in(Some(&link.ns_b), Path::new("iperf3"))
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the iperf3 server")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = |seconds: u64| {
        let mut cmd = command_in(Some(&link.ns_a), Path::new("iperf3"));
        cmd.args([
            "-c",
            &link.addr_b.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
        ])
        .args(["-C", &args.tcp_congestion, "-J", "-i", IPERF_INTERVAL])
        .args(["-t", &seconds.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        cmd
    };

    let result = async {
        if !args.no_reference {
            eprint!(
                "TCP ({}) alone, {} s ... ",
                args.tcp_congestion, args.tcp_seconds
            );
            let out = client(args.tcp_seconds)
                .output()
                .await
                .context("iperf3 client")?;
            let parsed = parse_iperf(&out.stdout)?;
            let figures = tcp_window(&parsed, None);
            eprintln!("{}", mbit(figures.mbit_per_s));
            report.tcp_alone = Some(figures);

            eprint!("baylink ({}) alone ... ", args.congestion);
            let record = baylink_once(&send, &mut gateway, 1).await;
            eprintln!("{}", mbit(record.gbit_per_s.map(|g| g * 1000.0)));
            report.baylink_alone = Some(record);
        }

        eprint!(
            "TCP ({}) and baylink ({}) together ... ",
            args.tcp_congestion, args.congestion
        );
        let mut tcp = client(args.time_limit + args.warmup + 60)
            .spawn()
            .context("iperf3 client")?;
        let tcp_started = Instant::now();
        let mut stdout = tcp.stdout.take().context("iperf3 stdout")?;
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            stdout.read_to_end(&mut out).await.map(|_| out)
        });
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        let outcome = baylink_run::run_once(&send, &mut gateway, 2).await;
        if let Some(pid) = tcp.id() {
            let _ = proc::signal(pid, Signal::SIGINT);
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), tcp.wait()).await;
        let _ = tcp.kill().await;
        let stdout = reader.await.context("iperf3 reader")??;
        let parsed = parse_iperf(&stdout)?;
        let (record, window) = match outcome {
            Ok(run) => {
                let window = overlap(&run, tcp_started);
                (baylink_record(2, &run), window)
            }
            Err(RunFailure::TimedOut) => (RunRecord::timed_out(2), None),
            Err(RunFailure::Failed(e)) => (RunRecord::failed(2, &e), None),
        };
        let tcp_figures = tcp_window(&parsed, window);
        eprintln!(
            "baylink {}, TCP {}",
            mbit(record.gbit_per_s.map(|g| g * 1000.0)),
            mbit(tcp_figures.mbit_per_s)
        );
        if let Some((from, to)) = window {
            report.split = Some(split(
                args.rate_mbit,
                to - from,
                record.gbit_per_s.map(|g| g * 1000.0),
                tcp_figures.mbit_per_s,
            ));
        }
        report.overlap_window_s = window;
        report.tcp_shared = Some(tcp_figures);
        report.baylink_shared = Some(record);
        anyhow::Ok(())
    }
    .await;
    let _ = server.kill().await;
    if let Err(e) = gateway.stop().await {
        eprintln!("warning: {e:#}");
    }
    result
}

/// baylink's link phase relative to the TCP flow's start: from the send's exit back by its
/// link phase ([`baylink_run::SendSummary::link_seconds`]).
fn overlap(run: &BaylinkRun, tcp_started: Instant) -> Option<(f64, f64)> {
    let end = run
        .exited
        .checked_duration_since(tcp_started)?
        .as_secs_f64();
    let transmit = run.summary.link_seconds()?;
    Some(((end - transmit).max(0.0), end))
}

async fn baylink_once(send: &SendSettings, gateway: &mut Gateway, run: u32) -> RunRecord {
    match baylink_run::run_once(send, gateway, run).await {
        Ok(outcome) => baylink_record(run, &outcome),
        Err(RunFailure::TimedOut) => RunRecord::timed_out(run),
        Err(RunFailure::Failed(e)) => RunRecord::failed(run, &e),
    }
}

fn parse_iperf(stdout: &[u8]) -> anyhow::Result<IperfOutput> {
    let out: IperfOutput = serde_json::from_slice(stdout).context("iperf3's JSON")?;
    if out.intervals.is_empty() {
        bail!(
            "iperf3 reported no intervals: {}",
            out.error.as_deref().unwrap_or("no error given")
        );
    }
    Ok(out)
}

fn mbit(v: Option<f64>) -> String {
    v.map_or_else(|| "no rate".to_owned(), |m| format!("{m:.1} Mbit/s"))
}

/// The human summary.
pub fn table(r: &ShareReport) -> String {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"));
    let mut out = format!(
        "link {} Mbit/s, {} ms RTT, {} % loss; baylink `{}`, TCP `{}`\n",
        r.link.rate_mbit, r.link.rtt_ms, r.link.loss_pct, r.congestion, r.tcp_congestion
    );
    if let Some(t) = &r.tcp_alone {
        out += &format!("TCP alone:      {} Mbit/s\n", cell(t.mbit_per_s));
    }
    if let Some(b) = &r.baylink_alone {
        out += &format!(
            "baylink alone:  {} Mbit/s\n",
            cell(b.gbit_per_s.map(|g| g * 1000.0))
        );
    }
    if let Some(s) = &r.split {
        out += &format!(
            "together over {:.1} s: baylink {} Mbit/s, TCP {} Mbit/s; TCP share {}%, TCP {}% of \
             the line (requirement ≥ 25%: {})\n",
            s.overlap_seconds,
            cell(s.baylink_mbit_per_s),
            cell(s.tcp_mbit_per_s),
            cell(s.tcp_share.map(|x| x * 100.0)),
            cell(s.tcp_of_line.map(|x| x * 100.0)),
            match s.tcp_keeps_quarter {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "-",
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(start: f64, end: f64, bytes: u64) -> IperfInterval {
        IperfInterval {
            sum: IperfSum {
                start,
                end,
                bytes,
                retransmits: Some(1),
            },
        }
    }

    #[test]
    fn tcp_over_the_overlap_counts_whole_intervals_inside_it() {
        let out = IperfOutput {
            intervals: vec![
                interval(0.0, 1.0, 50_000_000),
                interval(1.0, 2.0, 12_500_000),
                interval(2.0, 3.0, 12_500_000),
                interval(3.0, 4.0, 50_000_000),
            ],
            error: None,
        };
        let all = tcp_window(&out, None);
        assert_eq!(all.bytes, 125_000_000);
        assert_eq!(all.mbit_per_s, Some(250.0));
        let overlap = tcp_window(&out, Some((0.9, 3.0)));
        assert_eq!((overlap.bytes, overlap.seconds), (25_000_000, 2.0));
        assert_eq!(overlap.mbit_per_s, Some(100.0));
        assert_eq!(overlap.retransmits, Some(2));
        assert_eq!(overlap.intervals.len(), 4);
        assert!(tcp_window(&out, Some((0.5, 0.9))).mbit_per_s.is_none());

        let s = split(400.0, 2.0, Some(300.0), Some(100.0));
        assert_eq!(s.tcp_share, Some(0.25));
        assert_eq!(s.tcp_of_line, Some(0.25));
        assert_eq!(s.tcp_keeps_quarter, Some(true));
        assert_eq!(
            split(400.0, 2.0, Some(320.0), Some(80.0)).tcp_keeps_quarter,
            Some(false)
        );
    }

    #[test]
    fn iperf_json_with_an_interrupt_still_parses() {
        let text = r#"{"start":{},"intervals":[{"streams":[],"sum":{"start":0,"end":0.5,
            "seconds":0.5,"bytes":6291456,"bits_per_second":1.0e8,"retransmits":0,
            "omitted":false,"sender":true}}],"end":{"sum_sent":{"start":0,"end":2.19,
            "seconds":2.19,"bytes":27525120,"bits_per_second":1.0e8,"retransmits":0,
            "sender":true}},"error":"interrupt - the client has terminated"}"#;
        let out = parse_iperf(text.as_bytes()).unwrap();
        assert_eq!(out.intervals.len(), 1);
        assert!(parse_iperf(br#"{"intervals":[],"error":"unable to connect"}"#).is_err());
    }
}
