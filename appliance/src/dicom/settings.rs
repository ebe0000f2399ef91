//! The DICOM doors' settings: keys `ingest.dicom_*` and `[[ingest.dicom_peers]]`, their
//! defaults, bounds and checks. `config` reads the TOML (and the duration) and composes the
//! [`DicomSection`] into `config::IngestSection`; a refusal is a [`SettingError`] naming the
//! key.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::valid_ae_title;
use crate::setting::SettingError;

/// The DICOM Storage SCP's settings: keys `ingest.dicom_*` and `[[ingest.dicom_peers]]`.
#[derive(Debug, Clone)]
pub struct DicomSection {
    /// The SCP's own AE title; associations calling another title are rejected.
    pub ae_title: String,
    /// Known storage SCUs: calling AE title + peer address, mapped to a hospital.
    pub peers: Vec<DicomPeer>,
    /// Largest P-DATA PDU the SCP accepts (bytes), announced at association.
    pub max_pdu_bytes: u32,
    /// Associations served at once; further ones are rejected.
    pub max_associations: usize,
    /// Storage Commitment requests kept unanswered per peer (`ingest.dicom_commitment_max_pending`).
    pub commitment_max_pending: usize,
    /// An association that sends nothing for this long is aborted (and discarded).
    pub idle_timeout: Duration,
}

/// One `[[ingest.dicom_peers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DicomPeer {
    /// Calling AE title the SCU presents.
    pub ae_title: String,
    /// IP address the association must come from.
    pub address: IpAddr,
    /// Hospital this SCU belongs to.
    pub hospital: String,
    /// Purpose declared for its associations (`purpose`, default `care`; e.g. `research`,
    /// whose instances are de-identified).
    pub purpose: String,
    /// Where Storage Commitment reports go when they cannot go on the association of the
    /// request (`commitment_port`, `commitment_host`, `commitment_ae_title`); `None`: only on
    /// that association.
    pub commitment: Option<CommitmentRoute>,
}

/// The modality's own Storage Commitment listener (an SCU that accepts N-EVENT-REPORT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitmentRoute {
    /// Host name or IP address (`commitment_host`, default the entry's `address`).
    pub host: String,
    /// TCP port (`commitment_port`).
    pub port: u16,
    /// Its AE title (`commitment_ae_title`, default the entry's `ae_title`).
    pub ae_title: String,
    /// Over TLS (`commitment_tls`, default false): the listener's certificate verified
    /// against `tls.ca` for `host`, the edge presenting its own. A request that came through
    /// the DICOM TLS port is reported on a new association only this way.
    pub tls: bool,
}

/// Default AE title of the Storage SCP.
pub const DEFAULT_DICOM_AE_TITLE: &str = "BAYLINK";
/// Default largest P-DATA PDU the SCP accepts: 64 KiB.
pub const DEFAULT_DICOM_MAX_PDU_BYTES: u32 = 64 * 1024;
/// Smallest `ingest.dicom_max_pdu_bytes`.
pub const MIN_DICOM_MAX_PDU_BYTES: u32 = 4096;
/// Upper bound of `ingest.dicom_max_pdu_bytes`: 1 MiB.
pub const MAX_DICOM_MAX_PDU_BYTES: u32 = 1024 * 1024;
/// Default number of DICOM associations served at once.
pub const DEFAULT_DICOM_MAX_ASSOCIATIONS: usize = 16;
/// Upper bound of `ingest.dicom_max_associations`.
pub const MAX_DICOM_ASSOCIATIONS: usize = 1024;
/// Default Storage Commitment requests kept unanswered per DICOM peer.
pub const DEFAULT_DICOM_COMMITMENT_MAX_PENDING: usize = 64;
/// Upper bound of `ingest.dicom_commitment_max_pending`.
pub const MAX_DICOM_COMMITMENT_MAX_PENDING: usize = 10_000;
/// Default `ingest.dicom_idle_timeout`.
pub const DEFAULT_DICOM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `purpose` of a `[[ingest.dicom_peers]]` entry.
pub const DEFAULT_DICOM_PEER_PURPOSE: &str = "care";

