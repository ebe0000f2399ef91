//! C-STORE over TLS (`ingest.dicom_tls_listen`, dev-env port N+5), driven by dcmtk's
//! `storescu`/`echoscu` with `+tls` (OpenSSL) and the dev-env's hospital certificates: the
//! client certificate must chain to `tls.ca`, its CN is the hospital, and the calling AE title
//! must be an `ingest.dicom_peers` entry of that hospital (the entry's address is not
//! checked there). The plain port's protections hold on this one too.

use std::process::Command;
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, EVENT_WAIT, Service, signal};

use super::dicom::{
    RawScu, data_set, delivered_transfers, dump, instance, run, scu, sop_uid, spool_transfers,
    store_responses, text, wait_for_delivery,
};
use super::slots::{all_closed_by, idle_sockets, refused};

/// A dcmtk SCU on the TLS port; `identity` is the dev-env certificate it presents
/// (`pki/<name>.key`, `pki/<name>.pem`), `None`: none (anonymous TLS).
pub(super) fn tls_scu(
    tool: &str,
    d: &Deployment,
    calling: &str,
    identity: Option<&str>,
) -> Command {
    let mut c = Command::new(tool);
    c.args([
        "-aet", calling, "-aec", "BAYLINK", "-to", "20", "-ta", "20", "-td", "20",
    ]);
    match identity {
        Some(name) => {
            c.arg("+tls")
                .arg(d.path(&format!("pki/{name}.key")))
                .arg(d.path(&format!("pki/{name}.pem")));
        }
        None => {
            c.arg("+tla");
        }
    }
    // The edge's certificate is verified against the deployment CA.
    c.arg("+cf").arg(d.path("pki/ca.pem"));
    c.arg("127.0.0.1").arg(tls_port(d).to_string());
    c
}

pub(super) fn tls_port(d: &Deployment) -> u16 {
    d.base_port + 5
}

fn start(d: &Deployment) -> (Service, Service) {
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let edge = d.serve(&d.edge_config()).expect("edge starts");
    (gateway, edge)
}

/// Lines of the edge log containing every one of `needles`.
fn log_lines(edge: &Service, needles: &[&str]) -> usize {
    edge.log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[test]
fn stored_over_tls_is_delivered_byte_identical() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let files: Vec<_> = (1..=2).map(|n| instance(&src, n, Some("P-0001"))).collect();

    let out = run(tls_scu("storescu", &d, "STORESCU", Some("hospital-a"))
        .arg("-v")
        .args(&files));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(store_responses(&t, "Success"), 2, "{t}");

    let names: Vec<_> = (1..=2).map(|n| format!("{}.dcm", sop_uid(n))).collect();
    let delivered = wait_for_delivery(&d, &names, &edge);
    assert_eq!(
        delivered_transfers(&d).len(),
        1,
        "one association, one transfer"
    );
    for (n, src) in (1..=2).zip(&files) {
        let got = delivered.join(format!("{}.dcm", sop_uid(n)));
        // The SCP writes its own meta group (as on the plain port); the data set must be
        // byte-identical, the negotiated transfer syntax being the file's.
        assert_eq!(data_set(&got), data_set(src), "data set of instance {n}");
        assert!(
            dump(&got).contains("(0002,0010) UI =LittleEndianExplicit"),
            "{}",
            dump(&got)
        );
    }
    assert_eq!(
        log_lines(
            &edge,
            &[
                "association accepted",
                "door=\"dicom-tls\"",
                "hospital=hospital-a"
            ]
        ),
        1,
        "{}",
        edge.log()
    );
}

#[test]
fn clients_without_a_certificate_of_the_deployment_ca_are_refused_in_the_handshake() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let f = instance(&d.path("instances"), 1, Some("P-0001"));

    // No client certificate, a certificate of another CA naming a known hospital, and plain
    // DICOM on the TLS port: none gets as far as an association.
    let attempts = [
        ("no certificate", tls_scu("storescu", &d, "STORESCU", None)),
        (
            "another CA",
            tls_scu("storescu", &d, "STORESCU", Some("rogue")),
        ),
        ("plain DICOM", {
            let mut c = scu("storescu", &d, "STORESCU", "BAYLINK");
            // `scu` ends with the plain port; replace it with the TLS port.
            let mut args: Vec<_> = c.get_args().map(ToOwned::to_owned).collect();
            args.pop();
            c = Command::new("storescu");
            c.args(args).arg(tls_port(&d).to_string());
            c
        }),
    ];
    for (what, mut cmd) in attempts {
        let out = run(cmd.arg("-v").arg(&f));
        let t = text(&out);
        assert!(!out.status.success(), "{what}: {t}");
        assert!(!t.contains("Association Accepted"), "{what}: {t}");
        assert_eq!(store_responses(&t, "Success"), 0, "{what}: {t}");
    }
    assert_eq!(
        log_lines(&edge, &["DICOM TLS handshake refused"]),
        3,
        "{}",
        edge.log()
    );
    assert_eq!(log_lines(&edge, &["association accepted"]), 0);
    assert_eq!(spool_transfers(&d), 0, "nothing reached the spool");

    // The door still serves a hospital with its certificate.
    let out = run(&mut tls_scu("echoscu", &d, "STORESCU", Some("hospital-a")));
    assert!(out.status.success(), "{}", text(&out));
    assert!(delivered_transfers(&d).is_empty());
}

