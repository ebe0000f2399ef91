//! Gateway side: accept offers, receive and verify chunks into the spool, commit, sign the
//! receipt.
//!
//! Invariants kept here:
//! - a chunk counts as good only when the SHA-256 of exactly the bytes written equals the
//!   manifest's digest for it;
//! - the `state` file lists only chunks that are good *and* fsynced;
//! - `.part` files become their final names only when every chunk is good and durable; the
//!   receipt signature file is written last and is the commit point;
//! - nothing reaches the delivery path before the commit (delivery runs afterwards).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use baylink_net::proto::{
    ChunkHeader, ChunkSet, ErrorCode, Frame, Limits, Manifest, ProtoError, Receipt, Receiver,
    ReceiverAction, ReceiverConfig, TransferId,
};
use baylink_net::spool::{DIRECT_ALIGN, Spool, SpoolFile};
use bytes::{Buf, Bytes};
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{FrameWriter, LinkError, STOP_UNWANTED, spawn_frame_reader};
use crate::deliver::DeliveryQueue;
use crate::signing::{Keys, MANIFEST_CONTEXT, RECEIPT_CONTEXT};
use crate::transfer_dir::{TransferDir, write_atomic};

/// Verified bytes after which the receiver makes its progress durable (fsync + state file).
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

/// Everything the gateway's receive path shares.
#[derive(Debug)]
pub struct Gateway {
    /// This appliance's id (named in receipts).
    pub id: String,
    /// Spool root.
    pub spool_dir: std::path::PathBuf,
    /// The io_uring file thread.
    pub spool: Spool,
    /// HSM signer and the edge's pinned key.
    pub keys: Keys,
    /// Protocol limits.
    pub limits: Limits,
    /// Receiver tuning.
    pub receiver_cfg: ReceiverConfig,
    /// Committed transfers go here for delivery.
    pub committed: DeliveryQueue,
    /// Set when draining: new offers are refused.
    pub draining: AtomicBool,
    /// The gateway's audit log (`committed` is recorded before the receipt exists).
    pub audit: crate::audit::Log,
    active: Mutex<HashMap<TransferId, Arc<Active>>>,
    /// Transfers whose durable chunks were read back and checked since this process started.
    checked_at_rest: Mutex<HashSet<TransferId>>,
}

impl Gateway {
    /// Creates the shared receive state.
    #[allow(clippy::too_many_arguments)] // one per shared part; all required
    pub fn new(
        id: String,
        spool_dir: std::path::PathBuf,
        spool: Spool,
        keys: Keys,
        limits: Limits,
        receiver_cfg: ReceiverConfig,
        committed: DeliveryQueue,
        audit: crate::audit::Log,
    ) -> Gateway {
        Gateway {
            id,
            spool_dir,
            spool,
            keys,
            limits,
            receiver_cfg,
            committed,
            draining: AtomicBool::new(false),
            audit,
            active: Mutex::new(HashMap::new()),
            checked_at_rest: Mutex::new(HashSet::new()),
        }
    }

    /// Number of transfers being received right now.
    pub fn active_transfers(&self) -> usize {
        self.active.lock().expect("registry lock poisoned").len()
    }
}

/// A transfer being received.
#[derive(Debug)]
struct Active {
    manifest: Arc<Manifest>,
    dir: TransferDir,
    receiver: Mutex<Receiver>,
    wake: Notify,
    files: Vec<Option<Arc<SpoolFile>>>,
    progress: AsyncMutex<Durable>,
    unsynced: Mutex<(Vec<u32>, u64)>,
    conn: quinn::Connection,
    cancel: watch::Sender<bool>,
    done: watch::Sender<bool>,
    /// Set by a chunk whose write found the spool full: the control stream pauses the
    /// transfer (the edge retries with backoff and resumes once space is back).
    no_space: AtomicBool,
}

#[derive(Debug)]
struct Durable {
    set: ChunkSet,
}

impl Active {
    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }
}

