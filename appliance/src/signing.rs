//! What the appliance signs and verifies, and with which keys.
//!
//! Every signed object is prefixed with a context string before signing, so a signature over
//! a manifest can never be replayed as a receipt (or as an audit checkpoint) and vice versa.
//! A configured appliance signs only in the HSM: it has no software key and no way to skip
//! verification.
//!
//! Two seams let the orchestration (sealing, the gateway's commit, the edge's receipt check,
//! the delivery notices, the audit log's checkpoints) be unit-tested without a token:
//!
//! - [`Sign`]: what sealing, committing and checking need of a key pair (sign under a
//!   context; the pinned peer key that [`verify_peer`] checks against). [`Keys`] is the one
//!   implementation a configured appliance can build ([`Keys::open`], through the HSM).
//! - [`LogKey`]: the key an audit log signs checkpoints with and the token it keeps its
//!   anchor on. [`LogKey::from`] a [`Signer`] is the one way to build it outside tests.
//!
//! The software P-256 keys behind both seams in unit tests (`signing::testing`) exist only in
//! this crate's `#[cfg(test)]` build: no feature, configuration or constructor of the
//! shipped appliance reaches them. Verification is always [`PublicKey::verify`], the same
//! code path as in production.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use baylink_hsm::{HsmError, PublicKey, Signature, Signer, Token};

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

/// A future a [`Sign`] implementation returns.
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Vec<u8>>> + Send + 'a>>;

/// What the orchestration needs of this appliance's key pair: a signature under a context
/// (manifest, receipt, delivery notice) and the peer's pinned key to check the peer's
/// signatures against ([`verify_peer`]).
///
/// [`Keys`] (the HSM) is the only implementation outside unit tests.
pub trait Sign: Send + Sync + std::fmt::Debug {
    /// Signs `context ‖ body`; returns the 64-byte `r || s` ECDSA P-256 signature.
    fn sign<'a>(&'a self, context: &'a [u8], body: &'a [u8]) -> SignFuture<'a>;
    /// The other appliance's public key (pinned in config).
    fn peer(&self) -> &PublicKey;
    /// Total time spent waiting for signatures, in microseconds (0 where nothing waits).
    fn waited_us(&self) -> u64 {
        0
    }
}

/// Verifies the peer's signature over `body` under `context` with `keys`' pinned peer key
/// ([`PublicKey::verify`]: the same check whatever signed).
pub fn verify_peer(keys: &dyn Sign, context: &[u8], body: &[u8], signature: &[u8]) -> bool {
    let msg = [context, body].concat();
    keys.peer().verify(&msg, signature).is_ok()
}

/// The token-side storage an audit log keeps its anchor and witness state in: private data
/// objects of the HSM token ([`Token::data_values`], [`Token::replace_data`]).
pub trait DataObjects: Send + Sync {
    /// The values of the data objects `label` of `application` (see [`Token::data_values`]).
    fn data_values(&self, label: &str, application: &str) -> Result<Vec<Vec<u8>>, HsmError>;
    /// Replaces the data object `label` of `application` (see [`Token::replace_data`]).
    fn replace_data(&self, label: &str, application: &str, value: &[u8]) -> Result<(), HsmError>;
    /// The token's label (for error messages).
    fn label(&self) -> &str;
}

impl DataObjects for Token {
    fn data_values(&self, label: &str, application: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        Token::data_values(self, label, application)
    }
    fn replace_data(&self, label: &str, application: &str, value: &[u8]) -> Result<(), HsmError> {
        Token::replace_data(self, label, application, value)
    }
    fn label(&self) -> &str {
        Token::label(self)
    }
}

/// The key an audit log signs its checkpoints (and a witness its cosignatures) with, and the
/// token holding its anchor. Outside unit tests it is always an HSM [`Signer`].
#[derive(Debug, Clone)]
pub struct LogKey(LogKeyInner);

#[derive(Debug, Clone)]
enum LogKeyInner {
    Hsm(Signer),
    #[cfg(test)]
    Software(Arc<testing::SoftwareKey>),
}

impl From<Signer> for LogKey {
    fn from(signer: Signer) -> LogKey {
        LogKey(LogKeyInner::Hsm(signer))
    }
}

impl LogKey {
    /// Signs `msg` (blocking; see [`Signer::sign`]).
    pub fn sign(&self, msg: &[u8]) -> Result<Signature, HsmError> {
        match &self.0 {
            LogKeyInner::Hsm(s) => s.sign(msg),
            #[cfg(test)]
            LogKeyInner::Software(k) => Ok(k.sign(msg)),
        }
    }

    /// The public key that verifies its signatures.
    pub fn public_key(&self) -> &PublicKey {
        match &self.0 {
            LogKeyInner::Hsm(s) => s.public_key(),
            #[cfg(test)]
            LogKeyInner::Software(k) => k.public_key(),
        }
    }

    /// Where the log's anchor lives: the signer's token.
    pub fn token(&self) -> &dyn DataObjects {
        match &self.0 {
            LogKeyInner::Hsm(s) => s.token(),
            #[cfg(test)]
            LogKeyInner::Software(k) => &**k,
        }
    }
}

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

/// Reads a PEM public key from a file.
pub fn load_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read peer key {}", path.display()))?;
    PublicKey::from_pem(&pem).with_context(|| format!("peer key {}", path.display()))
}

impl Keys {
    /// Keys from an opened token's signer and the pinned peer key; [`Keys::open`]
    /// (`crate::keys`) builds them from a config.
    pub fn from_parts(signer: Signer, peer: PublicKey, token: Token) -> Keys {
        Keys {
            signer,
            peer,
            token,
            waited_us: Arc::default(),
        }
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
        verify_peer(self, context, body, signature)
    }
}

impl Sign for Keys {
    fn sign<'a>(&'a self, context: &'a [u8], body: &'a [u8]) -> SignFuture<'a> {
        Box::pin(Keys::sign(self, context, body))
    }
    fn peer(&self) -> &PublicKey {
        &self.peer
    }
    fn waited_us(&self) -> u64 {
        Keys::waited_us(self)
    }
}

#[cfg(test)]
pub(crate) mod testing;
