//! Storage Commitment (Push Model) on the edge's DICOM door, against a real modality side:
//! pynetdicom sends the N-ACTION and runs the Storage Commitment listener that accepts the
//! N-EVENT-REPORT (`tests/data/dicom/commitment_scu.py`); dcmtk's `storescu` sends the
//! instances; the gateway delivers into a real Orthanc.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, EVENT_WAIT, Orthanc, Service, orthanc_unavailable, skip_if};

use super::deliver_retry::{Answer, StubStore, answer};
use super::dicom::{instance, run, scu, sop_uid};
use super::dicom_tls::{tls_port, tls_scu};

/// The Python with pydicom (Debian's) and pynetdicom (`cargo xtask ci` installs it).
const PYTHON: &str = "/usr/bin/python3";
/// The modality's calling AE title, and its listener's.
const MODALITY: &str = "MODALITY";
const MODALITY_LISTENER: &str = "MODALITY-SC";
/// Failure Reason 0x0112, No such object instance.
const NO_SUCH_OBJECT_INSTANCE: u64 = 0x0112;
/// Failure Reason 0x0110, Processing failure.
const PROCESSING_FAILURE: u64 = 0x0110;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dicom/commitment_scu.py")
}

fn pynetdicom_unavailable() -> Option<String> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import pynetdicom"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| "pynetdicom is not installed for /usr/bin/python3".to_owned())
}

