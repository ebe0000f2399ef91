//! The appliance configuration: one TOML file, parsed once into types.
//!
//! Relative paths are resolved against the directory of the config file. Durations are
//! humantime strings (`"10m"`, `"30s"`), sizes are integers in bytes. Keys named in
//! `docs/interface.md` keep their names and meaning; every key is documented in
//! `docs/configuration.md` and `systemd/baylink.example.toml`.
//!
//! Each section has its own serde shape (`Raw*`, unknown keys refused) and its own check,
//! which fills in the section's defaults and names the key it refuses; [`Config::parse`] only
//! composes them. Settings a module owns are checked by that module and composed here:
//! [`crate::deliver`], [`crate::dicom::settings`], [`crate::ingest::stow_limits`] (ARCHITECTURE.md,
//! "Module dependencies").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baylink_net::transport::{Congestion, LinkTuning, MAX_RECEIVE_HOLD_MS, MIN_MTU};
use serde::Deserialize;

use crate::deliver::dicomweb::StowSettings;
use crate::deliver::retry::Backoff;
pub use crate::dicom::settings::{CommitmentRoute, DicomPeer, DicomSection};
use crate::dicom::settings::{DEFAULT_DICOM_IDLE_TIMEOUT, DicomKeys, DicomPeerEntry};
use crate::ingest::stow_limits as stow;
use crate::setting::SettingError;

pub use crate::key_source::{PKCS11_URI_SCHEME, TlsKeySource, parse_pkcs11_uri};
pub use crate::setting::Role;

/// A configuration that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse or a key has the wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What the TOML parser said (names the key and the line).
        message: String,
    },
    /// A key is present but its value is not acceptable.
    #[error("config {path}: {key}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The dotted key.
        key: &'static str,
        /// Why it was refused.
        message: String,
    },
    /// A key this role needs is missing.
    #[error("config {path}: missing `{key}` (required for role {role})")]
    Missing {
        /// The config file.
        path: PathBuf,
        /// The dotted key.
        key: &'static str,
        /// The role that needs it.
        role: Role,
    },
}

/// The whole configuration, typed.
#[derive(Debug, Clone)]
pub struct Config {
    /// Path of the file this was loaded from.
    pub path: PathBuf,
    /// Edge or gateway.
    pub role: Role,
    /// Name of this appliance (used in manifests, receipts and logs).
    pub id: String,
    /// HSM access.
    pub hsm: HsmSection,
    /// The other appliance's pinned signing key (PEM file).
    pub peer_signing_key: PathBuf,
    /// Gateway: the certificate subject common names of the edges allowed to connect
    /// (`peer.names`); any other client certificate is refused in the TLS handshake. Empty on
    /// an edge.
    pub peer_names: Vec<String>,
    /// TLS identity and trust.
    pub tls: TlsSection,
    /// QUIC transport.
    pub transport: TransportSection,
    /// Link tuning (window sizes, congestion control, socket buffers).
    pub link: LinkTuning,
    /// Hospital-facing listeners (edge).
    pub ingest: IngestSection,
    /// Health and Prometheus endpoint.
    pub metrics_listen: SocketAddr,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// How long a finished transfer's payload stays in the spool (`spool.retain`): after
    /// its receipt on the edge, after its delivery on the gateway. `None` keeps it forever.
    pub spool_retain: Option<Duration>,
    /// Audit log directory.
    pub audit_dir: PathBuf,
    /// Audit log settings other than the directory (`[audit]`).
    pub audit: AuditSection,
    /// Compliance policy.
    pub policy: PolicySection,
    /// Downstream delivery (gateway).
    pub delivery: Option<DeliverySection>,
    /// Waits between delivery attempts (`delivery.retry_base`, `delivery.retry_max`).
    pub delivery_retry: Backoff,
    /// How long a graceful shutdown waits for in-flight transfers.
    pub drain_timeout: Duration,
    /// Limits on what a peer may offer (`[limits]`).
    pub limits: baylink_net::proto::Limits,
    /// What one hospital may hold at the edge (`[quota]`).
    pub quota: QuotaSection,
    /// Free spool bytes uploads may never use, kept for audit appends and the sealing of
    /// accepted data (`spool.reserve_bytes`).
    pub spool_reserve_bytes: u64,
}

/// `[quota]`: what one hospital may hold at the edge, on every door (HTTPS PUT, STOW-RS,
/// C-STORE). Each hospital has its own allowance of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSection {
    /// Declared, uncommitted transfers (`quota.max_open_transfers`).
    pub max_open_transfers: usize,
    /// Bytes held in the spool by its uncommitted transfers (`quota.max_spool_bytes`).
    pub max_spool_bytes: u64,
    /// Files in one transfer (`quota.max_files`).
    pub max_files: u64,
}

/// Default `quota.max_open_transfers`.
pub const DEFAULT_QUOTA_MAX_OPEN_TRANSFERS: usize = 100;
/// Default `quota.max_spool_bytes`: 256 GiB.
pub const DEFAULT_QUOTA_MAX_SPOOL_BYTES: u64 = 256 * 1024 * 1024 * 1024;
/// Default `quota.max_files`.
pub const DEFAULT_QUOTA_MAX_FILES: u64 = 100_000;
/// Default `spool.reserve_bytes`: 64 MiB.
pub const DEFAULT_SPOOL_RESERVE_BYTES: u64 = 64 * 1024 * 1024;

/// `[hsm]`
#[derive(Debug, Clone)]
pub struct HsmSection {
    /// PKCS#11 module (shared library).
    pub module: PathBuf,
    /// SoftHSM 2 config to export as `SOFTHSM2_CONF`, if any.
    pub softhsm_conf: Option<PathBuf>,
    /// Token label.
    pub token_label: String,
    /// Key label of the signing key pair.
    pub key_label: String,
    /// File (or systemd credential) holding the user PIN.
    pub pin_file: PathBuf,
    /// Number of PKCS#11 sessions in the signing pool.
    pub sessions: usize,
    /// Accept a signing key the token marks extractable or not sensitive
    /// (`hsm.allow_extractable`, default false: such a key is refused at start).
    pub allow_extractable: bool,
}

/// `[audit]` settings besides `audit.dir` (audit log).
#[derive(Debug, Clone)]
pub struct AuditSection {
    /// Sign a checkpoint every this many records (`audit.checkpoint_every`, default 64).
    pub checkpoint_every: u64,
    /// `serve` signs a checkpoint this often when the log grew (`audit.checkpoint_interval`,
    /// default 5 minutes).
    pub checkpoint_interval: Duration,
    /// Secret key behind the keyed patient hash and research de-identification
    /// (`audit.patient_key`, default [`default_patient_key`]; created with 32 random bytes,
    /// mode 0600, on first use). Never inside `audit.dir`.
    pub patient_key: PathBuf,
}

/// Default `audit.patient_key`: `secrets/patient.key` beside `audit.dir` (for
/// `/var/lib/baylink/audit`, `/var/lib/baylink/secrets/patient.key`), outside the directory an
/// auditor is given a copy of. `None` when `audit.dir` has no parent.
pub fn default_patient_key(audit_dir: &Path) -> Option<PathBuf> {
    let dir = lexically_normal(audit_dir);
    dir.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.join("secrets").join("patient.key"))
}

/// `path` with `.` dropped and `..` applied to the components before it, without touching
/// the file system (which may not hold the path yet).
pub fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `[tls]`
#[derive(Debug, Clone)]
pub struct TlsSection {
    /// The deployment CA, trusted for peers and hospital clients.
    pub ca: PathBuf,
    /// This appliance's certificate chain.
    pub cert: PathBuf,
    /// This appliance's private key: a PEM file, or a key pair on the `[hsm]` token.
    pub key: TlsKeySource,
    /// A certificate expiring within this is reported as a warning by `check-config` and at
    /// `serve` start-up (`tls.warn_expiry`, default 30 days); an expired one is an error.
    pub warn_expiry: Duration,
}

/// `[transport]`
#[derive(Debug, Clone)]
pub struct TransportSection {
    /// Gateway: UDP address to listen on.
    pub listen: Option<SocketAddr>,
    /// Edge: the gateway's UDP address.
    pub connect: Option<SocketAddr>,
    /// Edge: TLS server name of the gateway.
    pub server_name: String,
    /// How long a lost link is retried before `send` gives up.
    pub retry_for: Duration,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks in flight per transfer.
    pub max_in_flight: usize,
    /// Edge: hospital uploads sent at once, each on its own connection
    /// (`transport.max_transfers`, default 4).
    pub max_transfers: usize,
    /// Gateway: a chunk stream that brings no bytes for this long is reset
    /// (`transport.chunk_stall_timeout`, default 30 s); the edge sends the chunk again.
    pub chunk_stall_timeout: Duration,
    /// Edge: `send` announces a new transfer and streams its chunks to the gateway while it
    /// seals them (`transport.stream_while_sealing`, default true); false sends them only
    /// once the manifest is signed.
    pub stream_while_sealing: bool,
}

