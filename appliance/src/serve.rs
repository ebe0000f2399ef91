//! `baylink serve`: run the role named in the config until SIGTERM.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use baylink_net::proto::ReceiverConfig;
use baylink_net::spool::{Spool, SpoolConfig};
use baylink_net::transport;
use tracing::{error, info, warn};

use crate::audit;
use crate::config::{Config, DeliverySection, Role};
use crate::deliver::dicomweb::StowSettings;
use crate::deliver::{self, Deliver, DeliveryQueue, DirDelivery};
use crate::dicom::scp::{self, ScpConfig, StorageScp};
use crate::dicom::sink::StoreSink;
use crate::drain::{self, Activity, Drain};
use crate::edge::{Edge, SendFailure, SendRequest};
use crate::gateway::{Gateway, serve_connection};
use crate::health::{self, Health};
use crate::ingest::{self, IngestStore};
use crate::policy::{Policy, SharedPolicy};
use crate::retention;
use crate::signing::Keys;
use crate::transfer_dir::TransferDir;

/// Runs the configured role until SIGTERM/SIGINT, then drains and returns.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let signals = drain::Signals::install()?;
    let metrics = health::install_metrics()?;
    // Every family exists from the first scrape (see `crate::telemetry`).
    let peers = match cfg.role {
        Role::Edge => vec![cfg.transport.server_name.clone()],
        Role::Gateway => cfg.peer_names.clone(),
    };
    crate::series::register(cfg.role, cfg.spool_reserve_bytes, &peers);
    crate::telemetry::watch_certificates(certificate_files(&cfg));
    let health = Arc::new(Health::default());
    let metrics_server = health::bind_metrics(cfg.metrics_listen, metrics, health.clone()).await?;
    tokio::spawn(metrics_server);
    match cfg.role {
        Role::Gateway => serve_gateway(cfg, health, signals).await,
        Role::Edge => serve_edge(cfg, health, signals).await,
    }
}

/// The certificates whose expiry `baylink_certificate_expiry_seconds` follows, by config key.
fn certificate_files(cfg: &Config) -> Vec<(&'static str, std::path::PathBuf)> {
    let mut files = vec![
        ("tls.cert", cfg.tls.cert.clone()),
        ("tls.ca", cfg.tls.ca.clone()),
    ];
    if let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = &cfg.delivery {
        files.push(("delivery.ca", tls.ca.clone()));
        if let Some((cert, _)) = &tls.identity {
            files.push(("delivery.cert", cert.clone()));
        }
    }
    files
}

