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
use crate::impair::link::{EmulatedLink, Start};
use crate::impair::{ImpairArgs, Settings};
use crate::payload;
use crate::proc::Machine;
use crate::quinn_pair::{self, PairOutcome, PairSettings, TlsArgs};
use crate::report::{
    self, ContestantSummary, Contestants, Entry, LatencyMs, Link, OtherMedians, Report, RunRecord,
    Sides, Transport,
};
use crate::scp::{self, AllowedCongestion, ScpPlacement, Sshd};
use crate::size::parse_size;

/// Port of the bench's sshd (inside a namespace of its own, so always free).
const SSHD_PORT: u16 = 2222;

/// The contestants this version can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Contestant {
    /// Raw quinn, memory → memory.
    Quinn,
    /// Raw quinn, memory → memory, the receiver checking SHA-256 of every chunk: the ceiling
    /// for any receiver that verifies every byte on arrival.
    #[value(name = "quinn-sha256")]
    QuinnSha256,
    /// baylink, disk → disk.
    Baylink,
    /// scp over TCP cubic.
    ScpCubic,
    /// scp over TCP bbr.
    ScpBbr,
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
    /// Emulated round-trip time, ms: every contestant's receiver runs in network namespace B
    /// and its sender in A, joined by `baylink-bench impair` (needs root).
    #[arg(long, default_value_t = 0.0)]
    pub rtt_ms: f64,
    /// Emulated loss per direction, percent.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Emulated link rate per direction, Mbit/s of IP packets (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub rate_mbit: f64,
    /// Congestion controller for quinn and baylink (`[link] congestion` of the bench's fresh
    /// dev-env, both sides; default: what dev-env writes, `link`). Not with --env.
    #[arg(long, value_parser = ["cubic", "bbr", "link"])]
    pub congestion: Option<String>,
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

    fn runs_scp(&self) -> bool {
        self.runs_contestant(Contestant::ScpCubic) || self.runs_contestant(Contestant::ScpBbr)
    }

    /// The forwarder settings for the requested link.
    fn link_settings(&self) -> anyhow::Result<Settings> {
        ensure!(
            self.rtt_ms >= 0.0 && (0.0..=100.0).contains(&self.loss) && self.rate_mbit >= 0.0,
            "--rtt-ms and --rate-mbit must be ≥ 0 and --loss a percentage"
        );
        Ok(ImpairArgs {
            rtt_ms: self.rtt_ms,
            jitter_ms: 0.0,
            loss: self.loss,
            reorder: 0.0,
            duplicate: 0.0,
            rate_mbit: self.rate_mbit,
            queue_kib: None,
            seed: 1,
            stats: None,
        }
        .settings())
    }
}

/// Where the contestants run.
#[derive(Debug, Clone, Default)]
struct Placement {
    /// Namespace of the senders (quinn-source, `baylink send`), when impaired.
    sender_ns: Option<String>,
    /// Namespace of the receivers (quinn-sink, the gateway), when impaired.
    receiver_ns: Option<String>,
    /// The receivers' address (127.0.0.1 unless impaired).
    receiver_ip: Option<std::net::Ipv4Addr>,
    /// Where scp and sshd run, if they can.
    scp: Option<ScpPlacement>,
}

fn link(args: &E2eArgs) -> Link {
    Link {
        rtt_ms: args.rtt_ms,
        loss_pct: args.loss,
        rate_mbit: args.rate_mbit,
        impairment: if args.impaired() {
            "userspace forwarder between two network namespaces (baylink-bench impair): \
             receivers in namespace B, senders in namespace A, the rate and loss applied \
             per direction, the RTT split in two one-way delays"
                .to_owned()
        } else {
            "none (loopback; scp runs over the loopback of a private network namespace)".to_owned()
        },
        forwarder: None,
    }
}

fn set_congestion(doc: &mut toml::Table, cc: &str) -> anyhow::Result<()> {
    doc.entry("link")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("[link] is not a table")?
        .insert("congestion".into(), toml::Value::String(cc.to_owned()));
    Ok(())
}

