//! Secrets at rest: `serve` and `send` refuse a PIN file, TLS key or patient key that group or
//! others can read, and a signing key that can leave the HSM; the patient key lives outside
//! the audit directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use baylink_tests::{Deployment, baylink_bin, payload};

use super::ingest::files_under;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// `send` of a small file: (exit code, stderr).
fn send(d: &Deployment) -> (Option<i32>, String) {
    let f = payload(d.dir.path(), "scan.bin", 10_000, 3).unwrap();
    let out = d.send(&["--no-progress", f.to_str().unwrap()]).unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `serve` of `config` must exit before it is ready; returns what it said.
fn serve_refused(d: &Deployment, config: &Path) -> String {
    match d.serve(config) {
        Ok(svc) => panic!("serve started:\n{}", svc.log()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn serve_and_send_refuse_secret_files_readable_by_group_or_others() {
    let d = Deployment::with_tls_key_files().unwrap();
    let edge_pin = d.path("secrets/edge.pin");
    let edge_key = d.path("pki/edge.key");
    let patient_key = d.path("secrets/edge.patient.key");
    // dev-env writes every secret 0600.
    for f in [
        &edge_pin,
        &edge_key,
        &patient_key,
        &d.path("secrets/gateway.pin"),
    ] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    let gateway = d.gateway_config();
    let edge = d.edge_config();

    for (key, file, bad) in [
        ("hsm.pin_file", &edge_pin, 0o644),
        ("tls.key", &edge_key, 0o644),
        ("audit.patient_key", &patient_key, 0o640),
    ] {
        chmod(file, bad);
        let want = format!(
            "{key} {} is readable by group or others (mode {bad:04o}); chmod 600 it",
            file.display()
        );
        let (code, err) = send(&d);
        assert_ne!(code, Some(0), "{err}");
        assert!(err.contains(&want), "send: {err}");
        let err = serve_refused(&d, &edge);
        assert!(err.contains(&want), "serve: {err}");
        chmod(file, 0o600);
    }

    // The gateway too.
    let gateway_key = d.path("pki/gateway.key");
    chmod(&gateway_key, 0o604);
    let err = serve_refused(&d, &gateway);
    assert!(
        err.contains(&format!(
            "tls.key {} is readable by group or others (mode 0604)",
            gateway_key.display()
        )),
        "{err}"
    );
    chmod(&gateway_key, 0o600);

    // Back to 0600 (0400 also does): both start.
    chmod(&edge_pin, 0o400);
    let _gw = d.serve(&gateway).unwrap();
    let (code, err) = send(&d);
    assert_eq!(code, Some(0), "{err}");
}

fn hsm_info(d: &Deployment) -> String {
    let out = Command::new(baylink_bin())
        .args(["hsm", "info", "--config"])
        .arg(d.edge_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_signing_key_that_can_leave_the_hsm_is_refused_unless_allowed() {
    let d = Deployment::new().unwrap();
    // dev-env's keys cannot leave the token.
    let info = hsm_info(&d);
    assert!(
        info.contains("sensitive=true extractable=false"),
        "dev-env key: {info}"
    );

    // An extractable key pair on the edge's token, made with OpenSC's pkcs11-tool.
    let pin = std::fs::read_to_string(d.path("secrets/edge.pin")).unwrap();
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", d.path("softhsm/softhsm2.conf"))
        .args(["--module", "/usr/lib/softhsm/libsofthsm2.so"])
        .args([
            "--token-label",
            "baylink-edge",
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
        .args(["--label", "exportable", "--extractable"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pkcs11-tool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.set("edge.toml", "hsm", "key_label", "\"exportable\"")
        .unwrap();
    // Were the key accepted, `send` would fail fast on the link (no gateway runs).
    d.set("edge.toml", "transport", "retry_for", "\"1s\"")
        .unwrap();
    assert!(hsm_info(&d).contains("extractable=true"));

    let (code, err) = send(&d);
    assert_eq!(code, Some(4), "{err}");
    for needle in [
        "key \"exportable\"",
        "extractable (CKA_EXTRACTABLE true)",
        "hsm.allow_extractable = true",
    ] {
        assert!(err.contains(needle), "send: {needle}: {err}");
    }
    let err = serve_refused(&d, &d.edge_config());
    assert!(err.contains("CKA_EXTRACTABLE"), "serve: {err}");

    // Accepted when the config says so (and the warning stays in the log).
    d.set("edge.toml", "hsm", "allow_extractable", "true")
        .unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    edge.wait_for_log(
        &["signing key can leave the token"],
        std::time::Duration::from_secs(60),
    );
}

#[test]
fn the_patient_key_is_kept_out_of_the_audit_directory() {
    let d = Deployment::new().unwrap();
    let key = d.path("secrets/edge.patient.key");
    let bytes = std::fs::read(&key).unwrap();
    assert_eq!(bytes.len(), 32);
    assert_eq!(mode(&key), 0o600);

    // A transfer later, nothing under audit/ holds the key (by name or by content).
    let _gw = d.serve(&d.gateway_config()).unwrap();
    let (code, err) = send(&d);
    assert_eq!(code, Some(0), "{err}");
    let audit = files_under(&d.path("audit"));
    assert!(!audit.is_empty());
    for f in &audit {
        assert!(!f.ends_with("patient.key"), "{}", f.display());
        assert_ne!(std::fs::read(f).unwrap(), bytes, "{}", f.display());
    }
    assert_eq!(std::fs::read(&key).unwrap(), bytes, "the key in use");

    // A config that puts it inside audit.dir is refused, naming the key.
    d.set(
        "edge.toml",
        "audit",
        "patient_key",
        "\"audit/edge/patient.key\"",
    )
    .unwrap();
    let (code, err) = send(&d);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("audit.patient_key"), "{err}");
    assert!(err.contains("is inside audit.dir"), "{err}");
    let err = serve_refused(&d, &d.edge_config());
    assert!(err.contains("is inside audit.dir"), "{err}");

    // One left in audit.dir by an older version: refused until it is moved out.
    d.set(
        "edge.toml",
        "audit",
        "patient_key",
        "\"secrets/edge.patient.key\"",
    )
    .unwrap();
    let legacy = d.path("audit/edge/patient.key");
    std::fs::rename(&key, &legacy).unwrap();
    let err = serve_refused(&d, &d.edge_config());
    assert!(
        err.contains(&format!("mv {} {}", legacy.display(), key.display())),
        "{err}"
    );
    std::fs::rename(&legacy, &key).unwrap();
    let (code, err) = send(&d);
    assert_eq!(code, Some(0), "{err}");
}
