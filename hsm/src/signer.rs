//! Signing with a token-held EC P-256 key: SHA-256 in software, `CKM_ECDSA` on the token,
//! and every signature verified against the public key before it is returned.

use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::digest;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use crate::error::HsmError;
use crate::objects::{self, KeyProtection};
use crate::pool::Pool;
use crate::public_key::{PublicKey, Signature};
use crate::token::Token;

/// Signs with one key on one token. Cheap to clone; `Send + Sync`; signatures run concurrently
/// on up to the pool's number of sessions.
#[derive(Clone, Debug)]
pub struct Signer {
    inner: Arc<SignerInner>,
}

#[derive(Debug)]
struct SignerInner {
    token: Token,
    label: String,
    public_key: PublicKey,
    /// What the token said about the private key's protection when it was found.
    protection: KeyProtection,
    /// The private key handle and the pool epoch it was found in.
    key: Mutex<(u64, ObjectHandle)>,
}

// The constructors live here, beside what they construct: the token knows nothing of signers.
impl Token {
    /// A signer for the configured key label. Fails with [`HsmError::KeyNotFound`] if the token
    /// has no such private key, and refuses a key pair whose private half does not sign for
    /// its public half.
    pub fn signer(&self) -> Result<Signer, HsmError> {
        Signer::new(self.clone(), self.key_label())
    }

    /// A signer for another key pair on this token, labelled `label` (e.g. the TLS key); the
    /// same checks as [`Token::signer`].
    pub fn signer_for(&self, label: &str) -> Result<Signer, HsmError> {
        Signer::new(self.clone(), label)
    }
}

impl Signer {
    pub(crate) fn new(token: Token, label: &str) -> Result<Signer, HsmError> {
        objects::check_label(label)?;
        let token_label = token.label().to_owned();
        let (epoch, pair, protection) = token.pool().run(|session, pool| {
            let epoch = pool.epoch();
            let pair = objects::find_key_pair(session, label, &token_label)?;
            let protection = objects::protection(session, pair.private, label, &token_label)?;
            Ok((epoch, pair, protection))
        })?;
        if !protection.sensitive || protection.extractable {
            // Keys made by `generate_key` never are; an operator may have imported one.
            tracing::warn!(
                token = %token_label,
                key = %label,
                sensitive = protection.sensitive,
                extractable = protection.extractable,
                "signing key can leave the token"
            );
        }
        let signer = Signer {
            inner: Arc::new(SignerInner {
                token,
                label: label.to_owned(),
                public_key: pair.public_key,
                protection,
                key: Mutex::new((epoch, pair.private)),
            }),
        };
        // Proves the private key signs for the public key we will publish.
        signer.sign(b"baylink signer self-test")?;
        tracing::info!(
            token = %token_label,
            key = %label,
            fingerprint = %signer.inner.public_key.fingerprint(),
            "signing key ready"
        );
        Ok(signer)
    }

    /// The private key's protection attributes as the token reported them when the key was
    /// found: callers that must not sign with a key that can leave the token check
    /// `sensitive && !extractable`.
    pub fn protection(&self) -> KeyProtection {
        self.inner.protection
    }

    /// Signs `msg`: SHA-256 here, ECDSA on the token, 64-byte `r || s`. Blocks the calling
    /// thread for the token round trip (and while waiting for a free session); use
    /// [`Signer::sign_async`] from async code.
    ///
    /// Fails closed: a token error, a wrong-length result or a signature that does not verify
    /// against [`Signer::public_key`] is an error, never a signature.
    pub fn sign(&self, msg: &[u8]) -> Result<Signature, HsmError> {
        let inner = &*self.inner;
        let hash = digest::digest(&digest::SHA256, msg);
        let raw = inner.token.pool().run(|session, pool| {
            let key = self.key_handle(session, pool)?;
            session
                .sign(&Mechanism::Ecdsa, key, hash.as_ref())
                .map_err(|e| {
                    HsmError::call(
                        format!(
                            "signing with key \"{}\" on token \"{}\"",
                            inner.label,
                            inner.token.label()
                        ),
                        e,
                    )
                })
        })?;
        let signature = Signature::from_slice(&raw).map_err(|_| HsmError::BadSignatureLength {
            label: inner.label.clone(),
            len: raw.len(),
        })?;
        inner
            .public_key
            .verify(msg, signature.as_ref())
            .map_err(|source| HsmError::SelfCheck {
                label: inner.label.clone(),
                source,
            })?;
        Ok(signature)
    }

    /// [`Signer::sign`] on tokio's blocking thread pool.
    pub async fn sign_async(&self, msg: Vec<u8>) -> Result<Signature, HsmError> {
        let signer = self.clone();
        tokio::task::spawn_blocking(move || signer.sign(&msg))
            .await
            .map_err(HsmError::Task)?
    }

    /// The public key that verifies this signer's signatures.
    pub fn public_key(&self) -> &PublicKey {
        &self.inner.public_key
    }

