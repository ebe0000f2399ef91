//! `baylink-bench e2e`: sets up one loopback deployment, runs the contestants alternately
//! (quinn, baylink, quinn, baylink, ...) so machine drift hits both alike, and reports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, ensure};
use baylink_net::transport::{Congestion, LinkTuning};
use clap::{Args, ValueEnum};

use crate::baylink_run::{self, BaylinkRun, Deployment, Gateway, RunFailure, SendSettings};
use crate::env_config::ApplianceConfig;
use crate::payload;
use crate::proc::Machine;
use crate::quinn_pair::{self, PairOutcome, PairSettings, TlsArgs};
use crate::report::{
    self, ContestantSummary, Contestants, Entry, LatencyMs, Link, Report, RunRecord, Sides,
    Transport,
};

/// Why scp is not run in this version.
const SCP_SKIPPED: &str = "needs the impairment namespaces (not built yet)";

/// The contestants this version can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Contestant {
    /// Raw quinn, memory → memory.
    Quinn,
    /// baylink, disk → disk.
    Baylink,
}

/// `baylink-bench e2e`.
#[derive(Debug, Clone, Args)]
pub struct E2eArgs {
    /// Payload per run: bytes, or with a unit (KiB, MiB, GiB, KB, MB, GB; K/M/G are binary).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Split the payload into this many files (one transfer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub files: u32,
    /// Runs per contestant.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Emulated round-trip time (needs the impairment forwarder: not built yet).
    #[arg(long, default_value_t = 0.0)]
    pub rtt_ms: f64,
    /// Emulated loss per direction, percent (needs the impairment forwarder: not built yet).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Emulated link rate (needs the impairment forwarder: not built yet).
    #[arg(long, default_value_t = 0.0)]
    pub rate_mbit: f64,
    /// Time box of each run in seconds; a run that overruns is stopped and marked timed_out.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub time_limit: u64,
    /// Where to write the JSON report.
    #[arg(long)]
    pub json: PathBuf,
    /// The baylink binary (default: `baylink` next to this executable).
    #[arg(long)]
    pub baylink: Option<PathBuf>,
    /// Run only this contestant.
    #[arg(long, value_enum)]
    pub only: Option<Contestant>,
    /// Directory for the temporary deployment and payload (default: the system temp dir).
    /// Spool and payload need about 4 × --size of free space.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Use this existing dev-env directory instead of creating one (its gateway ports must be
    /// free). Only the bench's own transfers are removed from it.
    #[arg(long, value_name = "DIR")]
    pub env: Option<PathBuf>,
    /// Keep the temporary directory (logs, configs) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

impl E2eArgs {
    fn runs_contestant(&self, c: Contestant) -> bool {
        self.only.is_none_or(|only| only == c)
    }

