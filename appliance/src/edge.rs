//! The edge role: check, seal, send, verify the receipt.
//!
//! `baylink send` and the edge service share this path. A transfer is locked (an advisory
//! `flock` on its spool directory's `lock` file) by whichever process is sending it, so a
//! `send` and a running edge service never send the same transfer twice at once.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use baylink_net::proto::{
    DeliveryNotice, ErrorCode, Frame, ProtoError, Receipt, SenderConfig, TransferId, WitnessAsker,
    WitnessAskerAction,
};
use baylink_net::spool::{Spool, SpoolConfig};
use baylink_net::transport::{self, TlsIdentity};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::audit::{self, Event, Kind};
use crate::config::Config;
use crate::failpoint;
use crate::link::send::{self, Delivered, Outgoing, Progress, SendError, SendStats};
use crate::policy::{Decision, Declaration, Policy, Refusal, SharedPolicy};
use crate::seal::{self, SealProgress};
use crate::signing::{Keys, RECEIPT_CONTEXT, Sign, verify_peer};
use crate::tls_reload::Swap;
use crate::transfer_dir::{self, TransferDir, write_atomic};

/// How long the edge waits for the gateway to witness an audit checkpoint.
pub const WITNESS_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an exiting edge waits for its connections' close frames to go out
/// ([`Edge::close_link`]).
pub const LINK_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `send --wait-delivered` waits, after acknowledging its notice, for the gateway to
/// end the notice stream (which it does once it has taken the acknowledgement in).
pub const NOTICE_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `send --wait-delivered` waits for the delivery notice unless told otherwise
/// (`--delivered-timeout`).
pub const DEFAULT_DELIVERED_TIMEOUT: Duration = Duration::from_secs(600);

/// What `send --wait-delivered` adds to its JSON line: the verified delivery notice's fields.
#[derive(Debug, Serialize)]
pub struct DeliverySummary {
    /// `delivered`, `partial` or `undeliverable`.
    pub outcome: &'static str,
    /// The transfer the notice names.
    pub transfer_id: String,
    /// The Merkle root it names, hex.
    pub merkle_root: String,
    /// The manifest digest it names, hex.
    pub manifest_digest: String,
    /// SHA-256 of the store's answer as the gateway recorded it, hex.
    pub answer_digest: String,
    /// The store's answer: where it went, or why the store refused it.
    pub answer: String,
    /// The gateway that signed the notice.
    pub gateway: String,
    /// When the gateway recorded the store's answer, ms since the Unix epoch.
    pub decided_unix_ms: u64,
    /// How many instances the record store refused.
    pub refused_total: u32,
    /// The refused instances (at most 1000), each with the store's reason.
    pub refused: Vec<baylink_net::proto::RefusedInstance>,
    /// Always `verified`: a notice that does not verify is refused, never reported.
    pub signature: &'static str,
}

impl DeliverySummary {
    /// The summary of a verified notice.
    pub fn of(n: &DeliveryNotice) -> DeliverySummary {
        DeliverySummary {
            outcome: n.outcome.as_str(),
            transfer_id: n.transfer_id.to_string(),
            merkle_root: hex::encode(n.merkle_root),
            manifest_digest: hex::encode(n.manifest_digest),
            answer_digest: hex::encode(n.answer_digest),
            answer: n.answer.clone(),
            gateway: n.gateway.clone(),
            decided_unix_ms: n.decided_unix_ms,
            refused_total: n.refused_total,
            refused: n.refused.clone(),
            signature: "verified",
        }
    }
}

/// What `send` reports on success: the JSON line of `docs/interface.md`.
#[derive(Debug, Serialize)]
pub struct SendSummary {
    /// The transfer id.
    pub transfer_id: String,
    /// Number of files.
    pub files: usize,
    /// Payload bytes.
    pub bytes: u64,
    /// Chunk payload bytes this invocation sent.
    pub wire_bytes: u64,
    /// Wall time of this invocation.
    pub seconds: f64,
    /// Merkle root over the chunk digests, hex.
    pub merkle_root: String,
    /// Always `verified`: an unverifiable receipt is an error, not a summary.
    pub receipt: &'static str,
    /// Seconds spent sealing (copying into the spool and hashing); included in `seconds`.
    pub seal_seconds: f64,
    /// Payload bytes the seal placed in the spool as copy-on-write clones of their sources
    /// instead of copying them (0 where the spool's file system cannot clone, and on a
    /// resume).
    pub cloned_bytes: u64,
    /// Seconds from the end of the seal to the verified receipt.
    pub transmit_seconds: f64,
    /// Payload bytes of the chunks streamed to the gateway while sealing (their streams
    /// read to the end by the gateway); 0 when nothing was streamed.
    pub streamed_bytes: u64,
    /// `--wait-delivered`: the verified delivery notice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySummary>,
    /// `--wait-delivered`: why there is no notice (the line printed on stderr; not in the
    /// JSON).
    #[serde(skip)]
    pub not_delivered: Option<String>,
}

