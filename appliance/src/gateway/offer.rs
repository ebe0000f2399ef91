//! Checking an edge's offer and preparing its spool directory.
//!
//! Owns the decision to accept a transfer (draining, the manifest's signature against the
//! pinned edge key, the sender against the TLS identity, a take-over from an older
//! connection) and the `spool/<id>/` it is received into. It must not write chunk bytes
//! (that is [`super::chunks`]) nor answer the edge (the control stream does, from the result).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use baylink_net::proto::{ChunkSet, ErrorCode, Manifest, Receiver};
use baylink_net::spool::DIRECT_ALIGN;
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tracing::{info, warn};

use super::chunks::{check_at_rest, spool_refusal};
use super::staging::{self, Staged};
use super::{Active, Durable, Gateway, Link};
use crate::signing::{MANIFEST_CONTEXT, verify_peer};
use crate::transfer_dir::{TransferDir, write_atomic};

/// Checks an offer and prepares the spool; returns the durable have-set.
pub(super) async fn accept_offer(
    gw: &Arc<Gateway>,
    conn: Link,
    peer: &str,
    (manifest, manifest_bytes, signature): (Arc<Manifest>, &[u8], &[u8]),
    staged: &mut Option<Arc<Staged>>,
) -> Result<(Arc<Active>, ChunkSet), (ErrorCode, String)> {
    let id = manifest.transfer_id;
    if gw.draining.load(Ordering::Relaxed) {
        return Err((
            ErrorCode::ShuttingDown,
            "gateway is shutting down; retry later".into(),
        ));
    }
    if !verify_peer(&*gw.keys, MANIFEST_CONTEXT, manifest_bytes, signature) {
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
                .close(crate::link::CLOSE_SHUTDOWN.into(), b"transfer taken over");
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
    // Chunks the edge streamed while it was sealing: those matching the manifest join what
    // the `Have` reports; the next checkpoint makes them durable.
    let adopted = match staged.take() {
        Some(s) => staging::adopt(gw, &s, &dir, &manifest, &have).await,
        None => None,
    };

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
        let file = opened.map_err(|e| spool_refusal(&e))?;
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
        unsynced: Mutex::new(
            adopted
                .as_ref()
                .map_or((Vec::new(), 0), |a| (a.good.clone(), a.bytes)),
        ),
        conn,
        cancel,
        done,
        no_space: AtomicBool::new(false),
    });
    gw.active
        .lock()
        .expect("registry lock poisoned")
        .insert(id, active.clone());
    if let Some(a) = &adopted {
        for &index in &a.good {
            have.insert(index);
        }
    }
    info!(transfer = %id, files = manifest.files.len(), bytes = manifest.total_bytes(),
          have = have.count(), staged = adopted.as_ref().map_or(0, |a| a.good.len()),
          chunks = manifest.chunk_count(), "offer accepted");
    metrics::counter!("baylink_transfers_total", "stage" => "offer", "outcome" => "accepted")
        .increment(1);
    Ok((active, have))
}

/// Creates or re-opens `spool/<id>/`; a different manifest under the same id is refused.
fn prepare_dir(
    dir: &TransferDir,
    manifest: &Manifest,
    bytes: &[u8],
    sig: &[u8],
) -> Result<ChunkSet, (ErrorCode, String)> {
    let io = |what: &str, e: std::io::Error| {
        (
            super::storage_code(&e),
            format!("{what} {}: {e}", dir.root().display()),
        )
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
    // A transfer an older version began receiving under the hospital's names resumes.
    dir.adopt_legacy_names(manifest.files.iter().map(|f| f.name.as_str()))
        .map_err(|e| io("cannot adopt the older layout of", e))?;
    if dir.has_receipt() {
        return Ok(ChunkSet::full(manifest.chunk_count()));
    }
    dir.load_state(manifest.chunk_count()).or_else(|e| {
        // A state file we cannot trust is discarded: the chunks are simply received again.
        warn!(error = %e, "discarding the transfer state");
        Ok(ChunkSet::new(manifest.chunk_count()))
    })
}
