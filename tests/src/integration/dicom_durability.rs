//! The C-STORE guarantee: every instance the edge answered Success (0x0000) reaches the
//! gateway, however the association ends. A scripted SCU (`dicom::RawScu`) stores instances,
//! then aborts, drops its connection as a killed process would, or stays silent; and the edge
//! itself is killed with SIGKILL mid-association. Each time, the acknowledged instances are
//! delivered byte-identical (their data sets; the edge writes its own file meta group), the
//! transfer's status says how the association ended, and a refused instance is never sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baylink_tests::{Deployment, Service};

use super::dicom::{
    RawScu, data_set, delivered_transfers, instance, sop_uid, spool_transfers, start,
    wait_for_delivery,
};

/// `<SOP Instance UID>.dcm` of test instances `ns`.
fn names(ns: impl IntoIterator<Item = u32>) -> Vec<String> {
    ns.into_iter()
        .map(|n| format!("{}.dcm", sop_uid(n)))
        .collect()
}

/// Asserts that delivered transfer `t` holds instance `n` with exactly `ds` as its data set.
fn assert_delivered(t: &Path, n: u32, ds: &[u8]) {
    let got = t.join(format!("{}.dcm", sop_uid(n)));
    assert!(
        data_set(&got) == ds,
        "instance {n}: the delivered data set differs from the one the SCU sent"
    );
}

/// The edge's status of transfer `id` (what `GET /v1/transfers/{id}` answers).
fn edge_status(d: &Deployment, id: &str) -> serde_json::Value {
    let text = std::fs::read(d.path("spool/edge").join(id).join("status.json")).unwrap();
    serde_json::from_slice(&text).unwrap()
}

/// The `detail` of the edge's `sealed` audit record of transfer `id`.
fn sealed_detail(d: &Deployment, id: &str) -> Option<String> {
    std::fs::read_to_string(d.path("audit/edge/records.log"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.split_once(' ')?.1).ok())
        .find(|r| r["kind"] == "sealed" && r["transfer"] == id)
        .and_then(|r| r["detail"].as_str().map(str::to_owned))
}

/// The transfer id of a delivered transfer directory (`delivered/<id>`).
fn transfer_id(t: &Path) -> String {
    t.file_name().unwrap().to_string_lossy().into_owned()
}

/// The data sets of test instances 1..=`n` of patient P-0001.
fn data_sets(d: &Deployment, n: u32) -> Vec<Vec<u8>> {
    let src = d.path("instances");
    (1..=n)
        .map(|i| data_set(&instance(&src, i, Some("P-0001"))))
        .collect()
}

/// Stores instances `first..first + count` (data sets `ds[i - 1]`), each answered Success.
fn store_acknowledged(scu: &mut RawScu, ds: &[Vec<u8>], first: u32, count: u32) {
    for (k, n) in (first..first + count).enumerate() {
        let status = scu.store(k as u16 + 1, &sop_uid(n), &ds[n as usize - 1]);
        assert_eq!(status, 0x0000, "instance {n} answered Success");
    }
}

/// Waits for the delivered transfer holding exactly `ns`, checks each data set and the way the
/// association ended (status and `sealed` audit record); returns its directory.
fn check_delivered(
    d: &Deployment,
    edge: &Service,
    ns: std::ops::RangeInclusive<u32>,
    ds: &[Vec<u8>],
    end: &str,
) -> PathBuf {
    let t = wait_for_delivery(d, &names(ns.clone()), edge);
    for n in ns {
        assert_delivered(&t, n, &ds[n as usize - 1]);
    }
    let id = transfer_id(&t);
    let status = edge_status(d, &id);
    assert_eq!(status["association_end"], end, "{status}");
    assert_eq!(
        sealed_detail(d, &id).as_deref(),
        Some(format!("C-STORE association ended: {end}").as_str()),
        "the sealed audit record says how the association ended"
    );
    t
}

