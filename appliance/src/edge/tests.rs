//! The edge's handling of what the gateway signs, and of its own spool, without HSM,
//! io_uring or network (`crate::test_support`): the receipt check, a resumed transfer whose
//! receipt is already stored, the checkpoint's refusal before anything is sealed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use baylink_net::proto::{Receipt, TransferId};

use super::{Edge, NoObserver, SendFailure, SendRequest};
use crate::audit::Kind;
use crate::link::send::{Delivered, Outgoing};
use crate::seal::{SealJob, SealProgress, seal_files};
use crate::signing::testing::pair;
use crate::signing::{MANIFEST_CONTEXT, RECEIPT_CONTEXT, Sign};
use crate::test_support::{CHUNK, EdgeFixture, declaration, kinds_of};
use crate::transfer_dir::TransferDir;

struct Quiet;

impl SealProgress for Quiet {
    fn copied(&self, _: u64) {}
}

/// Seals two files into the edge's spool as `send` does; returns the transfer's directory
/// and what the sender would send.
async fn sealed(f: &EdgeFixture) -> (TransferDir, Outgoing) {
    let src = f.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files = vec![src.join("ct-1.dcm"), src.join("ct-2.dcm")];
    std::fs::write(&files[0], vec![7u8; 2 * CHUNK as usize + 5]).unwrap();
    std::fs::write(&files[1], b"second").unwrap();
    let id = TransferId::new_v7();
    let declaration = crate::policy::Declaration {
        consent_ref: Some("CR-1".into()),
        ..declaration()
    };
    let dir = TransferDir::new(&f.spool_dir(), &id);
    let job = SealJob {
        id,
        sender: "edge",
        declaration: &declaration,
        files: &files,
        chunk_size: CHUNK,
        tap: None,
    };
    let e = &f.edge;
    let out = seal_files(e.spool(), &dir, &job, e.keys(), e.audit(), &Quiet)
        .await
        .unwrap();
    (dir, out)
}

/// The receipt the gateway would sign for `out`.
fn receipt_of(out: &Outgoing) -> Receipt {
    Receipt {
        transfer_id: out.manifest.transfer_id,
        merkle_root: out.manifest.merkle_root,
        manifest_digest: out.manifest.digest(),
        process_id: out.manifest.process_id.clone(),
        receiver: "gateway".into(),
        committed_unix_ms: 1,
    }
}

async fn delivered(keys: &dyn Sign, context: &[u8], r: &Receipt) -> Delivered {
    let bytes = r.to_bytes();
    let signature = keys.sign(context, &bytes).await.unwrap();
    Delivered {
        receipt: bytes.into(),
        signature: signature.into(),
    }
}

fn refused(edge: &Edge, out: &Outgoing, d: &Delivered) -> String {
    match edge.verify_receipt(out, d) {
        Err(SendFailure::BadReceipt(why)) => why,
        other => panic!("a receipt that must be refused: {other:?}"),
    }
}

#[tokio::test]
async fn sealing_stores_hashes_and_signs_what_the_gateway_checks() {
    let f = EdgeFixture::new("").await;
    let (dir, out) = sealed(&f).await;
    let m = &out.manifest;
    assert_eq!(
        m.chunk_count(),
        4,
        "3 chunks of the first file, 1 of the second"
    );
    assert_eq!(m.process_id, "CR-1");
    assert_eq!(
        std::fs::read(dir.data_file("ct-1.dcm")).unwrap(),
        vec![7u8; 2 * CHUNK as usize + 5]
    );
    assert_eq!(
        std::fs::read(dir.manifest_bin()).unwrap(),
        out.manifest_bytes
    );
    assert!(crate::signing::verify_peer(
        &f.gateway,
        MANIFEST_CONTEXT,
        &out.manifest_bytes,
        &out.signature
    ));
    assert_eq!(
        kinds_of(f.dir.path(), &m.transfer_id.to_string()),
        [Kind::Sealed]
    );
    f.verify_audit();
}