/// `[ingest]`
#[derive(Debug, Clone)]
pub struct IngestSection {
    /// HTTPS hospital API.
    pub listen: Option<SocketAddr>,
    /// DICOM C-STORE SCP, plain TCP: peers identified by calling AE title and source address.
    pub dicom_listen: Option<SocketAddr>,
    /// DICOM C-STORE SCP over TLS (`ingest.dicom_tls_listen`): a client certificate from
    /// `tls.ca` is required; its subject CN is the hospital, and the calling AE title must be a
    /// `dicom_peers` entry of that hospital (the entry's address is not checked there).
    pub dicom_tls_listen: Option<SocketAddr>,
    /// Upper bound on one transfer's payload.
    pub max_upload_bytes: u64,
    /// DICOM C-STORE SCP settings (`ingest.dicom_*`).
    pub dicom: DicomSection,
    /// HTTPS: time allowed for the TLS handshake and for each request's header.
    pub header_timeout: Duration,
    /// HTTPS: longest wait for the next bytes of a request body.
    pub idle_timeout: Duration,
    /// HTTPS: connections of identified hospitals served at once; a hospital's connection
    /// takes its slot once its TLS handshake is done (a full house is answered 503).
    pub max_connections: usize,
    /// Both doors: time allowed for the TLS handshake (HTTPS) and for the A-ASSOCIATE
    /// negotiation (C-STORE), before the client is identified (`ingest.handshake_timeout`).
    pub handshake_timeout: Duration,
    /// Both doors, each on its own: most connections from one source address that are not
    /// yet identified (`ingest.max_unidentified_per_source`); more are closed at once.
    pub max_unidentified_per_source: usize,
    /// An open (declared, uncommitted) transfer with no upload in progress for this long is
    /// closed as failed and its files removed (`ingest.open_timeout`); `None`: never.
    pub open_timeout: Option<Duration>,
    /// STOW-RS: most parts in one request (`ingest.stow_max_parts`); more answer 413.
    pub stow_max_parts: usize,
    /// STOW-RS: most failed parts listed one by one in an answer
    /// (`ingest.stow_max_failed_listed`); the others are only counted.
    pub stow_max_failed_listed: usize,
}

/// Default `ingest.handshake_timeout`: TLS handshake (HTTPS) or A-ASSOCIATE negotiation
/// (C-STORE) before the client is identified.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `ingest.max_unidentified_per_source`, per door.
pub const DEFAULT_MAX_UNIDENTIFIED_PER_SOURCE: usize = 32;

pub use crate::policy::PolicySection;

/// `[delivery]`
#[derive(Debug, Clone)]
pub enum DeliverySection {
    /// Files under `path/<transfer_id>/`.
    Dir {
        /// Root of the delivered tree.
        path: PathBuf,
    },
    /// STOW-RS to a DICOMweb base URL.
    DicomWeb(StowSettings),
}

// ---- reading the file -----------------------------------------------------------------------
//
// Each section is read in two steps. Serde reads the TOML into the section's `Raw*` shape
// (`deny_unknown_fields`: an unknown key is refused by name; an absent optional section is
// its `Default`, every key unset). Then the section's check turns the raw shape into the
// typed section: it fills in the defaults (the `DEFAULT_*` constants), resolves relative paths
// and refuses a bad value with a [`ConfigError`] naming the dotted key. [`Config::parse`] only
// composes the sections. Where a module owns a setting, its check lives there and answers with
// a [`SettingError`] ([`Backoff::from_settings`], [`StowSettings::from_section`],
// [`DicomSection::from_settings`], [`stow::max_parts_setting`]).
//
// `check::SCHEMA` lists the same keys with their TOML types (so `check-config` can report
// every unknown key and wrong type at once): a key added here is added there too.

/// The whole file, as serde reads it: one field per section.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    role: Role,
    id: Option<String>,
    hsm: RawHsm,
    peer: RawPeer,
    tls: RawTls,
    #[serde(default)]
    transport: RawTransport,
    #[serde(default)]
    link: RawLink,
    #[serde(default)]
    ingest: RawIngest,
    metrics: RawMetrics,
    spool: RawSpool,
    audit: RawAudit,
    #[serde(default)]
    policy: RawPolicy,
    delivery: Option<RawDelivery>,
    #[serde(default)]
    drain: RawDrain,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    quota: RawQuota,
}

/// What every section's check needs: the file (named in errors), its directory (relative
/// paths are resolved against it) and the role (named when a key it needs is missing).
struct Context<'a> {
    path: &'a Path,
    base: PathBuf,
    role: Role,
}

impl Context<'_> {
    /// `p` resolved against the config file's directory, unless absolute.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    /// `key` is present but refused.
    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key,
            message: message.into(),
        }
    }

    /// `key` is needed by this role but absent.
    fn missing(&self, key: &'static str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.to_owned(),
            key,
            role: self.role,
        }
    }

    /// A setting refused by the module that owns it.
    fn setting(&self, e: SettingError) -> ConfigError {
        match e {
            SettingError::Missing(key) => self.missing(key),
            SettingError::Invalid { key, message } => self.invalid(key, message),
        }
    }

    /// An optional `address:port`.
    fn address(
        &self,
        key: &'static str,
        s: Option<&str>,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        s.map(|s| {
            s.parse::<SocketAddr>()
                .map_err(|e| self.invalid(key, format!("`{s}` is not an address:port ({e})")))
        })
        .transpose()
    }

    /// An optional humantime duration.
    fn optional_duration(
        &self,
        key: &'static str,
        s: Option<&str>,
    ) -> Result<Option<Duration>, ConfigError> {
        s.map(|s| {
            humantime::parse_duration(s)
                .map_err(|e| self.invalid(key, format!("`{s}` is not a duration ({e})")))
        })
        .transpose()
    }

    /// A humantime duration, `default` when absent.
    fn duration(
        &self,
        key: &'static str,
        s: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.optional_duration(key, s).map(|d| d.unwrap_or(default))
    }

    /// A humantime duration or `"never"` (`None`), `default` when absent.
    fn duration_or_never(
        &self,
        key: &'static str,
        s: Option<&str>,
        default: Duration,
    ) -> Result<Option<Duration>, ConfigError> {
        match s {
            Some("never") => Ok(None),
            _ => self.duration(key, s, default).map(Some),
        }
    }
}

/// 1..=64 characters, none of them a control character (names of appliances, hospitals,
/// purposes and edges).
fn printable_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && !s.chars().any(char::is_control)
}

// ---- top level: role, id --------------------------------------------------------------------

/// `id`, default the role's name.
fn check_id(id: Option<String>, cx: &Context<'_>) -> Result<String, ConfigError> {
    let id = id.unwrap_or_else(|| cx.role.to_string());
    if !printable_name(&id) {
        return Err(cx.invalid("id", "must be 1..=64 printable characters"));
    }
    Ok(id)
}

// ---- [hsm] ----------------------------------------------------------------------------------

/// Default `hsm.sessions`.
pub const DEFAULT_HSM_SESSIONS: usize = 4;
/// Upper bound of `hsm.sessions`.
pub const MAX_HSM_SESSIONS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: PathBuf,
    softhsm_conf: Option<PathBuf>,
    token_label: String,
    key_label: String,
    pin_file: PathBuf,
    sessions: Option<usize>,
    allow_extractable: Option<bool>,
}

impl RawHsm {
    fn check(self, cx: &Context<'_>) -> Result<HsmSection, ConfigError> {
        let sessions = self.sessions.unwrap_or(DEFAULT_HSM_SESSIONS);
        if sessions == 0 || sessions > MAX_HSM_SESSIONS {
            return Err(cx.invalid(
                "hsm.sessions",
                format!("{sessions} is not in 1..={MAX_HSM_SESSIONS}"),
            ));
        }
        if self.token_label.is_empty() {
            return Err(cx.invalid("hsm.token_label", "must not be empty"));
        }
        if self.key_label.is_empty() {
            return Err(cx.invalid("hsm.key_label", "must not be empty"));
        }
        Ok(HsmSection {
            // A library name is looked for by the loader, not beside the config.
            module: self.module,
            softhsm_conf: self.softhsm_conf.as_deref().map(|p| cx.resolve(p)),
            token_label: self.token_label,
            key_label: self.key_label,
            pin_file: cx.resolve(&self.pin_file),
            sessions,
            allow_extractable: self.allow_extractable.unwrap_or(false),
        })
    }
}

// ---- [peer] ---------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    signing_key: PathBuf,
    names: Option<Vec<String>>,
}

impl RawPeer {
    /// The peer's signing key file and, on a gateway, the edges it accepts.
    fn check(self, cx: &Context<'_>) -> Result<(PathBuf, Vec<String>), ConfigError> {
        let names = match (cx.role, self.names) {
            (Role::Gateway, None) => return Err(cx.missing("peer.names")),
            (Role::Gateway, Some(names)) => {
                if names.is_empty() {
                    return Err(cx.invalid(
                        "peer.names",
                        "must name at least one edge (its certificate's subject CN)",
                    ));
                }
                if let Some(bad) = names.iter().find(|n| !printable_name(n)) {
                    return Err(cx.invalid(
                        "peer.names",
                        format!("{bad:?} is not 1..=64 printable characters"),
                    ));
                }
                names
            }
            (Role::Edge, None) => Vec::new(),
            (Role::Edge, Some(_)) => {
                return Err(cx.invalid(
                    "peer.names",
                    "applies only to role gateway (the edges it accepts)",
                ));
            }
        };
        Ok((cx.resolve(&self.signing_key), names))
    }
}

// ---- [tls] ----------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: String,
    warn_expiry: Option<String>,
}

impl RawTls {
    /// `hsm`: the token a `pkcs11:` key must be on, and the signing key it must not be.
    fn check(self, cx: &Context<'_>, hsm: &HsmSection) -> Result<TlsSection, ConfigError> {
        let key = TlsKeySource::parse(&self.key, &hsm.token_label, &hsm.key_label, |p| {
            cx.resolve(p)
        })
        .map_err(|m| cx.invalid("tls.key", m))?;
        Ok(TlsSection {
            ca: cx.resolve(&self.ca),
            cert: cx.resolve(&self.cert),
            key,
            warn_expiry: cx.duration(
                "tls.warn_expiry",
                self.warn_expiry.as_deref(),
                DEFAULT_WARN_EXPIRY,
            )?,
        })
    }
}

// ---- [limits] -------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_files: Option<u32>,
    max_chunks: Option<u32>,
}

impl RawLimits {
    /// The protocol's limits, lowered (never raised) where the config says so.
    fn check(self, cx: &Context<'_>) -> Result<baylink_net::proto::Limits, ConfigError> {
        let mut limits = baylink_net::proto::Limits::default();
        for (key, value, bound) in [
            ("limits.max_files", self.max_files, &mut limits.max_files),
            ("limits.max_chunks", self.max_chunks, &mut limits.max_chunks),
        ] {
            if let Some(n) = value {
                if n == 0 || n > *bound {
                    return Err(cx.invalid(key, format!("{n} is not in 1..={bound}")));
                }
                *bound = n;
            }
        }
        Ok(limits)
    }
}

