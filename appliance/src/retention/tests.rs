//! Unit tests of spool retention, with a real audit log signed by a SoftHSM key.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};

use baylink_net::proto::{ChunkHasher, ManifestBuilder, TransferId};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A spool and an audit log signed by a SoftHSM key. Field order is drop order.
struct Fixture {
    spool: tempfile::TempDir,
    log: audit::Log,
    audit: audit::testing::Fixture,
}

impl Fixture {
    fn new() -> Fixture {
        let audit = audit::testing::Fixture::new();
        Fixture {
            spool: tempfile::tempdir().unwrap(),
            log: audit.open(64),
            audit,
        }
    }

    /// A transfer with one 10-byte file and a manifest; `finished` names the marker that says
    /// it finished (`receipt.sig` + `receipt.bin`, or `delivered`), dated `age` ago.
    fn transfer(&self, finished: &[&str], age: Duration) -> TransferDir {
        let id = TransferId::new_v7();
        let dir = TransferDir::new(self.spool.path(), &id);
        dir.create().unwrap();
        fs::write(dir.data_file("a.dcm"), b"0123456789").unwrap();
        let mut hasher = ChunkHasher::new(4096);
        hasher.update(b"0123456789");
        let mut b = ManifestBuilder::new(id, "edge", [7; 32], "C-1", 4096);
        b.add_file("a.dcm", 10, hasher.finish()).unwrap();
        fs::write(dir.manifest_bin(), b.finish(1).unwrap().to_bytes()).unwrap();
        for name in finished {
            let path = dir.root().join(name);
            fs::write(&path, b"x").unwrap();
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(SystemTime::now() - age)
                .unwrap();
        }
        dir
    }

    fn sweep(&self, role: Role, retain: Duration) -> Sweep {
        sweep(
            self.spool.path(),
            role,
            retain,
            SystemTime::now(),
            &self.log,
        )
    }

    /// The `expired` records in the log, after checking the whole log verifies.
    fn expired_records(&self) -> Vec<audit::Record> {
        self.log.checkpoint_blocking().unwrap();
        self.audit.verify().unwrap();
        let text = match fs::read(self.audit.path(audit::RECORDS_FILE)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("{e}"),
        };
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| audit::record::parse_line(l).unwrap().0)
            .filter(|r| r.kind == Kind::Expired)
            .collect()
    }
}

fn has_payload(dir: &TransferDir) -> bool {
    dir.data_dir().exists()
}

#[test]
#[serial_test::serial]
fn the_gateway_removes_the_payload_of_delivered_transfers_once_retained_long_enough() {
    let f = Fixture::new();
    let old = f.transfer(
        &[
            "receipt.bin",
            "receipt.sig",
            "delivered",
            "notice.bin",
            "notice.sig",
        ],
        2 * DAY,
    );
    let young = f.transfer(
        &[
            "receipt.bin",
            "receipt.sig",
            "delivered",
            "notice.bin",
            "notice.sig",
        ],
        DAY / 2,
    );
    let committed = f.transfer(&["receipt.bin", "receipt.sig"], 9 * DAY);
    let refused = f.transfer(&["receipt.bin", "receipt.sig", "undeliverable"], 9 * DAY);
    let receiving = f.transfer(&[], 9 * DAY);
    // Delivered, but the edge has not acknowledged the notice, or it is not signed yet.
    let unacknowledged = f.transfer(
        &[
            "receipt.bin",
            "receipt.sig",
            "delivered",
            "notice.bin",
            "notice.sig",
            "notice.pending",
        ],
        9 * DAY,
    );
    let unsigned = f.transfer(&["receipt.bin", "receipt.sig", "delivered"], 9 * DAY);

    let done = f.sweep(Role::Gateway, DAY);
    assert_eq!(
        done,
        Sweep {
            pruned: 1,
            bytes: 10,
            failed: 0
        }
    );
    assert!(!has_payload(&old));
    let reason = fs::read_to_string(old.pruned()).unwrap();
    assert!(reason.contains("1day after delivery"), "{reason}");
    // The evidence stays.
    assert!(old.has_receipt() && old.manifest_bin().exists() && old.delivered().exists());
    for kept in [
        &young,
        &committed,
        &refused,
        &receiving,
        &unacknowledged,
        &unsigned,
    ] {
        assert!(
            has_payload(kept),
            "{} lost its payload",
            kept.root().display()
        );
        assert!(!kept.pruned().exists());
    }

    let records = f.expired_records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    let m = old.manifest().unwrap();
    assert_eq!(
        r.transfer.as_deref(),
        Some(m.transfer_id.to_string().as_str())
    );
    assert_eq!(r.peer.as_deref(), Some("edge"));
    assert_eq!(r.merkle_root, Some(hex::encode(m.merkle_root)));
    assert!(r.detail.as_deref().unwrap().contains("spool.retain"));

    // A second sweep has nothing left to do.
    assert_eq!(f.sweep(Role::Gateway, DAY), Sweep::default());
    assert_eq!(f.expired_records().len(), 1);
}