/// Serves one QUIC connection from an edge until it closes.
pub async fn serve_connection(gw: Arc<Gateway>, conn: quinn::Connection) {
    let peer = baylink_net::transport::peer_common_name(&conn).unwrap_or_default();
    let span = info_span!("connection", peer = %peer, remote = %conn.remote_address());
    async move {
        info!("edge connected");
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let gw = gw.clone();
                        let conn = conn.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move { control_stream(gw, conn, peer, send, recv).await });
                    }
                    Err(e) => { info!(reason = %e, "connection ended"); break; }
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let gw = gw.clone();
                        tokio::spawn(async move { data_stream(gw, recv).await });
                    }
                    Err(e) => { info!(reason = %e, "connection ended"); break; }
                },
            }
        }
    }
    .instrument(span)
    .await
}

/// Drives one transfer's control stream.
async fn control_stream(
    gw: Arc<Gateway>,
    conn: quinn::Connection,
    peer: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut writer = FrameWriter::new(send);
    let mut frames = spawn_frame_reader(recv, gw.limits);
    let mut receiver = Some(Receiver::new(gw.limits, gw.receiver_cfg));
    let mut active: Option<Arc<Active>> = None;
    let mut cancel_rx: Option<watch::Receiver<bool>> = None;

    let peer_name = peer.clone();
    let outcome: Result<(), LinkError> = async {
        loop {
            // Drain actions, from the local receiver before the offer, from the shared one after.
            loop {
                let action = match (&mut receiver, &active) {
                    (Some(r), _) => r.poll_action(),
                    (None, Some(a)) => a.receiver.lock().expect("receiver lock poisoned").poll_action(),
                    (None, None) => None,
                };
                let Some(action) = action else { break };
                match action {
                    ReceiverAction::SendFrame(frame) => {
                        // audit: an error frame during a transfer (a chunk that never verified,
                        // a frame out of place) is a refusal, recorded before it goes out.
                        // Before the offer is accepted the refusal is recorded where it is
                        // decided (below), so it is not recorded twice.
                        if let (Frame::Error { code, text }, Some(a)) = (&frame, &active) {
                            audit_refusal(&gw, Some(&a.manifest), &peer, *code, text).await;
                        }
                        writer.send(&frame).await?
                    }
                    ReceiverAction::VerifyOffer { manifest, manifest_bytes, signature } => {
                        let mut r = receiver.take().expect("an offer comes before activation");
                        let offered = Arc::clone(&manifest);
                        match accept_offer(&gw, &conn, &peer, manifest, &manifest_bytes, &signature).await {
                            Ok((a, have)) => {
                                r.offer_accepted(have);
                                *a.receiver.lock().expect("receiver lock poisoned") = r;
                                cancel_rx = Some(a.cancel.subscribe());
                                active = Some(a);
                            }
                            Err((code, text)) => {
                                warn!(%text, "offer refused");
                                metrics::counter!("baylink_transfers_total", "stage" => "offer", "outcome" => "refused").increment(1);
                                // audit: the refusal is recorded before the error frame is queued.
                                audit_refusal(&gw, Some(&offered), &peer, code, &text).await;
                                r.offer_refused(code, text);
                                receiver = Some(r);
                            }
                        }
                    }
                    ReceiverAction::Commit => {
                        let a = active.clone().expect("commit only after an accepted offer");
                        match commit(&gw, &a).await {
                            Ok((receipt, sig)) => a.receiver.lock().expect("receiver lock poisoned").committed(receipt, sig),
                            Err(e) => {
                                warn!(error = %e, "commit failed");
                                writer.send(&Frame::Error { code: ErrorCode::Internal, text: format!("commit failed: {e}") }).await?;
                                return Ok(());
                            }
                        }
                    }
                    ReceiverAction::Failed(e) => {
                        warn!(error = %e, "transfer failed");
                        metrics::counter!("baylink_transfers_total", "stage" => "receive", "outcome" => "failed").increment(1);
                        if let Some(a) = &active {
                            discard(a).await;
                        }
                        return Ok(());
                    }
                }
            }

            if let Some(a) = &active
                && a.no_space.swap(false, Ordering::SeqCst)
            {
                warn!(transfer = %a.manifest.transfer_id,
                      "spool is full: transfer paused; the edge retries and it resumes once space is freed");
                metrics::counter!("baylink_transfers_total", "stage" => "receive", "outcome" => "paused_no_space").increment(1);
                writer
                    .send(&Frame::Error {
                        code: ErrorCode::NoSpace,
                        text: "gateway spool is full: transfer paused, retry later".into(),
                    })
                    .await?;
                return Ok(());
            }
            let wake = async {
                match &active {
                    Some(a) => a.wake.notified().await,
                    None => std::future::pending().await,
                }
            };
            let cancelled = async {
                match &mut cancel_rx {
                    Some(rx) => { let _ = rx.wait_for(|c| *c).await; }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = frames.recv() => {
                    let committed = active.as_ref().is_some_and(|a| {
                        a.receiver.lock().expect("receiver lock poisoned").is_committed()
                    });
                    let frame = match frame {
                        Some(Ok(f)) => f,
                        // The edge closes its side once it holds the receipt.
                        Some(Err(LinkError::Lost(_))) | None if committed => return Ok(()),
                        Some(Err(e)) => return Err(e),
                        None => return Err(LinkError::Lost("control stream ended".into())),
                    };
                    // audit: a control stream that opens with `Witness` asks this gateway to
                    // witness the edge's audit log; it carries nothing else.
                    if let Frame::Witness { checkpoint, old_size, proof, .. } = frame {
                        if active.is_some() {
                            return Err(LinkError::Protocol(ProtoError::UnexpectedFrame { frame: "Witness", state: "receiving a transfer" }));
                        }
                        let witness = crate::audit::witness::Witness::new(gw.audit.clone(), &gw.id, gw.keys.peer.clone());
                        let reply = match tokio::task::spawn_blocking(move || witness.cosign(&peer, &checkpoint, old_size, &proof)).await {
                            Ok(Ok(signature)) => Frame::Cosigned { version: baylink_net::proto::WITNESS_VERSION, signature },
                            Ok(Err(refusal)) => {
                                warn!(error = %refusal, "audit witness refused");
                                Frame::Error { code: refusal.code(), text: refusal.to_string() }
                            }
                            Err(e) => Frame::Error { code: ErrorCode::Internal, text: format!("witness failed: {e}") },
                        };
                        writer.send(&reply).await?;
                        return Ok(());
                    }
                    let res = match (&mut receiver, &active) {
                        (Some(r), _) => r.handle_frame(frame),
                        (None, Some(a)) => a.receiver.lock().expect("receiver lock poisoned").handle_frame(frame),
                        (None, None) => Ok(()),
                    };
                    if let Err(e) = res {
                        // The state machine queued an error frame where one is due; it goes
                        // out at the top of the loop, after the refusal is recorded.
                        debug!(error = %e, "frame refused");
                        // An error frame from the edge is the edge stopping, not a refusal.
                        if active.is_none() && !matches!(e, ProtoError::Peer { .. }) {
                            audit_refusal(&gw, None, &peer, e.code(), &e.to_string()).await;
                        }
                    }
                }
                () = wake => {}
                () = cancelled => {
                    info!("taken over by a newer connection for the same transfer");
                    return Ok(());
                }
            }
        }
    }
    .await;

    if let Err(e) = &outcome {
        match e {
            LinkError::Protocol(p) => {
                // Tell the peer why, on this control stream only: other transfers on the same
                // connection are not affected. (Closing the connection here would discard the
                // error frame before it is sent.)
                warn!(error = %p, "protocol error from the edge");
                let manifest = active.as_ref().map(|a| &*a.manifest);
                audit_refusal(&gw, manifest, &peer_name, p.code(), &p.to_string()).await;
                let _ = writer
                    .send(&Frame::Error {
                        code: p.code(),
                        text: p.to_string(),
                    })
                    .await;
            }
            LinkError::Lost(_) => {}
        }
        info!(error = %e, "control stream ended");
    }
    writer.finish();
    if let Some(a) = active {
        // Make what was verified durable, so a resumed transfer does not resend it.
        if !a.dir.has_receipt()
            && let Err(e) = checkpoint(&gw, &a).await
        {
            warn!(error = %e, "cannot checkpoint the transfer");
        }
        release(&gw, &a);
    }
}

/// The rule name of a refusal on the link: the protocol error code in kebab case (e.g.
/// `bad-signature`, `too-many-files`, `bad-file-name`).
pub fn link_rule(code: ErrorCode) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// audit: records a refusal of the edge's offer or frame (`refused`, rule from the error
/// code, the reason as detail) before the error frame goes out. A gateway that is shutting
/// down is not refusing anything (the edge retries), so that is not recorded. The refusal
/// stands even when it cannot be recorded (logged).
async fn audit_refusal(
    gw: &Gateway,
    manifest: Option<&Manifest>,
    peer: &str,
    code: ErrorCode,
    text: &str,
) {
    if code == ErrorCode::ShuttingDown {
        return;
    }
    let event = crate::audit::Event {
        transfer: manifest.map(|m| m.transfer_id.to_string()),
        consent_ref: manifest.map(|m| m.process_id.clone()),
        peer: Some(peer.to_owned()),
        rule: Some(link_rule(code)),
        detail: Some(text.to_owned()),
        ..crate::audit::Event::new(crate::audit::Kind::Refused)
    };
    if let Err(e) = gw.audit.append(event).await {
        warn!(error = %e, "cannot record the refusal in the audit log");
    }
}

/// Checks an offer and prepares the spool; returns the durable have-set.
async fn accept_offer(
    gw: &Arc<Gateway>,
    conn: &quinn::Connection,
    peer: &str,
    manifest: Arc<Manifest>,
    manifest_bytes: &[u8],
    signature: &[u8],
) -> Result<(Arc<Active>, ChunkSet), (ErrorCode, String)> {
    let id = manifest.transfer_id;
    if gw.draining.load(Ordering::Relaxed) {
        return Err((
            ErrorCode::ShuttingDown,
            "gateway is shutting down; retry later".into(),
        ));
    }
    if !gw
        .keys
        .verify_peer(MANIFEST_CONTEXT, manifest_bytes, signature)
    {
        return Err((
            ErrorCode::BadSignature,
            "manifest signature does not verify".into(),
        ));
    }
    if manifest.sender != peer {
        return Err((
            ErrorCode::Refused,
            format!(
                "manifest sender {} does not match the TLS identity {peer}",
                manifest.sender
            ),
        ));
    }

    // A newer connection takes a transfer over from an older one (a sender that died and
    // came back before the old connection timed out).
    let previous = gw
        .active
        .lock()
        .expect("registry lock poisoned")
        .get(&id)
        .cloned();
    if let Some(old) = previous {
        old.cancel.send_replace(true);
        if old.conn.stable_id() != conn.stable_id() {
            old.conn
                .close(super::CLOSE_SHUTDOWN.into(), b"transfer taken over");
        }
        let mut done = old.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    let dir = TransferDir::new(&gw.spool_dir, &id);
    let internal =
        |what: &str, e: &dyn std::fmt::Display| (ErrorCode::Internal, format!("{what}: {e}"));
    let prepared = {
        let dir = dir.clone();
        let manifest = manifest.clone();
        let bytes = manifest_bytes.to_vec();
        let sig = signature.to_vec();
        tokio::task::spawn_blocking(move || prepare_dir(&dir, &manifest, &bytes, &sig))
            .await
            .map_err(|e| internal("spool", &e))?
    };
    let mut have = prepared?;
    let checked = |gw: &Gateway| {
        gw.checked_at_rest
            .lock()
            .expect("registry lock poisoned")
            .contains(&id)
    };
    if !checked(gw) && have.count() > 0 && !dir.has_receipt() {
        check_at_rest(gw, &dir, &manifest, &mut have).await?;
    }
    gw.checked_at_rest
        .lock()
        .expect("registry lock poisoned")
        .insert(id);

    // Open a `.part` for every file not yet renamed to its final name (all of them, unless
    // a commit was interrupted half-way); empty files get their (empty) `.part` here too.
    let mut files = Vec::with_capacity(manifest.files.len());
    for f in &manifest.files {
        if dir.has_receipt() || dir.data_file(&f.name).exists() {
            files.push(None);
            continue;
        }
        // O_DIRECT where the chunk layout keeps every write aligned: no page-cache copy,
        // and the fsync at commit has little left to do. Padded tails are cut at commit.
        let part = dir.part_file(&f.name);
        let opened = if (manifest.chunk_size as usize).is_multiple_of(DIRECT_ALIGN)
            && gw.spool.buffers_allow_direct()
        {
            gw.spool.open_rw_direct(part).await
        } else {
            gw.spool.open_rw(part).await
        };
        let file = opened.map_err(|e| (code_for_spool(&e), format!("spool: {e}")))?;
        files.push(Some(Arc::new(file)));
    }
    let (cancel, _) = watch::channel(false);
    let (done, _) = watch::channel(false);
    let active = Arc::new(Active {
        manifest: manifest.clone(),
        dir,
        receiver: Mutex::new(Receiver::new(gw.limits, gw.receiver_cfg)),
        wake: Notify::new(),
        files,
        progress: AsyncMutex::new(Durable { set: have.clone() }),
        unsynced: Mutex::new((Vec::new(), 0)),
        conn: conn.clone(),
        cancel,
        done,
        no_space: AtomicBool::new(false),
    });
    gw.active
        .lock()
        .expect("registry lock poisoned")
        .insert(id, active.clone());
    info!(transfer = %id, files = manifest.files.len(), bytes = manifest.total_bytes(),
          have = have.count(), chunks = manifest.chunk_count(), "offer accepted");
    metrics::counter!("baylink_transfers_total", "stage" => "offer", "outcome" => "accepted")
        .increment(1);
    Ok((active, have))
}

/// Reads back every chunk the state file lists as durable (written before this process
/// started, so never hashed by it) and forgets those that no longer match their digest: they
/// are fetched again instead of being committed.
async fn check_at_rest(
    gw: &Gateway,
    dir: &TransferDir,
    manifest: &Manifest,
    have: &mut ChunkSet,
) -> Result<(), (ErrorCode, String)> {
    let mut opened: HashMap<usize, SpoolFile> = HashMap::new();
    let mut bad = Vec::new();
    for index in have.iter().collect::<Vec<_>>() {
        let Some(loc) = manifest.chunk(index) else {
            continue;
        };
        let part = dir.part_file(&manifest.files[loc.file].name);
        let file = match opened.entry(loc.file) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                if !part.exists() {
                    // Renamed to its final name by an interrupted commit: complete and checked.
                    continue;
                }
                let file = gw
                    .spool
                    .open(&part)
                    .await
                    .map_err(|e| (code_for_spool(&e), format!("spool: {e}")))?;
                e.insert(file)
            }
        };
        let digest = super::digest_at_rest(&gw.spool, file, &loc, false)
            .await
            .map_err(|e| (code_for_spool(&e), format!("spool: {e}")))?;
        if manifest.chunk_digests.get(index as usize) != Some(&digest) {
            warn!(transfer = %manifest.transfer_id, chunk = index, file = %part.display(),
                  "chunk no longer matches its digest at rest (disk fault?): fetching it again");
            metrics::counter!("baylink_chunks_corrupt_at_rest_total").increment(1);
            bad.push(index);
        }
    }
    for (_, file) in opened {
        let _ = gw.spool.close(file).await;
    }
    if !bad.is_empty() {
        for index in bad {
            have.remove(index);
        }
        let (dir, set) = (dir.clone(), have.clone());
        tokio::task::spawn_blocking(move || dir.store_state(&set))
            .await
            .map_err(|e| (ErrorCode::Internal, format!("spool: {e}")))?
            .map_err(|e| (ErrorCode::Internal, format!("cannot store the state: {e}")))?;
    }
    Ok(())
}

