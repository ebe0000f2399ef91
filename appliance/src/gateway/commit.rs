//! Making a transfer durable and final: checkpoints (fsync + `state`), the commit (rename
//! `.part` files, sign the receipt, write the commit point) and the discard of a failed
//! transfer.
//!
//! Owns the order of the commit's steps, on which invariants 2 and 3 of ARCHITECTURE.md
//! rest. It must not verify chunks (that happened in [`super::chunks`]) nor deliver
//! (committed transfers are pushed to the delivery queue).

use std::time::{SystemTime, UNIX_EPOCH};

use baylink_net::proto::Receipt;
use bytes::Bytes;
use tracing::{info, warn};

use super::{Active, Gateway};
use crate::signing::RECEIPT_CONTEXT;
use crate::transfer_dir::write_atomic;

/// fsyncs the files and records the verified chunks as durable.
pub(super) async fn checkpoint(gw: &Gateway, a: &Active) -> anyhow::Result<()> {
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
pub(super) async fn commit(gw: &Gateway, a: &Active) -> anyhow::Result<(Bytes, Bytes)> {
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
pub(super) async fn discard(a: &Active) {
    if a.dir.has_receipt() {
        return;
    }
    a.cancel.send_replace(true);
    if let Err(e) = tokio::fs::remove_dir_all(a.dir.root()).await {
        warn!(error = %e, "cannot remove the failed transfer's spool directory");
    }
}