async fn serve_gateway(
    cfg: Config,
    health: Arc<Health>,
    mut signals: drain::Signals,
) -> anyhow::Result<()> {
    let c = cfg.clone();
    let keys = tokio::task::spawn_blocking(move || Keys::open(&c))
        .await?
        .context("hsm")?;
    let spool = Spool::start(SpoolConfig::default())?;
    crate::transfer_dir::create_dir_durably(&cfg.spool_dir)
        .with_context(|| format!("cannot create {}", cfg.spool_dir.display()))?;
    // audit: open the log (repairing a torn tail) before accepting anything.
    let audit = {
        let (settings, signer) = (cfg.audit_log_settings(), keys.signer.clone());
        tokio::task::spawn_blocking(move || audit::Log::open(&settings, signer)).await??
    };
    let audit_ticker = tokio::spawn(audit_checkpoints(
        audit.clone(),
        cfg.audit.checkpoint_interval,
    ));
    let retention = tokio::spawn(retention::run(
        cfg.spool_dir.clone(),
        Role::Gateway,
        cfg.spool_retain,
        audit.clone(),
    ));

    // The https store's client configuration, which a SIGHUP renews (`None`: no such store).
    let mut delivery_tls = None;
    let target: Arc<dyn Deliver> = match cfg.delivery.clone().context("delivery is not set")? {
        DeliverySection::Dir { path } => Arc::new(DirDelivery::new(path)),
        DeliverySection::DicomWeb(StowSettings {
            url,
            batch_bytes,
            requests_in_flight,
            tls,
        }) => {
            let stow = deliver::dicomweb::DicomWebDelivery::new(
                &url,
                tls.as_ref(),
                {
                    let (cfg, token) = (cfg.clone(), keys.token.clone());
                    tokio::task::spawn_blocking(move || {
                        crate::keys::delivery_identity(&cfg, &token)
                    })
                    .await??
                },
                spool.clone(),
                tokio::runtime::Handle::current(),
            )
            .context("delivery")?
            .with_batch_bytes(batch_bytes)
            .with_requests_in_flight(requests_in_flight);
            delivery_tls = stow.tls_config();
            Arc::new(stow)
        }
    };
    // Delivery notices owed to the edges: the durable queue is loaded, and a notice whose
    // store answer was recorded before a crash kept it from being signed is signed now.
    let notices = Arc::new(crate::notice::Notices::load(
        &cfg.spool_dir,
        Some(Arc::new(keys.clone())),
        &cfg.id,
    ));
    for id in crate::notice::Notices::owed(&cfg.spool_dir) {
        if let Err(e) = notices.issue(id).await {
            error!(transfer = %id, error = %format!("{e:#}"), "cannot sign a delivery notice owed since before the restart");
        }
    }
    let (queue, queue_rx) = DeliveryQueue::new();
    for id in deliver::undelivered(&cfg.spool_dir) {
        info!(transfer = %id, "delivering a transfer committed before the restart");
        queue.push(id);
    }
    tokio::spawn(deliver::run_worker(
        cfg.spool_dir.clone(),
        target,
        queue.clone(),
        queue_rx,
        audit.clone(),
        cfg.delivery_retry,
        Some(notices.clone()),
    ));

    let token = keys.token.clone();
    let identity = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || crate::keys::tls_identity(&cfg, &token)).await??
    };
    let ca = transport::load_ca(&cfg.tls.ca)?;
    let listen = cfg
        .transport
        .listen
        .context("transport.listen is not set")?;
    // Only the configured edges get past the handshake: hospital certificates come from the
    // same CA but have no business on the link.
    let edges = transport::ClientNames::Only(cfg.peer_names.clone());
    let reset_secret = crate::gateway::quic_reset_secret(&cfg.spool_dir)?;
    let endpoint = transport::server_endpoint_keyed(
        listen,
        &ca,
        &edges,
        &identity,
        &cfg.link,
        Some(&reset_secret),
    )
    .with_context(|| format!("cannot listen on {listen} (transport.listen)"))?;
    let probe = health::HealthProbe::new(spool.clone(), &cfg.spool_dir, keys.clone());
    let token = keys.token.clone();
    let gw = Arc::new(
        Gateway::new(
            cfg.id.clone(),
            cfg.spool_dir.clone(),
            spool,
            Arc::new(keys),
            cfg.limits,
            ReceiverConfig::default(),
            queue.clone(),
            audit.clone(),
        )
        .with_chunk_stall_timeout(cfg.transport.chunk_stall_timeout)
        .with_notices(notices),
    );

    // `systemctl reload` sends SIGHUP to either role. The gateway has no policy to reload:
    // it reloads its TLS certificate, key and CA (new handshakes use them), then looks for
    // committed transfers to deliver again (one set aside as undeliverable whose
    // `undeliverable` file an operator removed).
    let rescan = (queue.clone(), cfg.spool_dir.clone());
    let mut hup = signals.hup.take().context("SIGHUP handler taken")?;
    tokio::spawn({
        let (cfg, endpoint, gw) = (Arc::new(cfg.clone()), endpoint.clone(), gw.clone());
        let expiry_files = certificate_files(&cfg);
        async move {
            let (queue, spool_dir) = rescan;
            while hup.recv().await.is_some() {
                crate::tls_reload::reload(cfg.clone(), token.clone(), &expiry_files, |l| {
                    let config = transport::server_config(&l.ca, &edges, &l.identity, &cfg.link)?;
                    // A drain has closed the endpoint to new connections: it stays closed.
                    if !gw.draining.load(Ordering::SeqCst) {
                        endpoint.set_server_config(Some(config));
                    }
                    if let (Some(swap), Some(config)) = (&delivery_tls, &l.delivery) {
                        swap.replace(config.clone());
                        info!("delivery TLS reloaded: new connections to the store use delivery.ca, delivery.cert and delivery.key as read now");
                    }
                    Ok(())
                })
                .await;
                let (q, dir) = (queue.clone(), spool_dir.clone());
                match tokio::task::spawn_blocking(move || q.rescan(&dir)).await {
                    Ok(requeued) => info!(requeued, "SIGHUP: delivery queue rescanned"),
                    Err(e) => warn!(error = %e, "SIGHUP: rescan task failed"),
                }
            }
        }
    });
    health.set_ready();
    health::notify_ready(probe);
    info!(%listen, role = "gateway", "serving");

    let accept = {
        let endpoint = endpoint.clone();
        let gw = gw.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let gw = gw.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => serve_connection(gw, conn).await,
                        Err(e) => info!(error = %e, "handshake failed"),
                    }
                });
            }
        }
    };
    let signal = tokio::select! {
        s = signals.shutdown() => s,
        () = accept => anyhow::bail!("the QUIC endpoint stopped"),
    };

    info!(signal, "draining");
    health::notify_stopping();
    health.set_stopping();
    gw.draining.store(true, Ordering::SeqCst);
    endpoint.set_server_config(None);
    let deadline = Instant::now() + cfg.drain_timeout;
    while (gw.active_transfers() > 0 || queue.pending() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if gw.active_transfers() > 0 || queue.pending() > 0 {
        warn!(
            active = gw.active_transfers(),
            undelivered = queue.pending(),
            "drain timeout: open transfers stay in the spool and resume when the edge reconnects; \
             undelivered ones are delivered at the next start"
        );
    }
    endpoint.close(crate::link::CLOSE_SHUTDOWN.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    audit_ticker.abort();
    retention.abort();
    final_checkpoint(&audit).await;
    info!("stopped");
    Ok(())
}

/// The DICOM TLS port's rustls configuration from the hospital door's `https`
/// ([`ingest::http::tls_config`]): the same without its ALPN, as DICOM over TLS names no
/// application protocol (PS3.15 B.1).
fn dicom_tls_config(mut https: rustls::ServerConfig) -> rustls::ServerConfig {
    https.alpn_protocols.clear();
    https
}

/// Binds the DICOM C-STORE SCP (before readiness is reported) with today's sink: staging in
/// the spool, then `Edge::send` at A-RELEASE. Returns it with its TLS port's configuration,
/// which a SIGHUP reload replaces.
async fn start_dicom_scp(
    cfg: &Config,
    store: &IngestStore,
    policy: SharedPolicy,
    identity: &baylink_net::transport::TlsIdentity,
    commitment: Arc<crate::dicom::commitment::Commitments>,
) -> anyhow::Result<(
    StorageScp<StoreSink>,
    Option<crate::tls_reload::Swap<rustls::ServerConfig>>,
)> {
    let d = &cfg.ingest.dicom;
    let tls = match cfg.ingest.dicom_tls_listen {
        Some(listen) => Some(scp::TlsDoor {
            listen,
            config: crate::tls_reload::Swap::new(dicom_tls_config(
                ingest::http::tls_config(cfg, identity)
                    .context("ingest.dicom_tls_listen: the TLS configuration")?,
            )),
        }),
        None => None,
    };
    let swap = tls.as_ref().map(|door| door.config.clone());
    let scp_cfg = ScpConfig {
        listen: cfg.ingest.dicom_listen,
        tls,
        ae_title: d.ae_title.clone(),
        peers: d.peers.clone(),
        max_pdu_bytes: d.max_pdu_bytes,
        max_associations: d.max_associations,
        handshake_timeout: cfg.ingest.handshake_timeout,
        max_unidentified_per_source: cfg.ingest.max_unidentified_per_source,
        idle_timeout: d.idle_timeout,
        scratch_dir: scp::scratch_dir(&cfg.spool_dir),
        max_instances: cfg.limits.max_files as usize,
        max_association_bytes: cfg.ingest.max_upload_bytes,
        category: "diagnostic-image".into(),
        destination: "hk-ehealth".into(),
        commitment: Some(commitment.clone()),
    };
    let sink = StoreSink::new(store.clone()).with_commitment(commitment);
    Ok((StorageScp::bind(scp_cfg, policy, sink).await?, swap))
}

async fn serve_edge(
    cfg: Config,
    health: Arc<Health>,
    mut signals: drain::Signals,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let edge = Edge::start(cfg.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::transfer_dir::create_dir_durably(&cfg.spool_dir)
        .with_context(|| format!("cannot create {}", cfg.spool_dir.display()))?;
    // Before the spool is scanned: a seal a stop interrupted becomes sealed (its `sealed`
    // record appended first if the stop came before it), so it is resumed like any other.
    edge.finish_interrupted_seals().await;
    let store = IngestStore::open(edge.clone()).map_err(|e| anyhow::anyhow!("ingest: {e}"))?;
    // Sealed before this start, not yet receipted: listed before the interrupted C-STORE
    // associations are sealed below, which the store sends itself.
    let pending = edge.pending();
    // Before the SCP accepts associations: what a crash or stop cut off mid-association is
    // sealed and sent (every instance answered Success).
    store.seal_interrupted_associations().await;
    // What the drain waits for: hospital connections, C-STORE associations, and sends
    // (counted by the edge itself).
    let drain = Drain::default();
    let (connections, associations) = (Activity::default(), Activity::default());
    // The DICOM TLS port's configuration, replaced by a SIGHUP reload.
    let mut dicom_tls = None;
    // Storage Commitment reports over TLS: for the requests of the DICOM TLS port, and for
    // every peer that asks (`commitment_tls`). Replaced by a SIGHUP reload.
    let commitment_tls = (cfg.ingest.dicom_tls_listen.is_some()
        || cfg
            .ingest
            .dicom
            .peers
            .iter()
            .any(|p| p.commitment.as_ref().is_some_and(|c| c.tls)))
    .then(|| -> anyhow::Result<_> {
        let ca = baylink_net::transport::load_ca(&cfg.tls.ca).context("tls.ca")?;
        Ok(crate::tls_reload::Swap::new(
            crate::dicom::commitment::report_tls_config(&ca, &edge.tls_identity())
                .context("storage commitment reports over TLS")?,
        ))
    })
    .transpose()?;
    if cfg.ingest.dicom_listen.is_some() || cfg.ingest.dicom_tls_listen.is_some() {
        // Storage Commitment: its index and pending requests (those of an earlier run are
        // answered as their notices come, or at once if they already have).
        let mut commitment = crate::dicom::commitment::Commitments::open(
            &cfg.spool_dir,
            store.clone(),
            cfg.ingest.dicom.ae_title.clone(),
            cfg.ingest.dicom.peers.clone(),
            cfg.ingest.dicom.commitment_max_pending,
        )
        .context("storage commitment state (spool/.commitment)")?
        .with_retention(cfg.spool_retain);
        if let Some(tls) = &commitment_tls {
            commitment = commitment.with_tls(tls.clone());
        }
        let commitment = Arc::new(commitment);
        tokio::spawn(commitment.clone().run());
        let (scp, tls) = start_dicom_scp(
            &cfg,
            &store,
            edge.shared_policy().clone(),
            &edge.tls_identity(),
            commitment,
        )
        .await?;
        dicom_tls = tls;
        tokio::spawn(scp.serve(drain.clone(), associations.clone()));
    }
    // The hospital API's TLS configuration, replaced by a SIGHUP reload.
    let https_tls = match cfg.ingest.listen {
        Some(_) => Some(crate::tls_reload::Swap::new(ingest::http::tls_config(
            &cfg,
            &edge.tls_identity(),
        )?)),
        None => None,
    };
    if let Some(tls) = &https_tls {
        let (bound, server) = ingest::http::bind(
            &cfg,
            store.clone(),
            tls.clone(),
            drain.clone(),
            connections.clone(),
        )
        .await?;
        tokio::spawn(server);
        info!(listen = %bound, "hospital API listening");
    }
    tokio::spawn(reload_on_sighup(
        cfg.clone(),
        edge.clone(),
        Doors {
            https: https_tls,
            dicom_tls,
            commitment_tls,
        },
        signals.hup.take().context("SIGHUP handler taken")?,
    ));
    if let Some(idle) = cfg.ingest.open_timeout {
        tokio::spawn(expire_open_transfers(store.clone(), idle));
    }
    // audit: a refusal recorded before this start (by this service or a `send`) holds.
    let refused = edge.witness_refusal();
    if let Some(reason) = &refused {
        error!(
            error = %reason,
            "the gateway's witness refused this edge's audit log; sending is stopped"
        );
    }
    metrics::gauge!("baylink_audit_witness_refused").set(if refused.is_some() { 1.0 } else { 0.0 });
    health.unhealthy_while_exists(cfg.audit_dir.join(audit::witness::REFUSED_FILE));
    health.set_ready();
    health::notify_ready(health::HealthProbe::new(
        edge.spool().clone(),
        &cfg.spool_dir,
        edge.hsm_keys().context("the edge has no HSM keys")?.clone(),
    ));
    info!(role = "edge", "serving");

    // Finish what was sealed but not confirmed before the last stop.
    let notice_store = store.clone();
    let resumer = {
        let edge = edge.clone();
        async move {
            for id in pending {
                if ingest::store::is_ingest_transfer(&TransferDir::new(
                    &edge.config().spool_dir,
                    &id,
                )) {
                    info!(transfer = %id, "resuming a sealed hospital upload");
                    store.resume(id);
                    continue;
                }
                info!(transfer = %id, "resuming a sealed transfer");
                match edge
                    .send(
                        SendRequest::Resume(id),
                        &crate::edge::NoObserver,
                        &Default::default(),
                    )
                    .await
                {
                    Ok(s) => info!(transfer = %id, wire_bytes = s.wire_bytes, "transfer receipted"),
                    Err(SendFailure::Stopped) => {
                        info!(transfer = %id, "send stopped by the shutdown; it resumes at the next start");
                    }
                    Err(e) => error!(transfer = %id, error = %e, "transfer not finished"),
                }
            }
        }
    };
    tokio::spawn(resumer);
    // Delivery notices: a connection to the gateway stays open to collect them (those queued
    // while the edge was away come at once on connecting); each moves its hospital upload to
    // `delivered` or `failed`.
    let notices = tokio::spawn({
        let (edge, store) = (edge.clone(), notice_store);
        async move {
            edge.serve_notices(&move |n| {
                let (store, n) = (store.clone(), n.clone());
                tokio::spawn(async move { store.delivery_noticed(&n).await });
            })
            .await;
        }
    });
    let audit_ticker = tokio::spawn({
        let edge = edge.clone();
        let interval = cfg.audit.checkpoint_interval;
        async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match edge.audit().checkpoint().await {
                    Ok(_) => edge.witness_bounded().await,
                    Err(e) => {
                        error!(error = %e, "periodic audit checkpoint failed");
                        metrics::counter!("baylink_audit_checkpoint_failures_total").increment(1);
                    }
                }
            }
        }
    });
    let retention = tokio::spawn(retention::run(
        cfg.spool_dir.clone(),
        Role::Edge,
        cfg.spool_retain,
        edge.audit().clone(),
    ));
    let signal = signals.shutdown().await;
    drain_edge(
        signal,
        &cfg,
        &edge,
        &health,
        &drain,
        &connections,
        &associations,
    )
    .await;
    audit_ticker.abort();
    retention.abort();
    notices.abort();
    final_checkpoint(edge.audit()).await;
    edge.witness_bounded().await;
    edge.close_link().await;
    info!("stopped");
    Ok(())
}

