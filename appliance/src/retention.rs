//! Spool retention: the payload of a finished transfer leaves the spool `spool.retain` after
//! the transfer finished.
//!
//! *Finished* means the appliance has nothing left to do with the bytes: on the edge, the
//! gateway's receipt is verified and stored (`receipt.sig`); on the gateway, the transfer is
//! delivered downstream (`delivered`) and the edge has acknowledged its signed delivery
//! notice (`notice.sig` stored, `notice.pending` gone). The time it finished is that file's modification time.
//! Nothing else is ever removed: a transfer still being received, sealed, sent or delivered,
//! one set aside as undeliverable, and one the gateway refused keep their bytes until an
//! operator decides.
//!
//! What goes is `data/` (and an ingest's `parts/`, empty by then): the bulk. What stays is the
//! evidence, a few kilobytes: declaration, manifest and its signature, receipt, the markers,
//! so the hospital API still reports the transfer and serves its receipt, and the gateway
//! still answers an edge that offers the transfer again with the receipt.
//!
//! Order, for a crash at any point: the `expired` audit record is durable first, then the
//! `pruned` marker (atomically), then the files go. A crash before the marker repeats the
//! whole step (at worst a second `expired` record for the transfer); a crash after it only
//! finishes the removal.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::audit::{self, Event, Kind};
use crate::setting::Role;
use crate::transfer_dir::{self, TransferDir, write_atomic};

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Transfers whose payload was removed in this sweep.
    pub pruned: u32,
    /// Bytes of payload removed (file sizes).
    pub bytes: u64,
    /// Transfers that could not be pruned (logged; tried again next sweep).
    pub failed: u32,
}

/// Removes the payload of every transfer in `spool_dir` that finished at least `retain`
/// before `now`. Blocking: run it on a blocking thread.
pub fn sweep(
    spool_dir: &Path,
    role: Role,
    retain: Duration,
    now: SystemTime,
    audit: &audit::Log,
) -> Sweep {
    let mut done = Sweep::default();
    for id in transfer_dir::list(spool_dir, |_| true) {
        let dir = TransferDir::new(spool_dir, &id);
        match prune_if_due(&dir, role, retain, now, audit) {
            Ok(None) => {}
            Ok(Some(bytes)) => {
                done.pruned += 1;
                done.bytes += bytes;
                info!(
                    transfer = %id,
                    bytes,
                    retained = %humantime::format_duration(retain),
                    "payload removed from the spool (spool.retain)"
                );
            }
            Err(e) => {
                done.failed += 1;
                warn!(transfer = %id, error = %format!("{e:#}"), "cannot remove the payload of a finished transfer");
            }
        }
    }
    done
}

/// When the transfer finished, if it has.
fn finished_at(dir: &TransferDir, role: Role) -> Option<SystemTime> {
    let marker = match role {
        Role::Edge if dir.has_receipt() => dir.receipt_sig(),
        // The edge must hear of it first: a delivered transfer whose signed notice is not
        // yet stored, or not yet acknowledged by the edge, is not finished.
        Role::Gateway if dir.notice_pending().exists() || !dir.has_notice() => return None,
        Role::Gateway => dir.delivered(),
        Role::Edge => return None,
    };
    std::fs::metadata(marker).and_then(|m| m.modified()).ok()
}

/// The payload directories of a transfer.
fn payload_dirs(dir: &TransferDir) -> [PathBuf; 2] {
    [dir.data_dir(), dir.parts_dir()]
}

