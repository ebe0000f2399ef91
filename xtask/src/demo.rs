//! `cargo xtask demo`: one payload through a loopback edge → gateway deployment, verified.
//!
//! Steps: softhsm2 present; `cargo build --release -p baylink`; `baylink dev-env DIR`; the gateway
//! (`baylink serve`) started with `NOTIFY_SOCKET` and awaited until `READY=1`; a pseudo-random
//! payload; `baylink send`; the delivered copy compared by SHA-256; throughput printed; the
//! gateway stopped with SIGTERM and expected to exit 0.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd;
use crate::notify::NotifySocket;
use crate::packages;
use crate::payload::{self, PayloadRng, WyRand};
use crate::size::human;

/// Options of the demo.
#[derive(Debug)]
pub struct Options {
    /// Payload size in bytes.
    pub size: u64,
    /// Keep the demo directory even on success.
    pub clean: bool,
    /// A prebuilt baylink binary (skips the build).
    pub baylink: Option<PathBuf>,
    /// Do not install softhsm2.
    pub skip_install: bool,
}

/// How long the gateway may take to signal readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the delivered copy may take to appear once `send` has its receipt.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the gateway may take to drain and exit after SIGTERM (its `drain.timeout` is 30 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo; the directory stays unless `--clean` was given and everything passed.
pub fn run(opts: &Options) -> Result<()> {
    packages::ensure(&[packages::SOFTHSM2], !opts.skip_install)?;
    let bin = match &opts.baylink {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => bail!("--baylink {}: no such file", path.display()),
        None => build()?,
    };
    let dir = make_demo_dir()?;
    println!("demo: directory {}", dir.display());
    let result = run_in(&bin, &dir, opts.size);
    match &result {
        Ok(()) if opts.clean => match std::fs::remove_dir_all(&dir) {
            Ok(()) => println!("demo: removed {}", dir.display()),
            Err(e) => println!("demo: could not remove {}: {e}", dir.display()),
        },
        Ok(()) => println!(
            "demo: kept {} (remove it with: rm -rf {})",
            dir.display(),
            dir.display()
        ),
        Err(_) => eprintln!(
            "demo: failed; directory kept for inspection: {}",
            dir.display()
        ),
    }
    result
}

/// `cargo build --release --locked -p baylink`, then the binary's path in cargo's target dir.
fn build() -> Result<PathBuf> {
    let root = cmd::workspace_root();
    println!("demo: cargo build --release --locked -p baylink");
    cmd::run(
        Command::new(cmd::cargo())
            .args(["build", "--release", "--locked", "-p", "baylink"])
            .current_dir(&root),
    )
    .context("building baylink failed")?;
    let meta = cmd::output(
        Command::new(cmd::cargo())
            .args(["metadata", "--format-version", "1", "--no-deps", "--locked"])
            .current_dir(&root),
    )?;
    let meta: serde_json::Value =
        serde_json::from_str(&meta).context("cargo metadata printed something that is not JSON")?;
    let target = meta
        .get("target_directory")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("cargo metadata has no target_directory"))?;
    let bin = Path::new(target).join("release").join("baylink");
    if !bin.is_file() {
        bail!("the build succeeded but {} is not there", bin.display());
    }
    Ok(bin)
}

/// Creates a new, empty `baylink-demo-XXXXXXXX` under the temp dir (`$TMPDIR` or `/tmp`).
fn make_demo_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let mut rng = WyRand::from_entropy();
    for _ in 0..100 {
        let dir = base.join(format!("baylink-demo-{:08x}", rng.next_u64() as u32));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", dir.display()));
            }
        }
    }
    bail!(
        "could not find a free baylink-demo-* name in {}",
        base.display()
    )
}

