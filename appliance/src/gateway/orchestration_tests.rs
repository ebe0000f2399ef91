//! The gateway's offer and commit without HSM, io_uring or network (`crate::test_support`):
//! which offers are accepted, what a re-offer after a restart trusts, and when a transfer
//! is committed and its receipt signed. Chunk bytes are written into the `.part` files as the
//! chunk streams would (the streams themselves, and the receiver state machine, are tested
//! elsewhere: `baylink_net::proto::sim` and the integration tests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use baylink_net::proto::{
    ChunkHasher, ChunkSet, ErrorCode, Limits, Manifest, ManifestBuilder, Receipt, ReceiverConfig,
    TransferId,
};

use super::commit::{checkpoint, commit};
use super::offer::accept_offer;
use super::{Active, Gateway, Link};
use crate::audit::Kind;
use crate::deliver::DeliveryQueue;
use crate::signing::testing::{SoftwareKeys, pair};
use crate::signing::{MANIFEST_CONTEXT, RECEIPT_CONTEXT, Sign, verify_peer};
use crate::test_support::{CHUNK, audit_log, kinds_of, spool};
use crate::transfer_dir::TransferDir;

/// A gateway in a temporary directory, and the edge's keys (which pin the gateway's).
struct Fixture {
    dir: tempfile::TempDir,
    edge: SoftwareKeys,
    gateway_keys: SoftwareKeys,
}

impl Fixture {
    fn new() -> Fixture {
        let (edge, gateway_keys) = pair();
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            edge,
            gateway_keys,
        }
    }

    /// A gateway process over the fixture's spool (a new one is a restart).
    fn gateway(&self) -> Arc<Gateway> {
        std::fs::create_dir_all(self.dir.path().join("spool")).unwrap();
        let (log, _) = audit_log(self.dir.path(), "gateway");
        let (queue, _) = DeliveryQueue::new();
        Arc::new(Gateway::new(
            "gateway".into(),
            self.dir.path().join("spool"),
            spool(),
            Arc::new(self.gateway_keys.clone()),
            Limits::default(),
            ReceiverConfig::default(),
            queue,
            log,
        ))
    }

    fn transfer_dir(&self, id: &TransferId) -> TransferDir {
        TransferDir::new(&self.dir.path().join("spool"), id)
    }
}

/// A transfer of two files, 4 + 1 chunks: its manifest, the manifest's bytes and payload.
struct Offer {
    manifest: Arc<Manifest>,
    bytes: Vec<u8>,
    payload: Vec<Vec<u8>>,
}

fn offer(sender: &str) -> Offer {
    let payload: Vec<Vec<u8>> = vec![
        (0..3 * CHUNK as usize + 100)
            .map(|i| (i % 251) as u8)
            .collect(),
        b"ten bytes!".to_vec(),
    ];
    let mut b = ManifestBuilder::new(TransferId::new_v7(), sender, [9; 32], "CR-1", CHUNK);
    for (name, data) in ["a.bin", "b.bin"].iter().zip(&payload) {
        let mut h = ChunkHasher::new(CHUNK);
        h.update(data);
        b.add_file((*name).to_owned(), data.len() as u64, h.finish())
            .unwrap();
    }
    let manifest = b.finish(1).unwrap();
    Offer {
        bytes: manifest.to_bytes(),
        manifest: Arc::new(manifest),
        payload,
    }
}

async fn signed(keys: &SoftwareKeys, context: &[u8], o: &Offer) -> Vec<u8> {
    keys.sign(context, &o.bytes).await.unwrap()
}

async fn accept(
    gw: &Arc<Gateway>,
    conn: usize,
    peer: &str,
    o: &Offer,
    sig: &[u8],
) -> Result<(Arc<Active>, ChunkSet), (ErrorCode, String)> {
    accept_staged(gw, conn, peer, o, sig, None).await
}

/// [`accept`] of a transfer announced before its offer, whose chunks `staged` holds.
async fn accept_staged(
    gw: &Arc<Gateway>,
    conn: usize,
    peer: &str,
    o: &Offer,
    sig: &[u8],
    mut staged: Option<Arc<super::staging::Staged>>,
) -> Result<(Arc<Active>, ChunkSet), (ErrorCode, String)> {
    accept_offer(
        gw,
        Link::Detached(conn),
        peer,
        (o.manifest.clone(), &o.bytes, sig),
        &mut staged,
    )
    .await
}

