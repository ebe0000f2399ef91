//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// baylink: regulated transfer of medical imaging across the Shenzhen–Hong Kong link.
///
/// One binary runs either appliance role. The edge (Shenzhen side) checks each upload
/// against the compliance policy, seals it (SHA-256 per chunk, Merkle root, HSM signature)
/// and sends it over QUIC with post-quantum hybrid TLS 1.3; the gateway (Hong Kong side)
/// verifies, commits, signs a receipt in its HSM and delivers downstream.
#[derive(Debug, Parser)]
#[command(name = "baylink", version, max_term_width = 100)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a complete two-appliance deployment on 127.0.0.1 in DIR (for tests and demos).
    ///
    /// Writes PKI (CA, appliance, hospital and rogue certificates), a SoftHSM store with one
    /// token per appliance holding its signing key and its TLS key, PINs, pinned public keys, edge.toml,
    /// gateway.toml, a consent registry and the state directories. DIR must be empty or
    /// missing. Ports: edge HTTPS N, edge metrics N+1, gateway QUIC N+2, gateway metrics N+3,
    /// edge DICOM N+4, edge DICOM over TLS N+5.
    // Only with the `dev-env` feature: the shipped binary leaves it out.
    #[cfg(feature = "dev-env")]
    DevEnv {
        /// Directory to create the deployment in.
        dir: PathBuf,
        /// First of the six ports.
        #[arg(long, default_value_t = crate::devenv::DEFAULT_BASE_PORT)]
        base_port: u16,
        /// PKCS#11 module to create the tokens with.
        #[arg(long, default_value = crate::devenv::SOFTHSM_MODULE)]
        module: PathBuf,
        /// Write the appliances' TLS private keys as PEM files (pki/edge.key, pki/gateway.key)
        /// instead of generating them in the tokens (`tls.key = "pkcs11:object=baylink-tls"`).
        #[arg(long)]
        tls_key_files: bool,
    },
    /// Run the role named in the config until SIGTERM (systemd Type=notify).
    ///
    /// `GET /healthz` on metrics.listen answers 200 once every listener is up and the HSM key
    /// was found, and 503 on an edge whose audit log the gateway's witness refused (it then
    /// sends nothing); `GET /metrics` is Prometheus text. SIGTERM drains and exits 0.
    Serve(ConfigArg),
    /// Send files as one transfer from the edge to the gateway and wait for the signed receipt.
    ///
    /// Runs the compliance checkpoint, seals the files into the edge spool, sends them and
    /// verifies the gateway's receipt. Prints `transfer <id>` on stderr at start and one JSON
    /// line on stdout at the end. A lost link is retried for transport.retry_for; refusals are
    /// final. Exit codes: 0 receipted (with --wait-delivered: delivered), 1 error, 2 refused
    /// by policy, 3 refused by the gateway or bad receipt, 4 HSM failure, 5 link lost for
    /// longer than transport.retry_for, 6 (--wait-delivered) the record store refused it or
    /// no delivery notice came within --delivered-timeout.
    Send(SendArgs),
    /// HSM key management.
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// The tamper-evident audit log: verify it, prove a transfer's records, sign a checkpoint.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// List the transfers in the appliance's spool: state, bytes held, creation time.
    ///
    /// States on the edge: open (hospital upload, not committed), expired (closed by
    /// ingest.open_timeout), sealed (no receipt yet), receipted, pruned (payload removed under
    /// spool.retain). On the gateway: receiving, committed (awaiting delivery), undeliverable
    /// (set aside), delivered, pruned. Read-only; safe beside a running `serve`.
    Spool(SpoolArgs),
    /// What this appliance uses of its hardware and system, for support.
    ///
    /// CPU features the cryptography uses (AES-NI, VAES, SHA-NI, AVX-512), UDP GSO/GRO and
    /// the socket buffers granted on a socket bound like the link's against the link's
    /// bandwidth-delay product (link.rate_mbit x link.rtt_ms), the io_uring operations the
    /// spool needs, the HSM module, slot and key labels, the certificates' subjects and
    /// expiry, and the config file's SHA-256. Read-only; safe beside a running `serve`.
    Info(InfoArgs),
    /// Check a config and report every problem at once, each naming its config key.
    ///
    /// Reads the file (unknown keys, wrong types, bad values: all of them, not only the
    /// first), then looks at the machine: every file the config names (certificates, keys,
    /// CA files, PKCS#11 module, PIN file, peer key, consent registry, patient key), the HSM
    /// (token, PIN, key), whether each certificate matches its key and is valid for longer
    /// than tls.warn_expiry (default 30 days; expiring soon is a warning, expired an error),
    /// whether every listen address of the role can be bound (each is bound and closed at
    /// once, so run it with the service stopped), and whether the spool and audit directories
    /// are writable with free space. Prints `error: <key>: <message>` or `warning: <key>:
    /// <message>` per problem, then a summary line. Exit 0 when there is no error (warnings
    /// allowed), 1 otherwise. `serve` runs the same checks before it starts and refuses to
    /// start on any error.
    CheckConfig(CheckConfigArgs),
}

