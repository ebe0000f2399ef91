//! A running forwarder as a child process (`baylink-bench impair`), for the e2e harness:
//! start it, wait for its ready line, run programs on either side, stop it and read its
//! counters.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Settings, Stats};

/// How long set-up may take before the forwarder is considered stuck.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A forwarder child. Dropping it sends SIGINT (so it cleans up) and waits.
#[derive(Debug)]
pub struct EmulatedLink {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    /// Namespace of the sending side.
    pub ns_a: String,
    /// Address of the sending side.
    pub addr_a: Ipv4Addr,
    /// Namespace of the receiving side.
    pub ns_b: String,
    /// Address of the receiving side.
    pub addr_b: Ipv4Addr,
}

/// Result of trying to start a forwarder.
#[derive(Debug)]
pub enum Start {
    /// Running.
    Up(EmulatedLink),
    /// This machine cannot emulate a link (the forwarder's reason).
    Unsupported(String),
}

impl EmulatedLink {
    /// Starts `bench impair` with `settings`.
    pub fn start(bench: &Path, settings: &Settings) -> anyhow::Result<Start> {
        let mut cmd = Command::new(bench);
        cmd.arg("impair")
            .args(["--rtt-ms", &settings.rtt_ms.to_string()])
            .args(["--jitter-ms", &settings.jitter_ms.to_string()])
            .args(["--loss", &settings.loss_pct.to_string()])
            .args(["--reorder", &settings.reorder_pct.to_string()])
            .args(["--duplicate", &settings.duplicate_pct.to_string()])
            .args(["--rate-mbit", &settings.rate_mbit.to_string()])
            .args(["--queue-kib", &(settings.queue_bytes >> 10).to_string()])
            .args(["--seed", &settings.seed.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} impair", bench.display()))?;
        let stdout = child.stdout.take().context("forwarder stdout")?;
        let stderr = child.stderr.take().context("forwarder stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (err_tx, err_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let _ = err_tx.send(line);
            }
        });
        let ready = match lines.recv_timeout(READY_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let status = child.wait().context("waiting for the forwarder")?;
                let reason: Vec<String> = err_lines.try_iter().collect();
                if status.code() == Some(2) {
                    return Ok(Start::Unsupported(reason.join(" ")));
                }
                bail!(
                    "forwarder did not get ready ({status}): {}",
                    reason.join(" ")
                );
            }
        };
        let fields: Vec<&str> = ready.split_whitespace().collect();
        let ["ready", ns_a, addr_a, ns_b, addr_b] = fields[..] else {
            bail!("unexpected first line from the forwarder: {ready}");
        };
        Ok(Start::Up(EmulatedLink {
            ns_a: ns_a.to_owned(),
            addr_a: addr_a.parse().context("forwarder address A")?,
            ns_b: ns_b.to_owned(),
            addr_b: addr_b.parse().context("forwarder address B")?,
            child: Some(child),
            lines,
        }))
    }

    /// Stops the forwarder and returns its counters.
    pub fn stop(mut self) -> anyhow::Result<Stats> {
        let mut child = self.child.take().context("forwarder already stopped")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).context("signalling forwarder")?;
        let status = child.wait()?;
        if !status.success() {
            bail!("forwarder exited with {status}");
        }
        let last = self
            .lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .last()
            .context("forwarder printed no counters")?;
        serde_json::from_str(&last).context("parsing the forwarder's counters")
    }
}

/// A tokio command for `program`, inside network namespace `ns` when given (`ip netns exec`,
/// which execs: the child's pid is the program's own, so signals and /proc figures reach it).
pub fn command_in(ns: Option<&str>, program: &Path) -> tokio::process::Command {
    match ns {
        Some(ns) => {
            let mut cmd = tokio::process::Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => tokio::process::Command::new(program),
    }
}

impl Drop for EmulatedLink {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let _ = child.wait();
        }
    }
}
