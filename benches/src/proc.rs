//! Process plumbing: CPU accounting (getrusage, `/proc/<pid>/stat`), the systemd notify
//! socket used as the gateway's readiness signal, signals, and facts about the machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{Signal, kill};
use nix::sys::time::TimeVal;
use nix::unistd::{Pid, SysconfVar, sysconf};
use serde::Serialize;
use tokio::net::UnixDatagram;

fn seconds(t: TimeVal) -> f64 {
    t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6
}

fn rusage_cpu_seconds(who: UsageWho) -> anyhow::Result<f64> {
    let usage = getrusage(who).context("getrusage")?;
    Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// CPU seconds (user + system) this process has used so far, all threads.
pub fn self_cpu_seconds() -> anyhow::Result<f64> {
    rusage_cpu_seconds(UsageWho::RUSAGE_SELF)
}

/// CPU seconds (user + system) of all terminated and waited-for children so far. The
/// difference around waiting for one child is that child's CPU, provided no other child is
/// reaped meanwhile.
pub fn children_cpu_seconds() -> anyhow::Result<f64> {
    rusage_cpu_seconds(UsageWho::RUSAGE_CHILDREN)
}

/// CPU seconds (utime + stime, all threads) a running process has used so far, from
/// `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = stat_cpu_ticks(&stat).with_context(|| format!("cannot parse {path}"))?;
    let per_second = sysconf(SysconfVar::CLK_TCK)
        .context("sysconf(CLK_TCK)")?
        .filter(|&t| t > 0)
        .context("sysconf(CLK_TCK) has no value")?;
    Ok(ticks as f64 / per_second as f64)
}

/// utime + stime in clock ticks from the text of `/proc/<pid>/stat`. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let after_name = stat.rfind(')').context("no `)` after the command name")?;
    // Fields after the name start with field 3 (state); utime is field 14, stime field 15.
    let fields: Vec<&str> = stat[after_name + 1..].split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        let text = fields.get(n - 3).with_context(|| format!("no field {n}"))?;
        text.parse::<u64>()
            .with_context(|| format!("field {n} `{text}` is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// CPU seconds of the terminated and waited-for children of a running process (cutime +
/// cstime of `/proc/<pid>/stat`): what a forking server such as sshd spent in the
/// connections it has reaped.
pub fn process_children_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let after_name = stat.rfind(')').context("no `)` after the command name")?;
    let fields: Vec<&str> = stat[after_name + 1..].split_whitespace().collect();
    let mut ticks = 0u64;
    // cutime is field 16, cstime field 17 (fields after the name start at 3).
    for n in [16usize, 17] {
        let text = fields
            .get(n - 3)
            .with_context(|| format!("no field {n} in {path}"))?;
        ticks += text
            .parse::<u64>()
            .with_context(|| format!("field {n} `{text}` of {path} is not a number"))?;
    }
    let per_second = sysconf(SysconfVar::CLK_TCK)
        .context("sysconf(CLK_TCK)")?
        .filter(|&t| t > 0)
        .context("sysconf(CLK_TCK) has no value")?;
    Ok(ticks as f64 / per_second as f64)
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let raw = i32::try_from(pid).context("pid out of range")?;
    kill(Pid::from_raw(raw), signal).with_context(|| format!("kill({pid}, {signal})"))
}

/// A bound `NOTIFY_SOCKET` (systemd's readiness protocol): give [`NotifySocket::path`] to a
/// child as `NOTIFY_SOCKET`, then [`NotifySocket::wait_ready`].
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds a datagram socket at `path` (which must not exist).
    pub fn bind(path: &Path) -> anyhow::Result<NotifySocket> {
        let socket = UnixDatagram::bind(path)
            .with_context(|| format!("cannot bind notify socket {}", path.display()))?;
        Ok(NotifySocket {
            socket,
            path: path.to_owned(),
        })
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until a datagram carries the line `READY=1`, at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 4096];
        let wait = async {
            loop {
                let n = self.socket.recv(&mut buf).await?;
                if is_ready(&buf[..n]) {
                    return Ok::<(), std::io::Error>(());
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(result) => result.context("notify socket"),
            Err(_) => bail!("no READY=1 within {limit:?}"),
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a notify datagram holds the line `READY=1` (datagrams are newline-separated
/// `KEY=VALUE` assignments).
fn is_ready(datagram: &[u8]) -> bool {
    datagram
        .split(|&b| b == b'\n')
        .any(|line| line == b"READY=1")
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cpus: usize,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// CPU model from `/proc/cpuinfo`, if found.
    pub cpu_model: Option<String>,
}

impl Machine {
    /// Reads the facts of this machine.
    pub fn current() -> Machine {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            });
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            kernel,
            cpu_model,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks_even_with_odd_command_names() {
        let stat = "4242 (baylink (x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    150 27 0 0 20 0 5 0 100 1000 10 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat).unwrap(), 177);
        assert!(stat_cpu_ticks("4242 (short) S 1").is_err());
        assert!(stat_cpu_ticks("no name at all").is_err());
    }

    #[test]
    fn own_cpu_time_is_readable_both_ways() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let by_rusage = self_cpu_seconds().unwrap();
        let by_proc = process_cpu_seconds(std::process::id()).unwrap();
        assert!(by_rusage > 0.0);
        // /proc counts in clock ticks (10 ms): allow for that and for time passing.
        assert!(
            (by_proc - by_rusage).abs() < 0.5,
            "{by_proc} vs {by_rusage}"
        );
        assert!(children_cpu_seconds().unwrap() >= 0.0);
    }

    #[test]
    fn ready_needs_the_exact_line() {
        assert!(is_ready(b"READY=1"));
        assert!(is_ready(b"STATUS=serving\nREADY=1\n"));
        assert!(!is_ready(b"READY=0"));
        assert!(!is_ready(b"NOTREADY=1"));
        assert!(!is_ready(b"STATUS=READY=1"));
    }

    #[tokio::test]
    async fn notify_socket_sees_ready_and_times_out_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let notify = NotifySocket::bind(&dir.path().join("notify.sock")).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"STATUS=starting", notify.path()).unwrap();
        assert!(notify.wait_ready(Duration::from_millis(50)).await.is_err());
        client
            .send_to(b"STATUS=up\nREADY=1", notify.path())
            .unwrap();
        notify.wait_ready(Duration::from_secs(5)).await.unwrap();
    }

    #[test]
    fn machine_facts_are_filled() {
        let m = Machine::current();
        assert!(m.cpus >= 1);
        assert!(!m.kernel.is_empty());
    }
}
