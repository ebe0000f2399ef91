//! The background sender's slots (`transport.max_transfers`): a failing or slow transfer
//! holds only its own slot, and a hospital's study is not kept waiting behind another
//! hospital's transfers. Real edge and gateway, hospital uploads over HTTPS with curl.

use std::path::Path;
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, Service, payload};
use serde_json::Value;

use crate::ingest::Api;

const GOOD: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;

/// How long one transfer may take to reach a state here (a large one included).
const LIMIT: Duration = Duration::from_secs(120);

/// Declares a transfer as `who`.
fn declare(api: &Api<'_>, who: &str) -> String {
    let a = api.declare(who, GOOD);
    assert_eq!(a.status, 201, "{a:?}");
    a.json()["id"].as_str().unwrap().to_owned()
}

/// Uploads `file` as `name` into transfer `id` and commits it.
fn upload_and_commit(api: &Api<'_>, who: &str, id: &str, name: &str, file: &Path) {
    let put = api.put(who, id, name, file, &[]);
    assert_eq!(put.status, 201, "{put:?}");
    let commit = api.commit(who, id);
    assert_eq!(commit.status, 202, "{commit:?}");
}

/// Waits until `done` holds for `who`'s transfer `id` (within [`LIMIT`]): the status now,
/// then long polls (each answers at the next change, or after 10 s).
fn wait_until(
    api: &Api<'_>,
    who: &str,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    let mut s = api.status(who, id).json();
    loop {
        if done(&s) {
            return s;
        }
        assert!(
            s["state"] != "failed" && s["state"] != "refused",
            "transfer {id} ended as {s}"
        );
        assert!(
            start.elapsed() < LIMIT,
            "transfer {id} not {what} within {LIMIT:?}: {s}"
        );
        s = api.status_after_change(who, id, 10).json();
    }
}

fn committed(s: &Value) -> bool {
    s["state"] == "committed" || s["state"] == "delivered"
}