fn run_in(bin: &Path, dir: &Path, size: u64) -> Result<()> {
    cmd::run(Command::new(bin).arg("dev-env").arg(dir)).context("baylink dev-env failed")?;
    warn_if_short_of_space(dir, size);

    // The gateway, with its output in a log file so that `send`'s progress bar stays readable.
    let notify = NotifySocket::bind(&dir.join("notify.sock"))?;
    let log_path = dir.join("gateway.log");
    let log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .context("cannot duplicate the log file handle")?;
    let gateway_toml = dir.join("gateway.toml");
    let mut serve = Command::new(bin);
    serve
        .arg("serve")
        .arg("--config")
        .arg(&gateway_toml)
        .env("NOTIFY_SOCKET", notify.path())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    println!(
        "demo: {} (log: {})",
        cmd::display(&serve),
        log_path.display()
    );
    let child = serve
        .spawn()
        .with_context(|| format!("cannot start `{}`", cmd::display(&serve)))?;
    let mut gateway = Gateway {
        child: Some(child),
        log: log_path,
    };
    let took = gateway
        .wait_ready(&notify, READY_TIMEOUT)
        .map_err(|e| gateway.with_log_tail(e))?;
    println!("demo: gateway ready after {:.1} s", took.as_secs_f64());

    // The payload.
    let payload_dir = dir.join("payload");
    std::fs::create_dir_all(&payload_dir)
        .with_context(|| format!("cannot create {}", payload_dir.display()))?;
    let file_name = format!("demo-{size}.bin");
    let payload_path = payload_dir.join(&file_name);
    payload::write(
        &payload_path,
        size,
        &mut PayloadRng::new(WyRand::from_entropy()),
    )?;

    // The transfer.
    let mut send = Command::new(bin);
    send.arg("send")
        .arg("--config")
        .arg(dir.join("edge.toml"))
        .arg(&payload_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!("demo: {}", cmd::display(&send));
    let out = send
        .output()
        .with_context(|| format!("cannot start `{}`", cmd::display(&send)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if !stdout.trim().is_empty() {
            println!("{stdout}");
        }
        return Err(gateway.with_log_tail(anyhow!(
            "baylink send failed ({})",
            cmd::describe(out.status)
        )));
    }
    let report = Report::from_stdout(&stdout)?;
    if report.bytes != size || report.files != 1 {
        bail!(
            "send reported {} file(s) and {} bytes; the demo sent 1 file of {size} bytes",
            report.files,
            report.bytes
        );
    }
    if report.receipt != "verified" {
        bail!("send reported receipt `{}`, not `verified`", report.receipt);
    }

    // The delivered copy: the receipt means committed; delivery to the directory follows.
    let delivered = dir
        .join("delivered")
        .join(&report.transfer_id)
        .join(&file_name);
    gateway
        .wait_for_file(&delivered, DELIVERY_TIMEOUT)
        .map_err(|e| gateway.with_log_tail(e))?;
    let (sent_hash, got_hash) = sha256_pair(&payload_path, &delivered)?;
    if sent_hash != got_hash {
        bail!(
            "delivered copy differs: sha256 {} (sent) vs {} ({})",
            sent_hash,
            got_hash,
            delivered.display()
        );
    }

    let status = gateway.terminate(STOP_TIMEOUT)?;
    if !status.success() {
        return Err(gateway.with_log_tail(anyhow!(
            "gateway did not exit cleanly after SIGTERM ({})",
            cmd::describe(status)
        )));
    }

    println!();
    println!("transfer id:  {}", report.transfer_id);
    println!(
        "payload:      {} ({} bytes)",
        human(report.bytes),
        report.bytes
    );
    println!(
        "wire bytes:   {} ({} bytes)",
        human(report.wire_bytes),
        report.wire_bytes
    );
    println!("time:         {:.2} s", report.seconds);
    match gbit_per_s(report.bytes, report.seconds) {
        Some(rate) => println!("throughput:   {rate:.2} Gbit/s"),
        None => println!("throughput:   n/a (no measurable time)"),
    }
    println!("merkle root:  {}", report.merkle_root);
    println!("sha256:       {sent_hash} (identical)");
    println!("delivered:    {}", delivered.display());
    println!("gateway:      stopped with SIGTERM, exit 0");
    Ok(())
}

/// The last line `baylink send` prints on stdout (see `docs/interface.md`).
#[derive(Debug, PartialEq)]
struct Report {
    transfer_id: String,
    files: u64,
    bytes: u64,
    wire_bytes: u64,
    seconds: f64,
    merkle_root: String,
    receipt: String,
}

impl Report {
    /// Parses the last non-empty line of `send`'s stdout.
    fn from_stdout(stdout: &str) -> Result<Report> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| anyhow!("baylink send printed nothing on stdout"))?;
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("the last line of send's stdout is not JSON: {line}"))?;
        let text = |key: &str| -> Result<String> {
            v.get(key)
                .and_then(|x| x.as_str())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("send's JSON has no string `{key}`: {line}"))
        };
        let count = |key: &str| -> Result<u64> {
            v.get(key)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| anyhow!("send's JSON has no integer `{key}`: {line}"))
        };
        let report = Report {
            transfer_id: text("transfer_id")?,
            files: count("files")?,
            bytes: count("bytes")?,
            wire_bytes: count("wire_bytes")?,
            seconds: v
                .get("seconds")
                .and_then(|x| x.as_f64())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| anyhow!("send's JSON has no valid `seconds`: {line}"))?,
            merkle_root: text("merkle_root")?,
            receipt: text("receipt")?,
        };
        // It becomes a path component under delivered/: refuse anything that could escape.
        let id = &report.transfer_id;
        if id.is_empty()
            || id.len() > 64
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("send reported an implausible transfer id `{id}`");
        }
        Ok(report)
    }
}

