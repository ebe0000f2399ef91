//! `baylink info` on a dev-env deployment: every section is filled from the machine, and what it
//! says of the config, the HSM key and the certificates is true.

use std::process::Command;

use baylink_tests::{Deployment, baylink_bin, sha256_file};

fn info(config: &std::path::Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(baylink_bin());
    cmd.arg("info").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[test]
fn info_reports_the_hardware_the_hsm_key_and_the_certificates() {
    let d = Deployment::new().unwrap();
    for (config, name) in [(d.edge_config(), "edge"), (d.gateway_config(), "gateway")] {
        let out = info(&config, true);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["role"], name);
        assert_eq!(
            report["config"]["sha256"].as_str().unwrap(),
            sha256_file(&config).unwrap()
        );
        // The spool's io_uring operations and the link socket are asked of this kernel.
        assert_eq!(report["io_uring"]["available"], true, "{report:#}");
        assert_eq!(report["io_uring"]["sufficient"], true, "{report:#}");
        assert!(report["link"]["udp"]["gso_segments"].as_u64().unwrap() >= 1);
        assert!(
            report["link"]["udp"]["receive_buffer_bytes"]
                .as_u64()
                .unwrap()
                > 0
        );
        assert_eq!(
            report["link"]["configured"]["bandwidth_delay_product_bytes"]
                .as_u64()
                .unwrap(),
            report["link"]["configured"]["rate_mbit"].as_u64().unwrap()
                * report["link"]["configured"]["rtt_ms"].as_u64().unwrap()
                * 125
        );
        // The signing key dev-env made is in the token, and stays inside it.
        assert_eq!(report["hsm"]["token_label"], format!("baylink-{name}"));
        assert_eq!(report["hsm"]["key_found"], true, "{report:#}");
        assert_eq!(report["hsm"]["key_extractable"], false);
        assert_eq!(report["hsm"]["key_sensitive"], true);
        // The appliance's own certificate names it and is valid.
        let certs = report["certificates"].as_array().unwrap();
        let own = certs.iter().find(|c| c["key"] == "tls.cert").unwrap();
        assert_eq!(own["subject"], format!("CN={name}"));
        assert_eq!(own["expired"], false);
        assert!(own["expires_in_seconds"].as_u64().unwrap() > 86_400);
        assert!(certs.iter().any(|c| c["key"] == "tls.ca"));
    }
}

#[test]
fn info_text_names_each_field_and_reports_a_refused_pin_without_failing() {
    let d = Deployment::new().unwrap();
    let out = info(&d.edge_config(), false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "role: edge\n",
        "cpu.arch: ",
        "io_uring.operations.fsync: true\n",
        "certificates[tls.cert].subject: CN=edge\n",
        "hsm.key_found: true\n",
    ] {
        assert!(text.contains(line), "`{line}` missing from:\n{text}");
    }

    // Support runs `info` on a broken appliance too: a PIN the token refuses is a finding.
    std::fs::write(d.path("secrets/edge.pin"), "00000000\n").unwrap();
    let out = info(&d.edge_config(), true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = report["hsm"]["error"].as_str().unwrap();
    assert!(error.contains("CKR_PIN_INCORRECT"), "{error}");
    assert_eq!(report["io_uring"]["sufficient"], true);
}