/// Sets `[link] congestion` in both configs of a fresh dev-env.
fn choose_congestion(dir: &Path, cc: &str) -> anyhow::Result<()> {
    for file in ["gateway.toml", "edge.toml"] {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)?;
        let mut doc: toml::Table = text
            .parse()
            .with_context(|| format!("{}", path.display()))?;
        set_congestion(&mut doc, cc)?;
        std::fs::write(&path, toml::to_string(&doc)?)?;
    }
    Ok(())
}

/// Points a fresh dev-env at the emulated link: the gateway listens on B's address, the edge
/// dials it (and still verifies the certificate as `transport.server_name`), and both `[link]`
/// sections are tuned for the emulated RTT and rate.
fn place_deployment(dir: &Path, addr_b: std::net::Ipv4Addr, args: &E2eArgs) -> anyhow::Result<()> {
    place_on_link(
        dir,
        addr_b,
        args.rtt_ms,
        args.rate_mbit,
        args.congestion.as_deref(),
    )
}

/// [`place_deployment`] from its parts: the link's RTT and rate, and the congestion controller
/// to write (none: keep dev-env's).
pub fn place_on_link(
    dir: &Path,
    addr_b: std::net::Ipv4Addr,
    rtt_ms: f64,
    rate_mbit: f64,
    congestion: Option<&str>,
) -> anyhow::Result<()> {
    for (file, key) in [("gateway.toml", "listen"), ("edge.toml", "connect")] {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)?;
        let mut doc: toml::Table = text
            .parse()
            .with_context(|| format!("{}", path.display()))?;
        if let Some(cc) = congestion {
            set_congestion(&mut doc, cc)?;
        }
        let transport = doc
            .entry("transport")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .context("[transport] is not a table")?;
        let current = transport
            .get(key)
            .or_else(|| transport.get("listen"))
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let port = current
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .with_context(|| format!("no port in transport.{key} of {}", path.display()))?;
        transport.insert(key.into(), toml::Value::String(format!("{addr_b}:{port}")));
        let link = doc
            .entry("link")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .context("[link] is not a table")?;
        if rtt_ms > 0.0 {
            link.insert("rtt_ms".into(), toml::Value::Integer(rtt_ms.ceil() as i64));
        }
        if rate_mbit > 0.0 {
            link.insert(
                "rate_mbit".into(),
                toml::Value::Integer(rate_mbit.ceil() as i64),
            );
        }
        // The emulated link has the TUN devices' MTU, whatever the deployment assumed.
        let mtu = i64::from(crate::impair::netns::MTU);
        link.insert("mtu".into(), toml::Value::Integer(mtu));
        link.insert("max_mtu".into(), toml::Value::Integer(mtu));
        std::fs::write(&path, toml::to_string(&doc)?)?;
    }
    Ok(())
}

