//! The metric families an operator alerts on: each named once here with its help text,
//! and created at start so that a scrape of a fresh appliance already shows every family
//! (an alert on a family that does not exist yet never fires).
//!
//! Also the samplers behind the gauges that no event drives: the QUIC path of each
//! connection ([`watch_connection`]), certificate expiry ([`watch_certificates`]) and the
//! spool and backlog figures ([`spool_gauges`], refreshed by the retention loop).
//!
//! `systemd/prometheus-rules.yml` and `systemd/grafana-dashboard.json` query these
//! families; a unit test checks that every metric they name is listed in [`FAMILIES`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::setting::Role;
use crate::spool_state::SpoolState;
use crate::transfer_dir::{self, TransferDir};

/// What kind of series a family holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One metric family.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// The name Prometheus shows.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Which role exports it.
    pub roles: Roles,
    /// The `# HELP` text.
    pub help: &'static str,
}

/// Which roles export a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// Edge and gateway.
    Both,
    /// The edge only.
    Edge,
    /// The gateway only.
    Gateway,
}

impl Roles {
    /// Whether a `role` appliance exports the family.
    pub fn has(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Roles::Both, _) | (Roles::Edge, Role::Edge) | (Roles::Gateway, Role::Gateway)
        )
    }
}

const fn family(name: &'static str, kind: Kind, roles: Roles, help: &'static str) -> Family {
    Family {
        name,
        kind,
        roles,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

/// Every family `serve` exports (docs/operations.md lists them with their labels).
pub const FAMILIES: &[Family] = &[
    family(
        "baylink_transfers_total",
        Counter,
        Roles::Both,
        "Transfers reaching a stage, by outcome.",
    ),
    family(
        "baylink_bytes_total",
        Counter,
        Roles::Both,
        "Payload bytes by direction (ingested, sent, received).",
    ),
    family(
        "baylink_stage_bytes_total",
        Counter,
        Roles::Both,
        "Payload bytes by stage: ingest, sealed, sent (edge); verified, delivered (gateway).",
    ),
    family(
        "baylink_refusals_total",
        Counter,
        Roles::Both,
        "Refusals recorded in the audit log, by rule, on every door (declarations and files).",
    ),
    family(
        "baylink_files_refused_total",
        Counter,
        Roles::Edge,
        "Files a hospital door refused, by rule.",
    ),
    family(
        "baylink_dicom_instances_total",
        Counter,
        Roles::Edge,
        "C-STORE instances, by outcome.",
    ),
    family(
        "baylink_ingest_connections_refused_total",
        Counter,
        Roles::Edge,
        "Hospital connections closed before they were served, by door and reason.",
    ),
    family(
        "baylink_dicom_associations_total",
        Counter,
        Roles::Edge,
        "C-STORE associations, by how they ended.",
    ),
    family(
        "baylink_policy_reloads_total",
        Counter,
        Roles::Edge,
        "Policy reloads on SIGHUP, by outcome.",
    ),
    family(
        "baylink_tls_reloads_total",
        Counter,
        Roles::Both,
        "TLS certificate, key and CA reloads on SIGHUP, by outcome (failed: the previous ones stay in force).",
    ),
    family(
        "baylink_chunk_retransmits_total",
        Counter,
        Roles::Gateway,
        "Chunks sent again after a failed verification.",
    ),
    family(
        "baylink_chunks_corrupt_at_rest_total",
        Counter,
        Roles::Both,
        "Spool chunks that no longer matched their digest when read back.",
    ),
    family(
        "baylink_audit_repairs_total",
        Counter,
        Roles::Both,
        "Torn tails removed from the audit log after a crash.",
    ),
    family(
        "baylink_spool_pruned_total",
        Counter,
        Roles::Both,
        "Payloads removed under spool.retain.",
    ),
    family(
        "baylink_spool_pruned_bytes_total",
        Counter,
        Roles::Both,
        "Bytes removed under spool.retain.",
    ),
    family(
        "baylink_link_rtt_seconds",
        Gauge,
        Roles::Both,
        "Smoothed QUIC round-trip time to a peer: the largest over its open connections.",
    ),
    family(
        "baylink_link_cwnd_bytes",
        Gauge,
        Roles::Both,
        "Congestion windows of the open connections to a peer, summed.",
    ),
    family(
        "baylink_link_send_rate_bits_per_second",
        Gauge,
        Roles::Both,
        "UDP bits per second sent to a peer over the last sample, summed over its open connections.",
    ),
    family(
        "baylink_link_lost_packets_total",
        Counter,
        Roles::Both,
        "QUIC packets declared lost on connections to a peer.",
    ),
    family(
        "baylink_link_congestion_events_total",
        Counter,
        Roles::Both,
        "Congestion events on connections to a peer.",
    ),
    family(
        "baylink_hsm_sign_seconds",
        Histogram,
        Roles::Both,
        "Wait for each HSM signature.",
    ),
    family(
        "baylink_spool_capacity_bytes",
        Gauge,
        Roles::Both,
        "Size of the spool's file system.",
    ),
    family(
        "baylink_spool_available_bytes",
        Gauge,
        Roles::Both,
        "Free bytes on the spool's file system (for unprivileged writers).",
    ),
    family(
        "baylink_spool_held_bytes",
        Gauge,
        Roles::Both,
        "Bytes of the transfers held in the spool.",
    ),
    family(
        "baylink_spool_reserved_bytes",
        Gauge,
        Roles::Both,
        "Bytes of the spool kept free for audit appends and sealing (spool.reserve_bytes).",
    ),
    family(
        "baylink_spool_transfers",
        Gauge,
        Roles::Both,
        "Transfers in the spool, by state.",
    ),
    family(
        "baylink_send_queue_transfers",
        Gauge,
        Roles::Edge,
        "Hospital uploads queued for a send slot (waiting) or holding one (running).",
    ),
    family(
        "baylink_send_yields_total",
        Counter,
        Roles::Edge,
        "Sends asked to give their slot up to another hospital's transfer.",
    ),
    family(
        "baylink_backlog_transfers",
        Gauge,
        Roles::Both,
        "Transfers not yet through: edge sealed but not receipted; gateway committed but not delivered.",
    ),
    family(
        "baylink_backlog_bytes",
        Gauge,
        Roles::Both,
        "Bytes of the backlog's transfers.",
    ),
    family(
        "baylink_backlog_oldest_seconds",
        Gauge,
        Roles::Both,
        "Age of the oldest transfer in the backlog (0 when empty).",
    ),
    family(
        "baylink_certificate_expiry_seconds",
        Gauge,
        Roles::Both,
        "Seconds until a configured certificate expires (negative once expired).",
    ),
    family(
        "baylink_delivery_notices_total",
        Counter,
        Roles::Both,
        "Delivery notices: signed, sent, acknowledged (gateway); recorded, refused (edge).",
    ),
    family(
        "baylink_delivery_retries_total",
        Counter,
        Roles::Gateway,
        "Delivery attempts that failed and will be retried, by cause.",
    ),
    family(
        "baylink_audit_records_total",
        Counter,
        Roles::Both,
        "Audit records appended, by kind.",
    ),
    family(
        "baylink_audit_checkpoints_total",
        Counter,
        Roles::Both,
        "Signed audit checkpoints.",
    ),
    family(
        "baylink_audit_checkpoint_failures_total",
        Counter,
        Roles::Both,
        "Audit checkpoints that could not be signed.",
    ),
    family(
        "baylink_audit_witness_refused",
        Gauge,
        Roles::Edge,
        "1 while the gateway's witness refuses this edge's audit log (sending is stopped).",
    ),
    family(
        "baylink_audit_witness_refusals_total",
        Counter,
        Roles::Edge,
        "Edge checkpoints the gateway refused to cosign.",
    ),
    family(
        "baylink_watchdog_healthy",
        Gauge,
        Roles::Both,
        "1 while the spool and the HSM pass the watchdog's checks.",
    ),
    family(
        "baylink_watchdog_check_failures_total",
        Counter,
        Roles::Both,
        "Watchdog checks that failed, by check (spool, hsm).",
    ),
    family(
        "baylink_chunk_streams_refused_total",
        Counter,
        Roles::Gateway,
        "Chunk streams refused or reset, by reason.",
    ),
    family(
        "baylink_spool_full_total",
        Counter,
        Roles::Gateway,
        "Chunk writes that found the gateway's spool full.",
    ),
];

/// Transfer stages and the outcomes each can have, per role, as created at start.
pub(crate) const TRANSFER_SERIES: &[(Roles, &str, &[&str])] = &[
    (Roles::Edge, "declared", &["ok", "refused", "expired"]),
    (Roles::Edge, "sealed", &["ok", "refused"]),
    (Roles::Edge, "receipted", &["ok"]),
    (Roles::Gateway, "offer", &["accepted", "refused"]),
    (Roles::Gateway, "receive", &["failed", "paused_no_space"]),
    (Roles::Gateway, "committed", &["ok"]),
    (
        Roles::Gateway,
        "delivered",
        &["ok", "partial", "retry", "undeliverable"],
    ),
];

/// The stages of `baylink_stage_bytes_total`, per role.
pub(crate) const BYTE_STAGES: &[(Roles, &str)] = &[
    (Roles::Edge, "ingest"),
    (Roles::Edge, "sealed"),
    (Roles::Edge, "sent"),
    (Roles::Gateway, "verified"),
    (Roles::Gateway, "delivered"),
];

/// Counts payload bytes reaching `stage` (one of `ingest`, `sealed`, `sent`, `verified`,
/// `delivered`).
pub fn stage_bytes(stage: &'static str, bytes: u64) {
    metrics::counter!("baylink_stage_bytes_total", "stage" => stage).increment(bytes);
}

/// Counts a refusal recorded in the audit log under `rule`.
pub fn refusal(rule: &str) {
    metrics::counter!("baylink_refusals_total", "rule" => rule.to_owned()).increment(1);
}

/// How often the QUIC path of a connection is sampled.
const LINK_SAMPLE: Duration = Duration::from_secs(1);

/// One connection's path at its latest sample.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PathSample {
    /// Smoothed round-trip time, seconds.
    rtt: f64,
    /// Congestion window, bytes.
    cwnd: u64,
    /// UDP bits per second sent since the sample before.
    rate: f64,
}

/// The latest sample of every open connection, per peer (keyed by quinn's stable id). The
/// `baylink_link_*` gauges are figures over all of a peer's connections: an edge holds
/// several at once (`transport.max_transfers` sends, and the streams of hospital transfers
/// still arriving), and a gauge written by whichever connection sampled last would jump
/// between them, and drop to 0 when one of them closed while the others went on.
static LINKS: std::sync::LazyLock<
    std::sync::Mutex<
        std::collections::HashMap<String, std::collections::HashMap<usize, PathSample>>,
    >,
> = std::sync::LazyLock::new(Default::default);

/// What the gauges show for a peer's open connections: the largest smoothed RTT (what the
/// slowest of them sees), the sum of their congestion windows and of their send rates.
/// `None` when none is open.
fn over_connections<'a>(samples: impl IntoIterator<Item = &'a PathSample>) -> Option<PathSample> {
    samples.into_iter().fold(None, |acc, s| {
        Some(match acc {
            None => *s,
            Some(a) => PathSample {
                rtt: a.rtt.max(s.rtt),
                cwnd: a.cwnd.saturating_add(s.cwnd),
                rate: a.rate + s.rate,
            },
        })
    })
}

