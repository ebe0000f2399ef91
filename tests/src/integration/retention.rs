//! Spool retention through the real binaries: with `spool.retain = "0s"` the payload of a
//! finished transfer leaves both spools, the evidence stays, the delivered copy is untouched,
//! and each removal is an `expired` record in a log that still verifies.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use baylink_tests::{Deployment, baylink_bin, payload, sha256_file, summary};

/// Runs `baylink audit verify --config <config>` and asserts it passes.
fn audit_verifies(config: &Path) {
    let out = Command::new(baylink_bin())
        .args(["audit", "verify", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The kinds of the records of `transfer` in an audit directory, in order.
fn kinds_of(audit_dir: &Path, transfer: &str) -> Vec<String> {
    std::fs::read_to_string(audit_dir.join("records.log"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let json: serde_json::Value =
                serde_json::from_str(l.split_once(' ').unwrap().1).unwrap();
            (json["transfer"] == transfer).then(|| json["kind"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn finished_payloads_leave_both_spools_and_the_evidence_stays() {
    let d = Deployment::new().unwrap();
    for config in ["edge.toml", "gateway.toml"] {
        d.set(config, "spool", "retain", "\"0s\"").unwrap();
    }
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let edge = d.serve(&d.edge_config()).expect("edge starts");

    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let file = payload(&src, "study.dcm", 3 * 1024 * 1024 + 17, 5).unwrap();
    let (_, id) = d.send_ok(&[&file], &gateway);

    let limit = Duration::from_secs(60);
    let removed = "payload removed from the spool";
    gateway.wait_for_log(&[removed, &id], limit);
    edge.wait_for_log(&[removed, &id], limit);

    for (side, after) in [("gateway", "delivery"), ("edge", "receipt")] {
        let dir = d.path(&format!("spool/{side}/{id}"));
        assert!(!dir.join("data").exists(), "{side} still holds the payload");
        let reason = std::fs::read_to_string(dir.join("pruned")).unwrap();
        assert!(reason.contains(&format!("after {after}")), "{reason}");
        for kept in ["manifest.bin", "manifest.sig", "receipt.bin", "receipt.sig"] {
            assert!(dir.join(kept).exists(), "{side} lost {kept}");
        }
    }
    // `baylink spool` shows both as pruned, holding only their evidence.
    for config in [d.gateway_config(), d.edge_config()] {
        let out = Command::new(baylink_bin())
            .args(["spool", "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let inv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let t = &inv["transfers"][0];
        assert_eq!(
            (t["transfer"].as_str(), t["state"].as_str()),
            (Some(id.as_str()), Some("pruned")),
            "{inv}"
        );
        assert!(t["bytes"].as_u64().unwrap() < 64 * 1024, "{inv}");
        assert!(
            t["reason"].as_str().unwrap().contains("spool.retain"),
            "{inv}"
        );
    }
    // The delivered copy shared its inode with the gateway's spool copy: still whole.
    assert_eq!(
        sha256_file(&file).unwrap(),
        sha256_file(&d.delivered(&id, "study.dcm")).unwrap()
    );

    let gw_metrics = d.metrics(true).unwrap();
    assert!(
        gw_metrics.contains("baylink_spool_pruned_total 1"),
        "{gw_metrics}"
    );
    assert!(gw_metrics.contains(&format!(
        "baylink_spool_pruned_bytes_total {}",
        3 * 1024 * 1024 + 17
    )));
    // The sweep sets the gauges just after its log line: poll the endpoint briefly.
    let deadline = std::time::Instant::now() + limit;
    while !d
        .metrics(true)
        .unwrap()
        .contains("baylink_spool_transfers{state=\"pruned\"} 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            d.metrics(true).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let edge_metrics = d.metrics(false).unwrap();
    assert!(
        edge_metrics.contains("baylink_spool_available_bytes "),
        "{edge_metrics}"
    );

    // A second offer of the same transfer (as after a lost receipt) is answered from the
    // evidence: the edge's `send --resume` reports the receipt it already holds.
    let again = d.send(&["--no-progress", "--resume", &id]).unwrap();
    assert!(
        again.status.success(),
        "resume of a pruned transfer: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(summary(&again).unwrap()["receipt"], "verified");

    assert!(gateway.terminate().unwrap().success());
    assert!(edge.terminate().unwrap().success());
    for (config, audit, finished) in [
        (d.gateway_config(), d.path("audit/gateway"), "delivered"),
        (d.edge_config(), d.path("audit/edge"), "receipted"),
    ] {
        audit_verifies(&config);
        let kinds = kinds_of(&audit, &id);
        let at = |kind: &str| kinds.iter().position(|k| k == kind);
        assert_eq!(
            kinds.iter().filter(|k| *k == "expired").count(),
            1,
            "{kinds:?}"
        );
        assert!(at(finished).unwrap() < at("expired").unwrap(), "{kinds:?}");
    }
}