/// Writes chunk `index` into its `.part` file as a chunk stream would, verified.
async fn write_chunk(gw: &Gateway, a: &Active, o: &Offer, index: u32) {
    let loc = a.manifest.chunk(index).unwrap();
    let file = a.files[loc.file].as_ref().unwrap();
    let at = loc.offset as usize;
    let mut buf = gw.spool.buffer().await;
    buf.extend_from_slice(&o.payload[loc.file][at..at + loc.len as usize])
        .unwrap();
    gw.spool.write_at(file, loc.offset, buf).await.unwrap();
    a.unsynced.lock().unwrap().0.push(index);
}

#[tokio::test]
async fn an_offer_signed_by_the_pinned_edge_key_is_accepted_and_prepared() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let (active, have) = accept(&gw, 1, "edge", &o, &sig).await.unwrap();
    assert_eq!(have.count(), 0);
    assert_eq!(gw.active_transfers(), 1);
    let d = f.transfer_dir(&o.manifest.transfer_id);
    assert_eq!(std::fs::read(d.manifest_bin()).unwrap(), o.bytes);
    assert_eq!(std::fs::read(d.manifest_sig()).unwrap(), sig);
    assert!(d.part_file("a.bin").exists() && d.part_file("b.bin").exists());
    assert_eq!(active.files.len(), 2);
}

#[tokio::test]
async fn an_offer_that_does_not_verify_against_the_pinned_key_is_refused() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    // An edge the gateway does not know (its own key is not the pinned edge key), the
    // right key under another context, and a manifest changed after signing.
    let (stranger, _) = pair();
    let good = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let mut tampered = offer("edge");
    tampered.bytes = o.bytes.clone();
    let last = tampered.bytes.len() - 1;
    tampered.bytes[last] ^= 1;
    for (what, o, sig) in [
        (
            "unknown key",
            &o,
            signed(&stranger, MANIFEST_CONTEXT, &o).await,
        ),
        (
            "receipt context",
            &o,
            signed(&f.edge, RECEIPT_CONTEXT, &o).await,
        ),
        ("flipped byte", &tampered, good.clone()),
        ("short signature", &o, good[..32].to_vec()),
    ] {
        match accept(&gw, 1, "edge", o, &sig).await {
            Err((ErrorCode::BadSignature, _)) => {}
            other => panic!("{what}: {:?}", other.map(|(_, h)| h.count())),
        }
    }
    assert_eq!(gw.active_transfers(), 0);
    assert!(!f.transfer_dir(&o.manifest.transfer_id).root().exists());
}

#[tokio::test]
async fn an_offer_is_refused_when_the_sender_is_not_the_tls_peer_or_the_gateway_drains() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    match accept(&gw, 1, "edge-2", &o, &sig).await {
        Err((ErrorCode::Refused, text)) => assert!(text.contains("TLS identity"), "{text}"),
        other => panic!("{:?}", other.map(|(_, h)| h.count())),
    }
    gw.draining.store(true, Ordering::Relaxed);
    assert!(matches!(
        accept(&gw, 1, "edge", &o, &sig).await,
        Err((ErrorCode::ShuttingDown, _))
    ));
    assert!(!f.transfer_dir(&o.manifest.transfer_id).root().exists());
}

#[tokio::test]
async fn another_manifest_under_a_used_transfer_id_is_refused() {
    let f = Fixture::new();
    let o = offer("edge");
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    accept(&f.gateway(), 1, "edge", &o, &sig).await.unwrap();
    // Same id, other content (one byte more in the second file), properly signed.
    let mut b = ManifestBuilder::new(o.manifest.transfer_id, "edge", [9; 32], "CR-1", CHUNK);
    b.add_file("a.bin".to_owned(), 1, vec![[1; 32]]).unwrap();
    let other = b.finish(1).unwrap();
    let other = Offer {
        bytes: other.to_bytes(),
        manifest: Arc::new(other),
        payload: Vec::new(),
    };
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &other).await;
    match accept(&f.gateway(), 2, "edge", &other, &sig).await {
        Err((ErrorCode::Refused, text)) => assert!(text.contains("already used"), "{text}"),
        res => panic!("{:?}", res.map(|(_, h)| h.count())),
    }
}

