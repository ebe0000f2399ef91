//! The compliance checkpoint: is this declaration allowed to cross?
//!
//! Loaded once from the config into types. Every decision is either allow (naming the consent
//! record that allows it) or refuse, naming the rule that refused, so the hospital, the
//! operator and the audit log all see the same reason.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use baylink_net::proto::Digest;
use serde::{Deserialize, Serialize};

/// What an upload states about itself (the compliance declaration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    /// The patient the data belongs to.
    pub patient_id: String,
    /// Data category, e.g. `diagnostic-image`.
    pub category: String,
    /// Purpose of the transfer, e.g. `care`.
    pub purpose: String,
    /// Destination system, e.g. `hk-ehealth`.
    pub destination: String,
    /// The consent record the sender relies on, if it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_ref: Option<String>,
}

impl Declaration {
    /// SHA-256 over the canonical JSON of the declaration (fields in declaration order).
    pub fn digest(&self) -> Digest {
        let json = serde_json::to_vec(self).expect("a declaration always serialises");
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// One consent record: a patient's authorisation.
#[derive(Debug, Clone)]
pub struct Consent {
    /// Patient identifier.
    pub patient_id: String,
    /// Identifier of the consent record.
    pub reference: String,
    /// Allowed categories; `*` allows all.
    pub categories: Vec<String>,
    /// Allowed purposes; `*` allows all.
    pub purposes: Vec<String>,
    /// Allowed destinations; `*` allows all.
    pub destinations: Vec<String>,
    /// Start of validity.
    pub valid_from: SystemTime,
    /// End of validity.
    pub valid_until: SystemTime,
    /// SHA-256 of the consent evidence (the signed form), hex.
    pub evidence_sha256: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named consent record.
    Allow {
        /// The consent record's reference.
        consent_ref: String,
    },
    /// Refused.
    Refuse(Refusal),
}

/// Every rule a refusal on the edge can name (the `rule` of an audit `refused` record and
/// the label of `baylink_refusals_total`).
pub const RULES: &[&str] = &[
    "hospital-unknown",
    "size-limit",
    "negative-list",
    "category-not-allowed",
    "destination-not-allowed",
    "consent-missing",
    "consent-ref",
    "consent-not-yet-valid",
    "consent-expired",
    "consent-category",
    "consent-purpose",
    "consent-destination",
    RULE_PATIENT_MISMATCH,
    RULE_DEID_UNSUPPORTED,
];

/// `[policy]`, as `config` read and checked it.
#[derive(Debug, Clone)]
pub struct PolicySection {
    /// Consent registry (TOML).
    pub consents: Option<PathBuf>,
    /// Categories or purposes always refused.
    pub negative_list: Vec<String>,
    /// Hospitals (client certificate subject CN) allowed to upload; `None`: any client
    /// certificate from the deployment CA.
    pub hospitals: Option<Vec<String>>,
    /// Purposes whose DICOM instances are de-identified before they are hashed and sealed
    /// (`policy.deidentify_purposes`, default `["research"]`).
    pub deidentify_purposes: Vec<String>,
    /// The PS3.15 Annex E profile options of each de-identified purpose
    /// (`[policy.deidentify_options]`, purpose = option names; default: none, the Basic
    /// Profile alone). See `docs/dicom.md`.
    pub deidentify_options:
        std::collections::BTreeMap<String, crate::dicom::deid::profile::ProfileOptions>,
    /// Allowed data categories (`policy.categories`); `None`: the eHealth sharable domains
    /// ([`crate::policy::DEFAULT_CATEGORIES`]).
    pub categories: Option<Vec<String>>,
    /// Allowed destinations (`policy.destinations`); `None`: `["hk-ehealth"]`.
    pub destinations: Option<Vec<String>>,
    /// Largest sealed transfer in bytes (`policy.max_transfer_bytes`); `None`: 64 GiB.
    pub max_transfer_bytes: Option<u64>,
    /// Most files in one transfer (`policy.max_files`); `None`: 100 000.
    pub max_files: Option<u64>,
}

/// Rule named when an instance's PatientID differs from its transfer's declaration (the
/// edge's DICOM doors and de-identification check it).
pub const RULE_PATIENT_MISMATCH: &str = "patient-mismatch";
/// Rule named when a file of a de-identified transfer cannot be de-identified.
pub const RULE_DEID_UNSUPPORTED: &str = "deid-unsupported";

/// Why a declaration was refused, in two renderings: [`Refusal::reason`] for logs and the
/// audit log, [`Refusal::answer`] for the hospital that declared it. Displays as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// Machine-readable rule name, e.g. `consent-missing`.
    pub rule: &'static str,
    /// One line for logs and the audit log, e.g. `no consent for the declared patient`. It
    /// never names the patient, nor repeats a declared value the config does not list (a
    /// hospital may put anything there, a patient id included); logs that must correlate
    /// carry the audit log's keyed pseudonym ([`crate::audit::Log::patient_ref`]) beside it.
    pub reason: String,
    /// The same reason as the declaring hospital is answered (HTTP body, C-STORE error
    /// comment, `send`'s error line), naming its own patient and values, e.g. `no consent
    /// for patient P-0099`; `None` when it is [`Refusal::reason`].
    pub answer: Option<String>,
}

impl Refusal {
    /// A refusal whose reason names nothing of the patient: logged and answered alike.
    pub fn new(rule: &'static str, reason: impl Into<String>) -> Refusal {
        debug_assert!(RULES.contains(&rule), "rule {rule} is not in policy::RULES");
        Refusal {
            rule,
            reason: reason.into(),
            answer: None,
        }
    }

