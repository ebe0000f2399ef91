//! The `baylink` contestant: the real appliance, disk → disk, with policy check, sealing,
//! HSM signatures, receipt verification and fsync, driven through its command line.
//!
//! One dev-env deployment per bench invocation (ports from a probed free range), one gateway
//! `serve` for all runs (readiness through the systemd notify protocol), and per run one
//! `baylink send --stats`. Every run's delivered files are checked against the payload's
//! SHA-256, then the transfer is removed from the delivery directory and both spools so disk
//! use stays bounded.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use nix::sys::signal::Signal;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::env_config::ApplianceConfig;
use crate::payload::{self, PayloadFile};
use crate::proc::{self, NotifySocket};
use crate::quinn_pair::{LatencyUs, last_json_line, log_tail};

/// How long `baylink dev-env` may take (SoftHSM token set-up, key generation).
const DEV_ENV_LIMIT: Duration = Duration::from_secs(120);
/// How long the gateway may take to report READY=1.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long delivery may lag behind the receipt (delivery is asynchronous by design).
const DELIVERY_LIMIT: Duration = Duration::from_secs(120);
/// How long the gateway may take to record a delivery in its spool after the files appear.
const DELIVERY_MARK_LIMIT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for delivery.
const DELIVERY_POLL: Duration = Duration::from_millis(5);
/// How long the gateway may take to drain after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// Where port probing starts, and how many five-port blocks it tries.
const PORT_PROBE_FIRST: u16 = 20_000;
const PORT_PROBE_BLOCKS: u16 = 2_000;

/// Finds `N` such that the dev-env ports N..N+5 are free on 127.0.0.1 (TCP N, N+1, N+3, N+4,
/// N+5 and UDP N+2). Starts at a point derived from the process id so parallel benches spread.
pub fn probe_base_port() -> anyhow::Result<u16> {
    let start =
        u16::try_from(std::process::id() % u32::from(PORT_PROBE_BLOCKS)).unwrap_or_default();
    for i in 0..PORT_PROBE_BLOCKS {
        let base = PORT_PROBE_FIRST + ((start + i) % PORT_PROBE_BLOCKS) * 6;
        if ports_free(base) {
            return Ok(base);
        }
    }
    bail!("no free block of six ports between {PORT_PROBE_FIRST} and 32000")
}

fn ports_free(base: u16) -> bool {
    let tcp = [0u16, 1, 3, 4, 5]
        .iter()
        .map(|d| TcpListener::bind(("127.0.0.1", base + d)))
        .collect::<Result<Vec<_>, _>>();
    let udp = UdpSocket::bind(("127.0.0.1", base + 2));
    tcp.is_ok() && udp.is_ok()
}

/// A dev-env deployment and its parsed configs.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `edge.toml`.
    pub edge: ApplianceConfig,
    /// `gateway.toml`.
    pub gateway: ApplianceConfig,
}

impl Deployment {
    /// Runs `baylink dev-env DIR --base-port N` and loads the two configs.
    pub async fn create(baylink: &Path, dir: &Path, base_port: u16) -> anyhow::Result<Deployment> {
        let run = Command::new(baylink)
            .arg("dev-env")
            .arg(dir)
            .args(["--base-port", &base_port.to_string()])
            // The raw-quinn contestant reads the appliances' TLS keys from PEM files.
            .arg("--tls-key-files")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(DEV_ENV_LIMIT, run)
            .await
            .context("baylink dev-env did not finish in time")?
            .with_context(|| format!("cannot run {}", baylink.display()))?;
        if !output.status.success() {
            bail!(
                "baylink dev-env failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Deployment::load(dir)
    }

    /// Loads an existing dev-env deployment from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Deployment> {
        let edge = ApplianceConfig::load(&dir.join("edge.toml"))?;
        let gateway = ApplianceConfig::load(&dir.join("gateway.toml"))?;
        Ok(Deployment { edge, gateway })
    }

    /// Where the gateway delivers (`delivery.path`).
    pub fn delivered_root(&self) -> anyhow::Result<PathBuf> {
        self.gateway
            .delivery_dir
            .clone()
            .context("the dev-env gateway does not deliver into a directory (delivery.kind)")
    }
}

/// A running `baylink serve` for the gateway.
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Gateway {
    /// Starts the gateway and waits for READY=1 on a notify socket.
    pub async fn start(
        baylink: &Path,
        deployment: &Deployment,
        work: &Path,
        ns: Option<&str>,
    ) -> anyhow::Result<Gateway> {
        let notify = NotifySocket::bind(&work.join("notify.sock"))?;
        let log = work.join("gateway.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = crate::impair::link::command_in(ns, baylink)
            .arg("serve")
            .arg("--config")
            .arg(&deployment.gateway.path)
            .env("NOTIFY_SOCKET", notify.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start baylink serve")?;
        let pid = child.id().context("baylink serve has no pid")?;
        tokio::select! {
            ready = notify.wait_ready(READY_LIMIT) => ready.with_context(|| {
                format!("gateway not ready: {}", log_tail(&log))
            })?,
            status = child.wait() => bail!(
                "gateway exited ({}) before it was ready: {}",
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                log_tail(&log)
            ),
        }
        Ok(Gateway { child, pid, log })
    }

    /// CPU seconds the gateway has used so far.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        proc::process_cpu_seconds(self.pid)
    }

    /// Fails if the gateway has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!("the gateway exited ({status}): {}", log_tail(&self.log)),
        }
    }

