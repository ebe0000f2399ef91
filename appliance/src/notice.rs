//! Delivery notices: the gateway tells the edge, signed by its HSM, that a committed transfer
//! is in the record store (`delivered`), in it but for the instances the store refused
//! (`partial`, each refused instance listed with the store's reason), or was set aside
//! because the store refused it (`undeliverable`).
//!
//! Gateway side ([`Notices`]): once the delivery worker has recorded the store's answer (the
//! `delivered` or `undeliverable` marker, after its audit record), [`Notices::issue`] signs a
//! [`DeliveryNotice`] under [`DELIVERY_NOTICE_CONTEXT`] and keeps it in the transfer's spool
//! directory: `notice.pending` first (the notice is owed), then `notice.bin` and `notice.sig`.
//! That is the durable queue: it survives a restart, and [`Notices::owed`] finds transfers
//! whose notice a crash kept from being signed. The notice is sent on every `Notices` stream
//! the transfer's own edge opens ([`Notices::serve_stream`]); `notice.pending` is removed only
//! when that edge acknowledges it (`NoticeAck`). Only the edge that sent a transfer (the
//! manifest's sender, which is its TLS name) is ever sent its notice.
//!
//! Edge side ([`accept`]): a notice is verified against the pinned gateway key (fail closed:
//! a notice that does not verify, or that names a transfer, Merkle root or manifest this edge
//! does not hold, is logged and refused, never recorded nor acknowledged), recorded in the
//! audit log (`notified`) and then stored as `notice.bin`/`notice.sig`, under a lock so that a
//! notice received twice (by `serve` and a `send --wait-delivered`, or again after a lost
//! acknowledgement) is recorded once.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use anyhow::Context;
use baylink_net::proto::{DeliveryNotice, ErrorCode, Frame, Outcome, TransferId, cut_text};
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::audit::{self, Event, Kind};
use crate::link::{FrameWriter, LinkError};
use crate::signing::{DELIVERY_NOTICE_CONTEXT, Sign, verify_peer};
use crate::transfer_dir::{self, TransferDir, sync_dir, write_atomic};

/// The gateway's delivery notices owed to edges, and who may collect each.
#[derive(Debug)]
pub struct Notices {
    spool_dir: PathBuf,
    keys: Option<Arc<dyn Sign>>,
    gateway_id: String,
    /// Owed notices (signed and stored): transfer → the edge that sent it.
    pending: Mutex<HashMap<TransferId, String>>,
    changes: watch::Sender<u64>,
}

impl Notices {
    /// The notices of `spool_dir`: loads every one still owed (`notice.pending` beside a
    /// stored notice). Without `keys` nothing can be issued (tests of the receive path).
    pub fn load(spool_dir: &Path, keys: Option<Arc<dyn Sign>>, gateway_id: &str) -> Notices {
        let mut pending = HashMap::new();
        for id in transfer_dir::list(spool_dir, |d| d.notice_pending().exists() && d.has_notice()) {
            match TransferDir::new(spool_dir, &id).manifest() {
                Ok(m) => {
                    pending.insert(id, m.sender);
                }
                Err(e) => {
                    warn!(transfer = %id, error = %format!("{e:#}"), "delivery notice owed, but the manifest is unreadable")
                }
            }
        }
        Notices {
            spool_dir: spool_dir.to_owned(),
            keys,
            gateway_id: gateway_id.to_owned(),
            pending: Mutex::new(pending),
            changes: watch::Sender::new(0),
        }
    }

    /// No notices, and none to issue (a gateway built without [`Notices::load`]).
    pub fn none(spool_dir: &Path) -> Notices {
        Notices {
            spool_dir: spool_dir.to_owned(),
            keys: None,
            gateway_id: String::new(),
            pending: Mutex::new(HashMap::new()),
            changes: watch::Sender::new(0),
        }
    }

    /// Transfers whose store answer is recorded but whose notice is not signed yet (a crash
    /// or an HSM failure came between): issue them at start-up.
    pub fn owed(spool_dir: &Path) -> Vec<TransferId> {
        transfer_dir::list(spool_dir, |d| {
            (d.delivered().exists() || d.undeliverable().exists()) && !d.has_notice()
        })
    }

