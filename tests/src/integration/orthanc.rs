//! Delivery into the health-record store: the gateway's `delivery.kind = "dicomweb"` against
//! a real Orthanc with its DICOMweb plugin (STOW-RS), each test with its own Orthanc. The
//! https tests put stunnel in front of it (Debian's Orthanc 1.10 crashes on its own HTTPS).

use std::path::{Path, PathBuf};
use std::time::Duration;

use baylink_tests::{
    Deployment, EVENT_WAIT, Orthanc, Service, TlsProxy, orthanc_unavailable, skip_if,
    stunnel_unavailable,
};

use super::compliance::audit_records;

/// How long a test waits for the gateway to log a step.
const LOG_WAIT: Duration = EVENT_WAIT;
use super::dicom::{instance, sop_uid};

/// A deployment whose gateway delivers to the DICOMweb base `url`, with `extra` more
/// `[delivery]` keys.
fn deployment(url: &str, extra: &[(&str, &str)]) -> Deployment {
    with_delivery(Deployment::new().unwrap(), url, extra)
}

/// Points the gateway of `d` at the DICOMweb base `url`, with `extra` more `[delivery]`
/// keys.
fn with_delivery(d: Deployment, url: &str, extra: &[(&str, &str)]) -> Deployment {
    let gw = "gateway.toml";
    d.set(gw, "delivery", "kind", "\"dicomweb\"").unwrap();
    d.set(gw, "delivery", "url", &format!("\"{url}\"")).unwrap();
    for (key, value) in extra {
        d.set(gw, "delivery", key, value).unwrap();
    }
    d
}

/// Sends `files` as one transfer; returns its id.
fn send(d: &Deployment, files: &[PathBuf], gateway: &Service) -> String {
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    d.send_ok(&files, gateway).1
}

/// The gateway's audit records of `kind` for transfer `id`.
fn gateway_audit(d: &Deployment, kind: &str, id: &str) -> Vec<serde_json::Value> {
    audit_records(d, "gateway")
        .into_iter()
        .filter(|r| r["kind"] == kind && r["transfer"] == id)
        .collect()
}

fn skip() -> bool {
    skip_if(orthanc_unavailable())
}

fn stored_identical(orthanc: &Orthanc, uid: &str, source: &Path) {
    let stored = orthanc
        .instance_file(uid)
        .unwrap()
        .unwrap_or_else(|| panic!("Orthanc has no instance {uid}:\n{}", orthanc.log()));
    assert_eq!(
        stored,
        std::fs::read(source).unwrap(),
        "Orthanc's copy of {uid} differs from {}",
        source.display()
    );
}

#[test]
fn a_study_lands_in_orthanc_byte_identical_in_batches_and_again_harmlessly() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    // Three instances of just over 1 KiB each, at most 2048 bytes per request: one STOW-RS
    // request each.
    let d = deployment(&orthanc.dicomweb_url(), &[("batch_bytes", "2048")]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("study");
    let files: Vec<PathBuf> = (1..=3).map(|n| instance(&src, n, Some("P-0001"))).collect();
    assert!(std::fs::metadata(&files[0]).unwrap().len() > 1024);

    let id = send(&d, &files, &gateway);
    let line = gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    assert!(
        line.contains(&format!(
            "location={}/studies/1.2.826.0.1.3680043.10.543.100",
            orthanc.dicomweb_url()
        )),
        "{line}"
    );
    for (n, f) in (1..=3).zip(&files) {
        stored_identical(&orthanc, &sop_uid(n), f);
    }
    assert_eq!(orthanc.instance_count().unwrap(), 3);
    let marker = d.path(&format!("spool/gateway/{id}/delivered"));
    assert!(
        std::fs::read_to_string(&marker)
            .unwrap()
            .starts_with(&orthanc.dicomweb_url()),
        "the delivered marker names the store"
    );
    assert_eq!(gateway_audit(&d, "delivered", &id).len(), 1);

    // The same instances again in a new transfer (as after a crash between STOW-RS and the
    // `delivered` mark): delivered, nothing duplicated.
    let again = send(&d, &files[..2], &gateway);
    gateway.wait_for_log(&[&again, "delivered"], LOG_WAIT);
    assert_eq!(orthanc.instance_count().unwrap(), 3);
    for (n, f) in (1..=3).zip(&files) {
        stored_identical(&orthanc, &sop_uid(n), f);
    }
}

