//! The systemd watchdog is fed only while the appliance can still work: a spool whose file
//! system stops taking files starves it (systemd would restart the service), and feeding
//! resumes once the spool works again.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, EVENT_WAIT, baylink_bin};

/// Reads notify datagrams until one holds `line` (`EVENT_WAIT` at most); panics otherwise.
fn wait_for_notify(sock: &UnixDatagram, line: &str) {
    let deadline = Instant::now() + EVENT_WAIT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == line)
        {
            return;
        }
    }
    panic!("no {line} within {EVENT_WAIT:?}");
}

/// Counts `WATCHDOG=1` datagrams that arrive within `window`.
fn feeds_within(sock: &UnixDatagram, window: Duration) -> usize {
    let deadline = Instant::now() + window;
    let mut buf = [0u8; 4096];
    let mut feeds = 0;
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            feeds += String::from_utf8_lossy(&buf[..n])
                .lines()
                .filter(|l| *l == "WATCHDOG=1")
                .count();
        }
    }
    feeds
}

#[test]
fn the_watchdog_starves_while_the_spool_takes_no_files() {
    let d = Deployment::new().unwrap();
    let sock_path = d.path("watchdog-notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let log_path = d.path("gateway-watchdog.log");
    // systemd names the watched process in WATCHDOG_PID: the shell's pid is the one `exec`
    // hands to baylink. Half a second between feeds, as WatchdogSec=1s would ask.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" serve --config "$1""#)
        .arg(baylink_bin())
        .arg(d.gateway_config())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    wait_for_notify(&sock, "READY=1");
    wait_for_notify(&sock, "WATCHDOG=1");

    // The spool check creates `.watchdog` in the spool directory; a directory in its place
    // makes every create fail, as a file system gone read-only or bad would.
    let marker = d.path("spool/gateway/.watchdog");
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let _ = std::fs::remove_file(&marker);
        if std::fs::create_dir(&marker).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cannot put a directory at {marker:?}"
        );
    }
    let deadline = Instant::now() + EVENT_WAIT;
    while !log().contains("health check failed") {
        assert!(
            Instant::now() < deadline,
            "no failed health check:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed = log();
    assert!(
        failed.contains("check=\"spool\"") || failed.contains("check=spool"),
        "{failed}"
    );
    // Feeds queued before the failure was logged are drained; then none may come.
    feeds_within(&sock, Duration::from_millis(200));
    assert_eq!(
        feeds_within(&sock, Duration::from_secs(2)),
        0,
        "the watchdog was fed while the spool check failed:\n{}",
        log()
    );

    std::fs::remove_dir(&marker).unwrap();
    wait_for_notify(&sock, "WATCHDOG=1");
    assert!(log().contains("health checks pass again"), "{}", log());

    let _ = child.kill();
    let _ = child.wait();
}