    /// SIGTERM, then waits for the drain (SIGKILL after [`STOP_LIMIT`]).
    pub async fn stop(mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        proc::signal(self.pid, Signal::SIGTERM)?;
        match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                bail!("the gateway did not stop within {STOP_LIMIT:?} of SIGTERM; killed")
            }
        }
    }
}

/// The JSON line `baylink send` prints last.
#[derive(Debug, Clone, Deserialize)]
pub struct SendSummary {
    /// Transfer id (names the delivered folder).
    pub transfer_id: String,
    /// Number of files.
    pub files: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Chunk payload bytes sent by this invocation.
    pub wire_bytes: u64,
    /// The whole invocation, sealing included.
    pub seconds: f64,
    /// `verified` on success.
    pub receipt: String,
    /// Sealing (copy into the edge spool + hashing).
    pub seal_seconds: Option<f64>,
    /// Payload bytes the seal cloned instead of copying (absent before the field existed).
    #[serde(default)]
    pub cloned_bytes: Option<u64>,
    /// End of the seal → verified receipt.
    pub transmit_seconds: Option<f64>,
    /// Payload bytes streamed to the gateway while sealing (absent before the field
    /// existed).
    #[serde(default)]
    pub streamed_bytes: Option<u64>,
}

impl SendSummary {
    /// The send's link phase: from the end of the seal (`transmit_seconds`), or the whole
    /// send when it streamed chunks while sealing (the link was at work from the seal's
    /// start).
    pub fn link_seconds(&self) -> Option<f64> {
        match self.streamed_bytes {
            Some(streamed) if streamed > 0 => Some(self.seconds),
            _ => self.transmit_seconds,
        }
    }
}

/// The file `baylink send --stats` writes.
#[derive(Debug, Clone, Deserialize)]
pub struct SendStats {
    /// Chunks sent.
    pub chunks: u64,
    /// Chunk latency (stream open → ChunkOk) percentiles in µs.
    pub chunk_latency_us: LatencyUs,
    /// quinn's statistics of the link connections (absent from an older baylink).
    #[serde(default)]
    pub link: Option<SendLinkStats>,
}

/// `link` of `baylink send --stats`: quinn's figures of the send's connections, summed.
#[derive(Debug, Clone, Deserialize)]
pub struct SendLinkStats {
    /// `link.congestion` in force.
    pub congestion: String,
    /// UDP payload bytes sent.
    pub udp_tx_bytes: u64,
    /// QUIC packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes of the packets declared lost.
    pub lost_bytes: u64,
    /// Congestion events.
    pub congestion_events: u64,
}

/// What one `baylink send` run gave.
#[derive(Debug, Clone)]
pub struct BaylinkRun {
    /// The send's summary line.
    pub summary: SendSummary,
    /// Its `--stats` file, if written.
    pub stats: Option<SendStats>,
    /// Sender CPU seconds (RUSAGE_CHILDREN delta around the send child).
    pub cpu_sender: f64,
    /// Gateway CPU seconds (/proc delta from before the send to after delivery).
    pub cpu_receiver: f64,
    /// When the `send` child exited (before the delivered copy was checked).
    pub exited: Instant,
}

