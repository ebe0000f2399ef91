//! A test fixture: an audit log in a temporary directory, signed by a key on a fresh SoftHSM
//! token. Tests that create one are `#[serial_test::serial]` (SoftHSM token set-up).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use baylink_hsm::testing::SoftHsm;
use baylink_hsm::{PublicKey, Signer, Token};

use super::{AuditError, Log, LogSettings, Summary, verify};

/// A SoftHSM key and a log directory. Field order is drop order: the token before the fixture.
pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    /// Holds the patient key, outside the log directory.
    pub(crate) secrets: tempfile::TempDir,
    pub(crate) signer: Signer,
    pub(crate) token: Token,
    pub(crate) hsm: SoftHsm,
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.open("audit").unwrap();
        token.generate_key("audit").unwrap();
        let signer = token.signer().unwrap();
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            secrets: tempfile::tempdir().unwrap(),
            signer,
            token,
            hsm,
        }
    }

    pub(crate) fn settings(&self, every: u64) -> LogSettings {
        LogSettings {
            dir: self.dir.path().to_owned(),
            appliance_id: "edge".into(),
            checkpoint_every: every,
            patient_key: self.secrets.path().join("patient.key"),
        }
    }

    /// Opens (or reopens) the log, signing a checkpoint every `every` records.
    pub(crate) fn open(&self, every: u64) -> Log {
        Log::open(&self.settings(every), self.signer.clone()).unwrap()
    }

    pub(crate) fn key(&self) -> PublicKey {
        self.signer.public_key().clone()
    }

    /// A file in the log directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `audit verify` of the directory with the fixture's key.
    pub(crate) fn verify(&self) -> Result<Summary, AuditError> {
        verify(self.dir.path(), &self.key())
    }
}
