//! Secret files at rest: `serve` and `send` refuse to start while one the config names can be
//! read by anyone but the appliance's own user.
//!
//! Checked: `hsm.pin_file`, `tls.key`, `delivery.key` and `audit.patient_key`: the files
//! whose copy would let someone sign in the HSM's name, impersonate the appliance, or link
//! pseudonymised audit records back to patients. A file that does not exist is left to the
//! code that reads it (which names it; a missing patient key is created with mode 0600).
//! A `tls.key` naming a key on the HSM (`pkcs11:object=...`) is no file and has no mode: the
//! private key never leaves the token, and the token's PIN file is checked.
//!
//! What this module does not do: read the secrets, or change a mode itself (the operator
//! decides who may read a file; baylink only refuses to rely on an exposed one).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{Config, DeliverySection};
use crate::deliver::dicomweb::StowSettings;

/// The mode bits that make a file readable by its group or by others.
const GROUP_OR_OTHER_READ: u32 = 0o044;

/// A secret file `serve` or `send` will not use.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// Its group or others may read it.
    #[error(
        "{key} {} is readable by group or others (mode {mode:04o}); chmod 600 it",
        path.display()
    )]
    Exposed {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Its mode could not be read.
    #[error("{key} {}: cannot read its mode: {source}", path.display())]
    Stat {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The secret files a config names, with the key naming each.
pub fn secret_files(cfg: &Config) -> Vec<(&'static str, &Path)> {
    let mut files = vec![("hsm.pin_file", cfg.hsm.pin_file.as_path())];
    if let Some(key) = cfg.tls.key.file() {
        files.push(("tls.key", key));
    }
    files.push(("audit.patient_key", cfg.audit.patient_key.as_path()));
    if let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = &cfg.delivery
        && let Some(key) = tls.identity.as_ref().and_then(|(_, key)| key.file())
    {
        files.push(("delivery.key", key));
    }
    files
}

/// Refuses the first secret file of `cfg` that its group or others may read (symbolic links
/// followed: the mode of the file itself counts).
pub fn check_modes(cfg: &Config) -> Result<(), SecretFileError> {
    for (key, path) in secret_files(cfg) {
        check_mode(key, path)?;
    }
    Ok(())
}

fn check_mode(key: &'static str, path: &Path) -> Result<(), SecretFileError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SecretFileError::Stat {
                key,
                path: path.to_owned(),
                source,
            });
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OR_OTHER_READ != 0 {
        return Err(SecretFileError::Exposed {
            key,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn group_or_other_read_is_refused_naming_key_file_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        fs::write(&f, "1234").unwrap();
        for (mode, refused) in [
            (0o600, false),
            (0o400, false),
            (0o700, false),
            (0o620, false),
            (0o640, true),
            (0o604, true),
            (0o644, true),
            (0o440, true),
        ] {
            fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            match check_mode("hsm.pin_file", &f) {
                Ok(()) => assert!(!refused, "{mode:o} accepted"),
                Err(e) => {
                    assert!(refused, "{mode:o} refused: {e}");
                    assert_eq!(
                        e.to_string(),
                        format!(
                            "hsm.pin_file {} is readable by group or others (mode {mode:04o}); \
                             chmod 600 it",
                            f.display()
                        )
                    );
                }
            }
        }
        // Missing: left to the reader, which names it.
        check_mode("tls.key", &dir.path().join("absent")).unwrap();
    }

    #[test]
    fn the_files_checked_are_the_pin_the_tls_keys_and_the_patient_key() {
        let text = "role = \"gateway\"\n\
            [hsm]\nmodule = \"/m.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\n\
            pin_file = \"secrets/pin\"\n\
            [peer]\nsigning_key = \"peer.pem\"\nnames = [\"edge\"]\n\
            [tls]\nca = \"ca.pem\"\ncert = \"me.pem\"\nkey = \"me.key\"\n\
            [transport]\nlisten = \"127.0.0.1:1\"\n\
            [metrics]\nlisten = \"127.0.0.1:2\"\n\
            [spool]\ndir = \"spool\"\n\
            [audit]\ndir = \"state/audit\"\n\
            [delivery]\nkind = \"dicomweb\"\nurl = \"https://store:8443/dicom-web\"\n\
            ca = \"store-ca.pem\"\ncert = \"client.pem\"\nkey = \"client.key\"\n";
        let cfg = Config::parse(Path::new("/etc/b/g.toml"), text).unwrap();
        let files: Vec<_> = secret_files(&cfg)
            .into_iter()
            .map(|(k, p)| (k, p.to_owned()))
            .collect();
        assert_eq!(
            files,
            [
                ("hsm.pin_file", PathBuf::from("/etc/b/secrets/pin")),
                ("tls.key", PathBuf::from("/etc/b/me.key")),
                (
                    "audit.patient_key",
                    PathBuf::from("/etc/b/state/secrets/patient.key")
                ),
                ("delivery.key", PathBuf::from("/etc/b/client.key")),
            ]
        );
        // A TLS key held in the HSM is no file: nothing to check for it.
        let hsm = text.replace("key = \"me.key\"", "key = \"pkcs11:object=tls\"");
        let cfg = Config::parse(Path::new("/etc/b/g.toml"), &hsm).unwrap();
        let keys: Vec<_> = secret_files(&cfg).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["hsm.pin_file", "audit.patient_key", "delivery.key"]);
    }

    #[test]
    fn a_symbolic_link_counts_by_the_file_it_points_to() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        fs::write(&f, "k").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(check_mode("tls.key", &link).is_err());
    }
}
