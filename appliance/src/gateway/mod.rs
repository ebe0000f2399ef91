//! The gateway role: accepts edge connections, receives and verifies transfers into the
//! spool, commits them and signs receipts.
//!
//! This module owns the shared state (`Gateway`: the transfers being received, the ones
//! checked at rest) and serves one QUIC connection (`serve_connection`), handing each control
//! stream to `control` and each chunk stream to `chunks`. The rest lives in rooms of its
//! own: `offer` (checking an offer, preparing the spool), `commit` (checkpoints, commit,
//! receipt), `witness` (cosigning the edge's audit log).
//!
//! It must not parse wire bytes itself (that is `baylink_net::proto`), nor deliver anything:
//! committed transfers are handed to `deliver` through the queue.
//!
//! Invariants kept here:
//! - a chunk counts as good only when the SHA-256 of exactly the bytes written equals the
//!   manifest's digest for it;
//! - the `state` file lists only chunks that are good *and* fsynced;
//! - `.part` files become their final names only when every chunk is good and durable; the
//!   receipt signature file is written last and is the commit point;
//! - nothing reaches the delivery path before the commit (delivery runs afterwards).

mod chunks;
mod commit;
mod control;
mod offer;
mod staging;
mod witness;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baylink_net::proto::{
    ChunkSet, ErrorCode, Limits, Manifest, Receiver, ReceiverConfig, TransferId,
};
use baylink_net::spool::{Spool, SpoolFile};
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::deliver::DeliveryQueue;
use crate::signing::Sign;
use crate::transfer_dir::TransferDir;

/// Everything the gateway's receive path shares.
#[derive(Debug)]
pub struct Gateway {
    /// This appliance's id (named in receipts).
    pub id: String,
    /// Spool root.
    pub spool_dir: std::path::PathBuf,
    /// The io_uring file thread.
    pub spool: Spool,
    /// HSM signer and the edge's pinned key ([`crate::signing::Keys`] outside unit tests).
    pub keys: Arc<dyn Sign>,
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
    /// Delivery notices owed to the edges (served on their `Notices` streams).
    pub notices: Arc<crate::notice::Notices>,
    /// A chunk stream that brings no bytes for this long is reset.
    chunk_stall_timeout: Duration,
    active: Mutex<HashMap<TransferId, Arc<Active>>>,
    /// Transfers announced and not yet offered, whose chunks are staged
    /// ([`staging`]).
    staged: Mutex<HashMap<TransferId, Arc<staging::Staged>>>,
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
        keys: Arc<dyn Sign>,
        limits: Limits,
        receiver_cfg: ReceiverConfig,
        committed: DeliveryQueue,
        audit: crate::audit::Log,
    ) -> Gateway {
        staging::clear_leftovers(&spool_dir);
        Gateway {
            notices: Arc::new(crate::notice::Notices::none(&spool_dir)),
            id,
            spool_dir,
            spool,
            keys,
            limits,
            receiver_cfg,
            committed,
            draining: AtomicBool::new(false),
            audit,
            chunk_stall_timeout: crate::config::DEFAULT_CHUNK_STALL_TIMEOUT,
            active: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            checked_at_rest: Mutex::new(HashSet::new()),
        }
    }

    /// Sets how long a chunk stream may bring no bytes before it is reset
    /// (`transport.chunk_stall_timeout`).
    pub fn with_chunk_stall_timeout(mut self, limit: Duration) -> Gateway {
        self.chunk_stall_timeout = limit;
        self
    }

    /// Serves delivery notices from `notices` (the ones the delivery worker issues).
    pub fn with_notices(mut self, notices: Arc<crate::notice::Notices>) -> Gateway {
        self.notices = notices;
        self
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
    /// The connection that offered it: only its chunk streams feed it.
    conn: Link,
    cancel: watch::Sender<bool>,
    done: watch::Sender<bool>,
    /// Set by a chunk whose write found the spool full: the control stream pauses the
    /// transfer (the edge retries with backoff and resumes once space is back).
    no_space: AtomicBool,
}

/// The connection a transfer is received on: its id (chunk streams of another connection
/// are refused) and a way to close it (a newer connection took the transfer over).
///
/// Always a QUIC connection, except in the unit tests of the offer and the commit, which
/// run without a network.
#[derive(Debug, Clone)]
enum Link {
    Quic(quinn::Connection),
    #[cfg(test)]
    Detached(usize),
}

impl Link {
    fn stable_id(&self) -> usize {
        match self {
            Link::Quic(c) => c.stable_id(),
            #[cfg(test)]
            Link::Detached(id) => *id,
        }
    }

    fn close(&self, code: quinn::VarInt, reason: &[u8]) {
        match self {
            Link::Quic(c) => c.close(code, reason),
            #[cfg(test)]
            Link::Detached(_) => {}
        }
    }
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
        crate::telemetry::watch_connection(conn.clone(), peer.clone());
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let gw = gw.clone();
                        let conn = conn.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move {
                            control::control_stream(gw, conn, peer, send, recv).await
                        });
                    }
                    Err(e) => { info!(reason = %e, "connection ended"); break; }
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let gw = gw.clone();
                        let conn_id = conn.stable_id();
                        tokio::spawn(async move { chunks::data_stream(gw, conn_id, recv).await });
                    }
                    Err(e) => { info!(reason = %e, "connection ended"); break; }
                },
            }
        }
    }
    .instrument(span)
    .await
}

