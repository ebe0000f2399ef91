//! The appliances' TLS private keys in their HSM tokens (`tls.key = "pkcs11:object=..."`):
//! dev-env writes only the certificates, every door (QUIC both ways, the hospital API)
//! handshakes with the token-held key, and a key that is not the certificate's, is missing or
//! can leave the token is refused before anything listens. PEM key files keep working.

use std::path::Path;
use std::process::Command;

use baylink_tests::{Deployment, baylink_bin, payload, sha256_file};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn check_config(config: &Path) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(baylink_bin())
        .args(["check-config", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        )
    });
    (out.status.code(), report)
}

/// The message check-config reports for `key`, if any.
fn problem(report: &serde_json::Value, key: &str) -> Option<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == key)
        .map(|p| p["message"].as_str().unwrap().to_owned())
}

/// Sends one file and checks it arrives byte-identical.
fn transfer(d: &Deployment) -> String {
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let file = payload(&src, "scan.dcm", 300_000, 11).unwrap();
    let (_, id) = d.send_ok(&[&file], &gateway);
    let log = gateway.log();
    assert!(gateway.terminate().unwrap().success());
    let got = d.delivered(&id, "scan.dcm");
    assert_eq!(sha256_file(&file).unwrap(), sha256_file(&got).unwrap());
    log
}

#[test]
fn transfer_over_a_link_whose_tls_keys_are_both_in_the_hsms() {
    let d = Deployment::new().unwrap();
    // dev-env wrote the certificates only; the keys are in the tokens.
    for side in ["edge", "gateway"] {
        assert!(d.path(&format!("pki/{side}.pem")).exists());
        assert!(
            !d.path(&format!("pki/{side}.key")).exists(),
            "{side}.key written"
        );
        let text = std::fs::read_to_string(d.path(&format!("{side}.toml"))).unwrap();
        assert!(
            text.contains("key = \"pkcs11:object=baylink-tls\""),
            "{text}"
        );
    }
    let log = transfer(&d);
    assert!(log.contains("TLS private key held in the HSM"), "{log}");
    assert!(log.contains("edge connected"), "{log}");
}

#[test]
fn hospital_api_handshakes_with_the_hsm_held_key() {
    let d = Deployment::new().unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    assert!(
        edge.log().contains("TLS private key held in the HSM"),
        "{}",
        edge.log()
    );
    // curl checks the edge's certificate against the CA and the handshake signature against
    // the certificate's key: only the token's key can have made it.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(d.path("pki/ca.pem"))
        .arg("--cert")
        .arg(d.path("pki/hospital-a.pem"))
        .arg("--key")
        .arg(d.path("pki/hospital-a.key"))
        .arg(format!(
            "https://localhost:{}/v1/transfers/00000000-0000-7000-8000-000000000000",
            d.base_port
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    assert!(edge.terminate().unwrap().success());
}

#[test]
fn transfer_with_pem_tls_keys_still_works() {
    let d = Deployment::with_tls_key_files().unwrap();
    for side in ["edge", "gateway"] {
        let text = std::fs::read_to_string(d.path(&format!("{side}.toml"))).unwrap();
        assert!(
            text.contains(&format!("key = \"pki/{side}.key\"")),
            "{text}"
        );
    }
    let log = transfer(&d);
    assert!(!log.contains("TLS private key held in the HSM"), "{log}");
}

#[test]
fn an_hsm_key_that_is_not_the_certificates_is_refused_naming_both() {
    let d = Deployment::new().unwrap();
    // The gateway's certificate with the edge's token key.
    d.set("edge.toml", "tls", "cert", "\"pki/gateway.pem\"")
        .unwrap();
    let (code, report) = check_config(&d.edge_config());
    assert_eq!(code, Some(1), "{report:#}");
    let message = problem(&report, "tls.key").unwrap_or_else(|| panic!("{report:#}"));
    for needle in [
        "pkcs11:object=baylink-tls on token \"baylink-edge\"",
        "is not the key of the certificate in",
        "pki/gateway.pem",
        "SPKI sha256",
    ] {
        assert!(
            message.contains(needle),
            "check-config: {needle}: {message}"
        );
    }
    let err = match d.serve(&d.edge_config()) {
        Ok(svc) => panic!("serve started:\n{}", svc.log()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("tls.key") && err.contains("is not the key of the certificate"),
        "{err}"
    );
    // `send` fails closed too.
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let file = payload(&src, "scan.dcm", 1000, 1).unwrap();
    let out = d.send(&["--no-progress", file.to_str().unwrap()]).unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("is not the key of the certificate"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_config_accepts_an_hsm_held_tls_key_and_names_a_missing_one() {
    let d = Deployment::new().unwrap();
    let (code, report) = check_config(&d.gateway_config());
    assert_eq!(code, Some(0), "{report:#}");
    d.set("gateway.toml", "tls", "key", "\"pkcs11:object=absent\"")
        .unwrap();
    let (code, report) = check_config(&d.gateway_config());
    assert_eq!(code, Some(1), "{report:#}");
    let message = problem(&report, "tls.key").unwrap_or_else(|| panic!("{report:#}"));
    assert!(
        message.contains("no private key labelled \"absent\""),
        "{message}"
    );
    // A URI that names another token is refused when the config is read.
    d.set(
        "gateway.toml",
        "tls",
        "key",
        "\"pkcs11:token=elsewhere;object=baylink-tls\"",
    )
    .unwrap();
    let (code, report) = check_config(&d.gateway_config());
    assert_eq!(code, Some(1), "{report:#}");
    let message = problem(&report, "tls.key").unwrap_or_else(|| panic!("{report:#}"));
    assert!(message.contains("token \"elsewhere\""), "{message}");
}

#[test]
fn a_tls_key_that_can_leave_the_hsm_is_refused_unless_allowed() {
    let d = Deployment::new().unwrap();
    let pin = std::fs::read_to_string(d.path("secrets/gateway.pin")).unwrap();
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", d.path("softhsm/softhsm2.conf"))
        .args(["--module", "/usr/lib/softhsm/libsofthsm2.so"])
        .args([
            "--token-label",
            "baylink-gateway",
            "--login",
            "--pin",
            pin.trim(),
        ])
        .args([
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--usage-sign",
        ])
        .args(["--label", "tls-exportable", "--extractable"])
        .output()
        .unwrap();
    assert!(out.status.success(), "pkcs11-tool: {}", stderr(&out));
    d.set(
        "gateway.toml",
        "tls",
        "key",
        "\"pkcs11:object=tls-exportable\"",
    )
    .unwrap();
    let err = match d.serve(&d.gateway_config()) {
        Ok(svc) => panic!("serve started:\n{}", svc.log()),
        Err(e) => e.to_string(),
    };
    for needle in [
        "tls.key",
        "tls-exportable",
        "CKA_EXTRACTABLE",
        "hsm.allow_extractable",
    ] {
        assert!(err.contains(needle), "serve: {needle}: {err}");
    }
    // Allowed, the key is then checked against the certificate (which is not its).
    d.set("gateway.toml", "hsm", "allow_extractable", "true")
        .unwrap();
    let (_, report) = check_config(&d.gateway_config());
    let message = problem(&report, "tls.key").unwrap_or_else(|| panic!("{report:#}"));
    assert!(
        message.contains("is not the key of the certificate"),
        "{message}"
    );
}
