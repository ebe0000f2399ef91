//! The store's orchestration without HSM, io_uring or network (`crate::test_support`):
//! declare, upload, commit and what each refuses; expiry; recovery at start-up; the status.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use baylink_net::proto::{Limits, Manifest, TransferId};
use bytes::Bytes;

use super::{IngestError, IngestStore, TransferState};
use crate::audit::Kind;
use crate::signing::{MANIFEST_CONTEXT, RECEIPT_CONTEXT, verify_peer};
use crate::test_support::{CHUNK, EdgeFixture, declaration, kinds_of};
use crate::transfer_dir::TransferDir;

const A: &str = "hospital-a";

/// A store over a fresh edge whose sends stop at once: the link is not what these tests
/// are about, and a sealed transfer stays sealed in the spool.
async fn store(extra: &str) -> (EdgeFixture, IngestStore) {
    let f = EdgeFixture::new(extra).await;
    f.edge.stop_sending();
    let store = IngestStore::open(f.edge.clone()).unwrap();
    (f, store)
}

/// Uploads one whole file.
async fn upload(
    store: &IngestStore,
    hospital: &str,
    id: &TransferId,
    name: &str,
    bytes: &[u8],
) -> Result<u64, IngestError> {
    let mut up = store.begin_file(hospital, id, name).await?;
    up.write(Bytes::copy_from_slice(bytes)).await?;
    up.finish().await
}

/// `len` bytes that differ from chunk to chunk.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i / 4096) as u8))
        .collect()
}

fn dir(f: &EdgeFixture, id: &TransferId) -> TransferDir {
    TransferDir::new(&f.spool_dir(), id)
}

#[tokio::test]
async fn declare_upload_commit_seals_a_manifest_of_the_uploaded_bytes() {
    let (f, store) = store("").await;
    let id = store.declare(A, declaration()).await.unwrap();
    assert_eq!(
        store.status(A, &id).await.unwrap().state,
        TransferState::Declared
    );

    let big = payload(3 * CHUNK as usize + 100, 1);
    assert_eq!(
        upload(&store, A, &id, "scan.bin", &big).await.unwrap(),
        big.len() as u64
    );
    upload(&store, A, &id, "notes.txt", b"seen").await.unwrap();
    let st = store.status(A, &id).await.unwrap();
    assert_eq!(st.state, TransferState::Receiving);
    assert_eq!((st.files, st.bytes), (2, big.len() as u64 + 4));

    store.commit(A, &id).await.unwrap();
    let d = dir(&f, &id);
    let bytes = std::fs::read(d.manifest_bin()).unwrap();
    let manifest = Manifest::from_bytes(&bytes, &Limits::default()).unwrap();
    // The manifest is built from the digests taken as the bytes arrived: they must be those
    // of the bytes stored, chunk by chunk, in the order the files were stored (the order
    // they stream to the gateway in).
    let names: Vec<_> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["scan.bin", "notes.txt"]);
    let mut expected: Vec<[u8; 32]> = big
        .chunks(CHUNK as usize)
        .map(|chunk| digest(&SHA256, chunk).as_ref().try_into().unwrap())
        .collect();
    expected.push(digest(&SHA256, b"seen").as_ref().try_into().unwrap());
    assert_eq!(manifest.chunk_digests, expected);
    assert_eq!(std::fs::read(d.data_file("scan.bin")).unwrap(), big);
    assert_eq!(manifest.process_id, "CR-1", "the consent that allowed it");
    assert_eq!(manifest.sender, "edge");
    // Signed with the edge's key under the manifest context, as the gateway checks it.
    let sig = std::fs::read(d.manifest_sig()).unwrap();
    assert!(verify_peer(&f.gateway, MANIFEST_CONTEXT, &bytes, &sig));
    assert!(!verify_peer(&f.gateway, RECEIPT_CONTEXT, &bytes, &sig));

    let stages: Vec<_> = store
        .status(A, &id)
        .await
        .unwrap()
        .stages
        .iter()
        .map(|s| s.stage)
        .collect();
    assert_eq!(
        &stages[..3],
        [
            TransferState::Declared,
            TransferState::Receiving,
            TransferState::Sealed
        ]
    );
    assert_eq!(
        kinds_of(f.dir.path(), &id.to_string()),
        [Kind::Declared, Kind::Sealed]
    );
    f.verify_audit();
}