fn skip(with_orthanc: bool) -> bool {
    if skip_if(pynetdicom_unavailable()) {
        return true;
    }
    with_orthanc && skip_if(orthanc_unavailable())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A deployment whose edge lists the modality (calling AE `MODALITY` from 127.0.0.1, its
/// Storage Commitment listener on `listener_port`) and whose gateway delivers by STOW-RS to
/// `store` (an Orthanc's DICOMweb URL).
fn deployment(store: Option<String>, listener_port: u16) -> Deployment {
    deployment_of(Deployment::new().unwrap(), store, listener_port)
}

/// [`deployment`] from the dev-env deployment `d`.
fn deployment_of(d: Deployment, store: Option<String>, listener_port: u16) -> Deployment {
    if let Some(url) = store {
        let gw = "gateway.toml";
        d.set(gw, "delivery", "kind", "\"dicomweb\"").unwrap();
        d.set(gw, "delivery", "url", &format!("\"{url}\"")).unwrap();
        d.set(gw, "delivery", "retry_base", "\"100ms\"").unwrap();
    }
    let mut edge = std::fs::read_to_string(d.edge_config()).unwrap();
    edge.push_str(&format!(
        "\n[[ingest.dicom_peers]]\nae_title = \"{MODALITY}\"\naddress = \"127.0.0.1\"\n\
         hospital = \"hospital-a\"\ncommitment_port = {listener_port}\n\
         commitment_ae_title = \"{MODALITY_LISTENER}\"\n"
    ));
    std::fs::write(d.edge_config(), edge).unwrap();
    d
}

/// The modality's Storage Commitment listener (pynetdicom), killed when dropped.
struct Listener {
    child: Child,
    out: PathBuf,
}

impl Listener {
    fn start(d: &Deployment, port: u16) -> Listener {
        Listener::start_as(d, port, "listener", None)
    }

    /// A listener on `port` writing `<name>.jsonl` and `<name>.log`; over TLS with `tls`
    /// (the names of its key, certificate and client CA under `pki/`).
    fn start_as(d: &Deployment, port: u16, name: &str, tls: Option<[&str; 3]>) -> Listener {
        let out = d.path(&format!("{name}.jsonl"));
        let mut c = Command::new(PYTHON);
        c.arg(script())
            .args([
                "listen",
                "--port",
                &port.to_string(),
                "--ae",
                MODALITY_LISTENER,
            ])
            .arg("--out")
            .arg(&out);
        if let Some(files) = tls {
            c.arg("--tls");
            for f in files {
                c.arg(d.path(&format!("pki/{f}")));
            }
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.path(&format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        // Ready once it accepts TCP connections.
        let deadline = Instant::now() + EVENT_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the listener did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Listener { child, out }
    }

    fn reports(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (a minute at most) for the report of `transaction`.
    fn wait(&self, transaction: &str, edge: &Service) -> serde_json::Value {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            if let Some(r) = self
                .reports()
                .into_iter()
                .find(|r| r["transaction_uid"] == transaction)
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no storage commitment report for {transaction} within {EVENT_WAIT:?}\nedge:\n{}",
                edge.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends the N-ACTION for `uids` (the modality's AE title) on the plain DICOM door; the
/// script's JSON answer.
fn request(
    d: &Deployment,
    transaction: &str,
    uids: &[String],
    same: Option<u64>,
) -> serde_json::Value {
    request_on(d, false, transaction, uids, same)
}

/// As [`request`], on the TLS door when `tls` (the client presenting hospital-a's dev-env
/// certificate, verifying the edge's against the deployment CA).
fn request_on(
    d: &Deployment,
    tls: bool,
    transaction: &str,
    uids: &[String],
    same: Option<u64>,
) -> serde_json::Value {
    request_as(d, MODALITY, tls, transaction, uids, same)
}

/// As [`request_on`], with calling AE title `ae`.
fn request_as(
    d: &Deployment,
    ae: &str,
    tls: bool,
    transaction: &str,
    uids: &[String],
    same: Option<u64>,
) -> serde_json::Value {
    let mut c = Command::new(PYTHON);
    let port = if tls { tls_port(d) } else { d.base_port + 4 };
    c.arg(script()).args([
        "request",
        "--port",
        &port.to_string(),
        "--ae",
        ae,
        "--transaction",
        transaction,
    ]);
    if let Some(s) = same {
        c.args(["--same-association", &s.to_string()]);
    }
    if tls {
        c.arg("--tls")
            .arg(d.path("pki/hospital-a.key"))
            .arg(d.path("pki/hospital-a.pem"))
            .arg(d.path("pki/ca.pem"));
    }
    c.arg("--uids").args(uids);
    let out = run(&mut c);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "commitment_scu.py request: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Sends `files` with storescu as the modality; all must be answered Success.
fn store(d: &Deployment, files: &[PathBuf]) {
    let out = run(scu("storescu", d, MODALITY, "BAYLINK").args(files));
    assert!(
        out.status.success(),
        "storescu: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes instances `numbers` of patient P-0001 and stores them as the modality (all answered
/// Success); returns their SOP Instance UIDs, in order.
fn store_instances(d: &Deployment, numbers: RangeInclusive<u32>) -> Vec<String> {
    let src = d.path("study");
    let files: Vec<PathBuf> = numbers
        .clone()
        .map(|n| instance(&src, n, Some("P-0001")))
        .collect();
    store(d, &files);
    numbers.map(sop_uid).collect()
}

/// A deployment delivering to `store`, the modality's listener, and both appliances running.
struct Running {
    d: Deployment,
    listener: Listener,
    gateway: Service,
    edge: Service,
}

impl Running {
    fn start(store: String) -> Running {
        let port = free_port();
        let d = deployment(Some(store), port);
        let listener = Listener::start(&d, port);
        let gateway = d.serve(&d.gateway_config()).unwrap();
        let edge = d.serve(&d.edge_config()).unwrap();
        Running {
            d,
            listener,
            gateway,
            edge,
        }
    }

    /// Both appliances stop cleanly on SIGTERM.
    fn stop(self) {
        assert!(self.edge.terminate().unwrap().success());
        assert!(self.gateway.terminate().unwrap().success());
    }
}

fn sorted(v: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

fn pending_requests(d: &Deployment) -> usize {
    std::fs::read_dir(d.path("spool/edge/.commitment/pending"))
        .map(|r| {
            r.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

/// (a) Instances delivered into Orthanc: the report, on a new association to the
/// modality's listener, commits every one of them (Event Type 1).
#[test]
fn instances_in_the_record_store_are_committed() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let r = Running::start(orthanc.dicomweb_url());
    let uids = store_instances(&r.d, 61..=63);
    let tx = "1.2.826.0.1.3680043.10.543.9001";
    let answer = request(&r.d, tx, &uids, None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", r.edge.log());

    let report = r.listener.wait(tx, &r.edge);
    assert_eq!(report["event_type"], 1, "{report}");
    assert_eq!(sorted(&report["committed"]), uids, "{report}");
    assert!(report["failed"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(report["calling_ae"], "BAYLINK");
    // Success only once the record store holds them.
    for uid in &uids {
        assert!(orthanc.instance_file(uid).unwrap().is_some(), "{uid}");
    }
    r.edge
        .wait_for_log(&["storage commitment report sent", tx], EVENT_WAIT);
    assert_eq!(pending_requests(&r.d), 0);
    r.stop();
}

/// (b) An instance this edge never received is reported failed at once (0x0112), without
/// any delivery to wait for; one received but not yet delivered does not hold it up in
/// another request.
#[test]
fn an_instance_never_received_is_reported_failed_at_once() {
    if skip(false) {
        return;
    }
    let port = free_port();
    let d = deployment(None, port);
    let listener = Listener::start(&d, port);
    // No gateway: nothing could be delivered anyway.
    let edge = d.serve(&d.edge_config()).unwrap();
    let tx = "1.2.826.0.1.3680043.10.543.9002";
    let never = vec![sop_uid(70), sop_uid(71)];
    let answer = request(&d, tx, &never, None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    let report = listener.wait(tx, &edge);
    assert_eq!(report["event_type"], 2, "{report}");
    assert!(
        report["committed"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let failed = report["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{report}");
    for f in failed {
        assert!(
            never.contains(&f[0].as_str().unwrap().to_owned()),
            "{report}"
        );
        assert_eq!(f[1], NO_SUCH_OBJECT_INSTANCE, "{report}");
    }
    // The listener has the report just before the edge removes the answered request;
    // 'report sent' is logged after the removal.
    edge.wait_for_log(&["storage commitment report sent", tx], EVENT_WAIT);
    assert_eq!(pending_requests(&d), 0);
    assert!(edge.terminate().unwrap().success());
}

/// (c) A request still waiting for its delivery notice survives a kill of the edge and is
/// answered after the restart, once the instances are in the record store.
#[test]
fn a_pending_request_is_answered_after_a_restart() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let port = free_port();
    let d = deployment(Some(orthanc.dicomweb_url()), port);
    let listener = Listener::start(&d, port);
    // The gateway is down: the transfer cannot be delivered, so the request waits.
    let edge = d.serve(&d.edge_config()).unwrap();
    let uids = store_instances(&d, 81..=82);
    let tx = "1.2.826.0.1.3680043.10.543.9003";
    let answer = request(&d, tx, &uids, None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    edge.wait_for_log(&["storage commitment request accepted", tx], EVENT_WAIT);
    assert_eq!(pending_requests(&d), 1);
    edge.kill().unwrap();
    assert!(listener.reports().is_empty(), "{:?}", listener.reports());

    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let report = listener.wait(tx, &edge);
    assert_eq!(report["event_type"], 1, "{report}\n{}", edge.log());
    assert_eq!(sorted(&report["committed"]), uids, "{report}");
    for uid in &uids {
        assert!(orthanc.instance_file(uid).unwrap().is_some(), "{uid}");
    }
    assert!(
        edge.log()
            .contains("storage commitment request pending from before the start")
    );
    edge.wait_for_log(&["storage commitment report sent", tx], EVENT_WAIT);
    assert_eq!(pending_requests(&d), 0);
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
}

/// A modality that keeps the association open and took the SCP role (SCP/SCU Role
/// Selection) gets the report on that association, not on its listener.
#[test]
fn the_report_comes_on_the_same_association_when_the_roles_allow() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let r = Running::start(orthanc.dicomweb_url());
    let uids = store_instances(&r.d, 91..=91);
    let tx = "1.2.826.0.1.3680043.10.543.9004";
    let answer = request(&r.d, tx, &uids, Some(EVENT_WAIT.as_secs()));
    assert_eq!(answer["status"], 0, "{answer}\n{}", r.edge.log());
    let report = &answer["report"];
    assert_eq!(report["transaction_uid"], tx, "{answer}\n{}", r.edge.log());
    assert_eq!(report["event_type"], 1, "{answer}");
    assert_eq!(sorted(&report["committed"]), uids, "{answer}");
    r.edge.wait_for_log(
        &["storage commitment report sent", "same association"],
        EVENT_WAIT,
    );
    assert!(
        r.listener.reports().is_empty(),
        "{:?}",
        r.listener.reports()
    );
    r.stop();
}

/// The TLS door (`ingest.dicom_tls_listen`) serves Storage Commitment as the plain one does:
/// instances stored over TLS by `storescu`, then the request over TLS by pynetdicom (client
/// certificate of the peer's hospital, the edge's certificate verified), answered on that
/// association once Orthanc holds them.
#[test]
fn the_tls_door_answers_a_request_on_its_association() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let d = deployment(Some(orthanc.dicomweb_url()), free_port());
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let src = d.path("study");
    let files: Vec<PathBuf> = (93..95)
        .map(|n| instance(&src, n, Some("P-0001")))
        .collect();
    let out = run(tls_scu("storescu", &d, MODALITY, Some("hospital-a")).args(&files));
    assert!(
        out.status.success(),
        "storescu +tls: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let uids: Vec<String> = (93..95).map(sop_uid).collect();
    let tx = "1.2.826.0.1.3680043.10.543.9005";
    let answer = request_on(&d, true, tx, &uids, Some(EVENT_WAIT.as_secs()));
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    let report = &answer["report"];
    assert_eq!(report["transaction_uid"], tx, "{answer}\n{}", edge.log());
    assert_eq!(report["event_type"], 1, "{answer}");
    assert_eq!(sorted(&report["committed"]), uids, "{answer}");
    for uid in &uids {
        assert!(orthanc.instance_file(uid).unwrap().is_some(), "{uid}");
    }
    let line = edge.wait_for_log(
        &["storage commitment report sent", "same association", tx],
        EVENT_WAIT,
    );
    assert!(line.contains("committed=2"), "{line}");
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
}

/// A request made on the TLS door whose association ended is reported on a new association
/// over TLS (`commitment_tls`): the edge verifies the listener's certificate against
/// `tls.ca` for `commitment_host` and presents its own, which the listener requires. A peer
/// whose listener is reached in the clear gets no report for a request made over TLS: it
/// stays pending, the reason logged, and nothing reaches that listener.
#[test]
fn a_request_made_over_tls_is_reported_over_tls() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let (tls_listen, plain_listen) = (free_port(), free_port());
    let d = with_tls_peer(&orthanc, tls_listen, plain_listen);
    // The listener serves with the gateway's certificate (127.0.0.1, dev-env CA).
    let tls_listener = Listener::start_as(
        &d,
        tls_listen,
        "tls-listener",
        Some(["gateway.key", "gateway.pem", "ca.pem"]),
    );
    let plain_listener = Listener::start_as(&d, plain_listen, "plain-listener", None);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();

    let src = d.path("study");
    let files: Vec<PathBuf> = (96..98)
        .map(|n| instance(&src, n, Some("P-0001")))
        .collect();
    let out = run(tls_scu("storescu", &d, MODALITY, Some("hospital-a")).args(&files));
    assert!(out.status.success(), "storescu +tls: {out:?}");
    let uids: Vec<String> = (96..98).map(sop_uid).collect();
    // No role for the report on the request's association: it goes on a new one.
    let tx = "1.2.826.0.1.3680043.10.543.9006";
    let answer = request_on(&d, true, tx, &uids, None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    let report = tls_listener.wait(tx, &edge);
    assert_eq!(report["event_type"], 1, "{report}");
    assert_eq!(sorted(&report["committed"]), uids, "{report}");
    let line = edge.wait_for_log(
        &[
            "storage commitment report sent",
            "new association over TLS",
            tx,
        ],
        EVENT_WAIT,
    );
    assert!(line.contains("committed=2"), "{line}");

    let tx = "1.2.826.0.1.3680043.10.543.9007";
    let answer = request_as(&d, "CLEARTEXT", true, tx, &uids, None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    let line = edge.wait_for_log(
        &[
            "storage commitment report not delivered",
            tx,
            "only over TLS",
        ],
        EVENT_WAIT,
    );
    assert!(line.contains("commitment_tls"), "{line}");
    assert!(
        plain_listener.reports().is_empty(),
        "{:?}",
        plain_listener.reports()
    );
    assert_eq!(pending_requests(&d), 1);
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
}

/// A deployment (PEM keys) whose edge reports to MODALITY's listener on `tls_listen` over
/// TLS (`commitment_tls`, `commitment_host = "127.0.0.1"`); the entry [`deployment_of`]
/// wrote for it, reporting in the clear to `plain_listen`, is renamed CLEARTEXT.
fn with_tls_peer(orthanc: &Orthanc, tls_listen: u16, plain_listen: u16) -> Deployment {
    let d = deployment_of(
        Deployment::with_tls_key_files().unwrap(),
        Some(orthanc.dicomweb_url()),
        plain_listen,
    );
    let mut edge_toml = std::fs::read_to_string(d.edge_config()).unwrap();
    edge_toml = edge_toml.replace(
        &format!("ae_title = \"{MODALITY}\"\naddress"),
        "ae_title = \"CLEARTEXT\"\naddress",
    );
    edge_toml.push_str(&format!(
        "\n[[ingest.dicom_peers]]\nae_title = \"{MODALITY}\"\naddress = \"127.0.0.1\"\n\
         hospital = \"hospital-a\"\ncommitment_port = {tls_listen}\n\
         commitment_host = \"127.0.0.1\"\ncommitment_ae_title = \"{MODALITY_LISTENER}\"\n\
         commitment_tls = true\n"
    ));
    std::fs::write(d.edge_config(), edge_toml).unwrap();
    d
}

/// The edge verifies the report listener as a client verifies a server: a listener whose
/// certificate does not chain to `tls.ca` (the rogue CA's) gets no report, and the request
/// stays pending with the handshake's failure logged.
#[test]
fn a_report_listener_not_vouched_for_by_tls_ca_gets_nothing() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let (tls_listen, plain_listen) = (free_port(), free_port());
    let d = with_tls_peer(&orthanc, tls_listen, plain_listen);
    let rogue = Listener::start_as(
        &d,
        tls_listen,
        "rogue-listener",
        Some(["rogue.key", "rogue.pem", "ca.pem"]),
    );
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let src = d.path("study");
    let file = instance(&src, 99, Some("P-0001"));
    let out = run(tls_scu("storescu", &d, MODALITY, Some("hospital-a")).arg(&file));
    assert!(out.status.success(), "storescu +tls: {out:?}");
    let tx = "1.2.826.0.1.3680043.10.543.9008";
    let answer = request_on(&d, true, tx, &[sop_uid(99)], None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    let line = edge.wait_for_log(&["storage commitment report not delivered", tx], EVENT_WAIT);
    assert!(
        line.contains("UnknownIssuer") || line.contains("certificate"),
        "{line}"
    );
    assert!(rogue.reports().is_empty(), "{:?}", rogue.reports());
    assert_eq!(pending_requests(&d), 1);
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
}

/// An instance the record store refused is reported failed, with the Storage Commitment
/// reason Processing failure (the store's 0xA900 is a storage status, not a reason a report
/// may carry), and its neighbours of the same transfer are committed.
#[test]
fn an_instance_the_record_store_refused_is_reported_failed() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let orthanc_port = orthanc.port;
    let bad = sop_uid(96);
    let refused = bad.clone();
    // In front of Orthanc: a request carrying the bad instance is refused whole (409) naming
    // it with 0xA900; the gateway sends its neighbours again without it.
    let stub = StubStore::start(Box::new(move |_, seen| {
        if seen.carries(&refused) {
            answer(
                409,
                &[],
                &format!(
                    r#"{{"00081198":{{"vr":"SQ","Value":[{{"00081150":{{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.2"]}},"00081155":{{"vr":"UI","Value":["{refused}"]}},"00081197":{{"vr":"US","Value":[43264]}}}}]}}}}"#
                ),
            )
        } else {
            Answer::Forward(orthanc_port)
        }
    }));
    let r = Running::start(stub.url());
    let uids = store_instances(&r.d, 95..=97);
    let tx = "1.2.826.0.1.3680043.10.543.9006";
    let answer = request(&r.d, tx, &uids, None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", r.edge.log());

    let report = r.listener.wait(tx, &r.edge);
    assert_eq!(
        report["event_type"],
        2,
        "{report}\ngateway:\n{}",
        r.gateway.log()
    );
    assert_eq!(
        sorted(&report["committed"]),
        vec![sop_uid(95), sop_uid(97)],
        "{report}"
    );
    let failed = report["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report}");
    assert_eq!(failed[0][0], bad.as_str(), "{report}");
    assert_eq!(failed[0][1], PROCESSING_FAILURE, "{report}");
    for n in [95, 97] {
        assert!(orthanc.instance_file(&sop_uid(n)).unwrap().is_some(), "{n}");
    }
    assert!(orthanc.instance_file(&bad).unwrap().is_none());
    r.edge
        .wait_for_log(&["storage commitment report sent", tx], EVENT_WAIT);
    assert_eq!(pending_requests(&r.d), 0);
    r.stop();
}

/// With `spool.retain`, the index forgets a transfer once its payload is pruned and its
/// notice stored, never while a request waits on it: the first request is committed, a
/// request after the pruning is answered No such object instance, and the index is empty.
#[test]
fn instances_pruned_from_the_spool_are_forgotten_after_their_report() {
    if skip(true) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let port = free_port();
    let d = deployment(Some(orthanc.dicomweb_url()), port);
    d.set("edge.toml", "spool", "retain", "\"0s\"").unwrap();
    let listener = Listener::start(&d, port);
    // The gateway starts once the request waits, so that nothing is pruned before it.
    let edge = d.serve(&d.edge_config()).unwrap();
    let uids = store_instances(&d, 98..=98);
    let tx = "1.2.826.0.1.3680043.10.543.9007";
    assert_eq!(request(&d, tx, &uids, None)["status"], 0);
    edge.wait_for_log(&["storage commitment request accepted", tx], EVENT_WAIT);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let report = listener.wait(tx, &edge);
    assert_eq!(report["event_type"], 1, "{report}\n{}", edge.log());

    edge.wait_for_log(
        &["storage commitment index: transfers pruned from the spool forgotten"],
        EVENT_WAIT,
    );
    let index = d.path("spool/edge/.commitment/index");
    assert_eq!(std::fs::read_dir(&index).unwrap().count(), 0);
    let tx = "1.2.826.0.1.3680043.10.543.9008";
    assert_eq!(request(&d, tx, &uids, None)["status"], 0);
    let report = listener.wait(tx, &edge);
    assert_eq!(report["event_type"], 2, "{report}");
    assert_eq!(report["failed"][0][1], NO_SUCH_OBJECT_INSTANCE, "{report}");
    // Still in the record store: only the edge's own knowledge of it is gone.
    assert!(orthanc.instance_file(&uids[0]).unwrap().is_some());
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
}

/// A modality whose listener never answers holds up no other peer's report: the edge
/// delivers each peer's reports on its own task. The stuck peer's listener accepts TCP and
/// stays silent, so its report waits for the 30 s association time-out; the other peer's
/// report arrives while it still waits.
#[test]
fn a_silent_modality_does_not_hold_up_another_peers_report() {
    if skip(false) {
        return;
    }
    let port = free_port();
    let d = deployment(None, port);
    // A listener that completes TCP handshakes (the kernel's backlog) and never reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let mut edge_toml = std::fs::read_to_string(d.edge_config()).unwrap();
    edge_toml.push_str(&format!(
        "\n[[ingest.dicom_peers]]\nae_title = \"STUCK\"\naddress = \"127.0.0.1\"\n\
         hospital = \"hospital-a\"\ncommitment_port = {silent_port}\n"
    ));
    std::fs::write(d.edge_config(), edge_toml).unwrap();
    let listener = Listener::start(&d, port);
    let edge = d.serve(&d.edge_config()).unwrap();

    // Instances never received: each report is ready at once.
    let stuck_tx = "1.2.826.0.1.3680043.10.543.9010";
    let answer = request_as(&d, "STUCK", false, stuck_tx, &[sop_uid(110)], None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    edge.wait_for_log(
        &["storage commitment request accepted", stuck_tx],
        EVENT_WAIT,
    );
    let tx = "1.2.826.0.1.3680043.10.543.9011";
    let answer = request(&d, tx, &[sop_uid(111)], None);
    assert_eq!(answer["status"], 0, "{answer}\n{}", edge.log());
    let report = listener.wait(tx, &edge);
    assert_eq!(report["event_type"], 2, "{report}");
    // The stuck peer's delivery has not even timed out yet.
    assert!(
        !edge
            .log()
            .contains("storage commitment report not delivered"),
        "{}",
        edge.log()
    );
    // The other peer's request is removed once its report is answered ('report sent' is
    // logged after the removal); the stuck peer's stays.
    edge.wait_for_log(&["storage commitment report sent", tx], EVENT_WAIT);
    assert_eq!(
        pending_requests(&d),
        1,
        "the stuck peer's request stays pending"
    );
    drop(silent);
    assert!(edge.terminate().unwrap().success());
}
