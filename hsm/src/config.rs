//! What the appliance tells this crate: module path, labels, PIN, pool size. This crate reads
//! no configuration files; the PIN file is the one exception, through [`read_pin`].

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::error::{HsmError, PinError};

/// How to reach the signing key. `Debug` shows the PIN as `[REDACTED]`.
#[derive(Clone, Debug)]
pub struct HsmConfig {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label (slots are found by label, never by number).
    pub token_label: String,
    /// The label of the signing key pair (private and public objects share it).
    pub key_label: String,
    /// The user PIN.
    pub pin: SecretString,
    /// Sessions in the pool: how many signatures can be in flight at once.
    pub sessions: usize,
}

impl HsmConfig {
    /// Pool size when none is configured.
    pub const DEFAULT_SESSIONS: usize = 4;

    /// A configuration with [`HsmConfig::DEFAULT_SESSIONS`] sessions.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: impl Into<String>,
        key_label: impl Into<String>,
        pin: SecretString,
    ) -> Self {
        HsmConfig {
            module: module.into(),
            token_label: token_label.into(),
            key_label: key_label.into(),
            pin,
            sessions: Self::DEFAULT_SESSIONS,
        }
    }
}

/// Refuse PIN files larger than this; no token takes a PIN anywhere near it.
pub const MAX_PIN_FILE_BYTES: u64 = 1024;

/// Reads a PIN from a file or a systemd credential (`$CREDENTIALS_DIRECTORY/...`).
///
/// Removes one trailing newline (`\n` or `\r\n`) and nothing else; refuses an empty PIN,
/// a file over [`MAX_PIN_FILE_BYTES`] and text that is not UTF-8. The buffer is zeroed after use.
pub fn read_pin(path: &Path) -> Result<SecretString, HsmError> {
    let read_err = |source| PinError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(64));
    file.take(MAX_PIN_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PIN_FILE_BYTES {
        return Err(PinError::TooLarge {
            path: path.to_owned(),
            limit: MAX_PIN_FILE_BYTES,
        }
        .into());
    }
    let mut pin: &[u8] = &bytes;
    if let Some(rest) = pin.strip_suffix(b"\n") {
        pin = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    if pin.is_empty() {
        return Err(PinError::Empty {
            path: path.to_owned(),
        }
        .into());
    }
    let text = std::str::from_utf8(pin).map_err(|_| PinError::NotUtf8 {
        path: path.to_owned(),
    })?;
    // `From<&str>` copies into an exactly-sized box; `bytes` is zeroed when dropped.
    Ok(SecretString::from(text))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    fn pin_file(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, content).unwrap();
        f
    }

    #[test]
    fn trims_exactly_one_newline() {
        let f = pin_file(b"1234\n");
        assert_eq!(read_pin(f.path()).unwrap().expose_secret(), "1234");
        let f = pin_file(b"1234\r\n");
        assert_eq!(read_pin(f.path()).unwrap().expose_secret(), "1234");
        let f = pin_file(b"1234\n\n");
        assert_eq!(read_pin(f.path()).unwrap().expose_secret(), "1234\n");
        let f = pin_file(b" 12 34 ");
        assert_eq!(read_pin(f.path()).unwrap().expose_secret(), " 12 34 ");
    }

    #[test]
    fn refuses_empty_large_and_binary() {
        for content in [&b""[..], b"\n", b"\r\n"] {
            let f = pin_file(content);
            assert!(matches!(
                read_pin(f.path()),
                Err(HsmError::Pin(PinError::Empty { .. }))
            ));
        }
        let f = pin_file(&vec![b'1'; MAX_PIN_FILE_BYTES as usize + 1]);
        assert!(matches!(
            read_pin(f.path()),
            Err(HsmError::Pin(PinError::TooLarge { .. }))
        ));
        let f = pin_file(b"\xff\xfe");
        assert!(matches!(
            read_pin(f.path()),
            Err(HsmError::Pin(PinError::NotUtf8 { .. }))
        ));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_pin(Path::new("/nonexistent/baylink/pin")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read PIN file /nonexistent/baylink/pin"
        );
    }

    #[test]
    fn debug_redacts_the_pin() {
        let cfg = HsmConfig::new("/m.so", "tok", "key", SecretString::from("s3cret-pin"));
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("s3cret-pin"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }
}
