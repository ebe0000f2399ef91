//! P-256 public keys and signatures: SPKI PEM in and out, verification with aws-lc-rs.
//!
//! Verification needs no token: receivers check manifests and receipts with the peer's public key.

use std::fmt;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::{self, PemObject};

use crate::error::{PublicKeyError, VerifyError};

/// DER of `SubjectPublicKeyInfo { AlgorithmIdentifier { id-ecPublicKey, prime256v1 }, BIT STRING }`
/// up to the point: a P-256 SPKI is always this prefix followed by the 65-byte uncompressed point.
const SPKI_P256_PREFIX: [u8; 26] = [
    0x30, 0x59, // SEQUENCE, 89 bytes
    0x30, 0x13, // SEQUENCE, 19 bytes: AlgorithmIdentifier
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, // OID 1.2.840.10045.2.1 id-ecPublicKey
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
    0x07, // OID 1.2.840.10045.3.1.7 prime256v1
    0x03, 0x42, 0x00, // BIT STRING, 66 bytes, no unused bits
];

/// Length of an uncompressed SEC1 P-256 point (`04 || x || y`).
pub const SEC1_POINT_LEN: usize = 65;
/// Length of a P-256 SubjectPublicKeyInfo in DER.
pub const SPKI_LEN: usize = SPKI_P256_PREFIX.len() + SEC1_POINT_LEN;
/// Length of a raw ECDSA P-256 signature (`r || s`).
pub const SIGNATURE_LEN: usize = 64;

const PEM_BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
const PEM_END: &str = "-----END PUBLIC KEY-----";
/// Far above the 130 or so bytes a P-256 PEM needs; refuse anything larger before decoding.
const MAX_PEM_LEN: usize = 4096;

/// An ECDSA P-256 signature in the fixed `r || s` form the token returns.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl Signature {
    /// Takes exactly 64 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, VerifyError> {
        <[u8; SIGNATURE_LEN]>::try_from(bytes)
            .map(Signature)
            .map_err(|_| VerifyError::BadLength { len: bytes.len() })
    }

    /// Parses 128 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, VerifyError> {
        let mut out = [0u8; SIGNATURE_LEN];
        if text.len() != 2 * SIGNATURE_LEN {
            return Err(VerifyError::BadLength {
                len: text.len() / 2,
            });
        }
        hex::decode_to_slice(text, &mut out).map_err(|_| VerifyError::NotHex)?;
        Ok(Signature(out))
    }

    /// The 64 bytes.
    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }

    /// Lower-case hex, 128 digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl AsRef<[u8]> for Signature {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_hex())
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An EC P-256 public key (uncompressed SEC1 point), checked to lie on the curve.
#[derive(Clone)]
pub struct PublicKey {
    point: [u8; SEC1_POINT_LEN],
    parsed: ParsedPublicKey,
}

impl PublicKey {
    /// From a 65-byte uncompressed point; refuses compressed points and points off the curve.
    pub fn from_sec1(point: &[u8]) -> Result<Self, PublicKeyError> {
        let point: [u8; SEC1_POINT_LEN] = point.try_into().map_err(|_| PublicKeyError::BadPoint)?;
        if point[0] != 0x04 {
            return Err(PublicKeyError::BadPoint);
        }
        let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .map_err(|_| PublicKeyError::BadPoint)?;
        Ok(PublicKey { point, parsed })
    }

    /// From a DER SubjectPublicKeyInfo (the body of a `PUBLIC KEY` PEM block).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, PublicKeyError> {
        match der.strip_prefix(&SPKI_P256_PREFIX[..]) {
            Some(point) if der.len() == SPKI_LEN => Self::from_sec1(point),
            _ => Err(PublicKeyError::NotP256Spki),
        }
    }

    /// From PEM text holding a `PUBLIC KEY` block (text around it, and blocks of other
    /// kinds, are ignored; the first `PUBLIC KEY` block is taken).
    pub fn from_pem(pem: &str) -> Result<Self, PublicKeyError> {
        if pem.len() > MAX_PEM_LEN {
            return Err(PublicKeyError::Pem {
                reason: "longer than any P-256 public key",
            });
        }
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).map_err(pem_error)?;
        Self::from_spki_der(der.as_ref())
    }

    /// The uncompressed SEC1 point.
    pub fn sec1(&self) -> &[u8; SEC1_POINT_LEN] {
        &self.point
    }

    /// DER SubjectPublicKeyInfo.
    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(SPKI_LEN);
        der.extend_from_slice(&SPKI_P256_PREFIX);
        der.extend_from_slice(&self.point);
        der
    }

    /// PEM `PUBLIC KEY` block (SPKI), 64 characters a line, with a trailing newline.
    pub fn to_pem(&self) -> String {
        let body = STANDARD.encode(self.to_spki_der());
        let mut pem = String::with_capacity(body.len() + 64);
        pem.push_str(PEM_BEGIN);
        pem.push('\n');
        for line in body.as_bytes().chunks(64) {
            // base64 output is ASCII, so every chunk is valid UTF-8.
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        pem
    }

    /// Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo (as `openssl pkey -pubin
    /// -outform DER | sha256sum` prints it).
    pub fn fingerprint(&self) -> String {
        hex::encode(digest::digest(&digest::SHA256, &self.to_spki_der()))
    }

    /// Checks an ECDSA P-256 / SHA-256 signature (`r || s`, 64 bytes) over `msg`.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
        if signature.len() != SIGNATURE_LEN {
            return Err(VerifyError::BadLength {
                len: signature.len(),
            });
        }
        self.parsed
            .verify_sig(msg, signature)
            .map_err(|_| VerifyError::Mismatch)
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.point == other.point
    }
}

impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(P-256, sha256:{})", self.fingerprint())
    }
}

/// What a PEM parse error means for a public key file.
fn pem_error(e: pem::Error) -> PublicKeyError {
    let reason = match e {
        pem::Error::Base64Decode(detail) => return PublicKeyError::Base64(detail),
        pem::Error::NoItemsFound => "no \"-----BEGIN PUBLIC KEY-----\" block",
        pem::Error::MissingSectionEnd { .. } => "a block without its \"-----END\" line",
        pem::Error::IllegalSectionStart { .. } => "a malformed \"-----BEGIN\" line",
        _ => "unreadable PEM",
    };
    PublicKeyError::Pem { reason }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    use super::*;

    /// A software key, for testing verification only (production signs on the token).
    fn software_key() -> (EcdsaKeyPair, PublicKey) {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let public = PublicKey::from_sec1(pair.public_key().as_ref()).unwrap();
        (pair, public)
    }

    #[test]
    fn verify_accepts_good_and_refuses_tampered() {
        let (pair, public) = software_key();
        let sig = pair.sign(&SystemRandom::new(), b"manifest").unwrap();
        public.verify(b"manifest", sig.as_ref()).unwrap();
        assert_eq!(
            public.verify(b"manifesT", sig.as_ref()),
            Err(VerifyError::Mismatch)
        );
        let mut bad = sig.as_ref().to_vec();
        bad[10] ^= 1;
        assert_eq!(public.verify(b"manifest", &bad), Err(VerifyError::Mismatch));
        assert_eq!(
            public.verify(b"manifest", &bad[..63]),
            Err(VerifyError::BadLength { len: 63 })
        );
        assert_eq!(
            public.verify(b"manifest", &[]),
            Err(VerifyError::BadLength { len: 0 })
        );
        assert_eq!(
            public.verify(b"manifest", &[0; 64]),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn pem_round_trip_matches_aws_lc_spki() {
        let (pair, public) = software_key();
        let pem = public.to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(pem.ends_with("-----END PUBLIC KEY-----\n"));
        assert_eq!(PublicKey::from_pem(&pem).unwrap(), public);
        // The SPKI we build is what aws-lc builds.
        let der = public.to_spki_der();
        let theirs = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &der).unwrap();
        let sig = pair.sign(&SystemRandom::new(), b"x").unwrap();
        theirs.verify_sig(b"x", sig.as_ref()).unwrap();
        assert_eq!(public.fingerprint().len(), 64);
    }

    #[test]
    fn pem_with_crlf_and_surrounding_text_parses() {
        let (_, public) = software_key();
        let pem = format!(
            "comment\r\n{}trailer",
            public.to_pem().replace('\n', "\r\n")
        );
        assert_eq!(PublicKey::from_pem(&pem).unwrap(), public);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        assert!(matches!(
            PublicKey::from_pem(""),
            Err(PublicKeyError::Pem { .. })
        ));
        assert!(matches!(
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n"),
            Err(PublicKeyError::Base64(_))
        ));
        assert!(matches!(
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
            Err(PublicKeyError::NotP256Spki)
        ));
        let huge = "A".repeat(MAX_PEM_LEN + 1);
        assert!(matches!(
            PublicKey::from_pem(&huge),
            Err(PublicKeyError::Pem { .. })
        ));
        assert_eq!(
            PublicKey::from_sec1(&[4; 65]).unwrap_err(),
            PublicKeyError::BadPoint
        );
        assert_eq!(
            PublicKey::from_sec1(&[4; 64]).unwrap_err(),
            PublicKeyError::BadPoint
        );
        let (_, public) = software_key();
        let mut compressed = public.sec1().to_vec();
        compressed[0] = 0x02;
        assert_eq!(
            PublicKey::from_sec1(&compressed).unwrap_err(),
            PublicKeyError::BadPoint
        );
    }

    #[test]
    fn signature_helpers() {
        let sig = Signature([7; 64]);
        assert_eq!(Signature::from_hex(&sig.to_hex()).unwrap(), sig);
        assert_eq!(Signature::from_slice(sig.as_ref()).unwrap(), sig);
        assert_eq!(
            Signature::from_slice(&[0; 65]),
            Err(VerifyError::BadLength { len: 65 })
        );
        assert_eq!(
            Signature::from_hex("zz"),
            Err(VerifyError::BadLength { len: 1 })
        );
        assert_eq!(
            Signature::from_hex(&"g".repeat(128)),
            Err(VerifyError::NotHex)
        );
    }
}