#[test]
#[serial_test::serial]
fn the_edge_removes_the_payload_of_receipted_transfers_only() {
    let f = Fixture::new();
    let receipted = f.transfer(&["receipt.bin", "receipt.sig"], DAY);
    // A receipt without its signature is not a verified receipt.
    let half = f.transfer(&["receipt.bin"], 9 * DAY);
    let sealed = f.transfer(&[], 9 * DAY);
    fs::create_dir_all(receipted.parts_dir()).unwrap();

    let done = f.sweep(Role::Edge, Duration::ZERO);
    assert_eq!(done.pruned, 1);
    assert!(!has_payload(&receipted) && !receipted.parts_dir().exists());
    assert!(has_payload(&half) && has_payload(&sealed));
    let records = f.expired_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].peer, None, "the edge is not its own peer");
    assert!(
        records[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("after receipt")
    );
}

#[test]
#[serial_test::serial]
fn a_removal_cut_short_is_finished_without_a_second_record() {
    let f = Fixture::new();
    let dir = f.transfer(
        &[
            "receipt.bin",
            "receipt.sig",
            "delivered",
            "notice.bin",
            "notice.sig",
        ],
        DAY,
    );
    assert_eq!(f.sweep(Role::Gateway, DAY).pruned, 1);
    // As if the process died after the marker, before the files were gone.
    fs::create_dir_all(dir.data_dir()).unwrap();
    fs::write(dir.data_file("a.dcm"), b"0123456789").unwrap();

    let done = f.sweep(Role::Gateway, DAY);
    assert_eq!((done.pruned, done.bytes), (1, 10));
    assert!(!has_payload(&dir));
    assert_eq!(f.expired_records().len(), 1);
}

#[test]
#[serial_test::serial]
fn a_finish_time_in_the_future_is_not_due_and_a_bad_manifest_is_reported() {
    let f = Fixture::new();
    let future = f.transfer(&["delivered", "notice.bin", "notice.sig"], Duration::ZERO);
    File::options()
        .write(true)
        .open(future.delivered())
        .unwrap()
        .set_modified(SystemTime::now() + DAY)
        .unwrap();
    let broken = f.transfer(&["delivered", "notice.bin", "notice.sig"], 2 * DAY);
    fs::write(broken.manifest_bin(), b"not a manifest").unwrap();

    let done = f.sweep(Role::Gateway, DAY);
    assert_eq!((done.pruned, done.failed), (0, 1));
    assert!(has_payload(&future) && has_payload(&broken));
    assert!(
        !broken.pruned().exists(),
        "nothing is removed without its record"
    );
    assert!(f.expired_records().is_empty());
}

#[test]
fn the_sweep_interval_follows_the_retention_within_bounds() {
    assert_eq!(interval(None), Duration::from_secs(60));
    assert_eq!(interval(Some(Duration::ZERO)), Duration::from_secs(1));
    assert_eq!(
        interval(Some(Duration::from_secs(20))),
        Duration::from_secs(5)
    );
    assert_eq!(interval(Some(DAY)), Duration::from_secs(60));
}

#[test]
fn the_spool_space_is_read_from_its_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let (capacity, available) = spool_space(dir.path()).unwrap();
    assert!(
        capacity > 0 && available <= capacity,
        "{capacity} {available}"
    );
    assert!(spool_space(&dir.path().join("missing")).is_err());
}
