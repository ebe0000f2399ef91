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
//! A failed delivery is retried with backoff, except an [`Undeliverable`] one (the store
//! refused the instances themselves): that transfer is set aside with an `undeliverable`
//! file naming the reason and a `failed` audit record, and the queue moves on. Deleting the
//! file and restarting the gateway tries it again.

pub mod dicomweb;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use baylink_net::proto::{Limits, Manifest, TransferId};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::transfer_dir::{self, TransferDir, sync_dir, write_atomic};

/// A downstream store.
pub trait Deliver: Send + Sync + std::fmt::Debug {
    /// Delivers the committed transfer in `dir` and says where it went (a path or a URL);
    /// must be idempotent by transfer id. Called on a blocking thread.
    fn deliver(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<String>;
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
    fn deliver(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<String> {
        self.deliver_dir(dir, manifest)
            .map(|p| p.display().to_string())
    }
}

impl DirDelivery {
    fn deliver_dir(&self, dir: &TransferDir, manifest: &Manifest) -> anyhow::Result<PathBuf> {
        let id = manifest.transfer_id.to_string();
        let target = self.root.join(&id);
        if target.exists() {
            return Ok(target);
        }
        std::fs::create_dir_all(&self.root)
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

/// Committed transfers waiting for delivery; shared by the receive path and the worker.
#[derive(Debug, Clone)]
pub struct DeliveryQueue {
    tx: mpsc::UnboundedSender<TransferId>,
    pending: Arc<AtomicUsize>,
}

impl DeliveryQueue {
    /// A queue and the receiving end for [`run_worker`].
    pub fn new() -> (DeliveryQueue, mpsc::UnboundedReceiver<TransferId>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            DeliveryQueue {
                tx,
                pending: Arc::new(AtomicUsize::new(0)),
            },
            rx,
        )
    }

    /// Queues a committed transfer.
    pub fn push(&self, id: TransferId) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(id).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Transfers queued or being delivered.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// Delivers committed transfers as they arrive on `queue`, retrying failures with backoff.
pub async fn run_worker(
    spool_dir: PathBuf,
    target: Arc<dyn Deliver>,
    queue: DeliveryQueue,
    mut rx: mpsc::UnboundedReceiver<TransferId>,
    audit: crate::audit::Log,
) {
    while let Some(id) = rx.recv().await {
        let dir = TransferDir::new(&spool_dir, &id);
        let mut backoff = Duration::from_millis(500);
        loop {
            let (d, t, a) = (dir.clone(), target.clone(), audit.clone());
            let res = tokio::task::spawn_blocking(move || deliver_one(&d, t.as_ref(), &a)).await;
            match res {
                Ok(Ok(location)) => {
                    info!(transfer = %id, %location, "delivered");
                    metrics::counter!("baylink_transfers_total", "stage" => "delivered", "outcome" => "ok").increment(1);
                    queue.pending.fetch_sub(1, Ordering::SeqCst);
                    break;
                }
                Ok(Err(e)) if e.downcast_ref::<Undeliverable>().is_some() => {
                    let (d, a) = (dir.clone(), audit.clone());
                    let reason = format!("{e:#}");
                    let kept =
                        tokio::task::spawn_blocking(move || set_aside(&d, &a, &reason)).await;
                    match kept {
                        Ok(Ok(())) => {
                            error!(transfer = %id, error = %format!("{e:#}"), "undeliverable: set aside (delete its `undeliverable` file and restart to try again)");
                            metrics::counter!("baylink_transfers_total", "stage" => "delivered", "outcome" => "undeliverable").increment(1);
                            queue.pending.fetch_sub(1, Ordering::SeqCst);
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
                    warn!(transfer = %id, error = %format!("{e:#}"), retry_in = ?backoff, "delivery failed");
                    metrics::counter!("baylink_transfers_total", "stage" => "delivered", "outcome" => "retry").increment(1);
                }
                Err(e) => warn!(transfer = %id, error = %e, "delivery task failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
}

fn manifest_of(dir: &TransferDir) -> anyhow::Result<Manifest> {
    let bytes = std::fs::read(dir.manifest_bin())?;
    Ok(Manifest::from_bytes(&bytes, &Limits::default())?)
}

/// audit: a `failed` record naming the reason is durable before the `undeliverable` file
/// takes the transfer out of the queue.
fn set_aside(dir: &TransferDir, audit: &crate::audit::Log, reason: &str) -> anyhow::Result<()> {
    let manifest = manifest_of(dir)?;
    audit.append_blocking(crate::audit::Event {
        transfer: Some(manifest.transfer_id.to_string()),
        peer: Some(manifest.sender.clone()),
        consent_ref: Some(manifest.process_id.clone()),
        merkle_root: Some(manifest.merkle_root),
        manifest_digest: Some(manifest.digest()),
        detail: Some(reason.to_owned()),
        ..crate::audit::Event::new(crate::audit::Kind::Failed)
    })?;
    write_atomic(&dir.undeliverable(), reason.as_bytes())?;
    Ok(())
}

fn deliver_one(
    dir: &TransferDir,
    target: &dyn Deliver,
    audit: &crate::audit::Log,
) -> anyhow::Result<String> {
    let manifest = manifest_of(dir)?;
    let location = target.deliver(dir, &manifest)?;
    // audit: `delivered` is durable before the transfer is marked delivered; if it cannot be
    // recorded the delivery is retried (delivery is idempotent by transfer id).
    audit.append_blocking(crate::audit::Event {
        transfer: Some(manifest.transfer_id.to_string()),
        peer: Some(manifest.sender.clone()),
        consent_ref: Some(manifest.process_id.clone()),
        declaration_digest: Some(manifest.declaration_digest),
        merkle_root: Some(manifest.merkle_root),
        manifest_digest: Some(manifest.digest()),
        ..crate::audit::Event::new(crate::audit::Kind::Delivered)
    })?;
    write_atomic(&dir.delivered(), location.as_bytes())?;
    Ok(location)
}