    /// A refusal answered as `answer` (which names the patient or a declared value) and
    /// logged as `reason` (which does not).
    pub fn answered(
        rule: &'static str,
        reason: impl Into<String>,
        answer: impl Into<String>,
    ) -> Refusal {
        debug_assert!(RULES.contains(&rule), "rule {rule} is not in policy::RULES");
        Refusal {
            rule,
            reason: reason.into(),
            answer: Some(answer.into()),
        }
    }

    /// The reason as the declaring hospital is answered.
    pub fn answer(&self) -> &str {
        self.answer.as_deref().unwrap_or(&self.reason)
    }
}

/// A policy that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The consent registry could not be read.
    #[error("cannot read consent registry {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The consent registry is not valid.
    #[error("consent registry {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the record.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(default)]
    consent: Vec<RawConsent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsent {
    patient_id: String,
    reference: String,
    categories: Vec<String>,
    purposes: Vec<String>,
    destinations: Vec<String>,
    valid_from: String,
    valid_until: String,
    evidence_sha256: String,
}

/// The data categories allowed when `policy.categories` is unset: the sharable domains of
/// Hong Kong's eHealth record, as stable kebab-case ids.
pub const DEFAULT_CATEGORIES: &[&str] = &[
    "demographics",
    "allergies-adrs",
    "diagnoses-procedures-medication",
    "encounters-appointments",
    "clinical-notes-summaries",
    "birth-immunisation",
    "laboratory-report",
    "radiology-report",
    "diagnostic-image",
    "other-investigation-report",
    "referral",
];

/// The destinations allowed when `policy.destinations` is unset.
pub const DEFAULT_DESTINATIONS: &[&str] = &["hk-ehealth"];

/// Default `policy.max_transfer_bytes`: 64 GiB.
pub const DEFAULT_MAX_TRANSFER_BYTES: u64 = 64 << 30;

/// Default `policy.max_files`: 100 000 files in one transfer.
pub const DEFAULT_MAX_FILES: u64 = 100_000;

/// The loaded policy.
#[derive(Debug, Clone)]
pub struct Policy {
    consents: HashMap<String, Vec<Consent>>,
    negative_list: HashSet<String>,
    hospitals: Option<HashSet<String>>,
    categories: HashSet<String>,
    destinations: HashSet<String>,
    max_transfer_bytes: u64,
    max_files: u64,
}

impl Default for Policy {
    /// No consents, nothing negative-listed, any hospital, the default categories,
    /// destinations and size limits.
    fn default() -> Policy {
        Policy {
            consents: HashMap::new(),
            negative_list: HashSet::new(),
            hospitals: None,
            categories: DEFAULT_CATEGORIES.iter().map(|c| (*c).to_owned()).collect(),
            destinations: DEFAULT_DESTINATIONS
                .iter()
                .map(|d| (*d).to_owned())
                .collect(),
            max_transfer_bytes: DEFAULT_MAX_TRANSFER_BYTES,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// The policy in force, shared by every door and replaceable while the appliance runs
/// (`serve` reloads it on SIGHUP). A check takes the current policy once and uses it whole,
/// so a reload never mixes two policies in one decision.
#[derive(Debug, Clone)]
pub struct SharedPolicy(Arc<RwLock<Arc<Policy>>>);

impl SharedPolicy {
    /// Shares `policy`.
    pub fn new(policy: Policy) -> SharedPolicy {
        SharedPolicy(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `policy` in force for every later check.
    pub fn replace(&self, policy: Policy) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
    }
}

impl Policy {
    /// Number of patients with at least one consent record.
    pub fn patients(&self) -> usize {
        self.consents.len()
    }

    /// Loads the policy named by the config.
    pub fn load(section: &PolicySection) -> Result<Policy, PolicyError> {
        let defaults = Policy::default();
        let mut policy = Policy {
            consents: HashMap::new(),
            negative_list: section.negative_list.iter().cloned().collect(),
            hospitals: section
                .hospitals
                .as_ref()
                .map(|h| h.iter().cloned().collect()),
            categories: section
                .categories
                .as_ref()
                .map_or(defaults.categories, |c| c.iter().cloned().collect()),
            destinations: section
                .destinations
                .as_ref()
                .map_or(defaults.destinations, |d| d.iter().cloned().collect()),
            max_transfer_bytes: section
                .max_transfer_bytes
                .unwrap_or(DEFAULT_MAX_TRANSFER_BYTES),
            max_files: section.max_files.unwrap_or(DEFAULT_MAX_FILES),
        };
        if let Some(path) = &section.consents {
            let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
                path: path.clone(),
                source,
            })?;
            for c in parse_registry(path, &text)? {
                policy
                    .consents
                    .entry(c.patient_id.clone())
                    .or_default()
                    .push(c);
            }
        }
        Ok(policy)
    }

    /// Is `hospital` (a client certificate's subject CN, or the hospital a DICOM peer maps
    /// to) allowed to upload? Every door asks before it accepts a declaration. With
    /// `policy.hospitals` unset, any client certificate of the deployment CA is a hospital.
    pub fn check_hospital(&self, hospital: &str) -> Result<(), Refusal> {
        match &self.hospitals {
            Some(known) if !known.contains(hospital) => Err(Refusal::new(
                "hospital-unknown",
                format!("{hospital} is not a known hospital (policy.hospitals)"),
            )),
            _ => Ok(()),
        }
    }

    /// Is a sealed transfer of `files` files and `bytes` bytes in total within the size
    /// limits (`policy.max_files`, `policy.max_transfer_bytes`)? Checked at commit (HTTPS,
    /// C-STORE) and by `send` before sealing; refused with rule `size-limit`.
    pub fn check_size(&self, files: u64, bytes: u64) -> Result<(), Refusal> {
        if files > self.max_files {
            return Err(Refusal::new(
                "size-limit",
                format!("{files} files exceed policy.max_files ({})", self.max_files),
            ));
        }
        if bytes > self.max_transfer_bytes {
            return Err(Refusal::new(
                "size-limit",
                format!(
                    "{bytes} bytes exceed policy.max_transfer_bytes ({})",
                    self.max_transfer_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Checks a declaration at time `now`. Order: negative list (category, then purpose),
    /// allowed categories, allowed destinations, then the consent registry.
    ///
    /// A refusal's [`Refusal::reason`] names only what the config holds (listed categories,
    /// purposes and destinations, consent references); the declared patient id, consent
    /// reference and unlisted values appear in its [`Refusal::answer`] only.
    pub fn check(&self, d: &Declaration, now: SystemTime) -> Decision {
        let refuse = |rule, reason: String| Decision::Refuse(Refusal::new(rule, reason));
        let answered = |rule, reason: String, answer: String| {
            Decision::Refuse(Refusal::answered(rule, reason, answer))
        };
        for (what, value) in [("category", &d.category), ("purpose", &d.purpose)] {
            if self.negative_list.contains(value) {
                return refuse(
                    "negative-list",
                    format!("{what} {value} is on the negative list"),
                );
            }
        }
        if !self.categories.contains(&d.category) {
            return answered(
                "category-not-allowed",
                "the declared category is not an allowed data category (policy.categories)".into(),
                format!(
                    "category {} is not an allowed data category (policy.categories)",
                    d.category
                ),
            );
        }
        if !self.destinations.contains(&d.destination) {
            return answered(
                "destination-not-allowed",
                "the declared destination is not an allowed destination (policy.destinations)"
                    .into(),
                format!(
                    "destination {} is not an allowed destination (policy.destinations)",
                    d.destination
                ),
            );
        }
        let Some(records) = self.consents.get(&d.patient_id) else {
            return answered(
                "consent-missing",
                "no consent for the declared patient".into(),
                format!("no consent for patient {}", d.patient_id),
            );
        };
        // Report the most specific reason among the patient's records: (rule, logged, answer).
        let mut last: Option<(&'static str, String, Option<String>)> = None;
        for c in records {
            if let Some(r) = &d.consent_ref
                && r != &c.reference
            {
                last.get_or_insert((
                    "consent-ref",
                    "the declared consent_ref is none of the patient's consent records".into(),
                    Some(format!(
                        "no consent record {r} for patient {}",
                        d.patient_id
                    )),
                ));
                continue;
            }
            let outcome = if now < c.valid_from {
                Some((
                    "consent-not-yet-valid",
                    format!("consent {} is not yet valid", c.reference),
                    None,
                ))
            } else if now > c.valid_until {
                Some((
                    "consent-expired",
                    format!("consent {} has expired", c.reference),
                    None,
                ))
            } else if !allows(&c.categories, &d.category) {
                // The category passed `policy.categories` above: a configured value.
                Some((
                    "consent-category",
                    format!(
                        "consent {} does not cover category {}",
                        c.reference, d.category
                    ),
                    None,
                ))
            } else if !allows(&c.purposes, &d.purpose) {
                // No list bounds the purpose: the log does not repeat it.
                Some((
                    "consent-purpose",
                    format!(
                        "consent {} does not cover the declared purpose",
                        c.reference
                    ),
                    Some(format!(
                        "consent {} does not cover purpose {}",
                        c.reference, d.purpose
                    )),
                ))
            } else if !allows(&c.destinations, &d.destination) {
                Some((
                    "consent-destination",
                    format!(
                        "consent {} does not cover destination {}",
                        c.reference, d.destination
                    ),
                    None,
                ))
            } else {
                None
            };
            match outcome {
                None => {
                    return Decision::Allow {
                        consent_ref: c.reference.clone(),
                    };
                }
                Some(o) => last = Some(o),
            }
        }
        let (rule, reason, answer) = last.expect("a patient in the map has at least one record");
        Decision::Refuse(Refusal {
            rule,
            reason,
            answer,
        })
    }
}

fn allows(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

fn parse_registry(path: &Path, text: &str) -> Result<Vec<Consent>, PolicyError> {
    let err = |message: String| PolicyError::Parse {
        path: path.to_owned(),
        message,
    };
    let raw: RawRegistry = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    raw.consent
        .into_iter()
        .map(|c| {
            let time = |field: &str, s: &str| {
                humantime::parse_rfc3339_weak(s)
                    .map_err(|e| err(format!("consent {}: {field} `{s}`: {e}", c.reference)))
            };
            let valid_from = time("valid_from", &c.valid_from)?;
            let valid_until = time("valid_until", &c.valid_until)?;
            if valid_until < valid_from {
                return Err(err(format!(
                    "consent {}: valid_until is before valid_from",
                    c.reference
                )));
            }
            if c.evidence_sha256.len() != 64
                || !c.evidence_sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(err(format!(
                    "consent {}: evidence_sha256 is not 64 hex digits",
                    c.reference
                )));
            }
            if c.patient_id.is_empty() || c.reference.is_empty() {
                return Err(err(
                    "a consent record has an empty patient_id or reference".into()
                ));
            }
            // The reference travels as the manifest's and receipt's process id: across the
            // border and into the gateway's audit log, which never hold a raw patient id.
            if c.reference.contains(c.patient_id.as_str()) {
                return Err(err(format!(
                    "consent {}: the reference contains the patient id; it crosses the border \
                     as the transfer's process id, so it must be an opaque identifier",
                    c.reference.replace(c.patient_id.as_str(), "<patient id>")
                )));
            }
            // The reference travels as the manifest's and receipt's process id.
            if baylink_net::proto::check_process_id(&c.reference).is_err() {
                return Err(err(format!(
                    "consent reference {:?} is not usable as a process id: it must be 1 to {} \
                     bytes without control characters",
                    c.reference,
                    baylink_net::proto::MAX_PROCESS_ID_LEN
                )));
            }
            Ok(Consent {
                patient_id: c.patient_id,
                reference: c.reference,
                categories: c.categories,
                purposes: c.purposes,
                destinations: c.destinations,
                valid_from,
                valid_until,
                evidence_sha256: c.evidence_sha256,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const REGISTRY: &str = r#"
[[consent]]
patient_id = "P-0001"
reference = "C-1"
categories = ["diagnostic-image", "laboratory-report"]
purposes = ["care"]
destinations = ["hk-ehealth"]
valid_from = "2026-01-01T00:00:00Z"
valid_until = "2026-12-31T00:00:00Z"
evidence_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

    #[test]
    fn hospitals_outside_the_list_are_refused_by_rule() {
        let open = Policy::default();
        assert!(open.check_hospital("anyone").is_ok());
        let p = Policy {
            hospitals: Some(["hospital-a".to_owned()].into()),
            ..Policy::default()
        };
        assert!(p.check_hospital("hospital-a").is_ok());
        let r = p.check_hospital("gateway").unwrap_err();
        assert_eq!(r.rule, "hospital-unknown");
        assert!(r.reason.contains("gateway"), "{}", r.reason);
    }

    fn policy() -> Policy {
        let mut p = Policy {
            negative_list: ["genetic-data".to_owned()].into(),
            ..Policy::default()
        };
        for c in parse_registry(Path::new("c.toml"), REGISTRY).unwrap() {
            p.consents.entry(c.patient_id.clone()).or_default().push(c);
        }
        p
    }

    fn decl() -> Declaration {
        Declaration {
            patient_id: "P-0001".into(),
            category: "diagnostic-image".into(),
            purpose: "care".into(),
            destination: "hk-ehealth".into(),
            consent_ref: None,
        }
    }

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    fn rule(d: Decision) -> &'static str {
        match d {
            Decision::Allow { .. } => "allow",
            Decision::Refuse(r) => r.rule,
        }
    }

    #[test]
    fn each_rule_refuses_by_name() {
        let p = policy();
        let mid = at("2026-06-01T00:00:00Z");
        assert_eq!(rule(p.check(&decl(), mid)), "allow");
        assert_eq!(
            rule(p.check(&decl(), at("2025-06-01T00:00:00Z"))),
            "consent-not-yet-valid"
        );
        assert_eq!(
            rule(p.check(&decl(), mid + Duration::from_secs(365 * 86400))),
            "consent-expired"
        );
        let d = Declaration {
            patient_id: "P-0099".into(),
            ..decl()
        };
        match p.check(&d, mid) {
            Decision::Refuse(r) => {
                assert_eq!(r.answer(), "no consent for patient P-0099");
                assert_eq!(r.reason, "no consent for the declared patient");
            }
            other => panic!("{other:?}"),
        }
        let d = Declaration {
            category: "genetic-data".into(),
            ..decl()
        };
        assert_eq!(rule(p.check(&d, mid)), "negative-list");
        let d = Declaration {
            category: "radiology-report".into(),
            ..decl()
        };
        assert_eq!(rule(p.check(&d, mid)), "consent-category");
        let d = Declaration {
            purpose: "research".into(),
            ..decl()
        };
        assert_eq!(rule(p.check(&d, mid)), "consent-purpose");
        let d = Declaration {
            destination: "elsewhere".into(),
            ..decl()
        };
        assert_eq!(rule(p.check(&d, mid)), "destination-not-allowed");
        let wider = Policy {
            destinations: ["hk-ehealth".to_owned(), "elsewhere".to_owned()].into(),
            ..policy()
        };
        assert_eq!(rule(wider.check(&d, mid)), "consent-destination");
        let d = Declaration {
            consent_ref: Some("C-9".into()),
            ..decl()
        };
        assert_eq!(rule(p.check(&d, mid)), "consent-ref");
    }

    #[test]
    fn logged_reasons_name_no_patient_and_no_unlisted_declared_value() {
        // Every declared value below embeds the patient id, as a careless or hostile hospital
        // might send it; only the answer to that hospital may repeat it.
        const ID: &str = "P-0001";
        let p = policy();
        let mid = at("2026-06-01T00:00:00Z");
        let wider = Policy {
            destinations: ["hk-ehealth".to_owned(), "elsewhere".to_owned()].into(),
            ..policy()
        };
        let cases = [
            (
                &p,
                Declaration {
                    patient_id: "P-0001-X".into(),
                    ..decl()
                },
                "consent-missing",
            ),
            (
                &p,
                Declaration {
                    category: format!("cat-{ID}"),
                    ..decl()
                },
                "category-not-allowed",
            ),
            (
                &p,
                Declaration {
                    destination: format!("dst-{ID}"),
                    ..decl()
                },
                "destination-not-allowed",
            ),
            (
                &p,
                Declaration {
                    purpose: format!("why-{ID}"),
                    ..decl()
                },
                "consent-purpose",
            ),
            (
                &p,
                Declaration {
                    consent_ref: Some(format!("ref-{ID}")),
                    ..decl()
                },
                "consent-ref",
            ),
            (
                &wider,
                Declaration {
                    destination: "elsewhere".into(),
                    ..decl()
                },
                "consent-destination",
            ),
            (
                &p,
                Declaration {
                    category: "radiology-report".into(),
                    ..decl()
                },
                "consent-category",
            ),
        ];
        for (policy, d, want) in cases {
            let Decision::Refuse(r) = policy.check(&d, mid) else {
                panic!("{want}: allowed");
            };
            assert_eq!(r.rule, want);
            assert!(
                !r.reason.contains(ID),
                "{want}: logged reason {:?}",
                r.reason
            );
            assert!(!r.to_string().contains(ID), "{want}: {r}");
        }
        // The hospital's answer still names what it declared.
        let Decision::Refuse(r) = p.check(
            &Declaration {
                purpose: format!("why-{ID}"),
                ..decl()
            },
            mid,
        ) else {
            panic!("allowed");
        };
        assert!(r.answer().contains(&format!("why-{ID}")), "{}", r.answer());
    }

    #[test]
    fn digest_is_stable_and_field_sensitive() {
        assert_eq!(decl().digest(), decl().digest());
        let d = Declaration {
            purpose: "research".into(),
            ..decl()
        };
        assert_ne!(decl().digest(), d.digest());
    }

    #[test]
    fn bad_registry_names_the_record() {
        let bad = REGISTRY.replace("2026-12-31T00:00:00Z", "tomorrow");
        let e = parse_registry(Path::new("c.toml"), &bad).unwrap_err();
        assert!(e.to_string().contains("consent C-1: valid_until"), "{e}");
    }

    #[test]
    fn references_must_be_opaque_process_ids() {
        let with_patient = REGISTRY.replace("\"C-1\"", "\"CONSENT-P-0001\"");
        let e = parse_registry(Path::new("c.toml"), &with_patient)
            .unwrap_err()
            .to_string();
        assert!(e.contains("contains the patient id"), "{e}");
        assert!(!e.contains("P-0001"), "the error names no patient: {e}");

        let long = REGISTRY.replace("\"C-1\"", &format!("\"{}\"", "C".repeat(129)));
        let e = parse_registry(Path::new("c.toml"), &long)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not usable as a process id"), "{e}");

        let ok = REGISTRY.replace("\"C-1\"", &format!("\"{}\"", "C".repeat(128)));
        parse_registry(Path::new("c.toml"), &ok).unwrap();
    }

    #[test]
    fn default_categories_are_the_ehealth_domains_and_keep_existing_ids() {
        let p = Policy::default();
        assert_eq!(p.categories.len(), 11);
        for c in DEFAULT_CATEGORIES {
            assert!(p.categories.contains(*c), "{c}");
            assert!(
                c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{c} is not kebab-case"
            );
        }
        // `send`'s default `--category` and the reports already in use.
        for c in ["diagnostic-image", "laboratory-report", "radiology-report"] {
            assert!(p.categories.contains(c), "{c}");
        }
        assert!(p.destinations.contains("hk-ehealth"));
        assert_eq!(p.destinations.len(), 1);
    }

    #[test]
    fn category_outside_the_list_is_refused_before_consent() {
        let p = policy();
        let mid = at("2026-06-01T00:00:00Z");
        // Not a category at all: refused by the category rule even though the patient has
        // no consent for it either.
        let d = Declaration {
            category: "clinical-note".into(),
            ..decl()
        };
        match p.check(&d, mid) {
            Decision::Refuse(r) => {
                assert_eq!(r.rule, "category-not-allowed");
                assert!(r.answer().contains("clinical-note"), "{}", r.answer());
                assert!(!r.reason.contains("clinical-note"), "{}", r.reason);
            }
            other => panic!("{other:?}"),
        }
        // A configured list replaces the default one.
        let narrow = Policy {
            categories: ["laboratory-report".to_owned()].into(),
            ..policy()
        };
        assert_eq!(rule(narrow.check(&decl(), mid)), "category-not-allowed");
        // The negative list still comes first.
        let d = Declaration {
            category: "genetic-data".into(),
            ..decl()
        };
        assert_eq!(rule(narrow.check(&d, mid)), "negative-list");
    }

    #[test]
    fn destination_outside_the_list_is_refused() {
        let p = policy();
        let mid = at("2026-06-01T00:00:00Z");
        let d = Declaration {
            destination: "cloud-bucket".into(),
            ..decl()
        };
        match p.check(&d, mid) {
            Decision::Refuse(r) => {
                assert_eq!(r.rule, "destination-not-allowed");
                assert!(r.answer().contains("cloud-bucket"), "{}", r.answer());
                assert!(!r.reason.contains("cloud-bucket"), "{}", r.reason);
            }
            other => panic!("{other:?}"),
        }
        let none = Policy {
            destinations: HashSet::new(),
            ..policy()
        };
        assert_eq!(rule(none.check(&decl(), mid)), "destination-not-allowed");
    }

    #[test]
    fn size_limits_refuse_by_rule_at_the_boundary() {
        let p = Policy {
            max_files: 3,
            max_transfer_bytes: 1000,
            ..Policy::default()
        };
        assert!(p.check_size(3, 1000).is_ok());
        let r = p.check_size(4, 10).unwrap_err();
        assert_eq!(r.rule, "size-limit");
        assert!(r.reason.contains("policy.max_files"), "{}", r.reason);
        let r = p.check_size(1, 1001).unwrap_err();
        assert_eq!(r.rule, "size-limit");
        assert!(
            r.reason.contains("policy.max_transfer_bytes"),
            "{}",
            r.reason
        );
        let d = Policy::default();
        assert!(
            d.check_size(DEFAULT_MAX_FILES, DEFAULT_MAX_TRANSFER_BYTES)
                .is_ok()
        );
        assert!(d.check_size(DEFAULT_MAX_FILES + 1, 0).is_err());
    }

    #[test]
    fn load_reads_the_policy_keys_and_defaults_the_rest() {
        let section = PolicySection {
            consents: None,
            negative_list: vec![],
            hospitals: None,
            categories: Some(vec!["referral".into()]),
            destinations: None,
            max_transfer_bytes: Some(5),
            max_files: None,
            deidentify_purposes: vec!["research".into()],
            deidentify_options: Default::default(),
        };
        let p = Policy::load(&section).unwrap();
        assert_eq!(p.categories, ["referral".to_owned()].into());
        assert_eq!(p.destinations, Policy::default().destinations);
        assert_eq!(p.max_transfer_bytes, 5);
        assert_eq!(p.max_files, DEFAULT_MAX_FILES);
    }
}
