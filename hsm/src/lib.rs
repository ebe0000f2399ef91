//! baylink's signing key on a PKCS#11 token (an HSM; SoftHSM 2 in development and tests).
//!
//! What it does: loads the module, finds the token by label, logs in with the user PIN, keeps a
//! small pool of sessions for concurrent signing, recovers from token resets, signs with
//! EC P-256 (`CKM_ECDSA` over a software SHA-256) and verifies with aws-lc-rs. It also
//! generates keys (non-extractable, sensitive), provisions tokens for dev-env, and describes
//! the token for `baylink hsm info`. [`TlsKey`] makes a token-held key a rustls signing key,
//! so the appliance's TLS private key never leaves the token either.
//!
//! What it deliberately does not: hold or accept a software private key (there is no
//! fallback: no token, no signature), read configuration files (the appliance passes
//! [`HsmConfig`] and sets `SOFTHSM2_CONF` itself), or log a PIN.
//!
//! ```no_run
//! # fn main() -> Result<(), baylink_hsm::HsmError> {
//! use baylink_hsm::{HsmConfig, Token, read_pin};
//! let pin = read_pin("/run/credentials/baylink.service/hsm-pin".as_ref())?;
//! let config = HsmConfig::new("/usr/lib/softhsm/libsofthsm2.so", "baylink", "signing", pin);
//! let signer = Token::open(&config)?.signer()?;
//! let signature = signer.sign(b"manifest bytes")?;
//! signer.public_key().verify(b"manifest bytes", signature.as_ref()).expect("verifies");
//! # Ok(()) }
//! ```
#![cfg_attr(not(any(test, feature = "testing")), forbid(unsafe_code))]
#![warn(missing_docs)]

mod config;
mod error;
mod library;
mod objects;
mod pool;
pub mod provision;
mod public_key;
mod signer;
mod tls;
mod token;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use config::{HsmConfig, MAX_PIN_FILE_BYTES, read_pin};
pub use error::{HsmError, PinError, PublicKeyError, VerifyError};
pub use objects::KeyProtection;
pub use public_key::{PublicKey, SEC1_POINT_LEN, SIGNATURE_LEN, SPKI_LEN, Signature};
pub use secrecy::SecretString;
pub use signer::Signer;
pub use tls::{TlsKey, raw_to_der};
pub use token::{HsmInfo, KeyDetails, LibraryInfo, MechanismSupport, Token, TokenDetails};
