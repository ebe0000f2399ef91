//! Finding and describing key objects on the token: by label, EC P-256 only.

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::error::HsmError;
use crate::public_key::{PublicKey, SEC1_POINT_LEN};

/// DER of the named-curve OID prime256v1 (1.2.840.10045.3.1.7): the `CKA_EC_PARAMS` of a P-256 key.
pub(crate) const P256_EC_PARAMS: [u8; 10] =
    [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Labels are at most 32 bytes in PKCS#11 token info; we hold key labels to the same rule.
pub(crate) const MAX_LABEL_LEN: usize = 32;

pub(crate) fn check_label(label: &str) -> Result<(), HsmError> {
    let reason = if label.is_empty() {
        "empty"
    } else if label.len() > MAX_LABEL_LEN {
        "longer than 32 bytes"
    } else if label.starts_with(' ') || label.ends_with(' ') {
        "leading or trailing spaces (PKCS#11 pads labels with spaces)"
    } else if label.chars().any(char::is_control) {
        "control characters"
    } else {
        return Ok(());
    };
    Err(HsmError::InvalidLabel {
        label: label.to_owned(),
        reason,
    })
}

/// A key pair found by label.
#[derive(Debug, Clone)]
pub(crate) struct KeyPair {
    pub(crate) private: ObjectHandle,
    pub(crate) public_key: PublicKey,
}

/// What the token says about a private key's protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyProtection {
    /// `CKA_SENSITIVE`: the key value cannot be read.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`: the key can be wrapped out.
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`: sensitive since it was made.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`: never was extractable.
    pub never_extractable: bool,
}

fn one(
    session: &Session,
    class: ObjectClass,
    label: &str,
    token: &str,
) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| {
            HsmError::call(
                format!("looking for key \"{label}\" on token \"{token}\""),
                e,
            )
        })?;
    match found.as_slice() {
        [] => Ok(None),
        [handle] => Ok(Some(*handle)),
        many => Err(HsmError::KeyAmbiguous {
            label: label.to_owned(),
            token: token.to_owned(),
            class: if class == ObjectClass::PRIVATE_KEY {
                "private key"
            } else {
                "public key"
            },
            count: many.len(),
        }),
    }
}

/// The data objects (`CKO_DATA`) labelled `label` for `application`.
pub(crate) fn find_data(
    session: &Session,
    label: &str,
    application: &str,
    token: &str,
) -> Result<Vec<ObjectHandle>, HsmError> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Application(application.as_bytes().to_vec()),
        ])
        .map_err(|e| {
            HsmError::call(
                format!(
                    "looking for data object \"{label}\" of {application} on token \"{token}\""
                ),
                e,
            )
        })
}

/// The `CKA_VALUE` of a data object.
pub(crate) fn data_value(
    session: &Session,
    object: ObjectHandle,
    label: &str,
    token: &str,
) -> Result<Vec<u8>, HsmError> {
    let attrs = session
        .get_attributes(object, &[AttributeType::Value])
        .map_err(|e| {
            HsmError::call(
                format!("reading data object \"{label}\" on token \"{token}\""),
                e,
            )
        })?;
    attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::Value(v) => Some(v),
            _ => None,
        })
        .ok_or_else(|| HsmError::BadDataObject {
            label: label.to_owned(),
            token: token.to_owned(),
            reason: "its CKA_VALUE cannot be read".into(),
        })
}

/// Whether any object (of any class) carries this label.
pub(crate) fn label_in_use(session: &Session, label: &str, token: &str) -> Result<bool, HsmError> {
    let found = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .map_err(|e| {
            HsmError::call(
                format!("looking for objects labelled \"{label}\" on token \"{token}\""),
                e,
            )
        })?;
    Ok(!found.is_empty())
}

/// The private key handle and the public key (from the public key object) for `label`.
pub(crate) fn find_key_pair(
    session: &Session,
    label: &str,
    token: &str,
) -> Result<KeyPair, HsmError> {
    let private = one(session, ObjectClass::PRIVATE_KEY, label, token)?.ok_or_else(|| {
        HsmError::KeyNotFound {
            label: label.to_owned(),
            token: token.to_owned(),
        }
    })?;
    let key_type = attributes(session, private, &[AttributeType::KeyType], label, token)?;
    if !key_type
        .iter()
        .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::EC))
    {
        return Err(unsupported(label, "the private key is not an EC key"));
    }
    let public = one(session, ObjectClass::PUBLIC_KEY, label, token)?.ok_or_else(|| {
        HsmError::PublicKeyNotFound {
            label: label.to_owned(),
            token: token.to_owned(),
        }
    })?;
    let public_key = read_public_key(session, public, label, token)?;
    Ok(KeyPair {
        private,
        public_key,
    })
}

