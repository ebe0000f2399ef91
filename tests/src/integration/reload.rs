//! SIGHUP reloads `tls.cert`, `tls.key` and `tls.ca` on both roles: new handshakes use the
//! renewed certificate, transfers and uploads in progress finish unharmed, and a reload that
//! does not load (a certificate that is not the key's, a missing file) keeps the old
//! configuration serving.
//!
//! The renewed certificates come from a second CA ("renewal CA") for the same HSM-held keys,
//! so a peer that trusts only the new CA proves which certificate was served.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baylink::pki::{Authority, LeafKind};
use baylink_tests::{Deployment, Service, payload, sha256_file, signal};

use crate::ingest::{Api, files_under};

const WAIT: Duration = Duration::from_secs(60);
const RELOADED: &str = "TLS reloaded";
const NOT_RELOADED: &str = "TLS not reloaded";
const GOOD: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

/// DER SubjectPublicKeyInfo of a PEM certificate's key (via openssl).
fn spki_of(cert: &Path) -> Vec<u8> {
    let pem = Command::new("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    assert!(pem.status.success());
    let mut child = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &pem.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// A certificate for `side`'s HSM-held TLS key (same subject) from `ca`, written over
/// `pki/<side>.pem`; returns it (PEM).
fn renew(d: &Deployment, ca: &Authority, side: &str) -> String {
    let path = d.path(&format!("pki/{side}.pem"));
    let pem = ca
        .issue_for(side, LeafKind::Appliance, &spki_of(&path))
        .unwrap();
    std::fs::write(&path, &pem).unwrap();
    pem
}

/// Waits until `needle` is in `n` lines of the service's log.
fn wait_count(s: &Service, needle: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    while s.log().lines().filter(|l| l.contains(needle)).count() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} lines with {needle:?}:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `baylink_tls_reloads_total{outcome=...}` in the Prometheus text.
fn reloads(text: &str, outcome: &str) -> f64 {
    let prefix = format!("baylink_tls_reloads_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn send_one(d: &Deployment, gateway: &Service, seed: u64) {
    let src = d.path(&format!("small-{seed}"));
    std::fs::create_dir_all(&src).unwrap();
    let file = payload(&src, "scan.dcm", 200_000, seed).unwrap();
    let (_, id) = d.send_ok(&[&file], gateway);
    let got = d.wait_delivered(&id, "scan.dcm", WAIT);
    assert_eq!(sha256_file(&file).unwrap(), sha256_file(&got).unwrap());
}

#[test]
fn gateway_reload_renews_its_certificate_without_dropping_a_transfer() {
    let d = Deployment::new().unwrap();
    // The gateway's trust gets its own file: the edge's `pki/ca.pem` will trust the renewal
    // CA only, the gateway keeps trusting the edge's issuer.
    std::fs::copy(d.path("pki/ca.pem"), d.path("pki/gateway-ca.pem")).unwrap();
    d.set("gateway.toml", "tls", "ca", "\"pki/gateway-ca.pem\"")
        .unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let before = d.metrics(true).unwrap();
    assert_eq!(reloads(&before, "ok"), 0.0);
    assert_eq!(reloads(&before, "failed"), 0.0);

    let src = payload(d.dir.path(), "series.bin", 256 << 20, 31).unwrap();
    let mut sender = d.spawn_send(&src, true).unwrap();
    d.wait_for_gateway_progress(&mut sender);

    let renewal = Authority::new("renewal CA").unwrap();
    renew(&d, &renewal, "gateway");
    signal(gateway.pid(), "HUP").unwrap();
    let line = gateway.wait_for_log(&[RELOADED, "CN=gateway", "not_after"], WAIT);
    // The transfer was still in flight when the new configuration took effect.
    let log = gateway.log();
    let lines: Vec<&str> = log.lines().collect();
    let at = lines.iter().position(|l| l.contains(RELOADED)).unwrap();
    let done = lines
        .iter()
        .position(|l| l.contains("committed") && l.contains("bytes="));
    assert!(
        done.is_none_or(|done| at < done),
        "the send finished before the reload: {log}"
    );
    let out = sender.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "in-flight send: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    let id = baylink_tests::summary(&out).unwrap()["transfer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let got = d.wait_delivered(&id, "series.bin", WAIT);
    assert_eq!(sha256_file(&src).unwrap(), sha256_file(&got).unwrap());

    // A new send trusts only the renewal CA: it gets through only if the gateway serves the
    // renewed certificate.
    std::fs::write(d.path("pki/ca.pem"), renewal.cert_pem()).unwrap();
    send_one(&d, &gateway, 32);
    let after = d.metrics(true).unwrap();
    assert_eq!(reloads(&after, "ok"), 1.0, "{line}");
    assert_eq!(reloads(&after, "failed"), 0.0);
    assert!(gateway.terminate().unwrap().success());
}

#[test]
fn a_broken_reload_names_the_key_and_the_old_configuration_keeps_serving() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let cert = d.path("pki/gateway.pem");
    let good = std::fs::read(&cert).unwrap();

    // A certificate that is not the HSM key's.
    std::fs::copy(d.path("pki/hospital-a.pem"), &cert).unwrap();
    signal(gateway.pid(), "HUP").unwrap();
    let line = gateway.wait_for_log(&[NOT_RELOADED], WAIT);
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("tls.cert"), "{line}");
    assert!(line.contains("tls.key"), "{line}");
    assert_eq!(reloads(&d.metrics(true).unwrap(), "failed"), 1.0);
    send_one(&d, &gateway, 41);

    // A missing file.
    std::fs::remove_file(&cert).unwrap();
    signal(gateway.pid(), "HUP").unwrap();
    wait_count(&gateway, NOT_RELOADED, 2);
    let line = gateway
        .log()
        .lines()
        .filter(|l| l.contains(NOT_RELOADED))
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(line.contains("tls.cert: cannot read"), "{line}");
    let m = d.metrics(true).unwrap();
    assert_eq!(reloads(&m, "failed"), 2.0);
    assert_eq!(reloads(&m, "ok"), 0.0);
    send_one(&d, &gateway, 42);

    // Fixed: the next SIGHUP loads.
    std::fs::write(&cert, good).unwrap();
    signal(gateway.pid(), "HUP").unwrap();
    wait_count(&gateway, RELOADED, 1);
    assert_eq!(reloads(&d.metrics(true).unwrap(), "ok"), 1.0);
    assert!(gateway.terminate().unwrap().success());
}

/// The certificate the hospital API serves, as base64 DER (no line breaks), via
/// `openssl s_client` with hospital-a's certificate.
fn served_certificate(d: &Deployment) -> String {
    served_at(d, d.base_port)
}

/// The certificate the DICOM TLS port (dev-env: base port + 5) serves, likewise.
fn served_by_dicom_tls(d: &Deployment) -> String {
    served_at(d, d.base_port + 5)
}

fn served_at(d: &Deployment, port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(d.path("pki/hospital-a.pem"))
        .arg("-key")
        .arg(d.path("pki/hospital-a.key"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    pem_body(&text)
}

fn pem_body(text: &str) -> String {
    let start = text
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate in {text}"));
    let end = text[start..].find("-----END CERTIFICATE-----").unwrap() + start;
    text[start + "-----BEGIN CERTIFICATE-----".len()..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

#[test]
fn edge_reload_renews_both_hospital_doors_and_the_link_without_dropping_an_upload() {
    let d = Deployment::new().unwrap();
    // The gateway's trust gets its own file: it will trust the renewal CA only, so the
    // transfer after the reload proves the edge connects with its renewed certificate.
    std::fs::copy(d.path("pki/ca.pem"), d.path("pki/gateway-ca.pem")).unwrap();
    d.set("gateway.toml", "tls", "ca", "\"pki/gateway-ca.pem\"")
        .unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let old = std::fs::read_to_string(d.path("pki/edge.pem")).unwrap();
    assert_eq!(served_certificate(&d), pem_body(&old));
    assert_eq!(served_by_dicom_tls(&d), pem_body(&old));

    let a = api.declare("hospital-a", GOOD);
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let src = payload(d.dir.path(), "scan.dcm", 1 << 20, 51).unwrap();
    // A slow upload (about 5 s) in progress across the reload.
    let upload = {
        let (d, id, src) = (&d, id.clone(), src.clone());
        let url = api.url(&format!("/v1/transfers/{id}/files/scan.dcm"));
        let data = format!("@{}", src.display());
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "--limit-rate",
                "200k",
                "--cacert",
            ])
            .arg(d.path("pki/ca.pem"))
            .arg("--cert")
            .arg(d.path("pki/hospital-a.pem"))
            .arg("--key")
            .arg(d.path("pki/hospital-a.key"))
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .args(["--data-binary", &data, &url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let transfer_dir = d.path("spool/edge").join(&id);
    let deadline = Instant::now() + WAIT;
    while !files_under(&transfer_dir)
        .iter()
        .any(|f| f.metadata().is_ok_and(|m| m.len() > 100_000))
    {
        assert!(Instant::now() < deadline, "the upload did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Renew the edge under the renewal CA: the edge trusts both CAs (its hospitals and the
    // gateway keep their certificates), the gateway only the renewal CA.
    let renewal = Authority::new("renewal CA").unwrap();
    let mut bundle = std::fs::read_to_string(d.path("pki/ca.pem")).unwrap();
    bundle.push_str(renewal.cert_pem());
    std::fs::write(d.path("pki/ca.pem"), bundle).unwrap();
    std::fs::write(d.path("pki/gateway-ca.pem"), renewal.cert_pem()).unwrap();
    signal(gateway.pid(), "HUP").unwrap();
    gateway.wait_for_log(&[RELOADED], WAIT);
    let new = renew(&d, &renewal, "edge");
    signal(edge.pid(), "HUP").unwrap();
    edge.wait_for_log(&["policy reloaded"], WAIT);
    edge.wait_for_log(&[RELOADED, "CN=edge"], WAIT);
    assert_eq!(served_certificate(&d), pem_body(&new));
    assert_eq!(served_by_dicom_tls(&d), pem_body(&new));

    let out = upload.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "201",
        "{}",
        edge.log()
    );
    // The edge connects to the gateway with its renewed certificate for this transfer (the
    // gateway now trusts nothing else).
    let c = api.commit("hospital-a", &id);
    assert_eq!(c.status, 202, "{c:?}");
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, "scan.dcm", WAIT);
    assert_eq!(sha256_file(&src).unwrap(), sha256_file(&got).unwrap());
    let m = d.metrics(false).unwrap();
    assert_eq!(reloads(&m, "ok"), 1.0);
    assert!(
        m.lines()
            .any(|l| l.starts_with("baylink_certificate_expiry_seconds") && l.contains("tls.cert")),
        "{m}"
    );
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
}