/// Gigabits per second, or `None` when no time was measured.
fn gbit_per_s(bytes: u64, seconds: f64) -> Option<f64> {
    (seconds > 0.0).then(|| bytes as f64 * 8.0 / seconds / 1e9)
}

/// SHA-256 of both files, computed concurrently by `sha256sum` (one per core).
fn sha256_pair(a: &Path, b: &Path) -> Result<(String, String)> {
    let spawn = |p: &Path| {
        Command::new("sha256sum")
            .arg(p)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot run sha256sum")
    };
    let ca = spawn(a)?;
    let cb = spawn(b)?;
    let finish = |c: Child, p: &Path| -> Result<String> {
        let out = c.wait_with_output().context("sha256sum failed")?;
        if !out.status.success() {
            bail!(
                "sha256sum {} failed ({})",
                p.display(),
                cmd::describe(out.status)
            );
        }
        parse_sha256sum(&String::from_utf8_lossy(&out.stdout))
            .ok_or_else(|| anyhow!("unexpected sha256sum output for {}", p.display()))
    };
    let ha = finish(ca, a);
    let hb = finish(cb, b);
    Ok((ha?, hb?))
}

/// The digest from a `sha256sum` line (`<64 hex>  <name>`).
fn parse_sha256sum(out: &str) -> Option<String> {
    let word = out.split_whitespace().next()?;
    let word = word.strip_prefix('\\').unwrap_or(word);
    (word.len() == 64 && word.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| word.to_ascii_lowercase())
}

fn warn_if_short_of_space(dir: &Path, size: u64) {
    // The payload, the edge spool, the gateway spool and the delivered copy: up to 4 copies.
    let Ok(st) = nix::sys::statvfs::statvfs(dir) else {
        return;
    };
    let available = st.blocks_available().saturating_mul(st.fragment_size());
    let needed = size.saturating_mul(4);
    if available < needed {
        println!(
            "demo: warning: {} free under {}, the demo may need up to {} (4 copies); set TMPDIR \
             to a roomier place or use a smaller --size",
            human(available),
            dir.display(),
            human(needed)
        );
    }
}

/// The running gateway; killed (SIGKILL) if dropped while still running.
#[derive(Debug)]
struct Gateway {
    child: Option<Child>,
    log: PathBuf,
}

impl Gateway {
    fn child(&mut self) -> Result<&mut Child> {
        self.child
            .as_mut()
            .ok_or_else(|| anyhow!("the gateway was already stopped"))
    }

    fn wait_ready(&mut self, notify: &NotifySocket, timeout: Duration) -> Result<Duration> {
        let child = self.child()?;
        notify.wait_ready(child, "gateway", timeout)
    }