    fn impaired(&self) -> bool {
        self.rtt_ms != 0.0 || self.loss != 0.0 || self.rate_mbit != 0.0
    }
}

/// Parses `1073741824`, `1GiB`, `512MiB`, `1G`, `100MB`, ... into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 1073741824 or 1GiB)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit `{other}`")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

fn link(args: &E2eArgs) -> Link {
    Link {
        rtt_ms: args.rtt_ms,
        loss_pct: args.loss,
        rate_mbit: args.rate_mbit,
        impairment: if args.impaired() {
            "requested, but not available in this version".to_owned()
        } else {
            "none (loopback)".to_owned()
        },
    }
}

fn write_json(path: &Path, report: &Report) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs the benchmark; the exit code is 0 when every run gave figures or hit the time box,
/// 1 when a run failed, 2 when the requested link cannot be emulated.
pub async fn run(args: E2eArgs) -> anyhow::Result<ExitCode> {
    let mut report = Report {
        size_bytes: args.size,
        files: args.files,
        runs: args.runs,
        time_limit_s: args.time_limit,
        link: link(&args),
        transport: None,
        contestants: Contestants {
            quinn: Entry::skipped("not run"),
            baylink: Entry::skipped("not run"),
            scp_cubic: Entry::skipped(SCP_SKIPPED),
            scp_bbr: Entry::skipped(SCP_SKIPPED),
        },
        machine: Machine::current(),
        error: None,
    };
    if args.impaired() {
        let message = "link impairment (--rtt-ms, --loss, --rate-mbit) needs the network-namespace \
                       impairment forwarder, which is not built yet (it comes with the \
                       resume/faults work); only loopback runs are possible in this version";
        report.error = Some(message.to_owned());
        write_json(&args.json, &report)?;
        eprintln!("baylink-bench: {message}");
        return Ok(ExitCode::from(2));
    }
    ensure!(args.size > 0, "--size must be at least one byte");
    ensure!(
        u64::from(args.files) <= args.size,
        "--files {} is more than --size {} bytes",
        args.files,
        args.size
    );

    let exe = std::env::current_exe().context("cannot find this executable")?;
    let baylink = match &args.baylink {
        Some(path) => path.clone(),
        None => exe.with_file_name("baylink"),
    };
    let needs_baylink = args.env.is_none() || args.runs_contestant(Contestant::Baylink);
    ensure!(
        !needs_baylink || baylink.is_file(),
        "no baylink binary at {} (build it with `cargo build --release`, or pass --baylink PATH)",
        baylink.display()
    );

    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("baylink-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a work directory in {}", parent.display()))?;
    let result = bench(&args, &exe, &baylink, work.path(), &mut report).await;
    if args.keep {
        let kept = work.keep();
        eprintln!("kept {}", kept.display());
    }
    let failed_runs = match result {
        Ok(failed) => failed,
        Err(e) => {
            report.error = Some(format!("{e:#}"));
            write_json(&args.json, &report)?;
            return Err(e);
        }
    };

