//! Where a TLS private key is: a PEM file, or a key pair on the `[hsm]` token named by an
//! RFC 7512 `pkcs11:` URI (`tls.key`, `delivery.key`). A leaf: it uses no other module.

use std::path::{Path, PathBuf};

/// Where a TLS private key is (`tls.key`, `delivery.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsKeySource {
    /// A PEM private key file (PKCS#8, PKCS#1 or SEC1), mode 0600 or stricter.
    File(PathBuf),
    /// An EC P-256 key pair on the `[hsm]` token, by label: `tls.key =
    /// "pkcs11:object=<label>"` (RFC 7512). The private key never leaves the token.
    Hsm {
        /// The key label (`CKA_LABEL` of the private and public key objects).
        label: String,
    },
}

impl TlsKeySource {
    /// The file, for a PEM key.
    pub fn file(&self) -> Option<&Path> {
        match self {
            TlsKeySource::File(p) => Some(p),
            TlsKeySource::Hsm { .. } => None,
        }
    }

    /// The HSM key label, for a token-held key.
    pub fn hsm_label(&self) -> Option<&str> {
        match self {
            TlsKeySource::File(_) => None,
            TlsKeySource::Hsm { label } => Some(label),
        }
    }
}

impl std::fmt::Display for TlsKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsKeySource::File(p) => write!(f, "{}", p.display()),
            TlsKeySource::Hsm { label } => {
                write!(f, "{PKCS11_URI_SCHEME}object={}", percent_encode(label))
            }
        }
    }
}

/// What a `tls.key` naming an HSM key starts with (RFC 7512): a path never does, since a
/// relative path would be written `./pkcs11:...`.
pub const PKCS11_URI_SCHEME: &str = "pkcs11:";

/// Parses `pkcs11:object=<label>[;token=<token label>][;type=private]` (RFC 7512 path
/// attributes, percent-encoding allowed). `token`, when given, must be `hsm.token_label`; the
/// key is always looked for on the `[hsm]` token. Query attributes (`?pin-value=...`) and any
/// other attribute are refused: the PIN comes from `hsm.pin_file` only.
pub fn parse_pkcs11_uri(uri: &str, token_label: &str) -> Result<String, String> {
    let rest = uri
        .strip_prefix(PKCS11_URI_SCHEME)
        .ok_or_else(|| format!("`{uri}` does not start with `{PKCS11_URI_SCHEME}`"))?;
    if rest.contains('?') {
        return Err(format!(
            "`{uri}` has query attributes; only object, token and type are accepted (the PIN \
             comes from hsm.pin_file)"
        ));
    }
    let mut object = None;
    for attr in rest.split(';').filter(|a| !a.is_empty()) {
        let (name, value) = attr
            .split_once('=')
            .ok_or_else(|| format!("`{attr}` in `{uri}` is not name=value"))?;
        let value = percent_decode(value)
            .ok_or_else(|| format!("`{value}` in `{uri}` is not valid percent-encoded UTF-8"))?;
        match name {
            "object" => {
                if object.replace(value).is_some() {
                    return Err(format!("`{uri}` names object twice"));
                }
            }
            "token" if value == token_label => {}
            "token" => {
                return Err(format!(
                    "`{uri}` names token \"{value}\", but the key is looked for on the [hsm] \
                     token \"{token_label}\""
                ));
            }
            "type" if value == "private" => {}
            "type" => return Err(format!("`{uri}`: type must be private")),
            other => {
                return Err(format!(
                    "`{uri}`: attribute `{other}` is not supported (object, token, type)"
                ));
            }
        }
    }
    let label = object.ok_or_else(|| format!("`{uri}` names no object (the key label)"))?;
    if label.is_empty() || label.len() > 32 || label.chars().any(char::is_control) {
        return Err(format!(
            "`{uri}`: the key label must be 1 to 32 bytes without control characters"
        ));
    }
    Ok(label)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl TlsKeySource {
    /// The key config key `value` names: a `pkcs11:` URI ([`parse_pkcs11_uri`], the key on
    /// the token `hsm_token_label`) or a file path, which `resolve` makes absolute.
    ///
    /// A URI naming `signing_label` (`hsm.key_label`, the key that signs manifests,
    /// receipts, delivery notices and audit checkpoints) is refused: a TLS handshake signs
    /// what the other end chose, so the signing key is never lent to one.
    pub fn parse(
        value: &str,
        hsm_token_label: &str,
        signing_label: &str,
        resolve: impl FnOnce(&Path) -> PathBuf,
    ) -> Result<TlsKeySource, String> {
        if value.starts_with(PKCS11_URI_SCHEME) {
            let label = parse_pkcs11_uri(value, hsm_token_label)?;
            if label == signing_label {
                return Err(format!(
                    "`{value}` names \"{label}\", the signing key of hsm.key_label (manifests, \
                     receipts, notices, audit checkpoints); give TLS a key pair of its own \
                     (`baylink hsm keygen`)"
                ));
            }
            Ok(TlsKeySource::Hsm { label })
        } else {
            Ok(TlsKeySource::File(resolve(Path::new(value))))
        }
    }
}