/// Why a run produced no figures.
#[derive(Debug)]
pub enum RunFailure {
    /// The time limit stopped it.
    TimedOut,
    /// Anything else.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for RunFailure {
    fn from(e: anyhow::Error) -> Self {
        RunFailure::Failed(e)
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct SendSettings {
    /// The `baylink` binary.
    pub baylink: PathBuf,
    /// The deployment.
    pub deployment: Deployment,
    /// The payload files.
    pub payload: Vec<PayloadFile>,
    /// Time box of one send.
    pub time_limit: Duration,
    /// Where logs and stats files go.
    pub work: PathBuf,
    /// Network namespace to run `send` in (the sending side of an emulated link), if any.
    pub sender_ns: Option<String>,
}

/// Runs one `baylink send`, checks the delivered copy, and removes the transfer again.
pub async fn run_once(
    settings: &SendSettings,
    gateway: &mut Gateway,
    run: u32,
) -> Result<BaylinkRun, RunFailure> {
    gateway.check_running()?;
    let stats_path = settings.work.join(format!("send-{run}.stats.json"));
    let log = settings.work.join(format!("send-{run}.log"));
    let _ = std::fs::remove_file(&stats_path);
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;

    let gateway_cpu_before = gateway.cpu_seconds()?;
    let children_cpu_before = proc::children_cpu_seconds()?;
    let mut child =
        crate::impair::link::command_in(settings.sender_ns.as_deref(), &settings.baylink)
            .arg("send")
            .arg("--config")
            .arg(&settings.deployment.edge.path)
            .arg("--no-progress")
            .arg("--stats")
            .arg(&stats_path)
            .args(settings.payload.iter().map(|f| &f.path))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start baylink send")?;
    let mut stdout = child.stdout.take().context("baylink send has no stdout")?;
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).await.map(|_| out)
    });
    let status = match tokio::time::timeout(settings.time_limit, child.wait()).await {
        Ok(status) => status.context("waiting for baylink send")?,
        Err(_) => {
            // Kill and reap it here, so its CPU time cannot leak into the next run's figure.
            let _ = child.kill().await;
            if let Some(id) = transfer_id_from_log(&log) {
                remove_transfer(&settings.deployment, &id);
            }
            return Err(RunFailure::TimedOut);
        }
    };
    let exited = Instant::now();
    let cpu_sender = proc::children_cpu_seconds()? - children_cpu_before;
    let stdout = reader
        .await
        .context("stdout reader")?
        .context("reading send's stdout")?;
    if !status.success() {
        if let Some(id) = transfer_id_from_log(&log) {
            remove_transfer(&settings.deployment, &id);
        }
        return Err(anyhow::anyhow!("baylink send failed ({status}): {}", log_tail(&log)).into());
    }
    let summary: SendSummary = last_json_line(&stdout).context("baylink send's summary")?;
    let result =
        check_and_measure(settings, gateway, &summary, &stats_path, gateway_cpu_before).await;
    remove_transfer(&settings.deployment, &summary.transfer_id);
    let (stats, cpu_receiver) = result?;
    Ok(BaylinkRun {
        summary,
        stats,
        cpu_sender,
        cpu_receiver,
        exited,
    })
}

async fn check_and_measure(
    settings: &SendSettings,
    gateway: &Gateway,
    summary: &SendSummary,
    stats_path: &Path,
    gateway_cpu_before: f64,
) -> anyhow::Result<(Option<SendStats>, f64)> {
    let total: u64 = settings.payload.iter().map(|f| f.size).sum();
    ensure!(
        summary.receipt == "verified",
        "receipt is `{}`, not verified",
        summary.receipt
    );
    ensure!(
        summary.bytes == total && summary.files == settings.payload.len() as u64,
        "send reports {} files / {} bytes, the payload is {} / {total}",
        summary.files,
        summary.bytes,
        settings.payload.len()
    );
    let stats = match std::fs::read(stats_path) {
        Ok(bytes) => Some(
            serde_json::from_slice::<SendStats>(&bytes)
                .with_context(|| format!("cannot parse {}", stats_path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", stats_path.display())),
    };

    let delivered = settings
        .deployment
        .delivered_root()?
        .join(&summary.transfer_id);
    let names: Vec<&str> = settings.payload.iter().map(|f| f.name.as_str()).collect();
    wait_for(DELIVERY_LIMIT, || {
        names.iter().all(|n| delivered.join(n).is_file())
    })
    .await
    .with_context(|| {
        format!(
            "{} did not appear within {DELIVERY_LIMIT:?}",
            delivered.display()
        )
    })?;
    // The gateway records the delivery in its spool just after the rename; removing the spool
    // directory before that would make it retry forever.
    let mark = settings
        .deployment
        .gateway
        .spool_dir
        .join(&summary.transfer_id)
        .join("delivered");
    if wait_for(DELIVERY_MARK_LIMIT, || mark.exists())
        .await
        .is_err()
    {
        eprintln!(
            "warning: no delivery record {} after {DELIVERY_MARK_LIMIT:?}",
            mark.display()
        );
    }
    let cpu_receiver = gateway.cpu_seconds()? - gateway_cpu_before;

    let payload = settings.payload.clone();
    let dir = delivered.clone();
    tokio::task::spawn_blocking(move || verify_delivered(&dir, &payload)).await??;
    Ok((stats, cpu_receiver))
}

/// Polls `done` every [`DELIVERY_POLL`] until it holds or `limit` passes.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            bail!("timed out");
        }
        tokio::time::sleep(DELIVERY_POLL).await;
    }
    Ok(())
}

