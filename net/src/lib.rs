//! baylink's network layer.
//!
//! - [`proto`]: the transfer protocol as a sans-IO state machine (manifest, frames, chunk
//!   bookkeeping, resume, receipts). No I/O, no async, no clocks.
//! - [`merkle`]: RFC 6962 Merkle trees over SHA-256, proofs and their verification: the
//!   manifest's tree of chunk digests and the audit log's tree of records.
//! - [`congestion`]: `link`, a rate-based congestion controller for a dedicated link of known
//!   rate (paced at most at `link.rate_mbit`, backs off on queueing delay, not on random loss).
//! - [`transport`]: QUIC set-up: rustls mutual TLS 1.3 (X25519MLKEM768 preferred), quinn
//!   endpoints, UDP socket buffers and flow-control windows from the bandwidth-delay product.
//! - [`spool`]: file I/O on a dedicated io_uring thread with a bounded pool of recycled
//!   buffers (all tokio-uring use stays there).
//! - [`probe`]: what the host offers the link (UDP GSO/GRO, socket buffer limits) and what
//!   the appliance's certificates say, read-only, for `baylink info`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod batched_recv;
pub mod congestion;
pub mod merkle;
pub mod probe;
pub mod proto;
pub mod spool;
pub mod transport;