    /// Waits for `path` to exist (no signal exists for a directory delivery), failing early if
    /// the gateway exits.
    fn wait_for_file(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if path.is_file() {
                return Ok(());
            }
            if let Some(status) = self.child()?.try_wait()? {
                bail!(
                    "gateway exited ({}) before {} appeared",
                    cmd::describe(status),
                    path.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not appear within {} s of the receipt",
                    path.display(),
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then wait at most `timeout` for the exit; SIGKILL after that (an error).
    fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the gateway was already stopped"))?;
        if let Some(status) = child.try_wait()? {
            bail!("gateway had already exited ({})", cmd::describe(status));
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM).context("cannot send SIGTERM to the gateway")?;
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(timeout) {
            Ok(status) => status.context("waiting for the gateway failed")?,
            Err(_) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = rx.recv();
                let _ = waiter.join();
                bail!(
                    "gateway did not exit within {} s of SIGTERM; killed it",
                    timeout.as_secs()
                );
            }
        };
        let _ = waiter.join();
        Ok(status)
    }

    /// Adds the end of the gateway's log to `err`.
    fn with_log_tail(&self, err: anyhow::Error) -> anyhow::Error {
        match tail(&self.log, 30) {
            Some(t) if !t.is_empty() => anyhow!(
                "{err:#}\n--- gateway log ({}), last lines:\n{t}",
                self.log.display()
            ),
            _ => err,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && matches!(child.try_wait(), Ok(None))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `n` lines of a text file.
fn tail(path: &Path, n: usize) -> Option<String> {
    let f = File::open(path).ok()?;
    let mut lines: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in BufReader::new(f).lines() {
        let line = line.ok()?;
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    Some(lines.into_iter().collect::<Vec<_>>().join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"transfer_id":"0190f3a2-7b1c-7d4e-9a2b-3c4d5e6f7a8b","files":1,"bytes":1073741824,"wire_bytes":1073741824,"seconds":3.5,"merkle_root":"ab12","receipt":"verified"}"#;

    #[test]
    fn report_is_the_last_line() {
        let stdout = format!("some note\n{LINE}\n\n");
        let r = Report::from_stdout(&stdout).unwrap();
        assert_eq!(r.transfer_id, "0190f3a2-7b1c-7d4e-9a2b-3c4d5e6f7a8b");
        assert_eq!(r.files, 1);
        assert_eq!(r.bytes, 1 << 30);
        assert_eq!(r.wire_bytes, 1 << 30);
        assert_eq!(r.seconds, 3.5);
        assert_eq!(r.merkle_root, "ab12");
        assert_eq!(r.receipt, "verified");
    }

    #[test]
    fn integer_seconds_are_fine() {
        let r = Report::from_stdout(&LINE.replace("3.5", "4")).unwrap();
        assert_eq!(r.seconds, 4.0);
    }

    #[test]
    fn bad_reports_say_what_is_wrong() {
        let e = Report::from_stdout("").unwrap_err().to_string();
        assert!(e.contains("printed nothing"), "{e}");
        let e = Report::from_stdout("done\n").unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        let e = Report::from_stdout(&LINE.replace("\"files\":1,", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`files`"), "{e}");
        let e = Report::from_stdout(&LINE.replace("3.5", "-1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`seconds`"), "{e}");
        let e = Report::from_stdout(&LINE.replace("0190f3a2-7b1c", "../../etc"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("implausible transfer id"), "{e}");
    }

    #[test]
    fn throughput() {
        assert_eq!(gbit_per_s(1_000_000_000, 8.0), Some(1.0));
        let r = gbit_per_s(1 << 30, 2.0).unwrap();
        assert!((r - 4.294_967_296).abs() < 1e-9);
        assert_eq!(gbit_per_s(10, 0.0), None);
    }

    #[test]
    fn sha256sum_output() {
        let h = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            parse_sha256sum(&format!("{h}  /tmp/x\n")).as_deref(),
            Some(h)
        );
        assert_eq!(
            parse_sha256sum(&format!("\\{h}  /tmp/a\\nb\n")).as_deref(),
            Some(h)
        );
        assert_eq!(parse_sha256sum("xyz  f"), None);
        assert_eq!(parse_sha256sum(""), None);
    }

    #[test]
    fn sha256_of_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"abc").unwrap();
        let (ha, hb) = sha256_pair(&a, &b).unwrap();
        assert_eq!(
            ha,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hb,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn demo_dirs_are_new_and_named() {
        let a = make_demo_dir().unwrap();
        let b = make_demo_dir().unwrap();
        assert_ne!(a, b);
        for d in [&a, &b] {
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("baylink-demo-"), "{name}");
            assert_eq!(std::fs::read_dir(d).unwrap().count(), 0);
            std::fs::remove_dir(d).unwrap();
        }
    }

    /// A shell that installs `trap` and says so before we signal it (no race with the trap).
    fn trapping_child(trap: &str) -> Child {
        let mut child = Command::new("sh")
            .args([
                "-c",
                &format!("{trap}; echo trapped; while :; do sleep 0.05; done"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "trapped\n");
        child
    }

    #[test]
    fn sigterm_stops_a_child_and_reports_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let child = trapping_child("trap 'exit 0' TERM");
        let mut g = Gateway {
            child: Some(child),
            log: dir.path().join("none.log"),
        };
        let status = g.terminate(Duration::from_secs(20)).unwrap();
        assert!(status.success(), "{status:?}");
        assert!(g.terminate(Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_child_ignoring_sigterm_is_killed_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let child = trapping_child("trap '' TERM");
        let mut g = Gateway {
            child: Some(child),
            log: dir.path().join("none.log"),
        };
        let e = g.terminate(Duration::from_millis(500)).unwrap_err();
        assert!(e.to_string().contains("did not exit within"), "{e}");
    }

    #[test]
    fn log_tail_is_attached_to_errors() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("g.log");
        let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let g = Gateway { child: None, log };
        let e = format!("{:#}", g.with_log_tail(anyhow!("boom")));
        assert!(e.contains("line 40"), "{e}");
        assert!(e.contains("line 11"), "{e}");
        assert!(!e.contains("line 10\n"), "{e}");
        assert!(e.starts_with("boom\n--- gateway log"), "{e}");
        assert!(e.ends_with("line 40"), "{e}");
    }
}
