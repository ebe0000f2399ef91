//! The gateway's signed delivery notice: the hospital learns that its data reached the record
//! store (or why the store refused it). Real edge and gateway, SoftHSM, QUIC on loopback, the
//! hospital API over HTTPS with curl, openssl for the signature.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use base64::Engine;
use baylink_tests::{Deployment, EVENT_WAIT, Service, baylink_bin, payload, summary};
use serde_json::Value;

use super::compliance::{audit_records, der_signature};
use super::ingest::Api;

const DECLARATION: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

/// Declares, uploads `file` as `name` and commits, as hospital-a; the transfer id.
pub(super) fn upload(api: &Api<'_>, name: &str, file: &Path) -> String {
    let a = api.declare("hospital-a", DECLARATION);
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let r = api.put("hospital-a", &id, name, file, &[]);
    assert_eq!(r.status, 201, "{r:?}");
    let c = api.commit("hospital-a", &id);
    assert_eq!(c.status, 202, "{c:?}");
    id
}

/// Long-polls the transfer's status until it is no longer on its way (`delivered`,
/// `partial`, `failed`, `refused`), within [`EVENT_WAIT`]; the last status.
pub(super) fn wait_settled(api: &Api<'_>, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let s = api.status_after_change("hospital-a", id, 10).json();
        if ["delivered", "partial", "failed", "refused"]
            .contains(&s["state"].as_str().unwrap_or(""))
        {
            return s;
        }
        assert!(
            start.elapsed() < EVENT_WAIT,
            "transfer {id} not settled within {EVENT_WAIT:?}: {s}"
        );
    }
}

