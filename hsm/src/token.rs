//! Token access: load the module, find the token by label, keep a pool of logged-in sessions,
//! generate keys, describe the token for `baylink hsm info`.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};

use crate::config::HsmConfig;
use crate::error::HsmError;
use crate::library::Library;
use crate::objects::{self, KeyProtection, P256_EC_PARAMS};
use crate::pool::Pool;
use crate::public_key::PublicKey;

/// An open, logged-in token. Cheap to clone; all clones share one session pool.
#[derive(Clone, Debug)]
pub struct Token {
    inner: Arc<TokenInner>,
}

#[derive(Debug)]
struct TokenInner {
    pool: Pool,
    key_label: String,
    /// Serialises key generation so two callers cannot both pass the "label unused" check.
    keygen: Mutex<()>,
}

impl Token {
    /// Loads the module (`C_Initialize` with OS locking, once per process), finds the token by
    /// label, opens `config.sessions` sessions and logs in as user.
    ///
    /// The key is not looked up here: [`Token::signer`] does that, so provisioning can open a
    /// token that has no key yet.
    pub fn open(config: &HsmConfig) -> Result<Token, HsmError> {
        objects::check_label(&config.key_label)?;
        let library = Library::load(&config.module)?;
        let pool = Pool::open(
            library,
            &config.token_label,
            config.pin.clone(),
            config.sessions,
        )?;
        tracing::info!(
            module = %config.module.display(),
            token = %config.token_label,
            sessions = config.sessions,
            "HSM token open"
        );
        Ok(Token {
            inner: Arc::new(TokenInner {
                pool,
                key_label: config.key_label.clone(),
                keygen: Mutex::new(()),
            }),
        })
    }

    /// The token label.
    pub fn label(&self) -> &str {
        self.inner.pool.token_label()
    }

    /// The configured key label.
    pub fn key_label(&self) -> &str {
        &self.inner.key_label
    }

    /// The module path.
    pub fn module(&self) -> &Path {
        self.inner.pool.library().path()
    }

    /// The slot the token is in now (informational only: slot numbers change, labels do not).
    pub fn slot_id(&self) -> u64 {
        self.inner.pool.slot().id()
    }

    /// The public key of the key pair labelled `label`.
    pub fn public_key(&self, label: &str) -> Result<PublicKey, HsmError> {
        objects::check_label(label)?;
        let token = self.label();
        self.inner
            .pool
            .run(|session, _| objects::find_key_pair(session, label, token))
            .map(|pair| pair.public_key)
    }

    /// Generates an EC P-256 key pair labelled `label` on the token and returns its public key.
    ///
    /// Refuses a label any object already carries ([`HsmError::KeyExists`]). The private key is
    /// a token object, private, sensitive, not extractable, for signing only; the public key is
    /// for verifying. Both carry the label and a random 16-byte `CKA_ID`.
    pub fn generate_key(&self, label: &str) -> Result<PublicKey, HsmError> {
        objects::check_label(label)?;
        let token = self.label();
        let _serial = self
            .inner
            .keygen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| HsmError::Random)?;
        let public_template = [
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let private_template = [
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let (public_key, protection) = self.inner.pool.run(|session, pool| {
            if objects::label_in_use(session, label, token)? {
                return Err(HsmError::KeyExists {
                    label: label.to_owned(),
                    token: token.to_owned(),
                });
            }
            let rw = pool.rw_session()?;
            let (public, private) = rw
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &public_template,
                    &private_template,
                )
                .map_err(|e| {
                    HsmError::call(
                        format!("generating EC P-256 key \"{label}\" on token \"{token}\""),
                        e,
                    )
                })?;
            let public_key = objects::read_public_key(&rw, public, label, token)?;
            let protection = objects::protection(&rw, private, label, token)?;
            Ok((public_key, protection))
        })?;
        if !protection.sensitive || protection.extractable {
            // The token ignored our template; do not hand out a key it may export.
            return Err(HsmError::UnsupportedKey {
                label: label.to_owned(),
                reason: "the token made the private key extractable or not sensitive".into(),
            });
        }
        tracing::info!(
            token = %token,
            key = %label,
            fingerprint = %public_key.fingerprint(),
            "generated EC P-256 key pair"
        );
        Ok(public_key)
    }

