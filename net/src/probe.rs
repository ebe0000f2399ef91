//! What this host offers the link, asked of the kernel rather than assumed: UDP segmentation
//! offload (GSO) and receive coalescing (GRO) on a socket set up like the link's, the socket
//! buffers the kernel grants against its limits, and the subjects and validity of the
//! certificates the appliance presents or trusts. `baylink info` reports these for support.
//!
//! Not here: anything that changes the system. Every probe is read-only apart from binding a
//! socket for as long as the probe runs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;

use crate::transport::{self, SocketBuffers, TransportError};

/// Segmentation offload and buffers of a UDP socket bound like the link's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpOffload {
    /// The address the probe socket was bound to.
    pub bound: SocketAddr,
    /// Datagrams the kernel takes in one `sendmsg` (1: no GSO).
    pub gso_segments: usize,
    /// Datagrams the kernel may coalesce into one receive (1: no GRO).
    pub gro_segments: usize,
    /// The socket buffers requested and granted.
    pub buffers: SocketBuffers,
    /// `net.core.rmem_max`, when readable: the ceiling on a granted receive buffer.
    pub rmem_max: Option<u64>,
    /// `net.core.wmem_max`, when readable: the ceiling on a granted send buffer.
    pub wmem_max: Option<u64>,
}

/// Binds a UDP socket on `addr` (port 0 for an ephemeral one) with `buffer_bytes` requested,
/// as the transport does, and asks quinn's UDP layer what the kernel offers on it.
pub fn udp_offload(addr: SocketAddr, buffer_bytes: usize) -> Result<UdpOffload, TransportError> {
    let (socket, buffers) = transport::bind_udp_socket(addr, buffer_bytes)?;
    let bound = socket
        .local_addr()
        .map_err(|source| TransportError::Bind { addr, source })?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())
        .map_err(|source| TransportError::Bind { addr, source })?;
    Ok(UdpOffload {
        bound,
        gso_segments: state.max_gso_segments(),
        gro_segments: state.gro_segments(),
        buffers,
        rmem_max: read_sysctl("/proc/sys/net/core/rmem_max"),
        wmem_max: read_sysctl("/proc/sys/net/core/wmem_max"),
    })
}

fn read_sysctl(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// The subject, RFC 4514 style (`CN=edge-1`).
    pub subject: String,
    /// The issuer, RFC 4514 style.
    pub issuer: String,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertificateSummary {
    /// Time left until notAfter (`None` once it has passed).
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        let after = u64::try_from(self.not_after).ok()?;
        after.checked_sub(now).map(Duration::from_secs)
    }
}

/// Why a certificate file could not be summarised.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The file holds no certificate or cannot be read.
    #[error(transparent)]
    Load(#[from] TransportError),
    /// A certificate in it is not valid DER X.509.
    #[error("{path}: certificate {index} is not a valid X.509 certificate: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// 0-based position in the file.
        index: usize,
        /// The parser's words.
        reason: String,
    },
}

/// Summarises every certificate in a PEM file, in file order.
pub fn certificate_file(path: &Path) -> Result<Vec<CertificateSummary>, CertificateError> {
    let certs = transport::load_ca(path)?;
    certs
        .iter()
        .enumerate()
        .map(|(index, der)| {
            summarize(der).map_err(|reason| CertificateError::Parse {
                path: path.display().to_string(),
                index,
                reason,
            })
        })
        .collect()
}

/// Summarises one DER certificate.
pub fn summarize(der: &CertificateDer<'_>) -> Result<CertificateSummary, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let validity = cert.validity();
    Ok(CertificateSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn loopback_socket_reports_offload_and_granted_buffers() {
        let probe = udp_offload("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        assert_eq!(probe.bound.ip().to_string(), "127.0.0.1");
        assert_ne!(probe.bound.port(), 0);
        assert!(
            probe.gso_segments >= 1 && probe.gro_segments >= 1,
            "{probe:?}"
        );
        assert_eq!(probe.buffers.requested, 1 << 20);
        assert!(
            probe.rmem_max.is_some(),
            "a Linux host has net.core.rmem_max"
        );
    }

    #[test]
    fn a_certificate_file_is_summarised_with_its_validity() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge-probe");
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2027, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, cert.pem()).unwrap();

        let list = certificate_file(&path).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].subject, "CN=edge-probe");
        assert_eq!(list[0].issuer, "CN=edge-probe");
        assert_eq!(list[0].not_after, 1_798_761_600); // 2027-01-01T00:00:00Z
        let mid_2026 = UNIX_EPOCH + Duration::from_secs(1_782_864_000); // 2026-07-01
        assert_eq!(
            list[0].remaining(mid_2026),
            Some(Duration::from_secs(1_798_761_600 - 1_782_864_000))
        );
        assert_eq!(
            list[0].remaining(UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            None
        );
    }

    #[test]
    fn a_file_without_certificates_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = certificate_file(&path).unwrap_err().to_string();
        assert!(e.contains("empty.pem"), "{e}");
    }
}