/// `baylink audit verify --config` of one side succeeds.
pub(super) fn audit_verifies(config: &Path) {
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

/// The edge's `notified` records of transfer `id`.
pub(super) fn notified(d: &Deployment, id: &str) -> Vec<Value> {
    audit_records(d, "edge")
        .into_iter()
        .filter(|r| r["kind"] == "notified" && r["transfer"] == id)
        .collect()
}

/// Checks the downloaded notice's signature with openssl and the gateway's public key (as the
/// operator hands it out), and that one flipped bit makes it fail; returns the signed bytes.
fn openssl_verifies(d: &Deployment, doc: &Value) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(doc["signed_prefix"], "baylink/1 delivery notice\n");
    let notice = b64.decode(doc["notice"].as_str().unwrap()).unwrap();
    let mut msg = doc["signed_prefix"].as_str().unwrap().as_bytes().to_vec();
    msg.extend(&notice);
    let sig = der_signature(&b64.decode(doc["signature"].as_str().unwrap()).unwrap());
    std::fs::write(d.path("notice.msg"), &msg).unwrap();
    std::fs::write(d.path("notice.der"), &sig).unwrap();
    let openssl = |m: &str| {
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(d.path("keys/gateway.pub.pem"))
            .arg("-signature")
            .arg(d.path("notice.der"))
            .arg(d.path(m))
            .output()
            .unwrap()
    };
    let ok = openssl("notice.msg");
    assert!(
        ok.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The same bytes under the receipt's prefix do not verify: the domain is part of it.
    let mut as_receipt = b"baylink/1 receipt\n".to_vec();
    as_receipt.extend(&notice);
    std::fs::write(d.path("notice-as-receipt.msg"), &as_receipt).unwrap();
    assert!(!openssl("notice-as-receipt.msg").status.success());
    let last = msg.len() - 1;
    msg[last] ^= 1;
    std::fs::write(d.path("notice-bad.msg"), &msg).unwrap();
    assert!(!openssl("notice-bad.msg").status.success());
    notice
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A hospital upload over HTTPS reaches `delivered` through a long poll; `/delivery` serves a
/// notice that verifies with the gateway's public key and names the transfer and its Merkle
/// root; the edge's audit log records it once and verifies; the gateway's queue entry is gone.
#[test]
fn delivery_notice_moves_a_hospital_upload_to_delivered() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let f = payload(d.dir.path(), "scan.dcm", 300_000, 3).unwrap();
    let id = upload(&api, "scan.dcm", &f);

    // Before the notice, the delivery download is a conflict naming the state.
    let early = api.curl(
        Some("hospital-a"),
        &[&api.url(&format!("/v1/transfers/{id}/delivery"))],
    );
    assert!(
        early.status == 409 || early.status == 200,
        "before or after the notice: {early:?}"
    );

    let s = wait_settled(&api, &id);
    assert_eq!(s["state"], "delivered", "{s}\nedge:\n{}", edge.log());
    let stages: Vec<&str> = s["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| st["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages[stages.len() - 2..],
        ["committed", "delivered"],
        "{s}"
    );
    assert_eq!(
        s["downloads"]["delivery"],
        format!("/v1/transfers/{id}/delivery")
    );
    let root = s["receipt"]["merkle_root"].as_str().unwrap().to_owned();

    let a = api.curl(
        Some("hospital-a"),
        &[&api.url(&format!("/v1/transfers/{id}/delivery"))],
    );
    assert_eq!(a.status, 200, "{a:?}");
    let doc = a.json();
    assert_eq!(doc["format"], "baylink-delivery-notice/1");
    assert_eq!(doc["transfer"], id.as_str());
    assert_eq!(doc["fields"]["transfer_id"], id.as_str());
    assert_eq!(doc["fields"]["merkle_root"], root.as_str());
    assert_eq!(doc["fields"]["outcome"], "delivered");
    assert_eq!(doc["fields"]["gateway"], "gateway");
    let delivered_at = d.delivered(&id, "scan.dcm");
    assert!(delivered_at.exists());
    let answer = doc["fields"]["answer"].as_str().unwrap();
    assert_eq!(answer, d.path("delivered").join(&id).display().to_string());
    let answer_digest = hex(&baylink_net::proto::sha256(answer.as_bytes()));
    assert_eq!(doc["fields"]["answer_digest"], answer_digest.as_str());
    let signed = openssl_verifies(&d, &doc);
    assert_eq!(&signed[..4], b"BLDN");
    let tid: baylink_net::proto::TransferId = id.parse().unwrap();
    assert_eq!(&signed[6..22], &tid.0);
    assert_eq!(hex(&signed[22..54]), root);

    // Another hospital does not see it.
    let other = api.curl(
        Some("hospital-b"),
        &[&api.url(&format!("/v1/transfers/{id}/delivery"))],
    );
    assert_eq!(other.status, 404, "{other:?}");

    // Recorded once on the edge, before it showed; the gateway no longer owes it.
    let records = notified(&d, &id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["merkle_root"], root.as_str());
    assert!(
        records[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with(&format!("delivered; store answer sha256 {answer_digest}")),
        "{records:?}"
    );
    gateway.wait_for_log(&[&id, "delivery notice acknowledged"], EVENT_WAIT);
    assert!(
        !d.path(&format!("spool/gateway/{id}/notice.pending"))
            .exists()
    );
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
    audit_verifies(&d.edge_config());
    audit_verifies(&d.gateway_config());
}

/// `send --wait-delivered` waits on its own connection and prints the notice's fields.
#[test]
fn delivery_notice_send_wait_delivered_prints_the_notice() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let f = payload(d.dir.path(), "a.bin", 200_000, 5).unwrap();
    let out = d
        .send(&[
            "--no-progress",
            "--wait-delivered",
            "--delivered-timeout",
            "60s",
            f.to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "send: {}\ngateway:\n{}",
        stderr(&out),
        gateway.log()
    );
    let s = summary(&out).unwrap();
    let id = s["transfer_id"].as_str().unwrap();
    let n = &s["delivery"];
    assert_eq!(n["outcome"], "delivered", "{s}");
    assert_eq!(n["signature"], "verified");
    assert_eq!(n["transfer_id"], id);
    assert_eq!(n["merkle_root"], s["merkle_root"]);
    assert_eq!(
        n["answer"],
        d.path("delivered").join(id).display().to_string()
    );
    assert_eq!(n["answer_digest"].as_str().unwrap().len(), 64);
    assert_eq!(n["gateway"], "gateway");
    assert!(n["decided_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(notified(&d, id).len(), 1);
    assert!(d.path(&format!("spool/edge/{id}/notice.sig")).exists());
    gateway.wait_for_log(&[id, "delivery notice acknowledged"], EVENT_WAIT);
    assert!(gateway.terminate().unwrap().success());
    audit_verifies(&d.edge_config());
}

/// The durable queue: a notice signed while no edge listens survives a gateway restart and is
/// delivered when the edge next connects; asked again, the stored notice answers and nothing
/// is recorded twice.
#[test]
fn delivery_notice_survives_a_gateway_restart() {
    let d = Deployment::new().unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let f = payload(d.dir.path(), "a.bin", 100_000, 7).unwrap();
    let (_, id) = d.send_ok(&[&f], &gateway);
    // Signed and queued, not collected: no edge is listening.
    gateway.wait_for_log(&[&id, "delivery notice signed and queued"], EVENT_WAIT);
    let pending = d.path(&format!("spool/gateway/{id}/notice.pending"));
    assert!(pending.exists());
    assert!(gateway.terminate().unwrap().success());
    assert!(pending.exists(), "the queue entry survives the stop");
    assert!(!d.path(&format!("spool/edge/{id}/notice.sig")).exists());

    let gateway = d.serve(&d.gateway_config()).unwrap();
    let wait = |what: &str| {
        let out = d
            .send(&[
                "--no-progress",
                "--resume",
                &id,
                "--wait-delivered",
                "--delivered-timeout",
                "60s",
            ])
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}\ngateway:\n{}",
            stderr(&out),
            gateway.log()
        );
        summary(&out).unwrap()
    };
    let s = wait("after the restart");
    assert_eq!(s["delivery"]["outcome"], "delivered", "{s}");
    assert_eq!(s["delivery"]["transfer_id"], id.as_str());
    gateway.wait_for_log(&[&id, "delivery notice acknowledged"], EVENT_WAIT);
    assert!(!pending.exists());
    // Idempotent: asked again, the stored notice answers; recorded once.
    let again = wait("again");
    assert_eq!(again["delivery"], s["delivery"]);
    assert_eq!(notified(&d, &id).len(), 1);
    assert!(gateway.terminate().unwrap().success());
    audit_verifies(&d.edge_config());
    audit_verifies(&d.gateway_config());
}

/// No notice in time: `send --wait-delivered` still prints its receipt line, then exits 6
/// naming the bound (a gateway whose delivery cannot finish: its directory is unwritable).
#[test]
fn delivery_notice_wait_is_bounded() {
    let d = Deployment::new().unwrap();
    // The delivery target is a file, so every delivery fails and is retried: no notice.
    let blocked = d.path("not-a-dir");
    std::fs::write(&blocked, b"x").unwrap();
    d.set(
        "gateway.toml",
        "delivery",
        "path",
        &format!("\"{}\"", blocked.join("sub").display()),
    )
    .unwrap();
    let gateway: Service = d.serve(&d.gateway_config()).unwrap();
    let f = payload(d.dir.path(), "a.bin", 10_000, 9).unwrap();
    let t0 = Instant::now();
    let out = d
        .send(&[
            "--no-progress",
            "--wait-delivered",
            "--delivered-timeout",
            "3s",
            f.to_str().unwrap(),
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no delivery notice within 3s (--delivered-timeout)"),
        "{}",
        stderr(&out)
    );
    let s = summary(&out).unwrap();
    assert_eq!(s["receipt"], "verified");
    assert!(s.get("delivery").is_none(), "{s}");
    assert!(t0.elapsed() < EVENT_WAIT);
    assert!(gateway.terminate().unwrap().success());
}
