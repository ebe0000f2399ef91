//! Connection slots go to identified clients: idle TCP sockets on the HTTPS and C-STORE
//! ports, from another address and from the hospital's own, cost their sender its
//! per-source budget (`ingest.max_unidentified_per_source`) and `ingest.handshake_timeout`,
//! never a hospital's slot; a full house is answered transiently (`503`, A-ASSOCIATE-RJ
//! rejected-transient).

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, Service, payload, sha256_file};

use super::dicom::{instance, run, scu, sop_uid, store_responses, text, wait_for_delivery};
use super::ingest::{Api, DEADLINE};

/// Idle sockets opened on each port.
const IDLE: usize = 200;
/// `ingest.handshake_timeout` in these tests.
const HANDSHAKE: Duration = Duration::from_secs(8);
/// `ingest.max_unidentified_per_source` (the default).
const PER_SOURCE: usize = 32;
/// The longest a hospital request may take while the idle sockets are open: well inside
/// `HANDSHAKE`, so the edge still holds the idle sockets it admitted while it answers.
const PROMPT: &str = "4";

const GOOD: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

/// `n` TCP connections from `source` to `port` on 127.0.0.1 that never send a byte.
pub(super) fn idle_sockets(source: &str, port: u16, n: usize) -> Vec<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let from = SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0);
    rt.block_on(async {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(from).unwrap();
            let s = s.connect(to).await.unwrap();
            let s = s.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            v.push(s);
        }
        v
    })
}

/// Waits until the edge has closed every socket (EOF or reset), by `deadline`; panics naming
/// how many are still open.
pub(super) fn all_closed_by(sockets: &mut [TcpStream], deadline: Instant, what: &str) {
    let mut open = 0;
    for s in sockets.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(_) => panic!("{what}: the edge sent bytes to an idle socket"),
            Err(_) => open += 1,
        }
    }
    assert_eq!(
        open, 0,
        "{what}: {open} idle sockets still open past ingest.handshake_timeout"
    );
}

/// The value of a counter line `name{labels} v` of the edge's metrics (0 when absent).
fn counter(d: &Deployment, series: &str) -> u64 {
    let m = d.metrics(false).unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

pub(super) fn refused(d: &Deployment, door: &str, reason: &str) -> u64 {
    counter(
        d,
        &format!("baylink_ingest_connections_refused_total{{door=\"{door}\",reason=\"{reason}\"}}"),
    )
}

/// A hospital upload (declare, one file, commit) with every request bounded by [`PROMPT`]
/// seconds; returns the transfer id and the uploaded file.
fn prompt_upload(d: &Deployment, n: u64) -> (String, std::path::PathBuf) {
    let api = Api { d };
    let url = api.url("/v1/transfers");
    let a = api.curl(
        Some("hospital-a"),
        &[
            "--max-time",
            PROMPT,
            "-X",
            "POST",
            "--data-binary",
            GOOD,
            &url,
        ],
    );
    assert_eq!(a.status, 201, "declare while idle sockets are open: {a:?}");
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let f = payload(d.dir.path(), &format!("scan{n}.dcm"), 256 * 1024, n).unwrap();
    let r = api.put("hospital-a", &id, "scan.dcm", &f, &["--max-time", PROMPT]);
    assert_eq!(r.status, 201, "upload while idle sockets are open: {r:?}");
    let url = api.url(&format!("/v1/transfers/{id}/commit"));
    let c = api.curl(
        Some("hospital-a"),
        &["--max-time", PROMPT, "-X", "POST", &url],
    );
    assert_eq!(c.status, 202, "commit while idle sockets are open: {c:?}");
    (id, f)
}

/// One storescu association with one instance, its network time-outs bounded by [`PROMPT`].
fn prompt_storescu(d: &Deployment, n: u32) -> std::path::PathBuf {
    let f = instance(&d.path("instances"), n, Some("P-0001"));
    let out = run(scu("storescu", d, "STORESCU", "BAYLINK")
        .args(["-to", PROMPT, "-ta", PROMPT, "-td", PROMPT, "-v"])
        .arg(&f));
    let t = text(&out);
    assert!(
        out.status.success(),
        "storescu while idle sockets are open:\n{t}"
    );
    assert_eq!(store_responses(&t, "Success"), 1, "{t}");
    f
}

fn start(d: &Deployment) -> (Service, Service) {
    d.set(
        "edge.toml",
        "ingest",
        "handshake_timeout",
        &format!("\"{}s\"", HANDSHAKE.as_secs()),
    )
    .unwrap();
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let edge = d.serve(&d.edge_config()).expect("edge starts");
    (gateway, edge)
}

#[test]
fn idle_sockets_do_not_starve_identified_hospitals() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let (https, dicom) = (d.base_port, d.base_port + 4);

    // 200 idle sockets on each port from another address, held open by the client while a
    // hospital on 127.0.0.1 uploads over HTTPS and stores over C-STORE.
    let opened = Instant::now();
    let mut other = idle_sockets("127.0.0.2", https, IDLE);
    other.extend(idle_sockets("127.0.0.2", dicom, IDLE));
    let (id, f) = prompt_upload(&d, 1);
    let dcm = prompt_storescu(&d, 1);
    assert!(
        opened.elapsed() < HANDSHAKE,
        "the hospital was served only after the idle sockets' handshake time: {:?}",
        opened.elapsed()
    );
    // Beyond its per-source budget, 127.0.0.2 was closed at once; the rest is time-boxed.
    for door in ["https", "dicom"] {
        assert_eq!(
            refused(&d, door, "unidentified-per-source"),
            (IDLE - PER_SOURCE) as u64,
            "{door}"
        );
    }
    all_closed_by(
        &mut other,
        opened + HANDSHAKE + Duration::from_secs(5),
        "127.0.0.2",
    );
    for door in ["https", "dicom"] {
        assert_eq!(
            refused(&d, door, "handshake-timeout"),
            PER_SOURCE as u64,
            "{door}"
        );
    }
    let api = Api { d: &d };
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, "scan.dcm", DEADLINE);
    assert_eq!(sha256_file(&f).unwrap(), sha256_file(&got).unwrap());
    let t = wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(1))], &edge);
    assert!(t.join(format!("{}.dcm", sop_uid(1))).exists(), "{dcm:?}");

    // 200 idle sockets on each port from the hospital's own address: the edge closes them
    // all within the handshake time (most at once), and the hospital is served after.
    let opened = Instant::now();
    let mut own = idle_sockets("127.0.0.1", https, IDLE);
    own.extend(idle_sockets("127.0.0.1", dicom, IDLE));
    all_closed_by(
        &mut own,
        opened + HANDSHAKE + Duration::from_secs(5),
        "127.0.0.1",
    );
    let (id, f) = prompt_upload(&d, 2);
    prompt_storescu(&d, 2);
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, "scan.dcm", DEADLINE);
    assert_eq!(sha256_file(&f).unwrap(), sha256_file(&got).unwrap());
    wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(2))], &edge);
    api.healthy();
}