/// Why `send` stopped without a verified receipt. Each displays as the one line printed on
/// stderr.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    /// The compliance checkpoint refused the declaration. Displays the logged reason (no
    /// patient id); [`SendFailure::answer`] is the line for the caller who declared it.
    #[error("refused: {} (rule {})", .0.reason, .0.rule)]
    Refused(Refusal),
    /// The HSM could not be used (fail closed).
    #[error("hsm: {0}")]
    Hsm(String),
    /// The gateway refused the transfer.
    #[error("gateway refused: {0}")]
    GatewayRefused(String),
    /// The gateway's receipt does not verify against the pinned key.
    #[error("receipt does not verify: {0}")]
    BadReceipt(String),
    /// The link stayed down for longer than `transport.retry_for`.
    #[error("link: gave up after {after}: {last}")]
    LinkGaveUp {
        /// How long it retried.
        after: String,
        /// The last error.
        last: String,
    },
    /// The edge service is stopping (the end of its drain): the send was cut off and the
    /// transfer, still sealed, resumes at the next start from the chunks the gateway holds.
    #[error("stopped: the edge is shutting down; the transfer resumes at the next start")]
    Stopped,
    /// `--wait-delivered`: no delivery notice in time, or the notice says the record store
    /// refused the transfer.
    #[error("not delivered: {0}")]
    NotDelivered(String),
    /// Anything else (bad input files, spool, configuration).
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl SendFailure {
    /// Process exit code for this failure (documented in `docs/interface.md`).
    pub fn exit_code(&self) -> i32 {
        match self {
            SendFailure::Refused(_) => 2,
            SendFailure::GatewayRefused(_) | SendFailure::BadReceipt(_) => 3,
            SendFailure::Hsm(_) => 4,
            SendFailure::LinkGaveUp { .. } => 5,
            SendFailure::NotDelivered(_) => 6,
            SendFailure::Stopped | SendFailure::Other(_) => 1,
        }
    }

    /// The line `send` prints for its caller: as [`Display`](std::fmt::Display), except that a
    /// refusal is worded as the caller is answered ([`Refusal::answer`]), naming the patient
    /// it declared. Logs use `Display`.
    pub fn answer(&self) -> String {
        match self {
            SendFailure::Refused(r) => format!("refused: {} (rule {})", r.answer(), r.rule),
            other => other.to_string(),
        }
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub enum SendRequest {
    /// A new transfer of these files under this declaration.
    New {
        /// Files to send.
        files: Vec<PathBuf>,
        /// The compliance declaration.
        declaration: Declaration,
    },
    /// Finish a sealed transfer from the spool. Its chunks are read back and checked against
    /// the manifest before they go out (the disk may have changed them since they were
    /// sealed, by another process or before a restart).
    Resume(TransferId),
    /// Send a transfer this process sealed moments ago from bytes it hashed on their way into
    /// the spool (a hospital commit): like `Resume`, but chunks are not read back and hashed
    /// a second time before their first send (a re-sent chunk is still checked).
    SealedHere(TransferId),
}

/// The edge's long-lived parts: HSM keys, spool thread, QUIC endpoint.
#[derive(Debug, Clone)]
pub struct Edge {
    cfg: Arc<Config>,
    /// What seals manifests and checks receipts and notices: the HSM [`Keys`] below, except
    /// in unit tests.
    keys: Arc<dyn Sign>,
    /// The HSM keys (the health probe's signature, the token of a TLS reload); `None` only
    /// for an edge of the unit tests.
    hsm: Option<Keys>,
    /// `tls.cert` and `tls.key` as last loaded (at start or by a SIGHUP reload).
    identity: Swap<TlsIdentity>,
    /// What new connections to the gateway handshake with (replaced by a SIGHUP reload).
    client: Swap<quinn::ClientConfig>,
    spool: Spool,
    endpoint: quinn::Endpoint,
    policy: SharedPolicy,
    audit: audit::Log,
    /// Sends in progress (and queued by the hospital doors), for the service's drain.
    sending: crate::drain::Activity,
    /// Set at the end of the service's drain: sends stop and new ones do not start.
    stop: crate::drain::Flag,
}

fn hsm_failure(e: anyhow::Error) -> SendFailure {
    if e.chain()
        .any(|c| c.downcast_ref::<baylink_hsm::HsmError>().is_some())
    {
        SendFailure::Hsm(format!("{e:#}"))
    } else {
        SendFailure::Other(e)
    }
}

/// What [`Edge::start`] and the unit tests' edge open differently; the rest is built alike.
struct Parts {
    keys: Arc<dyn Sign>,
    hsm: Option<Keys>,
    identity: TlsIdentity,
    spool: Spool,
    policy: SharedPolicy,
    audit: audit::Log,
}

impl Edge {
    /// Opens the HSM (fail closed), starts the spool thread and binds the QUIC endpoint.
    pub async fn start(cfg: Arc<Config>) -> Result<Edge, SendFailure> {
        let policy = SharedPolicy::new(Policy::load(&cfg.policy).map_err(anyhow::Error::from)?);
        let c = cfg.clone();
        let keys = tokio::task::spawn_blocking(move || Keys::open(&c))
            .await
            .map_err(anyhow::Error::from)?
            .map_err(hsm_failure)?;
        // audit: the log is opened (and a torn tail repaired) before anything is sent.
        let (settings, signer) = (cfg.audit_log_settings(), keys.signer.clone());
        let audit = tokio::task::spawn_blocking(move || audit::Log::open(&settings, signer))
            .await
            .map_err(anyhow::Error::from)?
            .map_err(anyhow::Error::from)?;
        let spool = Spool::start(SpoolConfig::default()).map_err(anyhow::Error::from)?;
        let (c, token) = (cfg.clone(), keys.token.clone());
        let identity = tokio::task::spawn_blocking(move || crate::keys::tls_identity(&c, &token))
            .await
            .map_err(anyhow::Error::from)?
            .map_err(hsm_failure)?;
        let connect = cfg
            .transport
            .connect
            .context("transport.connect is not set")?;
        let bind: SocketAddr = if connect.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let parts = Parts {
            keys: Arc::new(keys.clone()),
            hsm: Some(keys),
            identity,
            spool,
            policy,
            audit,
        };
        Ok(Edge::from_parts(cfg, parts, bind)?)
    }

    /// The edge made of `parts`: its QUIC endpoint bound on `bind` and its client
    /// configuration, both from `tls.ca`, the identity and `[link]`.
    fn from_parts(cfg: Arc<Config>, parts: Parts, bind: SocketAddr) -> anyhow::Result<Edge> {
        let ca = transport::load_ca(&cfg.tls.ca)?;
        let endpoint = transport::client_endpoint(bind, &ca, &parts.identity, &cfg.link)?;
        let client = Swap::new(transport::client_config(&ca, &parts.identity, &cfg.link)?);
        Ok(Edge {
            cfg,
            keys: parts.keys,
            hsm: parts.hsm,
            identity: Swap::new(parts.identity),
            client,
            spool: parts.spool,
            endpoint,
            policy: parts.policy,
            audit: parts.audit,
            sending: crate::drain::Activity::default(),
            stop: crate::drain::Flag::default(),
        })
    }

    /// An edge for unit tests (`crate::test_support`): `keys` in software, the given log and
    /// spool, and a QUIC endpoint bound to loopback that nothing connects through unless a
    /// test sends. `tls.key` must be a PEM file.
    #[cfg(test)]
    pub(crate) fn for_tests(
        cfg: Arc<Config>,
        keys: Arc<dyn Sign>,
        audit: audit::Log,
        spool: Spool,
    ) -> anyhow::Result<Edge> {
        let policy = SharedPolicy::new(Policy::load(&cfg.policy)?);
        let crate::config::TlsKeySource::File(key) = &cfg.tls.key else {
            anyhow::bail!("a test edge takes its TLS key from a file");
        };
        let identity = TlsIdentity::from_pem_files(&cfg.tls.cert, key)?;
        let parts = Parts {
            keys,
            hsm: None,
            identity,
            spool,
            policy,
            audit,
        };
        Edge::from_parts(cfg, parts, "127.0.0.1:0".parse()?)
    }

    /// Sends in progress or queued: [`Edge::send`] counts itself, the hospital doors' queue
    /// counts what waits for its turn.
    pub fn sending(&self) -> &crate::drain::Activity {
        &self.sending
    }

    /// Stops every send (end of the service's drain): a send on the link returns
    /// [`SendFailure::Stopped`] at once, leaving its transfer sealed with the gateway
    /// holding what it verified (it checkpoints when the connection closes), and no new send
    /// starts. Call [`Edge::close_link`] afterwards.
    pub fn stop_sending(&self) {
        self.stop.set();
    }

    /// Whether [`Edge::stop_sending`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_set()
    }

    /// The edge's audit log.
    pub fn audit(&self) -> &audit::Log {
        &self.audit
    }

    /// The spool thread (for callers that seal or read on their own).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The compliance policy loaded at start (the hospital API checks declarations with it).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.current()
    }

    /// The shared policy, for doors that check on their own and for reloads.
    pub fn shared_policy(&self) -> &SharedPolicy {
        &self.policy
    }

    /// The keys the hospital API seals with (the HSM's, outside unit tests).
    pub fn keys(&self) -> &dyn Sign {
        &*self.keys
    }

    /// The HSM keys, for what needs the token itself (the health probe, a TLS reload).
    /// Always there for an edge built by [`Edge::start`].
    pub fn hsm_keys(&self) -> Option<&Keys> {
        self.hsm.as_ref()
    }

    /// This appliance's TLS identity (`tls.cert` and `tls.key`) in force, for the hospital
    /// API too.
    pub fn tls_identity(&self) -> Arc<TlsIdentity> {
        self.identity.current()
    }

    /// The QUIC client configuration for `loaded` (step one of a TLS reload: fails without
    /// changing anything).
    pub fn link_tls_config(
        &self,
        loaded: &crate::tls_reload::Loaded,
    ) -> anyhow::Result<quinn::ClientConfig> {
        Ok(transport::client_config(
            &loaded.ca,
            &loaded.identity,
            &self.cfg.link,
        )?)
    }

    /// Puts a reloaded identity and its client configuration in force: connections opened
    /// from now on use them; those open keep theirs.
    pub fn replace_tls(&self, identity: TlsIdentity, client: quinn::ClientConfig) {
        self.client.replace(client);
        self.identity.replace(identity);
    }

    /// Opens a connection to the gateway with the client configuration in force.
    fn connect_link(&self, addr: SocketAddr) -> Result<quinn::Connecting, quinn::ConnectError> {
        let config = quinn::ClientConfig::clone(&self.client.current());
        self.endpoint
            .connect_with(config, addr, &self.cfg.transport.server_name)
    }

    /// The configuration the edge runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Runs one `send` to completion: check, seal (new transfers), send with retries, verify
    /// the receipt.
    pub async fn send(
        &self,
        request: SendRequest,
        observer: &dyn SendObserver,
        stats: &Arc<SendStats>,
    ) -> Result<SendSummary, SendFailure> {
        self.send_until(
            request,
            None,
            observer,
            stats,
            &crate::drain::Flag::default(),
        )
        .await
    }

    /// [`Edge::send`] that also stops when `yield_slot` is set (the background sender asks a
    /// transfer to give its send slot up): like the drain's stop, the send on the link
    /// returns [`SendFailure::Stopped`] with the transfer still sealed and the gateway
    /// holding what it verified, so sending it again resumes from there. Only this send
    /// stops; a send past its last chunk (verifying and storing the receipt) finishes.
    /// `early`: the connection a sealed transfer's chunks were streamed on before its seal
    /// (`crate::link::early`), or its hand-over; the first attempt offers on it. The
    /// hand-over (its chunk streams ending) is waited for like the link itself: the drain and
    /// `yield_slot` stop it.
    pub async fn send_until(
        &self,
        request: SendRequest,
        early: Option<crate::link::early::Early>,
        observer: &dyn SendObserver,
        stats: &Arc<SendStats>,
        yield_slot: &crate::drain::Flag,
    ) -> Result<SendSummary, SendFailure> {
        let started = Instant::now();
        if self.stop.is_set() || yield_slot.is_set() {
            return Err(SendFailure::Stopped);
        }
        let _busy = self.sending.enter();
        if let Some(reason) = self.witness_refusal() {
            return Err(SendFailure::Other(anyhow::anyhow!(
                "sending is stopped: the gateway's witness refused this edge's audit log \
                 ({reason}); check it with `baylink audit verify` (docs/audit.md, \
                 \"Rewind protection\")"
            )));
        }
        let (id, declaration) = match &request {
            SendRequest::New { declaration, .. } => (TransferId::new_v7(), declaration.clone()),
            SendRequest::Resume(id) | SendRequest::SealedHere(id) => {
                let dir = TransferDir::new(&self.cfg.spool_dir, id);
                (*id, seal::load_declaration(&dir)?)
            }
        };
        // `send` reads local files as they are: a purpose that must be de-identified goes
        // through the hospital doors (which de-identify before sealing), never around them.
        if matches!(request, SendRequest::New { .. })
            && self
                .cfg
                .policy
                .deidentify_purposes
                .contains(&declaration.purpose)
        {
            // The purpose is one of `policy.deidentify_purposes`: a configured value.
            let refusal = Refusal::new(
                crate::dicom::deid::RULE_DEID_UNSUPPORTED,
                format!(
                    "purpose {} is de-identified, which only the hospital API, STOW-RS and \
                     C-STORE do; `baylink send` does not",
                    declaration.purpose
                ),
            );
            self.audit
                .append(Event {
                    rule: Some(crate::dicom::deid::RULE_DEID_UNSUPPORTED.to_owned()),
                    ..Event::declared(Kind::Refused, Some(id.to_string()), &declaration)
                })
                .await
                .map_err(|e| SendFailure::Other(e.into()))?;
            return Err(SendFailure::Refused(refusal));
        }
        // The checkpoint runs again on resume: a consent withdrawn since sealing stops the send.
        let consent_ref = match self.check_policy(&request, &declaration) {
            Decision::Refuse(r) => {
                metrics::counter!("baylink_transfers_total", "stage" => "declared", "outcome" => "refused").increment(1);
                // audit: the refusal is recorded before it is reported.
                self.audit
                    .append(Event {
                        rule: Some(r.rule.to_owned()),
                        ..Event::declared(Kind::Refused, Some(id.to_string()), &declaration)
                    })
                    .await
                    .map_err(|e| SendFailure::Other(e.into()))?;
                return Err(SendFailure::Refused(r));
            }
            Decision::Allow { consent_ref } => consent_ref,
        };
        // The declaration sealed is the one allowed: it names the consent that allowed it
        // (the manifest's process id). A resumed transfer's stored declaration already names
        // it, and the checkpoint above then allows it under that consent only.
        let declaration = Declaration {
            consent_ref: Some(consent_ref),
            ..declaration
        };
        let request = match request {
            SendRequest::New { files, .. } => SendRequest::New {
                files,
                declaration: declaration.clone(),
            },
            other => other,
        };
        // audit: `declared` is durable before the transfer id is announced.
        let declared = Event::declared(Kind::Declared, Some(id.to_string()), &declaration);
        if matches!(request, SendRequest::New { .. }) {
            self.audit
                .append(declared.clone())
                .await
                .map_err(|e| SendFailure::Other(e.into()))?;
        }
        eprintln!("transfer {id}");
        let result = self
            .send_declared(
                id, request, early, observer, stats, started, &declared, yield_slot,
            )
            .await;
        if result.is_err() {
            observer.finished(false);
        }
        if let Err(e) = &result
            && !matches!(e, SendFailure::Stopped)
        {
            // audit: a failure after `declared` is recorded (best effort: the error is
            // reported either way). A send stopped by the drain has not failed: it resumes.
            let failed = Event {
                detail: Some(e.to_string()),
                ..declared.clone_as(Kind::Failed)
            };
            if let Err(ae) = self.audit.append(failed).await {
                warn!(transfer = %id, error = %ae, "cannot record the failure in the audit log");
            }
        }
        result
    }

    /// The compliance checkpoint for `send`: the declaration, then (new transfers, before
    /// sealing) the policy's size limits over the files named.
    fn check_policy(&self, request: &SendRequest, declaration: &Declaration) -> Decision {
        let policy = self.policy.current();
        let decision = policy.check(declaration, SystemTime::now());
        if let (Decision::Allow { .. }, SendRequest::New { files, .. }) = (&decision, request) {
            // A file that cannot be read counts as empty here; sealing names it.
            let bytes = files
                .iter()
                .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
                .fold(0u64, u64::saturating_add);
            if let Err(r) = policy.check_size(files.len() as u64, bytes) {
                return Decision::Refuse(r);
            }
        }
        decision
    }

    #[allow(clippy::too_many_arguments)] // the request and its link, its reporting, two stops
    async fn send_declared(
        &self,
        id: TransferId,
        request: SendRequest,
        mut early: Option<crate::link::early::Early>,
        observer: &dyn SendObserver,
        stats: &Arc<SendStats>,
        started: Instant,
        declared: &Event,
        yield_slot: &crate::drain::Flag,
    ) -> Result<SendSummary, SendFailure> {
        let dir = TransferDir::new(&self.cfg.spool_dir, &id);
        let progress = Observed {
            observer,
            cloned_bytes: AtomicU64::new(0),
        };

        let out = match &request {
            SendRequest::New { files, declaration } => {
                transfer_dir::create_dir_durably(dir.root())
                    .with_context(|| format!("cannot create {}", dir.root().display()))?;
                let _lock = lock_transfer(&dir)?;
                // One stat per file serves the progress total and the announced layout.
                let sizes: Vec<Option<u64>> = files
                    .iter()
                    .map(|f| std::fs::metadata(f).map(|m| m.len()).ok())
                    .collect();
                observer.stage("sealing", sizes.iter().flatten().sum());
                // Chunks go to the gateway as the seal hashes them (`link::early`).
                let announcer = self.announcer(id, &sizes, stats);
                let job = seal::SealJob {
                    id,
                    sender: &self.cfg.id,
                    declaration,
                    files,
                    chunk_size: self.cfg.transport.chunk_size,
                    tap: announcer.as_ref().map(|a| a as &dyn seal::ChunkTap),
                };
                let sealing =
                    seal::seal_files(&self.spool, &dir, &job, &*self.keys, &self.audit, &progress);
                let sealed = match &announcer {
                    Some(a) => {
                        // Dialling never holds the seal up: a gateway that does not answer
                        // before the seal ends is dialled again by the send.
                        let announce = async {
                            let _ = self.announce(a).await;
                            std::future::pending::<()>().await;
                        };
                        tokio::select! {
                            sealed = sealing => sealed,
                            () = announce => unreachable!("announce never ends"),
                        }
                    }
                    None => sealing.await,
                }
                .map_err(hsm_failure)?;
                if let Some(a) = &announcer {
                    early = a.finish().await.map(crate::link::early::Early::Link);
                }
                (sealed, _lock)
            }
            SendRequest::Resume(_) | SendRequest::SealedHere(_) => {
                let lock = lock_transfer(&dir)?;
                if seal::finish_interrupted_seal(&dir, &self.audit).await? {
                    info!(transfer = %id, "finished a seal a stop had interrupted");
                }
                let check_at_rest = matches!(request, SendRequest::Resume(_));
                (
                    seal::load_sealed(&self.spool, &dir, check_at_rest).await?,
                    lock,
                )
            }
        };
        let (out, _lock) = out;
        if declared.consent_ref.as_deref() != Some(out.manifest.process_id.as_str()) {
            return Err(SendFailure::Other(anyhow::anyhow!(
                "the sealed manifest names consent {:?} but the checkpoint allowed {:?}; \
                 declare the transfer again",
                out.manifest.process_id,
                declared.consent_ref
            )));
        }
        // audit: `sealed` was made durable by the seal itself, before `manifest.bin`
        // (`seal::sign_and_write_manifest`): a transfer loaded here is one the log shows.
        let seal_seconds = started.elapsed().as_secs_f64();

        let transmit_started = Instant::now();
        // What was streamed before the offer, once the early link is at hand (`transmit`).
        let streamed_bytes = AtomicU64::new(0);
        let (receipt, wire_bytes) = if dir.has_receipt() {
            // Already confirmed by an earlier run: verify what is stored and report.
            let receipt =
                std::fs::read(dir.receipt_bin()).context("cannot read the stored receipt")?;
            let sig = std::fs::read(dir.receipt_sig()).context("cannot read the stored receipt")?;
            (
                Delivered {
                    receipt: receipt.into(),
                    signature: sig.into(),
                },
                0,
            )
        } else {
            observer.stage("sending", out.manifest.total_bytes());
            // The drain's end stops the send between or in the middle of chunks: what the
            // gateway verified it makes durable when the connection closes, so the next start
            // resumes from there.
            let d = tokio::select! {
                d = self.transmit(&out, &progress, stats, early, &streamed_bytes) => d?,
                () = self.stop.wait() => {
                    info!(transfer = %id, "send stopped by the drain; it resumes at the next start");
                    return Err(SendFailure::Stopped);
                }
                () = yield_slot.wait() => {
                    info!(transfer = %id, "send yields its slot; it resumes when it gets one again");
                    return Err(SendFailure::Stopped);
                }
            };
            // audit: every chunk is at the gateway and its receipt came back.
            self.audit
                .append(Event {
                    merkle_root: Some(out.manifest.merkle_root),
                    manifest_digest: Some(out.manifest.digest()),
                    ..declared.clone_as(Kind::Sent)
                })
                .await
                .map_err(|e| SendFailure::Other(e.into()))?;
            failpoint::hit(failpoint::SEND_AFTER_SENT);
            (d, stats.wire_bytes())
        };
        self.verify_receipt(&out, &receipt)?;
        // audit: `receipted` is durable before the receipt is stored (which ends the
        // transfer's sending and lets `spool.retain` prune it) and before success is reported.
        self.audit
            .append(Event {
                merkle_root: Some(out.manifest.merkle_root),
                manifest_digest: Some(out.manifest.digest()),
                ..declared.clone_as(Kind::Receipted)
            })
            .await
            .map_err(|e| SendFailure::Other(e.into()))?;
        failpoint::hit(failpoint::SEND_AFTER_RECEIPTED);
        if !dir.has_receipt() {
            let (dir2, r, s) = (
                dir.clone(),
                receipt.receipt.clone(),
                receipt.signature.clone(),
            );
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                write_atomic(&dir2.receipt_bin(), &r)?;
                write_atomic(&dir2.receipt_sig(), &s)
            })
            .await
            .map_err(anyhow::Error::from)?
            .context("cannot store the receipt")?;
        }
        observer.finished(true);
        stats
            .hsm_wait_us
            .store(self.keys.waited_us(), Ordering::Relaxed);
        metrics::counter!("baylink_transfers_total", "stage" => "receipted", "outcome" => "ok")
            .increment(1);
        info!(transfer = %id, bytes = out.manifest.total_bytes(), wire_bytes, "receipt verified");
        Ok(SendSummary {
            transfer_id: id.to_string(),
            files: out.manifest.files.len(),
            bytes: out.manifest.total_bytes(),
            wire_bytes,
            seconds: started.elapsed().as_secs_f64(),
            merkle_root: hex::encode(out.manifest.merkle_root),
            receipt: "verified",
            seal_seconds,
            cloned_bytes: progress.cloned_bytes.load(Ordering::Relaxed),
            transmit_seconds: transmit_started.elapsed().as_secs_f64(),
            streamed_bytes: streamed_bytes.load(Ordering::Relaxed),
            delivery: None,
            not_delivered: None,
        })
    }

    /// Connects and sends until the receipt arrives, retrying a lost link with backoff for
    /// `transport.retry_for`.
    /// An announcer for a new transfer of files of `sizes` (`None`: a file that cannot be
    /// read), when the edge has a gateway to dial and every file is readable and fits the
    /// protocol's limits (the seal names what does not).
    fn announcer(
        &self,
        id: TransferId,
        sizes: &[Option<u64>],
        stats: &Arc<SendStats>,
    ) -> Option<crate::link::early::Announcer> {
        self.cfg.transport.connect?;
        if !self.cfg.transport.stream_while_sealing {
            return None;
        }
        let sizes = sizes.iter().copied().collect::<Option<Vec<_>>>()?;
        let layout = baylink_net::proto::Layout::new(
            self.cfg.transport.chunk_size,
            sizes,
            &baylink_net::proto::Limits::default(),
        )
        .ok()?;
        Some(crate::link::early::Announcer::new(
            id,
            layout,
            stats.clone(),
        ))
    }

    /// Dials the gateway and announces `a`'s transfer; a failure only means nothing is
    /// streamed (logged, and `false`).
    pub(crate) async fn announce(&self, a: &crate::link::early::Announcer) -> bool {
        let Some(connect) = self.cfg.transport.connect else {
            return false;
        };
        let res = async {
            let conn = self
                .connect_link(connect)
                .map_err(|e| crate::link::LinkError::Lost(e.to_string()))?
                .await?;
            crate::telemetry::watch_connection(
                conn.clone(),
                self.cfg.transport.server_name.clone(),
            );
            a.connect(conn, &self.cfg.id).await
        }
        .await;
        match res {
            Ok(()) => true,
            Err(e) => {
                info!(error = %e, "cannot announce the transfer; its chunks are sent once it is sealed");
                false
            }
        }
    }

    async fn transmit(
        &self,
        out: &Outgoing,
        progress: &Observed<'_>,
        stats: &Arc<SendStats>,
        mut early: Option<crate::link::early::Early>,
        streamed_bytes: &AtomicU64,
    ) -> Result<Delivered, SendFailure> {
        let connect = self
            .cfg
            .transport
            .connect
            .context("transport.connect is not set")?;
        let retry_for = self.cfg.transport.retry_for;
        let mut backoff = Duration::from_millis(200);
        let mut lost_since: Option<Instant> = None;
        loop {
            let sent_before = stats.wire_bytes();
            let announced = match early.take() {
                Some(e) => e.link().await,
                None => None,
            };
            if let Some(e) = &announced {
                let bytes = e
                    .streamed
                    .iter()
                    .filter_map(|i| out.manifest.chunk(*i))
                    .map(|c| u64::from(c.len))
                    .sum();
                streamed_bytes.store(bytes, Ordering::Relaxed);
            }
            let attempt = async {
                let cfg = SenderConfig {
                    max_in_flight: self.cfg.transport.max_in_flight,
                    ..SenderConfig::default()
                };
                let (conn, res) = if let Some(e) = announced {
                    // The first attempt goes on where the seal's announcement left off.
                    progress.observer.attempt();
                    let control = (e.writer, e.frames);
                    let res = send::run_on(
                        &e.conn,
                        control,
                        &e.streamed,
                        &self.spool,
                        out,
                        cfg,
                        progress,
                        stats,
                    )
                    .await;
                    (e.conn, res)
                } else {
                    let conn = self
                        .connect_link(connect)
                        .map_err(|e| SendError::Link(crate::link::LinkError::Lost(e.to_string())))?
                        .await
                        .map_err(|e| SendError::Link(e.into()))?;
                    crate::telemetry::watch_connection(
                        conn.clone(),
                        self.cfg.transport.server_name.clone(),
                    );
                    progress.observer.attempt();
                    let res =
                        send::run(&conn, &self.spool, out, cfg, &self.cfg.id, progress, stats)
                            .await;
                    (conn, res)
                };
                stats.add_connection(&conn);
                if let Err(SendError::Link(_)) = &res
                    && let Some(text) = conn.close_reason().as_ref().and_then(tls_refusal)
                {
                    return Err(SendError::Refused(text));
                }
                match &res {
                    Ok(_) => conn.close(crate::link::CLOSE_OK.into(), b"done"),
                    Err(_) => conn.close(crate::link::CLOSE_PROTOCOL.into(), b"send failed"),
                }
                res
            };
            match attempt.await {
                Ok(d) => {
                    metrics::counter!("baylink_bytes_total", "direction" => "sent")
                        .increment(stats.wire_bytes());
                    crate::telemetry::stage_bytes("sent", stats.wire_bytes());
                    return Ok(d);
                }
                Err(SendError::Refused(text)) => {
                    return Err(SendFailure::GatewayRefused(text));
                }
                Err(SendError::Spool(text)) => {
                    return Err(SendFailure::Other(anyhow::anyhow!("edge spool: {text}")));
                }
                Err(SendError::Link(e)) => {
                    if stats.wire_bytes() > sent_before {
                        // That connection made progress: the retry window starts afresh.
                        lost_since = None;
                        backoff = Duration::from_millis(200);
                    }
                    let since = *lost_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= retry_for {
                        return Err(SendFailure::LinkGaveUp {
                            after: humantime::format_duration(retry_for).to_string(),
                            last: e.to_string(),
                        });
                    }
                    warn!(error = %e, retry_in = ?backoff, "link lost; will resume");
                    progress.observer.link_lost(&e.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn verify_receipt(&self, out: &Outgoing, d: &Delivered) -> Result<(), SendFailure> {
        let bad = |why: &str| SendFailure::BadReceipt(why.to_owned());
        if !verify_peer(&*self.keys, RECEIPT_CONTEXT, &d.receipt, &d.signature) {
            return Err(bad(
                "signature does not verify against the pinned gateway key",
            ));
        }
        let r = Receipt::from_bytes(&d.receipt).map_err(|e| bad(&e.to_string()))?;
        if r.transfer_id != out.manifest.transfer_id {
            return Err(bad("it names another transfer"));
        }
        if r.merkle_root != out.manifest.merkle_root {
            return Err(bad("its Merkle root differs from the manifest's"));
        }
        if r.manifest_digest != out.manifest.digest() {
            return Err(bad("it confirms a different manifest"));
        }
        if r.process_id != out.manifest.process_id {
            return Err(bad("it names another process id (consent reference)"));
        }
        Ok(())
    }

    /// Closes the QUIC endpoint and waits (at most [`LINK_CLOSE_TIMEOUT`]) until every
    /// connection's close frame has gone out. Call before the process exits: a connection
    /// that vanishes without one stays open on the gateway until its idle timeout, holding
    /// its transfer, and a draining gateway waits for it.
    pub async fn close_link(&self) {
        self.endpoint
            .close(crate::link::CLOSE_OK.into(), b"edge stopping");
        if tokio::time::timeout(LINK_CLOSE_TIMEOUT, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            warn!("connections to the gateway did not close in time");
        }
    }

    /// audit: [`Edge::witness`] within [`WITNESS_TIMEOUT`]. A refusal by the witness stops
    /// this edge's sending ([`Edge::witness_refusal`]) and is logged as an error; a link that
    /// is down or slow is only a warning (the next request proves consistency from the last
    /// cosigned checkpoint, so nothing is lost).
    pub async fn witness_bounded(&self) {
        match tokio::time::timeout(WITNESS_TIMEOUT, self.witness()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => match e.downcast_ref::<WitnessRefused>() {
                Some(refused) => {
                    // The refusal is recorded (the file `/healthz` and every send look at)
                    // before it is reported.
                    let reason = refused.to_string();
                    let (log, why) = (self.audit.clone(), reason.clone());
                    let stored = tokio::task::spawn_blocking(move || {
                        audit::witness::set_refused(&log, &why)
                    })
                    .await;
                    match stored {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => error!(error = %e, "cannot record the witness refusal"),
                        Err(e) => error!(error = %e, "cannot record the witness refusal"),
                    }
                    metrics::gauge!("baylink_audit_witness_refused").set(1.0);
                    error!(
                        error = %reason,
                        "audit checkpoint not witnessed: the gateway's witness refused this \
                         edge's audit log; sending is stopped"
                    );
                }
                None => warn!(error = %format!("{e:#}"), "audit checkpoint not witnessed"),
            },
            Err(_) => warn!("audit checkpoint not witnessed: the gateway did not answer in time"),
        }
    }

    /// Why the gateway's witness refused this edge's audit log, if it did and has not
    /// cosigned it since: the edge sends nothing meanwhile, and `/healthz` answers 503.
    pub fn witness_refusal(&self) -> Option<String> {
        audit::witness::refused(self.audit.dir())
    }

    /// audit: asks the gateway to witness the latest audit checkpoint (if it is not
    /// cosigned yet) and stores the cosignature. Returns the tree size cosigned.
    pub async fn witness(&self) -> anyhow::Result<Option<u64>> {
        let log = self.audit.clone();
        let Some((checkpoint, old_size, proof)) =
            tokio::task::spawn_blocking(move || audit::witness::request(&log)).await??
        else {
            return Ok(None);
        };
        let connect = self
            .cfg
            .transport
            .connect
            .context("transport.connect is not set")?;
        let conn = self
            .connect_link(connect)?
            .await
            .context("witness: cannot connect to the gateway")?;
        // The request, then its answer: the exchange is `proto::WitnessAsker`'s.
        let mut asker = WitnessAsker::new(checkpoint.clone(), old_size, proof);
        let (send, recv) = conn.open_bi().await?;
        let mut writer = crate::link::FrameWriter::new(send);
        let mut frames =
            crate::link::spawn_frame_reader(recv, baylink_net::proto::Limits::default());
        while let Some(WitnessAskerAction::SendFrame(frame)) = asker.poll_action() {
            writer.send(&frame).await?;
        }
        let reply = frames.recv().await;
        writer.finish();
        conn.close(crate::link::CLOSE_OK.into(), b"witnessed");
        match reply {
            Some(Ok(frame)) => {
                let _ = asker.handle_frame(frame);
            }
            Some(Err(e)) => return Err(anyhow::anyhow!("witness: {e}")),
            None => anyhow::bail!("witness: the gateway closed the stream"),
        }
        let signature = match asker.poll_action() {
            Some(WitnessAskerAction::Cosigned { signature }) => signature,
            Some(WitnessAskerAction::Refused { code, text }) => {
                return Err(WitnessRefused { code, text }.into());
            }
            Some(WitnessAskerAction::Failed(ProtoError::Peer { code, text })) => {
                anyhow::bail!("the gateway could not witness: {code}: {text}")
            }
            Some(WitnessAskerAction::Failed(e)) => anyhow::bail!("witness: {e}"),
            Some(WitnessAskerAction::SendFrame(_)) | None => {
                anyhow::bail!("witness: the answer left no outcome")
            }
        };
        let (log, peer) = (self.audit.clone(), self.keys.peer().clone());
        let cp = checkpoint.clone();
        tokio::task::spawn_blocking(move || audit::witness::store(&log, &cp, &signature, &peer))
            .await??;
        metrics::gauge!("baylink_audit_witness_refused").set(0.0);
        let size = audit::note::split_note(&checkpoint)
            .and_then(|(body, _)| audit::note::Checkpoint::parse_body(body))
            .map(|c| c.size)
            .ok();
        info!(size, "audit checkpoint cosigned by the gateway");
        Ok(size)
    }

    /// Finishes every seal in the spool that a stop interrupted between staging the
    /// manifest and putting it in place ([`seal::finish_interrupted_seal`]): run at start-up,
    /// before the spool is scanned for sealed transfers. A transfer another process holds
    /// the lock of is left to it. Returns the ids finished.
    pub async fn finish_interrupted_seals(&self) -> Vec<TransferId> {
        let staged = transfer_dir::list(&self.cfg.spool_dir, |d| {
            d.manifest_pending().exists() && !d.manifest_bin().exists()
        });
        let mut done = Vec::new();
        for id in staged {
            let dir = TransferDir::new(&self.cfg.spool_dir, &id);
            let _lock = match lock_transfer(&dir) {
                Ok(l) => l,
                Err(e) => {
                    warn!(transfer = %id, error = %format!("{e:#}"), "staged manifest left alone");
                    continue;
                }
            };
            match seal::finish_interrupted_seal(&dir, &self.audit).await {
                Ok(true) => {
                    info!(transfer = %id, "finished a seal a stop had interrupted");
                    done.push(id);
                }
                Ok(false) => {}
                Err(e) => {
                    error!(transfer = %id, error = %format!("{e:#}"), "cannot finish an interrupted seal; the transfer is not sent");
                }
            }
        }
        done
    }

    /// Collects delivery notices on `conn` (a `Notices` stream): each one is verified and
    /// stored ([`crate::notice::accept`]), `on_notice` is told, and the gateway gets its
    /// acknowledgement. A notice that does not verify is logged and refused (neither stored
    /// nor acknowledged). Returns the notice of `until` once it is stored, or runs until the
    /// stream ends (an error) when `until` is `None`.
    pub async fn collect_notices(
        &self,
        conn: &quinn::Connection,
        until: Option<TransferId>,
        on_notice: &(dyn Fn(&DeliveryNotice) + Send + Sync),
    ) -> anyhow::Result<DeliveryNotice> {
        let (send, recv) = conn.open_bi().await?;
        let mut writer = crate::link::FrameWriter::new(send);
        let mut frames =
            crate::link::spawn_frame_reader(recv, baylink_net::proto::Limits::default());
        writer
            .send(&Frame::Notices {
                version: baylink_net::proto::NOTICES_VERSION,
            })
            .await?;
        loop {
            let (notice, signature) = match frames.recv().await {
                Some(Ok(Frame::Notice { notice, signature })) => (notice, signature),
                Some(Ok(Frame::Error { code, text })) => {
                    anyhow::bail!("the gateway ended the notice stream: {code}: {text}")
                }
                Some(Ok(other)) => {
                    anyhow::bail!("unexpected {} frame on the notice stream", other.kind())
                }
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the notice stream ended"),
            };
            let (keys, spool_dir, audit) = (
                self.keys.clone(),
                self.cfg.spool_dir.clone(),
                self.audit.clone(),
            );
            let accepted = tokio::task::spawn_blocking(move || {
                crate::notice::accept(&*keys, &spool_dir, &audit, &notice, &signature)
            })
            .await?;
            let received = match accepted {
                Ok(r) => r,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "delivery notice refused: not recorded, not acknowledged");
                    metrics::counter!("baylink_delivery_notices_total", "event" => "refused")
                        .increment(1);
                    continue;
                }
            };
            let n = &received.notice;
            if received.new {
                info!(transfer = %n.transfer_id, outcome = n.outcome.as_str(), "delivery notice verified and recorded");
                metrics::counter!("baylink_delivery_notices_total", "event" => "recorded")
                    .increment(1);
            }
            on_notice(n);
            writer
                .send(&Frame::NoticeAck {
                    transfer_id: n.transfer_id,
                })
                .await?;
            if until == Some(n.transfer_id) {
                // Our side ends; the gateway ends its side once it has taken the
                // acknowledgement in (closing the connection sooner could lose it).
                writer.finish();
                let _ = tokio::time::timeout(NOTICE_ACK_TIMEOUT, async {
                    while let Some(Ok(_)) = frames.recv().await {}
                })
                .await;
                return Ok(received.notice);
            }
        }
    }

    /// `serve`: keeps a connection to the gateway open to collect delivery notices as they
    /// are signed (and those queued while the edge was away, at once on connecting);
    /// reconnects with backoff (1 s doubling to 30 s) when the link drops. Runs until the
    /// task is dropped.
    pub async fn serve_notices(&self, on_notice: &(dyn Fn(&DeliveryNotice) + Send + Sync)) {
        let Some(connect) = self.cfg.transport.connect else {
            return;
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            let res = async {
                let conn = self.connect_link(connect)?.await?;
                let res = self.collect_notices(&conn, None, on_notice).await;
                conn.close(crate::link::CLOSE_OK.into(), b"notices");
                res
            }
            .await;
            if let Err(e) = res {
                tracing::debug!(error = %format!("{e:#}"), "notice stream ended; reconnecting");
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// `send --wait-delivered`: the verified delivery notice of `id`, from the spool if it is
    /// already stored, else collected on a connection of its own (retried while the link is
    /// down) within `timeout`.
    pub async fn wait_delivered(
        &self,
        id: TransferId,
        timeout: Duration,
    ) -> Result<DeliveryNotice, SendFailure> {
        let dir = TransferDir::new(&self.cfg.spool_dir, &id);
        let deadline = Instant::now() + timeout;
        let connect = self
            .cfg
            .transport
            .connect
            .context("transport.connect is not set")?;
        let mut backoff = Duration::from_millis(200);
        loop {
            if let Some(n) = crate::notice::stored(&dir) {
                return Ok(n);
            }
            let attempt = async {
                let conn = self.connect_link(connect)?.await?;
                let res = self.collect_notices(&conn, Some(id), &|_| {}).await;
                conn.close(crate::link::CLOSE_OK.into(), b"notice received");
                res
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) => {
                    warn!(error = %format!("{e:#}"), retry_in = ?backoff, "waiting for the delivery notice: link lost");
                }
                Err(_) => {}
            }
            if Instant::now() + backoff >= deadline {
                return Err(SendFailure::NotDelivered(format!(
                    "no delivery notice within {} (--delivered-timeout)",
                    humantime::format_duration(timeout)
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Sealed transfers in the spool that have no receipt yet.
    pub fn pending(&self) -> Vec<TransferId> {
        transfer_dir::list(&self.cfg.spool_dir, |d| {
            d.manifest_bin().exists() && !d.has_receipt()
        })
    }
}

/// The gateway's witness refused the edge's checkpoint: it does not extend the one the
/// witness cosigned last (a rewound or forked log), or is not signed by the pinned key
/// (`proto::WitnessAskerAction::Refused`).
#[derive(Debug, thiserror::Error)]
#[error("the gateway refused to witness: {code}: {text}")]
pub struct WitnessRefused {
    /// The protocol error code.
    pub code: ErrorCode,
    /// The gateway's reason.
    pub text: String,
}

/// A connection the gateway closed with a TLS alert (QUIC crypto error 0x100–0x1ff) was
/// refused, not lost: retrying with the same certificate cannot help.
fn tls_refusal(reason: &quinn::ConnectionError) -> Option<String> {
    let (code, text) = match reason {
        quinn::ConnectionError::ConnectionClosed(c) => (u64::from(c.error_code), c.to_string()),
        quinn::ConnectionError::TransportError(e) => (u64::from(e.code), e.to_string()),
        _ => return None,
    };
    (0x100..=0x1ff)
        .contains(&code)
        .then(|| format!("TLS handshake refused: {text}"))
}

/// Takes the transfer's lock, or says who holds it.
fn lock_transfer(dir: &TransferDir) -> anyhow::Result<Flock<File>> {
    let path = dir.root().join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "transfer {} is being sent by another process ({e})",
            dir.root().display()
        )
    })
}

/// Observes one send's progress: `baylink send` draws a progress bar from it (the command
/// layer, [`crate::commands`]); the hospital doors and the service pass [`NoObserver`].
///
/// Bytes are counted per stage: a stage begins at 0 of `total`, and [`SendObserver::advanced`]
/// adds to it.
pub trait SendObserver: Send + Sync {
    /// A stage begins (`sealing`: copying into the spool; `sending`: on the link) over
    /// `total` payload bytes, counted from 0.
    fn stage(&self, name: &str, total: u64) {
        let _ = (name, total);
    }
    /// `bytes` more payload bytes of the stage are done (copied into the spool; confirmed by
    /// the gateway, or already there).
    fn advanced(&self, bytes: u64) {
        let _ = bytes;
    }
    /// A connection to the gateway is up and a new attempt begins: the `sending` stage's
    /// count starts again from 0 (the gateway's have-list counts what it already holds).
    fn attempt(&self) {}
    /// The link was lost (`error`); the send retries after a pause.
    fn link_lost(&self, error: &str) {
        let _ = error;
    }
    /// The send ended: `ok` once its receipt is verified and stored, or not when it failed or
    /// stopped.
    fn finished(&self, ok: bool) {
        let _ = ok;
    }
}

/// A [`SendObserver`] that observes nothing (the hospital doors, the service's resumes).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl SendObserver for NoObserver {}

/// A [`SendObserver`] as the sealer's and the sender's progress; counts the bytes the seal
/// cloned instead of copying.
struct Observed<'a> {
    observer: &'a dyn SendObserver,
    cloned_bytes: AtomicU64,
}

impl Progress for Observed<'_> {
    fn confirmed(&self, bytes: u64) {
        self.observer.advanced(bytes);
    }
    fn already_there(&self, bytes: u64) {
        self.observer.advanced(bytes);
    }
}

impl SealProgress for Observed<'_> {
    fn copied(&self, bytes: u64) {
        self.observer.advanced(bytes);
    }
    fn cloned(&self, bytes: u64) {
        self.cloned_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
