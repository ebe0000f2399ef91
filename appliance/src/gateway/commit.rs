//! Making a transfer durable and final: checkpoints (fsync + `state`), the commit (rename
//! `.part` files, sign the receipt, write the commit point) and the discard of a failed
//! transfer.
//!
//! Owns the order of the commit's steps, on which invariants 2 and 3 of ARCHITECTURE.md
//! rest. It must not verify chunks (that happened in [`super::chunks`]) nor deliver
//! (committed transfers are pushed to the delivery queue).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use baylink_net::proto::Receipt;
use bytes::Bytes;
use tracing::{info, warn};

use super::{Active, Durable, Gateway};
use crate::signing::RECEIPT_CONTEXT;
use crate::transfer_dir::write_atomic;

/// fsyncs concurrently at commit and checkpoint: enough to keep the device's queue full
/// for a transfer of many small files (a study of a thousand instances), bounded so the
/// spool's channel is not flooded.
const SYNCS_IN_FLIGHT: usize = 32;

/// fsyncs the files written since the last checkpoint and records their verified chunks as
/// durable.
pub(super) async fn checkpoint(gw: &Gateway, a: &Active) -> anyhow::Result<()> {
    let mut durable = a.progress.lock().await;
    let (pending, _) = std::mem::take(&mut *a.unsynced.lock().expect("unsynced lock poisoned"));
    make_durable(gw, a, &mut durable, pending).await
}

/// fsyncs the files that chunks `pending` lie in, then adds them to `durable` and stores it.
async fn make_durable(
    gw: &Gateway,
    a: &Active,
    durable: &mut Durable,
    pending: Vec<u32>,
) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    // Only those files: a study of a thousand instances must not fsync every one of them
    // at every checkpoint.
    let mut touched: Vec<usize> = pending
        .iter()
        .filter_map(|&i| a.manifest.chunk(i).map(|loc| loc.file))
        .collect();
    touched.sort_unstable();
    touched.dedup();
    for batch in touched.chunks(SYNCS_IN_FLIGHT) {
        let mut syncs = Vec::with_capacity(batch.len());
        for &i in batch {
            if let Some(f) = a.files.get(i).and_then(Option::as_ref) {
                syncs.push(gw.spool.sync(f));
            }
        }
        futures_util::future::try_join_all(syncs).await?;
    }
    for i in pending {
        durable.set.insert(i);
    }
    store_state(a, durable).await
}

/// Writes `durable` as the transfer's `state` file.
async fn store_state(a: &Active, durable: &Durable) -> anyhow::Result<()> {
    let dir = a.dir.clone();
    let set = durable.set.clone();
    tokio::task::spawn_blocking(move || dir.store_state(&set)).await??;
    Ok(())
}

/// Makes the transfer whole and final, then signs the receipt.
///
/// The order: every `.part` at its exact length and fsynced (all at once, one fsync each);
/// `state` full; every `.part` renamed to its final name, then `data/` fsynced once. A crash
/// at any point leaves each file under one of its names with its bytes durable, which the
/// next offer resumes from ([`super::chunks::check_at_rest`]).
pub(super) async fn commit(gw: &Gateway, a: &Active) -> anyhow::Result<(Bytes, Bytes)> {
    if a.dir.has_receipt() {
        let receipt = tokio::fs::read(a.dir.receipt_bin()).await?;
        let sig = tokio::fs::read(a.dir.receipt_sig()).await?;
        return Ok((receipt.into(), sig.into()));
    }
    let renames = {
        let mut durable = a.progress.lock().await;
        let (pending, _) = std::mem::take(&mut *a.unsynced.lock().expect("unsynced lock poisoned"));
        let mut all = durable.set.clone();
        for &i in &pending {
            all.insert(i);
        }
        if !all.is_full() {
            // What was verified is made durable all the same.
            make_durable(gw, a, &mut durable, pending).await?;
            anyhow::bail!(
                "commit requested with {} of {} chunks durable",
                durable.set.count(),
                a.manifest.chunk_count()
            );
        }
        let mut renames = Vec::with_capacity(a.manifest.files.len());
        let indices: Vec<usize> = (0..a.manifest.files.len()).collect();
        for batch in indices.chunks(SYNCS_IN_FLIGHT) {
            let mut finals = Vec::with_capacity(batch.len());
            for &i in batch {
                finals.push(finish_file(gw, a, i));
            }
            renames.extend(
                futures_util::future::try_join_all(finals)
                    .await?
                    .into_iter()
                    .flatten(),
            );
        }
        durable.set = all;
        store_state(a, &durable).await?;
        renames
    };
    if renames.is_empty() {
        // Every file got its final name before this process started (a commit interrupted
        // after its renames): those names are made durable before the receipt is signed.
        gw.spool.sync_dir(a.dir.data_dir()).await?;
    } else {
        gw.spool.commit_renames(renames).await?;
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

/// Makes file `index` of the transfer durable at exactly its manifest size: its `.part`
/// fsynced (the zeros of a padded `O_DIRECT` tail cut first), to be renamed to the returned
/// final name. `None` for a file that already has its final name.
async fn finish_file(
    gw: &Gateway,
    a: &Active,
    index: usize,
) -> anyhow::Result<Option<(std::path::PathBuf, std::path::PathBuf)>> {
    let f = &a.manifest.files[index];
    let part = a.dir.part_file(&f.name);
    let fin = a.dir.data_file(&f.name);
    let Some(file) = a.files.get(index).and_then(Option::as_ref) else {
        anyhow::ensure!(
            tokio::fs::try_exists(&fin).await?,
            "{} is missing",
            fin.display()
        );
        return Ok(None);
    };
    let len = tokio::fs::metadata(&part)
        .await
        .with_context(|| format!("cannot read the length of {}", part.display()))?
        .len();
    anyhow::ensure!(
        len >= f.size,
        "{} is shorter than the manifest says",
        part.display()
    );
    if len > f.size {
        // The zeros of a padded O_DIRECT tail; cutting them fsyncs too.
        gw.spool.cut_to_len(&part, f.size).await?;
    } else {
        gw.spool.sync(file).await?;
    }
    Ok(Some((part, fin)))
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
