//! This appliance's keys, opened from its config: the HSM token and signing key
//! (`[hsm]`), the pinned peer key (`peer_signing_key`) and the TLS identity (`[tls]`).
//! Every key that could leave the HSM is refused unless `hsm.allow_extractable` says
//! otherwise. Kept apart from [`crate::signing`] (what is signed, and how it is checked),
//! which the audit log and the orchestration use and which therefore knows nothing of
//! `config`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use baylink_hsm::{HsmConfig, Signer, TlsKey, Token};
use baylink_net::transport::TlsIdentity;

use crate::config::{Config, DeliverySection, TlsKeySource};
use crate::deliver::dicomweb::{DeliveryTls, StowSettings};
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
    identity(cfg, token, "tls", &cfg.tls.cert, &cfg.tls.key)
}

/// The gateway's client identity towards an https record store (`delivery.cert` with the
/// key `delivery.key` names, a PEM file or a key pair on `token`), if the config names one.
/// Fails closed as [`tls_identity`] does.
pub fn delivery_identity(cfg: &Config, token: &Token) -> anyhow::Result<Option<TlsIdentity>> {
    let Some(DeliverySection::DicomWeb(StowSettings {
        tls: Some(DeliveryTls {
            identity: Some((cert, key)),
            ..
        }),
        ..
    })) = &cfg.delivery
    else {
        return Ok(None);
    };
    identity(cfg, token, "delivery", cert, key).map(Some)
}

/// The certificate `cert` with the key `key` names (config keys `<section>.cert` and
/// `<section>.key`): a PEM file, or a key pair on `token`. Fails closed when the key is not
/// the certificate's (the error names both and their public key fingerprints), when the
/// token has no such key, or when the token-held key can leave the token and
/// `hsm.allow_extractable` is false.
fn identity(
    cfg: &Config,
    token: &Token,
    section: &str,
    cert: &Path,
    key: &TlsKeySource,
) -> anyhow::Result<TlsIdentity> {
    let refused = || format!("{section}.cert/{section}.key refused");
    match key {
        TlsKeySource::File(path) => TlsIdentity::from_pem_files(cert, path).with_context(refused),
        TlsKeySource::Hsm { label } => {
            let what = format!("{section}.key");
            let opened = TlsKey::open(token, label).with_context(|| format!("{what} {key}"))?;
            check_key_protection(cfg, opened.signer(), &what)?;
            let name = format!("{key} on token \"{}\"", token.label());
            let identity =
                TlsIdentity::with_key(cert, Arc::new(opened), &name).with_context(refused)?;
            tracing::info!(key = %key, token = %token.label(), config_key = %what, "TLS private key held in the HSM");
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