pub fn write_json<T: serde::Serialize>(path: &Path, report: &T) -> anyhow::Result<()> {
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
            quinn_sha256: Entry::skipped("not run"),
            baylink: Entry::skipped("not run"),
            scp_cubic: Entry::skipped("not run"),
            scp_bbr: Entry::skipped("not run"),
        },
        machine: Machine::current(),
        error: None,
    };
    ensure!(
        !(args.impaired() && args.env.is_some()),
        "an impaired link needs a fresh dev-env (its configs are pointed at the link): drop --env"
    );
    ensure!(
        !(args.congestion.is_some() && args.env.is_some()),
        "--congestion edits the bench's fresh dev-env: drop --env (or set [link] congestion there)"
    );
    let settings = args.link_settings()?;
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

    // The forwarder: for an impaired link, and for scp (which needs a namespace of its own
    // to choose its TCP congestion controller without touching the machine's default).
    let scp_missing = if args.runs_scp() {
        scp::unavailable()
    } else {
        Some("not selected (--only)".to_owned())
    };
    let mut emulated = None;
    if args.impaired() || scp_missing.is_none() {
        let start = {
            let exe = exe.clone();
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || EmulatedLink::start(&exe, &settings)).await??
        };
        match start {
            Start::Up(l) => {
                eprintln!(
                    "emulated link: namespace {} ({}) <-> namespace {} ({})",
                    l.ns_a, l.addr_a, l.ns_b, l.addr_b
                );
                emulated = Some(l);
            }
            Start::Unsupported(reason) if args.impaired() => {
                let message = format!("the requested link cannot be emulated here: {reason}");
                report.error = Some(message.clone());
                write_json(&args.json, &report)?;
                eprintln!("baylink-bench: {message}");
                return Ok(ExitCode::from(2));
            }
            Start::Unsupported(reason) => {
                let why = format!("needs a network namespace: {reason}");
                report.contestants.scp_cubic = Entry::skipped(&why);
                report.contestants.scp_bbr = Entry::skipped(&why);
            }
        }
    }
    if let Some(why) = &scp_missing {
        report.contestants.scp_cubic = Entry::skipped(why);
        report.contestants.scp_bbr = Entry::skipped(why);
    }
    let placement = match &emulated {
        Some(l) if args.impaired() => Placement {
            sender_ns: Some(l.ns_a.clone()),
            receiver_ns: Some(l.ns_b.clone()),
            receiver_ip: Some(l.addr_b),
            scp: scp_missing.is_none().then(|| ScpPlacement {
                sender_ns: l.ns_a.clone(),
                receiver_ns: l.ns_b.clone(),
                addr: l.addr_b.into(),
            }),
        },
        Some(l) => Placement {
            scp: Some(ScpPlacement {
                sender_ns: l.ns_a.clone(),
                receiver_ns: l.ns_a.clone(),
                addr: std::net::Ipv4Addr::LOCALHOST.into(),
            }),
            ..Placement::default()
        },
        None => Placement::default(),
    };

    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("baylink-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a work directory in {}", parent.display()))?;
    let result = bench(&args, &exe, &baylink, work.path(), &placement, &mut report).await;
    if let Some(l) = emulated {
        match tokio::task::spawn_blocking(move || l.stop()).await? {
            Ok(stats) => report.link.forwarder = Some(stats),
            Err(e) => eprintln!("warning: impairment forwarder: {e:#}"),
        }
    }
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