// ---- [transport] ----------------------------------------------------------------------------

/// Default `transport.server_name`.
pub const DEFAULT_SERVER_NAME: &str = "localhost";
/// Default `transport.retry_for`: ten minutes.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(600);
/// Default `transport.max_in_flight`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// Upper bound of `transport.max_in_flight`.
pub const MAX_IN_FLIGHT: usize = 256;
/// Default `transport.max_transfers`: hospital uploads sent at once.
pub const DEFAULT_MAX_TRANSFERS: usize = 4;
/// Upper bound of `transport.max_transfers`.
pub const MAX_TRANSFERS: usize = 64;
/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Default `transport.chunk_stall_timeout`: as long as the QUIC idle timeout.
pub const DEFAULT_CHUNK_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest chunk size accepted in a config (the protocol allows smaller, for tests).
pub const MIN_CHUNK_SIZE: u32 = 4096;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    listen: Option<String>,
    connect: Option<String>,
    server_name: Option<String>,
    retry_for: Option<String>,
    chunk_size: Option<u32>,
    max_in_flight: Option<usize>,
    max_transfers: Option<usize>,
    chunk_stall_timeout: Option<String>,
    stream_while_sealing: Option<bool>,
}

impl RawTransport {
    /// `limits`: the chunk size must fit the protocol's largest chunk.
    fn check(
        self,
        cx: &Context<'_>,
        limits: &baylink_net::proto::Limits,
    ) -> Result<TransportSection, ConfigError> {
        let transport = TransportSection {
            listen: cx.address("transport.listen", self.listen.as_deref())?,
            connect: cx.address("transport.connect", self.connect.as_deref())?,
            server_name: self
                .server_name
                .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_owned()),
            retry_for: cx.duration(
                "transport.retry_for",
                self.retry_for.as_deref(),
                DEFAULT_RETRY_FOR,
            )?,
            chunk_size: self.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
            max_in_flight: self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            max_transfers: self.max_transfers.unwrap_or(DEFAULT_MAX_TRANSFERS),
            chunk_stall_timeout: cx.duration(
                "transport.chunk_stall_timeout",
                self.chunk_stall_timeout.as_deref(),
                DEFAULT_CHUNK_STALL_TIMEOUT,
            )?,
            stream_while_sealing: self.stream_while_sealing.unwrap_or(true),
        };
        if transport.chunk_stall_timeout.is_zero() {
            return Err(cx.invalid("transport.chunk_stall_timeout", "must be longer than zero"));
        }
        if transport.chunk_size < MIN_CHUNK_SIZE || transport.chunk_size > limits.max_chunk_size {
            return Err(cx.invalid(
                "transport.chunk_size",
                format!(
                    "{} is not in {MIN_CHUNK_SIZE}..={}",
                    transport.chunk_size, limits.max_chunk_size
                ),
            ));
        }
        if transport.max_in_flight == 0 || transport.max_in_flight > MAX_IN_FLIGHT {
            return Err(cx.invalid(
                "transport.max_in_flight",
                format!("{} is not in 1..={MAX_IN_FLIGHT}", transport.max_in_flight),
            ));
        }
        if !(1..=MAX_TRANSFERS).contains(&transport.max_transfers) {
            return Err(cx.invalid(
                "transport.max_transfers",
                format!("{} is not in 1..={MAX_TRANSFERS}", transport.max_transfers),
            ));
        }
        match cx.role {
            Role::Edge if transport.connect.is_none() => Err(cx.missing("transport.connect")),
            Role::Gateway if transport.listen.is_none() => Err(cx.missing("transport.listen")),
            _ => Ok(transport),
        }
    }
}

// ---- [link] ---------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLink {
    rate_mbit: Option<u64>,
    rtt_ms: Option<u64>,
    congestion: Option<String>,
    socket_buffer_bytes: Option<usize>,
    mtu: Option<u16>,
    max_mtu: Option<u16>,
    receive_hold_ms: Option<u64>,
}

impl RawLink {
    /// Defaults are [`LinkTuning::default`]'s, but for `congestion` (cubic), `max_mtu` (at
    /// least `mtu`) and `receive_hold_ms` (from `rtt_ms`).
    fn check(self, cx: &Context<'_>) -> Result<LinkTuning, ConfigError> {
        let defaults = LinkTuning::default();
        // Without the key: cubic, which needs no correct `rate_mbit` (dev-env and the example
        // config write "link").
        let congestion = match self.congestion.as_deref() {
            None => Congestion::Cubic,
            Some(name) => Congestion::from_name(name).ok_or_else(|| {
                cx.invalid(
                    "link.congestion",
                    format!("`{name}` is not one of cubic, bbr, link"),
                )
            })?,
        };
        let rtt_ms = self.rtt_ms.unwrap_or(defaults.rtt_ms);
        if let Some(ms) = self.receive_hold_ms
            && ms > MAX_RECEIVE_HOLD_MS
        {
            return Err(cx.invalid(
                "link.receive_hold_ms",
                format!("{ms} is not in 0..={MAX_RECEIVE_HOLD_MS}"),
            ));
        }
        let link = LinkTuning {
            rate_mbit: self.rate_mbit.unwrap_or(defaults.rate_mbit),
            rtt_ms,
            congestion,
            socket_buffer_bytes: self
                .socket_buffer_bytes
                .unwrap_or(defaults.socket_buffer_bytes),
            mtu: self.mtu,
            max_mtu: self
                .max_mtu
                .unwrap_or(defaults.max_mtu.max(self.mtu.unwrap_or(0))),
            receive_hold: LinkTuning::receive_hold_for(self.receive_hold_ms, rtt_ms),
        };
        if link.rate_mbit == 0 {
            return Err(cx.invalid("link.rate_mbit", "must be > 0"));
        }
        for (key, value) in [("link.mtu", link.mtu), ("link.max_mtu", Some(link.max_mtu))] {
            if let Some(v) = value
                && v < MIN_MTU
            {
                return Err(cx.invalid(
                    key,
                    format!("{v} is below {MIN_MTU} (QUIC's 1200-byte packets and headers)"),
                ));
            }
        }
        if let Some(mtu) = link.mtu
            && mtu > link.max_mtu
        {
            return Err(cx.invalid(
                "link.mtu",
                format!("{mtu} is above link.max_mtu {}", link.max_mtu),
            ));
        }
        Ok(link)
    }
}

// ---- [ingest] -------------------------------------------------------------------------------

/// Default `ingest.header_timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `ingest.idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `ingest.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Upper bound of `ingest.max_connections`.
pub const MAX_CONNECTIONS: usize = 4096;
/// Upper bound of `ingest.handshake_timeout`.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of `ingest.max_unidentified_per_source`.
pub const MAX_UNIDENTIFIED_PER_SOURCE: usize = 1024;
/// Default `ingest.open_timeout`: a day.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Default upper bound on one upload: 64 GiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 64 * 1024 * 1024 * 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    listen: Option<String>,
    dicom_listen: Option<String>,
    dicom_tls_listen: Option<String>,
    max_upload_bytes: Option<u64>,
    dicom_ae_title: Option<String>,
    #[serde(default)]
    dicom_peers: Vec<DicomPeerEntry>,
    dicom_max_pdu_bytes: Option<u32>,
    dicom_max_associations: Option<usize>,
    dicom_commitment_max_pending: Option<usize>,
    dicom_idle_timeout: Option<String>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    handshake_timeout: Option<String>,
    max_unidentified_per_source: Option<usize>,
    open_timeout: Option<String>,
    stow_max_parts: Option<usize>,
    stow_max_failed_listed: Option<usize>,
}

impl RawIngest {
    fn check(self, cx: &Context<'_>) -> Result<IngestSection, ConfigError> {
        let listen = cx.address("ingest.listen", self.listen.as_deref())?;
        let dicom_listen = cx.address("ingest.dicom_listen", self.dicom_listen.as_deref())?;
        let dicom_tls_listen =
            cx.address("ingest.dicom_tls_listen", self.dicom_tls_listen.as_deref())?;
        let header_timeout = cx.duration(
            "ingest.header_timeout",
            self.header_timeout.as_deref(),
            DEFAULT_HEADER_TIMEOUT,
        )?;
        let idle_timeout = cx.duration(
            "ingest.idle_timeout",
            self.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
        )?;
        let handshake_timeout = cx.duration(
            "ingest.handshake_timeout",
            self.handshake_timeout.as_deref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        )?;
        let open_timeout = cx.duration_or_never(
            "ingest.open_timeout",
            self.open_timeout.as_deref(),
            DEFAULT_OPEN_TIMEOUT,
        )?;
        let dicom = DicomSection::from_settings(
            DicomKeys {
                ae_title: self.dicom_ae_title,
                peers: self.dicom_peers,
                max_pdu_bytes: self.dicom_max_pdu_bytes,
                max_associations: self.dicom_max_associations,
                commitment_max_pending: self.dicom_commitment_max_pending,
                idle_timeout: cx.duration(
                    "ingest.dicom_idle_timeout",
                    self.dicom_idle_timeout.as_deref(),
                    DEFAULT_DICOM_IDLE_TIMEOUT,
                )?,
            },
            dicom_tls_listen.is_some(),
        )
        .map_err(|e| cx.setting(e))?;
        if dicom_listen.is_some() && dicom_listen == dicom_tls_listen {
            return Err(cx.invalid(
                "ingest.dicom_tls_listen",
                "must differ from ingest.dicom_listen",
            ));
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 || max_connections > MAX_CONNECTIONS {
            return Err(cx.invalid(
                "ingest.max_connections",
                format!("{max_connections} is not in 1..={MAX_CONNECTIONS}"),
            ));
        }
        if handshake_timeout.is_zero() || handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
            return Err(cx.invalid(
                "ingest.handshake_timeout",
                "must be above 0 and at most 60s",
            ));
        }
        let max_unidentified_per_source = self
            .max_unidentified_per_source
            .unwrap_or(DEFAULT_MAX_UNIDENTIFIED_PER_SOURCE);
        if !(1..=MAX_UNIDENTIFIED_PER_SOURCE).contains(&max_unidentified_per_source) {
            return Err(cx.invalid(
                "ingest.max_unidentified_per_source",
                format!(
                    "{max_unidentified_per_source} is not in 1..={MAX_UNIDENTIFIED_PER_SOURCE}"
                ),
            ));
        }
        let stow_max_parts =
            stow::max_parts_setting(self.stow_max_parts).map_err(|e| cx.setting(e))?;
        let stow_max_failed_listed = stow::max_failed_listed_setting(self.stow_max_failed_listed)
            .map_err(|e| cx.setting(e))?;
        if header_timeout.is_zero() || idle_timeout.is_zero() {
            return Err(cx.invalid(
                "ingest.header_timeout",
                "header_timeout and idle_timeout must be positive",
            ));
        }
        Ok(IngestSection {
            listen,
            dicom_listen,
            dicom_tls_listen,
            max_upload_bytes: self.max_upload_bytes.unwrap_or(DEFAULT_MAX_UPLOAD_BYTES),
            dicom,
            header_timeout,
            idle_timeout,
            max_connections,
            handshake_timeout,
            max_unidentified_per_source,
            open_timeout,
            stow_max_parts,
            stow_max_failed_listed,
        })
    }
}

