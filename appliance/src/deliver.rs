//! Delivery of committed transfers to the downstream store, idempotent by transfer id.
//!
//! The gateway delivers only what it has committed, one transfer at a time in commit order.
//! Two stores:
//! - [`DirDelivery`]: a transfer's files appear at the destination all at once and complete:
//!   they are gathered in the spool (hard links, so no byte is copied when spool and
//!   destination share a file system) and the gathered directory is renamed into place,
//!   which is atomic;
//! - [`dicomweb::DicomWebDelivery`]: STOW-RS into the health-record store, which stores what
//!   it confirms (see that module for what counts as confirmed).
//!
//! A STOW-RS store may refuse single instances: the rest of the transfer is delivered all the
//! same, and the transfer ends delivered with the refused instances listed ([`Delivered`]:
//! its `delivered` audit record names them, and so does the delivery notice, outcome
//! `partial`).
//!
//! A failed delivery is retried with exponential backoff and full jitter (`delivery.retry_base`
//! doubling up to `delivery.retry_max`, at least the store's `Retry-After`; see the private
//! `retry` module), except an [`Undeliverable`] one (the store gave an answer about the whole
//! transfer it will repeat, such as a 403 or 404, or refused every instance): that transfer
//! is set aside at once with an `undeliverable` file naming the reason and a `failed` audit
//! record, and the queue moves on. Deleting the file and sending the gateway SIGHUP
//! (`systemctl reload`), or restarting it, tries it again.

pub mod dicomweb;
pub mod retry;

pub use retry::{Backoff, Cause, DEFAULT_RETRY_BASE, DEFAULT_RETRY_MAX, Transient};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use baylink_net::proto::{Manifest, RefusedInstance, TransferId};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::transfer_dir::{self, TransferDir, sync_dir, write_atomic};

/// A downstream store.
pub trait Deliver: Send + Sync + std::fmt::Debug {
    /// Delivers the committed transfer in `dir` and says where it went (a path or a URL)
    /// and which instances the store refused; must be idempotent by transfer id. A store
    /// that holds none of it is [`Undeliverable`]. Called on a blocking thread.
    fn deliver(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<Delivered>;
}

/// A transfer the store holds, whole or but for the instances it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Where it went: a path or a URL.
    pub location: String,
    /// The instances the store refused (none: delivered whole).
    pub refused: Vec<RefusedInstance>,
}

/// The store refused the transfer's content: trying again cannot succeed.
#[derive(Debug, thiserror::Error)]
#[error("undeliverable: {0}")]
pub struct Undeliverable(pub String);

/// Delivery into a directory: files under `root/<transfer_id>/`.
#[derive(Debug, Clone)]
pub struct DirDelivery {
    root: PathBuf,
}

impl DirDelivery {
    /// Delivers under `root`.
    pub fn new(root: PathBuf) -> DirDelivery {
        DirDelivery { root }
    }
}

impl Deliver for DirDelivery {
    fn deliver(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<Delivered> {
        self.deliver_dir(dir, manifest).map(|p| Delivered {
            location: p.display().to_string(),
            refused: Vec::new(),
        })
    }
}

impl DirDelivery {
    fn deliver_dir(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<PathBuf> {
        let id = manifest.transfer_id.to_string();
        let target = self.root.join(&id);
        if target.exists() {
            return Ok(target);
        }
        transfer_dir::create_dir_durably(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let outbox = dir.root().join("outbox");
        if outbox.exists() {
            std::fs::remove_dir_all(&outbox)?;
        }
        std::fs::create_dir(&outbox)?;
        for f in &manifest.files {
            let src = dir.data_file(&f.name);
            let dst = outbox.join(&f.name);
            if std::fs::hard_link(&src, &dst).is_err() {
                copy_durable(&src, &dst)?;
            }
        }
        sync_dir(&outbox)?;
        match std::fs::rename(&outbox, &target) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
                // Another file system: gather next to the target under a hidden name first.
                let staging = self.root.join(format!(".{id}.partial"));
                if staging.exists() {
                    std::fs::remove_dir_all(&staging)?;
                }
                std::fs::create_dir(&staging)?;
                for f in &manifest.files {
                    copy_durable(&dir.data_file(&f.name), &staging.join(&f.name))?;
                }
                sync_dir(&staging)?;
                std::fs::rename(&staging, &target)?;
                std::fs::remove_dir_all(&outbox)?;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot move into {}", target.display()));
            }
        }
        sync_dir(&self.root)?;
        Ok(target)
    }
}

fn copy_durable(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::copy(src, dst)
        .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
    std::fs::File::open(dst)?.sync_all()?;
    Ok(())
}

/// Committed transfers in a gateway spool that are neither delivered nor set aside as
/// undeliverable (start-up recovery).
pub fn undelivered(spool_dir: &Path) -> Vec<TransferId> {
    transfer_dir::list(spool_dir, |d| {
        d.has_receipt() && !d.delivered().exists() && !d.undeliverable().exists()
    })
}

/// Committed transfers waiting for delivery; shared by the receive path, the start-up and
/// SIGHUP rescans, and the worker. A transfer is in the queue at most once.
#[derive(Debug, Clone)]
pub struct DeliveryQueue {
    tx: mpsc::UnboundedSender<TransferId>,
    /// Queued or being delivered.
    queued: Arc<Mutex<HashSet<TransferId>>>,
}

impl DeliveryQueue {
    /// A queue and the receiving end for [`run_worker`].
    pub fn new() -> (DeliveryQueue, mpsc::UnboundedReceiver<TransferId>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            DeliveryQueue {
                tx,
                queued: Arc::new(Mutex::new(HashSet::new())),
            },
            rx,
        )
    }

