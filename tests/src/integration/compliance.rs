//! The policy rules added for issue 7 (allowed categories, allowed destinations, size limits)
//! through both doors: the hospital API over HTTPS (curl with client certificates) and
//! `send`. Each refusal names its rule, seals nothing, delivers nothing, and is recorded as
//! `refused` with that rule in the edge's audit log, which still verifies.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use baylink_tests::{Deployment, Service, baylink_bin, payload};

use super::ingest::{Api, files_under};
use serde_json::Value;

const GOOD: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// curl as `who` (a certificate under `pki/`); returns (HTTP status, body).
fn curl(d: &Deployment, who: &str, args: &[&str]) -> (u16, String) {
    let a = Api { d }.curl(Some(who), args);
    (a.status, a.body)
}

fn url(d: &Deployment, path: &str) -> String {
    Api { d }.url(path)
}

/// PUTs `file` as `name` into transfer `id` as hospital-a; returns (HTTP status, body).
fn put(d: &Deployment, id: &str, name: &str, file: &Path) -> (u16, String) {
    let a = Api { d }.put("hospital-a", id, name, file, &[]);
    (a.status, a.body)
}

/// Commits transfer `id` as hospital-a; returns (HTTP status, body).
fn commit(d: &Deployment, id: &str) -> (u16, String) {
    let a = Api { d }.commit("hospital-a", id);
    (a.status, a.body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Both appliances running (so a transfer that got through would be delivered).
fn running(d: &Deployment) -> (Service, Service) {
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let edge = d.serve(&d.edge_config()).expect("edge starts");
    (gateway, edge)
}

/// The audit records of one appliance (`edge` or `gateway`) as JSON.
pub(super) fn audit_records(d: &Deployment, side: &str) -> Vec<Value> {
    std::fs::read_to_string(d.path(&format!("audit/{side}/records.log")))
        .unwrap_or_default()
        .lines()
        .map(|l| json(l.split_once(' ').unwrap().1))
        .collect()
}

/// The edge's audit records as JSON.
fn records(d: &Deployment) -> Vec<Value> {
    audit_records(d, "edge")
}

fn assert_refused_record(d: &Deployment, rule: &str) {
    let r = records(d);
    assert!(
        r.iter()
            .any(|r| r["kind"] == "refused" && r["rule"] == rule),
        "no refused record with rule {rule}: {r:?}"
    );
    assert!(
        !r.iter()
            .any(|r| r["kind"] == "sealed" || r["kind"] == "sent"),
        "a refused transfer was sealed or sent: {r:?}"
    );
}

fn assert_audit_verifies(d: &Deployment) {
    let out = Command::new(baylink_bin())
        .args(["audit", "verify", "--dir"])
        .arg(d.path("audit/edge"))
        .arg("--public-key")
        .arg(d.path("keys/edge.pub.pem"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "audit verify: {}", stderr(&out));
}

fn nothing_sealed_or_delivered(d: &Deployment) {
    let sealed: Vec<_> = files_under(&d.path("spool/edge"))
        .into_iter()
        .filter(|p| p.file_name() == Some("manifest.bin".as_ref()))
        .collect();
    assert!(sealed.is_empty(), "sealed: {sealed:?}");
    let delivered = files_under(&d.path("delivered"));
    assert!(delivered.is_empty(), "delivered: {delivered:?}");
}

fn send_refusal(d: &Deployment, args: &[&str], rule: &str) {
    let f = payload(d.dir.path(), "scan.dcm", 100_000, 1).unwrap();
    let mut all = vec!["--no-progress"];
    all.extend_from_slice(args);
    all.push(f.to_str().unwrap());
    let out = d.send(&all).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("refused: "), "{err}");
    assert!(err.contains(&format!("(rule {rule})")), "{err}");
    nothing_sealed_or_delivered(d);
    assert_refused_record(d, rule);
    assert_audit_verifies(d);
}

fn declare_refusal(d: &Deployment, body: &str, rule: &str) {
    let (status, body) = curl(
        d,
        "hospital-a",
        &[
            "-X",
            "POST",
            "--data-binary",
            body,
            &url(d, "/v1/transfers"),
        ],
    );
    assert_eq!(status, 403, "{body}");
    let v = json(&body);
    assert_eq!(v["rule"], rule, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
}

#[test]
fn category_not_in_the_policy_is_refused_on_both_doors() {
    let d = Deployment::new().unwrap();
    d.set(
        "edge.toml",
        "policy",
        "categories",
        r#"["laboratory-report"]"#,
    )
    .unwrap();
    // `send` with its default category (diagnostic-image), now not allowed.
    send_refusal(&d, &[], "category-not-allowed");
    let (_g, edge) = running(&d);
    declare_refusal(&d, GOOD, "category-not-allowed");
    nothing_sealed_or_delivered(&d);
    drop(edge);
    let refused = records(&d)
        .into_iter()
        .filter(|r| r["kind"] == "refused" && r["rule"] == "category-not-allowed")
        .count();
    assert_eq!(refused, 2, "one refused record per door");
    assert_audit_verifies(&d);
}

#[test]
fn destination_not_in_the_policy_is_refused_on_both_doors() {
    let d = Deployment::new().unwrap();
    send_refusal(
        &d,
        &["--destination", "cloud-bucket"],
        "destination-not-allowed",
    );
    let (_g, _e) = running(&d);
    declare_refusal(
        &d,
        &GOOD.replace("hk-ehealth", "cloud-bucket"),
        "destination-not-allowed",
    );
    nothing_sealed_or_delivered(&d);
}

#[test]
fn transfer_over_the_policy_size_limit_is_refused_at_commit_and_by_send() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "policy", "max_transfer_bytes", "50000")
        .unwrap();
    // `send` checks before sealing: the 100 000-byte file is over the limit.
    send_refusal(&d, &[], "size-limit");

    let (_g, _e) = running(&d);
    let (status, body) = curl(
        &d,
        "hospital-a",
        &[
            "-X",
            "POST",
            "--data-binary",
            GOOD,
            &url(&d, "/v1/transfers"),
        ],
    );
    assert_eq!(status, 201, "{body}");
    let id = json(&body)["id"].as_str().unwrap().to_owned();
    // Each file is under the limit, together they are over it.
    for (name, seed) in [("a.dcm", 1), ("b.dcm", 2)] {
        let f = payload(d.dir.path(), name, 30_000, seed).unwrap();
        let (status, body) = put(&d, &id, name, &f);
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = commit(&d, &id);
    assert_eq!(status, 403, "{body}");
    let v = json(&body);
    assert_eq!(v["rule"], "size-limit", "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("policy.max_transfer_bytes")),
        "{v}"
    );
    nothing_sealed_or_delivered(&d);
    let refused: Vec<_> = records(&d)
        .into_iter()
        .filter(|r| r["kind"] == "refused" && r["rule"] == "size-limit")
        .collect();
    assert_eq!(
        refused.len(),
        2,
        "send and commit each recorded: {refused:?}"
    );
    assert!(
        refused.iter().any(|r| r["transfer"] == id.as_str()),
        "{refused:?}"
    );
    // The transfer stays open, not sealed: the status says so.
    let (status, body) = curl(
        &d,
        "hospital-a",
        &[&url(&d, &format!("/v1/transfers/{id}"))],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["state"], "receiving", "{body}");
}

#[test]
fn files_over_the_policy_file_limit_are_refused_by_send() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "policy", "max_files", "1").unwrap();
    let extra = payload(d.dir.path(), "second.dcm", 10, 7).unwrap();
    send_refusal(&d, &[extra.to_str().unwrap()], "size-limit");
}

