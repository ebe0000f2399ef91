//! A TLS private key held on the token: [`TlsKey`] implements rustls's
//! [`SigningKey`](rustls::sign::SigningKey) over the token's session pool.
//!
//! The key is an EC P-256 key pair found by label, as for [`Signer`]; it signs the TLS
//! handshake with `ecdsa_secp256r1_sha256`: SHA-256 of the handshake transcript in software,
//! `CKM_ECDSA` on the token over the digest, the 64-byte `r || s` the token returns converted
//! to the DER `Ecdsa-Sig-Value` TLS carries. Every signature is verified against the public
//! key before it leaves (as every [`Signer`] signature is).
//!
//! rustls calls the signer synchronously inside the handshake: the thread driving the
//! connection waits for the token (SoftHSM: well under a millisecond) and, when all the pool's
//! sessions are busy, for a free session.

use std::sync::Arc;

use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer as TlsSigner, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::error::HsmError;
use crate::public_key::SIGNATURE_LEN;
use crate::signer::Signer;
use crate::token::Token;

/// A token-held EC P-256 key usable as a rustls signing key (server and client
/// certificates). Cheap to clone.
#[derive(Clone, Debug)]
pub struct TlsKey {
    signer: Signer,
    spki: Arc<[u8]>,
}

impl TlsKey {
    /// The key pair labelled `label` on `token`. Fails like [`Token::signer`]: no such key, a
    /// key that is not P-256, or a private half that does not sign for the public half.
    pub fn open(token: &Token, label: &str) -> Result<TlsKey, HsmError> {
        let signer = Signer::new(token.clone(), label)?;
        Ok(TlsKey::from_signer(signer))
    }

    /// Wraps a signer.
    pub fn from_signer(signer: Signer) -> TlsKey {
        let spki = signer.public_key().to_spki_der().into();
        TlsKey { signer, spki }
    }

    /// The signer underneath (its public key, label, protection attributes).
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The DER SubjectPublicKeyInfo of the key: the certificate must carry exactly this.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// Signs `msg` as TLS's `ecdsa_secp256r1_sha256` wants it: a DER `Ecdsa-Sig-Value`.
    pub fn sign_der(&self, msg: &[u8]) -> Result<Vec<u8>, HsmError> {
        let raw = self.signer.sign(msg)?;
        Ok(raw_to_der(raw.as_bytes()))
    }
}

