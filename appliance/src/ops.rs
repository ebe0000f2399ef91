//! Operations: Prometheus metrics, `/healthz`, systemd notification and watchdog, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{info, warn};

/// Health of the process, as `/healthz` reports it.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
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
    // Make the contract's series exist from the start.
    for direction in ["sent", "received"] {
        metrics::counter!("baylink_bytes_total", "direction" => direction).increment(0);
    }
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
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Tells systemd (when it started us with `Type=notify`) that we are ready, and keeps its
/// watchdog fed from a task while the runtime runs.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "cannot notify systemd");
    }
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let period = Duration::from_micros(usec / 2);
        info!(?period, "feeding the systemd watchdog");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

/// Tells systemd we are stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