    /// Number of notices not yet acknowledged by their edge.
    pub fn unacknowledged(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TransferId, String>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signs the delivery notice of transfer `id` from its recorded outcome (the `delivered`
    /// or `undeliverable` marker) and queues it durably for its edge. Re-issuing replaces an
    /// earlier notice (a transfer set aside, then delivered after an operator's retry).
    pub async fn issue(&self, id: TransferId) -> anyhow::Result<DeliveryNotice> {
        let keys = self
            .keys
            .as_ref()
            .context("no HSM keys to sign delivery notices with")?;
        let dir = TransferDir::new(&self.spool_dir, &id);
        let d = dir.clone();
        let (manifest, outcome, answer, decided, refused) =
            tokio::task::spawn_blocking(move || {
                let manifest = d.manifest()?;
                // The instances the store refused, as the delivery recorded them (STOW-RS).
                let refused = crate::deliver::dicomweb::refused_instances(&d);
                let (outcome, marker) = if d.delivered().exists() {
                    let outcome = if refused.is_empty() {
                        Outcome::Delivered
                    } else {
                        Outcome::Partial
                    };
                    (outcome, d.delivered())
                } else if d.undeliverable().exists() {
                    (Outcome::Undeliverable, d.undeliverable())
                } else {
                    anyhow::bail!("transfer {id} has no recorded delivery outcome");
                };
                let answer = std::fs::read(&marker)
                    .with_context(|| format!("cannot read {}", marker.display()))?;
                let decided = std::fs::metadata(&marker)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                Ok((manifest, outcome, answer, decided, refused))
            })
            .await??;
        let notice = DeliveryNotice::new(
            id,
            manifest.merkle_root,
            manifest.digest(),
            outcome,
            &answer,
            &self.gateway_id,
            decided,
        )
        .with_refused(&refused);
        let bytes = notice.to_bytes();
        let sig = keys.sign(DELIVERY_NOTICE_CONTEXT, &bytes).await?;
        let d = dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Owed first: a crash after it leaves a transfer that start-up signs again.
            write_atomic(&d.notice_pending(), b"")?;
            write_atomic(&d.notice_bin(), &bytes)?;
            write_atomic(&d.notice_sig(), &sig)
        })
        .await?
        .with_context(|| format!("cannot store the delivery notice of {id}"))?;
        self.lock().insert(id, manifest.sender.clone());
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        info!(transfer = %id, outcome = outcome.as_str(), refused = notice.refused_total, edge = %manifest.sender, "delivery notice signed and queued");
        metrics::counter!("baylink_delivery_notices_total", "event" => "signed").increment(1);
        Ok(notice)
    }

    /// Serves one `Notices` stream of edge `peer` (its TLS name): sends every notice owed to
    /// it, then each new one as it is issued, and forgets each the edge acknowledges. Ends
    /// when the stream or the connection does.
    pub async fn serve_stream(
        &self,
        peer: &str,
        mut writer: FrameWriter,
        mut frames: mpsc::Receiver<Result<Frame, LinkError>>,
    ) {
        let mut changes = self.changes.subscribe();
        let mut sent: HashSet<TransferId> = HashSet::new();
        loop {
            changes.borrow_and_update();
            let owed: Vec<TransferId> = self
                .lock()
                .iter()
                .filter(|(id, edge)| edge.as_str() == peer && !sent.contains(id))
                .map(|(id, _)| *id)
                .collect();
            for id in owed {
                let dir = TransferDir::new(&self.spool_dir, &id);
                let read = tokio::task::spawn_blocking(move || {
                    Ok::<_, std::io::Error>((
                        std::fs::read(dir.notice_bin())?,
                        std::fs::read(dir.notice_sig())?,
                    ))
                })
                .await;
                let (notice, signature) = match read {
                    Ok(Ok(pair)) => pair,
                    Ok(Err(e)) => {
                        warn!(transfer = %id, error = %e, "cannot read a queued delivery notice");
                        continue;
                    }
                    Err(e) => {
                        warn!(transfer = %id, error = %e, "delivery notice read task failed");
                        continue;
                    }
                };
                let frame = Frame::Notice {
                    notice: notice.into(),
                    signature: signature.into(),
                };
                if writer.send(&frame).await.is_err() {
                    return;
                }
                sent.insert(id);
                metrics::counter!("baylink_delivery_notices_total", "event" => "sent").increment(1);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                frame = frames.recv() => match frame {
                    Some(Ok(Frame::NoticeAck { transfer_id })) => {
                        self.acknowledged(peer, transfer_id).await;
                        // A notice re-issued after it was sent on this stream goes out again.
                        sent.remove(&transfer_id);
                    }
                    Some(Ok(Frame::Error { code, text })) => {
                        info!(?code, %text, "edge ended its notice stream");
                        return;
                    }
                    Some(Ok(other)) => {
                        let _ = writer
                            .send(&Frame::Error {
                                code: ErrorCode::UnexpectedFrame,
                                text: format!("{} on a notice stream", other.kind()),
                            })
                            .await;
                        writer.finish();
                        return;
                    }
                    Some(Err(_)) | None => return,
                },
            }
        }
    }

