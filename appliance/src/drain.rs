//! Stopping in order: the signals `serve` answers, and the shared state of the edge's drain
//! (a [`Flag`] per moment, an [`Activity`] count of what is still running).
//!
//! SIGTERM starts the drain: the doors stop accepting, what runs goes on until it is done or
//! `drain.timeout` passes. SIGHUP (reload) is handed to the role's reload task.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;

/// The signals `serve` answers, installed before anything else starts: a SIGTERM or SIGHUP
/// that arrives between READY and the first await must not meet the default action
/// (which would end the process without draining).
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// SIGHUP (`systemctl reload`), taken by the role's reload task.
    pub hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers for SIGTERM, SIGINT and SIGHUP.
    pub fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: Some(signal(SignalKind::hangup()).context("SIGHUP handler")?),
        })
    }

    /// Waits for SIGTERM or SIGINT and names it.
    pub async fn shutdown(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// A flag set once (by the drain) and seen by every clone: tasks check it or wait for it.
#[derive(Debug, Clone)]
pub struct Flag(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Flag {
    fn default() -> Flag {
        Flag(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl Flag {
    /// Sets the flag (again: no effect).
    pub fn set(&self) {
        self.0.send_replace(true);
    }
    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
    /// Returns once the flag is set (at once if it is).
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail.
        let _ = rx.wait_for(|set| *set).await;
    }
}

/// The two moments of the edge's drain, shared by its doors (HTTPS, DICOM) and the sender.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    /// SIGTERM arrived: stop accepting connections and associations; what runs goes on.
    pub started: Flag,
    /// `drain.timeout` passed (or nothing was left running): what still runs is stopped
    /// (an upload still arriving is answered 503, an association is aborted).
    pub ended: Flag,
}

/// Counts things in progress (connections, associations, sends) for the drain to wait on.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<AtomicUsize>);

impl Activity {
    /// Counts one more until the guard drops.
    pub fn enter(&self) -> ActivityGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(self.0.clone())
    }
    /// How many are in progress.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One thing in progress of an [`Activity`]; counted until dropped.
#[derive(Debug)]
pub struct ActivityGuard(Arc<AtomicUsize>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
