//! The hospital API over HTTPS, driven by curl with client certificates against the real
//! edge (and gateway where the bytes must arrive).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, Service, log_number, payload, sha256_file};
use serde_json::Value;

pub(super) const DEADLINE: Duration = Duration::from_secs(60);
const GOOD: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

/// A curl answer: HTTP status (0 when no HTTP answer came), body, and curl's own verdict.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) body: String,
    curl_ok: bool,
}

impl Answer {
    pub(super) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

pub(super) struct Api<'a> {
    pub(super) d: &'a Deployment,
}

impl Api<'_> {
    pub(super) fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.d.base_port)
    }

    /// curl as `identity` (`hospital-a`, `hospital-b`, `rogue`, or `None` for no certificate).
    pub(super) fn curl(&self, identity: Option<&str>, args: &[&str]) -> Answer {
        let out_file = self.d.path(&format!("curl-{}.out", unique()));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--path-as-is", "--max-time", "60", "--cacert"])
            .arg(self.d.path("pki/ca.pem"))
            .arg("-o")
            .arg(&out_file)
            .args(["-w", "%{http_code}"]);
        if let Some(id) = identity {
            cmd.arg("--cert")
                .arg(self.d.path(&format!("pki/{id}.pem")))
                .arg("--key")
                .arg(self.d.path(&format!("pki/{id}.key")));
        }
        let out = cmd.args(args).stdin(Stdio::null()).output().unwrap();
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let body = std::fs::read_to_string(&out_file).unwrap_or_default();
        Answer {
            status,
            body,
            curl_ok: out.status.success(),
        }
    }

    pub(super) fn declare(&self, who: &str, body: &str) -> Answer {
        let url = self.url("/v1/transfers");
        self.curl(Some(who), &["-X", "POST", "--data-binary", body, &url])
    }

    fn open(&self) -> String {
        let a = self.declare("hospital-a", GOOD);
        assert_eq!(a.status, 201, "{a:?}");
        a.json()["id"].as_str().unwrap().to_owned()
    }

    pub(super) fn put(
        &self,
        who: &str,
        id: &str,
        name: &str,
        file: &Path,
        extra: &[&str],
    ) -> Answer {
        let url = self.url(&format!("/v1/transfers/{id}/files/{name}"));
        let data = format!("@{}", file.display());
        let mut args = vec!["-X", "PUT", "--data-binary", &data];
        args.extend_from_slice(extra);
        args.push(&url);
        self.curl(Some(who), &args)
    }

    pub(super) fn commit(&self, who: &str, id: &str) -> Answer {
        let url = self.url(&format!("/v1/transfers/{id}/commit"));
        self.curl(Some(who), &["-X", "POST", &url])
    }

    pub(super) fn status(&self, who: &str, id: &str) -> Answer {
        let url = self.url(&format!("/v1/transfers/{id}"));
        self.curl(Some(who), &[&url])
    }

    pub(super) fn healthy(&self) {
        let url = format!("http://127.0.0.1:{}/healthz", self.d.base_port + 1);
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                &url,
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "edge /healthz");
    }

    /// `GET /v1/transfers/{id}?wait=SECS`: the status once it changed (or is final), or
    /// after `secs`.
    pub(super) fn status_after_change(&self, who: &str, id: &str, secs: u64) -> Answer {
        let url = self.url(&format!("/v1/transfers/{id}?wait={secs}"));
        self.curl(Some(who), &[&url])
    }

    /// Waits (long polls) until the transfer is in `state`, within the deadline. `committed`
    /// is reached by a `delivered` transfer too (its delivery notice may come before a poll).
    pub(super) fn wait_state(&self, id: &str, state: &str) -> Value {
        let start = Instant::now();
        loop {
            let s = self.status_after_change("hospital-a", id, 10).json();
            if s["state"] == state || (state == "committed" && s["state"] == "delivered") {
                return s;
            }
            assert!(
                s["state"] != "failed" && s["state"] != "refused",
                "transfer ended as {s}"
            );
            assert!(
                start.elapsed() < DEADLINE,
                "no {state} within {DEADLINE:?}: {s}"
            );
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Files under a directory, recursively (for "nothing reached the spool" checks).
pub(super) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Payload files in the edge spool (data/ and parts/ of every transfer).
pub(super) fn spooled_payload(d: &Deployment) -> Vec<PathBuf> {
    files_under(&d.path("spool/edge"))
        .into_iter()
        .filter(|p| {
            let parent = p.parent().and_then(Path::file_name);
            parent == Some("data".as_ref()) || parent == Some("parts".as_ref())
        })
        .collect()
}

fn edge(d: &Deployment) -> Service {
    d.serve(&d.edge_config()).expect("edge starts")
}

fn small_chunks(d: &Deployment) {
    d.set("edge.toml", "transport", "chunk_size", "65536")
        .unwrap();
}

#[test]
fn upload_arrives_byte_identical_and_status_shows_each_stage() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let src = d.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let a = payload(&src, "a.dcm", 3 * 1024 * 1024 + 17, 1).unwrap();
    let b = payload(&src, "b.dcm", 0, 2).unwrap();

    let id = api.open();
    assert_eq!(api.status("hospital-a", &id).json()["state"], "declared");
    for (name, f) in [("a.dcm", &a), ("b.dcm", &b)] {
        let r = api.put("hospital-a", &id, name, f, &[]);
        assert_eq!(r.status, 201, "{r:?}");
    }
    let s = api.status("hospital-a", &id).json();
    assert_eq!(s["state"], "receiving");
    assert_eq!(s["files"], 2);
    let c = api.commit("hospital-a", &id);
    assert_eq!(c.status, 202, "{c:?}");
    let late = api.put("hospital-a", &id, "c.dcm", &a, &[]);
    assert_eq!(late.status, 409, "PUT after commit: {late:?}");

    let s = api.wait_state(&id, "committed");
    assert_eq!(s["bytes"], 3 * 1024 * 1024 + 17);
    let stages: Vec<&str> = s["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| st["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages[..5],
        ["declared", "receiving", "sealed", "sending", "committed"]
    );
    assert!(
        stages.len() == 5 || stages[5..] == ["delivered"],
        "{stages:?}"
    );
    assert_eq!(s["receipt"]["merkle_root"].as_str().unwrap().len(), 64);

    // The gateway delivers after signing the receipt: wait for the files to appear.
    for (name, f) in [("a.dcm", &a), ("b.dcm", &b)] {
        let got = d.wait_delivered(&id, name, DEADLINE);
        assert_eq!(
            sha256_file(f).unwrap(),
            sha256_file(&got).unwrap(),
            "{name}"
        );
    }
    assert!(!d.delivered(&id, "c.dcm").exists());

    // The compliance trail: the edge's audit log holds the transfer's steps, the hospital
    // named on the ones the hospital API wrote, and a refusal with its rule.
    let refused = api.declare("hospital-a", &GOOD.replace("P-0001", "P-0099"));
    assert_eq!(refused.status, 403, "{refused:?}");
    let records: Vec<Value> = std::fs::read_to_string(d.path("audit/edge/records.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
        .collect();
    let ours: Vec<&Value> = records
        .iter()
        .filter(|r| r["transfer"] == id.as_str())
        .collect();
    // (`notified` follows once the gateway's delivery notice arrives.)
    let kinds: Vec<&str> = ours
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .filter(|k| *k != "notified")
        .collect();
    assert_eq!(
        kinds,
        ["declared", "sealed", "sent", "receipted"],
        "{ours:?}"
    );
    for r in &ours[..2] {
        assert_eq!(r["hospital"], "hospital-a", "{r}");
    }
    let last = records.last().unwrap();
    assert_eq!(last["kind"], "refused", "{last}");
    assert_eq!(last["rule"], "consent-missing", "{last}");
    assert_eq!(last["hospital"], "hospital-a", "{last}");
    api.healthy();
}

/// `?wait=` holds a status answer until the state changes (no polling loop needed), answers a
/// final state at once, and refuses bad values naming the parameter.
#[test]
fn a_status_request_with_wait_answers_when_the_state_changes() {
    let d = Deployment::new().unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let f = payload(d.dir.path(), "a.dcm", 100_000, 1).unwrap();
    let id = api.open();
    let r = api.put("hospital-a", &id, "a.dcm", &f, &[]);
    assert_eq!(r.status, 201, "{r:?}");

    // Nothing changes: the answer is held for the whole wait, then the unchanged state.
    let t0 = Instant::now();
    let held = api.status_after_change("hospital-a", &id, 2);
    assert_eq!(held.status, 200, "{held:?}");
    assert_eq!(held.json()["state"], "receiving");
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());

    // A commit changes it: a waiting request answers with the new state long before its
    // wait is over.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t0 = Instant::now();
            (api.status_after_change("hospital-a", &id, 60), t0.elapsed())
        });
        let c = api.commit("hospital-a", &id);
        assert_eq!(c.status, 202, "{c:?}");
        let (a, took) = waiter.join().unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        assert_ne!(a.json()["state"], "receiving", "{a:?}");
        assert!(
            took < Duration::from_secs(50),
            "held {took:?} despite a change"
        );
    });

    // `committed` is waited on until the delivery notice moves it on; a final state
    // (`delivered`) answers at once.
    api.wait_state(&id, "delivered");
    let t0 = Instant::now();
    let a = api.status_after_change("hospital-a", &id, 60);
    assert_eq!(a.json()["state"], "delivered");
    assert!(t0.elapsed() < Duration::from_secs(50), "{:?}", t0.elapsed());

    for bad in [
        "wait=abc",
        "wait=301",
        "wait=-1",
        "wait=1&wait=2",
        "since=1",
    ] {
        let url = api.url(&format!("/v1/transfers/{id}?{bad}"));
        let a = api.curl(Some("hospital-a"), &[&url]);
        assert_eq!(a.status, 400, "{bad}: {a:?}");
        let what = if bad.starts_with("since") {
            "since"
        } else {
            "wait="
        };
        assert!(a.body.contains(what), "{bad}: {a:?}");
    }
    // Another hospital's transfer stays invisible, waiting or not.
    let a = api.status_after_change("hospital-b", &id, 1);
    assert_eq!(a.status, 404, "{a:?}");
}

