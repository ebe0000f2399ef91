//! Errors, worded for the operator: what failed, and for token failures the PKCS#11 function and
//! return code (`C_Login: CKR_PIN_INCORRECT`). No error ever carries a PIN.

use std::fmt;
use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CryptokiError, RvError};

/// Everything that can go wrong talking to the token. There is no software fallback: every
/// variant means "no signature".
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The module could not be loaded (missing file, not a shared library, not PKCS#11).
    #[error("cannot load PKCS#11 module {}", path.display())]
    ModuleLoad {
        /// The module path as configured.
        path: PathBuf,
        /// What the loader reported.
        #[source]
        source: CryptokiError,
    },
    /// A PKCS#11 function returned an error code.
    #[error("{action}: {}", Pkcs11Code { function: *function, rv: *rv })]
    Pkcs11 {
        /// What we were doing, in operator terms ("logging in to token \"x\"").
        action: String,
        /// The PKCS#11 function that failed.
        function: Function,
        /// Its return code.
        rv: RvError,
    },
    /// The cryptoki binding failed outside a PKCS#11 call (conversion, missing function pointer).
    #[error("{action}: PKCS#11 binding error")]
    Cryptoki {
        /// What we were doing.
        action: String,
        /// The binding's error.
        #[source]
        source: CryptokiError,
    },
    /// No slot holds a token with this label.
    #[error(
        "no token labelled \"{label}\" (tokens present: {})",
        LabelList(present)
    )]
    TokenNotFound {
        /// The label looked for.
        label: String,
        /// Labels of the initialised tokens that are present.
        present: Vec<String>,
    },
    /// Provisioning refused: a token with this label already exists.
    #[error("a token labelled \"{label}\" already exists")]
    TokenExists {
        /// The label.
        label: String,
    },
    /// Provisioning found no slot with an uninitialised token.
    #[error("no free slot: every slot with a token holds an initialised token")]
    NoFreeSlot,
    /// No private key with this label on the token.
    #[error("no private key labelled \"{label}\" on token \"{token}\"")]
    KeyNotFound {
        /// The key label.
        label: String,
        /// The token label.
        token: String,
    },
    /// The private key exists but its public key object does not.
    #[error("no public key labelled \"{label}\" on token \"{token}\" (the private key exists)")]
    PublicKeyNotFound {
        /// The key label.
        label: String,
        /// The token label.
        token: String,
    },
    /// More than one key object carries this label: refuse to guess.
    #[error(
        "{count} {class} objects labelled \"{label}\" on token \"{token}\"; labels must be unique"
    )]
    KeyAmbiguous {
        /// The key label.
        label: String,
        /// The token label.
        token: String,
        /// "private key" or "public key".
        class: &'static str,
        /// How many objects matched.
        count: usize,
    },
    /// Key generation refused: a key with this label exists.
    #[error(
        "a key labelled \"{label}\" already exists on token \"{token}\"; refusing to generate another"
    )]
    KeyExists {
        /// The key label.
        label: String,
        /// The token label.
        token: String,
    },
    /// The key is not an EC P-256 key, or its public point is malformed.
    #[error("key \"{label}\" is not usable: {reason}")]
    UnsupportedKey {
        /// The key label.
        label: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A data object exists but its value cannot be used.
    #[error("data object \"{label}\" on token \"{token}\" is not usable: {reason}")]
    BadDataObject {
        /// The object label.
        label: String,
        /// The token label.
        token: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A token or key label that PKCS#11 cannot hold.
    #[error("invalid label \"{label}\": {reason}")]
    InvalidLabel {
        /// The label.
        label: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A configuration value that cannot work.
    #[error("invalid HSM configuration: {reason}")]
    InvalidConfig {
        /// Which value, and why.
        reason: &'static str,
    },
    /// The system random number generator failed (key IDs are random).
    #[error("the system random number generator failed")]
    Random,
    /// The token returned a signature of the wrong length for P-256.
    #[error(
        "token returned a {len}-byte signature for key \"{label}\"; ECDSA P-256 r||s is 64 bytes"
    )]
    BadSignatureLength {
        /// The key label.
        label: String,
        /// The length returned.
        len: usize,
    },
    /// The token's signature does not verify against the key's public key: refused.
    #[error("signature from key \"{label}\" does not verify against its public key; refusing it")]
    SelfCheck {
        /// The key label.
        label: String,
        /// The verification failure.
        #[source]
        source: VerifyError,
    },
    /// The PIN could not be read.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// A blocking signing task panicked or was cancelled.
    #[error("signing task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl HsmError {
    /// Wraps a cryptoki error: PKCS#11 return codes become [`HsmError::Pkcs11`].
    pub(crate) fn call(action: impl Into<String>, source: CryptokiError) -> Self {
        match source {
            CryptokiError::Pkcs11(rv, function) => HsmError::Pkcs11 {
                action: action.into(),
                function,
                rv,
            },
            source => HsmError::Cryptoki {
                action: action.into(),
                source,
            },
        }
    }

    /// Whether the token refused the PIN itself (incorrect, invalid, wrong length, expired,
    /// locked), as opposed to the PIN file being unreadable or the token not answering.
    pub fn is_pin_refused(&self) -> bool {
        matches!(
            self.return_code(),
            Some(
                RvError::PinIncorrect
                    | RvError::PinInvalid
                    | RvError::PinLenRange
                    | RvError::PinExpired
                    | RvError::PinLocked
            )
        )
    }

    /// The PKCS#11 return code, if this error is one.
    pub fn return_code(&self) -> Option<RvError> {
        match self {
            HsmError::Pkcs11 { rv, .. } => Some(*rv),
            _ => None,
        }
    }
}