/// After the drain's end, how long the doors get to answer what they stopped (503 to an
/// upload still arriving; an association aborted once its instances are sealed), and the
/// sends to return.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Edge, on SIGTERM/SIGINT: `STOPPING=1` and `/healthz` 503; the HTTPS and DICOM listeners
/// close (new connections are refused); uploads, associations and sends in progress go on
/// until none is left or `drain.timeout` passes. Then what still runs is stopped: an upload
/// still arriving is answered 503 (its partial file discarded, the transfer stays open), an
/// association is aborted after its instances answered Success are sealed, and a send is cut
/// off with its transfer sealed (the gateway checkpoints what it verified when the link
/// closes), so the next start resumes it. The caller then signs the audit checkpoint and
/// closes the link.
async fn drain_edge(
    signal: &str,
    cfg: &Config,
    edge: &Edge,
    health: &Health,
    drain: &Drain,
    connections: &Activity,
    associations: &Activity,
) {
    info!(signal, drain_timeout = ?cfg.drain_timeout, "draining");
    health::notify_stopping();
    health.set_stopping();
    drain.started.set();
    let deadline = Instant::now() + cfg.drain_timeout;
    let busy = || connections.count() + associations.count() + edge.sending().count();
    while busy() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (c, a, s) = (
        connections.count(),
        associations.count(),
        edge.sending().count(),
    );
    if c + a + s > 0 {
        warn!(
            connections = c,
            associations = a,
            sends = s,
            "drain timeout: uploads still arriving are answered 503 (the transfer stays open), \
             associations are aborted (what was answered Success is sealed), sends stop; \
             all of it resumes at the next start"
        );
    } else {
        info!("drained: no upload, association or send left");
    }
    drain.ended.set();
    let grace = Instant::now() + DRAIN_GRACE;
    while connections.count() + associations.count() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edge.stop_sending();
    while edge.sending().count() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = connections.count() + associations.count() + edge.sending().count();
    if left > 0 {
        warn!(
            left,
            "still running after the drain's grace period; cut off by the exit"
        );
    }
}