/// Records connection `id`'s latest sample (`None`: it closed) and sets `peer`'s gauges
/// from every open connection to it. With none open, the send rate and the window are 0 and
/// the RTT keeps its last figure.
fn publish_path(peer: &str, id: usize, sample: Option<PathSample>) {
    let mut links = LINKS.lock().expect("link samples lock poisoned");
    let live = links.entry(peer.to_owned()).or_default();
    match sample {
        Some(s) => {
            live.insert(id, s);
        }
        None => {
            live.remove(&id);
        }
    }
    let all = over_connections(live.values());
    if live.is_empty() {
        links.remove(peer);
    }
    // Set under the lock: two connections' publications cannot interleave.
    match all {
        Some(s) => {
            metrics::gauge!("baylink_link_rtt_seconds", "peer" => peer.to_owned()).set(s.rtt);
            metrics::gauge!("baylink_link_cwnd_bytes", "peer" => peer.to_owned())
                .set(s.cwnd as f64);
            metrics::gauge!("baylink_link_send_rate_bits_per_second", "peer" => peer.to_owned())
                .set(s.rate);
        }
        None => {
            metrics::gauge!("baylink_link_cwnd_bytes", "peer" => peer.to_owned()).set(0.0);
            metrics::gauge!("baylink_link_send_rate_bits_per_second", "peer" => peer.to_owned())
                .set(0.0);
        }
    }
}

