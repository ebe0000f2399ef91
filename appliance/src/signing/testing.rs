//! Software P-256 keys for unit tests: the [`Sign`] and [`LogKey`] seams without a token.
//!
//! Compiled only into this crate's `#[cfg(test)]` build (never behind a feature), so a
//! configured appliance has no way to sign in software. Signatures have the HSM's encoding
//! (64-byte `r || s` over SHA-256), and public keys are [`PublicKey`]s built from the SEC1
//! point, so verification runs the production code ([`PublicKey::verify`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use baylink_hsm::{HsmError, PublicKey, Signature};

use super::{DataObjects, LogKey, LogKeyInner, Sign, SignFuture};

/// A P-256 key pair in memory, and the data objects a token would hold beside it.
pub(crate) struct SoftwareKey {
    pair: EcdsaKeyPair,
    public: PublicKey,
    objects: Mutex<HashMap<(String, String), Vec<u8>>>,
}

impl std::fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl SoftwareKey {
    /// A fresh random key.
    pub(crate) fn generate() -> SoftwareKey {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let public = PublicKey::from_sec1(pair.public_key().as_ref()).unwrap();
        SoftwareKey {
            pair,
            public,
            objects: Mutex::default(),
        }
    }

    /// Signs `msg` as the HSM does (SHA-256, ECDSA P-256, `r || s`).
    pub(crate) fn sign(&self, msg: &[u8]) -> Signature {
        let sig = self.pair.sign(&SystemRandom::new(), msg).unwrap();
        Signature::from_slice(sig.as_ref()).unwrap()
    }

    /// The public key.
    pub(crate) fn public_key(&self) -> &PublicKey {
        &self.public
    }
}

impl DataObjects for SoftwareKey {
    fn data_values(&self, label: &str, application: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        let objects = self.objects.lock().unwrap();
        Ok(objects
            .get(&(label.to_owned(), application.to_owned()))
            .cloned()
            .into_iter()
            .collect())
    }
    fn replace_data(&self, label: &str, application: &str, value: &[u8]) -> Result<(), HsmError> {
        self.objects
            .lock()
            .unwrap()
            .insert((label.to_owned(), application.to_owned()), value.to_vec());
        Ok(())
    }
    fn label(&self) -> &str {
        "software (unit tests)"
    }
}

/// One side's key and the pinned key of its peer, in software.
#[derive(Debug, Clone)]
pub(crate) struct SoftwareKeys {
    /// Our key.
    pub(crate) key: Arc<SoftwareKey>,
    /// The peer's public key.
    pub(crate) peer: PublicKey,
}

impl Sign for SoftwareKeys {
    fn sign<'a>(&'a self, context: &'a [u8], body: &'a [u8]) -> SignFuture<'a> {
        let msg = [context, body].concat();
        Box::pin(async move { Ok(self.key.sign(&msg).0.to_vec()) })
    }
    fn peer(&self) -> &PublicKey {
        &self.peer
    }
}

/// An edge and a gateway that pin each other's key: `(edge, gateway)`.
pub(crate) fn pair() -> (SoftwareKeys, SoftwareKeys) {
    let (edge, gateway) = (
        Arc::new(SoftwareKey::generate()),
        Arc::new(SoftwareKey::generate()),
    );
    (
        SoftwareKeys {
            peer: gateway.public_key().clone(),
            key: edge.clone(),
        },
        SoftwareKeys {
            peer: edge.public_key().clone(),
            key: gateway,
        },
    )
}

/// An audit log key in software, its anchor kept in memory.
pub(crate) fn log_key() -> LogKey {
    LogKey(LogKeyInner::Software(Arc::new(SoftwareKey::generate())))
}

mod tests {
    use super::*;
    use crate::signing::{MANIFEST_CONTEXT, RECEIPT_CONTEXT, verify_peer};

    #[tokio::test]
    async fn a_peer_signature_verifies_only_under_its_context_and_key() {
        let (edge, gateway) = pair();
        let sig = edge.sign(MANIFEST_CONTEXT, b"manifest").await.unwrap();
        assert_eq!(sig.len(), baylink_hsm::SIGNATURE_LEN);
        assert!(verify_peer(&gateway, MANIFEST_CONTEXT, b"manifest", &sig));
        // Domain separation: the same bytes signed as a manifest are not a receipt.
        assert!(!verify_peer(&gateway, RECEIPT_CONTEXT, b"manifest", &sig));
        assert!(!verify_peer(&gateway, MANIFEST_CONTEXT, b"manifesT", &sig));
        // Only the pinned key counts: the gateway's own signature is not the edge's.
        let own = gateway.sign(MANIFEST_CONTEXT, b"manifest").await.unwrap();
        assert!(!verify_peer(&gateway, MANIFEST_CONTEXT, b"manifest", &own));
        assert!(!verify_peer(
            &gateway,
            MANIFEST_CONTEXT,
            b"manifest",
            &sig[..63]
        ));
    }
}
