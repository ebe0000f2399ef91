//! The scp baselines: an sshd started by the bench (its own host key, one authorized key, its
//! own port) on the receiving side, and `scp` of the same payload from the sending side, once
//! with TCP cubic and once with TCP bbr. The congestion controller is chosen per network
//! namespace (`net.ipv4.tcp_congestion_control` is per namespace), so the machine's default
//! stays untouched; the root namespace's `tcp_allowed_congestion_control` is extended when a
//! controller is missing from it and restored when the bench ends.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::impair::link::command_in;
use crate::payload::{self, PayloadFile};
use crate::proc;
use crate::report::{self, RunRecord, Sides};

const SSHD: &str = "/usr/sbin/sshd";
const ALLOWED: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
const AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";
const START_LIMIT: Duration = Duration::from_secs(20);

/// Why scp cannot run here, if it cannot (openssh missing).
pub fn unavailable() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some("openssh-server is not installed (no /usr/sbin/sshd)".into());
    }
    for tool in ["scp", "ssh-keygen"] {
        if std::process::Command::new(tool)
            .arg("-?")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Some(format!("openssh-client is not installed (no {tool})"));
        }
    }
    None
}

/// Why a congestion controller cannot be used, if it cannot (module not available).
pub fn congestion_unavailable(cc: &str) -> Option<String> {
    let available = std::fs::read_to_string(AVAILABLE).unwrap_or_default();
    (!available.split_whitespace().any(|c| c == cc))
        .then(|| format!("TCP {cc} is not available in this kernel ({AVAILABLE}: {available})"))
}

/// Adds controllers to the root namespace's allowed list; restores the old list on drop.
#[derive(Debug)]
pub struct AllowedCongestion {
    original: Option<String>,
}

impl AllowedCongestion {
    /// Makes sure every one of `wanted` may be chosen in a namespace.
    pub fn ensure(wanted: &[&str]) -> anyhow::Result<AllowedCongestion> {
        let current = std::fs::read_to_string(ALLOWED)
            .with_context(|| format!("reading {ALLOWED}"))?
            .trim()
            .to_owned();
        let mut list: Vec<&str> = current.split_whitespace().collect();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !list.contains(w))
            .collect();
        if missing.is_empty() {
            return Ok(AllowedCongestion { original: None });
        }
        list.extend(missing);
        std::fs::write(ALLOWED, list.join(" ")).with_context(|| format!("writing {ALLOWED}"))?;
        eprintln!(
            "scp: {ALLOWED} was `{current}`, now `{}` for the bench",
            list.join(" ")
        );
        Ok(AllowedCongestion {
            original: Some(current),
        })
    }
}

impl Drop for AllowedCongestion {
    fn drop(&mut self) {
        if let Some(original) = self.original.take()
            && let Err(e) = std::fs::write(ALLOWED, &original)
        {
            eprintln!("scp: could not restore {ALLOWED} to `{original}`: {e}");
        }
    }
}

/// Where scp runs.
#[derive(Debug, Clone)]
pub struct ScpPlacement {
    /// Namespace of scp (the sender).
    pub sender_ns: String,
    /// Namespace of sshd (the receiver).
    pub receiver_ns: String,
    /// Address sshd listens on, as the sender reaches it.
    pub addr: IpAddr,
}

/// A running sshd of the bench.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    pid: u32,
    port: u16,
    dir: PathBuf,
    placement: ScpPlacement,
}