/// Samples the QUIC path of `conn` (to `peer`, a certificate name) every second until the
/// connection closes: the `baylink_link_*` gauges over all of the peer's open connections,
/// and its losses and congestion events into the counters.
pub fn watch_connection(conn: quinn::Connection, peer: String) {
    tokio::spawn(async move {
        let id = conn.stable_id();
        let mut last = conn.stats();
        let mut tick = tokio::time::interval(LINK_SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = conn.closed() => break,
                _ = tick.tick() => {}
            }
            let now = conn.stats();
            let sent = now.udp_tx.bytes.saturating_sub(last.udp_tx.bytes);
            let sample = PathSample {
                rtt: now.path.rtt.as_secs_f64(),
                cwnd: now.path.cwnd,
                rate: sent as f64 * 8.0 / LINK_SAMPLE.as_secs_f64(),
            };
            publish_path(&peer, id, Some(sample));
            metrics::counter!("baylink_link_lost_packets_total", "peer" => peer.clone())
                .increment(now.path.lost_packets.saturating_sub(last.path.lost_packets));
            metrics::counter!("baylink_link_congestion_events_total", "peer" => peer.clone())
                .increment(
                    now.path
                        .congestion_events
                        .saturating_sub(last.path.congestion_events),
                );
            last = now;
        }
        publish_path(&peer, id, None);
    });
}