    write_json(&args.json, &report)?;
    print!("{}", report::table(&report));
    println!("JSON: {}", args.json.display());
    Ok(if failed_runs > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn congestion_name(c: Congestion) -> &'static str {
    match c {
        Congestion::Cubic => "cubic",
        Congestion::Bbr => "bbr",
    }
}

fn tls_args(config: &ApplianceConfig) -> TlsArgs {
    TlsArgs {
        ca: config.tls_ca.clone(),
        cert: config.tls_cert.clone(),
        key: config.tls_key.clone(),
    }
}

/// Sets up, runs every run of every contestant, fills `report`; returns the failed runs.
async fn bench(
    args: &E2eArgs,
    exe: &Path,
    baylink: &Path,
    work: &Path,
    report: &mut Report,
) -> anyhow::Result<usize> {
    let deployment = match &args.env {
        Some(dir) => {
            eprintln!("using the dev-env in {}", dir.display());
            Deployment::load(dir)?
        }
        None => {
            let base_port = baylink_run::probe_base_port()?;
            let dir = work.join("env");
            eprintln!(
                "dev-env in {} (ports {}..={})",
                dir.display(),
                base_port,
                base_port + 4
            );
            Deployment::create(baylink, &dir, base_port).await?
        }
    };
    let edge = &deployment.edge;
    let tuning: &LinkTuning = &edge.link;
    if deployment.gateway.link != edge.link {
        eprintln!("warning: edge and gateway [link] differ; each quinn side uses its own");
    }
    report.transport = Some(Transport {
        chunk_size: edge.chunk_size,
        max_in_flight: edge.max_in_flight,
        tuned_rate_mbit: tuning.rate_mbit,
        tuned_rtt_ms: tuning.rtt_ms,
        congestion: congestion_name(tuning.congestion).to_owned(),
        stream_window: tuning.stream_window(),
        connection_window: tuning.connection_window(),
    });
    let time_limit = Duration::from_secs(args.time_limit);
    let quinn = PairSettings {
        exe: exe.to_owned(),
        sink_tls: tls_args(&deployment.gateway),
        source_tls: tls_args(edge),
        sink_tuning: deployment.gateway.link.clone(),
        source_tuning: edge.link.clone(),
        server_name: edge.server_name.clone(),
        size: args.size,
        chunk_size: edge.chunk_size,
        max_in_flight: edge.max_in_flight,
        time_limit,
        log_dir: work.to_owned(),
    };

    let run_baylink = args.runs_contestant(Contestant::Baylink);
    let mut gateway = None;
    let mut send = None;
    if run_baylink {
        let dir = work.join("payload");
        std::fs::create_dir(&dir)?;
        eprintln!(
            "writing a {} byte payload in {} file(s)",
            args.size, args.files
        );
        let (size, files) = (args.size, args.files);
        let files =
            tokio::task::spawn_blocking(move || payload::generate(&dir, size, files, 0x0ba1_17e5))
                .await??;
        gateway = Some(Gateway::start(baylink, &deployment, work).await?);
        send = Some(SendSettings {
            baylink: baylink.to_owned(),
            deployment: deployment.clone(),
            payload: files,
            time_limit,
            work: work.to_owned(),
        });
    }

    let mut quinn_runs = Vec::new();
    let mut baylink_runs = Vec::new();
    for run in 1..=args.runs {
        if args.runs_contestant(Contestant::Quinn) {
            eprint!("run {run}/{}: quinn   ... ", args.runs);
            let record = match quinn_pair::run_pair(&quinn, run).await {
                Ok(outcome) => quinn_record(run, &outcome),
                Err(e) => RunRecord::failed(run, &e),
            };
            eprintln!("{}", describe(&record));
            quinn_runs.push(record);
        }
        if let (Some(gateway), Some(send)) = (gateway.as_mut(), send.as_ref()) {
            eprint!("run {run}/{}: baylink ... ", args.runs);
            let record = match baylink_run::run_once(send, gateway, run).await {
                Ok(outcome) => baylink_record(run, &outcome),
                Err(RunFailure::TimedOut) => RunRecord::timed_out(run),
                Err(RunFailure::Failed(e)) => RunRecord::failed(run, &e),
            };
            eprintln!("{}", describe(&record));
            baylink_runs.push(record);
        }
    }
    if let Some(gateway) = gateway {
        match gateway.stop().await {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("warning: the gateway exited with {status} after SIGTERM"),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }

    let failed = quinn_runs
        .iter()
        .chain(&baylink_runs)
        .filter(|r| r.error.is_some())
        .count();
    let quinn_median = if quinn_runs.is_empty() {
        report.contestants.quinn = Entry::skipped("--only baylink");
        None
    } else {
        let summary = ContestantSummary::from_runs(quinn_runs);
        let median = summary.gbit_per_s;
        report.contestants.quinn = Entry::Ran(Box::new(summary));
        median
    };
    report.contestants.baylink = if baylink_runs.is_empty() {
        Entry::skipped("--only quinn")
    } else {
        Entry::Ran(Box::new(
            ContestantSummary::from_runs(baylink_runs).with_baylink_extras(quinn_median),
        ))
    };
    Ok(failed)
}

fn describe(r: &RunRecord) -> String {
    if let Some(e) = &r.error {
        return format!("failed: {e}");
    }
    let rate = r
        .gbit_per_s
        .map_or_else(|| "no rate".to_owned(), |g| format!("{g:.2} Gbit/s"));
    if r.timed_out {
        format!("timed out ({rate})")
    } else {
        rate
    }
}

fn quinn_record(run: u32, outcome: &PairOutcome) -> RunRecord {
    let (source, sink) = (&outcome.source, &outcome.sink);
    RunRecord {
        run,
        gbit_per_s: report::gbit_per_s(source.bytes, source.seconds),
        seconds: Some(source.seconds),
        bytes: Some(source.bytes),
        chunks: Some(u64::from(source.chunks)),
        timed_out: source.timed_out,
        error: (!source.timed_out && (!sink.complete || sink.bytes != source.bytes)).then(|| {
            format!(
                "sink received {} bytes (complete: {}), source had {} acknowledged",
                sink.bytes, sink.complete, source.bytes
            )
        }),
        cpu_seconds: Some(Sides {
            sender: Some(source.cpu_seconds),
            receiver: Some(sink.cpu_seconds),
        }),
        cpu_seconds_per_gib: Some(Sides {
            sender: report::per_gib(source.cpu_seconds, source.bytes),
            receiver: report::per_gib(sink.cpu_seconds, source.bytes),
        }),
        chunk_latency_ms: source.chunk_latency_us.as_ref().map(LatencyMs::from_us),
        path: Some(source.path.clone()),
        ..RunRecord::default()
    }
}

fn baylink_record(run: u32, outcome: &BaylinkRun) -> RunRecord {
    let s = &outcome.summary;
    let (gbit_per_s, error) = match s.transmit_seconds {
        Some(t) => (report::gbit_per_s(s.bytes, t), None),
        None => (
            None,
            Some("baylink send reports no transmit_seconds (an older baylink?)".to_owned()),
        ),
    };
    RunRecord {
        run,
        gbit_per_s,
        seconds: s.transmit_seconds,
        bytes: Some(s.bytes),
        chunks: outcome.stats.as_ref().map(|st| st.chunks),
        timed_out: false,
        error,
        cpu_seconds: Some(Sides {
            sender: Some(outcome.cpu_sender),
            receiver: Some(outcome.cpu_receiver),
        }),
        cpu_seconds_per_gib: Some(Sides {
            sender: report::per_gib(outcome.cpu_sender, s.bytes),
            receiver: report::per_gib(outcome.cpu_receiver, s.bytes),
        }),
        chunk_latency_ms: outcome
            .stats
            .as_ref()
            .map(|st| LatencyMs::from_us(&st.chunk_latency_us)),
        gbit_per_s_including_seal: report::gbit_per_s(s.bytes, s.seconds),
        seconds_including_seal: Some(s.seconds),
        wire_bytes: Some(s.wire_bytes),
        seal_seconds: s.seal_seconds,
        transfer_id: Some(s.transfer_id.clone()),
        delivered_identical: Some(true),
        path: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        e2e: E2eArgs,
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1TiB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("18446744073709551615G").is_err());
    }

    #[test]
    fn defaults_and_impairment() {
        let cli = Cli::parse_from(["x", "--size", "1GiB", "--json", "out.json"]);
        let a = cli.e2e;
        assert_eq!((a.files, a.runs, a.time_limit), (1, 3, 300));
        assert!(!a.impaired());
        assert!(a.runs_contestant(Contestant::Quinn) && a.runs_contestant(Contestant::Baylink));
        assert_eq!(link(&a).impairment, "none (loopback)");

        let a = Cli::parse_from([
            "x", "--size", "1", "--json", "o", "--rtt-ms", "50", "--only", "quinn",
        ])
        .e2e;
        assert!(a.impaired());
        assert!(!a.runs_contestant(Contestant::Baylink));
        assert!(Cli::try_parse_from(["x", "--size", "1", "--json", "o", "--runs", "0"]).is_err());
    }

    #[tokio::test]
    async fn impairment_is_refused_but_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("out.json");
        let args = Cli::parse_from([
            "x",
            "--size",
            "1MiB",
            "--json",
            json.to_str().unwrap(),
            "--rtt-ms",
            "50",
            "--loss",
            "1",
            "--rate-mbit",
            "400",
        ])
        .e2e;
        let code = run(args).await.unwrap();
        assert_eq!(code, ExitCode::from(2));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["link"]["rtt_ms"], 50.0);
        assert_eq!(v["link"]["loss_pct"], 1.0);
        assert_eq!(v["link"]["rate_mbit"], 400.0);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("impairment forwarder")
        );
        assert_eq!(
            v["contestants"]["scp_cubic"]["skipped"],
            "needs the impairment namespaces (not built yet)"
        );
    }
}