#[test]
fn acknowledged_instances_are_delivered_when_the_scu_aborts_or_is_killed() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let ds = data_sets(&d, 20);
    let other_patient = data_set(&instance(&d.path("instances"), 30, Some("P-0099")));

    // Ten instances answered Success, one refused (another patient), then A-ABORT.
    let mut a = RawScu::associate(&d, "HOSPITAL-A");
    store_acknowledged(&mut a, &ds, 1, 10);
    assert_eq!(a.store(11, &sop_uid(30), &other_patient), 0x0124);
    a.abort();
    check_delivered(&d, &edge, 1..=10, &ds, "aborted-by-peer");

    // Ten instances answered Success, then the SCU dies: its socket closes without A-ABORT or
    // A-RELEASE, as when storescu is killed with SIGKILL. An eleventh instance was on its way
    // (command and part of its data set): never answered, never sent.
    let mut b = RawScu::associate(&d, "HOSPITAL-A");
    store_acknowledged(&mut b, &ds, 11, 10);
    b.store_command(11, &sop_uid(21));
    b.pdv(false, false, &ds[0][..100]);
    drop(b);
    check_delivered(&d, &edge, 11..=20, &ds, "connection-lost");

    assert_eq!(
        delivered_transfers(&d).len(),
        2,
        "one transfer per association"
    );
    for t in delivered_transfers(&d) {
        assert!(
            !t.join(format!("{}.dcm", sop_uid(30))).exists(),
            "the refused instance was sent"
        );
    }
    let log = edge.log();
    assert_eq!(
        log.matches("association aborted; the instances answered Success are sealed and sent")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(spool_transfers(&d), 2);
    let metrics = d.metrics(false).unwrap();
    for end in ["aborted-by-peer", "connection-lost"] {
        assert!(
            metrics.contains(&format!(
                "baylink_dicom_associations_total{{end=\"{end}\"}} 1"
            )),
            "{metrics}"
        );
    }
}

#[test]
fn acknowledged_instances_are_delivered_after_the_edge_is_killed_mid_association() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let ds = data_sets(&d, 7);

    // Seven instances answered Success; the association is still open when the edge dies.
    let mut a = RawScu::associate(&d, "HOSPITAL-A");
    store_acknowledged(&mut a, &ds, 1, 7);
    edge.kill().unwrap();
    drop(a);
    assert!(delivered_transfers(&d).is_empty());

    let edge = d.serve(&d.edge_config()).expect("edge restarts");
    let t = check_delivered(&d, &edge, 1..=7, &ds, "interrupted-by-restart");
    edge.wait_for_log(
        &[
            "C-STORE transfer left open by the last run",
            &transfer_id(&t),
            "files=7",
            "association_end=interrupted-by-restart",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(delivered_transfers(&d).len(), 1);
}

#[test]
fn an_idle_association_is_aborted_and_its_acknowledged_instances_delivered() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "ingest", "dicom_idle_timeout", "\"1s\"")
        .unwrap();
    let (_gateway, edge) = start(&d);
    let ds = data_sets(&d, 3);

    let mut a = RawScu::associate(&d, "HOSPITAL-A");
    store_acknowledged(&mut a, &ds, 1, 3);
    // Silent from here on: the idle time-out ends the association.
    check_delivered(&d, &edge, 1..=3, &ds, "idle-timeout");
    drop(a);
}

#[test]
fn a_seal_that_fails_at_release_is_retried_and_nothing_is_dropped() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let ds = data_sets(&d, 4);

    let mut a = RawScu::associate(&d, "HOSPITAL-A");
    store_acknowledged(&mut a, &ds, 1, 4);
    // The association's transfer is open in the spool; a directory where the manifest's
    // signature goes makes sealing fail (as a full or failing disk would).
    let open = super::ingest::transfers(&d);
    assert_eq!(open.len(), 1, "{open:?}");
    let blocker = open[0].join("manifest.sig");
    std::fs::create_dir_all(blocker.join("x")).unwrap();

    // The release is answered: the instances stay in the spool and sealing is retried.
    a.release();
    edge.wait_for_log(
        &[
            "sealing failed, retrying in the background",
            "association_end=released",
        ],
        Duration::from_secs(60),
    );
    edge.wait_for_log(
        &["association transfer not sealed yet; retrying"],
        Duration::from_secs(60),
    );
    assert!(delivered_transfers(&d).is_empty());

    // The fault passes: the next attempt seals and sends all four.
    std::fs::remove_dir_all(&blocker).unwrap();
    check_delivered(&d, &edge, 1..=4, &ds, "released");
    edge.wait_for_log(
        &["association transfer sealed on a retry"],
        Duration::from_secs(60),
    );
}