#[tokio::test]
async fn a_receipt_is_accepted_only_from_the_pinned_gateway_for_this_transfer() {
    let f = EdgeFixture::new("").await;
    let (_, out) = sealed(&f).await;
    let edge = &f.edge;
    let good = receipt_of(&out);
    edge.verify_receipt(&out, &delivered(&f.gateway, RECEIPT_CONTEXT, &good).await)
        .unwrap();

    let (stranger, _) = pair();
    let why = refused(
        edge,
        &out,
        &delivered(&stranger, RECEIPT_CONTEXT, &good).await,
    );
    assert!(why.contains("pinned gateway key"), "{why}");
    // The gateway's signature over the same bytes as another kind of object.
    refused(
        edge,
        &out,
        &delivered(&f.gateway, MANIFEST_CONTEXT, &good).await,
    );
    let mut flipped = delivered(&f.gateway, RECEIPT_CONTEXT, &good).await;
    let mut bytes = flipped.receipt.to_vec();
    bytes[20] ^= 1;
    flipped.receipt = bytes.into();
    refused(edge, &out, &flipped);

    // Signed by the right key, but not a receipt of this transfer as sealed.
    for (what, r) in [
        (
            "another transfer",
            Receipt {
                transfer_id: TransferId::new_v7(),
                ..receipt_of(&out)
            },
        ),
        (
            "Merkle root",
            Receipt {
                merkle_root: [0; 32],
                ..receipt_of(&out)
            },
        ),
        (
            "different manifest",
            Receipt {
                manifest_digest: [1; 32],
                ..receipt_of(&out)
            },
        ),
        (
            "process id",
            Receipt {
                process_id: "CR-2".into(),
                ..receipt_of(&out)
            },
        ),
    ] {
        let why = refused(
            edge,
            &out,
            &delivered(&f.gateway, RECEIPT_CONTEXT, &r).await,
        );
        assert!(why.contains(what), "{what}: {why}");
    }
}

#[tokio::test]
async fn a_resumed_transfer_with_its_receipt_stored_is_reported_not_sent_again() {
    let f = EdgeFixture::new("").await;
    let (dir, out) = sealed(&f).await;
    let d = delivered(&f.gateway, RECEIPT_CONTEXT, &receipt_of(&out)).await;
    std::fs::write(dir.receipt_bin(), &d.receipt).unwrap();
    std::fs::write(dir.receipt_sig(), &d.signature).unwrap();
    let id = out.manifest.transfer_id;
    assert!(
        f.edge.pending().is_empty(),
        "a receipted transfer is not pending"
    );
    // The gateway at transport.connect does not exist: anything sent would fail.
    let summary = f
        .edge
        .send(SendRequest::Resume(id), &NoObserver, &Arc::default())
        .await
        .unwrap();
    assert_eq!(summary.transfer_id, id.to_string());
    assert_eq!((summary.wire_bytes, summary.receipt), (0, "verified"));
    assert_eq!(summary.bytes, out.manifest.total_bytes());
    assert_eq!(
        kinds_of(f.dir.path(), &id.to_string()),
        [Kind::Sealed, Kind::Receipted]
    );
}

#[tokio::test]
async fn a_stored_receipt_that_does_not_verify_fails_the_resume_with_a_record() {
    let f = EdgeFixture::new("").await;
    let (dir, out) = sealed(&f).await;
    let (stranger, _) = pair();
    let d = delivered(&stranger, RECEIPT_CONTEXT, &receipt_of(&out)).await;
    std::fs::write(dir.receipt_bin(), &d.receipt).unwrap();
    std::fs::write(dir.receipt_sig(), &d.signature).unwrap();
    let id = out.manifest.transfer_id;
    let e = f
        .edge
        .send(SendRequest::Resume(id), &NoObserver, &Arc::default())
        .await
        .unwrap_err();
    assert!(matches!(e, SendFailure::BadReceipt(_)), "{e}");
    assert_eq!(e.exit_code(), 3);
    assert_eq!(
        kinds_of(f.dir.path(), &id.to_string()),
        [Kind::Sealed, Kind::Failed]
    );
}

