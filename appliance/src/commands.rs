//! Runs the subcommands: loads the config, prepares the process, starts the runtime.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use baylink_hsm::Token;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{AuditCommand, AuditVerifyArgs, Cli, Command, HsmCommand, LogFormat, SendArgs};
use crate::config::{Config, Role};
use crate::edge::{Edge, SendObserver, SendRequest};
use crate::keys::hsm_config;
use crate::link::send::SendStats;
use crate::policy::Declaration;

/// Installs the `tracing` subscriber on stderr (`RUST_LOG` filters; default `info`, with
/// cryptoki's mechanism list muted: it logs each mechanism a token offers that it has no name
/// for as an error, which is not one).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn,cryptoki::mechanism=off")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs one command and maps the outcome to an exit code; errors are printed as one line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        #[cfg(feature = "dev-env")]
        Command::DevEnv {
            dir,
            base_port,
            module,
            tls_key_files,
        } => {
            export_softhsm_conf(&crate::devenv::softhsm_conf_path(&absolute(&dir)));
            let tls = if tls_key_files {
                crate::devenv::TlsKeys::Files
            } else {
                crate::devenv::TlsKeys::Hsm
            };
            crate::devenv::create(&dir, base_port, &module, tls).map(|()| {
                println!("dev-env ready in {}", dir.display());
                0
            })
        }
        Command::Serve(c) => serve(&c.config),
        Command::Send(args) => return send(args),
        Command::Hsm(cmd) => hsm(cmd),
        Command::Audit(cmd) => audit(cmd),
        Command::Spool(args) => spool(&args),
        Command::Info(args) => with_config(&args.config, |cfg| {
            let report = crate::info::report(&cfg);
            if args.json {
                println!("{report}");
            } else {
                print!("{}", crate::info::render_text(&report));
            }
            Ok(0)
        }),
        Command::CheckConfig(args) => {
            let (report, _) = check(&args.config);
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render_text(&args.config));
            }
            Ok(if report.ok { 0 } else { 1 })
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every check of `check-config` on the config at `path`, exporting `SOFTHSM2_CONF`
/// (before any thread exists) between reading the file and opening the HSM.
fn check(path: &Path) -> (crate::check::Report, Option<Config>) {
    crate::check::run(path, crate::check::Options::default(), |cfg| {
        if let Some(conf) = &cfg.hsm.softhsm_conf {
            export_softhsm_conf(conf);
        }
    })
}