#[test]
fn content_the_store_refuses_is_set_aside_and_the_queue_moves_on() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let d = deployment(&orthanc.dicomweb_url(), &[]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("in");
    std::fs::create_dir_all(&src).unwrap();
    // Not DICOM at all: refused by the gateway before any request.
    let text = src.join("report.txt");
    std::fs::write(&text, "not an image").unwrap();
    // A Part 10 prefix and garbage after it: Orthanc answers 400 with a STOW-RS answer.
    let garbage = src.join("garbage.dcm");
    let mut bytes = vec![0u8; 128];
    bytes.extend_from_slice(b"DICM");
    bytes.extend_from_slice(&[0x5a; 300]);
    std::fs::write(&garbage, bytes).unwrap();

    let not_dicom = send(&d, std::slice::from_ref(&text), &gateway);
    let refused = send(&d, std::slice::from_ref(&garbage), &gateway);
    let good = instance(&src, 9, Some("P-0001"));
    let after = send(&d, std::slice::from_ref(&good), &gateway);

    let line = gateway.wait_for_log(&[&not_dicom, "undeliverable"], LOG_WAIT);
    assert!(
        line.contains("report.txt is not a DICOM Part 10 file"),
        "{line}"
    );
    let line = gateway.wait_for_log(&[&refused, "undeliverable"], LOG_WAIT);
    assert!(line.contains("the store refused instances (400"), "{line}");
    gateway.wait_for_log(&[&after, "delivered"], LOG_WAIT);
    stored_identical(&orthanc, &sop_uid(9), &good);
    assert_eq!(orthanc.instance_count().unwrap(), 1);

    for id in [&not_dicom, &refused] {
        let reason =
            std::fs::read_to_string(d.path(&format!("spool/gateway/{id}/undeliverable"))).unwrap();
        assert!(reason.contains("undeliverable"), "{reason}");
        assert!(!d.path(&format!("spool/gateway/{id}/delivered")).exists());
        let failed = gateway_audit(&d, "failed", id);
        assert_eq!(failed.len(), 1, "one `failed` record for {id}");
        assert!(
            failed[0]["detail"]
                .as_str()
                .unwrap()
                .contains("undeliverable"),
            "{failed:?}"
        );
    }

    // A restart does not try the set-aside transfers again (start-up recovery queues
    // before the service reports ready).
    gateway.terminate().unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    assert!(
        !gateway
            .log()
            .contains("delivering a transfer committed before the restart"),
        "{}",
        gateway.log()
    );

    // The operator's way to try one again: remove its `undeliverable` file, then SIGHUP.
    // Only that transfer is queued (the delivered one is not delivered twice); here it is
    // still not DICOM, so it is set aside once more, with a second `failed` record.
    std::fs::remove_file(d.path(&format!("spool/gateway/{not_dicom}/undeliverable"))).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let line = gateway.wait_for_log(&["SIGHUP", "delivery queue rescanned"], LOG_WAIT);
    assert!(line.contains("requeued=1"), "{line}");
    gateway.wait_for_log(&[&not_dicom, "undeliverable"], LOG_WAIT);
    assert_eq!(gateway_audit(&d, "failed", &not_dicom).len(), 2);
    assert!(
        !gateway
            .log()
            .contains(&format!("delivered transfer={after}"))
    );
}