// ---- [metrics] ------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

impl RawMetrics {
    /// `metrics.listen`.
    fn check(self, cx: &Context<'_>) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| cx.invalid("metrics.listen", format!("`{}`: {e}", self.listen)))
    }
}

// ---- [spool] --------------------------------------------------------------------------------

/// Default `spool.retain`: three days, so a store failure found after a weekend can still be
/// re-delivered from the gateway's copy.
pub const DEFAULT_SPOOL_RETAIN: Duration = Duration::from_secs(3 * 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    dir: PathBuf,
    retain: Option<String>,
    reserve_bytes: Option<u64>,
}

/// `[spool]`, checked; spread over [`Config`]'s `spool_*` fields.
struct SpoolSettings {
    dir: PathBuf,
    retain: Option<Duration>,
    reserve_bytes: u64,
}

impl RawSpool {
    fn check(self, cx: &Context<'_>) -> Result<SpoolSettings, ConfigError> {
        Ok(SpoolSettings {
            dir: cx.resolve(&self.dir),
            retain: cx.duration_or_never(
                "spool.retain",
                self.retain.as_deref(),
                DEFAULT_SPOOL_RETAIN,
            )?,
            reserve_bytes: self.reserve_bytes.unwrap_or(DEFAULT_SPOOL_RESERVE_BYTES),
        })
    }
}

// ---- [quota] --------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    max_open_transfers: Option<usize>,
    max_spool_bytes: Option<u64>,
    max_files: Option<u64>,
}

impl RawQuota {
    fn check(self, cx: &Context<'_>) -> Result<QuotaSection, ConfigError> {
        let quota = QuotaSection {
            max_open_transfers: self
                .max_open_transfers
                .unwrap_or(DEFAULT_QUOTA_MAX_OPEN_TRANSFERS),
            max_spool_bytes: self
                .max_spool_bytes
                .unwrap_or(DEFAULT_QUOTA_MAX_SPOOL_BYTES),
            max_files: self.max_files.unwrap_or(DEFAULT_QUOTA_MAX_FILES),
        };
        for (key, zero) in [
            ("quota.max_open_transfers", quota.max_open_transfers == 0),
            ("quota.max_spool_bytes", quota.max_spool_bytes == 0),
            ("quota.max_files", quota.max_files == 0),
        ] {
            if zero {
                return Err(cx.invalid(key, "must be at least 1"));
            }
        }
        Ok(quota)
    }
}

// ---- [audit] --------------------------------------------------------------------------------

/// Default `audit.checkpoint_every`.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 64;
/// Default `audit.checkpoint_interval`: five minutes.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    dir: PathBuf,
    checkpoint_every: Option<u64>,
    checkpoint_interval: Option<String>,
    patient_key: Option<PathBuf>,
}

impl RawAudit {
    /// `audit.dir` and the rest of `[audit]`.
    fn check(self, cx: &Context<'_>) -> Result<(PathBuf, AuditSection), ConfigError> {
        let audit_dir = cx.resolve(&self.dir);
        let patient_key = match self.patient_key.as_deref() {
            Some(p) => cx.resolve(p),
            None => default_patient_key(&audit_dir).ok_or_else(|| {
                cx.invalid(
                    "audit.patient_key",
                    format!(
                        "audit.dir {} has no parent directory for the default \
                         secrets/patient.key; name the key file",
                        audit_dir.display()
                    ),
                )
            })?,
        };
        if lexically_normal(&patient_key).starts_with(lexically_normal(&audit_dir)) {
            return Err(cx.invalid(
                "audit.patient_key",
                format!(
                    "{} is inside audit.dir {}: whoever is given a copy of the audit directory \
                     would hold the key behind its patient pseudonyms; move the file out of \
                     audit.dir and name its new place here",
                    patient_key.display(),
                    audit_dir.display()
                ),
            ));
        }
        let checkpoint_every = match self.checkpoint_every {
            None => DEFAULT_CHECKPOINT_EVERY,
            Some(0) => return Err(cx.invalid("audit.checkpoint_every", "must be at least 1")),
            Some(n) => n,
        };
        let checkpoint_interval = cx.duration(
            "audit.checkpoint_interval",
            self.checkpoint_interval.as_deref(),
            DEFAULT_CHECKPOINT_INTERVAL,
        )?;
        Ok((
            audit_dir,
            AuditSection {
                checkpoint_every,
                checkpoint_interval,
                patient_key,
            },
        ))
    }
}

// ---- [policy] -------------------------------------------------------------------------------

/// Default `policy.deidentify_purposes`.
pub const DEFAULT_DEIDENTIFY_PURPOSES: &[&str] = &["research"];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    consents: Option<PathBuf>,
    #[serde(default)]
    negative_list: Vec<String>,
    hospitals: Option<Vec<String>>,
    deidentify_purposes: Option<Vec<String>>,
    #[serde(default)]
    deidentify_options: std::collections::BTreeMap<String, Vec<String>>,
    categories: Option<Vec<String>>,
    destinations: Option<Vec<String>>,
    max_transfer_bytes: Option<u64>,
    max_files: Option<u64>,
}

impl RawPolicy {
    fn check(self, cx: &Context<'_>) -> Result<PolicySection, ConfigError> {
        for (key, v) in [
            ("policy.max_transfer_bytes", self.max_transfer_bytes),
            ("policy.max_files", self.max_files),
        ] {
            if v == Some(0) {
                return Err(cx.invalid(key, "must be at least 1"));
            }
        }
        let deidentify_purposes = self.deidentify_purposes.unwrap_or_else(|| {
            DEFAULT_DEIDENTIFY_PURPOSES
                .iter()
                .map(|p| (*p).to_owned())
                .collect()
        });
        let mut deidentify_options = std::collections::BTreeMap::new();
        for (purpose, names) in self.deidentify_options {
            if !deidentify_purposes.contains(&purpose) {
                return Err(cx.invalid(
                    "policy.deidentify_options",
                    format!("purpose {purpose:?} is not in policy.deidentify_purposes"),
                ));
            }
            let options = crate::dicom::deid::ProfileOptions::from_names(&names)
                .map_err(|e| cx.invalid("policy.deidentify_options", format!("{purpose}: {e}")))?;
            deidentify_options.insert(purpose, options);
        }
        Ok(PolicySection {
            consents: self.consents.as_deref().map(|p| cx.resolve(p)),
            negative_list: self.negative_list,
            hospitals: self.hospitals,
            deidentify_purposes,
            deidentify_options,
            categories: self.categories,
            destinations: self.destinations,
            max_transfer_bytes: self.max_transfer_bytes,
            max_files: self.max_files,
        })
    }
}

// ---- [delivery] -----------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    kind: String,
    path: Option<PathBuf>,
    url: Option<String>,
    batch_bytes: Option<u64>,
    requests_in_flight: Option<u64>,
    retry_base: Option<String>,
    retry_max: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<String>,
}

/// `[delivery]` (required on a gateway) and its retry waits; the checks of the values are
/// the delivery module's ([`Backoff::from_settings`], [`StowSettings::from_section`]).
/// `hsm`: the token a `pkcs11:` `delivery.key` must be on, and the signing key it must not be.
fn check_delivery(
    raw: Option<RawDelivery>,
    cx: &Context<'_>,
    hsm: &HsmSection,
) -> Result<(Option<DeliverySection>, Backoff), ConfigError> {
    let Some(d) = raw else {
        return match cx.role {
            Role::Gateway => Err(cx.missing("delivery.kind")),
            Role::Edge => Ok((None, Backoff::default())),
        };
    };
    let retry = Backoff::from_settings(
        cx.optional_duration("delivery.retry_base", d.retry_base.as_deref())?,
        cx.optional_duration("delivery.retry_max", d.retry_max.as_deref())?,
    )
    .map_err(|e| cx.setting(e))?;
    let delivery = match d.kind.as_str() {
        "dir" => DeliverySection::Dir {
            path: cx.resolve(&d.path.ok_or_else(|| cx.missing("delivery.path"))?),
        },
        "dicomweb" => DeliverySection::DicomWeb(
            StowSettings::from_section(
                d.url,
                (d.batch_bytes, d.requests_in_flight),
                d.ca.as_deref().map(|p| cx.resolve(p)),
                d.cert.as_deref().map(|p| cx.resolve(p)),
                d.key
                    .as_deref()
                    .map(|k| {
                        TlsKeySource::parse(k, &hsm.token_label, &hsm.key_label, |p| cx.resolve(p))
                    })
                    .transpose()
                    .map_err(|m| cx.invalid("delivery.key", m))?,
            )
            .map_err(|e| cx.setting(e))?,
        ),
        other => {
            return Err(cx.invalid(
                "delivery.kind",
                format!("`{other}` is not one of dir, dicomweb"),
            ));
        }
    };
    Ok((Some(delivery), retry))
}

