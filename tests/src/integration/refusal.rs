//! Refusals through the `send` command line: policy, HSM and keys. Each is final, exits
//! non-zero with one line naming the cause, and delivers nothing.

use baylink_tests::{Deployment, payload};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn nothing_delivered(d: &Deployment) {
    let n = std::fs::read_dir(d.path("delivered")).unwrap().count();
    assert_eq!(n, 0, "something reached the delivery directory");
}

fn small_file(d: &Deployment) -> String {
    payload(d.dir.path(), "scan.dcm", 100_000, 1)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn patient_without_consent_is_refused_by_rule() {
    let d = Deployment::new().unwrap();
    let f = small_file(&d);
    let out = d.send(&["--patient", "P-0099", &f]).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused: no consent for patient P-0099"),
        "{}",
        stderr(&out)
    );
    // Refused before anything was sealed.
    assert_eq!(baylink_tests::spool_entries(&d.path("spool/edge")).len(), 0);
}

#[test]
fn negative_listed_category_is_refused() {
    let d = Deployment::new().unwrap();
    let f = small_file(&d);
    let out = d.send(&["--category", "genetic-data", &f]).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("negative list"), "{}", stderr(&out));
}

#[test]
fn wrong_pin_fails_closed_naming_the_pkcs11_call() {
    let d = Deployment::new().unwrap();
    std::fs::write(d.path("secrets/edge.pin"), "000000").unwrap();
    let f = small_file(&d);
    let out = d.send(&[&f]).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("C_Login: CKR_PIN_INCORRECT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_key_label_fails_closed() {
    let d = Deployment::new().unwrap();
    let text = std::fs::read_to_string(d.edge_config()).unwrap();
    std::fs::write(
        d.edge_config(),
        text.replace(
            "key_label = \"baylink-signing\"",
            "key_label = \"no-such-key\"",
        ),
    )
    .unwrap();
    let out = d.send(&[&small_file(&d)]).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-key"), "{}", stderr(&out));
}

#[test]
fn missing_module_fails_closed() {
    let d = Deployment::new().unwrap();
    let text = std::fs::read_to_string(d.edge_config()).unwrap();
    let module = "/usr/lib/softhsm/libsofthsm2.so";
    std::fs::write(
        d.edge_config(),
        text.replace(module, "/nonexistent/libpkcs11.so"),
    )
    .unwrap();
    let out = d.send(&[&small_file(&d)]).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/libpkcs11.so"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn manifest_signed_by_an_unpinned_key_is_refused_by_the_gateway() {
    let d = Deployment::new().unwrap();
    // The gateway now pins its own key as "the edge's": the real edge's signature fails.
    std::fs::copy(d.path("keys/gateway.pub.pem"), d.path("keys/edge.pub.pem")).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let out = d.send(&[&small_file(&d)]).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("gateway refused")
            && stderr(&out).contains("manifest signature does not verify"),
        "{}",
        stderr(&out)
    );
    assert!(gw.terminate().unwrap().success());
    nothing_delivered(&d);
    assert_eq!(
        baylink_tests::spool_entries(&d.path("spool/gateway")).len(),
        0
    );
}

#[test]
fn receipt_from_an_unpinned_key_is_refused_by_the_edge() {
    let d = Deployment::new().unwrap();
    // The edge pins its own key as "the gateway's": the real receipt cannot verify.
    std::fs::copy(d.path("keys/edge.pub.pem"), d.path("keys/gateway.pub.pem")).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let out = d.send(&[&small_file(&d)]).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("receipt does not verify"),
        "{}",
        stderr(&out)
    );
    drop(gw);
}

#[test]
fn rogue_client_certificate_never_gets_a_connection() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "transport", "retry_for", "\"1s\"")
        .unwrap();
    d.set("edge.toml", "tls", "cert", "\"pki/rogue.pem\"")
        .unwrap();
    d.set("edge.toml", "tls", "key", "\"pki/rogue.key\"")
        .unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let out = d.send(&[&small_file(&d)]).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("TLS handshake refused"),
        "{}",
        stderr(&out)
    );
    let log = gw.log();
    assert!(!log.contains("edge connected"), "gateway log:\n{log}");
    assert!(log.contains("handshake failed"), "gateway log:\n{log}");
    assert!(gw.terminate().unwrap().success());
    nothing_delivered(&d);
}
