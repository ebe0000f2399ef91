//! Test support (feature `testing`): SoftHSM 2 with a private token directory per fixture.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, in `C_Initialize`, and `C_Initialize` runs once per
//! process while any [`Token`] of the module lives. So a fixture sets the variable and
//! initialises a fresh token, and everything opened under it must be dropped before the
//! fixture is (declare the fixture first in a test: locals drop in reverse order).
//!
//! Under cargo-nextest every test is its own process and fixtures never meet. Under
//! `cargo test` tests are threads of one process: mark every test that creates a fixture
//! `#[serial_test::serial]`. A fixture also holds a process-wide lock for its whole life, so
//! fixtures never overlap even if a test forgets; one test cannot hold two fixtures at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use secrecy::SecretString;
use tempfile::TempDir;

use crate::config::HsmConfig;
use crate::error::HsmError;
use crate::provision;
use crate::token::Token;

/// Where Debian's softhsm2 package puts the module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Environment variable that overrides [`DEFAULT_MODULE`] (as cryptoki's own tests do).
pub const MODULE_ENV: &str = "BAYLINK_TEST_PKCS11_MODULE";
/// The user PIN of fixture tokens.
pub const USER_PIN: &str = "baylink-user-pin";
/// The security officer PIN of fixture tokens.
pub const SO_PIN: &str = "baylink-so-pin";

static EXCLUSIVE: Mutex<()> = Mutex::new(());
static NEXT_TOKEN: AtomicU32 = AtomicU32::new(0);

/// The PKCS#11 module tests use: `$BAYLINK_TEST_PKCS11_MODULE`, else [`DEFAULT_MODULE`].
pub fn module_path() -> PathBuf {
    std::env::var_os(MODULE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODULE))
}

/// Why a fixture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// Creating the token directory or configuration file failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Token set-up failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// A raw PKCS#11 call made by the fixture failed.
    #[error("{0}")]
    Raw(String),
}

/// A SoftHSM token in a private directory, initialised with [`USER_PIN`] / [`SO_PIN`] and a
/// label unique in this process. Dropping it deletes the directory.
#[derive(Debug)]
pub struct SoftHsm {
    token_label: String,
    module: PathBuf,
    conf: PathBuf,
    // Field order is drop order: the directory goes before the lock is released.
    dir: TempDir,
    _exclusive: MutexGuard<'static, ()>,
}

impl SoftHsm {
    /// Creates the directory and configuration, points `SOFTHSM2_CONF` at it and initialises
    /// a token. Blocks while another fixture of this process is alive.
    #[allow(unsafe_code)] // set_var: see the SAFETY comment
    pub fn new() -> Result<SoftHsm, FixtureError> {
        // A panicking test poisons the lock; the next fixture starts from scratch anyway.
        let exclusive = EXCLUSIVE.lock().unwrap_or_else(PoisonError::into_inner);
        let io = |what: String| move |source| FixtureError::Io { what, source };
        let dir = tempfile::Builder::new()
            .prefix("baylink-softhsm-")
            .tempdir()
            .map_err(io("creating a temporary directory".into()))?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).map_err(io(format!("creating {}", tokens.display())))?;
        let conf = dir.path().join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        );
        std::fs::write(&conf, text).map_err(io(format!("writing {}", conf.display())))?;
        // aws-lc reads its environment (OPENSSL_ia32cap) once, when it initialises; do that
        // now so a parallel non-HSM test cannot be inside that getenv during set_var below.
        aws_lc_rs::init();
        // SAFETY: `set_var` is unsound only if another thread reads the environment through
        // libc at the same time (Rust's own env functions share a lock with it). This runs
        // while holding `EXCLUSIVE`, and tests that create fixtures are `#[serial]`, so no
        // other fixture and no PKCS#11 module code (SoftHSM reads SOFTHSM2_CONF in
        // C_Initialize) runs concurrently in this process; aws-lc, the other C code in the
        // tests, finished reading its environment above. Under cargo-nextest each test is a
        // process of its own.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        let token_label = format!(
            "baylink-test-{}-{}",
            std::process::id(),
            NEXT_TOKEN.fetch_add(1, Ordering::Relaxed)
        );
        let module = module_path();
        provision::init_token(&module, &token_label, &so_pin(), &user_pin())?;
        Ok(SoftHsm {
            token_label,
            module,
            conf,
            dir,
            _exclusive: exclusive,
        })
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// The module path.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The `softhsm2.conf` this fixture wrote.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The fixture's directory (configuration and `tokens/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A configuration for this token with `key_label` and the default pool size.
    pub fn config(&self, key_label: &str) -> HsmConfig {
        HsmConfig::new(&self.module, &self.token_label, key_label, user_pin())
    }

    /// Opens this token with `key_label` configured.
    pub fn open(&self, key_label: &str) -> Result<Token, HsmError> {
        Token::open(&self.config(key_label))
    }
}

/// [`USER_PIN`] as a secret.
pub fn user_pin() -> SecretString {
    SecretString::from(USER_PIN)
}

/// [`SO_PIN`] as a secret.
pub fn so_pin() -> SecretString {
    SecretString::from(SO_PIN)
}

/// Calls `C_CloseAllSessions(slot_id)` on `module` without going through any [`Token`]: every
/// session of this process on that token closes and the login is lost, as after a token reset.
/// The module must already be initialised in this process (a [`Token`] is open).
#[allow(unsafe_code)] // raw FFI: see the SAFETY comments
pub fn close_all_sessions(module: &Path, slot_id: u64) -> Result<(), FixtureError> {
    // SAFETY: loading the module runs its initialisers; it is the same library the open Token
    // already loaded (dlopen returns the loaded copy), so nothing new runs.
    let raw = unsafe { cryptoki_sys::Pkcs11::new(module) }
        .map_err(|e| FixtureError::Raw(format!("cannot load {}: {e}", module.display())))?;
    if raw.C_CloseAllSessions.is_err() {
        return Err(FixtureError::Raw(format!(
            "{} has no C_CloseAllSessions",
            module.display()
        )));
    }
    // SAFETY: C_CloseAllSessions takes a slot id by value and no pointers; the module is
    // initialised (checked by the return code) and the symbol exists (checked above).
    let rv = unsafe { raw.C_CloseAllSessions(slot_id) };
    if rv == cryptoki_sys::CKR_OK {
        Ok(())
    } else {
        Err(FixtureError::Raw(format!(
            "C_CloseAllSessions returned 0x{rv:08X}"
        )))
    }
}