/// Closes open transfers idle for `idle` (`ingest.open_timeout`), checking as often as
/// spool retention would for that duration (1 s to 1 min).
async fn expire_open_transfers(store: IngestStore, idle: Duration) {
    let mut tick = tokio::time::interval(retention::interval(Some(idle)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        store.expire_idle(idle).await;
    }
}

// audit: periodic and shutdown checkpoints of the audit log.

/// Signs an audit checkpoint every `interval` when the log grew.
async fn audit_checkpoints(log: audit::Log, interval: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = log.checkpoint().await {
            error!(error = %e, "periodic audit checkpoint failed");
            metrics::counter!("baylink_audit_checkpoint_failures_total").increment(1);
        }
    }
}

/// Signs the shutdown checkpoint (errors are logged: the records themselves are durable).
async fn final_checkpoint(log: &audit::Log) {
    match log.checkpoint().await {
        Ok(Some(size)) => info!(size, "audit checkpoint signed at shutdown"),
        Ok(None) => {}
        Err(e) => error!(error = %e, "cannot sign the audit checkpoint at shutdown"),
    }
}

/// The edge's hospital doors whose TLS configuration a reload replaces.
struct Doors {
    /// The HTTPS API (`ingest.listen`).
    https: Option<crate::tls_reload::Swap<rustls::ServerConfig>>,
    /// The DICOM TLS port (`ingest.dicom_tls_listen`).
    dicom_tls: Option<crate::tls_reload::Swap<rustls::ServerConfig>>,
    /// The client side of Storage Commitment reports over TLS.
    commitment_tls: Option<crate::tls_reload::Swap<rustls::ClientConfig>>,
}