    /// The edge `peer` stored the notice of `id`: it is no longer owed. An acknowledgement for
    /// a transfer not owed to that edge changes nothing.
    async fn acknowledged(&self, peer: &str, id: TransferId) {
        if self.lock().get(&id).map(String::as_str) != Some(peer) {
            return;
        }
        let dir = TransferDir::new(&self.spool_dir, &id);
        let removed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            match std::fs::remove_file(dir.notice_pending()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            sync_dir(dir.root())
        })
        .await;
        match removed {
            Ok(Ok(())) => {
                self.lock().remove(&id);
                info!(transfer = %id, edge = %peer, "delivery notice acknowledged by the edge");
                metrics::counter!("baylink_delivery_notices_total", "event" => "acknowledged")
                    .increment(1);
            }
            Ok(Err(e)) => {
                warn!(transfer = %id, error = %e, "cannot remove notice.pending; the notice will be sent again")
            }
            Err(e) => warn!(transfer = %id, error = %e, "notice acknowledgement task failed"),
        }
    }
}

/// A notice this edge received, verified and stored.
#[derive(Debug, Clone)]
pub struct Received {
    /// The notice.
    pub notice: DeliveryNotice,
    /// False when the same notice was already stored (nothing was recorded again).
    pub new: bool,
}

/// Why the edge refused a delivery notice (it is neither recorded nor acknowledged).
#[derive(Debug, thiserror::Error)]
#[error("delivery notice refused: {0}")]
pub struct Refused(pub String);

/// Edge: verifies a delivery notice against the pinned gateway key and this edge's own
/// record of the transfer (manifest, Merkle root), records it in the audit log (`notified`)
/// and stores it (`notice.bin`, `notice.sig`). A notice already stored with the same bytes is
/// not recorded again. Blocking: run it on a blocking thread.
pub fn accept(
    keys: &dyn Sign,
    spool_dir: &Path,
    audit: &audit::Log,
    notice_bytes: &[u8],
    signature: &[u8],
) -> Result<Received, anyhow::Error> {
    if !verify_peer(keys, DELIVERY_NOTICE_CONTEXT, notice_bytes, signature) {
        return Err(Refused(
            "its signature does not verify against the pinned gateway key (peer.signing_key)"
                .into(),
        )
        .into());
    }
    let notice = DeliveryNotice::from_bytes(notice_bytes)
        .map_err(|e| Refused(format!("it does not decode: {e}")))?;
    let dir = TransferDir::new(spool_dir, &notice.transfer_id);
    let manifest = dir.manifest().map_err(|e| {
        Refused(format!(
            "it names transfer {}, which this edge does not hold ({e:#})",
            notice.transfer_id
        ))
    })?;
    if manifest.merkle_root != notice.merkle_root {
        return Err(Refused(format!(
            "its Merkle root differs from that of transfer {}",
            notice.transfer_id
        ))
        .into());
    }
    if manifest.digest() != notice.manifest_digest {
        return Err(Refused(format!(
            "it names another manifest than that of transfer {}",
            notice.transfer_id
        ))
        .into());
    }
    let _lock = lock_notice(&dir)?;
    if std::fs::read(dir.notice_bin()).ok().as_deref() == Some(notice_bytes)
        && std::fs::read(dir.notice_sig()).ok().as_deref() == Some(signature)
    {
        return Ok(Received { notice, new: false });
    }
    // audit: `notified` is durable before the notice is stored (and the transfer shown as
    // delivered or failed).
    audit.append_blocking(Event {
        transfer: Some(notice.transfer_id.to_string()),
        peer: Some(notice.gateway.clone()),
        consent_ref: Some(manifest.process_id.clone()),
        declaration_digest: Some(manifest.declaration_digest),
        merkle_root: Some(notice.merkle_root),
        manifest_digest: Some(notice.manifest_digest),
        detail: Some(audit_detail(&notice)),
        ..Event::new(Kind::Notified)
    })?;
    write_atomic(&dir.notice_bin(), notice_bytes).context("cannot store notice.bin")?;
    write_atomic(&dir.notice_sig(), signature).context("cannot store notice.sig")?;
    Ok(Received { notice, new: true })
}