#[test]
fn a_full_house_is_answered_transiently_on_both_doors() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "ingest", "max_connections", "1")
        .unwrap();
    d.set("edge.toml", "ingest", "dicom_max_associations", "1")
        .unwrap();
    let (_gateway, edge) = start(&d);

    // HTTPS: an identified hospital connection holds the only slot (openssl's handshake done,
    // no request); the next hospital gets 503 naming the limit, with Retry-After. The probe
    // runs only once openssl reports its handshake done, and a held connection that lost the
    // race for the slot (a probe's connection still held it) is answered busy and closed:
    // then it is opened again.
    let hold = || {
        let mut child = Command::new("openssl")
            .args(["s_client", "-brief", "-connect"])
            .arg(format!("127.0.0.1:{}", d.base_port))
            .arg("-CAfile")
            .arg(d.path("pki/ca.pem"))
            .arg("-cert")
            .arg(d.path("pki/hospital-a.pem"))
            .arg("-key")
            .arg(d.path("pki/hospital-a.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0 {
            if line.contains("CONNECTION ESTABLISHED") {
                break;
            }
            line.clear();
        }
        (child, stderr)
    };
    let (mut held, mut _held_stderr) = hold();
    // Until openssl holds the slot, the probe is served (404 for an unknown transfer).
    let api = Api { d: &d };
    let probe = api.url("/v1/transfers/00000000000000000000000000");
    let start = Instant::now();
    let a = loop {
        let a = api.curl(Some("hospital-b"), &[&probe]);
        if a.status != 404 {
            break a;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the held connection never took the slot"
        );
        if held.try_wait().unwrap().is_some() {
            (held, _held_stderr) = hold();
        }
    };
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.json()["limit"], "ingest.max_connections", "{a:?}");
    let _ = held.kill();
    let _ = held.wait();

    // C-STORE: a held association takes the only slot; the next identified peer is
    // rejected-transient (try again later), not rejected-permanent.
    let assoc = super::dicom::RawScu::associate(&d, "HOSPITAL-A");
    let out = run(&mut scu("echoscu", &d, "STORESCU", "BAYLINK"));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("Rejected Transient"), "{t}");
    assert!(!t.contains("Rejected Permanent"), "{t}");
    assert!(
        edge.log()
            .contains("association rejected (transient): ingest.dicom_max_associations reached")
    );
    assoc.release();
    // The slot is free again once the held association is gone.
    let out = run(&mut scu("echoscu", &d, "STORESCU", "BAYLINK"));
    assert!(out.status.success(), "{}", text(&out));
}