/// Why a PIN file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The file could not be read.
    #[error("cannot read PIN file {}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any PIN.
    #[error("PIN file {} is larger than {limit} bytes", path.display())]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The file is empty (after one trailing newline is removed).
    #[error("PIN file {} is empty", path.display())]
    Empty {
        /// The path.
        path: PathBuf,
    },
    /// The file is not UTF-8.
    #[error("PIN file {} is not UTF-8", path.display())]
    NotUtf8 {
        /// The path.
        path: PathBuf,
    },
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not 64 bytes.
    #[error("signature is {len} bytes; an ECDSA P-256 signature (r||s) is 64")]
    BadLength {
        /// The length received.
        len: usize,
    },
    /// Well-formed, but not a signature of this message by this key.
    #[error("signature does not verify")]
    Mismatch,
    /// Signature text that is not hex.
    #[error("signature is not hex")]
    NotHex,
}

/// Why a public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    /// Not a single `PUBLIC KEY` PEM block.
    #[error("not a PEM \"PUBLIC KEY\" block: {reason}")]
    Pem {
        /// What is wrong.
        reason: &'static str,
    },
    /// The PEM body is not base64.
    #[error("PEM body is not base64: {0}")]
    Base64(String),
    /// A SubjectPublicKeyInfo, but not for an uncompressed EC P-256 key.
    #[error("not an EC P-256 SubjectPublicKeyInfo with an uncompressed point")]
    NotP256Spki,
    /// Not a 65-byte uncompressed point on P-256.
    #[error("not an uncompressed P-256 point on the curve")]
    BadPoint,
}

/// `C_Function: CKR_CODE`, with a short operator hint for the codes an operator can act on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pkcs11Code {
    pub(crate) function: Function,
    pub(crate) rv: RvError,
}

impl fmt::Display for Pkcs11Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "C_{:?}: ", self.function)?;
        write_return_code(f, self.rv)?;
        if let Some(hint) = hint(self.rv) {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

/// Writes the specification's name for a return code: `PinIncorrect` becomes `CKR_PIN_INCORRECT`.
fn write_return_code(f: &mut fmt::Formatter<'_>, rv: RvError) -> fmt::Result {
    match rv {
        RvError::VendorDefined(code) => write!(f, "CKR_VENDOR_DEFINED(0x{code:08X})"),
        RvError::UnknownErrorCode(code) => write!(f, "unknown return code 0x{code:08X}"),
        other => {
            f.write_str("CKR_")?;
            for (i, c) in format!("{other:?}").chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    f.write_str("_")?;
                }
                write!(f, "{}", c.to_ascii_uppercase())?;
            }
            Ok(())
        }
    }
}

fn hint(rv: RvError) -> Option<&'static str> {
    Some(match rv {
        RvError::PinIncorrect => "wrong PIN",
        RvError::PinLocked => {
            "PIN locked after too many wrong attempts; the security officer must reset it"
        }
        RvError::PinExpired => "PIN expired; set a new one",
        RvError::PinLenRange | RvError::PinInvalid => {
            "PIN has a length or characters this token refuses"
        }
        RvError::UserPinNotInitialized => "no user PIN set on this token; provision it first",
        RvError::TokenNotPresent | RvError::DeviceRemoved => "token removed or unreachable",
        RvError::DeviceError | RvError::GeneralError => "token failure",
        RvError::DeviceMemory => "token out of memory",
        RvError::TokenWriteProtected => "token is write-protected",
        RvError::KeyFunctionNotPermitted => "key is not allowed to sign",
        RvError::MechanismInvalid => "token does not support this mechanism",
        RvError::CurveNotSupported => "token does not support this curve",
        RvError::UserNotLoggedIn => "not logged in",
        RvError::CryptokiAlreadyInitialized => {
            "module already initialised by other code in this process"
        }
        _ => return None,
    })
}

struct LabelList<'a>(&'a [String]);

impl fmt::Display for LabelList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, label) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "\"{label}\"")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(function: Function, rv: RvError) -> String {
        Pkcs11Code { function, rv }.to_string()
    }

    #[test]
    fn return_codes_use_the_specification_names() {
        assert_eq!(
            text(Function::Login, RvError::PinIncorrect),
            "C_Login: CKR_PIN_INCORRECT (wrong PIN)"
        );
        assert_eq!(
            text(Function::Sign, RvError::SessionHandleInvalid),
            "C_Sign: CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            text(Function::Initialize, RvError::CryptokiNotInitialized),
            "C_Initialize: CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(
            text(Function::OpenSession, RvError::SessionReadWriteSoExists),
            "C_OpenSession: CKR_SESSION_READ_WRITE_SO_EXISTS"
        );
        assert_eq!(
            text(Function::GenerateRandom, RvError::RandomNoRng),
            "C_GenerateRandom: CKR_RANDOM_NO_RNG"
        );
        assert_eq!(
            text(Function::SignInit, RvError::VendorDefined(0x8000_0001)),
            "C_SignInit: CKR_VENDOR_DEFINED(0x80000001)"
        );
    }

    #[test]
    fn error_names_action_function_and_code() {
        let e = HsmError::call(
            "logging in to token \"t\"",
            CryptokiError::Pkcs11(RvError::PinIncorrect, Function::Login),
        );
        assert_eq!(
            e.to_string(),
            "logging in to token \"t\": C_Login: CKR_PIN_INCORRECT (wrong PIN)"
        );
        assert_eq!(e.return_code(), Some(RvError::PinIncorrect));
    }

    #[test]
    fn token_not_found_lists_present_labels() {
        let e = HsmError::TokenNotFound {
            label: "x".into(),
            present: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            e.to_string(),
            "no token labelled \"x\" (tokens present: \"a\", \"b\")"
        );
    }

    #[test]
    fn errors_are_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<HsmError>();
    }
}