/// One `[[ingest.dicom_peers]]` entry as the TOML has it, before it is checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomPeerEntry {
    ae_title: String,
    address: String,
    hospital: String,
    purpose: Option<String>,
    commitment_host: Option<String>,
    commitment_port: Option<u16>,
    commitment_ae_title: Option<String>,
    commitment_tls: Option<bool>,
}

/// The `ingest.dicom_*` values as the config has them (`None`: the key is absent), before
/// they are checked.
#[derive(Debug)]
pub struct DicomKeys {
    /// `ingest.dicom_ae_title`.
    pub ae_title: Option<String>,
    /// `[[ingest.dicom_peers]]`.
    pub peers: Vec<DicomPeerEntry>,
    /// `ingest.dicom_max_pdu_bytes`.
    pub max_pdu_bytes: Option<u32>,
    /// `ingest.dicom_max_associations`.
    pub max_associations: Option<usize>,
    /// `ingest.dicom_commitment_max_pending`.
    pub commitment_max_pending: Option<usize>,
    /// `ingest.dicom_idle_timeout` (the config reads the duration).
    pub idle_timeout: Duration,
}

/// 1..=64 characters, none of them a control character (a hospital, a purpose).
fn printable_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && !s.chars().any(char::is_control)
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingError {
    SettingError::Invalid {
        key,
        message: message.into(),
    }
}

impl DicomSection {
    /// The section of `keys`, defaults filled in and every value checked. `on_tls_port`: an
    /// `ingest.dicom_tls_listen` is configured (a peer is then also found by AE title and
    /// hospital alone, so two entries that differ only in address must agree on the purpose).
    pub fn from_settings(keys: DicomKeys, on_tls_port: bool) -> Result<DicomSection, SettingError> {
        let mut dicom = DicomSection {
            ae_title: keys
                .ae_title
                .unwrap_or_else(|| DEFAULT_DICOM_AE_TITLE.to_owned()),
            peers: Vec::new(),
            max_pdu_bytes: keys.max_pdu_bytes.unwrap_or(DEFAULT_DICOM_MAX_PDU_BYTES),
            max_associations: keys
                .max_associations
                .unwrap_or(DEFAULT_DICOM_MAX_ASSOCIATIONS),
            commitment_max_pending: keys
                .commitment_max_pending
                .unwrap_or(DEFAULT_DICOM_COMMITMENT_MAX_PENDING),
            idle_timeout: keys.idle_timeout,
        };
        if !valid_ae_title(&dicom.ae_title) {
            return Err(invalid(
                "ingest.dicom_ae_title",
                format!(
                    "`{}` is not an AE title (1..=16 printable ASCII characters, no backslash)",
                    dicom.ae_title
                ),
            ));
        }
        if !(MIN_DICOM_MAX_PDU_BYTES..=MAX_DICOM_MAX_PDU_BYTES).contains(&dicom.max_pdu_bytes) {
            return Err(invalid(
                "ingest.dicom_max_pdu_bytes",
                format!(
                    "{} is not in {MIN_DICOM_MAX_PDU_BYTES}..={MAX_DICOM_MAX_PDU_BYTES}",
                    dicom.max_pdu_bytes
                ),
            ));
        }
        if !(1..=MAX_DICOM_ASSOCIATIONS).contains(&dicom.max_associations) {
            return Err(invalid(
                "ingest.dicom_max_associations",
                format!(
                    "{} is not in 1..={MAX_DICOM_ASSOCIATIONS}",
                    dicom.max_associations
                ),
            ));
        }
        if !(1..=MAX_DICOM_COMMITMENT_MAX_PENDING).contains(&dicom.commitment_max_pending) {
            return Err(invalid(
                "ingest.dicom_commitment_max_pending",
                format!(
                    "{} is not in 1..={MAX_DICOM_COMMITMENT_MAX_PENDING}",
                    dicom.commitment_max_pending
                ),
            ));
        }
        if dicom.idle_timeout.is_zero() {
            return Err(invalid("ingest.dicom_idle_timeout", "must be > 0"));
        }
        for entry in &keys.peers {
            let peer = entry.check()?;
            if dicom
                .peers
                .iter()
                .any(|q| q.ae_title == peer.ae_title && q.address == peer.address)
            {
                return Err(invalid(
                    "ingest.dicom_peers",
                    format!("{} from {} is listed twice", peer.ae_title, peer.address),
                ));
            }
            // On the TLS port a peer is found by AE title and hospital (the certificate's
            // CN) alone: two entries that differ only in address must agree on the purpose.
            if on_tls_port
                && dicom.peers.iter().any(|q| {
                    q.ae_title == peer.ae_title
                        && q.hospital == peer.hospital
                        && q.purpose != peer.purpose
                })
            {
                return Err(invalid(
                    "ingest.dicom_peers.purpose",
                    format!(
                        "{} of {} is listed with two purposes; on ingest.dicom_tls_listen an AE \
                         title and hospital name one peer",
                        peer.ae_title, peer.hospital
                    ),
                ));
            }
            dicom.peers.push(peer);
        }
        Ok(dicom)
    }
}

