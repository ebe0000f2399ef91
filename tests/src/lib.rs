//! Support for baylink's integration tests: a private dev-env deployment per test, the real
//! `baylink` binary as edge and gateway, readiness through the systemd notify protocol.
//!
//! Every test gets its own temporary directory (PKI, SoftHSM store, spools) and its own five
//! ports, so tests run in parallel. Processes are killed when their guard drops.

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `baylink` binary of the build that runs these tests.
pub fn baylink_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary> -> target/<profile>/baylink
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("baylink");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p baylink, same profile as the tests)",
        bin.display()
    );
    bin
}

/// Finds a base port N with N..N+5 free on 127.0.0.1 for both TCP and UDP.
pub fn free_base_port() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let mut x = seed | 1;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20_000 + (x % 30_000) as u16;
        let free = (0..6).all(|i| {
            TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free port range found");
}

/// A dev-env deployment in a temporary directory.
#[derive(Debug)]
pub struct Deployment {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The base port.
    pub base_port: u16,
}

impl Deployment {
    /// Runs `baylink dev-env` into a fresh temporary directory: the appliances' TLS keys are
    /// in their tokens (`tls.key = "pkcs11:object=baylink-tls"`).
    pub fn new() -> anyhow::Result<Deployment> {
        Self::create(false)
    }

    /// [`Deployment::new`] with the appliances' TLS keys as PEM files (`pki/edge.key`,
    /// `pki/gateway.key`; `dev-env --tls-key-files`).
    pub fn with_tls_key_files() -> anyhow::Result<Deployment> {
        Self::create(true)
    }

    fn create(tls_key_files: bool) -> anyhow::Result<Deployment> {
        let dir = tempfile::Builder::new().prefix("baylink-test-").tempdir()?;
        let base_port = free_base_port();
        let mut command = Command::new(baylink_bin());
        command
            .arg("dev-env")
            .arg(dir.path())
            .arg("--base-port")
            .arg(base_port.to_string());
        if tls_key_files {
            command.arg("--tls-key-files");
        }
        let out = command.output()?;
        if !out.status.success() {
            bail!(
                "dev-env failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Deployment { dir, base_port })
    }

    /// Path inside the deployment.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `edge.toml`.
    pub fn edge_config(&self) -> PathBuf {
        self.path("edge.toml")
    }

    /// `gateway.toml`.
    pub fn gateway_config(&self) -> PathBuf {
        self.path("gateway.toml")
    }

    /// Sets `key = value` (TOML) in `[section]` of a config, replacing the key if present.
    pub fn set(&self, config: &str, section: &str, key: &str, value: &str) -> anyhow::Result<()> {
        let path = self.path(config);
        let text = std::fs::read_to_string(&path)?;
        let header = format!("[{section}]");
        let line = format!("{key} = {value}");
        let mut out = Vec::new();
        let (mut in_section, mut done) = (false, false);
        for l in text.lines() {
            if l.starts_with('[') {
                if in_section && !done {
                    out.push(line.clone());
                    done = true;
                }
                in_section = l.trim() == header;
            }
            if in_section && l.split('=').next().map(str::trim) == Some(key) {
                if !done {
                    out.push(line.clone());
                    done = true;
                }
                continue;
            }
            out.push(l.to_owned());
        }
        if !done {
            if !in_section {
                out.push(header);
            }
            out.push(line);
        }
        let new = out.join("\n") + "\n";
        std::fs::write(&path, new)?;
        Ok(())
    }

    /// Starts `baylink serve` for a config and waits until it reports READY=1.
    pub fn serve(&self, config: &Path) -> anyhow::Result<Service> {
        Service::start(
            Command::new(baylink_bin())
                .arg("serve")
                .arg("--config")
                .arg(config),
            self.dir.path(),
        )
    }

    /// Runs `baylink send` with extra arguments; returns its output.
    pub fn send(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = Command::new(baylink_bin())
            .arg("send")
            .arg("--config")
            .arg(self.edge_config())
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok(out)
    }

    /// `GET /metrics` of the edge (`gateway = false`, port N+1) or the gateway (port N+3):
    /// the Prometheus text, headers included.
    pub fn metrics(&self, gateway: bool) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let port = self.base_port + if gateway { 3 } else { 1 };
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(EVENT_WAIT))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// `GET /healthz` of the edge (`gateway = false`) or the gateway: the status code.
    pub fn healthz(&self, gateway: bool) -> anyhow::Result<u16> {
        use std::io::{Read, Write};
        let port = self.base_port + if gateway { 3 } else { 1 };
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP answer: {out:?}"))?;
        Ok(code)
    }

    /// Copies the SoftHSM store (both tokens, as they are now) to `softhsm-<name>/` with its
    /// own `softhsm2.conf`, and returns that file's path relative to the deployment, for
    /// `hsm.softhsm_conf`: a clone of the appliances' HSMs, e.g. for a forked edge whose
    /// token must not see what the real edge does later. Copy only while no process of the
    /// deployment writes to the tokens.
    pub fn clone_hsm(&self, name: &str) -> anyhow::Result<String> {
        let rel = format!("softhsm-{name}");
        let from = self.path("softhsm/tokens");
        let to = self.path(&rel).join("tokens");
        copy_tree(&from, &to)?;
        let conf = format!("{rel}/softhsm2.conf");
        let text = std::fs::read_to_string(self.path("softhsm/softhsm2.conf"))?
            .replace(&from.display().to_string(), &to.display().to_string());
        std::fs::write(self.path(&conf), text)?;
        Ok(conf)
    }

    /// Runs `baylink send --no-progress FILES...` as one transfer, asserts that it succeeded
    /// (naming its stderr and `gateway`'s log otherwise), and returns its summary line and
    /// the transfer id.
    pub fn send_ok(&self, files: &[&Path], gateway: &Service) -> (serde_json::Value, String) {
        let mut args = vec!["--no-progress"];
        args.extend(files.iter().map(|f| f.to_str().expect("UTF-8 test path")));
        let out = self.send(&args).expect("send runs");
        assert!(
            out.status.success(),
            "send failed: {}\ngateway log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            gateway.log()
        );
        let s = summary(&out).expect("send prints its summary");
        let id = s["transfer_id"]
            .as_str()
            .expect("the summary names the transfer")
            .to_owned();
        (s, id)
    }

    /// The delivered copy of `name` in transfer `id`.
    pub fn delivered(&self, id: &str, name: &str) -> PathBuf {
        self.path("delivered").join(id).join(name)
    }

    /// Waits until the gateway has delivered `name` of transfer `id` (delivery follows the
    /// receipt), at most `limit`; returns the delivered copy's path.
    pub fn wait_delivered(&self, id: &str, name: &str, limit: Duration) -> PathBuf {
        let got = self.delivered(id, name);
        let start = Instant::now();
        while !got.exists() {
            assert!(
                start.elapsed() < limit,
                "{} not delivered within {limit:?}",
                got.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        got
    }

    /// Starts `baylink send` of `file` in the background. With `keep_output`, stdout and
    /// stderr are piped (for `wait_with_output`); otherwise discarded (a sender that is
    /// going to be killed).
    ///
    /// The edge is set to send only once the transfer is sealed
    /// (`transport.stream_while_sealing = false`, for this and later sends): the tests that
    /// stop a send half-way need it half-way on the link, and chunks streamed while sealing
    /// can all reach the gateway before its offer makes any of them durable.
    pub fn spawn_send(&self, file: &Path, keep_output: bool) -> anyhow::Result<Child> {
        self.set("edge.toml", "transport", "stream_while_sealing", "false")?;
        let out = || {
            if keep_output {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        Ok(Command::new(baylink_bin())
            .args(["send", "--no-progress", "--config"])
            .arg(self.edge_config())
            .arg(file)
            .stdin(Stdio::null())
            .stdout(out())
            .stderr(out())
            .spawn()?)
    }

    /// Starts `baylink serve --config <config>` in a private mount namespace whose `spool`
    /// directory (relative to the deployment) is a tmpfs of `size` (e.g. `"24m"`): a disk
    /// that fills up. The spool is visible to the test as
    /// `/proc/<pid>/root/<absolute spool path>`. Needs root and `unshare` (see
    /// [`mount_namespace_unavailable`]).
    pub fn serve_on_small_disk(
        &self,
        config: &Path,
        spool: &str,
        size: &str,
    ) -> anyhow::Result<Service> {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!(
                r#"mount -t tmpfs -o size={size} baylink-test "$0" && exec "$@""#
            ))
            .arg(self.path(spool))
            .arg(baylink_bin())
            .args(["serve", "--config"])
            .arg(config);
        Service::start(&mut cmd, self.dir.path())
    }

    /// Waits (bounded) until the gateway has durable chunks of some transfer on record and
    /// returns that transfer's `state` file; fails early if `sender` ends first.
    pub fn wait_for_gateway_progress(&self, sender: &mut Child) -> PathBuf {
        let spool = self.path("spool/gateway");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(state) = std::fs::read_dir(&spool)
                .ok()
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path().join("state"))
                .find(|p| p.exists())
            {
                return state;
            }
            assert!(
                sender.try_wait().ok().flatten().is_none(),
                "sender ended before any progress"
            );
            assert!(
                Instant::now() < deadline,
                "no durable progress within 120 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The names in a spool directory, hidden ones aside (the health check's `.watchdog`, the
/// DICOM door's `.incoming`, the gateway's `.staging`): its transfers.
pub fn spool_entries(spool: &Path) -> Vec<String> {
    std::fs::read_dir(spool)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Copies a directory tree (files and directories only).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Why a test that needs a private mount namespace with a tmpfs cannot run here, if it
/// cannot (not root, or no `unshare --mount`).
pub fn mount_namespace_unavailable() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        return Some("needs root for a private mount namespace and tmpfs".into());
    }
    let ok = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    (!ok).then(|| "unshare --mount is not available".into())
}

/// Why a test that mounts a fresh XFS file system (reflinks) in a private mount namespace
/// cannot run here, if it cannot (see [`mount_namespace_unavailable`]; `mkfs.xfs` from
/// xfsprogs; a loop device).
pub fn xfs_unavailable() -> Option<String> {
    if let Some(why) = mount_namespace_unavailable() {
        return Some(why);
    }
    let mkfs = Command::new("mkfs.xfs")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !mkfs {
        return Some("mkfs.xfs is not installed (xfsprogs)".into());
    }
    (!Path::new("/dev/loop-control").exists()).then(|| "no loop devices".into())
}

/// A running `baylink serve`; killed on drop.
#[derive(Debug)]
pub struct Service {
    child: Option<Child>,
    stderr_path: PathBuf,
    /// The notification socket the service reports to (`READY=1`, `STOPPING=1`, ...).
    notify: UnixDatagram,
}

impl Service {
    /// Spawns `cmd` with a private NOTIFY_SOCKET and waits for READY=1 (60 s at most).
    pub fn start(cmd: &mut Command, scratch: &Path) -> anyhow::Result<Service> {
        let sock_path = scratch.join(format!("notify-{}.sock", unique()));
        let sock = UnixDatagram::bind(&sock_path)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stderr_path = scratch.join(format!("service-{}.log", unique()));
        let stderr = std::fs::File::create(&stderr_path)?;
        let child = cmd
            .env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        let mut svc = Service {
            child: Some(child),
            stderr_path,
            notify: sock,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        loop {
            match svc.notify.recv(&mut buf) {
                Ok(n)
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1") =>
                {
                    return Ok(svc);
                }
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = svc.child.as_mut().expect("child").try_wait()? {
                bail!("service exited with {status} before ready:\n{}", svc.log());
            }
            if Instant::now() > deadline {
                bail!("service not ready after 60 s:\n{}", svc.log());
            }
        }
    }

    /// What the service wrote on stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits (at most `limit`) until one line of the log holds every one of `needles`;
    /// returns that line, or panics with the log.
    pub fn wait_for_log(&self, needles: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needles:?} in the log within {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `limit`) for the service to send `state` (e.g. `STOPPING=1`) on its
    /// notification socket after `READY=1`; whether it did.
    pub fn notified(&self, state: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == state)
            {
                return true;
            }
        }
        false
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits ([`EVENT_WAIT`] at most) for the exit status.
    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        signal(child.id(), "TERM")?;
        let status = wait_bounded(&mut child, EVENT_WAIT)?;
        if !status.success() {
            // The caller asserts on the status; the log says why.
            eprintln!("service stopped with {status}:\n{}", self.log());
        }
        Ok(status)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The number after `key=` in a log line (`key=123`); panics naming the key and the line
/// when there is none.
pub fn log_number(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Sends signal `sig` (e.g. `"STOP"`, `"CONT"`, `"TERM"`) to process `pid` with `kill`.
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(st.success(), "kill -{sig} {pid} failed");
    Ok(())
}

fn wait_bounded(child: &mut Child, limit: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a file of `len` pseudo-random bytes (seeded, so reproducible) and returns its path.
pub fn payload(dir: &Path, name: &str, len: u64, seed: u64) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = len;
    let mut block = vec![0u8; 1 << 20];
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(path)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {} failed", path.display());
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The last stdout line of `send`, parsed.
pub fn summary(out: &Output) -> anyhow::Result<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().with_context(|| {
        format!(
            "send printed nothing; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(serde_json::from_str(line)?)
}

/// The summary of a `send` that must have succeeded (`out`); when it did not, the failure
/// shows its stderr and the log of the gateway `gw`.
pub fn sent(out: &Output, gw: &Service) -> serde_json::Value {
    assert!(
        out.status.success(),
        "send failed: {}\ngateway:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    summary(out).expect("send's JSON summary")
}

/// The `baylink-bench` binary of the build that runs these tests (it holds the impairment
/// forwarder, `baylink-bench impair`).
pub fn bench_bin() -> PathBuf {
    let bin = baylink_bin().with_file_name("baylink-bench");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p baylink-bench, same profile as the tests)",
        bin.display()
    );
    bin
}

/// Runs `baylink-bench ARGS` against this build's `baylink`, with its JSON report and work
/// directory in `dir`; fails the test unless the bench succeeds. Returns the report and what
/// the bench printed on stdout.
pub fn run_bench(args: &[&str], dir: &Path) -> (serde_json::Value, String) {
    let json = dir.join("bench.json");
    let out = Command::new(bench_bin())
        .args(args)
        .arg("--baylink")
        .arg(baylink_bin())
        .arg("--json")
        .arg(&json)
        .arg("--work-dir")
        .arg(dir)
        .output()
        .expect("baylink-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&json).expect("the bench wrote its JSON report");
    (
        serde_json::from_str(&report).expect("the bench's JSON report parses"),
        stdout,
    )
}

/// How long a test waits for something it expects to happen: a log line, a readiness signal,
/// an answer, a process exit. Generous on purpose: on a loaded machine events come late, and
/// the bound is there to end a hang, never to time a success.
pub const EVENT_WAIT: Duration = Duration::from_secs(60);

/// True when the tests run under CI: the `CI` environment variable is set (to anything but
/// an empty string, `0` or `false`).
pub fn under_ci() -> bool {
    ci_value_is_set(std::env::var("CI").ok().as_deref())
}

fn ci_value_is_set(value: Option<&str>) -> bool {
    value.is_some_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// A test (or part of one) that cannot run here because a tool or a capability is missing.
///
/// Outside CI it prints `skipped: <reason>` on stderr and returns; the caller then returns
/// (or leaves the part out). Under CI ([`under_ci`]) it panics with the reason: CI installs
/// every tool the tests need and runs as root, so a missing one is a broken set-up, and a
/// test that skipped there would pass without having tested anything.
pub fn skip_or_fail(reason: &str) {
    skip_or_fail_under(under_ci(), reason);
}

fn skip_or_fail_under(ci: bool, reason: &str) {
    assert!(
        !ci,
        "cannot run: {reason} (CI is set, and under CI every tool a test needs is installed)"
    );
    eprintln!("skipped: {reason}");
}

/// [`skip_or_fail`] when `missing` holds a reason; true when the test must return.
pub fn skip_if(missing: Option<String>) -> bool {
    match missing {
        Some(reason) => {
            skip_or_fail(&reason);
            true
        }
        None => false,
    }
}

/// Why this machine cannot emulate a link (not root, no /dev/net/tun, no `ip`), if it cannot.
/// Tests pass this to [`skip_if`].
pub fn link_unsupported() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root (network namespaces need root)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("iproute2's `ip` is not installed".into()),
    }
}

/// True when the network namespace `name` exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// An emulated link: `baylink-bench impair` as a child, two network namespaces joined by its
/// forwarder. Dropping it sends SIGINT to the forwarder's own pid (so it removes its
/// namespaces) and waits.
#[derive(Debug)]
pub struct Link {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    /// Namespace of side A (senders run here).
    pub ns_a: String,
    /// Address of side A.
    pub addr_a: String,
    /// Namespace of side B (receivers run here).
    pub ns_b: String,
    /// Address of side B.
    pub addr_b: String,
}

impl Link {
    /// Starts a forwarder with these `baylink-bench impair` flags and waits for its ready line
    /// ([`EVENT_WAIT`] at most).
    pub fn start(flags: &[&str]) -> anyhow::Result<Link> {
        let mut child = Command::new(bench_bin())
            .arg("impair")
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting baylink-bench impair")?;
        let stdout = child.stdout.take().context("forwarder stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut link = Link {
            child: Some(child),
            lines,
            ns_a: String::new(),
            addr_a: String::new(),
            ns_b: String::new(),
            addr_b: String::new(),
        };
        let ready = link.expect_line(|l| l.starts_with("ready "), EVENT_WAIT)?;
        let f: Vec<&str> = ready.split_whitespace().collect();
        let ["ready", ns_a, addr_a, ns_b, addr_b] = f[..] else {
            bail!("unexpected ready line: {ready}");
        };
        (link.ns_a, link.addr_a) = (ns_a.to_owned(), addr_a.to_owned());
        (link.ns_b, link.addr_b) = (ns_b.to_owned(), addr_b.to_owned());
        Ok(link)
    }

    /// Waits (bounded) for a stdout line of the forwarder matching `want`.
    fn expect_line(
        &mut self,
        want: impl Fn(&str) -> bool,
        limit: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return Ok(line),
                Ok(_) => {}
                Err(e) => {
                    let status = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    bail!("forwarder: no expected line within {limit:?} ({e}; exit {status:?})");
                }
            }
        }
    }

    /// The forwarder's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A command that runs `program` inside namespace A (`ip netns exec`, which execs, so the
    /// child's pid is the program's).
    pub fn in_a(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.ns_a, program)
    }

    /// A command that runs `program` inside namespace B.
    pub fn in_b(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.ns_b, program)
    }

    /// Cuts the link (SIGUSR1) and waits until the forwarder confirms.
    pub fn cut(&mut self) -> anyhow::Result<()> {
        signal(self.pid(), "USR1")?;
        self.expect_line(|l| l == "cut", EVENT_WAIT)?;
        Ok(())
    }

    /// Restores the link (SIGUSR2) and waits until the forwarder confirms.
    pub fn restore(&mut self) -> anyhow::Result<()> {
        signal(self.pid(), "USR2")?;
        self.expect_line(|l| l == "restored", EVENT_WAIT)?;
        Ok(())
    }

    /// Stops the forwarder (SIGINT), checks it exited 0 and removed both namespaces, and
    /// returns its final JSON line (settings and per-direction counters).
    pub fn stop(mut self) -> anyhow::Result<serde_json::Value> {
        let mut child = self.child.take().context("already stopped")?;
        signal(child.id(), "INT")?;
        let status = wait_bounded(&mut child, EVENT_WAIT)?;
        anyhow::ensure!(status.success(), "forwarder exited with {status}");
        let last = self
            .lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .last()
            .context("forwarder printed no counters")?;
        for ns in [&self.ns_a, &self.ns_b] {
            anyhow::ensure!(!netns_exists(ns), "namespace {ns} still exists after stop");
        }
        Ok(serde_json::from_str(&last)?)
    }
}

fn netns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), "INT");
            let _ = wait_bounded(&mut child, EVENT_WAIT);
        }
    }
}

/// True when OpenSSH's server is installed (the scp baseline of `baylink-bench`).
pub fn sshd_installed() -> bool {
    Path::new("/usr/sbin/sshd").exists()
}

/// Why Orthanc with its DICOMweb plugin cannot run here, if it cannot.
pub fn orthanc_unavailable() -> Option<String> {
    if !Path::new(ORTHANC_DICOMWEB_PLUGIN).exists() {
        return Some(format!(
            "{ORTHANC_DICOMWEB_PLUGIN} is missing (apt-get install orthanc orthanc-dicomweb)"
        ));
    }
    let runs = Command::new("Orthanc")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!runs).then(|| "Orthanc is not installed (apt-get install orthanc)".to_owned())
}