    /// The values of the data objects (`CKO_DATA`) labelled `label` whose `CKA_APPLICATION`
    /// is `application`: none before the first [`Token::replace_data`], one after it, two
    /// only if a writer stopped between creating the new object and destroying the old one
    /// (the caller decides which is current).
    pub fn data_values(&self, label: &str, application: &str) -> Result<Vec<Vec<u8>>, HsmError> {
        objects::check_label(label)?;
        let token = self.label();
        self.inner.pool.run(|session, _| {
            objects::find_data(session, label, application, token)?
                .into_iter()
                .map(|object| objects::data_value(session, object, label, token))
                .collect()
        })
    }

    /// Replaces the data object labelled `label` for `application` by one holding `value`: a
    /// private token object (readable only after login). The new object is created before
    /// the old ones are destroyed (tokens keep `CKA_VALUE` of data objects read-only), so a
    /// reader never finds none. Callers serialise their writers.
    pub fn replace_data(
        &self,
        label: &str,
        application: &str,
        value: &[u8],
    ) -> Result<(), HsmError> {
        objects::check_label(label)?;
        let token = self.label();
        self.inner.pool.run(|_, pool| {
            let rw = pool.rw_session()?;
            let old = objects::find_data(&rw, label, application, token)?;
            rw.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Modifiable(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Application(application.as_bytes().to_vec()),
                Attribute::Value(value.to_vec()),
            ])
            .map_err(|e| {
                HsmError::call(
                    format!("creating data object \"{label}\" on token \"{token}\""),
                    e,
                )
            })?;
            for object in old {
                rw.destroy_object(object).map_err(|e| {
                    HsmError::call(
                        format!(
                            "destroying the previous data object \"{label}\" on token \"{token}\""
                        ),
                        e,
                    )
                })?;
            }
            Ok(())
        })
    }

    /// What the module, token and configured key look like. Each part that cannot be read
    /// holds its error, so the report is as complete as the token allows.
    pub fn info(&self) -> HsmInfo {
        let ctx = self.inner.pool.library().ctx();
        let slot = self.inner.pool.slot();
        let library = ctx
            .get_library_info()
            .map(|i| LibraryInfo {
                manufacturer: i.manufacturer_id().to_owned(),
                description: i.library_description().to_owned(),
                library_version: i.library_version().to_string(),
                cryptoki_version: i.cryptoki_version().to_string(),
            })
            .map_err(|e| HsmError::call("reading module information", e));
        let token = ctx
            .get_token_info(slot)
            .map(|t| TokenDetails {
                label: t.label().to_owned(),
                manufacturer: t.manufacturer_id().to_owned(),
                model: t.model().to_owned(),
                serial: t.serial_number().to_owned(),
                slot_id: slot.id(),
            })
            .map_err(|e| HsmError::call("reading token information", e));
        let mechanisms = ctx
            .get_mechanism_list(slot)
            .map_err(|e| HsmError::call("listing mechanisms", e))
            .map(|list| {
                RELEVANT_MECHANISMS
                    .iter()
                    .map(|(mechanism, purpose)| MechanismSupport {
                        name: mechanism.to_string(),
                        purpose,
                        supported: list.contains(mechanism),
                        key_bits: ctx
                            .get_mechanism_info(slot, *mechanism)
                            .ok()
                            .filter(|_| list.contains(mechanism))
                            .map(|i| (i.min_key_size(), i.max_key_size())),
                    })
                    .collect()
            });
        let label = &self.inner.key_label;
        let token_label = self.label();
        let key = self.inner.pool.run(|session, _| {
            let pair = objects::find_key_pair(session, label, token_label)?;
            let protection = objects::protection(session, pair.private, label, token_label)?;
            Ok(KeyDetails {
                public_key: pair.public_key,
                protection,
            })
        });
        HsmInfo {
            module: self.module().display().to_string(),
            library,
            token,
            mechanisms,
            key_label: label.clone(),
            key,
        }
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }
}

/// The mechanisms baylink uses, and what for.
const RELEVANT_MECHANISMS: [(MechanismType, &str); 3] = [
    (MechanismType::ECC_KEY_PAIR_GEN, "key generation"),
    (
        MechanismType::ECDSA,
        "signing (SHA-256 computed in software)",
    ),
    (MechanismType::ECDSA_SHA256, "not used; informational"),
];

