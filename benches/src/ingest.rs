//! `baylink-bench ingest`: the hospital HTTPS API under load.
//!
//! One dev-env deployment; the gateway and the edge run as `baylink serve`. `--files` payload
//! files of `--size` bytes are uploaded by `--concurrency` concurrent clients, each upload its
//! own transfer (declare, PUT, commit), over HTTPS with the hospital-a client certificate. The
//! client is curl (OpenSSL, HTTP/1.1), one process per request, so the edge serves real
//! independent TLS connections. Reported: ingest throughput (payload bytes / wall time of all
//! PUTs), per-upload PUT latency p50/p99 (hdrhistogram), the edge's peak RSS (VmHWM), and, for
//! one file of `--compare-size` bytes, HTTPS upload to verified receipt against `baylink send`
//! of the same file in the same run (both seal, send, and wait for the receipt).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::baylink_run::{Deployment, Gateway, SendSummary, probe_base_port};
use crate::payload;
use crate::proc::NotifySocket;
use crate::quinn_pair::{last_json_line, log_tail};

/// How long one request may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(600);
/// How long a committed upload may take to reach a verified receipt.
const RECEIPT_LIMIT: Duration = Duration::from_secs(600);

/// Arguments of `baylink-bench ingest`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Number of files to upload (each its own transfer).
    #[arg(long, default_value_t = 16)]
    files: u32,
    /// Size of each file in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    size: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Size of the file uploaded and sent with `baylink send` for the ratio (0: skip).
    #[arg(long, default_value_t = 1 << 30)]
    compare_size: u64,
    /// Comparison runs (HTTPS and `send` alternate which goes first); medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    compare_runs: u32,
    /// Put the gateway's spool in this directory (e.g. on another device or a tmpfs): the
    /// two appliances are separate machines in a deployment, and on one disk here the
    /// gateway's writes compete with the edge's reads of the payload it sends.
    #[arg(long, value_name = "DIR")]
    gateway_spool: Option<PathBuf>,
    /// Where the JSON report goes.
    #[arg(long)]
    json: PathBuf,
    /// The baylink binary (default: next to this one).
    #[arg(long)]
    baylink: Option<PathBuf>,
    /// Work directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// Latency figures in milliseconds.
#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct ComparisonRun {
    /// HTTPS: PUT start to verified receipt (includes the commit's sealing and the send).
    https_seconds: f64,
    /// The PUT alone.
    https_upload_seconds: f64,
    /// `baylink send`'s own `seconds` (copy into the spool with hashing, seal, send, receipt).
    send_seconds: f64,
    /// Whether the HTTPS upload went first in this run.
    https_first: bool,
}

#[derive(Debug, Serialize)]
struct Comparison {
    bytes: u64,
    /// Median of the runs' HTTPS seconds.
    https_seconds: f64,
    /// Median of the runs' PUT seconds.
    https_upload_seconds: f64,
    /// Median of the runs' `send` seconds.
    send_seconds: f64,
    https_gbit_per_s: f64,
    send_gbit_per_s: f64,
    /// https_gbit_per_s / send_gbit_per_s, from the medians (target >= 0.8).
    ratio_vs_send: f64,
    runs: Vec<ComparisonRun>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Debug, Serialize)]
struct Report {
    files: u32,
    size: u64,
    concurrency: usize,
    client: &'static str,
    wall_seconds: f64,
    gbit_per_s: f64,
    upload_latency_ms: Latency,
    edge_peak_rss_mib: f64,
    /// `--gateway-spool`, when the gateway's spool was moved off the edge's disk.
    gateway_spool: Option<PathBuf>,
    comparison: Option<Comparison>,
}

