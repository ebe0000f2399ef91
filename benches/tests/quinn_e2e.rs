//! Runs the real `baylink-bench` binary: `e2e --only quinn` against a hand-made deployment
//! directory (PKI from rcgen, configs with the dev-env's keys), so the whole quinn path —
//! both child processes, their JSON lines, the summary, the JSON file and the table — is
//! exercised without the `baylink` binary.

// Test code: a failed set-up step should panic.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const BENCH: &str = env!("CARGO_BIN_EXE_baylink-bench");

fn write_deployment(dir: &Path) {
    std::fs::create_dir_all(dir.join("pki")).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("pki/ca.pem"), ca.pem()).unwrap();
    for name in ["edge", "gateway"] {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("pki/{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("pki/{name}.key")), key.serialize_pem()).unwrap();
        let extra = if name == "gateway" {
            "[delivery]\nkind = \"dir\"\npath = \"delivered\"\n"
        } else {
            ""
        };
        let config = format!(
            "role = \"{name}\"\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/{name}.pem\"\nkey = \"pki/{name}.key\"\n\
             [transport]\nchunk_size = 1048576\nmax_in_flight = 4\n\
             [link]\nrate_mbit = 1000\nrtt_ms = 10\ncongestion = \"cubic\"\n\
             [spool]\ndir = \"spool/{name}\"\n{extra}"
        );
        std::fs::write(dir.join(format!("{name}.toml")), config).unwrap();
    }
}

/// Runs `e2e --only ONLY` (6 MiB, 2 runs) against a fresh hand-made deployment; returns the
/// table and the JSON report, and checks the work directory was removed.
fn run_only(only: &str) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("env");
    write_deployment(&env);
    let json = dir.path().join("out.json");
    let output = Command::new(BENCH)
        .args([
            "e2e",
            "--size",
            "6MiB",
            "--runs",
            "2",
            "--only",
            only,
            "--time-limit",
            "60",
        ])
        .arg("--env")
        .arg(&env)
        .arg("--json")
        .arg(&json)
        .arg("--work-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("baylink-bench-")
        })
        .collect();
    assert!(left.is_empty(), "the work directory is left: {left:?}");
    (stdout, report)
}

/// Every run of `entry` moved the whole 6 MiB payload and measured both sides.
fn assert_full_runs(entry: &serde_json::Value) {
    assert!(entry["gbit_per_s"].as_f64().unwrap() > 0.0, "{entry}");
    assert_eq!(entry["runs_gbit_per_s"].as_array().unwrap().len(), 2);
    for run in entry["runs"].as_array().unwrap() {
        assert!(run["error"].is_null(), "{run}");
        assert_eq!(run["bytes"], 6 << 20);
        assert_eq!(run["chunks"], 6);
        assert_eq!(run["timed_out"], false);
        assert!(run["cpu_seconds"]["sender"].as_f64().unwrap() > 0.0);
        assert!(run["cpu_seconds"]["receiver"].as_f64().unwrap() > 0.0);
    }
    assert!(entry["chunk_latency_ms"]["p99"].as_f64().unwrap() > 0.0);
}

#[test]
fn quinn_only_run_writes_the_report() {
    let (stdout, report) = run_only("quinn");
    assert!(stdout.contains("quinn"), "{stdout}");
    assert!(
        stdout.contains("baylink      skipped: not selected (--only)"),
        "{stdout}"
    );

    assert_eq!(report["size_bytes"], 6 << 20);
    assert!(
        report["link"]["impairment"]
            .as_str()
            .unwrap()
            .starts_with("none (loopback")
    );
    assert_eq!(report["transport"]["chunk_size"], 1 << 20);
    assert_eq!(report["transport"]["max_in_flight"], 4);
    assert_full_runs(&report["contestants"]["quinn"]);
    assert!(report["contestants"]["quinn_sha256"]["skipped"].is_string());
    assert!(report["contestants"]["baylink"]["skipped"].is_string());
    assert!(report["contestants"]["scp_bbr"]["skipped"].is_string());
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
}

/// The verification ceiling runs through both child processes with digests on the wire (a
/// digest the sink could not match would fail the run: `a_chunk_that_does_not_match_its_digest
/// _fails_the_sink` in the crate's unit tests).
#[test]
fn quinn_sha256_only_run_writes_the_report() {
    let (stdout, report) = run_only("quinn-sha256");
    assert!(stdout.contains("quinn_sha256 "), "{stdout}");
    assert_full_runs(&report["contestants"]["quinn_sha256"]);
    assert!(report["contestants"]["quinn"]["skipped"].is_string());
}

#[test]
fn help_explains_the_figures_and_hides_the_children() {
    let output = Command::new(BENCH).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for figure in [
        "Gbit/s",
        "CPU s/GiB",
        "chunk p50/p99",
        "ratio_vs_quinn",
        "transmit_seconds",
    ] {
        assert!(help.contains(figure), "--help lacks {figure}: {help}");
    }
    assert!(!help.contains("quinn-sink"), "{help}");
}

#[test]
fn missing_baylink_binary_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BENCH)
        .args([
            "e2e",
            "--size",
            "1MiB",
            "--baylink",
            "/nonexistent/baylink",
            "--json",
        ])
        .arg(dir.path().join("o.json"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/baylink"), "{stderr}");
}
