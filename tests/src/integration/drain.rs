//! SIGTERM drains the edge (`drain.timeout`): the HTTPS and DICOM listeners close at once
//! (new connections are refused), uploads, associations and sends in progress go on, and
//! what is still running when the drain ends is stopped so that a restart finishes it: an
//! upload still arriving is answered 503 with `Retry-After` and the transfer stays open, an
//! association is aborted after its instances answered Success are sealed, and a send is cut
//! off and resumed from the chunks the gateway holds. The edge exits 0.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, Service, log_number, payload, sha256_file, signal};

use super::dicom::{RawScu, data_set, instance, sop_uid, wait_for_delivery};
use super::ingest::{Api, DEADLINE, dicom, files_under, multipart};

const DECLARATION: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

/// Longest an edge may take to exit after `drain.timeout` ran out: the grace for the doors
/// and sends (5 s), the witness (5 s) and the link close (2 s), and slack for a busy machine.
const EXIT_MARGIN: Duration = Duration::from_secs(20);

/// Declares a transfer as hospital-a; its id.
fn open(api: &Api<'_>) -> String {
    let a = api.declare("hospital-a", DECLARATION);
    assert_eq!(a.status, 201, "{a:?}");
    a.json()["id"].as_str().unwrap().to_owned()
}

/// Partial uploads in the edge spool (`parts/` of every transfer).
fn partial_uploads(d: &Deployment) -> usize {
    files_under(&d.path("spool/edge"))
        .iter()
        .filter(|p| p.parent().and_then(Path::file_name) == Some("parts".as_ref()))
        .count()
}

/// Payload files in the edge spool of transfers other than `id` (here: the STOW-RS one).
fn stow_payload(d: &Deployment, id: &str) -> Vec<PathBuf> {
    files_under(&d.path("spool/edge"))
        .into_iter()
        .filter(|p| {
            let parent = p.parent().and_then(Path::file_name);
            (parent == Some("data".as_ref()) || parent == Some("parts".as_ref()))
                && !p.to_string_lossy().contains(id)
        })
        .collect()
}

/// Asserts that a TCP connection to `port` is refused at once (the listener is closed).
fn refused(port: u16, what: &str) {
    let start = Instant::now();
    let e = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))
        .map(drop)
        .expect_err(what);
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{what}: {e}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{what}: slow refusal"
    );
}

/// An upload whose body the test writes piece by piece: curl streaming its stdin (chunked).
struct Streaming {
    child: Child,
    stdin: Option<ChildStdin>,
    code: PathBuf,
    headers: PathBuf,
}

