//! Cross-crate integration tests: two real appliances (the `baylink` binary) on loopback,
//! SoftHSM tokens, real QUIC, real files through io_uring.
//!
//! One test binary with modules, so it links once.

// Tests fail loudly on anything unexpected; unwrap is the clearest way to say so here.
#![allow(clippy::unwrap_used)]

mod audit;
mod compliance;
mod deid;
mod dicom;
mod faults;
mod hsm_cli;
mod ingest;
mod link;
mod orthanc;
mod peer;
mod quota;
mod refusal;
mod resume;
mod retention;
mod stow_limits;
mod transfer;
