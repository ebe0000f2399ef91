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

/// Starts the gateway with a file size limit (`RLIMIT_FSIZE`, as systemd's `LimitFSIZE=`
/// sets it) and `SIGXFSZ` ignored: a payload file larger than `bytes` cannot be stored in
/// its spool, whatever is retried (`EFBIG`), while smaller ones can.
fn gateway_with_file_size_limit(d: &Deployment, bytes: u64) -> baylink_tests::Service {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(r#"trap '' XFSZ; exec prlimit --fsize="$0" -- "$@""#)
        .arg(bytes.to_string())
        .arg(baylink_tests::baylink_bin())
        .args(["serve", "--config"])
        .arg(d.gateway_config());
    baylink_tests::Service::start(&mut cmd, d.dir.path()).unwrap()
}

/// The audit records of transfer `id` in `side`'s log (`edge`, `gateway`).
fn records(d: &Deployment, side: &str, id: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.path(&format!("audit/{side}/records.log")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l.split_once(' ').unwrap().1).unwrap())
        .filter(|r| r["transfer"] == id)
        .collect()
}

/// A transfer the gateway refuses for a reason a retry cannot fix (a file larger than its
/// spool may hold) ends at once, well under `transport.retry_for`, with the gateway's
/// reason and its cause in `send`'s error, the edge's audit log (`failed`) and the
/// hospital's transfer status; the transfers right after it go through.
#[test]
fn a_transfer_the_gateway_cannot_store_fails_at_once_and_the_next_goes_through() {
    use std::time::{Duration, Instant};
    const LIMIT: u64 = 8 << 20;
    let d = Deployment::new().unwrap();
    let gateway = gateway_with_file_size_limit(&d, LIMIT);
    let big = payload(d.dir.path(), "big.dcm", 3 * LIMIT, 7).unwrap();
    let small = payload(d.dir.path(), "small.dcm", 1 << 20, 8).unwrap();

    // `baylink send`: exit 3 at once, naming the gateway's reason and its cause.
    let started = Instant::now();
    let child = d.spawn_send(&big, true).unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(90)) else {
        let _ = baylink_tests::signal(pid, "KILL");
        panic!(
            "send still running after 90 s: a refusal was retried\ngateway log:\n{}",
            gateway.log()
        );
    };
    let out = out.unwrap();
    let took = started.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}\n{}", gateway.log());
    assert!(
        err.contains("gateway refused: the gateway cannot store file 1 of the transfer"),
        "{err}"
    );
    assert!(err.contains("File too large"), "the cause is kept: {err}");
    assert!(
        took < Duration::from_secs(60),
        "took {took:?}; transport.retry_for is 10 min"
    );
    let id = err
        .lines()
        .find_map(|l| l.strip_prefix("transfer "))
        .unwrap()
        .to_owned();
    let at_edge = records(&d, "edge", &id);
    let failed = at_edge.last().unwrap();
    assert_eq!(failed["kind"], "failed", "{at_edge:?}");
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("File too large"),
        "{failed}"
    );
    // The gateway recorded its refusal and kept nothing of the transfer.
    let at_gateway = records(&d, "gateway", &id);
    assert!(
        at_gateway
            .iter()
            .any(|r| r["kind"] == "refused" && r["rule"] == "refused"),
        "{at_gateway:?}"
    );
    assert!(!d.path(&format!("spool/gateway/{id}")).exists());

    // The next transfer goes through.
    let (_, good) = d.send_ok(&[&small], &gateway);
    let got = d.wait_delivered(&good, "small.dcm", baylink_tests::EVENT_WAIT);
    assert_eq!(
        baylink_tests::sha256_file(&small).unwrap(),
        baylink_tests::sha256_file(&got).unwrap()
    );

    // The hospital API: the refused transfer's status is `failed` with the gateway's
    // reason, and the next upload is committed.
    let _edge = d.serve(&d.edge_config()).unwrap();
    let api = crate::ingest::Api { d: &d };
    let upload = |f: &std::path::Path, name: &str| {
        let a = api.declare(
            "hospital-a",
            r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
        );
        assert_eq!(a.status, 201, "{a:?}");
        let id = a.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(api.put("hospital-a", &id, name, f, &[]).status, 201);
        assert_eq!(api.commit("hospital-a", &id).status, 202);
        id
    };
    let started = Instant::now();
    let refused = upload(&big, "big.dcm");
    let status = loop {
        let s = api.status_after_change("hospital-a", &refused, 10).json();
        if s["state"] == "failed" || s["state"] == "committed" {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "still {s} after 90 s: a refusal was retried"
        );
    };
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("gateway refused") && error.contains("File too large"),
        "{status}"
    );
    let next = upload(&small, "small.dcm");
    api.wait_state(&next, "committed");
}
