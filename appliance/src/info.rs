//! `baylink info`: what this appliance uses of its hardware and system, for support.
//!
//! Everything is asked of the machine, not assumed: the CPU features the cryptography can use,
//! UDP segmentation offload and socket buffers on a socket bound like the link's, the
//! io_uring operations the spool needs, the HSM module, token and key, the certificates'
//! subjects and expiry, and the config file's digest (so support can tell two appliances'
//! configs apart without reading them).
//!
//! Not here: changing anything. The probes bind an ephemeral socket and set up a small ring
//! for as long as they run, and log in to the HSM read-only; all of it is safe beside a
//! running `serve`. A probe that fails is reported as such; only an unreadable config fails
//! the command.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::config::{Config, DeliverySection, Role};
use crate::deliver::dicomweb::StowSettings;
use crate::keys::hsm_config;

/// The whole report, as `--json` prints it (the text form is rendered from the same value).
pub fn report(cfg: &Config) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "role": cfg.role.to_string(),
        "id": cfg.id,
        "config": config_digest(&cfg.path),
        "cpu": cpu(),
        "link": link(cfg),
        "io_uring": io_uring(),
        "hsm": hsm(cfg),
        "certificates": certificates(cfg),
    })
}

fn config_digest(path: &Path) -> Value {
    match std::fs::read(path) {
        Ok(bytes) => json!({
            "path": path.display().to_string(),
            "sha256": hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)),
        }),
        Err(e) => json!({ "path": path.display().to_string(), "error": e.to_string() }),
    }
}

/// The CPU features aws-lc chooses its code paths from (AES-GCM, SHA-256, P-256).
fn cpu() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    json!({
        "arch": std::env::consts::ARCH,
        "cores": cores,
        "features": cpu_features(),
    })
}

#[cfg(target_arch = "x86_64")]
fn cpu_features() -> Value {
    json!({
        "aes": std::arch::is_x86_feature_detected!("aes"),
        "pclmulqdq": std::arch::is_x86_feature_detected!("pclmulqdq"),
        "vaes": std::arch::is_x86_feature_detected!("vaes"),
        "vpclmulqdq": std::arch::is_x86_feature_detected!("vpclmulqdq"),
        "sha": std::arch::is_x86_feature_detected!("sha"),
        "avx2": std::arch::is_x86_feature_detected!("avx2"),
        "avx512f": std::arch::is_x86_feature_detected!("avx512f"),
        "adx": std::arch::is_x86_feature_detected!("adx"),
        "bmi2": std::arch::is_x86_feature_detected!("bmi2"),
    })
}

