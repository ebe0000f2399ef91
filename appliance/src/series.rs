//! The series of every metric family, created zeroed at start for the appliance's role, so
//! that the first scrape shows them all (an alert on a series that does not exist yet never
//! fires). The label values come from the modules that own them (`policy::RULES`,
//! `gateway::link_rule`, `deliver::Cause::ALL`, `audit::Kind::ALL`, ...), which is why this
//! is not in [`crate::telemetry`]: those modules count through `telemetry`, and this module,
//! called once by `serve`, stands above them.

use baylink_net::proto::ErrorCode;

use crate::setting::Role;
use crate::spool_state::SpoolState;
use crate::telemetry::Kind::{Counter, Gauge, Histogram};
use crate::telemetry::{BYTE_STAGES, FAMILIES, TRANSFER_SERIES};

/// Describes every family and creates its series for a `role` appliance, zeroed, so that
/// the first scrape shows them all: the link's for each of `peers` (the gateway's name on
/// an edge, `peer.names` on a gateway). Certificate expiry is created by
/// [`crate::telemetry::watch_certificates`], whose first reading is immediate.
pub fn register(role: Role, reserve_bytes: u64, peers: &[String]) {
    for f in FAMILIES.iter().filter(|f| f.roles.has(role)) {
        match f.kind {
            Counter => metrics::describe_counter!(f.name, f.help),
            Gauge => metrics::describe_gauge!(f.name, f.help),
            Histogram => metrics::describe_histogram!(f.name, f.help),
        }
    }
    for (roles, stage, outcomes) in TRANSFER_SERIES {
        if roles.has(role) {
            for outcome in *outcomes {
                metrics::counter!("baylink_transfers_total", "stage" => *stage, "outcome" => *outcome)
                    .increment(0);
            }
        }
    }
    for direction in ["sent", "received"] {
        metrics::counter!("baylink_bytes_total", "direction" => direction).increment(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!("baylink_tls_reloads_total", "outcome" => outcome).increment(0);
    }
    if role == Role::Edge {
        metrics::counter!("baylink_bytes_total", "direction" => "ingested").increment(0);
    }
    for (roles, stage) in BYTE_STAGES {
        if roles.has(role) {
            metrics::counter!("baylink_stage_bytes_total", "stage" => *stage).increment(0);
        }
    }
    for rule in refusal_rules(role) {
        if role == Role::Edge {
            metrics::counter!("baylink_files_refused_total", "rule" => rule.clone()).increment(0);
        }
        metrics::counter!("baylink_refusals_total", "rule" => rule).increment(0);
    }
    if role == Role::Edge {
        for outcome in ["accepted", "refused"] {
            metrics::counter!("baylink_dicom_instances_total", "outcome" => outcome).increment(0);
        }
        metrics::gauge!("baylink_audit_witness_refused").set(0.0);
        for event in ["recorded", "refused"] {
            metrics::counter!("baylink_delivery_notices_total", "event" => event).increment(0);
        }
        use crate::ingest::store::AssociationEnd as End;
        for end in [
            End::Released,
            End::AbortedByPeer,
            End::IdleTimeout,
            End::ConnectionLost,
            End::AbortedByEdge,
            End::InterruptedByRestart,
            End::EdgeShutdown,
        ] {
            metrics::counter!("baylink_dicom_associations_total", "end" => end.as_str())
                .increment(0);
        }
        for outcome in ["ok", "failed"] {
            metrics::counter!("baylink_policy_reloads_total", "outcome" => outcome).increment(0);
        }
        for door in ["https", "dicom", "dicom-tls"] {
            for reason in ["unidentified-per-source", "handshake-timeout", "busy"] {
                metrics::counter!("baylink_ingest_connections_refused_total", "door" => door, "reason" => reason)
                    .increment(0);
            }
        }
        metrics::counter!("baylink_audit_witness_refusals_total").increment(0);
        for state in ["waiting", "running"] {
            metrics::gauge!("baylink_send_queue_transfers", "state" => state).set(0.0);
        }
        metrics::counter!("baylink_send_yields_total").increment(0);
    } else {
        for cause in crate::deliver::Cause::ALL {
            metrics::counter!("baylink_delivery_retries_total", "cause" => cause.label())
                .increment(0);
        }
        for reason in ["other_connection", "stalled"] {
            metrics::counter!("baylink_chunk_streams_refused_total", "reason" => reason)
                .increment(0);
        }
        metrics::counter!("baylink_spool_full_total").increment(0);
        for event in ["signed", "sent", "acknowledged"] {
            metrics::counter!("baylink_delivery_notices_total", "event" => event).increment(0);
        }
        metrics::counter!("baylink_chunk_retransmits_total").increment(0);
    }
    for kind in crate::audit::Kind::ALL {
        metrics::counter!("baylink_audit_records_total", "kind" => kind.to_string()).increment(0);
    }
    for c in [
        "baylink_audit_checkpoints_total",
        "baylink_audit_repairs_total",
        "baylink_chunks_corrupt_at_rest_total",
        "baylink_spool_pruned_total",
        "baylink_spool_pruned_bytes_total",
    ] {
        metrics::counter!(c).increment(0);
    }
    metrics::counter!("baylink_audit_checkpoint_failures_total").increment(0);
    for check in ["spool", "hsm"] {
        metrics::counter!("baylink_watchdog_check_failures_total", "check" => check).increment(0);
    }
    metrics::gauge!("baylink_watchdog_healthy").set(0.0);
    // Registered now, observed on the first signature.
    let _ = metrics::histogram!("baylink_hsm_sign_seconds");
    metrics::gauge!("baylink_spool_reserved_bytes").set(reserve_bytes as f64);
    for peer in peers {
        for g in [
            "baylink_link_rtt_seconds",
            "baylink_link_cwnd_bytes",
            "baylink_link_send_rate_bits_per_second",
        ] {
            metrics::gauge!(g, "peer" => peer.clone()).set(0.0);
        }
        for c in [
            "baylink_link_lost_packets_total",
            "baylink_link_congestion_events_total",
        ] {
            metrics::counter!(c, "peer" => peer.clone()).increment(0);
        }
    }
    for g in [
        "baylink_spool_capacity_bytes",
        "baylink_spool_available_bytes",
        "baylink_spool_held_bytes",
        "baylink_backlog_transfers",
        "baylink_backlog_bytes",
        "baylink_backlog_oldest_seconds",
    ] {
        metrics::gauge!(g).set(0.0);
    }
    for state in SpoolState::of_role(role) {
        metrics::gauge!("baylink_spool_transfers", "state" => state.name()).set(0.0);
    }
}

/// The rules a `role` appliance can refuse under: the policy's on the edge, the link's
/// error codes on the gateway.
pub(crate) fn refusal_rules(role: Role) -> Vec<String> {
    match role {
        Role::Edge => crate::policy::RULES
            .iter()
            .map(|r| (*r).to_owned())
            .collect(),
        Role::Gateway => (0..=u16::from(u8::MAX))
            .filter_map(ErrorCode::from_u16)
            .map(crate::gateway::link_rule)
            .collect(),
    }
}