/// Arguments of `check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The appliance config (TOML).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// One JSON object on stdout: {"ok": bool, "problems": [{"severity", "key", "message"}]}.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The appliance config (TOML).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// One JSON document on stdout instead of `section.field: value` lines.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `spool`.
#[derive(Debug, Args)]
pub struct SpoolArgs {
    /// The appliance config (TOML).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// One JSON document on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every record and every signed checkpoint of an appliance's audit log.
    ///
    /// Exit 0 with the last line `audit ok: <N> records, root <hex>`; otherwise non-zero,
    /// naming the first bad record (seq and byte offset) or checkpoint. The public key is
    /// `--public-key` if given (an auditor needs nothing else, with `--dir`), else the
    /// configured HSM key's. With `--config`, the checkpoint and cosignature anchored in the
    /// appliance's HSM are checked too: a log shorter than either (rewound) fails, naming
    /// both sizes.
    Verify(AuditVerifyArgs),
    /// Print (JSON on stdout) the inclusion proof of a transfer's records against the latest
    /// signed checkpoint.
    Prove {
        /// The appliance config (TOML).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// The transfer id.
        #[arg(long)]
        transfer: String,
    },
    /// Check a proof file offline, with only the appliance's PEM public key.
    VerifyProof {
        /// PEM public key of the appliance that wrote the log.
        #[arg(long)]
        public_key: PathBuf,
        /// The proof (output of `audit prove`).
        proof: PathBuf,
        /// PEM public key of the witness (the gateway): also require and check the
        /// witness cosignature(s) the proof carries.
        #[arg(long)]
        witness_key: Option<PathBuf>,
    },
    /// Sign a checkpoint of the log now with the HSM (if records were added since the last).
    Checkpoint(ConfigArg),
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// The appliance config (TOML): audit.dir and, without --public-key, the HSM key.
    #[arg(long, short = 'c', required_unless_present = "dir")]
    pub config: Option<PathBuf>,
    /// The audit directory, for an auditor without the config (needs --public-key).
    #[arg(long, conflicts_with = "config", requires = "public_key")]
    pub dir: Option<PathBuf>,
    /// PEM public key of the appliance that wrote the log (e.g. keys/edge.pub.pem).
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// Also check the witness cosignatures stored with an edge log, against this PEM key
    /// of the witnessing gateway (e.g. keys/gateway.pub.pem).
    #[arg(long, value_name = "PEM")]
    pub witness_key: Option<PathBuf>,
    /// A checkpoint of this log (signed note) kept by the other side, e.g. the gateway's
    /// `audit.dir/witness/<origin>`: the log must still hold it (no fewer records, same
    /// root). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub peer_checkpoint: Vec<PathBuf>,
}

/// `--config FILE`
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The appliance config (TOML).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
}

/// Arguments of `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The edge config (TOML).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Patient the data belongs to (must have a consent record).
    #[arg(long, default_value = "P-0001")]
    pub patient: String,
    /// Data category.
    #[arg(long, default_value = "diagnostic-image")]
    pub category: String,
    /// Purpose of the transfer.
    #[arg(long, default_value = "care")]
    pub purpose: String,
    /// Destination system.
    #[arg(long, default_value = "hk-ehealth")]
    pub destination: String,
    /// Consent record to rely on (default: any that covers the declaration).
    #[arg(long)]
    pub consent_ref: Option<String>,
    /// Finish transfer ID from the edge spool instead of sending new files.
    #[arg(long, value_name = "ID", conflicts_with = "files")]
    pub resume: Option<String>,
    /// Never draw a progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// Write chunk figures (count, latency percentiles in µs) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
    /// After the receipt, wait for the gateway's signed delivery notice (the record store
    /// took the transfer, or refused it) and print its fields under `delivery` in the JSON
    /// line. Exit 6 when the store refused it or no notice came within --delivered-timeout.
    #[arg(long)]
    pub wait_delivered: bool,
    /// How long --wait-delivered waits for the delivery notice (e.g. "90s", "10m").
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub delivered_timeout: std::time::Duration,
    /// Files to send (one transfer).
    #[arg(required_unless_present = "resume")]
    pub files: Vec<PathBuf>,
}

/// `hsm` subcommands.
#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Print the PEM public key of the configured HSM key.
    Pubkey(ConfigArg),
    /// Create a P-256 key pair on the token (refuses an existing label).
    Keygen {
        /// The appliance config (TOML).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// Label of the new key pair.
        #[arg(long)]
        label: String,
    },
    /// Show the module, token, mechanisms, and whether the configured key is present.
    Info(ConfigArg),
}
