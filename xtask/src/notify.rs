//! The receiving end of systemd's notify protocol, enough to wait for `READY=1` from a child.
//!
//! The child finds the socket through `NOTIFY_SOCKET` and sends datagrams of newline-separated
//! `KEY=VALUE` assignments (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`).

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// What one notify datagram said that we care about.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// `READY=1` was among the assignments.
    pub ready: bool,
    /// The last `STATUS=` text, if any.
    pub status: Option<String>,
}

/// Parses one datagram.
pub fn parse(datagram: &[u8]) -> Message {
    let text = String::from_utf8_lossy(datagram);
    let mut msg = Message::default();
    for line in text.split('\n') {
        if line == "READY=1" {
            msg.ready = true;
        } else if let Some(status) = line.strip_prefix("STATUS=") {
            msg.status = Some(status.to_owned());
        }
    }
    msg
}

/// A bound notify socket; the socket file is removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

/// How often the child's liveness is checked while no datagram arrives.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);

impl NotifySocket {
    /// Binds a datagram socket at `path` (which must not exist; unix socket paths are limited to
    /// 107 bytes).
    pub fn bind(path: &Path) -> Result<NotifySocket> {
        let socket = UnixDatagram::bind(path)
            .with_context(|| format!("cannot bind notify socket {}", path.display()))?;
        Ok(NotifySocket {
            socket,
            path: path.to_owned(),
        })
    }

    /// The path to hand to the child as `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until `child` sends `READY=1`, at most `timeout`. Fails early, with the exit
    /// status, if the child exits first; on timeout the error carries the last `STATUS=` seen.
    /// `name` names the child in errors. Returns how long it took.
    pub fn wait_ready(&self, child: &mut Child, name: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut buf = vec![0u8; 8192];
        let mut last_status: Option<String> = None;
        loop {
            if let Some(status) = child.try_wait().context("cannot check the child")? {
                bail!(
                    "{name} exited ({}) before it signalled READY=1{}",
                    cmd::describe(status),
                    last_status
                        .map(|s| format!(" (last status: {s})"))
                        .unwrap_or_default()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{name} did not signal READY=1 within {} s{}",
                    timeout.as_secs_f64(),
                    last_status
                        .map(|s| format!(" (last status: {s})"))
                        .unwrap_or_default()
                );
            }
            let wait = (deadline - now).min(LIVENESS_INTERVAL);
            self.socket
                .set_read_timeout(Some(wait))
                .context("cannot set a timeout on the notify socket")?;
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = parse(&buf[..n]);
                    if let Some(s) = msg.status {
                        println!("{name}: {s}");
                        last_status = Some(s);
                    }
                    if msg.ready {
                        return Ok(start.elapsed());
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the notify socket failed"),
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sleeper() -> Child {
        Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("sleep")
    }

    fn send(path: &Path, msg: &[u8]) {
        UnixDatagram::unbound().unwrap().send_to(msg, path).unwrap();
    }

    #[test]
    fn parses_assignments() {
        assert_eq!(
            parse(b"READY=1"),
            Message {
                ready: true,
                status: None
            }
        );
        assert_eq!(
            parse(b"STATUS=loading HSM\nMAINPID=7\n"),
            Message {
                ready: false,
                status: Some("loading HSM".into())
            }
        );
        assert_eq!(
            parse(b"STATUS=up\nREADY=1\n"),
            Message {
                ready: true,
                status: Some("up".into())
            }
        );
        assert!(!parse(b"READY=10").ready);
        assert!(!parse(b"WATCHDOG=1").ready);
        assert!(!parse(b"").ready);
    }

    #[test]
    fn ready_datagram_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let sock = NotifySocket::bind(&dir.path().join("notify.sock")).unwrap();
        let mut child = sleeper();
        send(sock.path(), b"STATUS=starting");
        send(sock.path(), b"STATUS=listening\nREADY=1");
        let took = sock
            .wait_ready(&mut child, "sleeper", Duration::from_secs(10))
            .unwrap();
        assert!(took < Duration::from_secs(10));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_child_that_sends_ready_through_notify_socket() {
        // A real child that finds the socket through NOTIFY_SOCKET, as baylink serve will.
        // python3 is on the project's machines; skip quietly where it is not.
        if Command::new("python3").arg("--version").output().is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = NotifySocket::bind(&dir.path().join("n.sock")).unwrap();
        let script = "import os, socket, time\n\
                      s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
                      s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n\
                      time.sleep(30)\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .env("NOTIFY_SOCKET", sock.path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let result = sock.wait_ready(&mut child, "python", Duration::from_secs(20));
        child.kill().unwrap();
        child.wait().unwrap();
        result.unwrap();
    }

    #[test]
    fn a_child_that_exits_first_is_reported_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let sock = NotifySocket::bind(&dir.path().join("notify.sock")).unwrap();
        let mut child = Command::new("sh")
            .args(["-c", "exit 7"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        send(sock.path(), b"STATUS=cannot open HSM");
        let e = sock
            .wait_ready(&mut child, "gateway", Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway exited (exit status 7)"), "{e}");
        assert!(e.contains("before it signalled READY=1"), "{e}");
    }

    #[test]
    fn silence_times_out_with_the_last_status() {
        let dir = tempfile::tempdir().unwrap();
        let sock = NotifySocket::bind(&dir.path().join("notify.sock")).unwrap();
        let mut child = sleeper();
        send(sock.path(), b"STATUS=waiting for HSM");
        let start = Instant::now();
        let e = sock
            .wait_ready(&mut child, "gateway", Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(e.contains("did not signal READY=1 within 0.3 s"), "{e}");
        assert!(e.contains("last status: waiting for HSM"), "{e}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_socket_file_goes_away_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        assert!(path.exists());
        drop(sock);
        assert!(!path.exists());
    }
}