/// The report behind `baylink hsm info`.
#[derive(Debug)]
pub struct HsmInfo {
    /// Module path.
    pub module: String,
    /// `C_GetInfo`.
    pub library: Result<LibraryInfo, HsmError>,
    /// `C_GetTokenInfo`.
    pub token: Result<TokenDetails, HsmError>,
    /// The mechanisms baylink needs.
    pub mechanisms: Result<Vec<MechanismSupport>, HsmError>,
    /// The configured key label.
    pub key_label: String,
    /// The configured key, or why it is not usable ([`HsmError::KeyNotFound`] if absent).
    pub key: Result<KeyDetails, HsmError>,
}

impl HsmInfo {
    /// Whether the configured key pair was found and is a P-256 key.
    pub fn key_found(&self) -> bool {
        self.key.is_ok()
    }
}

/// Module information.
#[derive(Debug, Clone)]
pub struct LibraryInfo {
    /// `manufacturerID`.
    pub manufacturer: String,
    /// `libraryDescription`.
    pub description: String,
    /// `libraryVersion`.
    pub library_version: String,
    /// `cryptokiVersion`.
    pub cryptoki_version: String,
}

/// Token information.
#[derive(Debug, Clone)]
pub struct TokenDetails {
    /// Label.
    pub label: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Slot it is in now.
    pub slot_id: u64,
}

/// Whether the token offers a mechanism.
#[derive(Debug, Clone)]
pub struct MechanismSupport {
    /// `CKM_...` name.
    pub name: String,
    /// What baylink uses it for.
    pub purpose: &'static str,
    /// Listed by `C_GetMechanismList`.
    pub supported: bool,
    /// Key sizes in bits, from `C_GetMechanismInfo`.
    pub key_bits: Option<(usize, usize)>,
}

/// The configured key pair.
#[derive(Debug, Clone)]
pub struct KeyDetails {
    /// Its public key.
    pub public_key: PublicKey,
    /// How the private key is protected.
    pub protection: KeyProtection,
}

impl fmt::Display for HsmInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "module:     {}", self.module)?;
        match &self.library {
            Ok(l) => writeln!(
                f,
                "library:    {} {} ({}), PKCS#11 {}",
                l.description, l.library_version, l.manufacturer, l.cryptoki_version
            )?,
            Err(e) => writeln!(f, "library:    unavailable: {e}")?,
        }
        match &self.token {
            Ok(t) => writeln!(
                f,
                "token:      \"{}\" ({} {}, serial {}) in slot {}",
                t.label, t.manufacturer, t.model, t.serial, t.slot_id
            )?,
            Err(e) => writeln!(f, "token:      unavailable: {e}")?,
        }
        match &self.mechanisms {
            Ok(list) => {
                for (i, m) in list.iter().enumerate() {
                    let head = if i == 0 { "mechanisms:" } else { "" };
                    let bits = m
                        .key_bits
                        .map(|(lo, hi)| format!(" ({lo}-{hi} bits)"))
                        .unwrap_or_default();
                    let yes = if m.supported { "yes" } else { "NO" };
                    writeln!(f, "{head:<11} {}: {yes}{bits} - {}", m.name, m.purpose)?;
                }
            }
            Err(e) => writeln!(f, "mechanisms: unavailable: {e}")?,
        }
        match &self.key {
            Ok(k) => {
                let p = &k.protection;
                writeln!(
                    f,
                    "key:        \"{}\" found, EC P-256, SPKI sha256 {}",
                    self.key_label,
                    k.public_key.fingerprint()
                )?;
                writeln!(
                    f,
                    "protection: sensitive={} extractable={} always_sensitive={} never_extractable={}",
                    p.sensitive, p.extractable, p.always_sensitive, p.never_extractable
                )
            }
            Err(e) => writeln!(f, "key:        \"{}\" NOT usable: {e}", self.key_label),
        }
    }
}

#[cfg(test)]
mod tests {
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use secrecy::SecretString;
    use serial_test::serial;

    use super::*;
    use crate::testing::{self, SoftHsm};