    /// The key label.
    pub fn key_label(&self) -> &str {
        &self.inner.label
    }

    /// The token this signer uses.
    pub fn token(&self) -> &Token {
        &self.inner.token
    }

    /// The private key handle, looked up again after a token reset. A key found again must have
    /// the same public key: a different key under the same label is refused.
    fn key_handle(&self, session: &Session, pool: &Pool) -> Result<ObjectHandle, HsmError> {
        let inner = &*self.inner;
        let epoch = pool.epoch();
        {
            let cached = inner.key.lock().unwrap_or_else(PoisonError::into_inner);
            if cached.0 == epoch {
                return Ok(cached.1);
            }
        }
        let pair = objects::find_key_pair(session, &inner.label, inner.token.label())?;
        if pair.public_key != inner.public_key {
            return Err(HsmError::UnsupportedKey {
                label: inner.label.clone(),
                reason: format!(
                    "after a token reset the label names a different key (SPKI sha256 {}, expected {})",
                    pair.public_key.fingerprint(),
                    inner.public_key.fingerprint()
                ),
            });
        }
        *inner.key.lock().unwrap_or_else(PoisonError::into_inner) = (epoch, pair.private);
        Ok(pair.private)
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use cryptoki::object::{Attribute, ObjectClass};
    use secrecy::SecretString;
    use serial_test::serial;

    use super::*;
    use crate::error::VerifyError;
    use crate::testing::{self, SoftHsm};

    fn signer_with_new_key(hsm: &SoftHsm, label: &str) -> Signer {
        let token = hsm.open(label).unwrap();
        token.generate_key(label).unwrap();
        token.signer().unwrap()
    }

    #[test]
    #[serial]
    fn sign_verify_round_trip() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("manifest").unwrap();
        let generated = token.generate_key("manifest").unwrap();
        let signer = token.signer().unwrap();
        assert_eq!(signer.public_key(), &generated);
        for msg in [&b""[..], b"manifest bytes", &[0xab; 100_000]] {
            let sig = signer.sign(msg).unwrap();
            assert_eq!(sig.as_bytes().len(), 64);
            generated.verify(msg, sig.as_ref()).unwrap();
        }
        // ECDSA is randomised: two signatures of one message differ, both verify.
        let a = signer.sign(b"same").unwrap();
        let b = signer.sign(b"same").unwrap();
        assert_ne!(a, b);
        generated.verify(b"same", b.as_ref()).unwrap();
    }