/// curl as one hospital (its client certificate) against the edge's HTTPS API.
pub(crate) struct Client {
    pub(crate) base: String,
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl Client {
    /// Runs curl; returns (HTTP status, body).
    async fn request(&self, args: &[&str]) -> anyhow::Result<(u16, String)> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "600",
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(REQUEST_LIMIT, out)
            .await
            .context("curl timed out")?
            .context("cannot run curl (install curl)")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code.trim().parse().unwrap_or(0);
        if code == 0 {
            bail!(
                "curl failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((code, body.to_owned()))
    }

    pub(crate) async fn declare(&self) -> anyhow::Result<String> {
        let url = format!("{}/v1/transfers", self.base);
        let (code, body) = self
            .request(&[
                "-X",
                "POST",
                "--data-binary",
                r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
                &url,
            ])
            .await?;
        ensure!(code == 201, "declare: {code} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["id"].as_str().context("no id")?.to_owned())
    }

    pub(crate) async fn put(&self, id: &str, file: &Path, name: &str) -> anyhow::Result<Duration> {
        let url = format!("{}/v1/transfers/{id}/files/{name}", self.base);
        let started = Instant::now();
        let (code, body) = self
            .request(&["-T", &file.display().to_string(), &url])
            .await?;
        ensure!(code == 201, "PUT {name}: {code} {body}");
        Ok(started.elapsed())
    }

    pub(crate) async fn commit(&self, id: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/transfers/{id}/commit", self.base);
        let (code, body) = self.request(&["-X", "POST", &url]).await?;
        ensure!(code == 202, "commit: {code} {body}");
        Ok(())
    }

    /// The transfer's state now (`GET /v1/transfers/{id}`).
    pub(crate) async fn state(&self, id: &str) -> anyhow::Result<String> {
        let url = format!("{}/v1/transfers/{id}", self.base);
        let (code, body) = self.request(&[&url]).await?;
        ensure!(code == 200, "status: {code} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["state"].as_str().context("no state")?.to_owned())
    }

    /// Waits for the receipt with long polls (`?wait=`): one request per state change, so
    /// the measurement does not cost the edge a TLS handshake every few milliseconds.
    pub(crate) async fn wait_committed(&self, id: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/transfers/{id}?wait=60", self.base);
        let deadline = Instant::now() + RECEIPT_LIMIT;
        loop {
            let (code, body) = self.request(&[&url]).await?;
            ensure!(code == 200, "status: {code} {body}");
            let v: serde_json::Value = serde_json::from_str(&body)?;
            match v["state"].as_str() {
                Some("committed" | "delivered") => return Ok(()),
                Some("failed" | "refused") => bail!("transfer {id} ended: {body}"),
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "no receipt within {RECEIPT_LIMIT:?}"
            );
        }
    }
}

/// Points `[spool] dir` of the gateway's config at `dir` (created; must be empty or new).
fn place_gateway_spool(config: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    ensure!(
        std::fs::read_dir(dir)?.next().is_none(),
        "--gateway-spool {} is not empty",
        dir.display()
    );
    let text = std::fs::read_to_string(config)?;
    let mut doc: toml::Table = text
        .parse()
        .with_context(|| format!("{}", config.display()))?;
    let spool = doc
        .entry("spool")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("[spool] is not a table")?;
    let dir = dir.to_str().context("--gateway-spool is not UTF-8")?;
    spool.insert("dir".into(), toml::Value::String(dir.to_owned()));
    std::fs::write(config, toml::to_string(&doc)?)?;
    Ok(())
}

fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in /proc/<pid>/status")?;
    Ok(kib / 1024.0)
}

pub(crate) async fn start_edge(
    baylink: &Path,
    config: &Path,
    work: &Path,
) -> anyhow::Result<(Child, u32)> {
    let notify = NotifySocket::bind(&work.join("edge-notify.sock"))?;
    let log = work.join("edge.log");
    let log_file = std::fs::File::create(&log)?;
    let mut child = Command::new(baylink)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", notify.path())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the edge")?;
    let pid = child.id().context("edge has no pid")?;
    tokio::select! {
        ready = notify.wait_ready(Duration::from_secs(60)) => ready.with_context(|| format!("edge not ready: {}", log_tail(&log)))?,
        status = child.wait() => bail!("edge exited ({status:?}): {}", log_tail(&log)),
    }
    Ok((child, pid))
}

pub(crate) fn default_baylink() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("baylink");
    ensure!(
        bin.exists(),
        "{} is missing: build it (cargo build -p baylink) or pass --baylink",
        bin.display()
    );
    Ok(bin)
}

/// The bench's working directory: `--work-dir` (created if missing), else a new temporary
/// directory named `prefix...`, returned too so that it lives (and is removed) with the run.
pub(crate) fn work_dir(
    arg: Option<&Path>,
    prefix: &str,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match arg {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            Ok((w.to_owned(), None))
        }
        None => {
            let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            Ok((tmp.path().to_owned(), Some(tmp)))
        }
    }
}

pub(crate) fn gbit(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 * 8.0 / seconds / 1e9
    } else {
        0.0
    }
}