    #[test]
    #[serial]
    fn module_that_does_not_exist_is_named() {
        let hsm = SoftHsm::new().unwrap();
        let mut config = hsm.config("k");
        config.module = "/nonexistent/libpkcs11.so".into();
        let err = Token::open(&config).unwrap_err();
        assert!(matches!(err, HsmError::ModuleLoad { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "cannot load PKCS#11 module /nonexistent/libpkcs11.so"
        );
        // The cause is kept for `{:#}` chains.
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("No such file"), "{cause}");
    }

    #[test]
    #[serial]
    fn library_that_is_not_pkcs11_is_refused() {
        let hsm = SoftHsm::new().unwrap();
        let libm = Path::new("/lib/x86_64-linux-gnu/libm.so.6");
        if !libm.exists() {
            return;
        }
        let mut config = hsm.config("k");
        config.module = libm.into();
        let err = Token::open(&config).unwrap_err();
        assert!(matches!(err, HsmError::ModuleLoad { .. }), "{err:?}");
        assert!(err.to_string().contains("libm.so.6"), "{err}");
    }

    #[test]
    #[serial]
    fn token_label_not_found_names_label_and_present_tokens() {
        let hsm = SoftHsm::new().unwrap();
        let mut config = hsm.config("k");
        config.token_label = "no-such-token".into();
        let err = Token::open(&config).unwrap_err();
        match &err {
            HsmError::TokenNotFound { label, present } => {
                assert_eq!(label, "no-such-token");
                assert_eq!(present, &[hsm.token_label().to_owned()]);
            }
            other => panic!("expected TokenNotFound, got {other:?}"),
        }
        assert!(
            err.to_string()
                .contains("no token labelled \"no-such-token\"")
        );
    }

    #[test]
    #[serial]
    fn wrong_pin_names_c_login_and_code_and_not_the_pin() {
        let hsm = SoftHsm::new().unwrap();
        let mut config = hsm.config("k");
        config.pin = SecretString::from("not-the-pin-4321");
        let err = Token::open(&config).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("C_Login: CKR_PIN_INCORRECT"), "{text}");
        assert!(text.contains(hsm.token_label()), "{text}");
        assert!(!text.contains("not-the-pin-4321"));
        assert!(!format!("{err:?}").contains("not-the-pin-4321"));
        assert!(!format!("{config:?}").contains("not-the-pin-4321"));
    }

    #[test]
    #[serial]
    fn empty_pool_is_refused() {
        let hsm = SoftHsm::new().unwrap();
        let mut config = hsm.config("k");
        config.sessions = 0;
        assert!(matches!(
            Token::open(&config),
            Err(HsmError::InvalidConfig { .. })
        ));
    }