#[test]
fn the_certificate_names_the_hospital_and_replaces_the_address() {
    let d = Deployment::new().unwrap();
    // A peer of hospital-a listed with an address the test never connects from.
    let mut toml = std::fs::read_to_string(d.edge_config()).unwrap();
    toml.push_str(
        "\n[[ingest.dicom_peers]]\nae_title = \"REMOTE-CT\"\naddress = \"192.0.2.7\"\n\
         hospital = \"hospital-a\"\n",
    );
    std::fs::write(d.edge_config(), toml).unwrap();
    let (_gateway, edge) = start(&d);
    let f = instance(&d.path("instances"), 1, Some("P-0001"));

    // hospital-b's certificate calling as hospital-a's STORESCU: A-ASSOCIATE-RJ.
    let out = run(tls_scu("storescu", &d, "STORESCU", Some("hospital-b"))
        .arg("-v")
        .arg(&f));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("Calling AE Title Not Recognized"), "{t}");
    assert_eq!(
        log_lines(
            &edge,
            &[
                "association rejected",
                "not an ingest.dicom_peers entry of the certificate's hospital",
                "calling_ae=\"STORESCU\"",
                "certificate_cn=hospital-b",
            ]
        ),
        1,
        "{}",
        edge.log()
    );
    // An AE title no peer has, with a good certificate: rejected as well.
    let out = run(&mut tls_scu("echoscu", &d, "INTRUDER", Some("hospital-a")));
    assert!(
        text(&out).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&out)
    );

    // REMOTE-CT's listed address is not checked on the TLS port (the certificate is), and it
    // is on the plain port.
    let out = run(&mut tls_scu("echoscu", &d, "REMOTE-CT", Some("hospital-a")));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&mut scu("echoscu", &d, "REMOTE-CT", "BAYLINK"));
    assert!(
        text(&out).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&out)
    );
    assert_eq!(spool_transfers(&d), 0, "nothing reached the spool");
}

#[test]
fn the_tls_port_is_time_boxed_capped_per_source_and_shares_the_slots() {
    const HANDSHAKE: Duration = Duration::from_secs(4);
    const PER_SOURCE: usize = 32;
    const IDLE: usize = 50;
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "ingest", "handshake_timeout", "\"4s\"")
        .unwrap();
    d.set("edge.toml", "ingest", "dicom_max_associations", "1")
        .unwrap();
    let (_gateway, edge) = start(&d);

    // Idle sockets from another address: beyond its budget closed at once, the rest when the
    // handshake time is up; a hospital is served meanwhile.
    let opened = Instant::now();
    let mut idle = idle_sockets("127.0.0.2", tls_port(&d), IDLE);
    let f = instance(&d.path("instances"), 1, Some("P-0001"));
    let out = run(tls_scu("storescu", &d, "STORESCU", Some("hospital-a"))
        .args(["-to", "3", "-ta", "3", "-td", "3", "-v"])
        .arg(&f));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(store_responses(&t, "Success"), 1, "{t}");
    assert!(opened.elapsed() < HANDSHAKE, "{:?}", opened.elapsed());
    all_closed_by(
        &mut idle,
        opened + HANDSHAKE + Duration::from_secs(5),
        "127.0.0.2",
    );
    // A count may trail its close by a moment: read until both are in (bounded).
    let counted = Instant::now();
    let counts = || {
        (
            refused(&d, "dicom-tls", "unidentified-per-source"),
            refused(&d, "dicom-tls", "handshake-timeout"),
        )
    };
    let want = ((IDLE - PER_SOURCE) as u64, PER_SOURCE as u64);
    while counts() != want && counted.elapsed() < EVENT_WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        counts(),
        want,
        "(unidentified-per-source, handshake-timeout)"
    );
    wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(1))], &edge);

    // The only slot held by an association on the plain port: a hospital identified on the
    // TLS port is answered rejected-transient (try again later).
    let held = RawScu::associate(&d, "HOSPITAL-A");
    let out = run(&mut tls_scu("echoscu", &d, "STORESCU", Some("hospital-a")));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("Rejected Transient"), "{t}");
    assert!(refused(&d, "dicom-tls", "busy") >= 1);
    held.release();
    let out = run(&mut tls_scu("echoscu", &d, "STORESCU", Some("hospital-a")));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn the_drain_closes_the_tls_port() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    // An open association keeps the drain going.
    let held = RawScu::associate(&d, "HOSPITAL-A");
    signal(edge.pid(), "TERM").unwrap();
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", tls_port(&d))) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "the TLS port still accepts during the drain"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    assert!(
        edge.log()
            .contains("DICOM C-STORE SCP: listener closed for the drain")
    );
    held.release();
    let status = edge.terminate().unwrap();
    assert!(status.success(), "{status:?}");
}