fn state(api: &Api<'_>, who: &str, id: &str) -> String {
    api.status(who, id).json()["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Makes the gateway unable to store transfer `id` for a reason a retry can fix: a plain
/// file where its spool directory would be created. The gateway answers the offer
/// `Internal` ("Not a directory"), and the edge retries for `transport.retry_for`.
fn block_at_gateway(d: &Deployment, id: &str) -> std::path::PathBuf {
    let path = d.path(&format!("spool/gateway/{id}"));
    std::fs::write(&path, b"not a directory").unwrap();
    path
}

/// Waits until the edge logged `n` retries of a lost link (each failed offer of a blocked
/// transfer is one).
fn wait_for_retries(edge: &Service, n: usize) {
    let start = Instant::now();
    while edge.log().matches("link lost; will resume").count() < n {
        assert!(
            start.elapsed() < LIMIT,
            "fewer than {n} retries within {LIMIT:?}:\n{}",
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A transfer the gateway keeps failing (retryable, so the edge retries it) holds one send
/// slot; a good transfer committed after it goes through meanwhile, and the failing one
/// goes through once the gateway can store it. With one slot (the sender before
/// `transport.max_transfers`) the good one waited for the other's `retry_for` (10 min).
#[test]
fn a_failing_transfer_does_not_delay_a_good_one() {
    let d = Deployment::new().unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let bad_file = payload(d.dir.path(), "stuck.bin", 1 << 20, 1).unwrap();
    let good_file = payload(d.dir.path(), "good.bin", 1 << 20, 2).unwrap();

    let stuck = declare(&api, "hospital-a");
    let blocked = block_at_gateway(&d, &stuck);
    upload_and_commit(&api, "hospital-a", &stuck, "stuck.bin", &bad_file);
    wait_for_retries(&edge, 1);
    assert_eq!(state(&api, "hospital-a", &stuck), "sending");

    let good = declare(&api, "hospital-a");
    upload_and_commit(&api, "hospital-a", &good, "good.bin", &good_file);
    wait_until(&api, "hospital-a", &good, "committed", committed);
    assert_eq!(
        state(&api, "hospital-a", &stuck),
        "sending",
        "the failing transfer is still being retried"
    );

    // The gateway can store it again: the retry (at most 10 s away) goes through.
    std::fs::remove_file(blocked).unwrap();
    wait_until(&api, "hospital-a", &stuck, "committed", committed);
}

/// Hospital A's large transfer is sending when hospital B commits a small study: B's study
/// is committed while A's transfer is still sending. Chunks of 64 KiB, one in flight, make
/// A's send of 512 MiB last long enough to watch (about 8,000 round trips); before
/// `transport.max_transfers` B's study waited for all of A's.
#[test]
fn a_small_study_is_committed_while_another_hospitals_large_transfer_is_sending() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "transport", "chunk_size", "65536")
        .unwrap();
    d.set("edge.toml", "transport", "max_in_flight", "1")
        .unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let large_file = payload(d.dir.path(), "large.bin", 512 << 20, 3).unwrap();
    let small_file = payload(d.dir.path(), "small.bin", 1 << 20, 4).unwrap();

    let large = declare(&api, "hospital-a");
    upload_and_commit(&api, "hospital-a", &large, "large.bin", &large_file);
    std::fs::remove_file(&large_file).unwrap();
    wait_until(&api, "hospital-a", &large, "sending", |s| {
        s["state"] == "sending" || committed(s)
    });
    assert_eq!(
        state(&api, "hospital-a", &large),
        "sending",
        "the large transfer went through before the small study began: make it larger"
    );

    let started = Instant::now();
    let small = declare(&api, "hospital-b");
    upload_and_commit(&api, "hospital-b", &small, "small.bin", &small_file);
    wait_until(&api, "hospital-b", &small, "committed", committed);
    let took = started.elapsed();
    let large_state = state(&api, "hospital-a", &large);
    assert_eq!(
        large_state, "sending",
        "hospital B's study took {took:?} and was committed only after A's large transfer"
    );
    let sending_for = wait_until(&api, "hospital-a", &large, "committed", committed);
    eprintln!(
        "hospital B's study took {took:?}; A's transfer: {}",
        sending_for["stages"]
    );
}

/// Hospital A holds every send slot with transfers the gateway cannot store yet (they
/// retry); hospital B's study still goes through, because A's most recently started
/// transfer yields its slot, and A's transfers all go through afterwards, the yielded one
/// resuming. With one slot and no yielding, B's study waited for A's `retry_for`.
#[test]
fn a_hospital_holding_every_slot_yields_one_to_another_hospitals_study() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "transport", "max_transfers", "2")
        .unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };

    let mut held = Vec::new();
    for n in 0..2 {
        let f = payload(d.dir.path(), &format!("a{n}.bin"), 1 << 20, 10 + n).unwrap();
        let id = declare(&api, "hospital-a");
        let blocked = block_at_gateway(&d, &id);
        upload_and_commit(&api, "hospital-a", &id, "a.bin", &f);
        held.push((id, blocked));
    }
    // Both hold a slot (`sending`) and are being retried.
    for (id, _) in &held {
        wait_until(&api, "hospital-a", id, "sending", |s| {
            s["state"] == "sending"
        });
    }
    wait_for_retries(&edge, 2);

    let f = payload(d.dir.path(), "b.bin", 1 << 20, 20).unwrap();
    let study = declare(&api, "hospital-b");
    upload_and_commit(&api, "hospital-b", &study, "b.bin", &f);
    wait_until(&api, "hospital-b", &study, "committed", committed);
    edge.wait_for_log(&["asking a send to yield its slot"], LIMIT);
    let metrics = d.metrics(false).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("baylink_send_yields_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    for (_, blocked) in &held {
        std::fs::remove_file(blocked).unwrap();
    }
    for (id, _) in &held {
        wait_until(&api, "hospital-a", id, "committed", committed);
    }
}
