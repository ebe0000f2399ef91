//! How to open an audit log: the `[audit]` settings and the appliance id. A leaf, so that
//! `config`, which builds them (`Config::audit_log_settings`), does not import the log.

use std::path::PathBuf;

/// How to open a log (the `[audit]` section plus the appliance id); a config gives them with
/// `Config::audit_log_settings`.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `audit.dir`.
    pub dir: PathBuf,
    /// The appliance id (names the log's origin).
    pub appliance_id: String,
    /// Sign a checkpoint every this many records.
    pub checkpoint_every: u64,
    /// Patient-hash key file (`audit.patient_key`); outside `dir`.
    pub patient_key: PathBuf,
}
