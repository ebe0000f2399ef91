//! The edge killed at each step of sealing and sending (`BAYLINK_FAILPOINT` aborts the real
//! binary at a named step, as a crash would: no destructors, no flush). After each crash the
//! edge's audit log verifies and agrees with its spool: no transfer is sendable, at the
//! gateway, or receipted without the record that says so. Then the edge is restarted (its
//! service, or `send --resume`) and the transfer arrives byte-identical with one `sealed`
//! record and a complete record sequence.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use baylink_tests::{Deployment, Service, baylink_bin, payload, sha256_file, summary};

use crate::ingest::Api;
use crate::resume::{assert_delivered, only_transfer};

const WAIT: Duration = Duration::from_secs(60);

/// How the edge comes back after the crash.
#[derive(Clone, Copy, Debug)]
enum Restart {
    /// `baylink send --resume <id>`.
    Resume,
    /// `baylink serve` on the edge's config: its start-up recovery.
    Service,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `baylink send` of `file`, aborted at `step`. Core dumps are off (`ulimit -c 0`): the
/// abort is the point, not its core.
fn send_crashing_at(d: &Deployment, file: &Path, step: &str) -> Output {
    Command::new("sh")
        .args(["-c", r#"ulimit -c 0; exec "$@""#, "sh"])
        .arg(baylink_bin())
        .args(["send", "--no-progress", "--config"])
        .arg(d.edge_config())
        .arg(file)
        .env("BAYLINK_FAILPOINT", step)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The kinds of the records `records.log` holds for `transfer`, in order.
fn kinds_of(records: &Path, transfer: &str) -> Vec<String> {
    std::fs::read_to_string(records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l.split_once(' ').unwrap().1).unwrap())
        .filter(|r| r["transfer"].as_str() == Some(transfer))
        .map(|r| r["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn count(kinds: &[String], kind: &str) -> usize {
    kinds.iter().filter(|k| *k == kind).count()
}

/// `baylink audit verify` on the edge's log succeeds.
fn assert_edge_log_verifies(d: &Deployment) {
    let out = Command::new(baylink_bin())
        .args(["audit", "verify", "--config"])
        .arg(d.edge_config())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify after the crash: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("audit ok"),
        "{}",
        text(&out.stdout)
    );
}

/// What the crash left: the spool shows no step the log does not.
fn assert_spool_agrees_with_log(d: &Deployment, id: &str) {
    let kinds = kinds_of(&d.path("audit/edge/records.log"), id);
    let edge = d.path("spool/edge").join(id);
    let at_gateway = d.path("spool/gateway").join(id).exists();
    assert_eq!(count(&kinds, "declared"), 1, "{kinds:?}");
    assert!(count(&kinds, "sealed") <= 1, "{kinds:?}");
    if edge.join("manifest.bin").exists() {
        assert_eq!(
            count(&kinds, "sealed"),
            1,
            "the transfer is sealed (sendable) but the log has no `sealed` record: {kinds:?}"
        );
    }
    if at_gateway {
        assert_eq!(
            count(&kinds, "sealed"),
            1,
            "the gateway has the transfer but the edge's log has no `sealed` record: {kinds:?}"
        );
    }
    if edge.join("receipt.sig").exists() {
        assert!(
            kinds.iter().any(|k| k == "receipted"),
            "the receipt is stored but the log has no `receipted` record: {kinds:?}"
        );
    }
    assert_eq!(count(&kinds, "failed"), 0, "{kinds:?}");
}

/// The records of a transfer that arrived: declared first, one `sealed`, then `sent` and
/// `receipted` (a crash after `sent` or `receipted` repeats them: the resumed run received
/// the receipt again), receipted last (but for `notified`), nothing failed.
fn assert_complete_sequence(d: &Deployment, id: &str) {
    let kinds = kinds_of(&d.path("audit/edge/records.log"), id);
    // The gateway's delivery notice may follow (`notified`), never before the transfer went
    // out (after a crash between `sent` and the stored receipt, it can come before the
    // resumed run's `receipted`).
    if let Some(i) = kinds.iter().position(|k| k == "notified") {
        assert!(kinds[..i].iter().any(|k| k == "sent"), "{kinds:?}");
    }
    let kinds: Vec<String> = kinds.into_iter().filter(|k| k != "notified").collect();
    let mut distinct = kinds.clone();
    distinct.dedup();
    let order: Vec<&str> = ["declared", "sealed", "sent", "receipted"]
        .into_iter()
        .filter(|k| distinct.iter().any(|d| d == k))
        .collect();
    assert_eq!(
        order,
        ["declared", "sealed", "sent", "receipted"],
        "{kinds:?}"
    );
    assert_eq!(count(&kinds, "declared"), 1, "{kinds:?}");
    assert_eq!(count(&kinds, "sealed"), 1, "{kinds:?}");
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("declared"),
        "{kinds:?}"
    );
    assert_eq!(kinds[1], "sealed", "{kinds:?}");
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("receipted"),
        "{kinds:?}"
    );
    assert_eq!(count(&kinds, "failed"), 0, "{kinds:?}");
}

/// Crashes a send at `step`, checks the log and the spool, restarts the edge, and returns
/// the deployment, the transfer id and the source file once the transfer has arrived.
fn crash_then_restart(step: &str, restart: Restart) {
    let d = Deployment::new().unwrap();
    let src_dir = d.path("payload");
    std::fs::create_dir_all(&src_dir).unwrap();
    let src: PathBuf = payload(&src_dir, "study.bin", 3 << 20, 31).unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();

    let out = send_crashing_at(&d, &src, step);
    assert_eq!(
        out.status.signal(),
        Some(6),
        "send did not abort at {step}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains(&format!("failpoint {step}: aborting")),
        "{}",
        text(&out.stderr)
    );
    let id = only_transfer(&d.path("spool/edge"));
    assert_edge_log_verifies(&d);
    assert_spool_agrees_with_log(&d, &id);

    match restart {
        Restart::Resume => {
            let out = d.send(&["--no-progress", "--resume", &id]).unwrap();
            assert!(
                out.status.success(),
                "resume after {step}: {}\ngateway log:\n{}",
                text(&out.stderr),
                gateway.log()
            );
            assert_eq!(summary(&out).unwrap()["transfer_id"], id.as_str());
        }
        Restart::Service => {
            let edge: Service = d.serve(&d.edge_config()).unwrap();
            edge.wait_for_log(&["transfer receipted", &id], WAIT);
            assert!(edge.terminate().unwrap().success());
        }
    }
    d.wait_delivered(&id, "study.bin", WAIT);
    assert!(gateway.terminate().unwrap().success());
    assert_delivered(&d, &id, &src);
    assert_edge_log_verifies(&d);
    assert_complete_sequence(&d, &id);
}

#[test]
fn crash_after_the_data_leaves_nothing_sendable_and_a_new_send_arrives() {
    let d = Deployment::new().unwrap();
    let src_dir = d.path("payload");
    std::fs::create_dir_all(&src_dir).unwrap();
    let src = payload(&src_dir, "study.bin", 3 << 20, 32).unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();

    let out = send_crashing_at(&d, &src, "seal:after-data");
    assert_eq!(out.status.signal(), Some(6), "{}", text(&out.stderr));
    let id = only_transfer(&d.path("spool/edge"));
    assert_edge_log_verifies(&d);
    assert_spool_agrees_with_log(&d, &id);
    assert_eq!(
        kinds_of(&d.path("audit/edge/records.log"), &id),
        ["declared"]
    );
    // Not sealed: neither a resume nor a restarted edge sends it.
    let out = d.send(&["--no-progress", "--resume", &id]).unwrap();
    assert!(!out.status.success(), "an unsealed transfer was resumed");
    assert!(
        text(&out.stderr).contains("not a sealed transfer"),
        "{}",
        text(&out.stderr)
    );
    let edge = d.serve(&d.edge_config()).unwrap();
    assert!(edge.terminate().unwrap().success());
    assert!(!d.path("spool/gateway").join(&id).exists());
    // The refused resume is recorded as failed; nothing says sealed or sent.
    assert_eq!(
        kinds_of(&d.path("audit/edge/records.log"), &id),
        ["declared", "failed"]
    );

    // The files are sent again as a new transfer, which arrives intact.
    let (_, again) = d.send_ok(&[&src], &gateway);
    d.wait_delivered(&again, "study.bin", WAIT);
    assert!(gateway.terminate().unwrap().success());
    let got = d.delivered(&again, "study.bin");
    assert_eq!(sha256_file(&src).unwrap(), sha256_file(&got).unwrap());
    assert_complete_sequence(&d, &again);
}

#[test]
fn crash_after_the_manifest_then_restart_records_sealed_before_sending() {
    crash_then_restart("seal:after-manifest", Restart::Service);
}

#[test]
fn crash_after_the_manifest_then_resume_records_sealed_before_sending() {
    crash_then_restart("seal:after-manifest", Restart::Resume);
}

#[test]
fn crash_after_the_sealed_record_then_restart_sends_it() {
    crash_then_restart("seal:after-sealed", Restart::Service);
}

#[test]
fn crash_after_the_sealed_record_then_resume_sends_it() {
    crash_then_restart("seal:after-sealed", Restart::Resume);
}

#[test]
fn crash_once_sealed_then_resume_sends_it() {
    crash_then_restart("seal:after-publish", Restart::Resume);
}

#[test]
fn crash_after_the_sent_record_then_restart_stores_the_receipt() {
    crash_then_restart("send:after-sent", Restart::Service);
}

#[test]
fn crash_after_the_receipted_record_then_resume_stores_the_receipt() {
    crash_then_restart("send:after-receipted", Restart::Resume);
}

/// The hospital API's commit seals through the same function: an edge service killed there
/// comes back, finishes the seal (recording it first) before it scans its spool, and sends
/// the upload.
#[test]
fn edge_service_killed_mid_commit_records_the_seal_and_sends_the_upload_after_restart() {
    let d = Deployment::new().unwrap();
    let api = Api { d: &d };
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"ulimit -c 0; exec "$@""#, "sh"])
        .arg(baylink_bin())
        .args(["serve", "--config"])
        .arg(d.edge_config())
        .env("BAYLINK_FAILPOINT", "seal:after-manifest");
    let edge = Service::start(&mut cmd, d.dir.path()).unwrap();
    let declared = api.declare(
        "hospital-a",
        r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
    );
    assert_eq!(declared.status, 201, "{declared:?}");
    let id = declared.json()["id"].as_str().unwrap().to_owned();
    let src = payload(d.dir.path(), "a.dcm", 700 * 1024, 33).unwrap();
    assert_eq!(api.put("hospital-a", &id, "a.dcm", &src, &[]).status, 201);
    let commit = api.commit("hospital-a", &id);
    assert_eq!(commit.status, 0, "the edge answered the commit: {commit:?}");
    edge.wait_for_log(&["failpoint seal:after-manifest: aborting"], WAIT);
    edge.kill().unwrap();

    assert_edge_log_verifies(&d);
    assert_spool_agrees_with_log(&d, &id);
    let dir = d.path("spool/edge").join(&id);
    assert!(dir.join("manifest.pending").exists() && !dir.join("manifest.bin").exists());

    let gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = d.serve(&d.edge_config()).unwrap();
    api.wait_state(&id, "committed");
    let got = d.wait_delivered(&id, "a.dcm", WAIT);
    assert_eq!(sha256_file(&src).unwrap(), sha256_file(&got).unwrap());
    assert!(gateway.terminate().unwrap().success());
    assert_complete_sequence(&d, &id);
}

/// The gateway killed between its `committed` record and the receipt signature file (the
/// commit point): its log verifies and shows the commit, nothing is delivered, and once
/// restarted it commits again for the still-retrying sender, delivers, and records that.
#[test]
fn gateway_killed_after_the_committed_record_commits_again_and_delivers() {
    let d = Deployment::new().unwrap();
    let src_dir = d.path("payload");
    std::fs::create_dir_all(&src_dir).unwrap();
    let src = payload(&src_dir, "study.bin", 3 << 20, 34).unwrap();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"ulimit -c 0; exec "$@""#, "sh"])
        .arg(baylink_bin())
        .args(["serve", "--config"])
        .arg(d.gateway_config())
        .env("BAYLINK_FAILPOINT", "commit:after-committed");
    let gateway = Service::start(&mut cmd, d.dir.path()).unwrap();
    let sender = d.spawn_send(&src, true).unwrap();
    gateway.wait_for_log(&["failpoint commit:after-committed: aborting"], WAIT);
    gateway.kill().unwrap();

    let id = only_transfer(&d.path("spool/gateway"));
    let out = Command::new(baylink_bin())
        .args(["audit", "verify", "--config"])
        .arg(d.gateway_config())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records = d.path("audit/gateway/records.log");
    assert_eq!(count(&kinds_of(&records, &id), "committed"), 1);
    assert!(
        !d.path("spool/gateway")
            .join(&id)
            .join("receipt.sig")
            .exists()
    );
    assert!(!d.delivered(&id, "study.bin").exists());

    let gateway = d.serve(&d.gateway_config()).unwrap();
    let out = sender.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        gateway.log()
    );
    d.wait_delivered(&id, "study.bin", WAIT);
    assert!(gateway.terminate().unwrap().success());
    assert_delivered(&d, &id, &src);
    let kinds = kinds_of(&records, &id);
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("delivered"),
        "{kinds:?}"
    );
    assert!(count(&kinds, "committed") >= 1, "{kinds:?}");
    assert_complete_sequence(&d, &id);
}