/// The file in the spool that holds the gateway's QUIC stateless-reset secret.
pub const RESET_SECRET_FILE: &str = ".quic-reset-secret";

/// The gateway's QUIC stateless-reset secret ([`RESET_SECRET_FILE`] in the spool: 64 random
/// bytes, mode 0600), made at the first start and kept across restarts, so a restarted
/// gateway resets the connections of its earlier process at their next packet and the edges
/// resume at once instead of after the idle timeout. A file of another length is replaced.
pub fn quic_reset_secret(spool_dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const LEN: usize = 64;
    let path = spool_dir.join(RESET_SECRET_FILE);
    match std::fs::read(&path) {
        Ok(secret) if secret.len() == LEN => return Ok(secret),
        Ok(other) => {
            warn!(path = %path.display(), len = other.len(), "QUIC reset secret of the wrong length: replaced");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut secret = vec![0u8; LEN];
    aws_lc_rs::rand::fill(&mut secret)
        .map_err(|_| anyhow::anyhow!("no random bytes for the QUIC reset secret"))?;
    let tmp = spool_dir.join(format!("{RESET_SECRET_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(&secret)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .and_then(|()| crate::transfer_dir::sync_dir(spool_dir))
        .with_context(|| format!("cannot store {}", path.display()))?;
    Ok(secret)
}

/// How a failure to store a transfer on this gateway is answered, by its OS error:
///
/// | cause | code | the edge |
/// |---|---|---|
/// | `ENOSPC`, `EDQUOT` (spool full) | `NoSpace` | pauses, retries |
/// | `ENAMETOOLONG`, `EFBIG` (this transfer cannot be stored here) | `Refused` | stops at once |
/// | any other (I/O error, permissions, a read-only spool: states of the gateway) | `Internal` | retries |
///
/// Only what is about the transfer itself is final: a state of the gateway is fixed there,
/// and the transfer then goes through.
pub(crate) fn storage_code(e: &std::io::Error) -> ErrorCode {
    use nix::libc;
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        Some(libc::ENAMETOOLONG | libc::EFBIG) => ErrorCode::Refused,
        _ if matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) =>
        {
            ErrorCode::NoSpace
        }
        _ => ErrorCode::Internal,
    }
}

/// [`storage_code`] for the first OS error in an error chain; `Internal` without one (an
/// HSM or audit failure is the gateway's own).
pub(crate) fn storage_code_of(e: &anyhow::Error) -> ErrorCode {
    e.chain()
        .find_map(|c| {
            c.downcast_ref::<std::io::Error>()
                .map(storage_code)
                .or_else(|| {
                    c.downcast_ref::<baylink_net::spool::SpoolError>()
                        .map(|s| storage_code(&s.source))
                })
        })
        .unwrap_or(ErrorCode::Internal)
}

/// The text of a spool error with its cause (`SpoolError` displays the operation and path
/// only), for the error frame: the edge must see why, e.g. "File too large".
pub(crate) fn spool_text(e: &baylink_net::spool::SpoolError) -> String {
    format!("spool: {e}: {}", e.source)
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

/// Takes a finished control stream's transfer out of the registry (unless a newer offer
/// already replaced it) and tells a waiting take-over that it is done.
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc;

    #[test]
    fn the_reset_secret_is_made_once_kept_private_and_replaced_when_damaged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = quic_reset_secret(dir.path()).unwrap();
        assert_eq!(first.len(), 64);
        assert_ne!(first, vec![0u8; 64]);
        let path = dir.path().join(RESET_SECRET_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            quic_reset_secret(dir.path()).unwrap(),
            first,
            "kept across starts"
        );
        std::fs::write(&path, b"short").unwrap();
        let replaced = quic_reset_secret(dir.path()).unwrap();
        assert_eq!(replaced.len(), 64);
        assert_ne!(replaced, first);
    }

    #[test]
    fn only_what_is_about_the_transfer_is_refused_for_good() {
        let code = |errno| storage_code(&std::io::Error::from_raw_os_error(errno));
        assert_eq!(code(libc::ENOSPC), ErrorCode::NoSpace);
        assert_eq!(code(libc::EDQUOT), ErrorCode::NoSpace);
        assert_eq!(code(libc::EFBIG), ErrorCode::Refused);
        assert_eq!(code(libc::ENAMETOOLONG), ErrorCode::Refused);
        // States of the gateway, fixed there: the edge retries.
        for errno in [libc::EIO, libc::EACCES, libc::EROFS, libc::EMFILE] {
            assert_eq!(code(errno), ErrorCode::Internal, "{errno}");
            assert!(code(errno).is_retryable());
        }
        assert!(!code(libc::EFBIG).is_retryable());

        // Found anywhere in an error chain; none (an HSM failure) is the gateway's own.
        let chained = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EFBIG))
            .context("cannot commit");
        assert_eq!(storage_code_of(&chained), ErrorCode::Refused);
        assert_eq!(
            storage_code_of(&anyhow::anyhow!("C_Sign: CKR_DEVICE_ERROR")),
            ErrorCode::Internal
        );
    }
}

#[cfg(test)]
mod orchestration_tests;