/// The `detail` of a `notified` record: outcome, answer digest, the refused instances
/// (count, then each SOP Instance UID or file with its FailureReason), then as much of the
/// answer as fits.
pub fn audit_detail(n: &DeliveryNotice) -> String {
    let mut head = format!(
        "{}; store answer sha256 {}",
        n.outcome.as_str(),
        hex::encode(n.answer_digest)
    );
    if n.refused_total > 0 {
        let listed: Vec<String> = n
            .refused
            .iter()
            .map(|r| {
                let who = if r.sop_instance_uid.is_empty() {
                    &r.file
                } else {
                    &r.sop_instance_uid
                };
                match r.failure_reason {
                    Some(code) => format!("{who} {code:#06x}"),
                    None => who.clone(),
                }
            })
            .collect();
        head.push_str(&format!(
            "; {} refused: {}",
            n.refused_total,
            listed.join(", ")
        ));
        head = cut_text(&head, audit::record::MAX_DETAIL * 3 / 4).to_owned();
    }
    head.push_str(": ");
    let room = audit::record::MAX_DETAIL.saturating_sub(head.len());
    format!("{head}{}", cut_text(&n.answer, room))
}

/// The stored (verified) notice of a transfer, if any.
pub fn stored(dir: &TransferDir) -> Option<DeliveryNotice> {
    if !dir.has_notice() {
        return None;
    }
    DeliveryNotice::from_bytes(&std::fs::read(dir.notice_bin()).ok()?).ok()
}

fn lock_notice(dir: &TransferDir) -> anyhow::Result<Flock<File>> {
    let path = dir.root().join("notice.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notice_context_differs_from_every_other_signed_kind() {
        use crate::signing::{MANIFEST_CONTEXT, RECEIPT_CONTEXT, WATCHDOG_CONTEXT};
        for other in [MANIFEST_CONTEXT, RECEIPT_CONTEXT, WATCHDOG_CONTEXT] {
            assert_ne!(DELIVERY_NOTICE_CONTEXT, other);
            assert!(!DELIVERY_NOTICE_CONTEXT.starts_with(other));
            assert!(!other.starts_with(DELIVERY_NOTICE_CONTEXT));
        }
        assert_eq!(DELIVERY_NOTICE_CONTEXT, b"baylink/1 delivery notice\n");
    }

    #[test]
    fn the_audit_detail_keeps_outcome_and_digest_within_bounds() {
        let n = DeliveryNotice::new(
            TransferId::new_v7(),
            [1; 32],
            [2; 32],
            Outcome::Undeliverable,
            "1.2.3: failure reason 0xa900; ".repeat(100).as_bytes(),
            "gw",
            5,
        );
        let d = audit_detail(&n);
        assert!(d.len() <= audit::record::MAX_DETAIL, "{}", d.len());
        assert!(d.starts_with("undeliverable; store answer sha256 "), "{d}");
        assert!(d.contains(&hex::encode(n.answer_digest)), "{d}");
        assert!(d.contains("0xa900"), "{d}");
    }

    #[test]
    fn the_audit_detail_names_the_refused_instances() {
        let refused: Vec<baylink_net::proto::RefusedInstance> = (0..60)
            .map(|n| baylink_net::proto::RefusedInstance {
                file: format!("i{n}.dcm"),
                sop_instance_uid: if n == 1 {
                    String::new()
                } else {
                    format!("1.2.826.0.1.3680043.10.543.{n}")
                },
                sop_class_uid: String::new(),
                failure_reason: (n == 0).then_some(0xc000),
                reason: "the store answered 400 Bad Request".into(),
            })
            .collect();
        let n = DeliveryNotice::new(
            TransferId::new_v7(),
            [1; 32],
            [2; 32],
            Outcome::Partial,
            b"http://store/studies/1",
            "gw",
            5,
        )
        .with_refused(&refused);
        let d = audit_detail(&n);
        assert!(d.len() <= audit::record::MAX_DETAIL, "{}", d.len());
        assert!(d.starts_with("partial; store answer sha256 "), "{d}");
        assert!(
            d.contains("; 60 refused: 1.2.826.0.1.3680043.10.543.0 0xc000, i1.dcm, 1.2.826"),
            "{d}"
        );
    }
}