#[tokio::test]
async fn a_new_send_the_checkpoint_refuses_is_recorded_and_never_sealed() {
    let f = EdgeFixture::new("").await;
    let file = f.dir.path().join("x.dcm");
    std::fs::write(&file, b"x").unwrap();
    let request = SendRequest::New {
        files: vec![file],
        declaration: crate::policy::Declaration {
            patient_id: "P-0099".into(),
            ..declaration()
        },
    };
    let e = f
        .edge
        .send(request, &NoObserver, &Arc::default())
        .await
        .unwrap_err();
    let SendFailure::Refused(r) = &e else {
        panic!("{e}");
    };
    assert_eq!(r.rule, "consent-missing");
    assert_eq!(e.exit_code(), 2);
    let records = crate::test_support::records(f.dir.path());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, Kind::Refused);
    assert!(crate::transfer_dir::list(&f.spool_dir(), |_| true).is_empty());
}

#[tokio::test]
async fn a_delivery_notice_is_recorded_only_from_the_pinned_gateway_for_a_held_transfer() {
    use baylink_net::proto::{DeliveryNotice, Outcome};

    use crate::signing::DELIVERY_NOTICE_CONTEXT;

    let f = EdgeFixture::new("").await;
    let (dir, out) = sealed(&f).await;
    let m = &out.manifest;
    let notice = |id, root| {
        DeliveryNotice::new(
            id,
            root,
            m.digest(),
            Outcome::Delivered,
            b"201 Created",
            "gateway",
            1,
        )
        .to_bytes()
    };
    let accept = |bytes: &[u8], sig: &[u8]| {
        crate::notice::accept(f.edge.keys(), &f.spool_dir(), f.edge.audit(), bytes, sig)
    };
    let good = notice(m.transfer_id, m.merkle_root);
    let (stranger, _) = pair();
    let bad_sig = stranger.sign(DELIVERY_NOTICE_CONTEXT, &good).await.unwrap();
    let receipt_sig = f.gateway.sign(RECEIPT_CONTEXT, &good).await.unwrap();
    for (what, bytes, sig) in [
        ("unknown key", good.clone(), bad_sig),
        ("receipt context", good.clone(), receipt_sig),
        ("other root", notice(m.transfer_id, [0; 32]), Vec::new()),
        (
            "unknown transfer",
            notice(TransferId::new_v7(), m.merkle_root),
            Vec::new(),
        ),
    ] {
        let sig = if sig.is_empty() {
            f.gateway
                .sign(DELIVERY_NOTICE_CONTEXT, &bytes)
                .await
                .unwrap()
        } else {
            sig
        };
        let e = accept(&bytes, &sig).unwrap_err();
        assert!(e.is::<crate::notice::Refused>(), "{what}: {e:#}");
    }
    assert!(crate::notice::stored(&dir).is_none(), "nothing stored");
    assert_eq!(
        kinds_of(f.dir.path(), &m.transfer_id.to_string()),
        [Kind::Sealed]
    );

    let sig = f
        .gateway
        .sign(DELIVERY_NOTICE_CONTEXT, &good)
        .await
        .unwrap();
    assert!(accept(&good, &sig).unwrap().new);
    assert_eq!(
        crate::notice::stored(&dir).unwrap().outcome,
        Outcome::Delivered
    );
    // The same notice again (the acknowledgement was lost): not recorded twice.
    assert!(!accept(&good, &sig).unwrap().new);
    assert_eq!(
        kinds_of(f.dir.path(), &m.transfer_id.to_string()),
        [Kind::Sealed, Kind::Notified]
    );
}
