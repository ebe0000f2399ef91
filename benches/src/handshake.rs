//! `baylink-bench handshake`: QUIC + mutual-TLS handshakes per second and CPU per handshake
//! over loopback, with the appliances' TLS keys as PEM keys in memory and as keys held in a
//! SoftHSM token (`tls.key = "pkcs11:object=..."`), in the same run.
//!
//! Both ends run in this process on one tokio thread, each with its own endpoint and the
//! transport configuration baylink uses (TLS 1.3, X25519MLKEM768, ECDSA P-256 certificates
//! from one CA, client certificate required). One handshake is: `connect`, the client's
//! connection established, the server's accepted connection established (client certificate
//! verified), both closed. CPU is this process's user + system time (getrusage), so one
//! handshake's figure is both ends together: the work of an edge and a gateway for one
//! connection. In the HSM mode both ends sign on one SoftHSM token (each with its own key).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use baylink_hsm::TlsKey;
use baylink_hsm::testing::SoftHsm;
use baylink_net::transport::{self, ClientNames, LinkTuning, TlsIdentity};
use clap::Args;
use nix::sys::resource::{UsageWho, getrusage};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use crate::proc::Machine;

/// `baylink-bench handshake`.
#[derive(Debug, Args)]
pub struct HandshakeArgs {
    /// Handshakes per mode (after `--warmup` ones that are not counted).
    #[arg(long, default_value_t = 500)]
    pub count: u32,
    /// Handshakes per mode before measuring.
    #[arg(long, default_value_t = 20)]
    pub warmup: u32,
    /// Where to write the JSON report.
    #[arg(long, default_value = "handshake.json")]
    pub json: PathBuf,
}

#[derive(Debug, Serialize)]
struct Mode {
    key: &'static str,
    handshakes: u32,
    seconds: f64,
    handshakes_per_second: f64,
    cpu_seconds: f64,
    cpu_ms_per_handshake: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    machine: Machine,
    count: u32,
    warmup: u32,
    modes: Vec<Mode>,
    /// HSM CPU per handshake / PEM CPU per handshake.
    hsm_cpu_ratio: f64,
}

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> anyhow::Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "bench CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate for `cn` (server and client auth, names localhost) over `key`.
    fn certify(
        &self,
        cn: &str,
        key: &impl PublicKeyData,
    ) -> anyhow::Result<CertificateDer<'static>> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }

    fn pem_identity(&self, cn: &str) -> anyhow::Result<TlsIdentity> {
        let key = KeyPair::generate()?;
        let cert = self.certify(cn, &key)?;
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(TlsIdentity::from_private_key_der(vec![cert], der)?)
    }

    fn hsm_identity(&self, hsm: &SoftHsm, cn: &str) -> anyhow::Result<TlsIdentity> {
        let token = hsm.open("unused")?;
        let public = token.generate_key(cn)?;
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&public.to_spki_der())?;
        let cert = self.certify(cn, &spki)?;
        let key = TlsKey::open(&token, cn)?;
        Ok(TlsIdentity::from_parts(
            vec![cert],
            cn,
            Arc::new(key),
            &format!("pkcs11:object={cn}"),
        )?)
    }
}

fn cpu_seconds() -> anyhow::Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(secs(u.user_time()) + secs(u.system_time()))
}

/// Runs `warmup + count` handshakes between two fresh endpoints; figures over `count`.
async fn measure(
    key: &'static str,
    ca: &Ca,
    server_id: &TlsIdentity,
    client_id: &TlsIdentity,
    args: &HandshakeArgs,
) -> anyhow::Result<Mode> {
    let tuning = LinkTuning::default();
    let roots = vec![ca.cert.clone()];
    let localhost: SocketAddr = "127.0.0.1:0".parse()?;
    let server = transport::server_endpoint(
        localhost,
        &roots,
        &ClientNames::Only(vec!["edge".into()]),
        server_id,
        &tuning,
    )?;
    let client = transport::client_endpoint(localhost, &roots, client_id, &tuning)?;
    let addr = server.local_addr()?;
    let mut latencies = Vec::with_capacity(args.count as usize);
    let (mut started, mut cpu0) = (Instant::now(), cpu_seconds()?);
    for i in 0..args.warmup + args.count {
        if i == args.warmup {
            started = Instant::now();
            cpu0 = cpu_seconds()?;
        }
        let t = Instant::now();
        let connecting = client.connect(addr, "localhost")?;
        let (c, s) = tokio::join!(connecting, async {
            let incoming = server.accept().await.context("server endpoint closed")?;
            anyhow::Ok(incoming.await?)
        });
        let (c, s) = (
            c.context("client handshake")?,
            s.context("server handshake")?,
        );
        if i >= args.warmup {
            latencies.push(t.elapsed());
        }
        c.close(0u32.into(), b"");
        s.close(0u32.into(), b"");
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu0;
    client.wait_idle().await;
    server.wait_idle().await;
    latencies.sort();
    let pct = |p: usize| {
        let n = latencies.len();
        latencies[(n * p / 100).min(n - 1)].as_secs_f64() * 1000.0
    };
    let n = f64::from(args.count);
    Ok(Mode {
        key,
        handshakes: args.count,
        seconds,
        handshakes_per_second: n / seconds,
        cpu_seconds: cpu,
        cpu_ms_per_handshake: cpu / n * 1000.0,
        p50_ms: pct(50),
        p99_ms: pct(99),
    })
}

/// Runs the benchmark and writes the report.
pub fn main(args: &HandshakeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    // The fixture sets SOFTHSM2_CONF before any other thread runs.
    let hsm = SoftHsm::new().context("SoftHSM token for the bench")?;
    let ca = Ca::new()?;
    let pem = (ca.pem_identity("gateway")?, ca.pem_identity("edge")?);
    let held = (
        ca.hsm_identity(&hsm, "gateway")?,
        ca.hsm_identity(&hsm, "edge")?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let modes = rt.block_on(async {
        let a = measure("pem", &ca, &pem.0, &pem.1, args).await?;
        let b = measure("hsm", &ca, &held.0, &held.1, args).await?;
        anyhow::Ok(vec![a, b])
    })?;
    let report = Report {
        bench: "handshake",
        machine: Machine::current(),
        count: args.count,
        warmup: args.warmup,
        hsm_cpu_ratio: modes[1].cpu_ms_per_handshake / modes[0].cpu_ms_per_handshake,
        modes,
    };
    println!(
        "{:<5} {:>12} {:>16} {:>8} {:>8}",
        "key", "handshakes/s", "CPU ms/handshake", "p50 ms", "p99 ms"
    );
    for m in &report.modes {
        println!(
            "{:<5} {:>12.0} {:>16.3} {:>8.3} {:>8.3}",
            m.key, m.handshakes_per_second, m.cpu_ms_per_handshake, m.p50_ms, m.p99_ms
        );
    }
    println!(
        "CPU: both ends of each handshake, one process; HSM/PEM = {:.2}",
        report.hsm_cpu_ratio
    );
    let text = serde_json::to_string_pretty(&report)? + "\n";
    std::fs::write(&args.json, text)
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    println!("JSON: {}", args.json.display());
    Ok(())
}
