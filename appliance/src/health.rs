//! What an operator's probes see: the listener for `/healthz` and Prometheus `/metrics`, and
//! systemd's readiness notification and watchdog (fed only while the spool and the HSM work).
//!
//! The metric families themselves are named in [`crate::telemetry`]; the drain that
//! `/healthz` reports as `stopping` is in [`crate::drain`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use baylink_net::spool::Spool;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{error, info, warn};

use crate::signing::{Keys, WATCHDOG_CONTEXT};

/// Health of the process, as `/healthz` reports it.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    /// Set when the drain starts: `/healthz` says `stopping` instead of `starting`.
    stopping: AtomicBool,
    /// While this file exists, `/healthz` answers 503 (edge: the witness refusal).
    refused_while: OnceLock<PathBuf>,
}

impl Health {
    /// Marks every listener up and the HSM key found.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
    /// Marks the process as not (or no longer) ready, e.g. while draining.
    pub fn set_not_ready(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }
    /// Marks the process as draining: not ready, and `/healthz` says `stopping`.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.set_not_ready();
    }
    /// Edge: `/healthz` answers 503 while `path` exists (the record that the gateway's
    /// witness refused this edge's audit log, written by this process or by a `send`; the
    /// edge sends nothing meanwhile). Set once; later calls are ignored.
    pub fn unhealthy_while_exists(&self, path: PathBuf) {
        let _ = self.refused_while.set(path);
    }
    /// Whether the file given to [`Health::unhealthy_while_exists`] exists (or cannot be
    /// looked at: fail closed).
    fn refused(&self) -> bool {
        self.refused_while
            .get()
            .is_some_and(|path| match std::fs::symlink_metadata(path) {
                Ok(_) => true,
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            })
    }
    /// Whether `/healthz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.refused()
    }
}

/// Installs the global metrics recorder (once per process) and returns its handle.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("baylink_hsm_sign_seconds".into()),
            &[
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1,
            ],
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    Ok(handle)
}

/// Binds the health/metrics listener; the returned future serves it.
pub async fn bind_metrics(
    listen: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (metrics.listen)"))?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        )
        .with_state(health);
    Ok(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics server stopped");
        }
    })
}

async fn healthz(State(health): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if health.refused() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "audit log refused by the gateway's witness; sending is stopped\n",
        )
    } else if health.is_ready() {
        (StatusCode::OK, "ok\n")
    } else if health.stopping.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// What must still work for the watchdog to be fed: the spool thread takes file operations on
/// the spool's file system, and the HSM signs. The runtime's responsiveness is checked by the
/// feeding itself: a starved runtime runs no check and feeds nothing.
///
/// Deliberately not checked: the link, the peer, the record store, a full disk or a witness
/// that refuses the log. A restart fixes none of them, so they are reported by `/healthz`,
/// metrics and logs instead of by a restart loop.
#[derive(Debug, Clone)]
pub struct HealthProbe {
    spool: Spool,
    marker: PathBuf,
    keys: Keys,
}

/// A health check that failed: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// `spool` or `hsm`.
    pub check: &'static str,
    /// What went wrong, in the operator's terms.
    pub reason: String,
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} check failed: {}", self.check, self.reason)
    }
}

impl HealthProbe {
    /// Name of the file the spool check creates (and truncates) in the spool directory.
    pub const MARKER: &'static str = ".watchdog";

    /// Checks `spool` on the file system of `spool_dir`, and the HSM behind `keys`.
    pub fn new(spool: Spool, spool_dir: &Path, keys: Keys) -> HealthProbe {
        HealthProbe {
            spool,
            marker: spool_dir.join(Self::MARKER),
            keys,
        }
    }

    /// Runs every check, each bounded by `limit`; the first failure names its check.
    pub async fn check(&self, limit: Duration) -> Result<(), ProbeFailure> {
        let fail = |check, reason: String| ProbeFailure { check, reason };
        // The spool thread answers and the file system takes a create. A full disk is not a
        // failure: the appliance pauses on it and says so elsewhere (invariant 7).
        match tokio::time::timeout(limit, self.spool.create(&self.marker)).await {
            Err(_) => return Err(fail("spool", format!("no answer within {limit:?}"))),
            Ok(Err(e)) if e.is_no_space() => {}
            Ok(Err(e)) => return Err(fail("spool", e.to_string())),
            Ok(Ok(file)) => {
                if let Err(e) = self.spool.close(file).await {
                    return Err(fail("spool", e.to_string()));
                }
            }
        }
        // The HSM signs with the appliance key on a pooled session, and the signature
        // verifies: the session is logged in and the key usable.
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_be_bytes();
        let msg = [WATCHDOG_CONTEXT, &nonce[..]].concat();
        match tokio::time::timeout(limit, self.keys.signer.sign_async(msg.clone())).await {
            Err(_) => Err(fail("hsm", format!("no signature within {limit:?}"))),
            Ok(Err(e)) => Err(fail("hsm", e.to_string())),
            Ok(Ok(sig)) if self.keys.signer.public_key().verify(&msg, &sig.0).is_err() => {
                Err(fail(
                    "hsm",
                    "the signature does not verify with the key's public key".into(),
                ))
            }
            Ok(Ok(_)) => Ok(()),
        }
    }
}

/// Tells systemd (when it started us with `Type=notify`) that we are ready, and runs `probe`
/// every half watchdog period (`WatchdogSec=`), or every [`HEALTH_PERIOD`] when systemd
/// does not watch us. The result is `baylink_watchdog_healthy`; under a watchdog, systemd
/// is fed only after the probe passed: a process whose HSM or spool no longer works, or
/// whose runtime is starved, stops feeding and is restarted by systemd.
pub fn notify_ready(probe: HealthProbe) {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "cannot notify systemd");
    }
    let mut usec = 0u64;
    let watched = sd_notify::watchdog_enabled(false, &mut usec) && usec > 0;
    let period = if watched {
        let period = Duration::from_micros(usec / 2);
        info!(
            ?period,
            "feeding the systemd watchdog while the spool and the HSM work"
        );
        period
    } else {
        HEALTH_PERIOD
    };
    metrics::gauge!("baylink_watchdog_healthy").set(1.0);
    tokio::spawn(feed_watchdog(probe, period, watched));
}

/// How often the health checks run when systemd's watchdog does not set the pace.
pub const HEALTH_PERIOD: Duration = Duration::from_secs(30);

async fn feed_watchdog(probe: HealthProbe, period: Duration, watched: bool) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match probe.check(period / 2).await {
            Ok(()) => {
                if failing {
                    info!("health checks pass again");
                    failing = false;
                }
                metrics::gauge!("baylink_watchdog_healthy").set(1.0);
                if watched {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
            Err(e) => {
                if !failing {
                    if watched {
                        error!(check = e.check, reason = %e.reason, "health check failed; not feeding the systemd watchdog (systemd restarts the service when it starves)");
                    } else {
                        error!(check = e.check, reason = %e.reason, "health check failed");
                    }
                    failing = true;
                }
                metrics::gauge!("baylink_watchdog_healthy").set(0.0);
                metrics::counter!("baylink_watchdog_check_failures_total", "check" => e.check)
                    .increment(1);
            }
        }
    }
}

/// Tells systemd we are stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}