#[tokio::test]
async fn commit_waits_for_every_chunk_then_signs_a_receipt_the_edge_verifies() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let id = o.manifest.transfer_id;
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let (active, _) = accept(&gw, 1, "edge", &o, &sig).await.unwrap();
    for i in 0..4 {
        write_chunk(&gw, &active, &o, i).await;
    }
    let e = commit(&gw, &active).await.unwrap_err();
    assert!(e.to_string().contains("4 of 5"), "{e}");
    let d = f.transfer_dir(&id);
    assert!(!d.has_receipt() && !d.data_file("a.bin").exists());
    assert!(kinds_of(f.dir.path(), &id.to_string()).is_empty());
    // What was verified is durable all the same.
    assert_eq!(d.load_state(5).unwrap().count(), 4);

    write_chunk(&gw, &active, &o, 4).await;
    let (receipt, rsig) = commit(&gw, &active).await.unwrap();
    assert!(verify_peer(&f.edge, RECEIPT_CONTEXT, &receipt, &rsig));
    assert!(!verify_peer(&f.edge, MANIFEST_CONTEXT, &receipt, &rsig));
    let r = Receipt::from_bytes(&receipt).unwrap();
    assert_eq!(r.transfer_id, id);
    assert_eq!(r.merkle_root, o.manifest.merkle_root);
    assert_eq!(r.manifest_digest, o.manifest.digest());
    assert_eq!(r.process_id, "CR-1");
    assert_eq!(r.receiver, "gateway");
    // Final names, exact sizes (no padding of a direct write's tail), no `.part` left.
    for (name, data) in ["a.bin", "b.bin"].iter().zip(&o.payload) {
        assert_eq!(&std::fs::read(d.data_file(name)).unwrap(), data);
        assert!(!d.part_file(name).exists());
    }
    assert_eq!(std::fs::read(d.receipt_sig()).unwrap(), rsig);
    assert_eq!(kinds_of(f.dir.path(), &id.to_string()), [Kind::Committed]);
    // A second commit (the edge asks again after a lost link) answers the stored receipt.
    let (again, again_sig) = commit(&gw, &active).await.unwrap();
    assert_eq!((again, again_sig), (receipt, rsig));
    assert_eq!(kinds_of(f.dir.path(), &id.to_string()).len(), 1);
}

#[tokio::test]
async fn after_a_restart_a_chunk_flipped_at_rest_is_fetched_again() {
    let f = Fixture::new();
    let o = offer("edge");
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    {
        let gw = f.gateway();
        let (active, _) = accept(&gw, 1, "edge", &o, &sig).await.unwrap();
        for i in 0..5 {
            write_chunk(&gw, &active, &o, i).await;
        }
        checkpoint(&gw, &active).await.unwrap();
    }
    let d = f.transfer_dir(&o.manifest.transfer_id);
    assert_eq!(d.load_state(5).unwrap().count(), 5);
    // A disk fault in chunk 1 (the second of a.bin) while the gateway was down.
    let part = d.part_file("a.bin");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[CHUNK as usize + 7] ^= 0x40;
    std::fs::write(&part, bytes).unwrap();

    let (_, have) = accept(&f.gateway(), 2, "edge", &o, &sig).await.unwrap();
    assert_eq!(have.iter().collect::<Vec<_>>(), [0, 2, 3, 4]);
    assert_eq!(
        d.load_state(5).unwrap().iter().collect::<Vec<_>>(),
        [0, 2, 3, 4],
        "the state no longer lists it"
    );
}

#[tokio::test]
async fn a_state_file_that_fails_its_check_is_discarded_not_trusted() {
    let f = Fixture::new();
    let o = offer("edge");
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    {
        let gw = f.gateway();
        let (active, _) = accept(&gw, 1, "edge", &o, &sig).await.unwrap();
        for i in 0..3 {
            write_chunk(&gw, &active, &o, i).await;
        }
        checkpoint(&gw, &active).await.unwrap();
    }
    let d = f.transfer_dir(&o.manifest.transfer_id);
    let mut state = std::fs::read(d.state()).unwrap();
    let last = state.len() - 1;
    state[last] ^= 0xff;
    std::fs::write(d.state(), state).unwrap();
    let (_, have) = accept(&f.gateway(), 2, "edge", &o, &sig).await.unwrap();
    assert_eq!(have.count(), 0, "every chunk is received again");
}

/// How many staging directories the fixture's gateway spool holds.
fn staged_dirs(f: &Fixture) -> usize {
    std::fs::read_dir(f.dir.path().join("spool/.staging")).map_or(0, |d| d.count())
}

