//! The baylink appliance: both roles of the regulated Shenzhen–Hong Kong imaging link.
//!
//! The edge checks each upload against the compliance policy ([`policy`]), seals it into its
//! spool ([`seal`]) and sends it ([`edge`], [`link::send`]); the gateway receives, verifies and
//! commits it ([`gateway`]), signs a receipt, and delivers it downstream ([`deliver`]).
//! [`serve`] runs a role as a service (after [`check`] found no error in its config),
//! `devenv` builds a loopback deployment (feature `dev-env`, on by default; the shipped
//! binary is built without it). [`dicom`] is the edge's DICOM C-STORE door. Every step is first recorded in the appliance's
//! tamper-evident [`audit`] log.
//!
//! What this crate deliberately does not do: speak QUIC or touch io_uring itself (that is
//! `baylink-net`), or hold keys (signing happens only in the HSM, through `baylink-hsm`).

#![warn(missing_docs)]

pub mod admission;
pub mod audit;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod deliver;
#[cfg(feature = "dev-env")]
pub mod devenv;
pub mod dicom;
pub mod drain;
pub mod edge;
pub mod failpoint;
pub mod gateway;
pub mod health;
pub mod info;
pub mod ingest;
pub mod key_source;
pub mod keys;
pub mod link;
pub mod notice;
#[cfg(any(test, feature = "dev-env"))]
pub mod pki;
pub mod policy;
pub mod retention;
pub mod seal;
pub mod secrets;
pub mod series;
pub mod serve;
pub mod setting;
pub mod signing;
pub mod spool_state;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod tls_reload;
pub mod transfer_dir;