// ---- [drain] --------------------------------------------------------------------------------

/// Default `drain.timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    timeout: Option<String>,
}

impl RawDrain {
    /// `drain.timeout`.
    fn check(self, cx: &Context<'_>) -> Result<Duration, ConfigError> {
        cx.duration(
            "drain.timeout",
            self.timeout.as_deref(),
            DEFAULT_DRAIN_TIMEOUT,
        )
    }
}

/// Default `tls.warn_expiry`: 30 days.
pub const DEFAULT_WARN_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text as if it had been read from `path`: serde reads every section,
    /// then each section is checked in turn and the first refusal is the error. (The order
    /// only decides which of several bad values is reported; `check-config` reports them all.)
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_owned);
        let cx = Context {
            path,
            base,
            role: raw.role,
        };

        let hsm = raw.hsm.check(&cx)?;
        let limits = raw.limits.check(&cx)?;
        let transport = raw.transport.check(&cx, &limits)?;
        let (peer_signing_key, peer_names) = raw.peer.check(&cx)?;
        let link = raw.link.check(&cx)?;
        let ingest = raw.ingest.check(&cx)?;
        let metrics_listen = raw.metrics.check(&cx)?;
        let (delivery, delivery_retry) = check_delivery(raw.delivery, &cx, &hsm)?;
        let (audit_dir, audit) = raw.audit.check(&cx)?;
        let quota = raw.quota.check(&cx)?;
        let id = check_id(raw.id, &cx)?;
        let tls = raw.tls.check(&cx, &hsm)?;
        let spool = raw.spool.check(&cx)?;
        let policy = raw.policy.check(&cx)?;
        let drain_timeout = raw.drain.check(&cx)?;

        Ok(Config {
            path: path.to_owned(),
            role: cx.role,
            id,
            hsm,
            peer_signing_key,
            peer_names,
            tls,
            transport,
            link,
            ingest,
            metrics_listen,
            spool_dir: spool.dir,
            spool_retain: spool.retain,
            audit_dir,
            audit,
            policy,
            delivery,
            delivery_retry,
            drain_timeout,
            limits,
            quota,
            spool_reserve_bytes: spool.reserve_bytes,
        })
    }

    /// How to open this appliance's audit log: `audit.dir`, the id, and `[audit]`.
    pub fn audit_log_settings(&self) -> crate::audit::settings::LogSettings {
        crate::audit::settings::LogSettings {
            dir: self.audit_dir.clone(),
            appliance_id: self.id.clone(),
            checkpoint_every: self.audit.checkpoint_every,
            patient_key: self.audit.patient_key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::settings::{
        DEFAULT_DICOM_AE_TITLE, DEFAULT_DICOM_COMMITMENT_MAX_PENDING,
        DEFAULT_DICOM_MAX_ASSOCIATIONS, DEFAULT_DICOM_MAX_PDU_BYTES,
    };
    use crate::ingest::stow::{DEFAULT_STOW_MAX_FAILED_LISTED, DEFAULT_STOW_MAX_PARTS};

    #[test]
    fn tls_key_is_a_path_or_a_pkcs11_uri() {
        let c = Config::parse(Path::new("/etc/baylink/gateway.toml"), GATEWAY).unwrap();
        assert_eq!(
            c.tls.key,
            TlsKeySource::File(PathBuf::from("/etc/baylink/pki/gateway.key"))
        );
        let hsm = GATEWAY.replace(
            "key = \"pki/gateway.key\"",
            "key = \"pkcs11:object=baylink%20tls;token=baylink-gateway;type=private\"",
        );
        let c = Config::parse(Path::new("/etc/baylink/gateway.toml"), &hsm).unwrap();
        assert_eq!(
            c.tls.key,
            TlsKeySource::Hsm {
                label: "baylink tls".into()
            }
        );
        assert_eq!(c.tls.key.to_string(), "pkcs11:object=baylink%20tls");
        assert_eq!(c.tls.key.file(), None);
        // A relative path that happens to start with the scheme is written ./pkcs11:...
        let odd = GATEWAY.replace("key = \"pki/gateway.key\"", "key = \"./pkcs11:x\"");
        let c = Config::parse(Path::new("/etc/baylink/gateway.toml"), &odd).unwrap();
        assert!(c.tls.key.file().is_some());
    }

    #[test]
    fn pkcs11_uris_that_are_refused() {
        for (uri, says) in [
            ("pkcs11:", "names no object"),
            ("pkcs11:token=baylink-gateway", "names no object"),
            ("pkcs11:object=a;object=b", "twice"),
            ("pkcs11:object=tls;token=other", "token \"other\""),
            ("pkcs11:object=tls;type=public", "type must be private"),
            ("pkcs11:object=tls;id=%01", "`id` is not supported"),
            ("pkcs11:object=tls?pin-value=1234", "query attributes"),
            ("pkcs11:object=%zz", "percent-encoded"),
            ("pkcs11:object", "not name=value"),
            (
                "pkcs11:object=baylink-signing",
                "signing key of hsm.key_label",
            ),
            (
                "pkcs11:object=0123456789012345678901234567890123",
                "1 to 32 bytes",
            ),
        ] {
            let text = GATEWAY.replace("key = \"pki/gateway.key\"", &format!("key = \"{uri}\""));
            let err = Config::parse(Path::new("/etc/baylink/gateway.toml"), &text).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("tls.key") && msg.contains(says),
                "{uri}: {msg}"
            );
        }
    }

    const GATEWAY: &str = r#"
role = "gateway"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
softhsm_conf = "softhsm/softhsm2.conf"
token_label = "baylink-gateway"
key_label = "baylink-signing"
pin_file = "secrets/gateway.pin"
[peer]
signing_key = "keys/edge.pub.pem"
names = ["edge"]
[tls]
ca = "pki/ca.pem"
cert = "pki/gateway.pem"
key = "pki/gateway.key"
[transport]
listen = "127.0.0.1:47402"
[metrics]
listen = "127.0.0.1:47403"
[spool]
dir = "spool/gateway"
[audit]
dir = "audit/gateway"
[delivery]
kind = "dir"
path = "delivered"
"#;

    #[test]
    fn spool_retain_and_open_timeout_take_a_duration_or_never() {
        let parse = |retain: &str| {
            let text = GATEWAY.replace("[spool]", &format!("[spool]\nretain = \"{retain}\""));
            Config::parse(Path::new("g.toml"), &text).map(|c| c.spool_retain)
        };
        assert_eq!(parse("0s").unwrap(), Some(Duration::ZERO));
        assert_eq!(parse("12h").unwrap(), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse("never").unwrap(), None);
        let e = parse("forever").unwrap_err();
        assert!(e.to_string().contains("spool.retain"), "{e}");

        let open = |t: &str| {
            let text = format!("{GATEWAY}\n[ingest]\nopen_timeout = \"{t}\"\n");
            Config::parse(Path::new("g.toml"), &text).map(|c| c.ingest.open_timeout)
        };
        assert_eq!(open("2h").unwrap(), Some(Duration::from_secs(7200)));
        assert_eq!(open("never").unwrap(), None);
        let e = open("later").unwrap_err();
        assert!(e.to_string().contains("ingest.open_timeout"), "{e}");
    }

    #[test]
    fn the_patient_key_is_refused_inside_audit_dir() {
        let parse = |key: Option<&str>| {
            let line = key.map_or(String::new(), |k| format!("\npatient_key = \"{k}\""));
            let text = GATEWAY.replace(
                "dir = \"audit/gateway\"",
                &format!("dir = \"audit/gateway\"{line}"),
            );
            Config::parse(Path::new("/etc/baylink/g.toml"), &text)
        };
        // Default: beside the audit directory, not in it.
        assert_eq!(
            parse(None).unwrap().audit.patient_key,
            Path::new("/etc/baylink/audit/secrets/patient.key")
        );
        // An old config naming a key elsewhere keeps it.
        assert_eq!(
            parse(Some("/srv/keys/patient.key"))
                .unwrap()
                .audit
                .patient_key,
            Path::new("/srv/keys/patient.key")
        );
        assert_eq!(
            parse(Some("audit/gateway-keys/k"))
                .unwrap()
                .audit
                .patient_key,
            Path::new("/etc/baylink/audit/gateway-keys/k")
        );
        for inside in [
            "audit/gateway/patient.key",
            "/etc/baylink/audit/gateway/sub/k",
            "./audit/x/../gateway/./patient.key",
        ] {
            let e = parse(Some(inside)).unwrap_err().to_string();
            assert!(e.contains("audit.patient_key"), "{inside}: {e}");
            assert!(e.contains("is inside audit.dir"), "{inside}: {e}");
        }
    }

    #[test]
    fn allow_extractable_is_off_unless_set() {
        let c = Config::parse(Path::new("g.toml"), GATEWAY).unwrap();
        assert!(!c.hsm.allow_extractable);
        let text = GATEWAY.replace(
            "pin_file = \"secrets/gateway.pin\"",
            "pin_file = \"secrets/gateway.pin\"\nallow_extractable = true",
        );
        let c = Config::parse(Path::new("g.toml"), &text).unwrap();
        assert!(c.hsm.allow_extractable);
    }

    #[test]
    fn quotas_and_the_spool_reserve_have_defaults_and_name_their_key() {
        let c = Config::parse(Path::new("g.toml"), GATEWAY).unwrap();
        assert_eq!(
            c.quota,
            QuotaSection {
                max_open_transfers: DEFAULT_QUOTA_MAX_OPEN_TRANSFERS,
                max_spool_bytes: DEFAULT_QUOTA_MAX_SPOOL_BYTES,
                max_files: DEFAULT_QUOTA_MAX_FILES,
            }
        );
        assert_eq!(c.spool_reserve_bytes, DEFAULT_SPOOL_RESERVE_BYTES);
        let text = GATEWAY.replace("[spool]", "[spool]\nreserve_bytes = 0");
        let text = format!(
            "{text}\n[quota]\nmax_open_transfers = 2\nmax_spool_bytes = 1000\nmax_files = 3\n"
        );
        let c = Config::parse(Path::new("g.toml"), &text).unwrap();
        assert_eq!(c.spool_reserve_bytes, 0);
        assert_eq!(
            (
                c.quota.max_open_transfers,
                c.quota.max_spool_bytes,
                c.quota.max_files
            ),
            (2, 1000, 3)
        );
        let text = format!("{GATEWAY}\n[quota]\nmax_files = 0\n");
        let e = Config::parse(Path::new("g.toml"), &text).unwrap_err();
        assert!(e.to_string().contains("quota.max_files"), "{e}");
    }

    #[test]
    fn stow_limits_have_defaults_and_bounds() {
        let parse = |lines: &str| {
            let text = format!("{GATEWAY}\n[ingest]\n{lines}\n");
            Config::parse(Path::new("g.toml"), &text)
                .map(|c| (c.ingest.stow_max_parts, c.ingest.stow_max_failed_listed))
        };
        assert_eq!(
            parse("").unwrap(),
            (DEFAULT_STOW_MAX_PARTS, DEFAULT_STOW_MAX_FAILED_LISTED)
        );
        assert_eq!(
            parse("stow_max_parts = 5\nstow_max_failed_listed = 0").unwrap(),
            (5, 0)
        );
        let e = parse("stow_max_parts = 0").unwrap_err();
        assert!(e.to_string().contains("ingest.stow_max_parts"), "{e}");
        let e = parse("stow_max_failed_listed = 1000000").unwrap_err();
        assert!(
            e.to_string().contains("ingest.stow_max_failed_listed"),
            "{e}"
        );
    }

    #[test]
    fn the_gateway_names_the_edges_it_accepts() {
        let c = Config::parse(Path::new("g.toml"), GATEWAY).unwrap();
        assert_eq!(c.peer_names, ["edge"]);
        assert_eq!(c.transport.chunk_stall_timeout, DEFAULT_CHUNK_STALL_TIMEOUT);

        let without = GATEWAY.replace("names = [\"edge\"]\n", "");
        let e = Config::parse(Path::new("g.toml"), &without).unwrap_err();
        assert!(e.to_string().contains("missing `peer.names`"), "{e}");
        let empty = GATEWAY.replace("names = [\"edge\"]", "names = []");
        let e = Config::parse(Path::new("g.toml"), &empty).unwrap_err();
        assert!(e.to_string().contains("peer.names"), "{e}");
        let blank = GATEWAY.replace("names = [\"edge\"]", "names = [\"edge\", \"\"]");
        let e = Config::parse(Path::new("g.toml"), &blank).unwrap_err();
        assert!(e.to_string().contains("peer.names"), "{e}");

        let stall = |t: &str| {
            let text = GATEWAY.replace(
                "[transport]\n",
                &format!("[transport]\nchunk_stall_timeout = \"{t}\"\n"),
            );
            Config::parse(Path::new("g.toml"), &text).map(|c| c.transport.chunk_stall_timeout)
        };
        assert_eq!(stall("5s").unwrap(), Duration::from_secs(5));
        let e = stall("0s").unwrap_err();
        assert!(
            e.to_string().contains("transport.chunk_stall_timeout"),
            "{e}"
        );
    }

    #[test]
    fn max_transfers_defaults_to_four_and_is_bounded() {
        let c = Config::parse(Path::new("g.toml"), GATEWAY).unwrap();
        assert_eq!(c.transport.max_transfers, DEFAULT_MAX_TRANSFERS);
        let with = |n: &str| {
            let text = GATEWAY.replace(
                "[transport]\n",
                &format!("[transport]\nmax_transfers = {n}\n"),
            );
            Config::parse(Path::new("g.toml"), &text).map(|c| c.transport.max_transfers)
        };
        assert_eq!(with("1").unwrap(), 1);
        assert_eq!(with("64").unwrap(), 64);
        for bad in ["0", "65"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("transport.max_transfers") && e.contains("is not in 1..=64"),
                "{e}"
            );
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let c = Config::parse(Path::new("/etc/baylink/gateway.toml"), GATEWAY).unwrap();
        assert_eq!(c.role, Role::Gateway);
        assert_eq!(c.spool_dir, Path::new("/etc/baylink/spool/gateway"));
        assert_eq!(c.hsm.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(
            c.hsm.softhsm_conf.as_deref(),
            Some(Path::new("/etc/baylink/softhsm/softhsm2.conf"))
        );
        assert_eq!(c.transport.retry_for, Duration::from_secs(600));
        assert_eq!(c.spool_retain, Some(DEFAULT_SPOOL_RETAIN));
        assert_eq!(c.ingest.open_timeout, Some(DEFAULT_OPEN_TIMEOUT));
        assert_eq!(c.transport.chunk_size, DEFAULT_CHUNK_SIZE);
        assert!(matches!(c.delivery, Some(DeliverySection::Dir { .. })));
        assert_eq!(c.delivery_retry, crate::deliver::Backoff::default());
        assert_eq!(c.audit.checkpoint_every, 64);
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(300));
        assert_eq!(
            c.audit.patient_key,
            Path::new("/etc/baylink/audit/secrets/patient.key")
        );
    }

    #[test]
    fn example_config_parses_with_its_dicom_peers() {
        let text = include_str!("../../systemd/baylink.example.toml");
        let c = Config::parse(Path::new("/etc/baylink/edge.toml"), text).unwrap();
        assert_eq!(c.ingest.dicom.ae_title, "BAYLINK");
        assert_eq!(c.ingest.dicom.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.ingest.dicom.peers.len(), 1);
        assert_eq!(c.ingest.dicom.peers[0].hospital, "hospital-a");
        assert_eq!(c.ingest.dicom.peers[0].purpose, "care");
        assert_eq!(c.policy.deidentify_purposes, ["research"]);
        let research = text
            .replace("# purpose = \"care\"", "purpose = \"research\"")
            .replace(
                "# deidentify_purposes = [\"research\"]",
                "deidentify_purposes = [\"research\", \"teaching\"]",
            );
        let c = Config::parse(Path::new("/etc/baylink/edge.toml"), &research).unwrap();
        assert_eq!(c.ingest.dicom.peers[0].purpose, "research");
        assert_eq!(c.policy.deidentify_purposes, ["research", "teaching"]);
        assert!(c.policy.deidentify_options.is_empty());
        let options = format!(
            "{research}\n[policy.deidentify_options]\nteaching = [\"clean-descriptors\", \
             \"retain-device-identity\"]\n"
        );
        let c = Config::parse(Path::new("/etc/baylink/edge.toml"), &options).unwrap();
        let o = c.policy.deidentify_options["teaching"];
        assert!(o.clean_descriptors && o.retain_device_identity);
        assert!(!o.retain_longitudinal_modified_dates && !o.clean_pixel_data);
        for (bad, why) in [
            (
                "care = [\"clean-descriptors\"]",
                "not in policy.deidentify_purposes",
            ),
            (
                "research = [\"retain-everything\"]",
                "unknown de-identification option",
            ),
        ] {
            let text = format!("{research}\n[policy.deidentify_options]\n{bad}\n");
            let e = Config::parse(Path::new("/etc/baylink/edge.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("policy.deidentify_options") && e.contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn dicomweb_delivery_is_checked_when_the_config_is_read() {
        let dicomweb = |rest: &str| {
            GATEWAY.replace(
                "kind = \"dir\"\npath = \"delivered\"",
                &format!("kind = \"dicomweb\"\n{rest}"),
            )
        };
        let c = Config::parse(
            Path::new("g.toml"),
            &dicomweb("url = \"http://127.0.0.1:8042/dicom-web\""),
        )
        .unwrap();
        assert!(matches!(
            c.delivery,
            Some(DeliverySection::DicomWeb(StowSettings { batch_bytes, requests_in_flight, .. }))
                if batch_bytes == crate::deliver::dicomweb::DEFAULT_BATCH_BYTES
                    && requests_in_flight == crate::deliver::dicomweb::DEFAULT_REQUESTS_IN_FLIGHT
        ));
        let https = Config::parse(
            Path::new("/etc/baylink/g.toml"),
            &dicomweb(
                "url = \"https://store:8443/dicom-web\"\nca = \"store-ca.pem\"\n\
                 cert = \"me.pem\"\nkey = \"me.key\"",
            ),
        )
        .unwrap();
        let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = https.delivery
        else {
            panic!("https delivery with TLS settings: {:?}", https.delivery);
        };
        assert_eq!(tls.ca, Path::new("/etc/baylink/store-ca.pem"));
        assert_eq!(
            tls.identity,
            Some((
                PathBuf::from("/etc/baylink/me.pem"),
                TlsKeySource::File(PathBuf::from("/etc/baylink/me.key"))
            ))
        );
        // A key on the token, named as `tls.key` may name one.
        let hsm = Config::parse(
            Path::new("/etc/baylink/g.toml"),
            &dicomweb(
                "url = \"https://store:8443/dicom-web\"\nca = \"store-ca.pem\"\n\
                 cert = \"me.pem\"\nkey = \"pkcs11:object=store%20client;type=private\"",
            ),
        )
        .unwrap();
        let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = hsm.delivery
        else {
            panic!("https delivery with TLS settings: {:?}", hsm.delivery);
        };
        assert_eq!(
            tls.identity.map(|(_, key)| key),
            Some(TlsKeySource::Hsm {
                label: "store client".into()
            })
        );
        for (rest, want) in [
            ("", "missing `delivery.url`"),
            (
                "url = \"https://store/dicom-web\"",
                "no system roots are trusted",
            ),
            (
                "url = \"https://store\"\nca = \"ca.pem\"\ncert = \"me.pem\"",
                "missing `delivery.key`",
            ),
            (
                "url = \"https://store\"\nca = \"ca.pem\"\ncert = \"me.pem\"\n\
                 key = \"pkcs11:object=k;token=another\"",
                "names token \"another\"",
            ),
            (
                "url = \"https://store\"\nca = \"ca.pem\"\ncert = \"me.pem\"\n\
                 key = \"pkcs11:object=baylink-signing\"",
                "the signing key of hsm.key_label",
            ),
            (
                "url = \"http://store\"\nca = \"ca.pem\"",
                "apply to https:// URLs",
            ),
            (
                "url = \"http://store\"\nbatch_bytes = 0",
                "delivery.batch_bytes",
            ),
            (
                "url = \"http://store\"\nbatch_bytes = 4294967296",
                "delivery.batch_bytes",
            ),
            (
                "url = \"http://store\"\nrequests_in_flight = 0",
                "delivery.requests_in_flight",
            ),
            (
                "url = \"http://store\"\nrequests_in_flight = 17",
                "delivery.requests_in_flight",
            ),
        ] {
            let e = Config::parse(Path::new("g.toml"), &dicomweb(rest)).unwrap_err();
            assert!(e.to_string().contains(want), "{rest}: {e}");
        }
    }

    #[test]
    fn delivery_retries_take_a_base_and_a_max() {
        let retry = |rest: &str| {
            let text = GATEWAY.replace(
                "path = \"delivered\"",
                &format!("path = \"delivered\"\n{rest}"),
            );
            Config::parse(Path::new("g.toml"), &text).map(|c| c.delivery_retry)
        };
        assert_eq!(
            retry("retry_base = \"2s\"\nretry_max = \"5m\"").unwrap(),
            crate::deliver::Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(300)
            }
        );
        assert_eq!(
            retry("retry_max = \"500ms\"").unwrap().max,
            Duration::from_millis(500),
            "max may equal the default base"
        );
        for (rest, want) in [
            ("retry_base = \"0s\"", "delivery.retry_base"),
            ("retry_base = \"soon\"", "delivery.retry_base"),
            ("retry_base = \"2m\"", "delivery.retry_max"),
            ("retry_max = \"100ms\"", "less than delivery.retry_base"),
        ] {
            let e = retry(rest).unwrap_err();
            assert!(e.to_string().contains(want), "{rest}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let bad = GATEWAY.replace("kind = \"dir\"", "kind = \"ftp\"");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("delivery.kind"), "{e}");

        let bad = GATEWAY.replace("listen = \"127.0.0.1:47402\"", "listen = \"nowhere\"");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("transport.listen"), "{e}");

        let bad = GATEWAY.replace("[transport]\nlisten = \"127.0.0.1:47402\"\n", "");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("missing `transport.listen`"), "{e}");

        let bad = format!("{GATEWAY}\n[link]\ncongestion = \"reno\"\n");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("link.congestion"), "{e}");

        let bad = format!("{GATEWAY}\n[link]\nmtu = 576\n");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("link.mtu"), "{e}");

        let bad = format!("{GATEWAY}\n[link]\nmtu = 9000\nmax_mtu = 1500\n");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("above link.max_mtu"), "{e}");

        let good = format!("{GATEWAY}\n[link]\nmtu = 9000\n");
        let c = Config::parse(Path::new("g.toml"), &good).unwrap();
        assert_eq!((c.link.mtu, c.link.max_mtu), (Some(9000), 9000));
        assert_eq!(c.link.min_udp_payload(), 6550);

        // The receive hold: from the round trip unless set, 0 turns it off, at most 5 ms.
        let hold = |link: &str| {
            let text = format!("{GATEWAY}\n[link]\n{link}\n");
            Config::parse(Path::new("g.toml"), &text).map(|c| c.link.receive_hold)
        };
        assert_eq!(hold("rtt_ms = 10").unwrap(), Duration::ZERO);
        assert_eq!(hold("rtt_ms = 50").unwrap(), Duration::from_millis(1));
        assert_eq!(
            hold("rtt_ms = 50\nreceive_hold_ms = 0").unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            hold("receive_hold_ms = 3").unwrap(),
            Duration::from_millis(3)
        );
        let e = hold("receive_hold_ms = 6").unwrap_err();
        assert!(
            e.to_string()
                .contains("link.receive_hold_ms: 6 is not in 0..=5"),
            "{e}"
        );

        let bad = GATEWAY.replace("[audit]", "[audit]\ncheckpoint_every = 0");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("audit.checkpoint_every"), "{e}");

        let bad = GATEWAY.replace("[audit]", "[audit]\ncheckpoint_interval = \"soon\"");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("audit.checkpoint_interval"), "{e}");

        let bad = format!(
            "{GATEWAY}\n[ingest]\ndicom_listen = \"127.0.0.1:104\"\n\
             [[ingest.dicom_peers]]\nae_title = \"STORESCU\"\naddress = \"localhost\"\nhospital = \"h\"\n"
        );
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("ingest.dicom_peers.address"), "{e}");

        let bad = format!(
            "{GATEWAY}\n[ingest]\ndicom_listen = \"127.0.0.1:104\"\n\
             dicom_tls_listen = \"127.0.0.1:104\"\n"
        );
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("ingest.dicom_tls_listen"), "{e}");

        let bad = format!(
            "{GATEWAY}\n[ingest]\ndicom_tls_listen = \"127.0.0.1:2762\"\n\
             [[ingest.dicom_peers]]\nae_title = \"CT1\"\naddress = \"10.0.0.1\"\nhospital = \"h\"\n\
             [[ingest.dicom_peers]]\nae_title = \"CT1\"\naddress = \"10.0.0.2\"\nhospital = \"h\"\n\
             purpose = \"research\"\n"
        );
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("two purposes"), "{e}");

        let bad = format!("{GATEWAY}\n[ingest]\ndicom_ae_title = \"FAR-TOO-LONG-AE-TITLE\"\n");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("ingest.dicom_ae_title"), "{e}");

        let bad = GATEWAY.replace("[spool]", "[spool]\nretain = \"soon\"");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("spool.retain"), "{e}");

        let bad = GATEWAY.replace("[spool]", "[spool]\nsize = 3");
        let e = Config::parse(Path::new("g.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
    }

    /// An edge with only the keys it must have.
    const EDGE: &str = r#"
role = "edge"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "baylink-edge"
key_label = "baylink-signing"
pin_file = "secrets/edge.pin"
[peer]
signing_key = "keys/gateway.pub.pem"
[tls]
ca = "pki/ca.pem"
cert = "pki/edge.pem"
key = "pki/edge.key"
[transport]
connect = "127.0.0.1:47402"
[metrics]
listen = "127.0.0.1:47401"
[spool]
dir = "spool/edge"
[audit]
dir = "audit/edge"
"#;

    /// `text` with `line` added to `[section]` (appended as a new table if absent).
    fn with_line(text: &str, section: &str, line: &str) -> String {
        let header = format!("[{section}]\n");
        if text.contains(&header) {
            text.replacen(&header, &format!("{header}{line}\n"), 1)
        } else {
            format!("{text}\n{header}{line}\n")
        }
    }

    #[test]
    fn an_unknown_key_is_refused_by_name_in_every_section() {
        let top = format!("surprise_key = 1\n{GATEWAY}");
        let e = Config::parse(Path::new("g.toml"), &top).unwrap_err();
        assert!(
            e.to_string().contains("unknown field `surprise_key`"),
            "{e}"
        );
        for section in [
            "hsm",
            "peer",
            "tls",
            "transport",
            "link",
            "ingest",
            "metrics",
            "spool",
            "audit",
            "policy",
            "delivery",
            "drain",
            "limits",
            "quota",
        ] {
            let text = with_line(GATEWAY, section, "surprise_key = 1");
            let e = Config::parse(Path::new("g.toml"), &text).unwrap_err();
            assert!(
                matches!(e, ConfigError::Parse { .. })
                    && e.to_string().contains("unknown field `surprise_key`"),
                "[{section}]: {e}"
            );
        }
        let peer = format!(
            "{GATEWAY}\n[[ingest.dicom_peers]]\nae_title = \"CT1\"\naddress = \"10.0.0.1\"\n\
             hospital = \"h\"\nsurprise_key = 1\n"
        );
        let e = Config::parse(Path::new("g.toml"), &peer).unwrap_err();
        assert!(
            e.to_string().contains("unknown field `surprise_key`"),
            "{e}"
        );
        // `[policy.deidentify_options]` is a map of purposes: a purpose not de-identified is
        // refused by name instead.
        let text = format!("{GATEWAY}\n[policy.deidentify_options]\nsurprise_key = []\n");
        let e = Config::parse(Path::new("g.toml"), &text).unwrap_err();
        assert!(e.to_string().contains("\"surprise_key\" is not in"), "{e}");
    }

    #[test]
    fn every_section_has_its_defaults() {
        let c = Config::parse(Path::new("/etc/baylink/edge.toml"), EDGE).unwrap();
        assert_eq!((c.role, c.id.as_str()), (Role::Edge, "edge"));
        // [hsm]
        assert_eq!(c.hsm.sessions, DEFAULT_HSM_SESSIONS);
        assert_eq!(c.hsm.softhsm_conf, None);
        assert!(!c.hsm.allow_extractable);
        // [peer]
        assert!(c.peer_names.is_empty());
        // [tls]
        assert_eq!(c.tls.warn_expiry, DEFAULT_WARN_EXPIRY);
        // [transport]
        let t = &c.transport;
        assert_eq!(
            (t.listen, t.server_name.as_str()),
            (None, DEFAULT_SERVER_NAME)
        );
        assert_eq!(t.retry_for, DEFAULT_RETRY_FOR);
        assert_eq!(t.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(t.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(t.max_transfers, DEFAULT_MAX_TRANSFERS);
        assert_eq!(t.chunk_stall_timeout, DEFAULT_CHUNK_STALL_TIMEOUT);
        // [link]: the network crate's, with cubic.
        assert_eq!(c.link, LinkTuning::default());
        assert_eq!(c.link.congestion, Congestion::Cubic);
        // [ingest]
        let i = &c.ingest;
        assert_eq!(
            (i.listen, i.dicom_listen, i.dicom_tls_listen),
            (None, None, None)
        );
        assert_eq!(i.max_upload_bytes, DEFAULT_MAX_UPLOAD_BYTES);
        assert_eq!(i.header_timeout, DEFAULT_HEADER_TIMEOUT);
        assert_eq!(i.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(i.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(i.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(
            i.max_unidentified_per_source,
            DEFAULT_MAX_UNIDENTIFIED_PER_SOURCE
        );
        assert_eq!(i.open_timeout, Some(DEFAULT_OPEN_TIMEOUT));
        assert_eq!(i.stow_max_parts, DEFAULT_STOW_MAX_PARTS);
        assert_eq!(i.stow_max_failed_listed, DEFAULT_STOW_MAX_FAILED_LISTED);
        // [ingest] dicom_*
        let d = &i.dicom;
        assert_eq!(d.ae_title, DEFAULT_DICOM_AE_TITLE);
        assert!(d.peers.is_empty());
        assert_eq!(d.max_pdu_bytes, DEFAULT_DICOM_MAX_PDU_BYTES);
        assert_eq!(d.max_associations, DEFAULT_DICOM_MAX_ASSOCIATIONS);
        assert_eq!(
            d.commitment_max_pending,
            DEFAULT_DICOM_COMMITMENT_MAX_PENDING
        );
        assert_eq!(d.idle_timeout, DEFAULT_DICOM_IDLE_TIMEOUT);
        // [spool]
        assert_eq!(c.spool_dir, Path::new("/etc/baylink/spool/edge"));
        assert_eq!(c.spool_retain, Some(DEFAULT_SPOOL_RETAIN));
        assert_eq!(c.spool_reserve_bytes, DEFAULT_SPOOL_RESERVE_BYTES);
        // [audit]
        assert_eq!(c.audit.checkpoint_every, DEFAULT_CHECKPOINT_EVERY);
        assert_eq!(c.audit.checkpoint_interval, DEFAULT_CHECKPOINT_INTERVAL);
        assert_eq!(
            c.audit.patient_key,
            Path::new("/etc/baylink/audit/secrets/patient.key")
        );
        // [policy]
        let p = &c.policy;
        assert_eq!(p.consents, None);
        assert!(p.negative_list.is_empty());
        assert_eq!(p.hospitals, None);
        assert_eq!(p.deidentify_purposes, DEFAULT_DEIDENTIFY_PURPOSES);
        assert!(p.deidentify_options.is_empty());
        assert_eq!((&p.categories, &p.destinations), (&None, &None));
        assert_eq!((p.max_transfer_bytes, p.max_files), (None, None));
        // [delivery]: none on an edge.
        assert!(c.delivery.is_none());
        assert_eq!(c.delivery_retry, Backoff::default());
        // [drain], [limits], [quota]
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(c.limits, baylink_net::proto::Limits::default());
        assert_eq!(
            c.quota,
            QuotaSection {
                max_open_transfers: DEFAULT_QUOTA_MAX_OPEN_TRANSFERS,
                max_spool_bytes: DEFAULT_QUOTA_MAX_SPOOL_BYTES,
                max_files: DEFAULT_QUOTA_MAX_FILES,
            }
        );
    }

    #[test]
    fn role_keys_are_required_and_refused_by_role() {
        let e = Config::parse(
            Path::new("e.toml"),
            &EDGE.replace("[transport]\nconnect = \"127.0.0.1:47402\"\n", ""),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config e.toml: missing `transport.connect` (required for role edge)"
        );
        let e = Config::parse(
            Path::new("e.toml"),
            &with_line(EDGE, "peer", "names = [\"edge\"]"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config e.toml: peer.names: applies only to role gateway (the edges it accepts)"
        );
        let e = Config::parse(
            Path::new("g.toml"),
            &GATEWAY.replace("[delivery]\nkind = \"dir\"\npath = \"delivered\"\n", ""),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config g.toml: missing `delivery.kind` (required for role gateway)"
        );
        let e = Config::parse(
            Path::new("g.toml"),
            &GATEWAY.replace("path = \"delivered\"\n", ""),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config g.toml: missing `delivery.path` (required for role gateway)"
        );
    }

    /// Each refused value, with the whole error it gives (the text operators and
    /// `check-config` see).
    #[test]
    fn refused_values_give_these_errors() {
        let peer =
            "[[ingest.dicom_peers]]\nae_title = \"CT1\"\naddress = \"10.0.0.1\"\nhospital = \"h\"";
        let cases: &[(&str, &str, &str)] = &[
            ("", "id = \"\"", "id: must be 1..=64 printable characters"),
            ("hsm", "sessions = 0", "hsm.sessions: 0 is not in 1..=64"),
            ("hsm", "sessions = 65", "hsm.sessions: 65 is not in 1..=64"),
            (
                "limits",
                "max_files = 0",
                "limits.max_files: 0 is not in 1..=100000",
            ),
            (
                "limits",
                "max_chunks = 1000001",
                "limits.max_chunks: 1000001 is not in 1..=1000000",
            ),
            (
                "transport",
                "chunk_size = 4095",
                "transport.chunk_size: 4095 is not in 4096..=67108864",
            ),
            (
                "transport",
                "max_in_flight = 257",
                "transport.max_in_flight: 257 is not in 1..=256",
            ),
            (
                "transport",
                "retry_for = \"soon\"",
                "transport.retry_for: `soon` is not a duration",
            ),
            (
                "transport",
                "connect = \"x\"",
                "transport.connect: `x` is not an address:port",
            ),
            ("link", "rate_mbit = 0", "link.rate_mbit: must be > 0"),
            ("link", "max_mtu = 1000", "link.max_mtu: 1000 is below 1248"),
            (
                "ingest",
                "listen = \"x:1\"",
                "ingest.listen: `x:1` is not an address:port",
            ),
            (
                "ingest",
                "max_connections = 0",
                "ingest.max_connections: 0 is not in 1..=4096",
            ),
            (
                "ingest",
                "handshake_timeout = \"61s\"",
                "ingest.handshake_timeout: must be above 0 and at most 60s",
            ),
            (
                "ingest",
                "max_unidentified_per_source = 0",
                "ingest.max_unidentified_per_source: 0 is not in 1..=1024",
            ),
            (
                "ingest",
                "idle_timeout = \"0s\"",
                "ingest.header_timeout: header_timeout and idle_timeout must be positive",
            ),
            (
                "ingest",
                "dicom_max_pdu_bytes = 100",
                "ingest.dicom_max_pdu_bytes: 100 is not in 4096..=1048576",
            ),
            (
                "ingest",
                "dicom_max_associations = 0",
                "ingest.dicom_max_associations: 0 is not in 1..=1024",
            ),
            (
                "ingest",
                "dicom_commitment_max_pending = 10001",
                "ingest.dicom_commitment_max_pending: 10001 is not in 1..=10000",
            ),
            (
                "ingest",
                "dicom_idle_timeout = \"0s\"",
                "ingest.dicom_idle_timeout: must be > 0",
            ),
            (
                "ingest",
                &format!("{peer}\n{peer}"),
                "ingest.dicom_peers: CT1 from 10.0.0.1 is listed twice",
            ),
            (
                "ingest",
                &peer.replace("hospital = \"h\"", "hospital = \"\""),
                "ingest.dicom_peers.hospital: must be 1..=64 printable characters",
            ),
            (
                "ingest",
                &format!("{peer}\ncommitment_host = \"pacs\""),
                "ingest.dicom_peers.commitment_port: CT1: commitment_host, commitment_ae_title and commitment_tls need commitment_port",
            ),
            (
                "ingest",
                &format!("{peer}\ncommitment_port = 0"),
                "ingest.dicom_peers.commitment_port: must be 1..=65535",
            ),
            (
                "ingest",
                &format!("{peer}\ncommitment_port = 104\ncommitment_host = \"a b\""),
                "ingest.dicom_peers.commitment_host: `a b` is not a host name or IP address",
            ),
            (
                "ingest",
                &format!(
                    "{peer}\ncommitment_port = 104\ncommitment_host = \"pacs..ct\"\n\
                     commitment_tls = true"
                ),
                "ingest.dicom_peers.commitment_host: `pacs..ct` is not a name a TLS certificate can carry (commitment_tls = true)",
            ),
            (
                "ingest",
                &format!("{peer}\ncommitment_port = 104\ncommitment_ae_title = \"\""),
                "ingest.dicom_peers.commitment_ae_title: `` is not an AE title",
            ),
            (
                "metrics",
                "listen = \"nowhere\"",
                "metrics.listen: `nowhere`: invalid socket address syntax",
            ),
            (
                "policy",
                "max_files = 0",
                "policy.max_files: must be at least 1",
            ),
            (
                "policy",
                "max_transfer_bytes = 0",
                "policy.max_transfer_bytes: must be at least 1",
            ),
            (
                "quota",
                "max_open_transfers = 0",
                "quota.max_open_transfers: must be at least 1",
            ),
            (
                "drain",
                "timeout = \"soon\"",
                "drain.timeout: `soon` is not a duration",
            ),
            (
                "tls",
                "warn_expiry = \"soon\"",
                "tls.warn_expiry: `soon` is not a duration",
            ),
        ];
        for (section, line, want) in cases {
            let text = if section.is_empty() {
                format!("{line}\n{GATEWAY}")
            } else {
                // The base's own line for a key is dropped first (TOML refuses a key twice).
                let key = line.split(" = ").next().unwrap_or_default();
                let base = if line.starts_with("[[") {
                    GATEWAY.to_owned()
                } else {
                    let mut kept = String::new();
                    let mut here = "";
                    for l in GATEWAY.lines() {
                        if l.starts_with('[') {
                            here = l;
                        }
                        if here == format!("[{section}]") && l.starts_with(&format!("{key} = ")) {
                            continue;
                        }
                        kept.push_str(l);
                        kept.push('\n');
                    }
                    kept
                };
                with_line(&base, section, line)
            };
            let e = Config::parse(Path::new("g.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("config g.toml: {want}")),
                "{line}:\n  got  {e}\n  want {want}"
            );
        }
    }
}