    /// Queues a committed transfer; false if it is already queued or being delivered.
    pub fn push(&self, id: TransferId) -> bool {
        let mut queued = self.lock();
        if !queued.insert(id) {
            return false;
        }
        if self.tx.send(id).is_err() {
            queued.remove(&id);
            return false;
        }
        true
    }

    /// Queues every committed transfer in `spool_dir` that is neither delivered nor set
    /// aside, unless already queued; returns how many were added.
    pub fn rescan(&self, spool_dir: &Path) -> usize {
        undelivered(spool_dir)
            .into_iter()
            .filter(|id| self.push(*id))
            .count()
    }

    /// Transfers queued or being delivered.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn done(&self, id: &TransferId) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<TransferId>> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Delivers committed transfers as they arrive on `queue`, retrying failures worth a retry
/// with `backoff`.
pub async fn run_worker(
    spool_dir: PathBuf,
    target: Arc<dyn Deliver>,
    queue: DeliveryQueue,
    mut rx: mpsc::UnboundedReceiver<TransferId>,
    audit: crate::audit::Log,
    backoff: Backoff,
    notices: Option<Arc<crate::notice::Notices>>,
) {
    // The edge hears of each outcome through a signed delivery notice, queued durably; one
    // that cannot be signed now is signed at the next start (`Notices::owed`).
    let notify = |id: TransferId| {
        let notices = notices.clone();
        async move {
            if let Some(n) = notices
                && let Err(e) = n.issue(id).await
            {
                error!(transfer = %id, error = %format!("{e:#}"), "cannot sign the delivery notice; it is signed at the next start");
            }
        }
    };
    while let Some(id) = rx.recv().await {
        let dir = TransferDir::new(&spool_dir, &id);
        // Failed attempts of this transfer so far.
        let mut failures: u32 = 0;
        loop {
            let (d, t, a) = (dir.clone(), target.clone(), audit.clone());
            let res = tokio::task::spawn_blocking(move || deliver_one(&d, t.as_ref(), &a)).await;
            match res {
                Ok(Ok(Delivered { location, refused })) => {
                    if refused.is_empty() {
                        info!(transfer = %id, %location, "delivered");
                        metrics::counter!("baylink_transfers_total", "stage" => "delivered", "outcome" => "ok").increment(1);
                    } else {
                        warn!(transfer = %id, %location, refused = refused.len(), "delivered but for the instances the store refused: {}", dicomweb::summary(&refused));
                        metrics::counter!("baylink_transfers_total", "stage" => "delivered", "outcome" => "partial").increment(1);
                    }
                    notify(id).await;
                    queue.done(&id);
                    break;
                }
                Ok(Err(e)) if e.downcast_ref::<Undeliverable>().is_some() => {
                    let (d, a) = (dir.clone(), audit.clone());
                    let reason = format!("{e:#}");
                    let kept =
                        tokio::task::spawn_blocking(move || set_aside(&d, &a, &reason)).await;
                    match kept {
                        Ok(Ok(())) => {
                            error!(transfer = %id, error = %format!("{e:#}"), "undeliverable: set aside (delete its `undeliverable` file, then reload (SIGHUP) or restart to try again)");
                            metrics::counter!("baylink_transfers_total", "stage" => "delivered", "outcome" => "undeliverable").increment(1);
                            notify(id).await;
                            queue.done(&id);
                            break;
                        }
                        // Not recorded: keep retrying rather than lose track of it.
                        Ok(Err(err)) => {
                            warn!(transfer = %id, error = %format!("{err:#}"), "cannot set an undeliverable transfer aside")
                        }
                        Err(err) => warn!(transfer = %id, error = %err, "set-aside task failed"),
                    }
                }
                Ok(Err(e)) => {
                    let (cause, after) = e
                        .downcast_ref::<Transient>()
                        .map_or((Cause::Other, None), |t| (t.cause, t.retry_after));
                    let wait = backoff.wait(failures, after);
                    warn!(
                        transfer = %id,
                        error = %format!("{e:#}"),
                        cause = %cause.label(),
                        attempt = failures + 1,
                        retry_after = ?after,
                        retry_in = ?wait,
                        "delivery failed"
                    );
                    metrics::counter!("baylink_transfers_total", "stage" => "delivered", "outcome" => "retry").increment(1);
                    metrics::counter!("baylink_delivery_retries_total", "cause" => cause.label())
                        .increment(1);
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => warn!(transfer = %id, error = %e, "delivery task failed"),
            }
            // The set-aside or the task failed: try again after the usual wait.
            let wait = backoff.wait(failures, None);
            failures = failures.saturating_add(1);
            tokio::time::sleep(wait).await;
        }
    }
}

/// audit: a `failed` record naming the reason is durable before the `undeliverable` file
/// takes the transfer out of the queue.
fn set_aside(dir: &TransferDir, audit: &crate::audit::Log, reason: &str) -> anyhow::Result<()> {
    let manifest = dir.manifest()?;
    audit.append_blocking(crate::audit::Event {
        detail: Some(reason.to_owned()),
        ..crate::audit::Event::of_manifest(crate::audit::Kind::Failed, &manifest)
    })?;
    write_atomic(&dir.undeliverable(), reason.as_bytes())?;
    Ok(())
}

fn deliver_one(
    dir: &TransferDir,
    target: &dyn Deliver,
    audit: &crate::audit::Log,
) -> anyhow::Result<Delivered> {
    let manifest = dir.manifest()?;
    // Committed by a version that stored payload under the hospital's names.
    dir.adopt_legacy_names(manifest.files.iter().map(|f| f.name.as_str()))?;
    let delivered = target.deliver(dir, &manifest)?;
    // audit: `delivered` is durable before the transfer is marked delivered; if it cannot be
    // recorded the delivery is retried (delivery is idempotent by transfer id). A partial
    // delivery's record names the refused instances.
    audit.append_blocking(crate::audit::Event {
        detail: (!delivered.refused.is_empty()).then(|| {
            let text = format!(
                "partial: {} of {} instances stored; {}",
                manifest.files.len().saturating_sub(delivered.refused.len()),
                manifest.files.len(),
                dicomweb::summary(&delivered.refused)
            );
            baylink_net::proto::cut_text(&text, crate::audit::record::MAX_DETAIL).to_owned()
        }),
        ..crate::audit::Event::of_manifest(crate::audit::Kind::Delivered, &manifest)
    })?;
    write_atomic(&dir.delivered(), delivered.location.as_bytes())?;
    crate::telemetry::stage_bytes("delivered", manifest.total_bytes());
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_queued_at_most_once_until_it_is_done() {
        let (queue, mut rx) = DeliveryQueue::new();
        let (a, b) = (TransferId::new_v7(), TransferId::new_v7());
        assert!(queue.push(a));
        assert!(!queue.push(a), "already queued");
        assert!(queue.push(b));
        assert_eq!(queue.pending(), 2);
        assert_eq!(rx.try_recv().unwrap(), a);
        assert_eq!(rx.try_recv().unwrap(), b);
        assert!(rx.try_recv().is_err(), "a was sent once");
        queue.done(&a);
        assert_eq!(queue.pending(), 1);
        assert!(queue.push(a), "queued again once done");
    }

    #[test]
    fn a_closed_queue_takes_nothing() {
        let (queue, rx) = DeliveryQueue::new();
        drop(rx);
        assert!(!queue.push(TransferId::new_v7()));
        assert_eq!(queue.pending(), 0);
    }
}