/// Runs the ingest bench and writes the JSON report.
pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    ensure!(
        args.files > 0 && args.concurrency > 0,
        "--files and --concurrency must be > 0"
    );
    let baylink = match &args.baylink {
        Some(b) => b.clone(),
        None => default_baylink()?,
    };
    let (work, _tmp) = work_dir(args.work_dir.as_deref(), "baylink-ingest-")?;
    let base_port = probe_base_port()?;
    let env = work.join("env");
    let mut deployment = Deployment::create(&baylink, &env, base_port).await?;
    if let Some(dir) = &args.gateway_spool {
        place_gateway_spool(&env.join("gateway.toml"), dir)?;
        deployment = Deployment::load(&env)?;
    }
    let gateway = Gateway::start(&baylink, &deployment, &work, None).await?;
    let (mut edge, edge_pid) = start_edge(&baylink, &deployment.edge.path, &work).await?;
    let client = Arc::new(Client {
        base: format!("https://127.0.0.1:{base_port}"),
        ca: env.join("pki/ca.pem"),
        cert: env.join("pki/hospital-a.pem"),
        key: env.join("pki/hospital-a.key"),
    });

    let payload_dir = work.join("payload");
    std::fs::create_dir_all(&payload_dir)?;
    let files = payload::generate(
        &payload_dir,
        args.size * u64::from(args.files),
        args.files,
        7,
    )?;
    eprintln!(
        "uploading {} files of {} bytes with {} clients",
        args.files, args.size, args.concurrency
    );
    let slots = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for f in files.clone() {
        let (client, slots) = (client.clone(), slots.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await?;
            let id = client.declare().await?;
            let took = client.put(&id, &f.path, &f.name).await?;
            client.commit(&id).await?;
            anyhow::Ok((id, took))
        });
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (id, took) = r??;
        hist.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
        ids.push(id);
    }
    let wall = started.elapsed().as_secs_f64();
    let total: u64 = files.iter().map(|f| f.size).sum();
    for id in &ids {
        client.wait_committed(id).await?;
    }
    let rss = peak_rss_mib(edge_pid)?;
    for f in &files {
        std::fs::remove_file(&f.path)?;
    }

    let comparison = if args.compare_size > 0 {
        let dir = work.join("compare");
        std::fs::create_dir_all(&dir)?;
        let big = payload::generate(&dir, args.compare_size, 1, 11)?;
        let f = &big[0];
        eprintln!("comparing one {}-byte file: HTTPS vs baylink send", f.size);
        let mut runs = Vec::new();
        for run in 0..args.compare_runs {
            let https_first = run % 2 == 0;
            let mut https = None;
            let mut send = None;
            for https_turn in [https_first, !https_first] {
                if https_turn {
                    let id = client.declare().await?;
                    let t0 = Instant::now();
                    let upload = client.put(&id, &f.path, &f.name).await?;
                    client.commit(&id).await?;
                    client.wait_committed(&id).await?;
                    https = Some((t0.elapsed().as_secs_f64(), upload.as_secs_f64()));
                } else {
                    let out = Command::new(&baylink)
                        .args(["send", "--no-progress", "--config"])
                        .arg(&deployment.edge.path)
                        .arg(&f.path)
                        .stdin(Stdio::null())
                        .kill_on_drop(true)
                        .output()
                        .await?;
                    ensure!(
                        out.status.success(),
                        "baylink send: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    let s: SendSummary = last_json_line(&out.stdout)?;
                    eprintln!(
                        "  send: seal {:.2} s, transmit {:.2} s",
                        s.seal_seconds.unwrap_or_default(),
                        s.transmit_seconds.unwrap_or_default()
                    );
                    send = Some(s.seconds);
                }
            }
            let ((https_seconds, https_upload_seconds), send_seconds) = (
                https.expect("the HTTPS turn ran"),
                send.expect("the send turn ran"),
            );
            eprintln!(
                "run {}/{}: HTTPS {https_seconds:.2} s (PUT {https_upload_seconds:.2} s), \
                 send {send_seconds:.2} s, ratio {:.2}",
                run + 1,
                args.compare_runs,
                send_seconds / https_seconds
            );
            runs.push(ComparisonRun {
                https_seconds,
                https_upload_seconds,
                send_seconds,
                https_first,
            });
        }
        let https = median(runs.iter().map(|r| r.https_seconds).collect());
        let send = median(runs.iter().map(|r| r.send_seconds).collect());
        let (hg, sg) = (gbit(f.size, https), gbit(f.size, send));
        Some(Comparison {
            bytes: f.size,
            https_seconds: https,
            https_upload_seconds: median(runs.iter().map(|r| r.https_upload_seconds).collect()),
            send_seconds: send,
            https_gbit_per_s: hg,
            send_gbit_per_s: sg,
            ratio_vs_send: if sg > 0.0 { hg / sg } else { 0.0 },
            runs,
        })
    } else {
        None
    };
    let rss = rss.max(peak_rss_mib(edge_pid)?);

    let report = Report {
        files: args.files,
        size: args.size,
        concurrency: args.concurrency,
        client: "curl (one process per request, HTTP/1.1, client certificate)",
        wall_seconds: wall,
        gbit_per_s: gbit(total, wall),
        upload_latency_ms: Latency {
            p50: hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99: hist.value_at_quantile(0.99) as f64 / 1000.0,
            max: hist.max() as f64 / 1000.0,
        },
        edge_peak_rss_mib: rss,
        gateway_spool: args.gateway_spool.clone(),
        comparison,
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.json, &json)
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    println!("{json}");
    edge.kill().await?;
    gateway.stop().await?;
    Ok(())
}