#[cfg(target_arch = "aarch64")]
fn cpu_features() -> Value {
    json!({
        "aes": std::arch::is_aarch64_feature_detected!("aes"),
        "pmull": std::arch::is_aarch64_feature_detected!("pmull"),
        "sha2": std::arch::is_aarch64_feature_detected!("sha2"),
        "sha3": std::arch::is_aarch64_feature_detected!("sha3"),
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_features() -> Value {
    json!({})
}

/// Where a socket like the link's binds: the gateway's listen address with an ephemeral port
/// (its real port may be in use by `serve`), the edge's unspecified address of the gateway's
/// family.
fn link_probe_address(cfg: &Config) -> SocketAddr {
    let ip = match (cfg.role, cfg.transport.listen, cfg.transport.connect) {
        (Role::Gateway, Some(listen), _) => listen.ip(),
        (_, _, Some(connect)) if connect.is_ipv6() => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

fn link(cfg: &Config) -> Value {
    let tuning = &cfg.link;
    let bdp = tuning.bandwidth_delay_product();
    let configured = json!({
        "rate_mbit": tuning.rate_mbit,
        "rtt_ms": tuning.rtt_ms,
        "congestion": format!("{:?}", tuning.congestion).to_lowercase(),
        "bandwidth_delay_product_bytes": bdp,
        "socket_buffer_bytes": tuning.socket_buffer_bytes,
        "receive_hold_ms": tuning.receive_hold_ms(),
    });
    let addr = link_probe_address(cfg);
    match baylink_net::probe::udp_offload(addr, tuning.socket_buffer_bytes) {
        Ok(p) => {
            // The kernel reports twice what it grants (its own bookkeeping): halve it back.
            let recv = p.buffers.recv as u64 / 2;
            let send = p.buffers.send as u64 / 2;
            json!({
                "configured": configured,
                "udp": {
                    "probe_address": p.bound.to_string(),
                    "gso_segments": p.gso_segments,
                    "gro_segments": p.gro_segments,
                    "receive_buffer_bytes": recv,
                    "send_buffer_bytes": send,
                    "buffers_capped": p.buffers.capped(),
                    "rmem_max": p.rmem_max,
                    "wmem_max": p.wmem_max,
                    "receive_buffer_holds_bdp": recv >= bdp,
                },
            })
        }
        Err(e) => json!({
            "configured": configured,
            "udp": { "probe_address": addr.to_string(), "error": e.to_string() },
        }),
    }
}

fn io_uring() -> Value {
    match baylink_net::spool::probe_io_uring() {
        Ok(p) => json!({
            "available": true,
            "sufficient": p.sufficient(),
            "features": p.features.iter().map(|&(k, v)| (k.to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "operations": p.operations.iter().map(|&(k, v)| (k.to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
        }),
        Err(e) => json!({ "available": false, "error": e.to_string() }),
    }
}

fn hsm(cfg: &Config) -> Value {
    let mut out = json!({
        "module": cfg.hsm.module.display().to_string(),
        "token_label": cfg.hsm.token_label,
        "key_label": cfg.hsm.key_label,
    });
    let opened = hsm_config(cfg).and_then(|c| Ok(baylink_hsm::Token::open(&c)?));
    match opened {
        Ok(token) => {
            let info = token.info();
            if let Ok(l) = &info.library {
                out["library"] = json!(format!(
                    "{} {} ({}), PKCS#11 {}",
                    l.description, l.library_version, l.manufacturer, l.cryptoki_version
                ));
            }
            match &info.token {
                Ok(t) => {
                    out["slot"] = json!(t.slot_id);
                    out["token"] = json!(format!(
                        "{} {}, serial {}",
                        t.manufacturer, t.model, t.serial
                    ));
                }
                Err(e) => out["token_error"] = json!(e.to_string()),
            }
            match &info.key {
                Ok(k) => {
                    out["key_found"] = json!(true);
                    out["key_sensitive"] = json!(k.protection.sensitive);
                    out["key_extractable"] = json!(k.protection.extractable);
                }
                Err(e) => {
                    out["key_found"] = json!(false);
                    out["key_error"] = json!(e.to_string());
                }
            }
        }
        Err(e) => out["error"] = json!(format!("{e:#}")),
    }
    out
}

fn certificates(cfg: &Config) -> Value {
    let mut files = vec![
        ("tls.cert", cfg.tls.cert.as_path()),
        ("tls.ca", cfg.tls.ca.as_path()),
    ];
    if let Some(DeliverySection::DicomWeb(StowSettings { tls: Some(tls), .. })) = &cfg.delivery {
        files.push(("delivery.ca", tls.ca.as_path()));
        if let Some((cert, _)) = &tls.identity {
            files.push(("delivery.cert", cert.as_path()));
        }
    }
    let now = SystemTime::now();
    let list: Vec<Value> = files
        .into_iter()
        .map(|(key, path)| match baylink_net::probe::certificate_file(path) {
            // The first certificate is the one the file is about (the leaf, or the CA).
            Ok(certs) => {
                let c = &certs[0];
                json!({
                    "key": key,
                    "path": path.display().to_string(),
                    "subject": c.subject,
                    "issuer": c.issuer,
                    "not_after": humantime::format_rfc3339_seconds(
                        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(c.not_after).unwrap_or(0))
                    ).to_string(),
                    "expires_in_seconds": c.remaining(now).map_or(0, |d| d.as_secs()),
                    "expired": c.remaining(now).is_none(),
                })
            }
            Err(e) => json!({ "key": key, "path": path.display().to_string(), "error": e.to_string() }),
        })
        .collect();
    Value::Array(list)
}

/// The report as text for a person: one `section.field: value` line per leaf, in order.
pub fn render_text(report: &Value) -> String {
    let mut out = String::new();
    flatten(&mut out, "", report);
    out
}

fn flatten(out: &mut String, prefix: &str, value: &Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(out, &key, v);
            }
        }
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                let name = v
                    .get("key")
                    .and_then(Value::as_str)
                    .map_or_else(|| i.to_string(), str::to_owned);
                flatten(out, &format!("{prefix}[{name}]"), v);
            }
        }
        Value::String(s) => {
            let _ = writeln!(out, "{prefix}: {s}");
        }
        Value::Null => {
            let _ = writeln!(out, "{prefix}: unknown");
        }
        other => {
            let _ = writeln!(out, "{prefix}: {other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_every_leaf_by_its_path() {
        let report = json!({
            "role": "edge",
            "cpu": { "features": { "aes": true } },
            "certificates": [ { "key": "tls.cert", "subject": "CN=edge-1" } ],
            "link": { "udp": { "rmem_max": null } },
        });
        let text = render_text(&report);
        assert!(text.contains("role: edge\n"), "{text}");
        assert!(text.contains("cpu.features.aes: true\n"), "{text}");
        assert!(
            text.contains("certificates[tls.cert].subject: CN=edge-1\n"),
            "{text}"
        );
        assert!(text.contains("link.udp.rmem_max: unknown\n"), "{text}");
    }
}
