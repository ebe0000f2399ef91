//! What the appliance signs and verifies, and with which keys.
//!
//! Every signed object is prefixed with a context string before signing, so a signature over
//! a manifest can never be replayed as a receipt (or as an audit checkpoint) and vice versa.
//! Signing happens only in the HSM: there is no software key and no way to skip verification.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use baylink_hsm::{HsmConfig, PublicKey, Signer, TlsKey, Token};
use baylink_net::transport::TlsIdentity;

use crate::config::{Config, TlsKeySource};

/// Context of a manifest signature (edge HSM).
pub const MANIFEST_CONTEXT: &[u8] = b"baylink/1 manifest\n";
/// Context of a receipt signature (gateway HSM).
pub const RECEIPT_CONTEXT: &[u8] = b"baylink/1 receipt\n";
/// Context of a delivery notice signature (gateway HSM): the record store took the transfer,
/// or refused it.
pub const DELIVERY_NOTICE_CONTEXT: &[u8] = b"baylink/1 delivery notice\n";
/// Context of the watchdog's health signature (own HSM; the signature is checked and
/// discarded, never sent or stored).
pub const WATCHDOG_CONTEXT: &[u8] = b"baylink/1 watchdog\n";

/// This appliance's HSM signer and the pinned key of its peer.
#[derive(Debug, Clone)]
pub struct Keys {
    /// Our HSM-held signing key.
    pub signer: Signer,
    /// The other appliance's public key (pinned in config).
    pub peer: PublicKey,
    /// The token (kept open for the lifetime of the keys).
    pub token: Token,
    waited_us: Arc<AtomicU64>,
}

/// The HSM settings of a config, with the PIN read from its file.
pub fn hsm_config(cfg: &Config) -> anyhow::Result<HsmConfig> {
    let pin = baylink_hsm::read_pin(&cfg.hsm.pin_file)?;
    Ok(HsmConfig {
        module: cfg.hsm.module.clone(),
        token_label: cfg.hsm.token_label.clone(),
        key_label: cfg.hsm.key_label.clone(),
        pin,
        sessions: cfg.hsm.sessions,
    })
}

/// Refuses a signing key that can leave the HSM (`CKA_EXTRACTABLE` true or `CKA_SENSITIVE`
/// false), unless the config accepts it with `hsm.allow_extractable = true`.
fn check_protection(cfg: &Config, signer: &Signer) -> anyhow::Result<()> {
    check_key_protection(cfg, signer, "hsm.key_label")
}

/// [`check_protection`] for the key behind config key `what` (`hsm.key_label`, `tls.key`).
fn check_key_protection(cfg: &Config, signer: &Signer, what: &str) -> anyhow::Result<()> {
    let p = signer.protection();
    let mut exposed = Vec::new();
    if p.extractable {
        exposed.push("extractable (CKA_EXTRACTABLE true)");
    }
    if !p.sensitive {
        exposed.push("not sensitive (CKA_SENSITIVE false)");
    }
    if exposed.is_empty() || cfg.hsm.allow_extractable {
        return Ok(());
    }
    Err(anyhow::Error::from(baylink_hsm::HsmError::UnsupportedKey {
        label: signer.key_label().to_owned(),
        reason: format!(
            "its private key on token {} is {}, so it can leave the HSM; generate one that \
             cannot (`baylink hsm keygen`) or, to accept this key, set \
             hsm.allow_extractable = true",
            cfg.hsm.token_label,
            exposed.join(" and ")
        ),
    })
    .context(what.to_owned()))
}

/// This appliance's TLS identity: `tls.cert` with the key `tls.key` names, a PEM file or a key
/// pair on `token` (the `[hsm]` token). Fails closed when the key is not the certificate's
/// (the error names both and their public key fingerprints), when the token has no such key,
/// or when the token-held key can leave the token and `hsm.allow_extractable` is false.
pub fn tls_identity(cfg: &Config, token: &Token) -> anyhow::Result<TlsIdentity> {
    match &cfg.tls.key {
        TlsKeySource::File(path) => {
            TlsIdentity::from_pem_files(&cfg.tls.cert, path).context("tls.cert/tls.key refused")
        }
        TlsKeySource::Hsm { label } => {
            let key =
                TlsKey::open(token, label).with_context(|| format!("tls.key {}", cfg.tls.key))?;
            check_key_protection(cfg, key.signer(), "tls.key")?;
            let name = format!("{} on token \"{}\"", cfg.tls.key, token.label());
            let identity = TlsIdentity::with_key(&cfg.tls.cert, Arc::new(key), &name)
                .context("tls.cert/tls.key refused")?;
            tracing::info!(key = %cfg.tls.key, token = %token.label(), "TLS private key held in the HSM");
            Ok(identity)
        }
    }
}

/// Reads a PEM public key from a file.
pub fn load_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read peer key {}", path.display()))?;
    PublicKey::from_pem(&pem).with_context(|| format!("peer key {}", path.display()))
}

impl Keys {
    /// Opens the HSM and loads the peer key; fails closed on any problem. A signing key the
    /// token marks extractable or not sensitive is refused unless `hsm.allow_extractable`.
    pub fn open(cfg: &Config) -> anyhow::Result<Keys> {
        let peer = load_public_key(&cfg.peer_signing_key)?;
        let token = Token::open(&hsm_config(cfg)?)?;
        let signer = token.signer()?;
        check_protection(cfg, &signer)?;
        Ok(Keys {
            signer,
            peer,
            token,
            waited_us: Arc::default(),
        })
    }

    /// Signs `body` under `context` in the HSM (on a blocking thread).
    pub async fn sign(&self, context: &[u8], body: &[u8]) -> anyhow::Result<Vec<u8>> {
        let msg = [context, body].concat();
        let started = Instant::now();
        let sig = self.signer.sign_async(msg).await?;
        let waited = started.elapsed();
        metrics::histogram!("baylink_hsm_sign_seconds").record(waited.as_secs_f64());
        self.waited_us.fetch_add(
            u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        Ok(sig.0.to_vec())
    }

    /// Total time spent waiting for HSM signatures through these keys, in microseconds.
    pub fn waited_us(&self) -> u64 {
        self.waited_us.load(Ordering::Relaxed)
    }

    /// Verifies the peer's signature over `body` under `context`.
    pub fn verify_peer(&self, context: &[u8], body: &[u8], signature: &[u8]) -> bool {
        let msg = [context, body].concat();
        self.peer.verify(&msg, signature).is_ok()
    }
}