    #[test]
    #[serial]
    fn verify_refuses_another_keys_signature_and_tampering() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("a").unwrap();
        token.generate_key("a").unwrap();
        token.generate_key("b").unwrap();
        let a = token.signer().unwrap();
        let b = Signer::new(token.clone(), "b").unwrap();
        assert_ne!(a.public_key(), b.public_key());
        let sig = a.sign(b"receipt").unwrap();
        assert_eq!(
            b.public_key().verify(b"receipt", sig.as_ref()),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            a.public_key().verify(b"receipT", sig.as_ref()),
            Err(VerifyError::Mismatch)
        );
        let mut flipped = sig;
        flipped.0[63] ^= 0x01;
        assert_eq!(
            a.public_key().verify(b"receipt", flipped.as_ref()),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            a.public_key().verify(b"receipt", &sig.as_ref()[..32]),
            Err(VerifyError::BadLength { len: 32 })
        );
    }

    #[test]
    #[serial]
    fn missing_key_names_label_and_token() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("absent-key").unwrap();
        let err = token.signer().unwrap_err();
        match &err {
            HsmError::KeyNotFound { label, token: t } => {
                assert_eq!(label, "absent-key");
                assert_eq!(t, hsm.token_label());
            }
            other => panic!("expected KeyNotFound, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "no private key labelled \"absent-key\" on token \"{}\"",
                hsm.token_label()
            )
        );
    }

    #[test]
    #[serial]
    fn mismatched_key_pair_fails_closed() {
        // The label "k1" ends up on k1's private key and k2's public key: signatures from the
        // token do not verify against the public key, so no signer is made.
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("k1").unwrap();
        token.generate_key("k1").unwrap();
        token.generate_key("k2").unwrap();
        token
            .pool()
            .run(|_, pool| {
                let rw = pool.rw_session()?;
                let public = |label: &[u8]| {
                    rw.find_objects(&[
                        Attribute::Class(ObjectClass::PUBLIC_KEY),
                        Attribute::Label(label.to_vec()),
                    ])
                    .unwrap()[0]
                };
                let (p1, p2) = (public(b"k1"), public(b"k2"));
                rw.update_attributes(p1, &[Attribute::Label(b"k1-old".to_vec())])
                    .unwrap();
                rw.update_attributes(p2, &[Attribute::Label(b"k1".to_vec())])
                    .unwrap();
                Ok(())
            })
            .unwrap();
        let err = token.signer().unwrap_err();
        assert!(
            matches!(&err, HsmError::SelfCheck { label, source: VerifyError::Mismatch } if label == "k1"),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not verify"), "{err}");
    }

    #[test]
    #[serial]
    fn public_key_pem_round_trip() {
        let hsm = SoftHsm::new().unwrap();
        let signer = signer_with_new_key(&hsm, "k");
        let pem = signer.public_key().to_pem();
        let parsed = PublicKey::from_pem(&pem).unwrap();
        assert_eq!(&parsed, signer.public_key());
        assert_eq!(parsed.fingerprint(), signer.public_key().fingerprint());
        let sig = signer.sign(b"checkpoint").unwrap();
        parsed.verify(b"checkpoint", sig.as_ref()).unwrap();
        assert_eq!(signer.token().public_key("k").unwrap(), parsed);
    }

    #[test]
    #[serial]
    fn concurrent_signing_from_threads() {
        let hsm = SoftHsm::new().unwrap();
        let signer = signer_with_new_key(&hsm, "k");
        thread::scope(|scope| {
            for t in 0..8u32 {
                let signer = signer.clone();
                scope.spawn(move || {
                    for i in 0..200u32 {
                        let msg = format!("thread {t} message {i}");
                        let sig = signer.sign(msg.as_bytes()).unwrap();
                        signer
                            .public_key()
                            .verify(msg.as_bytes(), sig.as_ref())
                            .unwrap();
                    }
                });
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[serial]
    async fn concurrent_signing_from_tasks() {
        let hsm = SoftHsm::new().unwrap();
        let signer = signer_with_new_key(&hsm, "k");
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..8u32 {
            let signer = signer.clone();
            tasks.spawn(async move {
                for i in 0..200u32 {
                    let msg = format!("task {t} message {i}").into_bytes();
                    let sig = signer.sign_async(msg.clone()).await.unwrap();
                    signer.public_key().verify(&msg, sig.as_ref()).unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        drop(signer);
    }

    #[test]
    #[serial]
    fn recovers_after_all_sessions_closed_behind_the_pool() {
        let hsm = SoftHsm::new().unwrap();
        let signer = signer_with_new_key(&hsm, "k");
        let token = signer.token().clone();
        signer.sign(b"before").unwrap();
        let epoch = token.pool().epoch();
        // Every session of this process closes and the login is gone, as after a reset.
        testing::close_all_sessions(hsm.module(), token.slot_id()).unwrap();
        let sig = signer.sign(b"after").unwrap();
        signer.public_key().verify(b"after", sig.as_ref()).unwrap();
        assert!(token.pool().epoch() > epoch, "a recovery ran");
        // The whole pool works again, from many threads at once.
        testing::close_all_sessions(hsm.module(), token.slot_id()).unwrap();
        thread::scope(|scope| {
            for t in 0..8u32 {
                let signer = signer.clone();
                scope.spawn(move || {
                    for i in 0..20u32 {
                        let msg = format!("{t}/{i}");
                        signer.sign(msg.as_bytes()).unwrap();
                    }
                });
            }
        });
    }

    #[test]
    #[serial]
    fn logs_in_again_after_a_logout_behind_the_pool() {
        let hsm = SoftHsm::new().unwrap();
        let signer = signer_with_new_key(&hsm, "k");
        let token = signer.token().clone();
        // Logout is per application and token: every pooled session loses the login.
        let rw = token.pool().rw_session().unwrap();
        rw.logout().unwrap();
        let epoch = token.pool().epoch();
        let sig = signer.sign(b"after logout").unwrap();
        signer
            .public_key()
            .verify(b"after logout", sig.as_ref())
            .unwrap();
        assert!(token.pool().epoch() > epoch, "a recovery ran");
    }

    #[test]
    #[serial]
    fn a_refused_pin_is_not_retried() {
        let hsm = SoftHsm::new().unwrap();
        let signer = signer_with_new_key(&hsm, "k");
        let token = signer.token().clone();
        // Someone changes the user PIN and the login is lost: our PIN is now wrong.
        let rw = token.pool().rw_session().unwrap();
        rw.set_pin(&testing::user_pin(), &SecretString::from("changed-pin"))
            .unwrap();
        rw.logout().unwrap();
        let first = signer.sign(b"m").unwrap_err().to_string();
        assert!(first.contains("C_Login: CKR_PIN_INCORRECT"), "{first}");
        let second = signer.sign(b"m").unwrap_err().to_string();
        assert!(second.contains("refused the PIN before"), "{second}");
        // Still names the token's answer, without asking the token again.
        assert!(second.contains("C_Login: CKR_PIN_INCORRECT"), "{second}");
    }

    #[test]
    #[serial]
    fn signer_and_token_are_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Signer>();
        check::<Token>();
        let _hsm = SoftHsm::new().unwrap();
    }
}