impl DicomPeerEntry {
    /// The entry on its own, defaults filled in (duplicates are found by
    /// [`DicomSection::from_settings`]).
    fn check(&self) -> Result<DicomPeer, SettingError> {
        if !valid_ae_title(&self.ae_title) {
            return Err(invalid(
                "ingest.dicom_peers.ae_title",
                format!("`{}` is not an AE title", self.ae_title),
            ));
        }
        let address = self.address.parse::<IpAddr>().map_err(|e| {
            invalid(
                "ingest.dicom_peers.address",
                format!("`{}` is not an IP address ({e})", self.address),
            )
        })?;
        if !printable_name(&self.hospital) {
            return Err(invalid(
                "ingest.dicom_peers.hospital",
                "must be 1..=64 printable characters",
            ));
        }
        let purpose = self
            .purpose
            .clone()
            .unwrap_or_else(|| DEFAULT_DICOM_PEER_PURPOSE.to_owned());
        if !printable_name(&purpose) {
            return Err(invalid(
                "ingest.dicom_peers.purpose",
                "must be 1..=64 printable characters",
            ));
        }
        let commitment = match self.commitment_port {
            None => {
                if self.commitment_host.is_some()
                    || self.commitment_ae_title.is_some()
                    || self.commitment_tls.is_some()
                {
                    return Err(invalid(
                        "ingest.dicom_peers.commitment_port",
                        format!(
                            "{}: commitment_host, commitment_ae_title and commitment_tls need \
                             commitment_port",
                            self.ae_title
                        ),
                    ));
                }
                None
            }
            Some(0) => {
                return Err(invalid(
                    "ingest.dicom_peers.commitment_port",
                    "must be 1..=65535",
                ));
            }
            Some(port) => {
                let host = self
                    .commitment_host
                    .clone()
                    .unwrap_or_else(|| address.to_string());
                if host.is_empty()
                    || host.len() > 253
                    || !host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
                {
                    return Err(invalid(
                        "ingest.dicom_peers.commitment_host",
                        format!("`{host}` is not a host name or IP address"),
                    ));
                }
                // Over TLS the host is the name the listener's certificate must carry.
                if self.commitment_tls == Some(true)
                    && rustls_pki_types::ServerName::try_from(host.as_str()).is_err()
                {
                    return Err(invalid(
                        "ingest.dicom_peers.commitment_host",
                        format!(
                            "`{host}` is not a name a TLS certificate can carry \
                             (commitment_tls = true)"
                        ),
                    ));
                }
                let ae_title = self
                    .commitment_ae_title
                    .clone()
                    .unwrap_or_else(|| self.ae_title.clone());
                if !valid_ae_title(&ae_title) {
                    return Err(invalid(
                        "ingest.dicom_peers.commitment_ae_title",
                        format!("`{ae_title}` is not an AE title"),
                    ));
                }
                Some(CommitmentRoute {
                    host,
                    port,
                    ae_title,
                    tls: self.commitment_tls.unwrap_or(false),
                })
            }
        };
        Ok(DicomPeer {
            ae_title: self.ae_title.clone(),
            address,
            hospital: self.hospital.clone(),
            purpose,
            commitment,
        })
    }
}