impl SigningKey for TlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn TlsSigner>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn TlsSigner>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(&self.spki[..]))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl TlsSigner for TlsKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.sign_der(message).map_err(|e| {
            tracing::error!(
                key = %self.signer.key_label(),
                token = %self.signer.token().label(),
                error = %e,
                "TLS handshake signature failed on the token"
            );
            rustls::Error::General(format!("HSM signature failed: {e}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Converts a raw P-256 ECDSA signature (`r || s`, 32 bytes each, big-endian, as PKCS#11's
/// `CKM_ECDSA` returns it) to the DER `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`
/// of RFC 3279 that TLS carries. Each integer is minimal (leading zero bytes dropped) and
/// non-negative (a zero byte prepended when the top bit is set). At most 72 bytes.
pub fn raw_to_der(raw: &[u8; SIGNATURE_LEN]) -> Vec<u8> {
    let (r, s) = raw.split_at(SIGNATURE_LEN / 2);
    let (r, s) = (der_integer(r), der_integer(s));
    // r and s are at most 33 bytes of content each: the lengths fit one byte (short form).
    let body_len = r.len() + s.len();
    let mut out = Vec::with_capacity(2 + body_len);
    out.push(0x30);
    out.push(u8::try_from(body_len).expect("at most 70 bytes"));
    out.extend_from_slice(&r);
    out.extend_from_slice(&s);
    out
}

/// One DER INTEGER (tag, length, content) holding the unsigned big-endian `bytes`.
fn der_integer(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|&b| b != 0);
    let trimmed = match first {
        Some(i) => &bytes[i..],
        // Zero is one zero byte (never for a valid signature, but keep the encoding right).
        None => &[0u8][..],
    };
    let pad = trimmed[0] & 0x80 != 0;
    let len = trimmed.len() + usize::from(pad);
    let mut out = Vec::with_capacity(2 + len);
    out.push(0x02);
    out.push(u8::try_from(len).expect("at most 33 bytes"));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(trimmed);
    out
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING,
        EcdsaKeyPair, KeyPair as _, UnparsedPublicKey,
    };
    use serial_test::serial;

    use super::*;
    use crate::testing::SoftHsm;

    fn raw(r: &[u8; 32], s: &[u8; 32]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(r);
        out[32..].copy_from_slice(s);
        out
    }

    #[test]
    fn der_of_small_values_and_top_bit() {
        // r = 1, s = 0x80 (top bit set in the only byte: a zero byte is prepended).
        let mut r = [0u8; 32];
        r[31] = 1;
        let mut s = [0u8; 32];
        s[31] = 0x80;
        assert_eq!(
            raw_to_der(&raw(&r, &s)),
            [0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x02, 0x00, 0x80]
        );
    }

    #[test]
    fn der_of_full_width_values() {
        // Both top bits set: 33-byte integers, 72 bytes in all.
        let r = [0xff; 32];
        let s = [0x80; 32];
        let der = raw_to_der(&raw(&r, &s));
        assert_eq!(der.len(), 72);
        assert_eq!(&der[..5], &[0x30, 70, 0x02, 33, 0x00]);
        assert_eq!(&der[5..37], &r);
        assert_eq!(&der[37..40], &[0x02, 33, 0x00]);
        assert_eq!(&der[40..], &s);
        // Top bit clear: no padding, 32 bytes each.
        let r = [0x7f; 32];
        let der = raw_to_der(&raw(&r, &r));
        assert_eq!(der.len(), 70);
        assert_eq!(&der[..4], &[0x30, 68, 0x02, 32]);
    }

    #[test]
    fn der_drops_leading_zeros_but_keeps_sign_padding() {
        let mut r = [0u8; 32];
        r[2..].fill(0x90); // two leading zero bytes, then a top-bit-set byte
        let mut s = [0u8; 32];
        s[1..].fill(0x10);
        let der = raw_to_der(&raw(&r, &s));
        assert_eq!(&der[2..5], &[0x02, 31, 0x00]);
        assert_eq!(&der[5..35], &r[2..]);
        assert_eq!(&der[35..37], &[0x02, 31]);
        assert_eq!(&der[37..], &s[1..]);
        assert_eq!(usize::from(der[1]), der.len() - 2);
        // All-zero (never a valid signature) still encodes as INTEGER 0.
        assert_eq!(
            raw_to_der(&[0u8; 64]),
            [0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00]
        );
    }

    #[test]
    fn der_matches_what_aws_lc_verifies() {
        // Software signatures in the fixed form, converted here, verify as ASN.1 signatures;
        // and the conversion reproduces aws-lc's own DER output for the same (r, s).
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let fixed =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, fixed.public_key().as_ref());
        let mut shapes = 0;
        for i in 0..300u32 {
            let msg = i.to_be_bytes();
            let sig = fixed.sign(&rng, &msg).unwrap();
            let raw: [u8; 64] = sig.as_ref().try_into().unwrap();
            let der = raw_to_der(&raw);
            public.verify(&msg, &der).unwrap();
            if raw[0] & 0x80 != 0 || raw[0] == 0 {
                shapes += 1;
            }
        }
        assert!(shapes > 0, "no padded or shortened r in 300 signatures");
        let asn1 =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
        let der = asn1.sign(&rng, b"m").unwrap();
        let back = der_to_raw(der.as_ref());
        assert_eq!(raw_to_der(&back), der.as_ref());
    }

    /// The inverse, for the test only: DER `Ecdsa-Sig-Value` to `r || s`.
    fn der_to_raw(der: &[u8]) -> [u8; 64] {
        assert_eq!(der[0], 0x30);
        let mut out = [0u8; 64];
        let mut at = 2;
        for half in 0..2 {
            assert_eq!(der[at], 0x02);
            let len = usize::from(der[at + 1]);
            let value = &der[at + 2..at + 2 + len];
            let value = value.strip_prefix(&[0]).unwrap_or(value);
            out[half * 32 + 32 - value.len()..half * 32 + 32].copy_from_slice(value);
            at += 2 + len;
        }
        out
    }

    #[test]
    #[serial]
    fn token_key_signs_what_tls_verifies() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("signing").unwrap();
        let public = token.generate_key("tls").unwrap();
        let key = TlsKey::open(&token, "tls").unwrap();
        assert_eq!(key.spki_der(), public.to_spki_der());
        assert_eq!(
            key.public_key().unwrap().as_ref(),
            &public.to_spki_der()[..]
        );
        assert_eq!(key.algorithm(), SignatureAlgorithm::ECDSA);
        assert!(
            key.choose_scheme(&[SignatureScheme::ED25519, SignatureScheme::RSA_PSS_SHA256])
                .is_none()
        );
        let signer = key
            .choose_scheme(&[
                SignatureScheme::ECDSA_NISTP384_SHA384,
                SignatureScheme::ECDSA_NISTP256_SHA256,
            ])
            .unwrap();
        assert_eq!(signer.scheme(), SignatureScheme::ECDSA_NISTP256_SHA256);
        let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public.sec1());
        for msg in [&b"transcript"[..], &[0u8; 0], &[7u8; 4096]] {
            let der = signer.sign(msg).unwrap();
            verifier.verify(msg, &der).unwrap();
        }
        assert!(matches!(
            TlsKey::open(&token, "absent"),
            Err(HsmError::KeyNotFound { .. })
        ));
    }
}