#[test]
fn a_zero_policy_limit_is_a_config_error() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "policy", "max_files", "0").unwrap();
    let out = d.send(&["--no-progress", "/dev/null"]).unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("policy.max_files"),
        "{}",
        stderr(&out)
    );
}

/// An IEEE P1363 ECDSA P-256 signature (r ‖ s, 64 bytes) as DER, for openssl.
pub(super) fn der_signature(fixed: &[u8]) -> Vec<u8> {
    assert_eq!(fixed.len(), 64, "P-256 r||s");
    let int = |x: &[u8]| {
        let mut v: Vec<u8> = x.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().is_none_or(|b| *b >= 0x80) {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    };
    let body = [int(&fixed[..32]), int(&fixed[32..])].concat();
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

fn get(d: &Deployment, who: &str, path: &str) -> (u16, String) {
    curl(d, who, &[&url(d, path)])
}

fn verify_proof(d: &Deployment, file: &Path) -> Output {
    Command::new(baylink_bin())
        .args(["audit", "verify-proof", "--public-key"])
        .arg(d.path("keys/edge.pub.pem"))
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_sender_downloads_the_receipt_and_a_proof_that_verifies_offline() {
    use base64::Engine;
    let d = Deployment::new().unwrap();
    let (_g, _e) = running(&d);
    let post = |body: &str| {
        let (status, body) = curl(
            &d,
            "hospital-a",
            &[
                "-X",
                "POST",
                "--data-binary",
                body,
                &url(&d, "/v1/transfers"),
            ],
        );
        assert_eq!(status, 201, "{body}");
        json(&body)["id"].as_str().unwrap().to_owned()
    };
    // Before any receipt: 409 naming the state; another hospital and unknown ids: 404.
    let early = post(GOOD);
    for what in ["receipt", "proof"] {
        let (status, body) = get(&d, "hospital-a", &format!("/v1/transfers/{early}/{what}"));
        assert_eq!(status, 409, "{what}: {body}");
        assert!(body.contains("declared"), "{what}: {body}");
    }
    assert!(
        json(&get(&d, "hospital-a", &format!("/v1/transfers/{early}")).1)
            .get("downloads")
            .is_none()
    );

    let id = post(GOOD);
    let f = payload(d.dir.path(), "scan.dcm", 200_000, 3).unwrap();
    let (status, body) = put(&d, &id, "scan.dcm", &f);
    assert_eq!(status, 201, "{body}");
    let (status, body) = commit(&d, &id);
    assert_eq!(status, 202, "{body}");
    let st = Api { d: &d }.wait_state(&id, "committed");
    assert_eq!(
        st["downloads"]["receipt"],
        format!("/v1/transfers/{id}/receipt")
    );
    assert_eq!(
        st["downloads"]["proof"],
        format!("/v1/transfers/{id}/proof")
    );

    for who in ["hospital-b"] {
        for what in ["receipt", "proof"] {
            let (status, body) = get(&d, who, &format!("/v1/transfers/{id}/{what}"));
            assert_eq!(status, 404, "{who} {what}: {body}");
        }
    }
    let unknown = "01900000-0000-7000-8000-000000000000";
    let (status, body) = get(&d, "hospital-a", &format!("/v1/transfers/{unknown}/proof"));
    assert_eq!(status, 404, "{body}");

    // The receipt: check the gateway's signature with openssl and its public key.
    let (status, body) = get(&d, "hospital-a", &format!("/v1/transfers/{id}/receipt"));
    assert_eq!(status, 200, "{body}");
    let r = json(&body);
    assert_eq!(r["format"], "baylink-receipt/1");
    assert_eq!(r["transfer"], id.as_str());
    assert_eq!(r["process_id"], "CR-2026-0001", "{r}");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut msg = r["signed_prefix"].as_str().unwrap().as_bytes().to_vec();
    msg.extend(b64.decode(r["receipt"].as_str().unwrap()).unwrap());
    let sig = der_signature(&b64.decode(r["signature"].as_str().unwrap()).unwrap());
    let key = r["gateway_public_key"].as_str().unwrap();
    assert_eq!(
        key,
        std::fs::read_to_string(d.path("keys/gateway.pub.pem")).unwrap()
    );
    std::fs::write(d.path("receipt.msg"), &msg).unwrap();
    std::fs::write(d.path("receipt.sig"), &sig).unwrap();
    std::fs::write(d.path("receipt-key.pem"), key).unwrap();
    let openssl = |m: &str| {
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(d.path("receipt-key.pem"))
            .arg("-signature")
            .arg(d.path("receipt.sig"))
            .arg(d.path(m))
            .output()
            .unwrap()
    };
    let ok = openssl("receipt.msg");
    assert!(ok.status.success(), "{}", stderr(&ok));
    let last = msg.len() - 1;
    msg[last] ^= 1;
    std::fs::write(d.path("receipt-bad.msg"), &msg).unwrap();
    assert!(!openssl("receipt-bad.msg").status.success());

    // The proof: the real `baylink audit verify-proof` accepts it, and not one byte changed.
    let (status, body) = get(&d, "hospital-a", &format!("/v1/transfers/{id}/proof"));
    assert_eq!(status, 200, "{body}");
    let proof = d.path("proof.json");
    std::fs::write(&proof, &body).unwrap();
    let out = verify_proof(&d, &proof);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(&format!("proof ok: transfer {id}")), "{said}");
    assert!(said.contains("receipted"), "{said}");
    // Change one byte: the first hex digit of the first record's first inclusion hash (the
    // file stays valid JSON, so the proof check itself must catch it).
    let first = json(&body)["records"][0]["inclusion"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let at = body.find(&first).unwrap();
    let mut bytes = body.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    let tampered = d.path("proof-tampered.json");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = verify_proof(&d, &tampered);
    assert!(!out.status.success(), "a tampered proof verified");
}

/// The gateway's audit records as JSON.
fn gateway_records(d: &Deployment) -> Vec<Value> {
    audit_records(d, "gateway")
}

/// `send` is refused by the gateway (exit 3 naming `needle`); the gateway's log then holds
/// one `refused` record with `rule` (returned), and still verifies after a graceful stop.
fn gateway_refusal(d: &Deployment, files: &[&Path], needle: &str, rule: &str) -> Value {
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let mut args = vec!["--no-progress"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    let out = d.send(&args).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    assert!(gateway.terminate().unwrap().success());
    let r = gateway_records(d);
    let refused: Vec<_> = r.iter().filter(|r| r["kind"] == "refused").collect();
    assert_eq!(refused.len(), 1, "{r:?}");
    assert_eq!(refused[0]["rule"], rule, "{r:?}");
    assert_eq!(refused[0]["peer"], "edge", "{r:?}");
    assert!(
        refused[0]["detail"]
            .as_str()
            .is_some_and(|t| t.contains(needle)),
        "{r:?}"
    );
    assert!(
        !r.iter().any(|r| r["kind"] == "committed"),
        "a refused offer was committed: {r:?}"
    );
    nothing_sealed_or_delivered_on_the_gateway(d);
    let out = Command::new(baylink_bin())
        .args(["audit", "verify", "--dir"])
        .arg(d.path("audit/gateway"))
        .arg("--public-key")
        .arg(d.path("keys/gateway.pub.pem"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "audit verify: {}", stderr(&out));
    refused[0].clone()
}

fn nothing_sealed_or_delivered_on_the_gateway(d: &Deployment) {
    let delivered = files_under(&d.path("delivered"));
    assert!(delivered.is_empty(), "delivered: {delivered:?}");
}

#[test]
fn a_manifest_signature_the_gateway_refuses_is_audited_on_the_gateway() {
    let d = Deployment::new().unwrap();
    // The gateway pins the wrong key for the edge: the edge's real signature fails.
    d.set(
        "gateway.toml",
        "peer",
        "signing_key",
        r#""keys/gateway.pub.pem""#,
    )
    .unwrap();
    let f = payload(d.dir.path(), "scan.dcm", 10_000, 1).unwrap();
    let refused = gateway_refusal(
        &d,
        &[&f],
        "manifest signature does not verify",
        "bad-signature",
    );
    // The manifest decoded, so the record names its transfer and process id (what the
    // offer claimed: the signature over them is what failed).
    assert!(refused["transfer"].is_string(), "{refused}");
    assert_eq!(refused["consent"], "CR-2026-0001", "{refused}");
}

#[test]
fn an_offer_over_the_gateway_limits_is_audited_on_the_gateway() {
    let d = Deployment::new().unwrap();
    d.set("gateway.toml", "limits", "max_files", "1").unwrap();
    let a = payload(d.dir.path(), "a.dcm", 1000, 1).unwrap();
    let b = payload(d.dir.path(), "b.dcm", 1000, 2).unwrap();
    let refused = gateway_refusal(&d, &[&a, &b], "files", "too-many-files");
    // A manifest over the limits is never decoded: nothing in it is attributed.
    assert!(refused["transfer"].is_null(), "{refused}");
    assert!(refused["consent"].is_null(), "{refused}");
}

fn baylink(args: &[&str]) -> Output {
    Command::new(baylink_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn audit_prove_carries_the_witness_cosignature_and_verify_proof_checks_it() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let f = payload(d.dir.path(), "study.dcm", 50_000, 4).unwrap();
    let (_, id) = d.send_ok(&[&f], &gateway);
    assert!(gateway.terminate().unwrap().success());
    // `send` witnessed its exit checkpoint: the edge stored the gateway's cosignature.
    assert!(d.path("audit/edge/cosignatures.log").exists());

    let out = baylink(&[
        "audit",
        "prove",
        "--config",
        d.edge_config().to_str().unwrap(),
        "--transfer",
        &id,
    ]);
    assert!(out.status.success(), "prove: {}", stderr(&out));
    let proof: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cosigs = proof["cosignatures"].as_array().expect("cosignatures");
    assert!(!cosigs.is_empty(), "{proof}");
    assert!(
        cosigs[0]
            .as_str()
            .unwrap()
            .starts_with("\u{2014} baylink.witness/"),
        "{proof}"
    );
    let file = d.path("proof.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let edge_pem = d.path("keys/edge.pub.pem");
    let gw_pem = d.path("keys/gateway.pub.pem");
    let verify = |file: &Path, witness: Option<&Path>| {
        let mut args = vec![
            "audit",
            "verify-proof",
            "--public-key",
            edge_pem.to_str().unwrap(),
        ];
        if let Some(w) = witness {
            args.extend(["--witness-key", w.to_str().unwrap()]);
        }
        args.push(file.to_str().unwrap());
        baylink(&args)
    };
    // Without the witness key the proof still verifies; with it the cosignature is checked.
    let out = verify(&file, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = verify(&file, Some(&gw_pem));
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(&format!("proof ok: transfer {id}")), "{said}");
    assert!(said.contains("cosignatures: "), "{said}");
    // The wrong witness key: refused.
    let out = verify(&file, Some(&edge_pem));
    assert!(
        !out.status.success(),
        "a cosignature verified under the edge's key"
    );
    assert!(stderr(&out).contains("cosignature 1"), "{}", stderr(&out));
    // A missing cosignature is an error when the witness key is given, not without it.
    let mut stripped = proof.clone();
    stripped.as_object_mut().unwrap().remove("cosignatures");
    let bare = d.path("proof-bare.json");
    std::fs::write(&bare, serde_json::to_vec(&stripped).unwrap()).unwrap();
    assert!(verify(&bare, None).status.success());
    let out = verify(&bare, Some(&gw_pem));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no witness cosignature"),
        "{}",
        stderr(&out)
    );
    // A cosignature with one byte changed: refused.
    let mut bad = proof.clone();
    let line = bad["cosignatures"][0].as_str().unwrap().to_owned();
    let (head, b64) = line.rsplit_once(' ').unwrap();
    let mut chars: Vec<char> = b64.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    bad["cosignatures"][0] = Value::String(format!("{head} {}", chars.iter().collect::<String>()));
    let tampered = d.path("proof-badcosig.json");
    std::fs::write(&tampered, serde_json::to_vec(&bad).unwrap()).unwrap();
    assert!(!verify(&tampered, Some(&gw_pem)).status.success());
}

/// Issue #7: the consent reference the checkpoint allowed a transfer under is its process id,
/// on the edge's records, in the signed manifest, in the signed receipt, and on the gateway's
/// records, the same on both sides of the border.
#[test]
fn the_consent_reference_is_the_process_id_of_every_record_manifest_and_receipt() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    // P-0002's consent is CR-2026-0002 (dev-env); `send` does not name it, the checkpoint
    // finds it.
    let f = payload(d.dir.path(), "scan.dcm", 300_000, 2).unwrap();
    let out = d
        .send(&["--no-progress", "--patient", "P-0002", f.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let id = err
        .lines()
        .find_map(|l| l.strip_prefix("transfer "))
        .unwrap_or_else(|| panic!("no transfer id: {err}"))
        .trim()
        .to_owned();
    const CONSENT: &str = "CR-2026-0002";

    // The manifest and the receipt, both decoded from the signed bytes in the edge's spool.
    let dir = d.path("spool/edge").join(&id);
    let limits = baylink_net::proto::Limits::default();
    let manifest = baylink_net::proto::Manifest::from_bytes(
        &std::fs::read(dir.join("manifest.bin")).unwrap(),
        &limits,
    )
    .unwrap();
    assert_eq!(manifest.process_id, CONSENT);
    let receipt =
        baylink_net::proto::Receipt::from_bytes(&std::fs::read(dir.join("receipt.bin")).unwrap())
            .unwrap();
    assert_eq!(receipt.process_id, CONSENT);
    let readable = json(&std::fs::read_to_string(dir.join("manifest.json")).unwrap());
    assert_eq!(readable["process_id"], CONSENT);

    // Every record of the transfer, on both sides, names it. (Delivery runs after the
    // commit, so the gateway's `delivered` record is waited for, bounded.)
    let start = std::time::Instant::now();
    let gateway_side = loop {
        let r: Vec<Value> = gateway_records(&d)
            .into_iter()
            .filter(|r| r["transfer"] == id.as_str())
            .collect();
        if r.iter().any(|r| r["kind"] == "delivered") {
            break r;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "not delivered: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(gateway.terminate().unwrap().success());
    let edge_side: Vec<Value> = records(&d)
        .into_iter()
        .filter(|r| r["transfer"] == id.as_str())
        .collect();
    // (`notified` on the edge follows once the gateway's delivery notice arrives.)
    let kinds = |r: &[Value]| -> Vec<String> {
        r.iter()
            .map(|r| r["kind"].as_str().unwrap().to_owned())
            .filter(|k| k != "notified")
            .collect()
    };
    assert_eq!(
        kinds(&edge_side),
        ["declared", "sealed", "sent", "receipted"],
        "{edge_side:?}"
    );
    assert_eq!(
        kinds(&gateway_side),
        ["committed", "delivered"],
        "{gateway_side:?}"
    );
    for r in edge_side.iter().chain(&gateway_side) {
        assert_eq!(r["consent"], CONSENT, "{r}");
    }
    // The declaration the manifest binds is the one allowed, naming the consent.
    let declaration_digest: String = manifest
        .declaration_digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for r in edge_side.iter().chain(&gateway_side) {
        assert_eq!(r["declaration_digest"], declaration_digest.as_str(), "{r}");
    }
}