/// Edge, on every SIGHUP (`systemctl reload`): first the policy (consent registry, negative
/// list, hospitals) from the files the config names, then the TLS certificate, key and CA
/// (the link to the gateway, the hospital API `https`, the DICOM TLS port and Storage
/// Commitment reports over TLS, all or none;
/// see [`crate::tls_reload`]). What does not load is reported and what is in force stays: a
/// typo never opens or closes the channel by accident.
async fn reload_on_sighup(
    cfg: Arc<Config>,
    edge: Edge,
    doors: Doors,
    mut hup: tokio::signal::unix::Signal,
) {
    let expiry_files = certificate_files(&cfg);
    while hup.recv().await.is_some() {
        reload_policy(&cfg, edge.shared_policy()).await;
        let Some(token) = edge.hsm_keys().map(|k| k.token.clone()) else {
            break;
        };
        crate::tls_reload::reload(cfg.clone(), token, &expiry_files, |l| {
            // Everything is built before anything is replaced.
            let client = edge.link_tls_config(l)?;
            // One configuration for both doors, from the CA as this reload read it (once,
            // with the link's).
            let door = (doors.https.is_some() || doors.dicom_tls.is_some())
                .then(|| ingest::http::tls_config_with_roots(&l.ca, &l.identity))
                .transpose()?;
            let reports = doors
                .commitment_tls
                .as_ref()
                .map(|_| crate::dicom::commitment::report_tls_config(&l.ca, &l.identity))
                .transpose()?;
            if let Some(door) = door {
                if let Some(swap) = &doors.dicom_tls {
                    swap.replace(dicom_tls_config(door.clone()));
                }
                if let Some(swap) = &doors.https {
                    swap.replace(door);
                }
            }
            if let (Some(swap), Some(reports)) = (&doors.commitment_tls, reports) {
                swap.replace(reports);
            }
            edge.replace_tls(l.identity.clone(), client);
            Ok(())
        })
        .await;
    }
}

/// Reloads the policy; one that does not load is reported and the one in force stays.
async fn reload_policy(cfg: &Config, policy: &SharedPolicy) {
    let section = cfg.policy.clone();
    match tokio::task::spawn_blocking(move || Policy::load(&section)).await {
        Ok(Ok(p)) => {
            let patients = p.patients();
            policy.replace(p);
            metrics::counter!("baylink_policy_reloads_total", "outcome" => "ok").increment(1);
            info!(patients, "policy reloaded");
        }
        Ok(Err(e)) => {
            metrics::counter!("baylink_policy_reloads_total", "outcome" => "failed").increment(1);
            error!(error = %e, "policy not reloaded; the previous one stays in force");
        }
        Err(e) => error!(error = %e, "policy reload task failed"),
    }
}