#[tokio::test]
async fn a_refused_declaration_is_recorded_and_opens_nothing() {
    let (f, store) = store("").await;
    let no_consent = crate::policy::Declaration {
        patient_id: "P-0099".into(),
        ..declaration()
    };
    let Err(IngestError::Refused(r)) = store.declare(A, no_consent).await else {
        panic!("a patient without consent is refused");
    };
    assert_eq!(r.rule, "consent-missing");
    // A hospital not in policy.hospitals is refused whatever it declares.
    let Err(IngestError::Refused(_)) = store.declare("hospital-z", declaration()).await else {
        panic!("an unknown hospital is refused");
    };
    let refused: Vec<_> = crate::test_support::records(f.dir.path())
        .into_iter()
        .filter(|r| r.kind == Kind::Refused)
        .collect();
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0].rule.as_deref(), Some("consent-missing"));
    assert_eq!(refused[0].hospital.as_deref(), Some(A));
    assert!(
        crate::transfer_dir::list(&f.spool_dir(), |_| true).is_empty(),
        "no transfer directory for a refused declaration"
    );
}

#[tokio::test]
async fn bad_file_names_and_duplicates_are_refused_before_any_byte() {
    let (f, store) = store("").await;
    let id = store.declare(A, declaration()).await.unwrap();
    for bad in ["../x", "a/b", ".hidden", "", "nul\0name", &"x".repeat(256)] {
        match store.begin_file(A, &id, bad).await {
            Err(IngestError::BadName(_)) => {}
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let parts = std::fs::read_dir(dir(&f, &id).parts_dir()).unwrap().count();
    assert_eq!(parts, 0, "nothing written for a refused name");
    upload(&store, A, &id, "a.dcm", b"one").await.unwrap();
    match upload(&store, A, &id, "a.dcm", b"two").await {
        Err(IngestError::Conflict(m)) => assert!(m.contains("already uploaded"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The same name may not be uploaded twice at once either.
    let _first = store.begin_file(A, &id, "b.dcm").await.unwrap();
    assert!(matches!(
        store.begin_file(A, &id, "b.dcm").await,
        Err(IngestError::Conflict(_))
    ));
}

#[tokio::test]
async fn commit_needs_a_file_and_no_upload_in_progress_and_happens_once() {
    let (_f, store) = store("").await;
    let id = store.declare(A, declaration()).await.unwrap();
    assert!(matches!(
        store.commit(A, &id).await,
        Err(IngestError::BadRequest(_))
    ));
    let mut open = store.begin_file(A, &id, "a.bin").await.unwrap();
    open.write(Bytes::from_static(b"half")).await.unwrap();
    match store.commit(A, &id).await {
        Err(IngestError::Conflict(m)) => assert!(m.contains("in progress"), "{m}"),
        other => panic!("{other:?}"),
    }
    open.finish().await.unwrap();
    store.commit(A, &id).await.unwrap();
    match store.commit(A, &id).await {
        Err(IngestError::Conflict(m)) => assert!(m.contains("committed"), "{m}"),
        other => panic!("{other:?}"),
    }
    match store.begin_file(A, &id, "late.bin").await {
        Err(IngestError::Conflict(m)) => assert!(m.contains("committed"), "{m}"),
        other => panic!("upload after commit: {other:?}"),
    }
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_and_not_counted() {
    let (_f, store) = store("[ingest]\nmax_upload_bytes = 10000").await;
    let id = store.declare(A, declaration()).await.unwrap();
    upload(&store, A, &id, "a.bin", &payload(8000, 2))
        .await
        .unwrap();
    let mut up = store.begin_file(A, &id, "b.bin").await.unwrap();
    assert!(matches!(
        up.check_len(3000),
        Err(IngestError::TooLarge { limit: 10000 })
    ));
    assert!(matches!(
        up.write(Bytes::from(payload(3000, 3))).await,
        Err(IngestError::TooLarge { limit: 10000 })
    ));
    drop(up);
    // The refused upload's bytes no longer count: 2000 more fit.
    upload(&store, A, &id, "c.bin", &payload(2000, 4))
        .await
        .unwrap();
    let st = store.status(A, &id).await.unwrap();
    assert_eq!((st.files, st.bytes), (2, 10000));
}

#[tokio::test]
async fn the_open_transfer_quota_is_per_hospital() {
    let (_f, store) = store("[quota]\nmax_open_transfers = 1").await;
    let id = store.declare(A, declaration()).await.unwrap();
    match store.declare(A, declaration()).await {
        Err(IngestError::Quota { key, .. }) => assert_eq!(key, "quota.max_open_transfers"),
        other => panic!("{other:?}"),
    }
    store.declare("hospital-b", declaration()).await.unwrap();
    // A committed transfer no longer holds the slot.
    upload(&store, A, &id, "a.bin", b"x").await.unwrap();
    store.commit(A, &id).await.unwrap();
    store.declare(A, declaration()).await.unwrap();
}

#[tokio::test]
async fn another_hospitals_transfer_is_not_found() {
    let (_f, store) = store("").await;
    let id = store.declare(A, declaration()).await.unwrap();
    let b = "hospital-b";
    assert!(matches!(
        store.begin_file(b, &id, "a.bin").await,
        Err(IngestError::NotFound)
    ));
    assert!(matches!(
        store.commit(b, &id).await,
        Err(IngestError::NotFound)
    ));
    assert!(matches!(
        store.status(b, &id).await,
        Err(IngestError::NotFound)
    ));
    assert!(matches!(
        store.status(A, &TransferId::new_v7()).await,
        Err(IngestError::NotFound)
    ));
}

#[tokio::test]
async fn an_idle_transfer_expires_with_a_record_and_refuses_what_follows() {
    let (f, store) = store("").await;
    let id = store.declare(A, declaration()).await.unwrap();
    upload(&store, A, &id, "a.bin", b"bytes").await.unwrap();
    let busy = store.declare(A, declaration()).await.unwrap();
    let _in_progress = store.begin_file(A, &busy, "b.bin").await.unwrap();
    assert_eq!(store.expire_idle(Duration::from_secs(3600)).await, 0);
    assert_eq!(
        store.expire_idle(Duration::ZERO).await,
        1,
        "only the one without an upload in progress"
    );
    let d = dir(&f, &id);
    assert!(d.expired().exists());
    assert!(!d.data_file("a.bin").exists(), "its files are removed");
    let st = store.status(A, &id).await.unwrap();
    assert_eq!(st.state, TransferState::Failed);
    assert!(st.error.unwrap().contains("expired"));
    for res in [
        store.begin_file(A, &id, "c.bin").await.map(drop),
        store.commit(A, &id).await,
    ] {
        match res {
            Err(IngestError::Conflict(m)) => assert!(m.contains("expired"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        kinds_of(f.dir.path(), &id.to_string()),
        [Kind::Declared, Kind::Expired]
    );
}

#[tokio::test]
async fn an_open_transfer_survives_a_restart_without_its_unfinished_upload() {
    let (f, store) = store("").await;
    let id = store.declare(A, declaration()).await.unwrap();
    upload(&store, A, &id, "kept.bin", b"kept").await.unwrap();
    // A crash in the middle of an upload leaves its part file behind.
    let d = dir(&f, &id);
    std::fs::write(d.parts_dir().join("99"), b"half an upload").unwrap();
    // A crash after an upload's payload was renamed into `data/` but before its digest
    // record was: the record is still under its temporary name, and the file was never
    // acknowledged.
    upload(&store, A, &id, "lost.bin", b"lost").await.unwrap();
    let record = super::record_path(&d, "lost.bin");
    let staged = record.with_file_name(format!(
        ".{}.tmp",
        record.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::rename(&record, &staged).unwrap();
    drop(store);

    let store = IngestStore::open(f.edge.clone()).unwrap();
    assert_eq!(std::fs::read_dir(d.parts_dir()).unwrap().count(), 0);
    assert!(
        !staged.exists(),
        "a temporary record is removed at recovery"
    );
    let st = store.status(A, &id).await.unwrap();
    assert_eq!((st.files, st.bytes), (1, 4));
    store.commit(A, &id).await.unwrap();
    let m = TransferDir::new(&f.spool_dir(), &id).manifest().unwrap();
    assert_eq!(m.files.len(), 1);
    assert_eq!(m.files[0].name, "kept.bin");
    // A sealed transfer is not reopened by the next start.
    let store = IngestStore::open(f.edge.clone()).unwrap();
    assert!(matches!(
        store.begin_file(A, &id, "more.bin").await,
        Err(IngestError::Conflict(_))
    ));
}

#[tokio::test]
async fn the_policy_size_limit_refuses_a_commit_and_keeps_the_transfer_open() {
    let (f, store) = store("max_files = 1").await;
    let id = store.declare(A, declaration()).await.unwrap();
    upload(&store, A, &id, "a.bin", b"a").await.unwrap();
    upload(&store, A, &id, "b.bin", b"b").await.unwrap();
    let Err(IngestError::Refused(r)) = store.commit(A, &id).await else {
        panic!("two files over policy.max_files = 1");
    };
    assert_eq!(r.rule, "size-limit");
    assert!(!dir(&f, &id).manifest_bin().exists(), "nothing sealed");
    assert_eq!(
        kinds_of(f.dir.path(), &id.to_string()),
        [Kind::Declared, Kind::Refused]
    );
    // Still open: the hospital may abandon it.
    store.abandon(A, &id).await.unwrap();
    assert!(!dir(&f, &id).root().exists());
}

/// The C-STORE door writes each instance into the transfer as it arrives and asks whether it
/// fits the policy's limits once it is whole, counted with its bytes so far, before it is
/// kept (and answered Success). One dropped no longer counts, and leaves nothing behind.
#[tokio::test]
async fn a_file_over_the_policy_limits_is_refused_before_it_is_kept_and_leaves_nothing() {
    let (f, store) = store("max_files = 3\nmax_transfer_bytes = 8").await;
    let id = store.declare(A, declaration()).await.unwrap();
    upload(&store, A, &id, "a.bin", b"a").await.unwrap();
    let mut b = store.begin_file(A, &id, "b.bin").await.unwrap();
    b.write(Bytes::from_static(b"bb")).await.unwrap();
    b.check_room().await.unwrap();
    b.finish().await.unwrap();
    // 3 + 6 bytes would pass policy.max_transfer_bytes: refused, and recorded, unkept.
    let mut c = store.begin_file(A, &id, "c.bin").await.unwrap();
    c.write(Bytes::from_static(b"cccccc")).await.unwrap();
    let Err(IngestError::Refused(r)) = c.check_room().await else {
        panic!("9 bytes over policy.max_transfer_bytes = 8");
    };
    assert_eq!(r.rule, "size-limit");
    drop(c);
    // Dropped: its name is free and its bytes no longer count (3 + 5 fits).
    let mut c = store.begin_file(A, &id, "c.bin").await.unwrap();
    c.write(Bytes::from_static(b"ccccc")).await.unwrap();
    c.check_room().await.unwrap();
    c.finish().await.unwrap();
    // A fourth file passes policy.max_files, however small.
    let d = store.begin_file(A, &id, "d.bin").await.unwrap();
    let Err(IngestError::Refused(r)) = d.check_room().await else {
        panic!("a fourth file over policy.max_files = 3");
    };
    assert_eq!(r.rule, "size-limit");
    drop(d);
    // The dropped uploads' part files go.
    let parts = dir(&f, &id).parts_dir();
    for _ in 0..100 {
        if std::fs::read_dir(&parts).unwrap().count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::fs::read_dir(&parts).unwrap().count(),
        0,
        "part file left"
    );
    let st = store.status(A, &id).await.unwrap();
    assert_eq!((st.files, st.bytes), (3, 8));
    assert_eq!(
        kinds_of(f.dir.path(), &id.to_string()),
        [Kind::Declared, Kind::Refused, Kind::Refused]
    );
}

/// An upload whose client pauses holds only the buffer it is filling: each write gives its
/// buffer back to the pool when done, or a few slow C-STORE SCUs could take the whole pool
/// from every other upload, seal and send.
#[tokio::test]
async fn a_paused_upload_holds_one_pool_buffer() {
    let (f, store) = store("").await;
    let spool = f.edge.spool().clone();
    let free = || {
        let held: Vec<_> = std::iter::from_fn(|| spool.try_buffer()).collect();
        held.len()
    };
    let all = free();
    let id = store.declare(A, declaration()).await.unwrap();
    let mut up = store.begin_file(A, &id, "slow.bin").await.unwrap();
    // Three buffers' writes, then a little: the client pauses there.
    let size = spool.buffer_size();
    up.write(Bytes::from(payload(3 * size + 10, 7)))
        .await
        .unwrap();
    let mut left = 0;
    for _ in 0..200 {
        left = free();
        if left == all - 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        left,
        all - 1,
        "a paused upload holds {} buffers",
        all - left
    );
    up.finish().await.unwrap();
    assert_eq!(free(), all);
}

/// The gateway's notice is stored before its stage is written (the step runs on its own
/// task): a status read between the two already shows the stage the notice brings, with the
/// time it was stored, and the step that follows writes the same stage at the same time.
#[tokio::test]
async fn a_stored_notice_shows_its_stage_before_the_stage_is_written() {
    use baylink_net::proto::{DeliveryNotice, Outcome};

    let (f, store) = store("").await;
    let id = store.declare(A, declaration()).await.unwrap();
    upload(&store, A, &id, "scan.bin", &payload(1000, 2))
        .await
        .unwrap();
    store.commit(A, &id).await.unwrap();
    // The send starts and stops at once (`store`); the transfer stays `sending`.
    let mut changes = store.inner.changes.subscribe();
    while store.status(A, &id).await.unwrap().state != TransferState::Sending {
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .expect("the send starts")
            .unwrap();
    }
    let d = dir(&f, &id);
    // What a verified receipt leaves behind (its contents are not what this is about).
    std::fs::write(d.receipt_bin(), b"receipt").unwrap();
    std::fs::write(d.receipt_sig(), b"signature").unwrap();
    store.add_stage(&id, TransferState::Committed, None).await;

    let notice = DeliveryNotice::new(
        id,
        [1; 32],
        [2; 32],
        Outcome::Delivered,
        b"stored",
        "gateway",
        1,
    );
    std::fs::write(d.notice_bin(), notice.to_bytes()).unwrap();
    std::fs::write(d.notice_sig(), b"signature").unwrap();
    let stages = |st: &super::TransferStatus| -> Vec<(TransferState, String)> {
        st.stages.iter().map(|s| (s.stage, s.at.clone())).collect()
    };

    let before = store.status(A, &id).await.unwrap();
    assert_eq!(before.state, TransferState::Delivered);
    let shown = stages(&before);
    assert_eq!(
        shown[shown.len() - 2..]
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        [TransferState::Committed, TransferState::Delivered]
    );

    store.delivery_noticed(&notice).await;
    let after = store.status(A, &id).await.unwrap();
    assert_eq!(after.state, TransferState::Delivered);
    assert_eq!(stages(&after), shown, "written as it was shown");
}