#[test]
fn tls_refuses_no_certificate_and_rogue_ca() {
    let d = Deployment::new().unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let url = api.url("/v1/transfers");
    for who in [None, Some("rogue")] {
        let a = api.curl(who, &["-X", "POST", "--data-binary", GOOD, &url]);
        assert_eq!(a.status, 0, "{who:?} got an HTTP answer: {a:?}");
        assert!(!a.curl_ok);
    }
    assert!(transfers(&d).is_empty(), "nothing declared");
    api.healthy();
}

/// Transfer directories in the edge spool (hidden scratch directories such as the DICOM
/// door's `.incoming` aside).
pub(super) fn transfers(d: &Deployment) -> Vec<PathBuf> {
    std::fs::read_dir(d.path("spool/edge"))
        .map(|e| {
            e.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bad_declarations_are_refused_naming_the_field_or_rule() {
    // The gateway's certificate is presented below with its key: PEM files, not the HSM.
    let d = Deployment::with_tls_key_files().unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let cases = [
        ("not json", ""),
        (
            r#"{"category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
            "patient_id",
        ),
        (
            r#"{"patient_id":7,"category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
            "patient_id",
        ),
        (
            r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care"}"#,
            "destination",
        ),
        (
            r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth","extra":1}"#,
            "extra",
        ),
    ];
    for (body, field) in cases {
        let a = api.declare("hospital-a", body);
        assert_eq!(a.status, 400, "{body}: {a:?}");
        assert_eq!(a.json()["field"], field, "{body}: {a:?}");
        assert!(a.json()["error"].as_str().unwrap().contains(field));
    }
    let refusals = [
        (
            r#"{"patient_id":"P-0099","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
            "consent-missing",
        ),
        (
            r#"{"patient_id":"P-0001","category":"genetic-data","purpose":"care","destination":"hk-ehealth"}"#,
            "negative-list",
        ),
    ];
    for (body, rule) in refusals {
        let a = api.declare("hospital-a", body);
        assert_eq!(a.status, 403, "{body}: {a:?}");
        assert_eq!(a.json()["rule"], rule, "{a:?}");
    }
    // A certificate from the right CA that is not a hospital in the policy (the gateway's).
    let a = api.declare("gateway", GOOD);
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.json()["rule"], "hospital-unknown", "{a:?}");
    assert!(transfers(&d).is_empty(), "nothing declared");
    api.healthy();
}

#[test]
fn bad_file_names_are_400_and_nothing_is_spooled() {
    let d = Deployment::new().unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let id = api.open();
    let f = payload(d.dir.path(), "x", 1000, 3).unwrap();
    let long = "a".repeat(256);
    for name in [
        "a%2Fb", "a/b", "..", "%2E%2E", "a%00b", "a%01b", "a%7Fb", &long,
    ] {
        let a = api.put("hospital-a", &id, name, &f, &[]);
        assert_eq!(a.status, 400, "{name}: {a:?}");
        assert!(a.json()["error"].as_str().unwrap().contains("file name"));
    }
    assert!(spooled_payload(&d).is_empty(), "{:?}", spooled_payload(&d));
    // A 255-byte name is fine.
    let ok = "b".repeat(255);
    assert_eq!(api.put("hospital-a", &id, &ok, &f, &[]).status, 201);
    api.healthy();
}

/// `name` percent-encoded for a URL path segment (every byte but the unreserved ones).
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The longest names (255 bytes, ASCII and multi-byte UTF-8) uploaded through the hospital
/// API are sealed, sent and delivered under the hospital's names, byte-identical.
#[test]
fn names_of_255_bytes_arrive_through_the_hospital_api() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let src = d.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let names = crate::transfer::longest_names();
    let id = api.open();
    let mut files = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let f = payload(&src, &format!("f{i}"), 200_000 + i as u64, 50 + i as u64).unwrap();
        let r = api.put("hospital-a", &id, &path_segment(name), &f, &[]);
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.json()["name"], name.as_str(), "{r:?}");
        files.push(f);
    }
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    let s = api.wait_state(&id, "committed");
    assert_eq!(s["files"], 2, "{s}");
    for (name, f) in names.iter().zip(&files) {
        let got = d.wait_delivered(&id, name, DEADLINE);
        assert_eq!(sha256_file(f).unwrap(), sha256_file(&got).unwrap());
    }
    drop(gateway);
}

