//! `baylink check-config` on dev-env deployments: a good config passes, a broken one has every
//! problem named at once (the file's keys, its files, the HSM PIN, the certificate's key, a
//! port another process holds), and `serve` refuses to start on it.

use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;

use baylink_tests::{Deployment, baylink_bin};

/// `baylink check-config --config CONFIG [--json]`, run to its end.
pub(crate) fn check_config(config: &Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(baylink_bin());
    cmd.arg("check-config").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

fn problems(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn check_config_passes_a_dev_env_and_warns_of_a_certificate_expiring_within_warn_expiry() {
    let d = Deployment::new().unwrap();
    for config in [d.edge_config(), d.gateway_config()] {
        let out = check_config(&config, true);
        let report = problems(&out);
        assert_eq!(out.status.code(), Some(0), "{report:#}");
        assert_eq!(report, serde_json::json!({ "ok": true, "problems": [] }));
        let out = check_config(&config, false);
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.ends_with(": ok (0 errors, 0 warnings)\n"), "{text}");
    }

    // dev-env certificates are valid for two years: within 1000 days, a warning, not an error.
    d.set("gateway.toml", "tls", "warn_expiry", "\"1000d\"")
        .unwrap();
    let out = check_config(&d.gateway_config(), false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.lines().any(
            |l| l.starts_with("warning: tls.cert: CN=gateway expires on ")
                && l.ends_with("within tls.warn_expiry)")
        ),
        "{text}"
    );
    assert!(!text.contains("error:"), "{text}");
    // Warnings do not stop serve.
    let gateway = d.serve(&d.gateway_config()).unwrap();
    assert!(
        gateway.log().contains("tls.warn_expiry"),
        "{}",
        gateway.log()
    );
    gateway.terminate().unwrap();
}

#[test]
fn check_config_names_every_problem_at_once_and_serve_refuses_them() {
    let d = Deployment::with_tls_key_files().unwrap();
    // In the file: an unknown key, a wrong type, two bad values.
    d.set("edge.toml", "tls", "colour", "\"blue\"").unwrap();
    d.set("edge.toml", "transport", "max_in_flight", "\"eight\"")
        .unwrap();
    d.set("edge.toml", "link", "congestion", "\"reno\"")
        .unwrap();
    d.set("edge.toml", "spool", "retain", "\"soon\"").unwrap();
    // On the machine: a missing file, a PIN the token refuses, a key that is not the
    // certificate's, a port another process holds.
    d.set("edge.toml", "policy", "consents", "\"policy/missing.toml\"")
        .unwrap();
    std::fs::write(d.path("secrets/edge.pin"), "00000000\n").unwrap();
    d.set("edge.toml", "tls", "key", "\"pki/gateway.key\"")
        .unwrap();
    let held = TcpListener::bind(("127.0.0.1", d.base_port + 1)).unwrap(); // edge metrics

    let out = check_config(&d.edge_config(), true);
    let report = problems(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    let list = report["problems"].as_array().unwrap();
    let find = |key: &str| {
        list.iter()
            .find(|p| p["key"] == key)
            .unwrap_or_else(|| panic!("no problem with {key} in {report:#}"))
    };
    for (key, words) in [
        ("tls.colour", "unknown key"),
        (
            "transport.max_in_flight",
            "expected an integer, found a string",
        ),
        ("link.congestion", "reno"),
        ("spool.retain", "soon"),
        ("policy.consents", "missing.toml"),
        ("hsm.pin_file", "CKR_PIN_INCORRECT"),
        ("tls.key", "does not match the certificate in tls.cert"),
        ("metrics.listen", "already in use"),
    ] {
        let p = find(key);
        assert_eq!(p["severity"], "error", "{p}");
        let message = p["message"].as_str().unwrap();
        assert!(
            message.contains(words),
            "{key}: `{message}` lacks `{words}`"
        );
    }
    assert!(
        list.iter()
            .all(|p| p.as_object().unwrap().len() == 3 && p["message"].is_string()),
        "{report:#}"
    );

    // The text form: one line per problem, then the summary.
    let out = check_config(&d.edge_config(), false);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("error: tls.colour: unknown key\n"), "{text}");
    assert!(
        text.contains("error: metrics.listen: cannot listen on tcp 127.0.0.1:"),
        "{text}"
    );
    assert_eq!(
        text.lines().count(),
        list.len() + 1,
        "one line per problem and a summary: {text}"
    );
    assert!(
        text.lines()
            .last()
            .unwrap()
            .contains(&format!("not usable ({} errors", list.len())),
        "{text}"
    );

    // serve runs the same checks and refuses to start, naming every error.
    let err = d.serve(&d.edge_config()).unwrap_err().to_string();
    for key in [
        "tls.colour",
        "transport.max_in_flight",
        "policy.consents",
        "hsm.pin_file",
        "tls.key",
        "metrics.listen",
    ] {
        assert!(err.contains(key), "{key} not named by serve:\n{err}");
    }
    assert!(err.contains("not starting"), "{err}");
    drop(held);
}

#[test]
fn check_config_finds_the_gateway_quic_port_in_use_and_a_missing_certificate() {
    let d = Deployment::new().unwrap();
    let held = UdpSocket::bind(("127.0.0.1", d.base_port + 2)).unwrap(); // gateway QUIC
    std::fs::remove_file(d.path("pki/gateway.pem")).unwrap();
    let out = check_config(&d.gateway_config(), true);
    let report = problems(&out);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let keys: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert!(keys.contains(&"transport.listen"), "{report:#}");
    assert!(keys.contains(&"tls.cert"), "{report:#}");
    let err = d.serve(&d.gateway_config()).unwrap_err().to_string();
    assert!(
        err.contains("transport.listen") && err.contains("tls.cert"),
        "{err}"
    );
    drop(held);
}