/// `serve`: the checks of `check-config` first (every problem logged, any error refuses the
/// start), then the role. The listen addresses are checked here, before the runtime starts
/// and `serve` binds them.
fn serve(path: &Path) -> anyhow::Result<u8> {
    let (report, cfg) = check(path);
    for p in &report.problems {
        match p.severity {
            crate::check::Severity::Error => {
                tracing::error!(key = %p.key, "config: {}: {}", p.key, p.message);
            }
            crate::check::Severity::Warning => {
                tracing::warn!(key = %p.key, "config: {}: {}", p.key, p.message);
            }
        }
    }
    let errors = report.errors().count();
    let cfg = match cfg {
        Some(cfg) if errors == 0 => cfg,
        _ => anyhow::bail!(
            "not starting: {} has {errors} problem{} (`baylink check-config --config {}` lists \
             them): {}",
            path.display(),
            if errors == 1 { "" } else { "s" },
            path.display(),
            report
                .errors()
                .map(|p| p.key.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    crate::secrets::check_modes(&cfg)?;
    runtime()?.block_on(crate::serve::serve(cfg))?;
    Ok(0)
}

#[cfg(feature = "dev-env")]
fn absolute(p: &Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("baylink-net")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Loads the config, exports `SOFTHSM2_CONF` if it names one, and runs `f`.
fn with_config(path: &Path, f: impl FnOnce(Config) -> anyhow::Result<u8>) -> anyhow::Result<u8> {
    let cfg = Config::load(path)?;
    if let Some(conf) = &cfg.hsm.softhsm_conf {
        export_softhsm_conf(conf);
    }
    f(cfg)
}

/// Points SoftHSM at the configured store. Must run before any thread exists.
#[allow(unsafe_code)]
fn export_softhsm_conf(path: &Path) {
    // SAFETY: called from `run` before the tokio runtime or any other thread is started, so
    // no other thread can be reading the environment concurrently.
    unsafe { std::env::set_var("SOFTHSM2_CONF", path) };
}

fn send(args: SendArgs) -> ExitCode {
    let outcome = (|| -> Result<crate::edge::SendSummary, crate::edge::SendFailure> {
        let cfg = Config::load(&args.config).map_err(anyhow::Error::from)?;
        if cfg.role != Role::Edge {
            return Err(anyhow::anyhow!(
                "{} is a {} config; send needs an edge config",
                args.config.display(),
                cfg.role
            )
            .into());
        }
        crate::secrets::check_modes(&cfg).map_err(anyhow::Error::from)?;
        if let Some(conf) = &cfg.hsm.softhsm_conf {
            export_softhsm_conf(conf);
        }
        let request = match &args.resume {
            Some(id) => SendRequest::Resume(
                id.parse()
                    .map_err(|_| anyhow::anyhow!("--resume {id}: not a transfer id"))?,
            ),
            None => SendRequest::New {
                files: args.files.clone(),
                declaration: Declaration {
                    patient_id: args.patient.clone(),
                    category: args.category.clone(),
                    purpose: args.purpose.clone(),
                    destination: args.destination.clone(),
                    consent_ref: args.consent_ref.clone(),
                },
            },
        };
        let bar = Bar::new(!args.no_progress && std::io::stderr().is_terminal());
        let stats = Arc::new(SendStats::default());
        let congestion = cfg.link.congestion.name();
        let (wait_delivered, delivered_timeout) = (args.wait_delivered, args.delivered_timeout);
        let summary = runtime()?.block_on(async {
            let edge = Edge::start(Arc::new(cfg)).await?;
            let mut result = edge.send(request, &bar, &stats).await;
            if wait_delivered && let Ok(summary) = &mut result {
                match summary.transfer_id.parse() {
                    Ok(id) => match edge.wait_delivered(id, delivered_timeout).await {
                        Ok(n) => summary.delivery = Some(crate::edge::DeliverySummary::of(&n)),
                        Err(e) => summary.not_delivered = Some(e.to_string()),
                    },
                    Err(_) => summary.not_delivered = Some("bad transfer id".into()),
                }
            }
            // audit: sign a checkpoint at exit, so the transfer can be proven at once.
            if let Err(e) = edge.audit().checkpoint().await {
                tracing::warn!(error = %e, "cannot sign the audit checkpoint at exit");
            }
            // audit: and, when the link just worked, have the gateway witness it (best effort,
            // bounded: a refusal must not wait for a link that is down; retried next time).
            if result.is_ok() {
                edge.witness_bounded().await;
            }
            edge.close_link().await;
            result
        })?;
        if let Some(path) = &args.stats {
            write_stats(path, &stats, congestion)?;
        }
        Ok(summary)
    })();
    match outcome {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string(&summary).expect("summary serialises")
            );
            // `--wait-delivered`: the receipt is in, but the record store does not hold it.
            let refused = summary
                .delivery
                .as_ref()
                .filter(|d| d.outcome != "delivered")
                .map(|d| match d.outcome {
                    "partial" => format!(
                        "not delivered whole: the record store refused {} instance(s): {}",
                        d.refused_total,
                        d.refused
                            .iter()
                            .map(|r| format!(
                                "{} {}: {}",
                                r.file,
                                if r.sop_instance_uid.is_empty() {
                                    "(no SOP Instance UID)"
                                } else {
                                    &r.sop_instance_uid
                                },
                                r.reason
                            ))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    _ => format!("not delivered: the record store refused it: {}", d.answer),
                });
            match refused.or(summary.not_delivered) {
                Some(line) => {
                    eprintln!("{line}");
                    ExitCode::from(6)
                }
                None => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("{}", e.answer());
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

/// `baylink send`'s progress bar on stderr, drawn from the send's [`SendObserver`] events:
/// made at the first one (a send refused before it starts draws none), never when hidden.
struct Bar {
    show: bool,
    bar: OnceLock<ProgressBar>,
}

impl Bar {
    fn new(show: bool) -> Bar {
        Bar {
            show,
            bar: OnceLock::new(),
        }
    }

    fn get(&self) -> Option<&ProgressBar> {
        self.show.then(|| {
            self.bar.get_or_init(|| {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg:10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .expect("static template")
                    .progress_chars("=> "),
                );
                bar
            })
        })
    }
}

impl SendObserver for Bar {
    fn stage(&self, name: &str, total: u64) {
        if let Some(bar) = self.get() {
            bar.set_length(total);
            bar.set_position(0);
            bar.set_message(name.to_owned());
        }
    }
    fn advanced(&self, bytes: u64) {
        if let Some(bar) = self.get() {
            bar.inc(bytes);
        }
    }
    fn attempt(&self) {
        if let Some(bar) = self.get() {
            bar.set_position(0);
        }
    }
    fn link_lost(&self, error: &str) {
        if let Some(bar) = self.get() {
            bar.set_message(format!("link lost, retrying: {error}"));
        }
    }
    fn finished(&self, ok: bool) {
        if let Some(bar) = self.get() {
            if ok {
                bar.finish_and_clear();
            } else {
                // As the bar dropped unfinished: left drawn at its end.
                bar.finish();
            }
        }
    }
}

/// `--stats`' `link`: quinn's statistics of the send's link connections, summed.
fn link_json(l: &crate::link::send::LinkTotals, congestion: &str) -> serde_json::Value {
    serde_json::json!({
        "congestion": congestion,
        "connections": l.connections,
        "udp_tx_datagrams": l.udp_tx_datagrams,
        "udp_tx_bytes": l.udp_tx_bytes,
        "sent_packets": l.sent_packets,
        "lost_packets": l.lost_packets,
        "lost_bytes": l.lost_bytes,
        "congestion_events": l.congestion_events,
    })
}

fn write_stats(path: &Path, stats: &SendStats, congestion: &str) -> anyhow::Result<()> {
    let h = stats
        .chunk_latency_us
        .lock()
        .map_err(|_| anyhow::anyhow!("stats lock poisoned"))?;
    let json = serde_json::json!({
        "chunks": h.len(),
        "wire_bytes": stats.wire_bytes(),
        "hsm_wait_us": stats.hsm_wait_us.load(std::sync::atomic::Ordering::Relaxed),
        "link": link_json(&stats.link(), congestion),
        "chunk_latency_us": {
            "p50": h.value_at_quantile(0.50),
            "p99": h.value_at_quantile(0.99),
            "max": h.max(),
        },
    });
    std::fs::write(path, format!("{json}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn hsm(cmd: HsmCommand) -> anyhow::Result<u8> {
    let path = match &cmd {
        HsmCommand::Pubkey(c) | HsmCommand::Info(c) => c.config.clone(),
        HsmCommand::Keygen { config, .. } => config.clone(),
    };
    with_config(&path, |cfg| {
        let token = Token::open(&hsm_config(&cfg)?)?;
        match cmd {
            HsmCommand::Pubkey(_) => print!("{}", token.signer()?.public_key().to_pem()),
            HsmCommand::Keygen { label, .. } => {
                let public = token.generate_key(&label)?;
                print!("{}", public.to_pem());
            }
            HsmCommand::Info(_) => print!("{}", token.info()),
        }
        Ok(0)
    })
}

fn spool(args: &crate::cli::SpoolArgs) -> anyhow::Result<u8> {
    let cfg = Config::load(&args.config)?;
    anyhow::ensure!(
        cfg.spool_dir.is_dir(),
        "spool.dir {} is not a directory",
        cfg.spool_dir.display()
    );
    let inventory = crate::spool_state::take(&cfg.spool_dir, cfg.role);
    if args.json {
        println!("{}", serde_json::to_string(&inventory)?);
    } else {
        print!("{}", inventory.table());
    }
    Ok(0)
}

fn audit(cmd: AuditCommand) -> anyhow::Result<u8> {
    use crate::audit;
    match cmd {
        AuditCommand::Verify(args) => audit_verify(args),
        AuditCommand::Prove { config, transfer } => {
            let cfg = Config::load(&config)?;
            let proof = audit::prove(&cfg.audit_dir, &transfer)?;
            println!("{}", serde_json::to_string_pretty(&proof)?);
            Ok(0)
        }
        AuditCommand::VerifyProof {
            public_key,
            proof,
            witness_key,
        } => {
            let key = crate::signing::load_public_key(&public_key)?;
            let p = audit::read_proof(&proof)?;
            let (ok, cosigned) = match &witness_key {
                Some(w) => {
                    let wk = crate::signing::load_public_key(w)?;
                    let (ok, n) = audit::verify_proof_cosigned(&p, &key, &wk)?;
                    (ok, Some(n))
                }
                None => (audit::verify_proof(&p, &key)?, None),
            };
            let kinds: Vec<String> = ok.records.iter().map(|r| r.kind.to_string()).collect();
            println!(
                "proof ok: transfer {}, {} records ({}) included in {} checkpoint of {} records, root {}",
                ok.transfer,
                ok.records.len(),
                kinds.join(", "),
                ok.checkpoint.origin,
                ok.checkpoint.size,
                hex::encode(ok.checkpoint.root)
            );
            if let Some(n) = cosigned {
                println!("cosignatures: {n} verified by the witness key");
            }
            Ok(0)
        }
        AuditCommand::Checkpoint(c) => with_config(&c.config, |cfg| {
            let token = Token::open(&hsm_config(&cfg)?)?;
            let log = audit::Log::open(&cfg.audit_log_settings(), token.signer()?)?;
            match log.checkpoint_blocking()? {
                Some(n) => println!("checkpoint signed: {n} records"),
                None => println!("checkpoint: nothing new to sign"),
            }
            Ok(0)
        }),
    }
}

/// What `audit verify --config` reads from the HSM besides the key.
struct HsmAnchor {
    token: String,
    anchor: Option<crate::audit::anchor::Anchor>,
    /// The pinned peer key (an edge's witness), for the anchored cosignature.
    peer: Option<baylink_hsm::PublicKey>,
}

fn audit_verify(args: AuditVerifyArgs) -> anyhow::Result<u8> {
    use crate::audit::{self, anchor};
    let AuditVerifyArgs {
        config,
        dir,
        public_key,
        witness_key,
        peer_checkpoint,
    } = args;
    let (dir, key, hsm) = match (config, dir) {
        (_, Some(dir)) => {
            let pem = public_key.context("--dir needs --public-key")?;
            (dir, crate::signing::load_public_key(&pem)?, None)
        }
        (Some(config), None) => with_config_value(&config, |cfg| {
            let token = Token::open(&hsm_config(&cfg)?).with_context(|| {
                format!(
                    "{}: cannot open the HSM, which holds the audit log's anchor (an auditor \
                     without it uses --dir and --public-key)",
                    config.display()
                )
            })?;
            let key = match &public_key {
                Some(pem) => crate::signing::load_public_key(pem)?,
                None => token.signer()?.public_key().clone(),
            };
            let anchor = anchor::read(&token, &audit::note::origin(&cfg.id))?;
            let peer = (cfg.role == Role::Edge)
                .then(|| crate::signing::load_public_key(&cfg.peer_signing_key))
                .transpose()?;
            let hsm = HsmAnchor {
                token: token.label().to_owned(),
                anchor,
                peer,
            };
            Ok((cfg.audit_dir.clone(), key, Some(hsm)))
        })?,
        (None, None) => anyhow::bail!("give --config FILE or --dir DIR --public-key PEM"),
    };
    let witness = witness_key
        .as_deref()
        .map(crate::signing::load_public_key)
        .transpose()?;
    let mut peer_notes = Vec::new();
    for path in &peer_checkpoint {
        let text = read_note(path)?;
        peer_notes.push((format!("the peer's checkpoint {}", path.display()), text));
    }
    // The HSM's anchor first: it is the newest a rewind has to get past.
    let held = hsm.as_ref().and_then(|h| h.anchor.as_ref());
    let mut kept: Vec<(&str, &str)> = held.map(|a| a.kept()).unwrap_or_default();
    kept.extend(
        peer_notes
            .iter()
            .map(|(what, text)| (what.as_str(), text.as_str())),
    );
    let s = audit::verify_kept(&dir, &key, &kept)?;
    println!(
        "checkpoints: {} verified, the latest signs {} of {} records",
        s.checkpoints, s.signed_size, s.records
    );
    if let Some(h) = &hsm {
        match held {
            Some(a) => {
                let size = |t: &str| {
                    audit::note::split_note(t)
                        .and_then(|(body, _)| audit::note::Checkpoint::parse_body(body))
                        .map(|c| c.size)
                        .unwrap_or(0)
                };
                println!(
                    "anchor: the HSM (token \"{}\") holds the checkpoint of {} records; the log \
                     holds it",
                    h.token,
                    size(&a.checkpoint)
                );
                if let Some(c) = &a.cosigned {
                    if let Some(wk) = witness.as_ref().or(h.peer.as_ref()) {
                        audit::witness::verify_cosignature(&c.checkpoint, &c.cosignature, wk)
                            .map_err(|reason| audit::AuditError::BadAnchor {
                                what: anchor::ANCHORED_COSIGNED.to_owned(),
                                reason,
                            })?;
                    }
                    println!(
                        "anchor: the witness cosigned {} records; the log holds them",
                        size(&c.checkpoint)
                    );
                }
            }
            // A log with checkpoints is anchored when it is first opened by this version.
            None if s.checkpoints > 0 => anyhow::bail!(
                "the HSM (token \"{}\") holds no audit anchor for this log, but {} holds {} \
                 checkpoints: the anchor was removed from the token, or no appliance of this \
                 version has opened the log yet",
                h.token,
                dir.join(audit::CHECKPOINTS_FILE).display(),
                s.checkpoints
            ),
            None => println!("anchor: none yet (no checkpoint signed)"),
        }
    }
    for (what, _) in &peer_notes {
        println!("{what}: the log holds it");
    }
    if let Some(wk) = &witness {
        let c = audit::witness::verify_cosignatures(&dir, &key, wk)?;
        println!(
            "cosignatures: {} verified, the latest cosigns {} records",
            c.count, c.cosigned_size
        );
    }
    if s.signed_size < s.records {
        println!(
            "note: {} records after the latest checkpoint are not signed yet",
            s.records - s.signed_size
        );
    }
    println!(
        "audit ok: {} records, root {}",
        s.records,
        hex::encode(s.root)
    );
    Ok(0)
}

/// Reads a signed note from a file (at most [`crate::audit::note::MAX_NOTE`] bytes).
fn read_note(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let limit = crate::audit::note::MAX_NOTE;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit as u64 + 1).read_to_string(&mut text))
        .with_context(|| format!("cannot read the checkpoint {}", path.display()))?;
    anyhow::ensure!(
        text.len() <= limit,
        "{} is larger than a checkpoint ({limit} bytes at most)",
        path.display()
    );
    Ok(text)
}

/// Like [`with_config`], for a closure that returns a value.
fn with_config_value<T>(
    path: &Path,
    f: impl FnOnce(Config) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cfg = Config::load(path)?;
    if let Some(conf) = &cfg.hsm.softhsm_conf {
        export_softhsm_conf(conf);
    }
    f(cfg)
}
