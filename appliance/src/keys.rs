//! This appliance's keys, opened from its config: the HSM token and signing key
//! (`[hsm]`), the pinned peer key (`peer_signing_key`) and the TLS identity (`[tls]`).
//! Every key that could leave the HSM is refused unless `hsm.allow_extractable` says
//! otherwise. Kept apart from [`crate::signing`] (what is signed, and how it is checked),
//! which the audit log and the orchestration use and which therefore knows nothing of
//! `config`.

use std::sync::Arc;

use anyhow::Context;
use baylink_hsm::{HsmConfig, Signer, TlsKey, Token};
use baylink_net::transport::TlsIdentity;

use crate::config::{Config, TlsKeySource};
use crate::signing::Keys;

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

impl Keys {
    /// Opens the HSM and loads the peer key; fails closed on any problem. A signing key the
    /// token marks extractable or not sensitive is refused unless `hsm.allow_extractable`.
    pub fn open(cfg: &Config) -> anyhow::Result<Keys> {
        let peer = crate::signing::load_public_key(&cfg.peer_signing_key)?;
        let token = Token::open(&hsm_config(cfg)?)?;
        let signer = token.signer()?;
        check_protection(cfg, &signer)?;
        Ok(Keys::from_parts(signer, peer, token))
    }
}