/// Stages chunk `index` of `o` as a chunk stream of an announced transfer would: its bytes
/// (`bytes`, or the real ones) written into the staging file, then its digest noted.
async fn stage_chunk(
    gw: &Gateway,
    s: &super::staging::Staged,
    o: &Offer,
    index: u32,
    bytes: Option<&[u8]>,
) {
    let header = baylink_net::proto::ChunkHeader {
        transfer_id: o.manifest.transfer_id,
        index,
        len: o.manifest.chunk(index).unwrap().len,
    };
    let (loc, file) = s.begin(&header).unwrap();
    let at = loc.offset as usize;
    let real = &o.payload[loc.file][at..at + loc.len as usize];
    let data = bytes.unwrap_or(real);
    let mut buf = gw.spool.buffer().await;
    buf.extend_from_slice(data).unwrap();
    gw.spool.write_at(&file, loc.offset, buf).await.unwrap();
    s.end(index, Some(baylink_net::proto::sha256(data)));
}

/// Announces all of `o` on connection 1, as `send` does before its seal; taken.
async fn announce_whole(gw: &Arc<Gateway>, o: &Offer) -> Arc<super::staging::Staged> {
    super::staging::announce(
        gw,
        1,
        o.manifest.transfer_id,
        baylink_net::proto::Layout::of(&o.manifest),
    )
    .await
    .expect("the announcement is taken")
}

#[tokio::test]
async fn chunks_staged_before_the_offer_count_only_where_they_match_the_signed_manifest() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let layout = baylink_net::proto::Layout::of(&o.manifest);
    let s = super::staging::announce(&gw, 1, o.manifest.transfer_id, layout.clone())
        .await
        .expect("the announcement is taken");
    // Another connection's streams cannot feed it; the same transfer cannot be announced
    // twice.
    assert_ne!(s.conn_id(), 2);
    assert!(
        super::staging::announce(&gw, 1, o.manifest.transfer_id, layout)
            .await
            .is_none()
    );
    // Chunks 0, 2 and 4 arrive whole; chunk 1 carries other bytes than the edge signed;
    // chunk 3 never comes.
    stage_chunk(&gw, &s, &o, 0, None).await;
    stage_chunk(&gw, &s, &o, 1, Some(&[7u8; CHUNK as usize])).await;
    stage_chunk(&gw, &s, &o, 2, None).await;
    stage_chunk(&gw, &s, &o, 4, None).await;
    // A repeat of a staged chunk is not taken.
    let again = baylink_net::proto::ChunkHeader {
        transfer_id: o.manifest.transfer_id,
        index: 0,
        len: CHUNK,
    };
    assert!(s.begin(&again).is_err());
    assert_eq!(staged_dirs(&f), 1);

    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let (active, have) = accept_staged(&gw, 1, "edge", &o, &sig, Some(s.clone()))
        .await
        .unwrap();
    assert_eq!(have.iter().collect::<Vec<_>>(), vec![0, 2, 4]);
    // Nothing staged is durable yet: the next checkpoint makes it so.
    assert_eq!(active.progress.lock().await.set.count(), 0);
    assert_eq!(active.unsynced.lock().unwrap().0, vec![0, 2, 4]);
    assert!(s.closed());
    assert_eq!(staged_dirs(&f), 0, "the staging directory is left behind");
    let d = f.transfer_dir(&o.manifest.transfer_id);
    let part = std::fs::read(d.part_file("a.bin")).unwrap();
    assert_eq!(&part[..CHUNK as usize], &o.payload[0][..CHUNK as usize]);
    checkpoint(&gw, &active).await.unwrap();
    assert_eq!(
        d.load_state(5).unwrap().iter().collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
}

#[tokio::test]
async fn staged_chunks_of_another_layout_are_thrown_away_at_the_offer() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let sizes: Vec<u64> = o.manifest.files.iter().map(|f| f.size + 1).collect();
    let layout = baylink_net::proto::Layout::new(CHUNK, sizes, &Limits::default()).unwrap();
    let s = super::staging::announce(&gw, 1, o.manifest.transfer_id, layout)
        .await
        .unwrap();
    stage_chunk(&gw, &s, &o, 0, None).await;
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let (_, have) = accept_staged(&gw, 1, "edge", &o, &sig, Some(s))
        .await
        .unwrap();
    assert_eq!(have.count(), 0);
    assert_eq!(staged_dirs(&f), 0, "the staging directory is left behind");
}

#[tokio::test]
async fn a_restarted_gateway_removes_what_an_earlier_process_staged() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let s = announce_whole(&gw, &o).await;
    stage_chunk(&gw, &s, &o, 0, None).await;
    let staging = f.dir.path().join("spool/.staging");
    assert!(staging.exists());
    drop(gw);
    let _restarted = f.gateway();
    assert!(!staging.exists());
}