    #[test]
    #[serial]
    fn keygen_refuses_an_existing_label() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("k").unwrap();
        let first = token.generate_key("k").unwrap();
        let err = token.generate_key("k").unwrap_err();
        match &err {
            HsmError::KeyExists { label, token: t } => {
                assert_eq!(label, "k");
                assert_eq!(t, hsm.token_label());
            }
            other => panic!("expected KeyExists, got {other:?}"),
        }
        // The first key is untouched and still the only one.
        assert_eq!(token.public_key("k").unwrap(), first);
        assert!(matches!(
            token.generate_key(""),
            Err(HsmError::InvalidLabel { .. })
        ));
    }

    #[test]
    #[serial]
    fn generated_private_key_is_sensitive_and_not_extractable() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("k").unwrap();
        token.generate_key("k").unwrap();
        let protection = token.info().key.unwrap().protection;
        assert_eq!(
            protection,
            KeyProtection {
                sensitive: true,
                extractable: false,
                always_sensitive: true,
                never_extractable: true,
            }
        );
        // The signer reports the same, for callers that refuse a key that can leave.
        assert_eq!(token.signer().unwrap().protection(), protection);
        // Read the rest back directly, and try to read the secret value.
        token
            .pool()
            .run(|session, _| {
                let private = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(b"k".to_vec()),
                    ])
                    .unwrap()[0];
                let attrs = session
                    .get_attributes(
                        private,
                        &[
                            AttributeType::Token,
                            AttributeType::Private,
                            AttributeType::Sign,
                            AttributeType::Derive,
                            AttributeType::Value,
                        ],
                    )
                    .unwrap();
                assert!(attrs.contains(&Attribute::Token(true)), "{attrs:?}");
                assert!(attrs.contains(&Attribute::Private(true)), "{attrs:?}");
                assert!(attrs.contains(&Attribute::Sign(true)), "{attrs:?}");
                assert!(attrs.contains(&Attribute::Derive(false)), "{attrs:?}");
                assert!(
                    !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
                    "the private value must not be readable: {attrs:?}"
                );
                let public = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PUBLIC_KEY),
                        Attribute::Label(b"k".to_vec()),
                    ])
                    .unwrap()[0];
                let attrs = session
                    .get_attributes(public, &[AttributeType::Verify, AttributeType::Token])
                    .unwrap();
                assert!(attrs.contains(&Attribute::Verify(true)), "{attrs:?}");
                assert!(attrs.contains(&Attribute::Token(true)), "{attrs:?}");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    #[serial]
    fn key_survives_reopening_the_token() {
        let hsm = SoftHsm::new().unwrap();
        let public = {
            let token = hsm.open("k").unwrap();
            token.generate_key("k").unwrap()
        };
        // The module was finalised when the last Token went; it loads afresh here.
        let token = hsm.open("k").unwrap();
        assert_eq!(token.signer().unwrap().public_key(), &public);
    }

    #[test]
    #[serial]
    fn info_reports_module_token_mechanisms_and_key() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("k").unwrap();
        let before = token.info();
        assert!(!before.key_found());
        assert!(matches!(before.key, Err(HsmError::KeyNotFound { .. })));
        let public = token.generate_key("k").unwrap();
        let info = token.info();
        assert!(info.key_found());
        assert_eq!(info.token.as_ref().unwrap().label, hsm.token_label());
        assert!(
            info.library
                .as_ref()
                .unwrap()
                .manufacturer
                .contains("SoftHSM")
        );
        let mechanisms = info.mechanisms.as_ref().unwrap();
        let ecdsa = mechanisms.iter().find(|m| m.name == "CKM_ECDSA").unwrap();
        assert!(ecdsa.supported);
        let text = info.to_string();
        assert!(text.contains(&public.fingerprint()), "{text}");
        assert!(text.contains("CKM_ECDSA: yes"), "{text}");
        assert!(text.contains("CKM_EC_KEY_PAIR_GEN: yes"), "{text}");
        assert!(text.contains(hsm.token_label()), "{text}");
        assert!(text.contains("extractable=false"), "{text}");
        assert!(!text.contains(testing::USER_PIN));
    }

    #[test]
    #[serial]
    fn data_objects_are_created_replaced_and_kept_per_application() {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("k").unwrap();
        assert!(token.data_values("head", "app-a").unwrap().is_empty());
        token.replace_data("head", "app-a", b"one").unwrap();
        token.replace_data("head", "app-b", b"other").unwrap();
        token.replace_data("head", "app-a", b"two, longer").unwrap();
        assert_eq!(
            token.data_values("head", "app-a").unwrap(),
            [b"two, longer".to_vec()]
        );
        assert_eq!(
            token.data_values("head", "app-b").unwrap(),
            [b"other".to_vec()]
        );
        drop(token);
        // A token object: it outlives the process's sessions; and it is private.
        let token = hsm.open("k").unwrap();
        assert_eq!(
            token.data_values("head", "app-a").unwrap(),
            [b"two, longer".to_vec()]
        );
        token
            .pool()
            .run(|session, _| {
                let found = session
                    .find_objects(&[Attribute::Class(ObjectClass::DATA)])
                    .unwrap();
                assert_eq!(found.len(), 2, "replaced in place, not added");
                let attrs = session
                    .get_attributes(found[0], &[AttributeType::Token, AttributeType::Private])
                    .unwrap();
                assert!(attrs.contains(&Attribute::Token(true)), "{attrs:?}");
                assert!(attrs.contains(&Attribute::Private(true)), "{attrs:?}");
                Ok(())
            })
            .unwrap();
        assert!(matches!(
            token.replace_data("", "app-a", b"x"),
            Err(HsmError::InvalidLabel { .. })
        ));
    }

    #[test]
    #[serial]
    fn two_tokens_in_one_process_share_the_module() {
        let hsm = SoftHsm::new().unwrap();
        let a = hsm.open("k").unwrap();
        a.generate_key("k").unwrap();
        let b = hsm.open("k").unwrap();
        let sb = b.signer().unwrap();
        drop(a);
        // Dropping `a` closed its sessions; `b` keeps working (re-login if needed).
        let sig = sb.sign(b"m").unwrap();
        sb.public_key().verify(b"m", sig.as_ref()).unwrap();
    }
}
