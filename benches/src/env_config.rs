//! The few keys of a dev-env appliance config the bench needs, read leniently (unknown keys
//! are ignored) so the bench depends on the config keys `docs/interface.md` promises, not on the appliance's
//! internals. Relative paths are resolved against the config file's directory, and defaults
//! are the appliance's (4 MiB chunks, 8 in flight, `LinkTuning::default()`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use baylink_net::transport::{Congestion, LinkTuning};
use serde::Deserialize;

/// The appliance's default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// The appliance's default number of chunks in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

/// What the bench uses from `edge.toml` / `gateway.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplianceConfig {
    /// The config file.
    pub path: PathBuf,
    /// `tls.ca`.
    pub tls_ca: PathBuf,
    /// `tls.cert`.
    pub tls_cert: PathBuf,
    /// `tls.key`.
    pub tls_key: PathBuf,
    /// `transport.server_name` (default `localhost`).
    pub server_name: String,
    /// `transport.chunk_size`.
    pub chunk_size: u32,
    /// `transport.max_in_flight`.
    pub max_in_flight: usize,
    /// `[link]`.
    pub link: LinkTuning,
    /// `spool.dir`.
    pub spool_dir: PathBuf,
    /// `delivery.path` when `delivery.kind = "dir"`.
    pub delivery_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Raw {
    tls: RawTls,
    #[serde(default)]
    transport: RawTransport,
    #[serde(default)]
    link: RawLink,
    spool: RawSpool,
    delivery: Option<RawDelivery>,
}

#[derive(Deserialize)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize, Default)]
struct RawTransport {
    server_name: Option<String>,
    chunk_size: Option<u32>,
    max_in_flight: Option<usize>,
}

#[derive(Deserialize, Default)]
struct RawLink {
    rate_mbit: Option<u64>,
    rtt_ms: Option<u64>,
    congestion: Option<String>,
    socket_buffer_bytes: Option<usize>,
    mtu: Option<u16>,
    max_mtu: Option<u16>,
    receive_hold_ms: Option<u64>,
}

#[derive(Deserialize)]
struct RawSpool {
    dir: PathBuf,
}

#[derive(Deserialize)]
struct RawDelivery {
    kind: String,
    path: Option<PathBuf>,
}

impl ApplianceConfig {
    /// Reads `path`.
    pub fn load(path: &Path) -> anyhow::Result<ApplianceConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(path, &text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> anyhow::Result<ApplianceConfig> {
        let raw: Raw = toml::from_str(text)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let resolve = |p: &Path| base.join(p);
        let defaults = LinkTuning::default();
        let congestion = match raw.link.congestion.as_deref() {
            None => Congestion::Cubic,
            Some(name) => Congestion::from_name(name)
                .with_context(|| format!("link.congestion `{name}` is not cubic, bbr or link"))?,
        };
        if raw.tls.key.starts_with("pkcs11:") {
            bail!(
                "{}: tls.key is held in the HSM ({}); the raw-quinn contestant needs PEM TLS \
                 keys: make the dev-env with `baylink dev-env --tls-key-files`",
                path.display(),
                raw.tls.key.display()
            );
        }
        let delivery_dir = match raw.delivery {
            Some(RawDelivery {
                kind,
                path: Some(p),
            }) if kind == "dir" => Some(resolve(&p)),
            _ => None,
        };
        Ok(ApplianceConfig {
            path: path.to_owned(),
            tls_ca: resolve(&raw.tls.ca),
            tls_cert: resolve(&raw.tls.cert),
            tls_key: resolve(&raw.tls.key),
            server_name: raw
                .transport
                .server_name
                .unwrap_or_else(|| "localhost".to_owned()),
            chunk_size: raw.transport.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
            max_in_flight: raw.transport.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            link: LinkTuning {
                rate_mbit: raw.link.rate_mbit.unwrap_or(defaults.rate_mbit),
                rtt_ms: raw.link.rtt_ms.unwrap_or(defaults.rtt_ms),
                congestion,
                socket_buffer_bytes: raw
                    .link
                    .socket_buffer_bytes
                    .unwrap_or(defaults.socket_buffer_bytes),
                mtu: raw.link.mtu,
                max_mtu: raw
                    .link
                    .max_mtu
                    .unwrap_or(defaults.max_mtu.max(raw.link.mtu.unwrap_or(0))),
                receive_hold: LinkTuning::receive_hold_for(
                    raw.link.receive_hold_ms,
                    raw.link.rtt_ms.unwrap_or(defaults.rtt_ms),
                ),
            },
            spool_dir: resolve(&raw.spool.dir),
            delivery_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = r#"
role = "gateway"
id = "gateway"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
pin_file = "secrets/gateway.pin"
[tls]
ca = "pki/ca.pem"
cert = "pki/gateway.pem"
key = "/abs/gateway.key"
[transport]
listen = "127.0.0.1:47402"
[link]
rate_mbit = 400
congestion = "bbr"
[spool]
dir = "spool/gateway"
[delivery]
kind = "dir"
path = "delivered"
"#;

    #[test]
    fn reads_the_keys_with_the_appliance_defaults() {
        let c = ApplianceConfig::parse(Path::new("/env/gateway.toml"), GATEWAY).unwrap();
        assert_eq!(c.tls_ca, Path::new("/env/pki/ca.pem"));
        assert_eq!(c.tls_key, Path::new("/abs/gateway.key"));
        assert_eq!(c.chunk_size, 4 << 20);
        assert_eq!(c.max_in_flight, 8);
        assert_eq!(c.link.rate_mbit, 400);
        assert_eq!(c.link.rtt_ms, LinkTuning::default().rtt_ms);
        assert_eq!(c.link.congestion, Congestion::Bbr);
        assert_eq!(c.spool_dir, Path::new("/env/spool/gateway"));
        assert_eq!(c.delivery_dir.as_deref(), Some(Path::new("/env/delivered")));
        assert_eq!(c.server_name, "localhost");
    }

    #[test]
    fn takes_chunk_settings_and_refuses_an_unknown_controller() {
        let edge = "[tls]\nca='a'\ncert='b'\nkey='c'\n[spool]\ndir='s'\n\
                    [transport]\nchunk_size = 1048576\nmax_in_flight = 4\nserver_name = 'gw'\n";
        let c = ApplianceConfig::parse(Path::new("edge.toml"), edge).unwrap();
        assert_eq!((c.chunk_size, c.max_in_flight), (1 << 20, 4));
        assert_eq!(c.server_name, "gw");
        assert_eq!(c.delivery_dir, None);
        let bad = format!("{edge}[link]\ncongestion = 'reno'\n");
        assert!(ApplianceConfig::parse(Path::new("edge.toml"), &bad).is_err());
    }
}
