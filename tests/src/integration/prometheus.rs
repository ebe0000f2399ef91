//! A real Prometheus (Debian's `prometheus`) scrapes a fresh edge and gateway: every metric
//! family of `baylink::telemetry::FAMILIES` has a series on each role that exports it
//! before anything was sent, and the shipped alert rules load.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baylink::config::Role;
use baylink::telemetry::{FAMILIES, Kind};
use baylink_tests::{Deployment, EVENT_WAIT, free_base_port, skip_if};

/// Why Prometheus cannot run here, if it cannot.
fn prometheus_unavailable() -> Option<String> {
    let runs = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!runs).then(|| "prometheus is not installed (apt-get install prometheus)".to_owned())
}

/// A Prometheus server in `dir`, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job name, port on 127.0.0.1) every second with
    /// the shipped rules, and waits until it is ready.
    fn start(dir: &Path, targets: &[(&str, u16)]) -> Prometheus {
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/prometheus-rules.yml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
            rules.display()
        );
        for (job, port) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            ));
        }
        let conf = dir.join("prometheus.yml");
        std::fs::write(&conf, config).unwrap();
        // Prometheus's own port: the first of a free range nobody else of this test uses.
        let port = free_base_port();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Prometheus { child, port, log };
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            if p.get("/-/ready").is_ok_and(|(code, _)| code == 200) {
                return p;
            }
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited with {status}:\n{}", p.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` (already URL-encoded): status code and body.
    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        Ok((code, body))
    }

    /// The `data.result` of an instant query.
    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let (code, body) = self
            .get(&format!("/api/v1/query?query={}", encode(promql)))
            .unwrap();
        assert_eq!(code, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_every_family_from_a_fresh_edge_and_gateway() {
    if skip_if(prometheus_unavailable()) {
        return;
    }
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let dir = d.path("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let (edge_port, gateway_port) = (d.base_port + 1, d.base_port + 3);
    let prom = Prometheus::start(
        &dir,
        &[
            ("baylink-edge", edge_port),
            ("baylink-gateway", gateway_port),
        ],
    );

    // Nothing was sent: every family must already be there, on each role that has it.
    let wanted: Vec<(&str, &str)> = FAMILIES
        .iter()
        .flat_map(|f| {
            [
                (Role::Edge, "baylink-edge"),
                (Role::Gateway, "baylink-gateway"),
            ]
            .into_iter()
            .filter(|(role, _)| f.roles.has(*role))
            .map(move |(_, job)| (f.name, job))
        })
        .collect();
    let deadline = Instant::now() + EVENT_WAIT;
    let mut missing: Vec<(&str, &str)>;
    loop {
        missing = wanted
            .iter()
            .copied()
            .filter(|(name, job)| {
                let kind = FAMILIES.iter().find(|f| f.name == *name).unwrap().kind;
                let series = if kind == Kind::Histogram {
                    format!("{name}_count")
                } else {
                    (*name).to_owned()
                };
                prom.query(&format!("{series}{{job=\"{job}\"}}")).is_empty()
            })
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        missing.is_empty(),
        "families Prometheus did not get: {missing:?}\nedge /metrics:\n{}\ngateway /metrics:\n{}",
        d.metrics(false).unwrap(),
        d.metrics(true).unwrap()
    );

    // A few values a fresh pair must show.
    let up = prom.query("up");
    assert_eq!(up.len(), 2, "{up:?}");
    assert!(up.iter().all(|s| s["value"][1] == "1"), "{up:?}");
    let expiry = prom.query("baylink_certificate_expiry_seconds{key=\"tls.cert\"}");
    assert_eq!(expiry.len(), 2, "one tls.cert per role: {expiry:?}");
    for s in &expiry {
        let secs: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
        assert!(secs > 86_400.0, "dev-env certificates are fresh: {s}");
    }
    let link = prom.query("baylink_link_rtt_seconds{job=\"baylink-gateway\"}");
    assert!(
        link.iter().any(|s| s["metric"]["peer"] == "edge"),
        "the gateway's link series name its edge: {link:?}"
    );

    // The shipped rules loaded, and none fires on a fresh, healthy pair.
    let (code, body) = prom.get("/api/v1/rules").unwrap();
    assert_eq!(code, 200, "{body}");
    let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    let names: Vec<&str> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for alert in [
        "BaylinkUndeliverableTransfers",
        "BaylinkBacklogOld",
        "BaylinkCertificateExpiring",
        "BaylinkWitnessRefused",
        "BaylinkHsmErrors",
        "BaylinkSpoolNearlyFull",
    ] {
        assert!(names.contains(&alert), "{alert} not loaded: {names:?}");
    }
    for g in groups {
        for r in g["rules"].as_array().unwrap() {
            assert_ne!(r["health"], "err", "rule does not evaluate: {r}");
        }
    }
    let firing = prom.query("ALERTS{alertstate=\"firing\"}");
    assert!(firing.is_empty(), "alerts fire on a fresh pair: {firing:?}");

    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
}