impl Streaming {
    fn start(d: &Deployment, id: &str, name: &str) -> Streaming {
        let url = format!(
            "https://127.0.0.1:{}/v1/transfers/{id}/files/{name}",
            d.base_port
        );
        let (code, headers) = (
            d.path(&format!("{name}.code")),
            d.path(&format!("{name}.headers")),
        );
        let mut child = Command::new("curl")
            .args(["-sS", "--max-time", "90", "--cacert"])
            .arg(d.path("pki/ca.pem"))
            .arg("--cert")
            .arg(d.path("pki/hospital-a.pem"))
            .arg("--key")
            .arg(d.path("pki/hospital-a.key"))
            .arg("-D")
            .arg(&headers)
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-T", "-", &url])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&code).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Streaming {
            child,
            stdin,
            code,
            headers,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Ends the body and waits (bounded) for curl's answer: the HTTP status (0 without
    /// one) and the response headers.
    fn answer(mut self, limit: Duration) -> (u16, String) {
        self.stdin = None;
        let deadline = Instant::now() + limit;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("curl got no answer within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let code = std::fs::read_to_string(&self.code).unwrap_or_default();
        let headers = std::fs::read_to_string(&self.headers).unwrap_or_default();
        (code.trim().parse().unwrap_or(0), headers)
    }
}

/// An upload over `openssl s_client`, request written by hand: unlike curl (which blocks
/// reading its stdin), it reads the answer while the body is still unfinished.
struct RawUpload {
    child: Child,
    stdin: Option<ChildStdin>,
    out: PathBuf,
}

impl RawUpload {
    /// Sends the request head `head` (request line and headers, without the blank line);
    /// nothing of the body yet.
    fn start(d: &Deployment, name: &str, head: &str) -> RawUpload {
        let out = d.path(&format!("{name}.raw"));
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(format!("127.0.0.1:{}", d.base_port))
            .arg("-CAfile")
            .arg(d.path("pki/ca.pem"))
            .arg("-cert")
            .arg(d.path("pki/hospital-a.pem"))
            .arg("-key")
            .arg(d.path("pki/hospital-a.key"))
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut up = RawUpload { child, stdin, out };
        up.write(format!("{head}\r\nHost: edge\r\n\r\n").as_bytes());
        up
    }

    fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits (bounded), the body still unfinished, until the edge answers and closes the
    /// connection; what it answered.
    fn answer(mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the connection stayed open for {limit:?}: {:?}",
                    std::fs::read_to_string(&self.out)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(self.stdin.take());
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap()).into_owned()
    }
}

/// Sends SIGTERM to the edge and waits until it says it drains.
fn sigterm(edge: &Service) -> Instant {
    let sent = Instant::now();
    signal(edge.pid(), "TERM").unwrap();
    edge.wait_for_log(&["draining"], Duration::from_secs(20));
    sent
}

/// Waits for the edge to exit (a second SIGTERM during the drain changes nothing); asserts
/// exit 0 and that it stopped within `drain` plus [`EXIT_MARGIN`] of `sent`.
fn exited(edge: Service, sent: Instant, drain: Duration) -> Duration {
    let log = edge.log();
    let status = edge.terminate().unwrap();
    let took = sent.elapsed();
    assert!(status.success(), "edge exit: {status}\n{log}");
    assert!(
        took < drain + EXIT_MARGIN,
        "the edge took {took:?} to stop\n{log}"
    );
    took
}

#[test]
fn sigterm_mid_upload_answers_what_arrives_and_503_to_the_rest_and_a_restart_completes_it() {
    let d = Deployment::new().unwrap();
    let drain = Duration::from_secs(4);
    d.set("edge.toml", "drain", "timeout", "\"4s\"").unwrap();
    d.set("edge.toml", "transport", "chunk_size", "65536")
        .unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let src = d.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let a = payload(&src, "a.dcm", 3 * 1024 * 1024 + 5, 41).unwrap();
    let b = payload(&src, "b.dcm", 2 * 1024 * 1024 + 7, 42).unwrap();
    let c = payload(&src, "c.dcm", 3 * 1024 * 1024 + 11, 43).unwrap();
    let (b_bytes, c_bytes) = (std::fs::read(&b).unwrap(), std::fs::read(&c).unwrap());
    let id = open(&api);
    assert_eq!(api.put("hospital-a", &id, "a.dcm", &a, &[]).status, 201);

    // Two uploads under way when SIGTERM comes: b's body ends during the drain, c's never.
    let mut b_up = Streaming::start(&d, &id, "b.dcm");
    let head = format!(
        "PUT /v1/transfers/{id}/files/c.dcm HTTP/1.1\r\nContent-Length: {}",
        c_bytes.len()
    );
    let mut c_up = RawUpload::start(&d, "c.dcm", &head);
    // And a STOW-RS request: its first instance arrives whole, the second never ends.
    let stow_files = [1, 2].map(|n| {
        dicom(
            &src,
            &format!("s{n}.dcm"),
            "P-0001",
            &format!("1.2.826.0.1.3680043.10.543.77.{n}"),
            false,
            512 * 1024,
        )
    });
    let stow_body = std::fs::read(multipart(&src, &[&stow_files[0], &stow_files[1]])).unwrap();
    let head = format!(
        "POST /dicom-web/studies HTTP/1.1\r\nContent-Type: multipart/related; \
         type=\"application/dicom\"; boundary=BAYLINK-TEST-b0undary\r\nContent-Length: {}",
        stow_body.len()
    );
    let mut stow_up = RawUpload::start(&d, "stow", &head);
    stow_up.write(&stow_body[..stow_body.len() - 200 * 1024]);
    b_up.write(&b_bytes[..1024 * 1024]);
    c_up.write(&c_bytes[..1024 * 1024]);
    let start = Instant::now();
    while partial_uploads(&d) < 2 || stow_payload(&d, &id).is_empty() {
        assert!(
            start.elapsed() < DEADLINE,
            "the uploads never reached the spool"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = sigterm(&edge);
    edge.wait_for_log(&["hospital API: listener closed"], Duration::from_secs(20));
    edge.wait_for_log(&["SCP: listener closed"], Duration::from_secs(20));

    // Draining: STOPPING=1, not ready, new connections refused at once on both doors.
    assert!(
        edge.notified("STOPPING=1", Duration::from_secs(10)),
        "STOPPING=1 was not sent"
    );
    assert_eq!(d.healthz(false).unwrap(), 503, "/healthz while draining");
    refused(d.base_port, "a new HTTPS connection during the drain");
    refused(d.base_port + 4, "a new DICOM association during the drain");
    // The upload in progress goes on and is answered: durable, so 201.
    b_up.write(&b_bytes[1024 * 1024..]);
    let (status, _) = b_up.answer(Duration::from_secs(30));
    assert_eq!(
        status,
        201,
        "an upload finished during the drain\n{}",
        edge.log()
    );
    // c is still arriving when the drain ends: 503 with Retry-After, not a success.
    // c and the STOW-RS request are still arriving when the drain ends: 503 with
    // Retry-After, not a success.
    for (what, up) in [("c.dcm", c_up), ("STOW-RS", stow_up)] {
        let answer = up.answer(drain + Duration::from_secs(30));
        assert!(
            answer.starts_with("HTTP/1.1 503"),
            "{what}, cut by the drain's end: {answer:?}\n{}",
            edge.log()
        );
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 30"),
            "{answer}"
        );
    }
    let log = edge.log();
    let took = exited(edge, sent, drain);
    assert!(took >= drain - Duration::from_millis(500), "{took:?}");
    assert!(log.contains("upload cut off by the shutdown"), "{log}");

    // After a restart the transfer is open with a and b; c is sent again and all arrive.
    let _edge = d.serve(&d.edge_config()).unwrap();
    let s = api.status("hospital-a", &id).json();
    assert_eq!(s["state"], "receiving", "{s}");
    assert_eq!(s["files"], 2, "{s}");
    assert_eq!(
        partial_uploads(&d),
        0,
        "the cut upload's partial file is gone"
    );
    assert_eq!(
        stow_payload(&d, &id),
        Vec::<PathBuf>::new(),
        "nothing of the cut STOW-RS request is kept"
    );
    assert_eq!(api.put("hospital-a", &id, "c.dcm", &c, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    api.wait_state(&id, "committed");
    for (name, f) in [("a.dcm", &a), ("b.dcm", &b), ("c.dcm", &c)] {
        let got = d.wait_delivered(&id, name, DEADLINE);
        assert_eq!(
            sha256_file(f).unwrap(),
            sha256_file(&got).unwrap(),
            "{name}"
        );
    }
}

/// `baylink_bytes_total{direction="received"}` of the gateway.
fn gateway_received(d: &Deployment) -> u64 {
    d.metrics(true)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("baylink_bytes_total{direction=\"received\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn sigterm_mid_send_stops_it_and_the_restart_resumes_from_the_gateways_chunks() {
    const SIZE: u64 = 192 << 20;
    let d = Deployment::new().unwrap();
    let drain = Duration::from_secs(2);
    d.set("edge.toml", "drain", "timeout", "\"2s\"").unwrap();
    // Sent after the commit, so that the send is half-way on the link when the drain comes
    // (streamed while it was uploaded, it could all be at the gateway before the commit).
    d.set("edge.toml", "transport", "stream_while_sealing", "false")
        .unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let big = payload(d.dir.path(), "big.bin", SIZE, 51).unwrap();
    let id = open(&api);
    assert_eq!(api.put("hospital-a", &id, "big.bin", &big, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &id).status, 202);

    // Once the gateway holds some of it, freeze the gateway: the send cannot finish within
    // the drain, whatever the machine's speed.
    let start = Instant::now();
    while gateway_received(&d) < 16 << 20 {
        assert!(start.elapsed() < DEADLINE, "the send never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(gateway.pid(), "STOP").unwrap();
    let sent = sigterm(&edge);
    edge.wait_for_log(&["drain timeout"], Duration::from_secs(20));
    let log = edge.log();
    exited(edge, sent, drain);
    signal(gateway.pid(), "CONT").unwrap();
    assert!(
        log.contains("send stopped by the drain"),
        "the send was stopped by the drain\n{log}"
    );
    assert!(!log.contains("transfer not sent"), "{log}");

    // The restart resumes it: the gateway offers back the chunks it holds, and the edge sends
    // only the rest.
    let edge = d.serve(&d.edge_config()).unwrap();
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, "big.bin", DEADLINE);
    assert_eq!(sha256_file(&big).unwrap(), sha256_file(&got).unwrap());
    let glog = gateway.log();
    let offers: Vec<&str> = glog
        .lines()
        .filter(|l| l.contains("offer accepted") && l.contains(&id))
        .collect();
    assert!(offers.len() >= 2, "{glog}");
    let have = log_number(offers.last().unwrap(), "have");
    assert!(have > 0, "the resumed offer started over: {glog}");
    let receipted = edge.wait_for_log(&["transfer receipted", &id], DEADLINE);
    let wire = log_number(&receipted, "wire_bytes");
    assert!(
        wire < SIZE,
        "resume sent everything again: {wire} of {SIZE}"
    );
}

/// A hospital transfer that streamed while it was uploaded hands its connection to the send
/// once its chunk streams have ended. With the gateway frozen they never end; the drain still
/// stops that send (it waits within the send's stops), and a restart delivers the transfer.
#[test]
fn sigterm_stops_a_send_waiting_for_its_streamed_chunks_and_the_restart_delivers_it() {
    let d = Deployment::new().unwrap();
    let drain = Duration::from_secs(2);
    d.set("edge.toml", "drain", "timeout", "\"2s\"").unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let big = payload(d.dir.path(), "big.bin", 192 << 20, 52).unwrap();
    let id = open(&api);
    assert_eq!(api.put("hospital-a", &id, "big.bin", &big, &[]).status, 201);
    // Once the gateway has staged some of it, freeze the gateway: chunk streams stay under
    // way, and the commit's send waits for them.
    super::dicom::wait_staged(&d, &gateway, 16 << 20, DEADLINE);
    signal(gateway.pid(), "STOP").unwrap();
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    api.wait_state(&id, "sending");
    let sent = sigterm(&edge);
    edge.wait_for_log(&["send stopped by the drain"], Duration::from_secs(20));
    let log = edge.log();
    exited(edge, sent, drain);
    signal(gateway.pid(), "CONT").unwrap();
    assert!(!log.contains("transfer not sent"), "{log}");

    let _edge = d.serve(&d.edge_config()).unwrap();
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, "big.bin", DEADLINE);
    assert_eq!(sha256_file(&big).unwrap(), sha256_file(&got).unwrap());
}

#[test]
fn sigterm_mid_association_lets_it_store_on_then_aborts_it_and_every_success_is_delivered() {
    let d = Deployment::new().unwrap();
    let drain = Duration::from_secs(4);
    d.set("edge.toml", "drain", "timeout", "\"4s\"").unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let src = d.path("instances");
    let ds: Vec<Vec<u8>> = (1..=12)
        .map(|n| data_set(&instance(&src, n, Some("P-0001"))))
        .collect();
    let store = |scu: &mut RawScu, ns: std::ops::RangeInclusive<u32>| {
        for n in ns {
            let status = scu.store(n as u16, &sop_uid(n), &ds[n as usize - 1]);
            assert_eq!(status, 0x0000, "instance {n} answered Success");
        }
    };

    // Association a is released during the drain; b is still open when the drain ends.
    let mut a = RawScu::associate(&d, "HOSPITAL-A");
    let mut b = RawScu::associate(&d, "HOSPITAL-A");
    store(&mut a, 1..=3);
    store(&mut b, 7..=9);
    let sent = sigterm(&edge);
    edge.wait_for_log(&["SCP: listener closed"], Duration::from_secs(20));
    refused(d.base_port + 4, "a new association during the drain");
    // The running associations go on: C-STOREs during the drain are answered Success.
    store(&mut a, 4..=6);
    a.release();
    store(&mut b, 10..=12);
    // b stays silent: at the drain's end the edge aborts it.
    assert_eq!(b.wait_for_end(), Some(0x07), "A-ABORT at the drain's end");
    let log = edge.log();
    let took = exited(edge, sent, drain);
    assert!(took >= drain - Duration::from_millis(500), "{took:?}");
    assert!(log.contains("association released"), "{log}");
    assert!(
        log.contains("association aborted") && log.contains("association_end=edge-shutdown"),
        "{log}"
    );

    // a was sent during the drain; b (sealed at the abort) is sent after the restart.
    let names = |ns: std::ops::RangeInclusive<u32>| -> Vec<String> {
        ns.map(|n| format!("{}.dcm", sop_uid(n))).collect()
    };
    let edge = d.serve(&d.edge_config()).unwrap();
    for (ns, end) in [(1..=6, "released"), (7..=12, "edge-shutdown")] {
        let t = wait_for_delivery(&d, &names(ns.clone()), &edge);
        for n in ns {
            let got = t.join(format!("{}.dcm", sop_uid(n)));
            assert!(data_set(&got) == ds[n as usize - 1], "instance {n}");
        }
        let id = t.file_name().unwrap().to_string_lossy().into_owned();
        let status: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.path("spool/edge").join(&id).join("status.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(status["association_end"], end, "{status}");
    }
}
