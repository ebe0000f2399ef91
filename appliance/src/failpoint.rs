//! Crash points for the crash tests: `BAYLINK_FAILPOINT=<step>` makes the process abort at
//! that named step, as a power cut or a SIGKILL would stop it there.
//!
//! The crash tests run the release or dev binary as built, so the switch is read at run
//! time, not compiled in: once, on the first [`hit`], into a static; when the variable is
//! unset every later [`hit`] is one load and one comparison. The abort is
//! `std::process::abort()`: no destructors run, nothing buffered is flushed, no lock file is
//! released other than by the kernel, exactly what a crash leaves behind. One line naming the
//! step goes to stderr first (unbuffered), so a test can tell where the process died.
//!
//! The steps, in the order a new transfer passes them (see `docs/audit.md`, "What the log
//! shows before it happens"):
//!
//! | step | the process has just |
//! |---|---|
//! | [`SEAL_AFTER_DATA`] | copied every payload file into `data/` and made it durable |
//! | [`SEAL_AFTER_MANIFEST`] | written `manifest.sig`, `manifest.json` and the staged manifest (`manifest.pending`); no `sealed` record yet |
//! | [`SEAL_AFTER_SEALED`] | made the `sealed` record durable; `manifest.bin` not yet in place |
//! | [`SEAL_AFTER_PUBLISH`] | put `manifest.bin` in place: the transfer is sendable |
//! | [`SEND_AFTER_SENT`] | made the `sent` record durable (the gateway's receipt arrived) |
//! | [`SEND_AFTER_RECEIPTED`] | made the `receipted` record durable; the receipt not yet stored |
//! | [`COMMIT_AFTER_COMMITTED`] | (gateway) made the `committed` record durable; no `receipt.sig` yet |
//!
//! An unknown name never matches, so the process runs normally: the tests assert that it
//! died, which catches a misspelt step.

use std::sync::OnceLock;

/// The environment variable naming the step to abort at.
pub const ENV: &str = "BAYLINK_FAILPOINT";

/// Every payload file is durable in `data/`; nothing of the manifest is written.
pub const SEAL_AFTER_DATA: &str = "seal:after-data";
/// The manifest is signed and staged; the `sealed` record is not written.
pub const SEAL_AFTER_MANIFEST: &str = "seal:after-manifest";
/// The `sealed` record is durable; `manifest.bin` is not in place.
pub const SEAL_AFTER_SEALED: &str = "seal:after-sealed";
/// `manifest.bin` is in place: the transfer is sealed and sendable.
pub const SEAL_AFTER_PUBLISH: &str = "seal:after-publish";
/// The `sent` record is durable.
pub const SEND_AFTER_SENT: &str = "send:after-sent";
/// The `receipted` record is durable; `receipt.bin`/`receipt.sig` are not stored.
pub const SEND_AFTER_RECEIPTED: &str = "send:after-receipted";

/// Gateway: the `committed` record is durable; the receipt files are not written.
pub const COMMIT_AFTER_COMMITTED: &str = "commit:after-committed";

/// Every step, for documentation and tests.
pub const STEPS: [&str; 7] = [
    SEAL_AFTER_DATA,
    SEAL_AFTER_MANIFEST,
    SEAL_AFTER_SEALED,
    SEAL_AFTER_PUBLISH,
    SEND_AFTER_SENT,
    SEND_AFTER_RECEIPTED,
    COMMIT_AFTER_COMMITTED,
];

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Aborts the process if `BAYLINK_FAILPOINT` names `step`.
pub fn hit(step: &'static str) {
    let armed = ARMED.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()));
    if armed.as_deref() == Some(step) {
        eprintln!("failpoint {step}: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_distinct_and_named_by_phase() {
        let mut seen = std::collections::HashSet::new();
        for s in STEPS {
            assert!(seen.insert(s), "{s} twice");
            let (phase, what) = s.split_once(':').unwrap();
            assert!(matches!(phase, "seal" | "send" | "commit"), "{s}");
            assert!(what.starts_with("after-"), "{s}");
        }
    }

    #[test]
    fn an_unarmed_step_returns() {
        // The test process has no BAYLINK_FAILPOINT naming a real step.
        if std::env::var(ENV).is_err() {
            for s in STEPS {
                hit(s);
            }
        }
    }
}