#[tokio::test]
async fn an_announcement_grows_file_by_file_and_the_offer_takes_the_files_it_begins_with() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let id = o.manifest.transfer_id;
    let sizes: Vec<u64> = o.manifest.files.iter().map(|f| f.size).collect();
    // The first file is announced alone, as a hospital's first stored file is.
    let first =
        baylink_net::proto::Layout::new(CHUNK, sizes[..1].to_vec(), &Limits::default()).unwrap();
    let s = super::staging::announce(&gw, 1, id, first.clone())
        .await
        .unwrap();
    stage_chunk(&gw, &s, &o, 0, None).await;
    stage_chunk(&gw, &s, &o, 3, None).await;
    // Chunk 4 is the second file's: not announced yet, so not taken.
    let later = baylink_net::proto::ChunkHeader {
        transfer_id: id,
        index: 4,
        len: 10,
    };
    assert!(s.begin(&later).is_err());
    // The offer's manifest has one file more than was announced: the announced file leads
    // it, so its staged chunks count.
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let (_, have) = accept_staged(&gw, 1, "edge", &o, &sig, Some(s))
        .await
        .unwrap();
    assert_eq!(have.iter().collect::<Vec<_>>(), vec![0, 3]);
    let d = f.transfer_dir(&id);
    assert!(
        d.part_file("b.bin").exists(),
        "the unannounced file gets its own .part"
    );

    // Grown to both files, the second file's chunk is taken too.
    let f = Fixture::new();
    let gw = f.gateway();
    let s = super::staging::announce(&gw, 1, id, first).await.unwrap();
    let both = baylink_net::proto::Layout::of(&o.manifest);
    assert!(super::staging::extend(&gw, &s, both).await);
    stage_chunk(&gw, &s, &o, 4, None).await;
    stage_chunk(&gw, &s, &o, 1, None).await;
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let (_, have) = accept_staged(&gw, 1, "edge", &o, &sig, Some(s.clone()))
        .await
        .unwrap();
    assert_eq!(have.iter().collect::<Vec<_>>(), vec![1, 4]);
    let b = std::fs::read(f.transfer_dir(&id).part_file("b.bin")).unwrap();
    assert_eq!(&b[..10], &o.payload[1][..]);
    // Closed by the offer: it grows no more.
    let more = baylink_net::proto::Layout::new(CHUNK, vec![1, 1, 1], &Limits::default()).unwrap();
    assert!(!super::staging::extend(&gw, &s, more).await);
}

#[tokio::test]
async fn an_announcement_that_leads_the_offer_with_other_files_is_thrown_away() {
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    // The second file's size announced as the first: the manifest does not begin with it.
    let layout =
        baylink_net::proto::Layout::new(CHUNK, vec![o.manifest.files[1].size], &Limits::default())
            .unwrap();
    let s = super::staging::announce(&gw, 1, o.manifest.transfer_id, layout)
        .await
        .unwrap();
    let sig = signed(&f.edge, MANIFEST_CONTEXT, &o).await;
    let (_, have) = accept_staged(&gw, 1, "edge", &o, &sig, Some(s))
        .await
        .unwrap();
    assert_eq!(have.count(), 0);
    assert_eq!(staged_dirs(&f), 0);
}

#[tokio::test]
async fn an_announcement_left_idle_ends_but_not_while_a_chunk_arrives() {
    use super::staging::IDLE_LIMIT;
    use std::time::Duration;
    let f = Fixture::new();
    let gw = f.gateway();
    let o = offer("edge");
    let s = announce_whole(&gw, &o).await;
    tokio::time::pause();
    // A chunk still arriving keeps the announcement, however long it takes.
    let header = baylink_net::proto::ChunkHeader {
        transfer_id: o.manifest.transfer_id,
        index: 0,
        len: CHUNK,
    };
    s.begin(&header).unwrap();
    tokio::time::advance(IDLE_LIMIT * 3).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), s.idle())
            .await
            .is_err()
    );
    // Once it ended, the announcement is idle after the limit, not before.
    s.end(0, None);
    assert!(
        tokio::time::timeout(IDLE_LIMIT / 2, s.idle())
            .await
            .is_err()
    );
    assert!(tokio::time::timeout(IDLE_LIMIT * 2, s.idle()).await.is_ok());
    // Idle, it is closed at once: no chunk begins between the verdict and its removal.
    assert!(s.closed());
    let late = baylink_net::proto::ChunkHeader { index: 1, ..header };
    assert!(s.begin(&late).is_err());
}