pub fn congestion_name(c: Congestion) -> &'static str {
    c.name()
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
    placement: &Placement,
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
                base_port + 5
            );
            let created = Deployment::create(baylink, &dir, base_port).await?;
            match (placement.receiver_ip, &args.congestion) {
                (Some(addr_b), _) => {
                    place_deployment(&dir, addr_b, args)?;
                    Deployment::load(&dir)?
                }
                (None, Some(cc)) => {
                    choose_congestion(&dir, cc)?;
                    Deployment::load(&dir)?
                }
                (None, None) => created,
            }
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
        receive_hold_ms: tuning.receive_hold_ms(),
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
        sha256: false,
        time_limit,
        log_dir: work.to_owned(),
        sink_ns: placement.receiver_ns.clone(),
        source_ns: placement.sender_ns.clone(),
        sink_ip: placement
            .receiver_ip
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST)
            .into(),
    };

    let run_baylink = args.runs_contestant(Contestant::Baylink);
    let mut gateway = None;
    let mut send = None;
    let mut payload_files = None;
    let run_scp = |c: Contestant| placement.scp.is_some() && args.runs_contestant(c);
    if run_baylink || run_scp(Contestant::ScpCubic) || run_scp(Contestant::ScpBbr) {
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
        payload_files = Some(files);
    }
    if let (true, Some(files)) = (run_baylink, &payload_files) {
        gateway = Some(
            Gateway::start(baylink, &deployment, work, placement.receiver_ns.as_deref()).await?,
        );
        send = Some(SendSettings {
            baylink: baylink.to_owned(),
            deployment: deployment.clone(),
            payload: files.clone(),
            time_limit,
            work: work.to_owned(),
            sender_ns: placement.sender_ns.clone(),
        });
    }
    // scp: one sshd for every run; each congestion controller that this kernel lacks is
    // reported as skipped.
    let mut scp_ccs: Vec<(Contestant, &str)> = Vec::new();
    for (c, cc) in [(Contestant::ScpCubic, "cubic"), (Contestant::ScpBbr, "bbr")] {
        if !args.runs_contestant(c) {
            *scp_entry(&mut report.contestants, c) = Entry::skipped("not selected (--only)");
        }
        if !run_scp(c) {
            continue;
        }
        match scp::congestion_unavailable(cc) {
            None => scp_ccs.push((c, cc)),
            Some(why) => *scp_entry(&mut report.contestants, c) = Entry::skipped(&why),
        }
    }
    let mut _allowed = None;
    let mut sshd = None;
    if let (Some(where_), false) = (&placement.scp, scp_ccs.is_empty()) {
        let ccs: Vec<&str> = scp_ccs.iter().map(|(_, cc)| *cc).collect();
        _allowed = Some(AllowedCongestion::ensure(&ccs)?);
        sshd = Some(Sshd::start(&work.join("ssh"), where_.clone(), SSHD_PORT).await?);
    }
    let mut scp_runs: Vec<Vec<RunRecord>> = vec![Vec::new(); scp_ccs.len()];

    let quinn_sha256 = PairSettings {
        sha256: true,
        ..quinn.clone()
    };
    let mut quinn_runs = Vec::new();
    let mut quinn_sha256_runs = Vec::new();
    let mut baylink_runs = Vec::new();
    for run in 1..=args.runs {
        for (contestant, settings, runs, label) in [
            (Contestant::Quinn, &quinn, &mut quinn_runs, "quinn  "),
            (
                Contestant::QuinnSha256,
                &quinn_sha256,
                &mut quinn_sha256_runs,
                "quinn_sha256",
            ),
        ] {
            if !args.runs_contestant(contestant) {
                continue;
            }
            eprint!("run {run}/{}: {label} ... ", args.runs);
            let record = match quinn_pair::run_pair(settings, run).await {
                Ok(outcome) => quinn_record(
                    run,
                    &outcome,
                    congestion_name(settings.source_tuning.congestion),
                ),
                Err(e) => RunRecord::failed(run, &e),
            };
            eprintln!("{}", describe(&record));
            runs.push(record);
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
        if let (Some(sshd), Some(files)) = (&sshd, &payload_files) {
            for (i, (_, cc)) in scp_ccs.iter().enumerate() {
                eprint!("run {run}/{}: scp {cc:<5}... ", args.runs);
                let record = sshd
                    .run_once(files, &work.join("scp-dest"), cc, time_limit, run)
                    .await;
                eprintln!("{}", describe(&record));
                scp_runs[i].push(record);
            }
        }
    }
    if let Some(sshd) = sshd {
        sshd.stop().await;
    }
    let mut others = OtherMedians::default();
    for ((c, _), runs) in scp_ccs.iter().zip(scp_runs) {
        let summary = ContestantSummary::from_runs(runs);
        match c {
            Contestant::ScpCubic => others.scp_cubic = summary.gbit_per_s,
            _ => others.scp_bbr = summary.gbit_per_s,
        }
        *scp_entry(&mut report.contestants, *c) = Entry::Ran(Box::new(summary));
    }
    if let Some(gateway) = gateway {
        match gateway.stop().await {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("warning: the gateway exited with {status} after SIGTERM"),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }

    let scp_failed: usize = [&report.contestants.scp_cubic, &report.contestants.scp_bbr]
        .iter()
        .map(|e| match e {
            Entry::Ran(s) => s.failed_runs,
            Entry::Skipped { .. } => 0,
        })
        .sum();
    let failed = quinn_runs
        .iter()
        .chain(&quinn_sha256_runs)
        .chain(&baylink_runs)
        .filter(|r| r.error.is_some())
        .count()
        + scp_failed;
    (report.contestants.quinn, others.quinn) = quinn_entry(quinn_runs);
    (report.contestants.quinn_sha256, others.quinn_sha256) = quinn_entry(quinn_sha256_runs);
    report.contestants.baylink = if baylink_runs.is_empty() {
        Entry::skipped("not selected (--only)")
    } else {
        Entry::Ran(Box::new(
            ContestantSummary::from_runs(baylink_runs).with_baylink_extras(&others),
        ))
    };
    Ok(failed)
}

/// A raw-quinn contestant's entry and median Gbit/s (skipped when it did not run).
fn quinn_entry(runs: Vec<RunRecord>) -> (Entry, Option<f64>) {
    if runs.is_empty() {
        return (Entry::skipped("not selected (--only)"), None);
    }
    let summary = ContestantSummary::from_runs(runs);
    let median = summary.gbit_per_s;
    (Entry::Ran(Box::new(summary)), median)
}

fn scp_entry(c: &mut Contestants, which: Contestant) -> &mut Entry {
    match which {
        Contestant::ScpCubic => &mut c.scp_cubic,
        _ => &mut c.scp_bbr,
    }
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

pub fn quinn_record(run: u32, outcome: &PairOutcome, congestion: &str) -> RunRecord {
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
        congestion: Some(congestion.to_owned()),
        retransmit: Some(report::Retransmit::quinn(
            "quinn connection stats of the source: path.lost_bytes",
            report::QuicFigures {
                lost_bytes: source.path.lost_bytes,
                lost_packets: source.path.lost_packets,
                sent_packets: source.path.sent_packets,
                tx_bytes: source.path.udp_tx_bytes,
                congestion_events: source.path.congestion_events,
            },
            source.bytes,
        )),
        ..RunRecord::default()
    }
}

pub fn baylink_record(run: u32, outcome: &BaylinkRun) -> RunRecord {
    let s = &outcome.summary;
    let link = outcome.stats.as_ref().and_then(|st| st.link.as_ref());
    let link_seconds = s.link_seconds();
    let (gbit_per_s, error) = match link_seconds {
        Some(t) => (report::gbit_per_s(s.bytes, t), None),
        None => (
            None,
            Some("baylink send reports no transmit_seconds (an older baylink?)".to_owned()),
        ),
    };
    RunRecord {
        run,
        gbit_per_s,
        seconds: link_seconds,
        streamed_bytes: s.streamed_bytes,
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
        cloned_bytes: s.cloned_bytes,
        transfer_id: Some(s.transfer_id.clone()),
        delivered_identical: Some(true),
        tcp_congestion: None,
        congestion: link.map(|l| l.congestion.clone()),
        retransmit: link.map(|l| {
            report::Retransmit::quinn(
                "baylink send --stats: link.lost_bytes (quinn connection stats, summed over \
                 the send's connections)",
                report::QuicFigures {
                    lost_bytes: l.lost_bytes,
                    lost_packets: l.lost_packets,
                    sent_packets: l.sent_packets,
                    tx_bytes: l.udp_tx_bytes,
                    congestion_events: l.congestion_events,
                },
                s.wire_bytes,
            )
        }),
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
    fn defaults_and_impairment() {
        let cli = Cli::parse_from(["x", "--size", "1GiB", "--json", "out.json"]);
        let a = cli.e2e;
        assert_eq!((a.files, a.runs, a.time_limit), (1, 3, 300));
        assert!(!a.impaired());
        assert!(a.runs_contestant(Contestant::Quinn) && a.runs_contestant(Contestant::Baylink));
        assert!(link(&a).impairment.starts_with("none (loopback"));

        let a = Cli::parse_from([
            "x", "--size", "1", "--json", "o", "--rtt-ms", "50", "--only", "quinn",
        ])
        .e2e;
        assert!(a.impaired());
        assert!(!a.runs_contestant(Contestant::Baylink));
        assert!(Cli::try_parse_from(["x", "--size", "1", "--json", "o", "--runs", "0"]).is_err());
    }

    #[tokio::test]
    async fn an_impaired_link_with_an_existing_env_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("out.json");
        let args = Cli::parse_from([
            "x",
            "--size",
            "1MiB",
            "--json",
            json.to_str().unwrap(),
            "--env",
            dir.path().to_str().unwrap(),
            "--rtt-ms",
            "50",
        ])
        .e2e;
        let e = run(args).await.unwrap_err();
        assert!(e.to_string().contains("drop --env"), "{e}");
        let a = Cli::parse_from(["x", "--size", "1", "--json", "o", "--loss", "101"]).e2e;
        assert!(a.link_settings().is_err());
        let a = Cli::parse_from(["x", "--size", "1", "--json", "o", "--only", "scp-bbr"]).e2e;
        assert!(a.runs_scp() && !a.runs_contestant(Contestant::ScpCubic));
        let s = Cli::parse_from(["x", "--size", "1", "--json", "o", "--rtt-ms", "50"])
            .e2e
            .link_settings()
            .unwrap();
        assert_eq!((s.rtt_ms, s.loss_pct, s.rate_mbit), (50.0, 0.0, 0.0));
    }
}