fn code_for_spool(e: &baylink_net::spool::SpoolError) -> ErrorCode {
    if e.is_no_space() {
        ErrorCode::NoSpace
    } else {
        ErrorCode::Internal
    }
}

/// Creates or re-opens `spool/<id>/`; a different manifest under the same id is refused.
fn prepare_dir(
    dir: &TransferDir,
    manifest: &Manifest,
    bytes: &[u8],
    sig: &[u8],
) -> Result<ChunkSet, (ErrorCode, String)> {
    let io = |what: &str, e: std::io::Error| {
        let code = if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            ErrorCode::NoSpace
        } else {
            ErrorCode::Internal
        };
        (code, format!("{what} {}: {e}", dir.root().display()))
    };
    match std::fs::read(dir.manifest_bin()) {
        Ok(existing) if existing == bytes => {}
        Ok(_) => {
            return Err((
                ErrorCode::Refused,
                format!(
                    "transfer id {} is already used by a different manifest",
                    manifest.transfer_id
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            dir.create().map_err(|e| io("cannot create", e))?;
            write_atomic(&dir.manifest_sig(), sig).map_err(|e| io("cannot write", e))?;
            let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
            write_atomic(&dir.manifest_json(), &json).map_err(|e| io("cannot write", e))?;
            // manifest.bin last: its presence means the directory is complete.
            write_atomic(&dir.manifest_bin(), bytes).map_err(|e| io("cannot write", e))?;
        }
        Err(e) => return Err(io("cannot read", e)),
    }
    if dir.has_receipt() {
        return Ok(ChunkSet::full(manifest.chunk_count()));
    }
    dir.load_state(manifest.chunk_count()).or_else(|e| {
        // A state file we cannot trust is discarded: the chunks are simply received again.
        warn!(error = %e, "discarding the transfer state");
        Ok(ChunkSet::new(manifest.chunk_count()))
    })
}

/// Receives one chunk stream.
async fn data_stream(gw: Arc<Gateway>, mut recv: quinn::RecvStream) {
    if let Err(e) = receive_chunk(&gw, &mut recv).await {
        debug!(error = %e, "chunk stream ended early");
        let _ = recv.stop(STOP_UNWANTED.into());
    }
}

async fn receive_chunk(gw: &Arc<Gateway>, recv: &mut quinn::RecvStream) -> Result<(), LinkError> {
    let mut raw = [0u8; ChunkHeader::LEN];
    recv.read_exact(&mut raw).await?;
    let header = ChunkHeader::decode(&raw)?;
    let Some(active) = gw
        .active
        .lock()
        .expect("registry lock poisoned")
        .get(&header.transfer_id)
        .cloned()
    else {
        return Err(LinkError::Lost(format!(
            "no active transfer {}",
            header.transfer_id
        )));
    };
    let loc = {
        let res = active
            .receiver
            .lock()
            .expect("receiver lock poisoned")
            .chunk_header(&header);
        match res {
            Ok(loc) => loc,
            Err(e) => {
                active.wake.notify_one();
                return Err(e.into());
            }
        }
    };
    let digest = match gather_chunk(gw, &active, &loc, &header, recv).await {
        Ok(d) => d,
        Err(e) => {
            // The receiver must learn that this chunk is no longer arriving, or it would
            // refuse the resend as busy.
            active
                .receiver
                .lock()
                .expect("receiver lock poisoned")
                .chunk_aborted(header.index);
            active.wake.notify_one();
            return Err(e);
        }
    };
    let good = active.manifest.chunk_digests.get(header.index as usize) == Some(&digest);
    active
        .receiver
        .lock()
        .expect("receiver lock poisoned")
        .chunk_received(header.index, digest);
    active.wake.notify_one();
    metrics::counter!("baylink_bytes_total", "direction" => "received")
        .increment(u64::from(loc.len));
    if good {
        let due = {
            let mut u = active.unsynced.lock().expect("unsynced lock poisoned");
            u.0.push(header.index);
            u.1 += u64::from(loc.len);
            u.1 >= CHECKPOINT_BYTES
        };
        if due {
            let gw = gw.clone();
            let active = active.clone();
            tokio::spawn(async move {
                if let Err(e) = checkpoint(&gw, &active).await {
                    warn!(error = %e, "checkpoint failed");
                }
            });
        }
    } else {
        metrics::counter!("baylink_chunk_retransmits_total").increment(1);
    }
    Ok(())
}

/// Reads the chunk's bytes from its stream into the spool file, hashing them on the way.
async fn gather_chunk(
    gw: &Arc<Gateway>,
    active: &Arc<Active>,
    loc: &baylink_net::proto::ChunkLocation,
    header: &ChunkHeader,
    recv: &mut quinn::RecvStream,
) -> Result<[u8; 32], LinkError> {
    let Some(file) = active.files.get(loc.file).and_then(Option::as_ref) else {
        return Err(LinkError::Lost(format!(
            "file {} of transfer {} is already final",
            loc.file, header.transfer_id
        )));
    };
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut writes = tokio::task::JoinSet::new();
    let mut offset = loc.offset;
    let mut remaining = loc.len as usize;
    let mut buf = Some(gw.spool.buffer().await);
    // quinn hands out about one packet per piece; taking a batch per call keeps the
    // connection lock and the task wake-ups per packet down. Each full pool buffer is hashed
    // in one pass, then written.
    let mut pieces: [Bytes; 32] = Default::default();
    while remaining > 0 {
        let Some(n) = recv.read_chunks(&mut pieces).await? else {
            return Err(LinkError::Lost(format!(
                "chunk {} stream ended short",
                header.index
            )));
        };
        for piece in &mut pieces[..n] {
            let mut data = std::mem::take(piece);
            if data.len() > remaining {
                return Err(ProtoError::TrailingBytes {
                    what: "chunk stream",
                    count: data.len() - remaining,
                }
                .into());
            }
            while !data.is_empty() {
                let b = buf.as_mut().expect("a buffer is held while bytes remain");
                let taken = b.fill_from(&data);
                data.advance(taken);
                remaining -= taken;
                if !b.is_full() && remaining > 0 {
                    continue;
                }
                if active.cancelled() {
                    return Err(LinkError::Lost("transfer taken over".into()));
                }
                let full = buf.take().expect("held");
                hasher.update(&full);
                let at = offset;
                offset += full.len() as u64;
                let spool = gw.spool.clone();
                let file = file.clone();
                writes.spawn(async move { spool.write_at(&file, at, full).await.map(drop) });
                if remaining > 0 {
                    buf = Some(gw.spool.buffer().await);
                }
            }
        }
    }
    // Nothing may follow the chunk's bytes on its stream.
    if recv.read_chunk(1, true).await?.is_some() {
        return Err(ProtoError::TrailingBytes {
            what: "chunk stream",
            count: 1,
        }
        .into());
    }
    while let Some(res) = writes.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if e.is_no_space() {
                    active.no_space.store(true, Ordering::SeqCst);
                    metrics::counter!("baylink_spool_full_total").increment(1);
                } else {
                    warn!(error = %e, "spool write failed");
                }
                return Err(LinkError::Lost(format!("spool write failed: {e}")));
            }
            Err(e) => return Err(LinkError::Lost(format!("spool write task: {e}"))),
        }
    }
    Ok(hasher
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes"))
}