/// Prunes `dir` if it is due; returns the bytes removed, or `None` when it is not due.
fn prune_if_due(
    dir: &TransferDir,
    role: Role,
    retain: Duration,
    now: SystemTime,
    audit: &audit::Log,
) -> anyhow::Result<Option<u64>> {
    if dir.pruned().exists() {
        // Finish a removal a crash interrupted; the record and the marker are already there.
        if payload_dirs(dir).iter().any(|p| p.exists()) {
            return remove_payload(dir).map(Some);
        }
        return Ok(None);
    }
    let Some(finished) = finished_at(dir, role) else {
        return Ok(None);
    };
    // A finish time in the future (clock stepped back) is not due yet.
    if now.duration_since(finished).is_ok_and(|age| age >= retain) {
        let manifest = dir.manifest()?;
        let after = match role {
            Role::Edge => "receipt",
            Role::Gateway => "delivery",
        };
        let reason = format!(
            "payload removed from the spool {} after {after} (spool.retain)",
            humantime::format_duration(retain)
        );
        let mut event = Event {
            detail: Some(reason.clone()),
            ..Event::of_manifest(Kind::Expired, &manifest)
        };
        if role == Role::Edge {
            // `of_manifest` names the sender as the peer: on the edge that is itself.
            event.peer = None;
        }
        audit.append_blocking(event)?;
        write_atomic(&dir.pruned(), reason.as_bytes())?;
        return remove_payload(dir).map(Some);
    }
    Ok(None)
}

/// Removes the payload directories and makes that durable; returns the bytes they held.
fn remove_payload(dir: &TransferDir) -> anyhow::Result<u64> {
    let dirs = payload_dirs(dir);
    let mut bytes = 0;
    for path in &dirs {
        bytes += crate::transfer_dir::tree_size(path)?;
    }
    dir.remove_dirs(&dirs)?;
    Ok(bytes)
}

/// How often `serve` sweeps: a quarter of the retention, between 1 s and 1 min (the spool
/// gauges are refreshed by the same tick).
pub fn interval(retain: Option<Duration>) -> Duration {
    let max = Duration::from_secs(60);
    retain.map_or(max, |r| (r / 4).clamp(Duration::from_secs(1), max))
}

/// The spool file system's size and free space (for the unprivileged), in bytes.
pub fn spool_space(spool_dir: &Path) -> io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(spool_dir).map_err(io::Error::from)?;
    let unit = st.fragment_size();
    Ok((
        st.blocks().saturating_mul(unit),
        st.blocks_available().saturating_mul(unit),
    ))
}

/// `serve`'s retention loop: sweeps (when `retain` is set) and refreshes the spool gauges
/// `baylink_spool_capacity_bytes`, `baylink_spool_available_bytes` and
/// `baylink_spool_transfers{state}` (see [`crate::spool_state::SpoolState`]), the held bytes and
/// the backlog ([`crate::telemetry::spool_figures`]), every
/// [`interval`]. Runs until aborted.
pub async fn run(spool_dir: PathBuf, role: Role, retain: Option<Duration>, audit: audit::Log) {
    let mut tick = tokio::time::interval(interval(retain));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (dir, log) = (spool_dir.clone(), audit.clone());
        let swept = tokio::task::spawn_blocking(move || {
            let done = retain.map(|r| sweep(&dir, role, r, SystemTime::now(), &log));
            (
                done,
                spool_space(&dir),
                crate::spool_state::count(&dir, role),
                crate::telemetry::spool_figures(&dir, role, SystemTime::now()),
            )
        })
        .await;
        match swept {
            Ok((done, space, counts, figures)) => {
                crate::telemetry::spool_gauges(&figures);
                for (state, n) in counts {
                    metrics::gauge!("baylink_spool_transfers", "state" => state.name())
                        .set(n as f64);
                }
                if let Some(done) = done {
                    metrics::counter!("baylink_spool_pruned_total").increment(done.pruned.into());
                    metrics::counter!("baylink_spool_pruned_bytes_total").increment(done.bytes);
                }
                match space {
                    Ok((capacity, available)) => {
                        metrics::gauge!("baylink_spool_capacity_bytes").set(capacity as f64);
                        metrics::gauge!("baylink_spool_available_bytes").set(available as f64);
                    }
                    Err(e) => warn!(error = %e, "cannot read the spool's free space"),
                }
            }
            Err(e) => warn!(error = %e, "spool retention task failed"),
        }
    }
}

#[cfg(test)]
mod tests;