/// Checks that every payload file was delivered byte-identical (length and SHA-256).
pub fn verify_delivered(dir: &Path, payload: &[PayloadFile]) -> anyhow::Result<()> {
    for f in payload {
        let path = dir.join(&f.name);
        let (sha, len) = payload::sha256_file(&path)?;
        ensure!(
            len == f.size && sha == f.sha256,
            "{} differs from the source ({len} bytes, sha256 {}; expected {} bytes, {})",
            path.display(),
            hex(&sha),
            f.size,
            hex(&f.sha256)
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id from the `transfer <id>` line `send` prints on stderr at start.
fn transfer_id_from_log(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    transfer_id_from_text(&text)
}

fn transfer_id_from_text(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let id = line.trim().strip_prefix("transfer ")?;
        let plausible = id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        plausible.then(|| id.to_owned())
    })
}

/// Removes a transfer from the delivery directory and both spools (best effort: a missing
/// directory is fine).
fn remove_transfer(deployment: &Deployment, id: &str) {
    let mut dirs = vec![
        deployment.edge.spool_dir.join(id),
        deployment.gateway.spool_dir.join(id),
    ];
    if let Ok(root) = deployment.delivered_root() {
        dirs.push(root.join(id));
    }
    for dir in dirs {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: cannot remove {}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_transfer_line() {
        let log = "2026-01-01T00:00:00Z INFO sealing transfer=x\n\
                   transfer 0190a5c2-7f4e-7c3b-9d2e-1a2b3c4d5e6f\n";
        assert_eq!(
            transfer_id_from_text(log).as_deref(),
            Some("0190a5c2-7f4e-7c3b-9d2e-1a2b3c4d5e6f")
        );
        assert_eq!(transfer_id_from_text("transfer ../../etc"), None);
        assert_eq!(transfer_id_from_text(""), None);
    }

    #[test]
    fn probed_ports_are_free() {
        let base = probe_base_port().unwrap();
        assert!(base >= PORT_PROBE_FIRST);
        assert!(ports_free(base));
        let _held = UdpSocket::bind(("127.0.0.1", base + 2)).unwrap();
        assert!(!ports_free(base));
    }

    #[test]
    fn summary_and_stats_parse() {
        let line = r#"{"transfer_id":"0190a5c2-7f4e-7c3b-9d2e-1a2b3c4d5e6f","files":1,"bytes":10,"wire_bytes":10,"seconds":1.5,"merkle_root":"ab","receipt":"verified","seal_seconds":0.5,"transmit_seconds":1.0}"#;
        let s: SendSummary = serde_json::from_str(line).unwrap();
        assert_eq!(s.transmit_seconds, Some(1.0));
        assert_eq!(s.cloned_bytes, None);
        let cloned = line.replace(
            r#""transmit_seconds""#,
            r#""cloned_bytes":10,"transmit_seconds""#,
        );
        let s: SendSummary = serde_json::from_str(&cloned).unwrap();
        assert_eq!(s.cloned_bytes, Some(10));
        assert_eq!(s.streamed_bytes, None);
        let streamed = line.replace("}", r#","streamed_bytes":8}"#);
        let s: SendSummary = serde_json::from_str(&streamed).unwrap();
        assert_eq!(s.streamed_bytes, Some(8));
        let old = r#"{"transfer_id":"x","files":1,"bytes":10,"wire_bytes":10,"seconds":1.5,"merkle_root":"ab","receipt":"verified"}"#;
        assert_eq!(
            serde_json::from_str::<SendSummary>(old)
                .unwrap()
                .transmit_seconds,
            None
        );
        let stats: SendStats =
            serde_json::from_str(r#"{"chunks":3,"chunk_latency_us":{"p50":10,"p99":20,"max":30}}"#)
                .unwrap();
        assert_eq!(stats.chunk_latency_us.p99, 20);
    }

    #[test]
    fn verification_catches_a_changed_byte() {
        let dir = tempfile::tempdir().unwrap();
        let files = payload::generate(dir.path(), 5000, 2, 3).unwrap();
        verify_delivered(dir.path(), &files).unwrap();
        let mut bytes = std::fs::read(&files[1].path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&files[1].path, bytes).unwrap();
        let err = verify_delivered(dir.path(), &files).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
    }
}