#[test]
fn over_the_limit_is_413_by_content_length_and_when_chunked() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "ingest", "max_upload_bytes", "1048576")
        .unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let id = api.open();
    let big = payload(d.dir.path(), "big", 2 * 1024 * 1024, 4).unwrap();
    let a = api.put("hospital-a", &id, "big.dcm", &big, &[]);
    assert_eq!(a.status, 413, "by Content-Length: {a:?}");
    let a = api.put(
        "hospital-a",
        &id,
        "big.dcm",
        &big,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(a.status, 413, "chunked: {a:?}");
    // The discard runs after the answer: wait for it, bounded.
    let start = Instant::now();
    while !spooled_payload(&d).is_empty() {
        assert!(start.elapsed() < DEADLINE, "{:?}", spooled_payload(&d));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The limit counts the whole transfer: 600 KiB fits once, not twice.
    let part = payload(d.dir.path(), "part", 600 * 1024, 5).unwrap();
    assert_eq!(api.put("hospital-a", &id, "p1", &part, &[]).status, 201);
    assert_eq!(api.put("hospital-a", &id, "p2", &part, &[]).status, 413);
    api.healthy();
}

#[test]
fn unknown_and_foreign_ids_are_404() {
    let d = Deployment::new().unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let id = api.open();
    let f = payload(d.dir.path(), "x", 10, 3).unwrap();
    assert_eq!(api.status("hospital-b", &id).status, 404);
    assert_eq!(api.put("hospital-b", &id, "x", &f, &[]).status, 404);
    assert_eq!(api.commit("hospital-b", &id).status, 404);
    let unknown = "01a209a2-023a-7541-b8ff-ab35b1889287";
    assert_eq!(api.status("hospital-a", unknown).status, 404);
    assert_eq!(api.put("hospital-a", unknown, "x", &f, &[]).status, 404);
    assert_eq!(api.status("hospital-a", "not-an-id").status, 404);
    assert!(spooled_payload(&d).is_empty());
    api.healthy();
}

#[test]
fn client_disconnect_discards_the_partial_file_and_a_retry_succeeds() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let id = api.open();
    let url = api.url(&format!("/v1/transfers/{id}/files/scan.dcm"));
    // curl streams its stdin as a chunked body; we feed 2 MiB, then kill it mid-body.
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(d.path("pki/ca.pem"))
        .arg("--cert")
        .arg(d.path("pki/hospital-a.pem"))
        .arg("--key")
        .arg(d.path("pki/hospital-a.key"))
        .args(["-T", "-", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![7u8; 2 * 1024 * 1024]).unwrap();
    stdin.flush().unwrap();
    // Wait until the edge has the partial file, then cut the client off.
    let start = Instant::now();
    while spooled_payload(&d).is_empty() {
        assert!(start.elapsed() < DEADLINE, "upload never reached the spool");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let start = Instant::now();
    while !spooled_payload(&d).is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "partial kept: {:?}",
            spooled_payload(&d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(api.status("hospital-a", &id).json()["files"], 0);

    let f = payload(d.dir.path(), "scan.dcm", 3 * 1024 * 1024, 9).unwrap();
    let r = api.put("hospital-a", &id, "scan.dcm", &f, &[]);
    assert_eq!(r.status, 201, "retry: {r:?}");
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, "scan.dcm", DEADLINE);
    assert_eq!(sha256_file(&f).unwrap(), sha256_file(&got).unwrap());
    api.healthy();
}

#[test]
fn slow_clients_are_disconnected_by_the_header_and_idle_timeouts() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "ingest", "header_timeout", "\"1s\"")
        .unwrap();
    d.set("edge.toml", "ingest", "idle_timeout", "\"1s\"")
        .unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };

    // No TLS handshake at all.
    let mut tcp = TcpStream::connect(("127.0.0.1", d.base_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "server closed");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );

    // Handshake done, half a request header, then silence.
    let mut ssl = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{}", d.base_port))
        .arg("-CAfile")
        .arg(d.path("pki/ca.pem"))
        .arg("-cert")
        .arg(d.path("pki/hospital-a.pem"))
        .arg("-key")
        .arg(d.path("pki/hospital-a.key"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = ssl.stdin.take().unwrap();
    stdin
        .write_all(b"GET /v1/transfers/x HTTP/1.1\r\nHost: edge\r\n")
        .unwrap();
    stdin.flush().unwrap();
    let start = Instant::now();
    let closed = loop {
        if ssl.try_wait().unwrap().is_some() {
            break true;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = ssl.kill();
            let _ = ssl.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    assert!(closed, "half a header kept the connection open");

    // A body that stalls: Content-Length promises more than is sent.
    let id = api.open();
    let f = payload(d.dir.path(), "x", 1000, 3).unwrap();
    let a = api.put(
        "hospital-a",
        &id,
        "stall.dcm",
        &f,
        &["-H", "Content-Length: 100000"],
    );
    assert_eq!(a.status, 408, "{a:?}");
    let start = Instant::now();
    while !spooled_payload(&d).is_empty() {
        assert!(start.elapsed() < DEADLINE, "partial kept");
        std::thread::sleep(Duration::from_millis(20));
    }
    api.healthy();
}

/// Writes a DICOM Part 10 instance with dcmtk's dump2dcm; `pixels` bytes of pixel data are
/// appended (explicit VR only) so the instance spans many body frames.
pub(super) fn dicom(
    dir: &Path,
    name: &str,
    patient: &str,
    uid: &str,
    implicit: bool,
    pixels: usize,
) -> PathBuf {
    let dump = dir.join(format!("{name}.dump"));
    std::fs::write(
        &dump,
        format!(
            "(0008,0016) UI =SecondaryCaptureImageStorage\n\
             (0008,0018) UI [{uid}]\n\
             (0008,0060) CS [OT]\n\
             (0008,1032) SQ (Sequence with undefined length #=1)\n\
             \x20 (fffe,e000) na (Item with undefined length #=1)\n\
             \x20   (0008,0100) SH [CODE]\n\
             \x20 (fffe,e00d) na (ItemDelimitationItem)\n\
             (fffe,e0dd) na (SequenceDelimitationItem)\n\
             (0010,0010) PN [Doe^Jane]\n\
             (0010,0020) LO [{patient}]\n\
             (0020,000d) UI [1.2.826.0.1.3680043.2.1125.77]\n\
             (0020,000e) UI [1.2.826.0.1.3680043.2.1125.78]\n"
        ),
    )
    .unwrap();
    let out = dir.join(name);
    let syntax = if implicit {
        ["+ti", "-e"]
    } else {
        ["+te", "+e"]
    };
    let st = Command::new("dump2dcm")
        .args(syntax)
        .arg(&dump)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "dump2dcm");
    if pixels > 0 {
        assert!(!implicit);
        let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        f.write_all(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0])
            .unwrap();
        f.write_all(&(pixels as u32).to_le_bytes()).unwrap();
        let data: Vec<u8> = (0..pixels).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
    }
    out
}

/// A multipart/related body of these files (boundary `BAYLINK-TEST-b0undary`).
pub(super) fn multipart(dir: &Path, files: &[&Path]) -> PathBuf {
    let mut body = Vec::new();
    for f in files {
        body.extend_from_slice(
            b"--BAYLINK-TEST-b0undary\r\nContent-Type: application/dicom\r\n\r\n",
        );
        body.extend_from_slice(&std::fs::read(f).unwrap());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--BAYLINK-TEST-b0undary--\r\n");
    let path = dir.join(format!("stow-{}.body", unique()));
    std::fs::write(&path, body).unwrap();
    path
}

const STOW_TYPE: &str =
    "Content-Type: multipart/related; type=\"application/dicom\"; boundary=BAYLINK-TEST-b0undary";

fn stow(api: &Api<'_>, body: &Path) -> (Answer, String) {
    stow_with(api, body, "")
}

/// STOW-RS of `body` with a query string (`""` or e.g. `?purpose=research`).
pub(super) fn stow_with(api: &Api<'_>, body: &Path, query: &str) -> (Answer, String) {
    let headers = api.d.path(&format!("stow-{}.headers", unique()));
    let data = format!("@{}", body.display());
    let url = api.url(&format!("/dicom-web/studies{query}"));
    let a = api.curl(
        Some("hospital-a"),
        &[
            "-X",
            "POST",
            "-H",
            STOW_TYPE,
            "--data-binary",
            &data,
            "-D",
            headers.to_str().unwrap(),
            &url,
        ],
    );
    let h = std::fs::read_to_string(&headers).unwrap_or_default();
    (a, h)
}

pub(super) fn sequence_uids(v: &Value, tag: &str) -> Vec<(String, Option<u64>)> {
    v[tag]["Value"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    (
                        i["00081155"]["Value"][0].as_str().unwrap_or("").to_owned(),
                        i["00081197"]["Value"][0].as_u64(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn stow_rs_stores_good_instances_and_lists_failed_ones() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let dir = d.path("dicom");
    std::fs::create_dir_all(&dir).unwrap();
    let a = dicom(
        &dir,
        "a.dcm",
        "P-0001",
        "1.2.826.0.1.3680043.2.1125.1.1",
        false,
        3 << 20,
    );
    let b = dicom(
        &dir,
        "b.dcm",
        "P-0001",
        "1.2.826.0.1.3680043.2.1125.1.2",
        true,
        0,
    );
    let other = dicom(
        &dir,
        "c.dcm",
        "P-0002",
        "1.2.826.0.1.3680043.2.1125.1.3",
        false,
        0,
    );
    let junk = payload(&dir, "junk.dcm", 5000, 11).unwrap();
    let body = multipart(&dir, &[&a, &junk, &b, &other]);

    let (r, headers) = stow(&api, &body);
    assert_eq!(r.status, 202, "{r:?}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: application/dicom+json"),
        "{headers}"
    );
    let id = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-baylink-transfer:")
                .map(|v| v.trim().to_owned())
        })
        .expect("X-Baylink-Transfer header");
    let v = r.json();
    let stored = sequence_uids(&v, "00081199");
    assert_eq!(
        stored.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        [
            "1.2.826.0.1.3680043.2.1125.1.1",
            "1.2.826.0.1.3680043.2.1125.1.2"
        ]
    );
    let failed = sequence_uids(&v, "00081198");
    assert_eq!(
        failed,
        [
            (String::new(), Some(0xC000)),
            ("1.2.826.0.1.3680043.2.1125.1.3".to_owned(), Some(0x0110)),
        ]
    );

    api.wait_state(&id, "committed");
    for (uid, f) in [
        ("1.2.826.0.1.3680043.2.1125.1.1", &a),
        ("1.2.826.0.1.3680043.2.1125.1.2", &b),
    ] {
        let got = d.wait_delivered(&id, &format!("{uid}.dcm"), DEADLINE);
        assert_eq!(sha256_file(f).unwrap(), sha256_file(&got).unwrap(), "{uid}");
    }
    let delivered = files_under(&d.path("delivered").join(&id));
    assert_eq!(delivered.len(), 2, "only the good instances: {delivered:?}");
    api.healthy();
}

#[test]
fn stow_rs_for_a_patient_without_consent_stores_nothing() {
    let d = Deployment::new().unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let dir = d.path("dicom");
    std::fs::create_dir_all(&dir).unwrap();
    let x = dicom(
        &dir,
        "x.dcm",
        "P-0099",
        "1.2.826.0.1.3680043.2.1125.9.1",
        false,
        0,
    );
    let body = multipart(&dir, &[&x]);
    let (r, headers) = stow(&api, &body);
    assert_eq!(r.status, 409, "{r:?}");
    assert!(!headers.to_ascii_lowercase().contains("x-baylink-transfer"));
    assert_eq!(
        sequence_uids(&r.json(), "00081198"),
        [("1.2.826.0.1.3680043.2.1125.9.1".to_owned(), Some(0x0110))]
    );
    assert!(transfers(&d).is_empty(), "nothing declared");
    // Not multipart at all.
    let url = api.url("/dicom-web/studies");
    let a = api.curl(
        Some("hospital-a"),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/dicom",
            "--data-binary",
            "x",
            &url,
        ],
    );
    assert_eq!(a.status, 415, "{a:?}");
    api.healthy();
}

#[test]
fn an_open_transfer_survives_an_edge_restart() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let edge1 = edge(&d);
    let api = Api { d: &d };
    let src = d.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let a = payload(&src, "a.dcm", 700 * 1024, 21).unwrap();
    let b = payload(&src, "b.dcm", 300 * 1024, 22).unwrap();
    let id = api.open();
    assert_eq!(api.put("hospital-a", &id, "a.dcm", &a, &[]).status, 201);
    edge1.kill().unwrap();

    let _edge2 = edge(&d);
    let s = api.status("hospital-a", &id).json();
    assert_eq!(s["state"], "receiving", "{s}");
    assert_eq!(s["files"], 1, "{s}");
    assert_eq!(
        api.put("hospital-a", &id, "a.dcm", &a, &[]).status,
        409,
        "already there"
    );
    assert_eq!(api.put("hospital-a", &id, "b.dcm", &b, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    api.wait_state(&id, "committed");
    for (name, f) in [("a.dcm", &a), ("b.dcm", &b)] {
        let got = d.wait_delivered(&id, name, DEADLINE);
        assert_eq!(
            sha256_file(f).unwrap(),
            sha256_file(&got).unwrap(),
            "{name}"
        );
    }
    api.healthy();
}

#[test]
fn a_committed_upload_is_sent_after_an_edge_restart() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let edge1 = edge(&d);
    let api = Api { d: &d };
    let a = payload(d.dir.path(), "a.dcm", 500 * 1024, 31).unwrap();
    let id = api.open();
    assert_eq!(api.put("hospital-a", &id, "a.dcm", &a, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    // No gateway yet: the edge keeps retrying.
    api.wait_state(&id, "sending");
    edge1.kill().unwrap();

    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge2 = edge(&d);
    let s = api.wait_state(&id, "committed");
    assert!(s["receipt"]["signature"].as_str().is_some(), "{s}");
    let got = d.wait_delivered(&id, "a.dcm", DEADLINE);
    assert_eq!(sha256_file(&a).unwrap(), sha256_file(&got).unwrap());
}

#[test]
fn many_concurrent_uploads_and_commits_all_arrive() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let src = d.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let jobs: Vec<(String, PathBuf)> = (0..12)
        .map(|i| {
            let f = payload(&src, &format!("f{i}.dcm"), 1_500_000 + i * 4099, 40 + i).unwrap();
            (api.open(), f)
        })
        .collect();
    std::thread::scope(|s| {
        for (id, f) in &jobs {
            let api = &api;
            s.spawn(move || {
                let r = api.put("hospital-a", id, "scan.dcm", f, &[]);
                assert_eq!(r.status, 201, "{r:?}");
                let c = api.commit("hospital-a", id);
                assert_eq!(c.status, 202, "{c:?}");
            });
        }
    });
    for (id, f) in &jobs {
        api.wait_state(id, "committed");
        let got = d.wait_delivered(id, "scan.dcm", DEADLINE);
        assert_eq!(sha256_file(f).unwrap(), sha256_file(&got).unwrap());
    }
    api.healthy();
}

/// A full spool answers 507 and keeps nothing of the refused upload; once that space is free
/// again, uploads are accepted. The edge runs in its own mount namespace with its spool on a
/// 16 MiB tmpfs (the test reads that spool through `/proc/<pid>/root`).
#[test]
fn disk_full_is_507_and_nothing_is_left_behind() {
    if baylink_tests::skip_if(baylink_tests::mount_namespace_unavailable()) {
        return;
    }
    let d = Deployment::new().unwrap();
    // The file system's own limit, not the reserve kept for audit and sealing.
    d.set("edge.toml", "spool", "reserve_bytes", "0").unwrap();
    let spool = d.path("spool/edge");
    let edge = d
        .serve_on_small_disk(&d.edge_config(), "spool/edge", "16m")
        .unwrap();
    let api = Api { d: &d };
    let id = api.open();

    let big = payload(d.dir.path(), "big", 32 << 20, 6).unwrap();
    let a = api.put("hospital-a", &id, "big.dcm", &big, &[]);
    assert_eq!(a.status, 507, "{a:?}");
    assert!(a.body.contains("space"), "{a:?}");

    // The partial file is removed: look at the spool as the edge sees it.
    let seen_by_edge = PathBuf::from(format!("/proc/{}/root", edge.pid()))
        .join(spool.strip_prefix("/").unwrap())
        .join(&id);
    let start = Instant::now();
    while files_under(&seen_by_edge.join("parts")).len()
        + files_under(&seen_by_edge.join("data")).len()
        > 0
    {
        assert!(
            start.elapsed() < DEADLINE,
            "{:?}",
            files_under(&seen_by_edge)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The transfer stays open and takes what fits.
    let small = payload(d.dir.path(), "small", 1 << 20, 7).unwrap();
    let a = api.put("hospital-a", &id, "small.dcm", &small, &[]);
    assert_eq!(a.status, 201, "{a:?}");
    api.healthy();
}

/// SIGHUP re-reads the policy: a consent added to the registry takes effect without a
/// restart, and a registry that does not parse leaves the policy in force.
#[test]
fn sighup_reloads_the_policy_and_keeps_it_when_the_new_one_is_broken() {
    let d = Deployment::new().unwrap();
    let edge = edge(&d);
    let api = Api { d: &d };
    let p99 = GOOD.replace("P-0001", "P-0099");
    let a = api.declare("hospital-a", &p99);
    assert_eq!(a.status, 403, "{a:?}");

    let registry = d.path("policy/consents.toml");
    let original = std::fs::read_to_string(&registry).unwrap();
    let added = original.clone()
        + r#"
[[consent]]
patient_id = "P-0099"
reference = "CR-2026-0099"
categories = ["*"]
purposes = ["care"]
destinations = ["hk-ehealth"]
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2099-01-01T00:00:00Z"
evidence_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;
    std::fs::write(&registry, added).unwrap();
    let hup = |n: usize, needle: &str| {
        let st = Command::new("kill")
            .args(["-HUP", &edge.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let start = Instant::now();
        while edge.log().matches(needle).count() < n {
            assert!(start.elapsed() < DEADLINE, "no {needle:?}:\n{}", edge.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    hup(1, "policy reloaded");
    let a = api.declare("hospital-a", &p99);
    assert_eq!(a.status, 201, "the added consent is in force: {a:?}");

    std::fs::write(&registry, "[[consent]]\npatient_id = ").unwrap();
    hup(1, "policy not reloaded");
    let a = api.declare("hospital-a", &p99);
    assert_eq!(a.status, 201, "the previous policy stays in force: {a:?}");
    api.healthy();
}

#[test]
fn an_open_transfer_left_idle_expires_with_a_record_and_its_files_go() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    d.set("edge.toml", "ingest", "open_timeout", "\"5s\"")
        .unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let edge1 = edge(&d);
    let api = Api { d: &d };
    let a = payload(d.dir.path(), "a.dcm", 700 * 1024, 31).unwrap();

    // One the hospital forgets to commit, one it commits at once.
    let idle = api.open();
    assert_eq!(api.put("hospital-a", &idle, "a.dcm", &a, &[]).status, 201);
    let done = api.open();
    assert_eq!(api.put("hospital-a", &done, "a.dcm", &a, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &done).status, 202);

    edge1.wait_for_log(&["open transfer expired", &idle], DEADLINE);
    let s = api.status("hospital-a", &idle).json();
    assert_eq!(s["state"], "failed", "{s}");
    let error = s["error"].as_str().unwrap();
    assert!(error.contains("ingest.open_timeout"), "{s}");
    assert!(!error.contains("  "), "one line, single spaces: {error:?}");
    for late in [
        api.put("hospital-a", &idle, "b.dcm", &a, &[]),
        api.commit("hospital-a", &idle),
    ] {
        assert_eq!(late.status, 409, "{late:?}");
        assert!(late.body.contains("expired"), "{late:?}");
    }
    let dir = d.path(&format!("spool/edge/{idle}"));
    assert!(
        files_under(&dir)
            .iter()
            .all(|p| !p.starts_with(dir.join("data"))
                && !p.starts_with(dir.join("parts"))
                && !p.starts_with(dir.join("files"))),
        "{:?}",
        files_under(&dir)
    );
    assert!(dir.join("expired").exists());

    let records: Vec<Value> = std::fs::read_to_string(d.path("audit/edge/records.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
        .filter(|r: &Value| r["transfer"] == idle.as_str())
        .collect();
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["declared", "expired"], "{records:?}");
    assert_eq!(records[1]["hospital"], "hospital-a");

    // The committed one was never at risk, and a restart does not reopen the expired one.
    api.wait_state(&done, "committed");
    d.wait_delivered(&done, "a.dcm", DEADLINE);
    edge1.terminate().unwrap();
    let _edge2 = edge(&d);
    assert_eq!(api.status("hospital-a", &idle).json()["state"], "failed");
    assert_eq!(api.put("hospital-a", &idle, "b.dcm", &a, &[]).status, 409);
}

/// Issue 19: a part cut in the middle of an element and a part without StudyInstanceUID are
/// listed failed (0xC000, 0xA900) with the SOP Class and Instance UIDs of their file meta;
/// the good part beside them is stored and delivered, the failed ones are not.
#[test]
fn stow_rs_refuses_instances_cut_short_without_study_uid_or_of_another_class_naming_them() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = edge(&d);
    let api = Api { d: &d };
    let dir = d.path("dicom");
    std::fs::create_dir_all(&dir).unwrap();
    let uid = |n: u32| format!("1.2.826.0.1.3680043.2.1125.19.{n}");
    let good = dicom(&dir, "good.dcm", "P-0001", &uid(1), false, 8192);
    let whole = dicom(&dir, "cut.dcm", "P-0001", &uid(2), false, 8192);
    let bytes = std::fs::read(&whole).unwrap();
    let cut = dir.join("cut-short.dcm");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let no_study =
        super::dicom::without_study_uid(&dicom(&dir, "nostudy.dcm", "P-0001", &uid(3), true, 0));
    // A retired SOP class (Standalone Curve, 1.2.840.10008.5.1.4.1.1.9) the DICOM door would
    // not negotiate: the same length as Secondary Capture's UID, swapped in meta and data set.
    let other = dicom(&dir, "class.dcm", "P-0001", &uid(4), false, 0);
    let mut bytes = std::fs::read(&other).unwrap();
    let (sc, curve) = (
        b"1.2.840.10008.5.1.4.1.1.7\0",
        b"1.2.840.10008.5.1.4.1.1.9\0",
    );
    let mut swapped = 0;
    for i in 0..bytes.len() - sc.len() {
        if &bytes[i..i + sc.len()] == sc {
            bytes[i..i + sc.len()].copy_from_slice(curve);
            swapped += 1;
        }
    }
    assert_eq!(swapped, 2, "meta and data set");
    std::fs::write(&other, bytes).unwrap();
    let body = multipart(&dir, &[&cut, &good, &no_study, &other]);

    let (r, headers) = stow(&api, &body);
    assert_eq!(r.status, 202, "{r:?}");
    let v = r.json();
    let stored = sequence_uids(&v, "00081199");
    assert_eq!(stored, [(uid(1), None)]);
    let failed = sequence_uids(&v, "00081198");
    assert_eq!(
        failed,
        [
            (uid(2), Some(0xC000)),
            (uid(3), Some(0xA900)),
            (uid(4), Some(0x0122))
        ],
        "{v}"
    );
    for (item, class) in v["00081198"]["Value"].as_array().unwrap().iter().zip([
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.9",
    ]) {
        assert_eq!(item["00081150"]["Value"][0].as_str(), Some(class), "{item}");
    }
    let id = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-baylink-transfer:")
                .map(|v| v.trim().to_owned())
        })
        .expect("X-Baylink-Transfer header");
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, &format!("{}.dcm", uid(1)), DEADLINE);
    assert_eq!(sha256_file(&good).unwrap(), sha256_file(&got).unwrap());
    let delivered = files_under(&d.path("delivered").join(&id));
    assert_eq!(delivered.len(), 1, "only the good instance: {delivered:?}");
    api.healthy();
}

/// Files stream to the gateway as they are stored, before the commit: the first is
/// announced and staged whole while the hospital uploads the next, the ones after it are
/// announced after it, and the commit's offer takes what was staged. Nothing goes twice,
/// and the files arrive byte-identical.
#[test]
fn uploaded_files_stream_to_the_gateway_before_the_commit() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = edge(&d);
    let api = Api { d: &d };
    let src = d.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let sizes = [(1 << 20) + 17, 0, 300_000];
    let files: Vec<(String, PathBuf)> = sizes
        .iter()
        .enumerate()
        .map(|(n, &size)| {
            let name = format!("f{n}.bin");
            let path = payload(&src, &name, size, n as u64).unwrap();
            (name, path)
        })
        .collect();

    let id = api.open();
    let r = api.put("hospital-a", &id, &files[0].0, &files[0].1, &[]);
    assert_eq!(r.status, 201, "{r:?}");
    gateway.wait_for_log(&["announced: staging chunks until the offer"], DEADLINE);
    // Staged whole at the gateway before the next file is uploaded.
    super::dicom::wait_staged(&d, &gateway, sizes[0], DEADLINE);
    for (name, path) in &files[1..] {
        let r = api.put("hospital-a", &id, name, path, &[]);
        assert_eq!(r.status, 201, "{r:?}");
    }
    let c = api.commit("hospital-a", &id);
    assert_eq!(c.status, 202, "{c:?}");
    api.wait_state(&id, "committed");
    for (name, path) in &files {
        let got = d.wait_delivered(&id, name, DEADLINE);
        assert_eq!(
            sha256_file(path).unwrap(),
            sha256_file(&got).unwrap(),
            "{name}"
        );
    }
    gateway.wait_for_log(&["staged chunks taken by the offer"], DEADLINE);
    let line = edge.wait_for_log(&["transfer receipted", &id], DEADLINE);
    let streamed = log_number(&line, "streamed_bytes");
    let sent = log_number(&line, "wire_bytes");
    assert!(
        streamed >= sizes[0],
        "the first file was not taken whole: {line}"
    );
    assert_eq!(
        streamed + sent,
        sizes.iter().sum::<u64>(),
        "a chunk went twice: {line}"
    );
}

/// With `transport.stream_while_sealing = false` an upload streams nothing before its
/// commit.
#[test]
fn uploads_stream_nothing_before_the_commit_when_told_not_to() {
    let d = Deployment::new().unwrap();
    small_chunks(&d);
    d.set("edge.toml", "transport", "stream_while_sealing", "false")
        .unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = edge(&d);
    let api = Api { d: &d };
    let src = d.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let f = payload(&src, "a.bin", 200_000, 3).unwrap();
    let id = api.open();
    assert_eq!(api.put("hospital-a", &id, "a.bin", &f, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    api.wait_state(&id, "committed");
    let line = edge.wait_for_log(&["transfer receipted", &id], DEADLINE);
    assert_eq!(log_number(&line, "streamed_bytes"), 0, "{line}");
    assert!(!gateway.log().contains("announced"), "{}", gateway.log());
}