async fn run_checked(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Sshd {
    /// Generates keys and a config under `dir` and starts sshd, waiting for its listening line.
    pub async fn start(dir: &Path, placement: ScpPlacement, port: u16) -> anyhow::Result<Sshd> {
        std::fs::create_dir_all(dir)?;
        // Debian's sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        for (name, what) in [("host_key", "host key"), ("client_key", "client key")] {
            let path = dir.join(name);
            if !path.exists() {
                run_checked(
                    tokio::process::Command::new("ssh-keygen")
                        .args(["-q", "-t", "ed25519", "-N", "", "-C", "baylink-bench", "-f"])
                        .arg(&path),
                    &format!("ssh-keygen ({what})"),
                )
                .await?;
            }
        }
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub"))?;
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        // The client checks the host key against this file: no trust on first use.
        let host = match placement.addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => a.to_string(),
        };
        std::fs::write(
            dir.join("known_hosts"),
            format!("[{host}]:{port} {}", host_pub.trim()),
        )?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {host}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 UsePAM no\nStrictModes no\nPidFile none\nLogLevel INFO\n\
                 Subsystem sftp internal-sftp\n",
                hk = dir.join("host_key").display(),
                ak = dir.join("authorized_keys").display(),
            ),
        )?;
        let mut child = command_in(Some(&placement.receiver_ns), Path::new(SSHD))
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting sshd")?;
        let pid = child.id().context("sshd has no pid")?;
        let stderr = child.stderr.take().context("sshd stderr")?;
        let log = dir.join("sshd.log");
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let ready = tokio::time::timeout(START_LIMIT, async {
            while let Some(line) = lines.next_line().await? {
                seen.push(line.clone());
                if line.contains("Server listening on") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        if !matches!(ready, Ok(Ok(true))) {
            bail!("sshd did not start: {}", seen.join(" | "));
        }
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move {
            let mut text = seen.join("\n");
            while let Ok(Some(line)) = lines.next_line().await {
                text.push('\n');
                text.push_str(&line);
                let _ = std::fs::write(&log, &text);
            }
        });
        Ok(Sshd {
            child,
            pid,
            port,
            dir: dir.to_owned(),
            placement,
        })
    }

    /// Stops sshd.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// The MSS the estimate of retransmitted bytes assumes: the TUN devices' MTU less IPv4,
    /// TCP and timestamp headers (52 bytes); loopback's 65536 in a private namespace.
    fn mss(&self) -> u64 {
        let mtu = if self.placement.sender_ns == self.placement.receiver_ns {
            65_536
        } else {
            u64::from(crate::impair::netns::MTU)
        };
        mtu - 52
    }

    /// Sets the sender's and the receiver's namespace to congestion controller `cc`.
    async fn set_congestion(&self, cc: &str) -> anyhow::Result<()> {
        for ns in [&self.placement.sender_ns, &self.placement.receiver_ns] {
            run_checked(
                command_in(Some(ns), Path::new("sysctl"))
                    .arg("-q")
                    .arg(format!("net.ipv4.tcp_congestion_control={cc}")),
                &format!("sysctl tcp_congestion_control={cc} in {ns}"),
            )
            .await?;
        }
        Ok(())
    }

    /// One scp run of `files` into `dest` with `cc`; the destination files are removed after.
    pub async fn run_once(
        &self,
        files: &[PayloadFile],
        dest: &Path,
        cc: &str,
        time_limit: Duration,
        run: u32,
    ) -> RunRecord {
        match self.try_run(files, dest, cc, time_limit, run).await {
            Ok(record) => record,
            Err(e) => RunRecord::failed(run, &e),
        }
    }

    async fn try_run(
        &self,
        files: &[PayloadFile],
        dest: &Path,
        cc: &str,
        time_limit: Duration,
        run: u32,
    ) -> anyhow::Result<RunRecord> {
        self.set_congestion(cc).await?;
        let _ = std::fs::remove_dir_all(dest);
        std::fs::create_dir_all(dest)?;
        let host = match self.placement.addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let log = self.dir.join(format!("scp-{cc}-{run}.log"));
        let receiver_before = proc::process_children_cpu_seconds(self.pid)?;
        let children_before = proc::children_cpu_seconds()?;
        let snmp_before = tcp_counters(&self.placement.sender_ns).await;
        let started = Instant::now();
        let mut child = command_in(Some(&self.placement.sender_ns), Path::new("scp"))
            .args(["-q", "-B", "-P", &self.port.to_string(), "-i"])
            .arg(self.dir.join("client_key"))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .args(files.iter().map(|f| &f.path))
            .arg(format!("root@{host}:{}/", dest.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("starting scp")?;
        let (timed_out, status) = match tokio::time::timeout(time_limit, child.wait()).await {
            Ok(status) => (false, Some(status?)),
            Err(_) => {
                let _ = child.kill().await;
                (true, None)
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let snmp_after = tcp_counters(&self.placement.sender_ns).await;
        let cpu_sender = proc::children_cpu_seconds()? - children_before;
        if let Some(status) = status
            && !status.success()
        {
            bail!(
                "scp failed ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        // sshd reaps its per-connection child once the connection is closed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu_receiver = proc::process_children_cpu_seconds(self.pid)? - receiver_before;
        let bytes: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(dest.join(&f.name)).ok())
            .map(|m| m.len())
            .sum();
        let mut identical = None;
        if !timed_out {
            let mut all = true;
            for f in files {
                let (digest, len) = payload::sha256_file(&dest.join(&f.name))?;
                all &= digest == f.sha256 && len == f.size;
            }
            ensure!(all, "scp delivered files that differ from the payload");
            identical = Some(true);
        }
        let _ = std::fs::remove_dir_all(dest);
        Ok(RunRecord {
            run,
            gbit_per_s: report::gbit_per_s(bytes, seconds),
            seconds: Some(seconds),
            bytes: Some(bytes),
            timed_out,
            cpu_seconds: Some(Sides {
                sender: Some(cpu_sender),
                receiver: Some(cpu_receiver),
            }),
            cpu_seconds_per_gib: Some(Sides {
                sender: report::per_gib(cpu_sender, bytes),
                receiver: report::per_gib(cpu_receiver, bytes),
            }),
            delivered_identical: identical,
            tcp_congestion: Some(cc.to_owned()),
            congestion: Some(cc.to_owned()),
            retransmit: match (snmp_before, snmp_after) {
                (Ok(a), Ok(b)) => Some(report::Retransmit::tcp(
                    b.retrans_segs.saturating_sub(a.retrans_segs),
                    b.out_segs.saturating_sub(a.out_segs),
                    self.mss(),
                    bytes,
                )),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("warning: no TCP retransmission figures: {e:#}");
                    None
                }
            },
            ..RunRecord::default()
        })
    }
}

/// TCP counters of a network namespace (`Tcp:` of /proc/net/snmp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounters {
    /// Segments sent (`OutSegs`).
    pub out_segs: u64,
    /// Segments retransmitted (`RetransSegs`).
    pub retrans_segs: u64,
}

/// Reads `ns`'s TCP counters (`ip netns exec NS cat /proc/net/snmp`).
pub async fn tcp_counters(ns: &str) -> anyhow::Result<TcpCounters> {
    let out = command_in(Some(ns), Path::new("cat"))
        .arg("/proc/net/snmp")
        .stdin(Stdio::null())
        .output()
        .await
        .context("cat /proc/net/snmp")?;
    ensure!(
        out.status.success(),
        "cat /proc/net/snmp in {ns}: {}",
        out.status
    );
    parse_snmp_tcp(&String::from_utf8_lossy(&out.stdout))
}

/// The `Tcp:` header and value lines of /proc/net/snmp.
pub fn parse_snmp_tcp(text: &str) -> anyhow::Result<TcpCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        lines.next().context("no Tcp: line")?,
        lines.next().context("no Tcp: values")?,
    );
    let field = |want: &str| -> anyhow::Result<u64> {
        let at = names
            .split_whitespace()
            .position(|n| n == want)
            .with_context(|| format!("no {want} in Tcp:"))?;
        values
            .split_whitespace()
            .nth(at)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no value for {want}"))
    };
    Ok(TcpCounters {
        out_segs: field("OutSegs")?,
        retrans_segs: field("RetransSegs")?,
    })
}

#[cfg(test)]
mod snmp_tests {
    use super::*;

    #[test]
    fn parses_tcp_counters() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails \
            EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
            Tcp: 1 200 120000 -1 5 3 0 0 1 1000 2000 17 0 2 0\n\
            Udp: InDatagrams\nUdp: 4\n";
        assert_eq!(
            parse_snmp_tcp(text).unwrap(),
            TcpCounters {
                out_segs: 2000,
                retrans_segs: 17
            }
        );
        assert!(parse_snmp_tcp("Udp: x\nUdp: 1\n").is_err());
    }
}