/// fsyncs the files and records the verified chunks as durable.
async fn checkpoint(gw: &Gateway, a: &Active) -> anyhow::Result<()> {
    let mut durable = a.progress.lock().await;
    let (pending, _) = std::mem::take(&mut *a.unsynced.lock().expect("unsynced lock poisoned"));
    if pending.is_empty() {
        return Ok(());
    }
    for f in a.files.iter().flatten() {
        gw.spool.sync(f).await?;
    }
    for i in pending {
        durable.set.insert(i);
    }
    let dir = a.dir.clone();
    let set = durable.set.clone();
    tokio::task::spawn_blocking(move || dir.store_state(&set)).await??;
    Ok(())
}

/// Makes the transfer whole and final, then signs the receipt.
async fn commit(gw: &Gateway, a: &Active) -> anyhow::Result<(Bytes, Bytes)> {
    if a.dir.has_receipt() {
        let receipt = tokio::fs::read(a.dir.receipt_bin()).await?;
        let sig = tokio::fs::read(a.dir.receipt_sig()).await?;
        return Ok((receipt.into(), sig.into()));
    }
    checkpoint(gw, a).await?;
    {
        let durable = a.progress.lock().await;
        anyhow::ensure!(
            durable.set.is_full(),
            "commit requested with {} of {} chunks durable",
            durable.set.count(),
            a.manifest.chunk_count()
        );
    }
    for f in &a.manifest.files {
        let part = a.dir.part_file(&f.name);
        let fin = a.dir.data_file(&f.name);
        if tokio::fs::try_exists(&part).await? {
            let len = tokio::fs::metadata(&part).await?.len();
            anyhow::ensure!(
                len >= f.size,
                "{} is shorter than the manifest says",
                part.display()
            );
            if len > f.size {
                // The zeros of a padded O_DIRECT tail.
                gw.spool.cut_to_len(&part, f.size).await?;
            }
            gw.spool.commit_rename(&part, &fin).await?;
        } else {
            anyhow::ensure!(
                tokio::fs::try_exists(&fin).await?,
                "{} is missing",
                fin.display()
            );
        }
    }
    let committed_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let receipt = Receipt {
        transfer_id: a.manifest.transfer_id,
        merkle_root: a.manifest.merkle_root,
        manifest_digest: a.manifest.digest(),
        process_id: a.manifest.process_id.clone(),
        receiver: gw.id.clone(),
        committed_unix_ms,
    }
    .to_bytes();
    let sig = gw.keys.sign(RECEIPT_CONTEXT, &receipt).await?;
    // audit: `committed` is durable before the commit point (the receipt signature file)
    // and before the receipt is sent; if it cannot be recorded, nothing is committed.
    gw.audit
        .append(crate::audit::Event::of_manifest(
            crate::audit::Kind::Committed,
            &a.manifest,
        ))
        .await?;
    crate::failpoint::hit(crate::failpoint::COMMIT_AFTER_COMMITTED);
    let dir = a.dir.clone();
    let (r2, s2) = (receipt.clone(), sig.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        write_atomic(&dir.receipt_bin(), &r2)?;
        // The receipt signature is the commit point.
        write_atomic(&dir.receipt_sig(), &s2)
    })
    .await??;
    info!(transfer = %a.manifest.transfer_id, bytes = a.manifest.total_bytes(), "committed");
    metrics::counter!("baylink_transfers_total", "stage" => "committed", "outcome" => "ok")
        .increment(1);
    gw.committed.push(a.manifest.transfer_id);
    gw.checked_at_rest
        .lock()
        .expect("registry lock poisoned")
        .remove(&a.manifest.transfer_id);
    Ok((receipt.into(), sig.into()))
}

/// Removes a failed transfer's spool directory: nothing of it is ever delivered.
async fn discard(a: &Active) {
    if a.dir.has_receipt() {
        return;
    }
    a.cancel.send_replace(true);
    if let Err(e) = tokio::fs::remove_dir_all(a.dir.root()).await {
        warn!(error = %e, "cannot remove the failed transfer's spool directory");
    }
}

fn release(gw: &Gateway, a: &Arc<Active>) {
    let mut map = gw.active.lock().expect("registry lock poisoned");
    if map
        .get(&a.manifest.transfer_id)
        .is_some_and(|cur| Arc::ptr_eq(cur, a))
    {
        map.remove(&a.manifest.transfer_id);
    }
    drop(map);
    // `send_replace`, not `send`: the value must stick even when nobody is subscribed yet
    // (a taking-over offer may subscribe just after this), or that offer would wait forever.
    a.done.send_replace(true);
}
