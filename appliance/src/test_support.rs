//! Fixtures of the orchestration's unit tests (the ingest store, the edge, the gateway): an
//! appliance in a temporary directory with software keys (`signing::testing`), an audit log
//! signed in software with its anchor in memory, and the spool served without io_uring
//! ([`Spool::start_blocking`]). No SoftHSM, no io_uring; the edge's QUIC endpoint is bound to
//! loopback but never used unless a test sends.
//!
//! The tests written on these fixtures run under plain `cargo test -p baylink --lib`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baylink_hsm::PublicKey;
use baylink_net::spool::{Spool, SpoolConfig};

use crate::audit::{self, Kind, Record};
use crate::config::Config;
use crate::edge::Edge;
use crate::pki::{Authority, LeafKind};
use crate::policy::Declaration;
use crate::signing::LogKey;
use crate::signing::testing::{SoftwareKeys, log_key, pair};

/// Chunk size of the fixtures' transfers: small, so a few KiB make several chunks.
pub(crate) const CHUNK: u32 = 4096;

/// The patient the fixture's consent registry allows (for `care`, to `hk-ehealth`).
pub(crate) const PATIENT: &str = "P-0001";

/// A spool without io_uring: small buffers, a multiple of the `O_DIRECT` alignment.
pub(crate) fn spool() -> Spool {
    Spool::start_blocking(SpoolConfig {
        buffers: 16,
        buffer_size: 16 * 1024,
        queue: 32,
    })
    .unwrap()
}

/// An audit log in `dir` signed by a software key; returns the log and the key that
/// verifies it.
pub(crate) fn audit_log(dir: &Path, id: &str) -> (audit::Log, PublicKey) {
    let key: LogKey = log_key();
    let public = key.public_key().clone();
    let settings = audit::LogSettings {
        dir: dir.join("audit"),
        appliance_id: id.to_owned(),
        checkpoint_every: 4,
        patient_key: dir.join("secrets/patient.key"),
    };
    (audit::Log::open(&settings, key).unwrap(), public)
}

/// The records of the log in `dir` (as [`audit_log`] made it), in order.
pub(crate) fn records(dir: &Path) -> Vec<Record> {
    std::fs::read_to_string(dir.join("audit").join(audit::RECORDS_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| audit::record::parse_line(l.as_bytes()).unwrap().0)
        .collect()
}

/// The kinds of the records of transfer `id`, in order.
pub(crate) fn kinds_of(dir: &Path, id: &str) -> Vec<Kind> {
    records(dir)
        .into_iter()
        .filter(|r| r.transfer.as_deref() == Some(id))
        .map(|r| r.kind)
        .collect()
}

/// A declaration the fixture's policy allows.
pub(crate) fn declaration() -> Declaration {
    Declaration {
        patient_id: PATIENT.into(),
        category: "diagnostic-image".into(),
        purpose: "care".into(),
        destination: "hk-ehealth".into(),
        consent_ref: None,
    }
}

/// An edge appliance in a temporary directory.
pub(crate) struct EdgeFixture {
    /// The appliance's directory (config, PKI, policy, spool, audit).
    pub(crate) dir: tempfile::TempDir,
    /// The edge, with software keys.
    pub(crate) edge: Edge,
    /// The gateway's keys (they pin the edge's key): to sign receipts and notices as the
    /// gateway would, and to verify the edge's manifests.
    pub(crate) gateway: SoftwareKeys,
    /// The key that verifies the edge's audit log.
    pub(crate) audit_key: PublicKey,
}

impl EdgeFixture {
    /// An edge whose config is the fixture's with `extra` TOML appended after its last
    /// section, `[policy]`: bare keys add to `[policy]`, and sections the base does not have
    /// (`[ingest]`, `[quota]`) may follow.
    pub(crate) async fn new(extra: &str) -> EdgeFixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_pki(root, "edge");
        write_consents(root);
        let text = format!(
            "role = \"edge\"\n\
             id = \"edge\"\n\
             [hsm]\n\
             module = \"/nonexistent/libsofthsm2.so\"\n\
             token_label = \"baylink-edge\"\n\
             key_label = \"baylink-signing\"\n\
             pin_file = \"secrets/edge.pin\"\n\
             [peer]\n\
             signing_key = \"keys/gateway.pub.pem\"\n\
             [tls]\n\
             ca = \"pki/ca.pem\"\n\
             cert = \"pki/edge.pem\"\n\
             key = \"pki/edge.key\"\n\
             [transport]\n\
             connect = \"127.0.0.1:9\"\n\
             server_name = \"localhost\"\n\
             retry_for = \"1s\"\n\
             chunk_size = {CHUNK}\n\
             [metrics]\n\
             listen = \"127.0.0.1:0\"\n\
             [spool]\n\
             dir = \"spool\"\n\
             reserve_bytes = 0\n\
             [audit]\n\
             dir = \"audit\"\n\
             patient_key = \"secrets/patient.key\"\n\
             [policy]\n\
             consents = \"policy/consents.toml\"\n\
             hospitals = [\"hospital-a\", \"hospital-b\"]\n\
             {extra}\n"
        );
        let cfg = Config::parse(&root.join("edge.toml"), &text).unwrap();
        let (keys, gateway) = pair();
        let (log, audit_key) = audit_log(root, "edge");
        let edge = Edge::for_tests(Arc::new(cfg), Arc::new(keys), log, spool()).unwrap();
        EdgeFixture {
            dir,
            edge,
            gateway,
            audit_key,
        }
    }

    /// The spool directory.
    pub(crate) fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Checks the edge's audit log end to end (records, checkpoints, anchor in memory).
    pub(crate) fn verify_audit(&self) {
        audit::verify(&self.dir.path().join("audit"), &self.audit_key).unwrap();
    }
}

/// A CA, and a certificate and key for `side` under `root/pki`.
pub(crate) fn write_pki(root: &Path, side: &str) {
    let ca = Authority::new("baylink test CA").unwrap();
    let leaf = ca.issue(side, LeafKind::Appliance).unwrap();
    let pki = root.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(pki.join(format!("{side}.pem")), leaf.cert_pem).unwrap();
    std::fs::write(pki.join(format!("{side}.key")), leaf.key_pem).unwrap();
}

/// A consent registry allowing [`PATIENT`] for `care` to `hk-ehealth`.
fn write_consents(root: &Path) {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let t = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let text = format!(
        "[[consent]]\n\
         patient_id = \"{PATIENT}\"\n\
         reference = \"CR-1\"\n\
         categories = [\"*\"]\n\
         purposes = [\"care\"]\n\
         destinations = [\"hk-ehealth\"]\n\
         valid_from = \"{}\"\n\
         valid_until = \"{}\"\n\
         evidence_sha256 = \"{}\"\n",
        t(now - day),
        t(now + 30 * day),
        "ab".repeat(32)
    );
    std::fs::create_dir_all(root.join("policy")).unwrap();
    std::fs::write(root.join("policy/consents.toml"), text).unwrap();
}
