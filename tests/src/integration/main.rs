//! Cross-crate integration tests: two real appliances (the `baylink` binary) on loopback,
//! SoftHSM tokens, real QUIC, real files through io_uring.
//!
//! One test binary with modules, so it links once.

// Tests fail loudly on anything unexpected; unwrap is the clearest way to say so here.
#![allow(clippy::unwrap_used)]

mod audit;
mod check_config;
mod commitment;
mod compliance;
mod crash;
mod deid;
mod deliver_retry;
mod dicom;
mod dicom_durability;
mod dicom_tls;
mod drain;
mod faults;
mod gateway_peers;
mod hsm_cli;
mod info;
mod ingest;
mod link;
mod notice;
mod orthanc;
mod peer;
mod privacy;
mod prometheus;
mod quota;
mod refusal;
mod reload;
mod resume;
mod retention;
mod secrets;
mod sending;
mod slots;
mod stow_limits;
mod tls_hsm;
mod transfer;
mod watchdog;