/// A helper process of a test (a store, a proxy) with its own temporary directory and its
/// stderr in a log file there. Killed on drop.
#[derive(Debug)]
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log_path: PathBuf,
    /// Removed (after the process is killed) on drop.
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// A fresh temporary directory for `name` (configs go there before [`Daemon::spawn`]).
    fn dir(name: &str) -> anyhow::Result<tempfile::TempDir> {
        Ok(tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?)
    }

    /// Spawns `cmd` with stdin and stdout closed and stderr into `dir`/`name`.log.
    fn spawn(
        name: &'static str,
        cmd: &mut Command,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
        let log_path = dir.path().join(format!("{name}.log"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon {
            name,
            child: Some(child),
            log_path,
            _dir: dir,
        })
    }

    /// Polls `ready` every 50 ms until it holds ([`EVENT_WAIT`] at most); fails early if the process
    /// exits. The readiness signal of a process that has no notify socket.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + EVENT_WAIT;
        while !ready() {
            if let Some(status) = self.child.as_mut().expect("child").try_wait()? {
                bail!("{} exited with {status}: {}", self.name, self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not {what} within {EVENT_WAIT:?}: {}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends signal `sig` (as [`signal`] names it) to the process.
    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        signal(self.child.as_ref().expect("child").id(), sig)
    }

    /// Kills the process with SIGKILL, as a crash would, and starts `cmd` in its place with
    /// the same directory; its stderr is appended to the same log.
    fn crash_and_respawn(&mut self, cmd: &mut Command) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} again", self.name))?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs curl with `args` (20 s at most); its output, or an error naming what it said.
fn curl(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20"])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// Debian's path of the DICOMweb plugin.
pub const ORTHANC_DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";

/// An Orthanc of its own (the downstream health-record store): storage in a temporary
/// directory, HTTP on a free loopback port, DICOMweb at `/dicom-web/`, no DICOM listener.
/// Killed on drop.
#[derive(Debug)]
pub struct Orthanc {
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    config_path: PathBuf,
    daemon: Daemon,
}

impl Orthanc {
    /// Starts Orthanc on a free port and waits ([`EVENT_WAIT`] at most) until its REST API
    /// answers.
    pub fn start() -> anyhow::Result<Orthanc> {
        Orthanc::start_on(free_base_port())
    }

    /// Starts Orthanc with HTTP on `port` and waits ([`EVENT_WAIT`] at most) until its
    /// REST API answers.
    pub fn start_on(port: u16) -> anyhow::Result<Orthanc> {
        let dir = Daemon::dir("orthanc")?;
        let storage = dir.path().join("db");
        let config = serde_json::json!({
            "Name": "baylink-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": port,
            "DicomServerEnabled": false,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "HttpDescribeErrors": true,
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        });
        let config_path = dir.path().join("orthanc.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let daemon = Daemon::spawn("Orthanc", Command::new("Orthanc").arg(&config_path), dir)?;
        let mut orthanc = Orthanc {
            port,
            config_path,
            daemon,
        };
        orthanc.wait_until_answering()?;
        Ok(orthanc)
    }

    fn wait_until_answering(&mut self) -> anyhow::Result<()> {
        let system = format!("http://127.0.0.1:{}/system", self.port);
        self.daemon
            .wait_until("answer", || curl(&[&system]).is_ok())
    }

    /// Stops the process where it is (SIGSTOP): requests to it hang, nothing it has not
    /// yet answered is answered, until it is killed ([`Orthanc::crash_and_restart`]).
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.daemon.signal("STOP")
    }

    /// Kills Orthanc with SIGKILL, as a crash or a power cut of its host would, starts it
    /// again on the same port and storage, and waits ([`EVENT_WAIT`] at most) until its
    /// REST API answers.
    pub fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.daemon
            .crash_and_respawn(Command::new("Orthanc").arg(&self.config_path))?;
        self.wait_until_answering()
    }

    /// The DICOMweb base URL (`delivery.url`).
    pub fn dicomweb_url(&self) -> String {
        format!("http://127.0.0.1:{}/dicom-web", self.port)
    }

    /// GET `path` of the REST API; the body, or an error for a failed request.
    pub fn get(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        curl(&[&format!("http://127.0.0.1:{}{path}", self.port)])
    }

    /// POST `body` to `path` of the REST API; the answer's body.
    pub fn post(&self, path: &str, body: &str) -> anyhow::Result<Vec<u8>> {
        curl(&[
            "--data-binary",
            body,
            &format!("http://127.0.0.1:{}{path}", self.port),
        ])
    }

    /// The stored file of the instance with SOP Instance UID `uid`, if Orthanc has it.
    pub fn instance_file(&self, uid: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let found: serde_json::Value = serde_json::from_slice(&self.post("/tools/lookup", uid)?)?;
        let id = found
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["Type"] == "Instance")
            .and_then(|f| f["ID"].as_str());
        match id {
            None => Ok(None),
            Some(id) => Ok(Some(self.get(&format!("/instances/{id}/file"))?)),
        }
    }

    /// Number of instances stored.
    pub fn instance_count(&self) -> anyhow::Result<usize> {
        let list: serde_json::Value = serde_json::from_slice(&self.get("/instances")?)?;
        Ok(list.as_array().map_or(0, Vec::len))
    }

    /// What Orthanc wrote on stderr so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// Why stunnel (the TLS proxy in front of the store) cannot run here, if it cannot.
pub fn stunnel_unavailable() -> Option<String> {
    let runs = Command::new("stunnel")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    (!runs).then(|| "stunnel is not installed (apt-get install stunnel4)".to_owned())
}

/// An stunnel TLS server on a free loopback port that forwards to a plain TCP port: a store
/// reached over https, with client certificates required and verified against `ca`.
/// Killed on drop.
#[derive(Debug)]
pub struct TlsProxy {
    /// The TLS port on 127.0.0.1.
    pub port: u16,
    daemon: Daemon,
}

impl TlsProxy {
    /// Starts stunnel: accepts TLS on a free port with `cert`/`key` (which chain to
    /// `server_ca`), requires a client certificate that chains to `ca`, and forwards to
    /// 127.0.0.1:`to`. Ready when an https request with `client` (certificate, key) through
    /// it reaches `ready_path` of the service behind it ([`EVENT_WAIT`] at most).
    pub fn start(
        (cert, key, server_ca): (&Path, &Path, &Path),
        ca: &Path,
        to: u16,
        client: (&Path, &Path),
        ready_path: &str,
    ) -> anyhow::Result<TlsProxy> {
        let dir = Daemon::dir("stunnel")?;
        let port = free_base_port();
        let config = format!(
            "foreground = yes\npid =\nsyslog = no\ndebug = notice\n\
             [store]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{to}\n\
             cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
            cert.display(),
            key.display(),
            ca.display()
        );
        let config_path = dir.path().join("stunnel.conf");
        std::fs::write(&config_path, config)?;
        let mut daemon = Daemon::spawn("stunnel", Command::new("stunnel").arg(&config_path), dir)?;
        let url = format!("https://127.0.0.1:{port}{ready_path}");
        let (ca, cert, key) = (server_ca.display(), client.0.display(), client.1.display());
        let (ca, cert, key) = (ca.to_string(), cert.to_string(), key.to_string());
        daemon.wait_until("pass a request", || {
            curl(&["--cacert", &ca, "--cert", &cert, "--key", &key, &url]).is_ok()
        })?;
        Ok(TlsProxy { port, daemon })
    }

    /// What stunnel logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_counts_as_set_unless_empty_zero_or_false() {
        for set in ["true", "1", "yes", "github"] {
            assert!(ci_value_is_set(Some(set)), "{set}");
        }
        for unset in [None, Some(""), Some(" "), Some("0"), Some("false")] {
            assert!(!ci_value_is_set(unset), "{unset:?}");
        }
    }

    #[test]
    #[should_panic(expected = "cannot run: iperf3 is not installed (CI is set")]
    fn under_ci_a_missing_tool_fails_the_test() {
        skip_or_fail_under(true, "iperf3 is not installed");
    }

    #[test]
    fn outside_ci_a_missing_tool_skips() {
        skip_or_fail_under(false, "iperf3 is not installed");
        assert!(!skip_if(None));
    }
}
