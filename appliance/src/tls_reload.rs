//! SIGHUP: `tls.cert`, `tls.key` and `tls.ca` read again, and new handshakes use them; on a
//! gateway delivering to an `https://` store, `delivery.ca`, `delivery.cert` and
//! `delivery.key` too, for its next connections to the store.
//!
//! A reload reads and checks everything first (the certificate's key is the key `tls.key`
//! names, the CA file parses); only then does each door swap its configuration. Handshakes
//! already done keep theirs: connections, uploads and transfers in progress are not touched.
//! On any error the previous configuration stays in force (an ERROR names the key and the
//! reason, `baylink_tls_reloads_total{outcome="failed"}` counts it): a typo never closes the
//! doors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use baylink_hsm::Token;
use baylink_net::transport::{self, TlsIdentity};
use rustls_pki_types::CertificateDer;
use tracing::{error, info};

use crate::config::{Config, DeliverySection, Role, TlsKeySource};
use crate::deliver::dicomweb::StowSettings;

/// A value replaced whole while readers hold the one they took: each handshake reads the
/// current configuration once ([`Swap::current`]); a reload replaces it ([`Swap::replace`]).
#[derive(Debug)]
pub struct Swap<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Swap<T> {
    fn clone(&self) -> Self {
        Swap(self.0.clone())
    }
}

impl<T> Swap<T> {
    /// A swap holding `value`.
    pub fn new(value: T) -> Swap<T> {
        Swap(Arc::new(RwLock::new(Arc::new(value))))
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `value` in force for every later [`Swap::current`].
    pub fn replace(&self, value: impl Into<Arc<T>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = value.into();
    }
}

/// What a reload read and checked.
#[derive(Debug)]
pub struct Loaded {
    /// `tls.cert` with the key `tls.key` names (checked to match).
    pub identity: TlsIdentity,
    /// `tls.ca`.
    pub ca: Vec<CertificateDer<'static>>,
    /// The client configuration towards an `https://` record store, built from
    /// `delivery.ca`, `delivery.cert` and `delivery.key` as read now (`None`: no such store).
    pub delivery: Option<Arc<rustls::ClientConfig>>,
}

fn readable(key: &str, path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .with_context(|| format!("{key}: cannot read {}", path.display()))
}

/// Reads `tls.cert`, `tls.key` (a PEM file or a key on `token`) and `tls.ca`, and the
/// `delivery.ca`, `delivery.cert` and `delivery.key` of an `https://` store, with the same
/// checks as at start; each error names its config key.
pub fn load(cfg: &Config, token: &Token) -> anyhow::Result<Loaded> {
    readable("tls.cert", &cfg.tls.cert)?;
    if let TlsKeySource::File(path) = &cfg.tls.key {
        readable("tls.key", path)?;
    }
    readable("tls.ca", &cfg.tls.ca)?;
    let identity = crate::keys::tls_identity(cfg, token)?;
    let ca = transport::load_ca(&cfg.tls.ca)
        .with_context(|| format!("tls.ca: {} refused", cfg.tls.ca.display()))?;
    transport::root_store(&ca)
        .with_context(|| format!("tls.ca: {} refused", cfg.tls.ca.display()))?;
    Ok(Loaded {
        identity,
        ca,
        delivery: load_delivery(cfg, token)?,
    })
}

/// The client configuration towards an `https://` record store, if the config names one.
fn load_delivery(cfg: &Config, token: &Token) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = &cfg.delivery else {
        return Ok(None);
    };
    // Only a gateway delivers: an edge ignores a `[delivery]` section left in its config.
    if cfg.role != Role::Gateway {
        return Ok(None);
    }
    readable("delivery.ca", &tls.ca)?;
    if let Some((cert, key)) = &tls.identity {
        readable("delivery.cert", cert)?;
        if let TlsKeySource::File(path) = key {
            readable("delivery.key", path)?;
        }
    }
    let identity = crate::keys::delivery_identity(cfg, token)?;
    let config = crate::deliver::dicomweb::store_client_config(tls, identity.as_ref())?;
    Ok(Some(Arc::new(config)))
}

/// One SIGHUP's TLS reload: [`load`] on a blocking thread, then `apply` (which builds every
/// door's new configuration and swaps them only when all of them built). Counts the outcome,
/// refreshes `baylink_certificate_expiry_seconds` for `expiry_files` and logs the new
/// certificate's subject and expiry (INFO), or the error (ERROR) with the old configuration
/// kept. Returns whether the new configuration is in force.
pub async fn reload(
    cfg: Arc<Config>,
    token: Token,
    expiry_files: &[(&'static str, PathBuf)],
    apply: impl FnOnce(&Loaded) -> anyhow::Result<()>,
) -> bool {
    let loaded = match tokio::task::spawn_blocking(move || load(&cfg, &token)).await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("reload task failed: {e}")),
    };
    let outcome = loaded.and_then(|l| apply(&l).map(|()| l));
    match outcome {
        Ok(l) => {
            metrics::counter!("baylink_tls_reloads_total", "outcome" => "ok").increment(1);
            crate::telemetry::refresh_certificates(expiry_files);
            let leaf = l
                .identity
                .cert_chain
                .first()
                .and_then(|c| baylink_net::probe::summarize(c).ok());
            let (subject, not_after) = leaf.map_or_else(
                || ("?".to_owned(), "?".to_owned()),
                |s| {
                    let after = std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(u64::try_from(s.not_after).unwrap_or(0));
                    (
                        s.subject,
                        humantime::format_rfc3339_seconds(after).to_string(),
                    )
                },
            );
            info!(%subject, %not_after, ca_certificates = l.ca.len(), "TLS reloaded: new handshakes use tls.cert, tls.key and tls.ca as read now");
            true
        }
        Err(e) => {
            metrics::counter!("baylink_tls_reloads_total", "outcome" => "failed").increment(1);
            error!(error = %format!("{e:#}"), "TLS not reloaded; the previous certificate, key and CA stay in force");
            false
        }
    }
}