#[test]
fn a_store_that_is_down_is_retried_until_it_answers() {
    if skip() {
        return;
    }
    // Orthanc's port is known before it runs: start it after the transfer is committed.
    let placeholder = Orthanc::start().unwrap();
    let url = placeholder.dicomweb_url();
    let port = placeholder.port;
    drop(placeholder);
    let d = deployment(&url, &[]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("study");
    let file = instance(&src, 4, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);
    let line = gateway.wait_for_log(&[&id, "delivery failed"], LOG_WAIT);
    assert!(line.contains("cannot connect"), "{line}");

    let orthanc = Orthanc::start_on(port).unwrap();
    gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    stored_identical(&orthanc, &sop_uid(4), &file);
}

/// Orthanc behind a TLS proxy that requires client certificates from the deployment CA,
/// serving the gateway's own certificate (it names 127.0.0.1) as the store's.
fn tls_store(d: &Deployment, orthanc: &Orthanc) -> TlsProxy {
    let pki = |f: &str| d.path(&format!("pki/{f}"));
    TlsProxy::start(
        &pki("gateway.pem"),
        &pki("gateway.key"),
        &pki("ca.pem"),
        orthanc.port,
        (&pki("gateway.pem"), &pki("gateway.key")),
        "/system",
    )
    .unwrap()
}

/// Orthanc behind stunnel, and a running gateway that delivers to it over https, trusting
/// the deployment's `ca` (a path inside it) and presenting its own certificate.
struct HttpsStore {
    gateway: Service,
    d: Deployment,
    proxy: TlsProxy,
    orthanc: Orthanc,
}

fn https_store(ca: &str) -> HttpsStore {
    let orthanc = Orthanc::start().unwrap();
    let d = Deployment::with_tls_key_files().unwrap();
    let proxy = tls_store(&d, &orthanc);
    let url = format!("https://127.0.0.1:{}/dicom-web", proxy.port);
    let ca = format!("\"{ca}\"");
    let d = with_delivery(
        d,
        &url,
        &[
            ("ca", &ca),
            ("cert", "\"pki/gateway.pem\""),
            ("key", "\"pki/gateway.key\""),
        ],
    );
    let gateway = d.serve(&d.gateway_config()).unwrap();
    HttpsStore {
        gateway,
        d,
        proxy,
        orthanc,
    }
}

fn skip_tls() -> bool {
    skip_if(stunnel_unavailable()) || skip()
}

#[test]
fn an_https_store_gets_the_study_with_the_gateways_client_certificate() {
    if skip_tls() {
        return;
    }
    let HttpsStore {
        gateway,
        d,
        proxy,
        orthanc,
    } = https_store("pki/ca.pem");
    let src = d.path("study");
    let files: Vec<PathBuf> = (5..=6).map(|n| instance(&src, n, Some("P-0001"))).collect();
    let id = send(&d, &files, &gateway);
    let line = gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    // The location is the store's own RetrieveURL (Orthanc does not know its proxy).
    assert!(
        line.contains("/dicom-web/studies/1.2.826.0.1.3680043.10.543.100"),
        "{line}"
    );
    assert!(
        proxy.log().contains("accepted connection"),
        "{}",
        proxy.log()
    );
    for (n, f) in (5..=6).zip(&files) {
        stored_identical(&orthanc, &sop_uid(n), f);
    }
}

#[test]
fn a_store_whose_certificate_is_not_from_delivery_ca_gets_nothing() {
    if skip_tls() {
        return;
    }
    // The rogue certificate stands in for a CA the store's certificate does not chain to.
    // (`proxy` bound, so it lives as long as the test.)
    let HttpsStore {
        gateway,
        d,
        orthanc,
        proxy: _proxy,
    } = https_store("pki/rogue.pem");
    let file = instance(&d.path("study"), 7, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);
    let line = gateway.wait_for_log(&[&id, "delivery failed"], LOG_WAIT);
    assert!(line.contains("TLS handshake with the store"), "{line}");
    assert!(
        !gateway.log().contains("undeliverable"),
        "a TLS failure is retried, not set aside"
    );
    assert_eq!(orthanc.instance_count().unwrap(), 0);
}

/// A hospital upload over HTTPS, delivered by STOW-RS into a real Orthanc: the hospital's
/// long poll reaches `delivered`, and the gateway's signed notice names the transfer, its
/// Merkle root and Orthanc's RetrieveURL.
#[test]
fn delivery_notice_a_hospital_upload_in_orthanc_reaches_delivered() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let d = deployment(&orthanc.dicomweb_url(), &[]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = super::ingest::Api { d: &d };
    let src = d.path("study");
    let file = instance(&src, 41, Some("P-0001"));
    let id = super::notice::upload(&api, "i41.dcm", &file);

    let s = super::notice::wait_settled(&api, &id);
    assert_eq!(
        s["state"],
        "delivered",
        "{s}\ngateway:\n{}\nedge:\n{}",
        gateway.log(),
        edge.log()
    );
    stored_identical(&orthanc, &sop_uid(41), &file);
    let a = api.curl(
        Some("hospital-a"),
        &[&api.url(&format!("/v1/transfers/{id}/delivery"))],
    );
    assert_eq!(a.status, 200, "{a:?}");
    let n = &a.json()["fields"];
    assert_eq!(n["outcome"], "delivered");
    assert_eq!(n["transfer_id"], id.as_str());
    assert_eq!(n["merkle_root"], s["receipt"]["merkle_root"]);
    assert!(
        n["answer"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/studies/", orthanc.dicomweb_url())),
        "{n}"
    );
    assert_eq!(super::notice::notified(&d, &id).len(), 1);
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
    super::notice::audit_verifies(&d.edge_config());
}
