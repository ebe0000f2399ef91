use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use baylink_net::proto::TransferId;

use super::*;
use crate::audit::Kind as AuditKind;
use crate::deliver::Cause;

/// The `baylink_*` metric names a text mentions, histogram suffixes folded into the family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("baylink_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(family.to_owned());
        i = end;
    }
    names
}

fn shipped(file: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_alert_rules_and_the_dashboard_query_only_families_that_exist() {
    let known: BTreeSet<&str> = FAMILIES.iter().map(|f| f.name).collect();
    for file in ["prometheus-rules.yml", "grafana-dashboard.json"] {
        let names = metric_names(&shipped(file));
        assert!(names.len() >= 8, "{file} names only {names:?}");
        for name in names {
            assert!(
                known.contains(name.as_str()),
                "{file} queries {name}, which telemetry::FAMILIES does not list"
            );
        }
    }
}

#[test]
fn family_names_are_unique_and_follow_the_naming_rules() {
    let mut seen = BTreeSet::new();
    for f in FAMILIES {
        assert!(seen.insert(f.name), "{} listed twice", f.name);
        assert!(f.name.starts_with("baylink_"), "{}", f.name);
        assert_eq!(
            f.kind == Kind::Counter,
            f.name.ends_with("_total"),
            "{}: counters and only counters end in _total",
            f.name
        );
        assert!(f.help.ends_with('.'), "{}: help is a sentence", f.name);
    }
}

#[test]
fn every_audit_kind_and_retry_cause_is_created_at_start() {
    // Adding a variant breaks this match: add it to the ALL list beside it too.
    for kind in [AuditKind::Declared] {
        match kind {
            AuditKind::Declared
            | AuditKind::Refused
            | AuditKind::Sealed
            | AuditKind::Sent
            | AuditKind::Committed
            | AuditKind::Receipted
            | AuditKind::Delivered
            | AuditKind::Notified
            | AuditKind::Expired
            | AuditKind::Failed => {}
        }
    }
    assert_eq!(AuditKind::ALL.len(), 10);
    let labels: BTreeSet<_> = Cause::ALL.iter().map(|c| c.label()).collect();
    assert_eq!(labels.len(), Cause::ALL.len());
    match Cause::Other {
        Cause::Connection
        | Cause::Timeout
        | Cause::ServerError
        | Cause::Throttled
        | Cause::Incomplete
        | Cause::Other => {}
    }
    assert_eq!(Cause::ALL.len(), 6);
}

#[test]
fn gateway_refusal_rules_are_the_link_error_codes() {
    let rules = crate::series::refusal_rules(Role::Gateway);
    assert!(rules.iter().any(|r| r == "bad-signature"), "{rules:?}");
    assert!(rules.iter().any(|r| r == "refused"), "{rules:?}");
    let edge = crate::series::refusal_rules(Role::Edge);
    assert!(edge.iter().any(|r| r == "consent-missing"), "{edge:?}");
}

#[test]
fn the_backlog_is_the_sealed_transfers_on_an_edge_and_its_age_the_oldest() {
    let spool = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let make = |files: &[(&str, usize)]| {
        let id = TransferId::new_v7();
        let dir = TransferDir::new(spool.path(), &id);
        std::fs::create_dir_all(dir.root()).unwrap();
        for (name, len) in files {
            std::fs::write(dir.root().join(name), vec![0u8; *len]).unwrap();
        }
        id
    };
    // Sealed: manifest.bin and no receipt.
    make(&[("manifest.bin", 100), ("declaration.json", 20)]);
    make(&[("manifest.bin", 300)]);
    // Receipted: not in the backlog.
    make(&[
        ("manifest.bin", 50),
        ("receipt.bin", 10),
        ("receipt.sig", 64),
    ]);
    let f = spool_figures(spool.path(), Role::Edge, now + Duration::from_secs(90));
    assert_eq!(f.backlog, 2);
    assert_eq!(f.backlog_bytes, 420);
    assert_eq!(f.held_bytes, 420 + 124);
    assert!(
        f.oldest >= Duration::from_secs(89) && f.oldest <= Duration::from_secs(120),
        "{:?}",
        f.oldest
    );
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        spool_figures(empty.path(), Role::Gateway, now),
        SpoolFigures::default()
    );
}

/// The value of `name{peer="<peer>"}` in a Prometheus text rendering.
fn peer_gauge(text: &str, name: &str, peer: &str) -> Option<f64> {
    let key = format!("{name}{{peer=\"{peer}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().expect("a number"))
}

#[test]
fn link_gauges_cover_every_open_connection_to_the_peer() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // A peer name no other test publishes under: the samples are process-wide.
    let peer = "gauges-over-connections";
    let sample = |rtt, cwnd, rate| Some(PathSample { rtt, cwnd, rate });
    let read = |what| peer_gauge(&handle.render(), what, peer);
    metrics::with_local_recorder(&recorder, || {
        publish_path(peer, 1, sample(0.050, 1_000_000, 300e6));
        publish_path(peer, 2, sample(0.070, 500_000, 100e6));
        // A later sample of a connection replaces its earlier one.
        publish_path(peer, 1, sample(0.040, 2_000_000, 200e6));
    });
    assert_eq!(read("baylink_link_send_rate_bits_per_second"), Some(300e6));
    assert_eq!(read("baylink_link_cwnd_bytes"), Some(2_500_000.0));
    assert_eq!(read("baylink_link_rtt_seconds"), Some(0.070));

    // One connection closing leaves the other's figures, not 0.
    metrics::with_local_recorder(&recorder, || publish_path(peer, 2, None));
    assert_eq!(read("baylink_link_send_rate_bits_per_second"), Some(200e6));
    assert_eq!(read("baylink_link_cwnd_bytes"), Some(2_000_000.0));
    assert_eq!(read("baylink_link_rtt_seconds"), Some(0.040));

    // The last one closing: nothing is sent, no window is open, the RTT stays as last seen.
    metrics::with_local_recorder(&recorder, || publish_path(peer, 1, None));
    assert_eq!(read("baylink_link_send_rate_bits_per_second"), Some(0.0));
    assert_eq!(read("baylink_link_cwnd_bytes"), Some(0.0));
    assert_eq!(read("baylink_link_rtt_seconds"), Some(0.040));
    assert!(
        !LINKS.lock().unwrap().contains_key(peer),
        "a peer without connections is forgotten"
    );
}