/// How often certificate expiry is refreshed.
const CERT_REFRESH: Duration = Duration::from_secs(60);

/// Keeps `baylink_certificate_expiry_seconds{key, subject}` current for each
/// `(config key, PEM file)`: seconds until notAfter, negative once past. Refreshed every
/// minute (a renewed file is picked up without a restart).
pub fn watch_certificates(files: Vec<(&'static str, PathBuf)>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CERT_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            refresh_certificates(&files);
        }
    });
}

/// Sets `baylink_certificate_expiry_seconds` for each `(config key, PEM file)` now (after a
/// SIGHUP reload, without waiting for the next minute).
pub fn refresh_certificates(files: &[(&'static str, PathBuf)]) {
    for (key, path) in files {
        certificate_expiry(key, path, SystemTime::now());
    }
}

fn certificate_expiry(key: &'static str, path: &Path, now: SystemTime) {
    match baylink_net::probe::certificate_file(path) {
        Ok(certs) => {
            let now = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            for c in certs {
                metrics::gauge!("baylink_certificate_expiry_seconds", "key" => key, "subject" => c.subject)
                    .set((c.not_after - now) as f64);
            }
        }
        Err(e) => {
            warn!(key, path = %path.display(), error = %e, "cannot read a certificate for its expiry")
        }
    }
}

/// What the retention loop publishes about a spool besides the counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolFigures {
    /// Bytes of every transfer directory.
    pub held_bytes: u64,
    /// Transfers not yet through (edge: sealed; gateway: committed).
    pub backlog: u64,
    /// Their bytes.
    pub backlog_bytes: u64,
    /// Age of the oldest of them.
    pub oldest: Duration,
}

/// Walks `spool_dir` for [`SpoolFigures`] at `now` (the age of a transfer is taken from its
/// UUIDv7 id: the time it was declared).
pub fn spool_figures(spool_dir: &Path, role: Role, now: SystemTime) -> SpoolFigures {
    let waiting = match role {
        Role::Edge => SpoolState::Sealed,
        Role::Gateway => SpoolState::Committed,
    };
    let mut f = SpoolFigures::default();
    for id in transfer_dir::list(spool_dir, |_| true) {
        let dir = TransferDir::new(spool_dir, &id);
        let bytes = crate::transfer_dir::tree_size(dir.root()).unwrap_or(0);
        f.held_bytes += bytes;
        if crate::spool_state::state_of(&dir, role) == waiting {
            f.backlog += 1;
            f.backlog_bytes += bytes;
            let age = now
                .duration_since(crate::spool_state::created(&id))
                .unwrap_or_default();
            f.oldest = f.oldest.max(age);
        }
    }
    f
}

/// Publishes [`SpoolFigures`].
pub fn spool_gauges(f: &SpoolFigures) {
    metrics::gauge!("baylink_spool_held_bytes").set(f.held_bytes as f64);
    metrics::gauge!("baylink_backlog_transfers").set(f.backlog as f64);
    metrics::gauge!("baylink_backlog_bytes").set(f.backlog_bytes as f64);
    metrics::gauge!("baylink_backlog_oldest_seconds").set(f.oldest.as_secs_f64());
}

#[cfg(test)]
mod tests;