/// Reads and checks `CKA_EC_PARAMS` (P-256) and `CKA_EC_POINT` of a public key object.
pub(crate) fn read_public_key(
    session: &Session,
    public: ObjectHandle,
    label: &str,
    token: &str,
) -> Result<PublicKey, HsmError> {
    let attrs = attributes(
        session,
        public,
        &[AttributeType::EcParams, AttributeType::EcPoint],
        label,
        token,
    )?;
    let mut params = None;
    let mut point = None;
    for attr in attrs {
        match attr {
            Attribute::EcParams(p) => params = Some(p),
            Attribute::EcPoint(p) => point = Some(p),
            _ => {}
        }
    }
    if params.as_deref() != Some(&P256_EC_PARAMS[..]) {
        return Err(unsupported(label, "the key is not on curve P-256"));
    }
    let point = point.ok_or_else(|| unsupported(label, "the public key has no CKA_EC_POINT"))?;
    let point = unwrap_ec_point(&point)
        .ok_or_else(|| unsupported(label, "CKA_EC_POINT is not an uncompressed P-256 point"))?;
    PublicKey::from_sec1(point).map_err(|e| unsupported(label, &e.to_string()))
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the point (PKCS#11 2.40); some tokens give the
/// bare point. Accept both, nothing else.
fn unwrap_ec_point(value: &[u8]) -> Option<&[u8]> {
    match value {
        [0x04, len, point @ ..]
            if usize::from(*len) == SEC1_POINT_LEN && point.len() == SEC1_POINT_LEN =>
        {
            Some(point)
        }
        point if point.len() == SEC1_POINT_LEN => Some(point),
        _ => None,
    }
}

/// Reads the protection attributes of a private key.
pub(crate) fn protection(
    session: &Session,
    private: ObjectHandle,
    label: &str,
    token: &str,
) -> Result<KeyProtection, HsmError> {
    let attrs = attributes(
        session,
        private,
        &[
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
        ],
        label,
        token,
    )?;
    // Absent attributes read as the unsafe answer.
    let mut p = KeyProtection {
        sensitive: false,
        extractable: true,
        always_sensitive: false,
        never_extractable: false,
    };
    for attr in attrs {
        match attr {
            Attribute::Sensitive(v) => p.sensitive = v,
            Attribute::Extractable(v) => p.extractable = v,
            Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
            Attribute::NeverExtractable(v) => p.never_extractable = v,
            _ => {}
        }
    }
    Ok(p)
}

fn attributes(
    session: &Session,
    object: ObjectHandle,
    which: &[AttributeType],
    label: &str,
    token: &str,
) -> Result<Vec<Attribute>, HsmError> {
    session.get_attributes(object, which).map_err(|e| {
        HsmError::call(
            format!("reading attributes of key \"{label}\" on token \"{token}\""),
            e,
        )
    })
}

fn unsupported(label: &str, reason: &str) -> HsmError {
    HsmError::UnsupportedKey {
        label: label.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_forms() {
        let mut point = [0u8; 65];
        point[0] = 4;
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&point);
        assert_eq!(unwrap_ec_point(&wrapped), Some(&point[..]));
        assert_eq!(unwrap_ec_point(&point), Some(&point[..]));
        assert_eq!(unwrap_ec_point(&wrapped[..66]), None);
        assert_eq!(unwrap_ec_point(&[0x04, 33, 2]), None);
        assert_eq!(unwrap_ec_point(&[]), None);
    }

    #[test]
    fn labels() {
        check_label("baylink-signing").unwrap();
        check_label(&"x".repeat(32)).unwrap();
        for bad in ["", " x", "x ", "a\nb", &"x".repeat(33)] {
            assert!(
                matches!(check_label(bad), Err(HsmError::InvalidLabel { .. })),
                "{bad:?}"
            );
        }
    }
}
