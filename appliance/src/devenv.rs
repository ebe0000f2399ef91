//! `baylink dev-env DIR`: a complete two-appliance deployment on 127.0.0.1.
//!
//! Everything `docs/interface.md` lists is created here: PKI (with a rogue CA), SoftHSM tokens with
//! the signing keys and, unless asked for PEM files, the appliances' TLS keys (created through
//! `baylink-hsm`, the same code path the appliance uses: sensitive, not extractable), PINs and patient keys (mode 0600 in `secrets/`, outside the
//! audit directories), pinned public keys, both configs, the consent registry and the state
//! directories.
//! The directory must be empty or missing; nothing is overwritten.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use baylink_hsm::{HsmConfig, Token, provision};
use secrecy::SecretString;

use crate::pki::{Authority, LeafKind};

/// Where SoftHSM's module lives on Debian.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Default first port.
pub const DEFAULT_BASE_PORT: u16 = 47400;
/// Label of the signing key on both tokens.
pub const KEY_LABEL: &str = "baylink-signing";
/// Label of the TLS key on both tokens (unless dev-env writes PEM keys instead).
pub const TLS_KEY_LABEL: &str = "baylink-tls";

/// Where dev-env puts the appliances' TLS private keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsKeys {
    /// Generated in each appliance's token (sensitive, not extractable); `tls.key =
    /// "pkcs11:object=baylink-tls"`, and only the certificates are written.
    #[default]
    Hsm,
    /// PEM files `pki/edge.key` and `pki/gateway.key` (mode 0600).
    Files,
}

/// Ports of a dev-env deployment, derived from its base port.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Edge hospital HTTPS API.
    pub edge_ingest: u16,
    /// Edge health and metrics.
    pub edge_metrics: u16,
    /// Gateway QUIC (UDP).
    pub gateway_quic: u16,
    /// Gateway health and metrics.
    pub gateway_metrics: u16,
    /// Edge DICOM C-STORE.
    pub edge_dicom: u16,
    /// Edge DICOM C-STORE over TLS.
    pub edge_dicom_tls: u16,
}

impl Ports {
    /// The layout of `docs/interface.md`: N, N+1, N+2, N+3, N+4, N+5.
    pub fn from_base(base: u16) -> anyhow::Result<Ports> {
        if base == 0 || base > u16::MAX - 5 {
            bail!("--base-port {base} leaves no room for the six ports N..N+5");
        }
        Ok(Ports {
            edge_ingest: base,
            edge_metrics: base + 1,
            gateway_quic: base + 2,
            gateway_metrics: base + 3,
            edge_dicom: base + 4,
            edge_dicom_tls: base + 5,
        })
    }
}

/// The sample patients that get consent records.
pub const SAMPLE_PATIENTS: [&str; 5] = ["P-0001", "P-0002", "P-0003", "P-0004", "P-0005"];

/// Creates the deployment in `dir`.
///
/// The process must already have `SOFTHSM2_CONF` pointing at `dir/softhsm/softhsm2.conf`
/// (see [`softhsm_conf_path`]); the binary's `main` arranges that before any thread starts.
pub fn create(dir: &Path, base_port: u16, module: &Path, tls: TlsKeys) -> anyhow::Result<()> {
    let ports = Ports::from_base(base_port)?;
    prepare_empty_dir(dir)?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;

    for sub in [
        "pki",
        "softhsm/tokens",
        "secrets",
        "keys",
        "policy",
        "spool/edge",
        "spool/gateway",
        "audit/edge",
        "audit/gateway",
        "delivered",
    ] {
        fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    fs::set_permissions(dir.join("secrets"), fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(
        dir.join("softhsm/tokens"),
        fs::Permissions::from_mode(0o700),
    )?;

    let ca = write_pki(&dir)?;

    let conf = softhsm_conf_path(&dir);
    let tokendir = dir.join("softhsm/tokens");
    write_file(
        &conf,
        format!(
            "# SoftHSM 2 store of this dev-env deployment.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = false\n",
            tokendir.display()
        )
        .as_bytes(),
        0o644,
    )?;

    for side in ["edge", "gateway"] {
        let user_pin = random_pin()?;
        let so_pin = random_pin()?;
        let token_label = format!("baylink-{side}");
        provision::init_token(module, &token_label, &so_pin, &user_pin)
            .with_context(|| format!("cannot initialise SoftHSM token {token_label}"))?;
        let token = Token::open(&HsmConfig {
            module: module.to_owned(),
            token_label: token_label.clone(),
            key_label: KEY_LABEL.to_owned(),
            pin: user_pin.clone(),
            sessions: 1,
        })
        .with_context(|| format!("cannot open token {token_label}"))?;
        let public = token
            .generate_key(KEY_LABEL)
            .with_context(|| format!("cannot create key {KEY_LABEL} on {token_label}"))?;
        write_file(
            &dir.join(format!("keys/{side}.pub.pem")),
            public.to_pem().as_bytes(),
            0o644,
        )?;
        let cert = match tls {
            TlsKeys::Hsm => {
                let tls_public = token.generate_key(TLS_KEY_LABEL).with_context(|| {
                    format!("cannot create key {TLS_KEY_LABEL} on {token_label}")
                })?;
                ca.issue_for(side, LeafKind::Appliance, &tls_public.to_spki_der())
                    .with_context(|| format!("cannot issue the {side} certificate"))?
            }
            TlsKeys::Files => {
                let leaf = ca
                    .issue(side, LeafKind::Appliance)
                    .with_context(|| format!("cannot issue the {side} certificate"))?;
                write_file(
                    &dir.join(format!("pki/{side}.key")),
                    leaf.key_pem.as_bytes(),
                    0o600,
                )?;
                leaf.cert_pem
            }
        };
        write_file(&dir.join(format!("pki/{side}.pem")), cert.as_bytes(), 0o644)?;
        write_secret(&dir.join(format!("secrets/{side}.pin")), &user_pin)?;
        write_secret(&dir.join(format!("secrets/{side}.so-pin")), &so_pin)?;
        // The key behind patient pseudonyms and research de-identification: beside the PINs,
        // never in the audit directory an auditor may be given.
        write_file(
            &dir.join(format!("secrets/{side}.patient.key")),
            &random_key()?,
            0o600,
        )?;
    }

    write_file(
        &dir.join("policy/consents.toml"),
        consents_toml().as_bytes(),
        0o644,
    )?;
    write_file(
        &dir.join("edge.toml"),
        edge_toml(&ports, module, tls).as_bytes(),
        0o644,
    )?;
    write_file(
        &dir.join("gateway.toml"),
        gateway_toml(&ports, module, tls).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Where the SoftHSM config of a dev-env in `dir` lives.
pub fn softhsm_conf_path(dir: &Path) -> PathBuf {
    dir.join("softhsm/softhsm2.conf")
}

fn prepare_empty_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty; dev-env only writes into an empty or missing directory",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

/// The CA, the hospitals' and the rogue certificates; the appliances' are issued with their
/// tokens.
fn write_pki(dir: &Path) -> anyhow::Result<Authority> {
    let ca = Authority::new("baylink dev-env CA").context("cannot create the CA")?;
    write_file(&dir.join("pki/ca.pem"), ca.cert_pem().as_bytes(), 0o644)?;
    for (name, kind) in [
        ("hospital-a", LeafKind::Client),
        ("hospital-b", LeafKind::Client),
    ] {
        let leaf = ca
            .issue(name, kind)
            .with_context(|| format!("cannot issue the {name} certificate"))?;
        write_file(
            &dir.join(format!("pki/{name}.pem")),
            leaf.cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(
            &dir.join(format!("pki/{name}.key")),
            leaf.key_pem.as_bytes(),
            0o600,
        )?;
    }
    let rogue_ca = Authority::new("rogue CA").context("cannot create the rogue CA")?;
    // The rogue client claims to be a known hospital: only the CA check can stop it.
    let rogue = rogue_ca
        .issue("hospital-a", LeafKind::Client)
        .context("cannot issue the rogue certificate")?;
    write_file(&dir.join("pki/rogue.pem"), rogue.cert_pem.as_bytes(), 0o644)?;
    write_file(&dir.join("pki/rogue.key"), rogue.key_pem.as_bytes(), 0o600)?;
    Ok(ca)
}

/// `tls.key` of `side`'s config.
fn tls_key(side: &str, tls: TlsKeys) -> String {
    match tls {
        TlsKeys::Hsm => format!(
            "# The TLS private key is in the token ({}); only the certificate is a file.\n\
             key = \"pkcs11:object={TLS_KEY_LABEL}\"",
            format_args!("baylink-{side}")
        ),
        TlsKeys::Files => format!("key = \"pki/{side}.key\""),
    }
}

fn random_pin() -> anyhow::Result<SecretString> {
    let mut bytes = [0u8; 12];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(SecretString::from(hex::encode(bytes)))
}

fn random_key() -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(key)
}

fn write_secret(path: &Path, pin: &SecretString) -> anyhow::Result<()> {
    use secrecy::ExposeSecret;
    write_file(path, pin.expose_secret().as_bytes(), 0o600)
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn consents_toml() -> String {
    let now = SystemTime::now();
    let from = rfc3339(now - Duration::from_secs(86_400));
    let until = rfc3339(now + Duration::from_secs(2 * 365 * 86_400));
    let mut out = String::from(
        "# Consent registry of the dev-env deployment: one [[consent]] per authorisation\n\
         # a patient gave. See docs/configuration.md (\"The consent registry\") for the format.\n",
    );
    for (n, patient) in SAMPLE_PATIENTS.iter().enumerate() {
        let evidence = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            format!("signed consent form of {patient}").as_bytes(),
        ));
        let _ = write!(
            out,
            "\n[[consent]]\n\
             patient_id = \"{patient}\"\n\
             reference = \"CR-2026-{:04}\"\n\
             categories = [\"*\"]\n\
             purposes = [\"care\", \"research\", \"referral\"]\n\
             destinations = [\"hk-ehealth\"]\n\
             valid_from = \"{from}\"\n\
             valid_until = \"{until}\"\n\
             evidence_sha256 = \"{evidence}\"\n",
            n + 1
        );
    }
    out
}

fn hsm_section(side: &str, module: &Path) -> String {
    format!(
        "[hsm]\n\
         module = \"{}\"\n\
         softhsm_conf = \"softhsm/softhsm2.conf\"\n\
         token_label = \"baylink-{side}\"\n\
         key_label = \"{KEY_LABEL}\"\n\
         pin_file = \"secrets/{side}.pin\"\n",
        module.display()
    )
}

fn edge_toml(p: &Ports, module: &Path, tls: TlsKeys) -> String {
    format!(
        "# baylink edge appliance (Shenzhen side) of a dev-env deployment.\n\
         role = \"edge\"\n\
         id = \"edge\"\n\n\
         {hsm}\n\
         [peer]\n\
         signing_key = \"keys/gateway.pub.pem\"\n\n\
         [tls]\n\
         ca = \"pki/ca.pem\"\n\
         cert = \"pki/edge.pem\"\n\
         {key}\n\n\
         [transport]\n\
         connect = \"127.0.0.1:{quic}\"\n\
         server_name = \"localhost\"\n\
         retry_for = \"10m\"\n\
         max_transfers = 4\n\n\
         [link]\n\
         rate_mbit = 1000\n\
         rtt_ms = 10\n\
         congestion = \"link\"\n\
         # loopback carries 65536-byte packets; 9000 is what a jumbo-frame link would\n\
         mtu = 9000\n\n\
         [ingest]\n\
         listen = \"127.0.0.1:{ingest}\"\n\
         dicom_listen = \"127.0.0.1:{dicom}\"\n\
         # C-STORE over TLS: client certificate from tls.ca, its CN the hospital.\n\
         dicom_tls_listen = \"127.0.0.1:{dicom_tls}\"\n\
         max_upload_bytes = 68719476736\n\
         dicom_ae_title = \"BAYLINK\"\n\n\
         # Storage SCUs allowed to send: calling AE title + source address -> hospital\n\
         # (on dicom_tls_listen: calling AE title + the certificate's hospital).\n\
         [[ingest.dicom_peers]]\n\
         ae_title = \"STORESCU\"\n\
         address = \"127.0.0.1\"\n\
         hospital = \"hospital-a\"\n\n\
         [[ingest.dicom_peers]]\n\
         ae_title = \"HOSPITAL-A\"\n\
         address = \"127.0.0.1\"\n\
         hospital = \"hospital-a\"\n\n\
         [metrics]\n\
         listen = \"127.0.0.1:{metrics}\"\n\n\
         [spool]\n\
         dir = \"spool/edge\"\n\n\
         [audit]\n\
         dir = \"audit/edge\"\n\
         patient_key = \"secrets/edge.patient.key\"\n\n\
         [policy]\n\
         consents = \"policy/consents.toml\"\n\
         negative_list = [\"genetic-data\"]\n\
         hospitals = [\"hospital-a\", \"hospital-b\"]\n",
        hsm = hsm_section("edge", module),
        key = tls_key("edge", tls),
        quic = p.gateway_quic,
        ingest = p.edge_ingest,
        dicom = p.edge_dicom,
        dicom_tls = p.edge_dicom_tls,
        metrics = p.edge_metrics,
    )
}

fn gateway_toml(p: &Ports, module: &Path, tls: TlsKeys) -> String {
    format!(
        "# baylink gateway appliance (Hong Kong side) of a dev-env deployment.\n\
         role = \"gateway\"\n\
         id = \"gateway\"\n\n\
         {hsm}\n\
         [peer]\n\
         signing_key = \"keys/edge.pub.pem\"\n\
         # The edges allowed to connect, by certificate subject CN.\n\
         names = [\"edge\"]\n\n\
         [tls]\n\
         ca = \"pki/ca.pem\"\n\
         cert = \"pki/gateway.pem\"\n\
         {key}\n\n\
         [transport]\n\
         listen = \"127.0.0.1:{quic}\"\n\n\
         [link]\n\
         rate_mbit = 1000\n\
         rtt_ms = 10\n\
         congestion = \"link\"\n\
         # loopback carries 65536-byte packets; 9000 is what a jumbo-frame link would\n\
         mtu = 9000\n\n\
         [metrics]\n\
         listen = \"127.0.0.1:{metrics}\"\n\n\
         [spool]\n\
         dir = \"spool/gateway\"\n\n\
         [audit]\n\
         dir = \"audit/gateway\"\n\
         patient_key = \"secrets/gateway.patient.key\"\n\n\
         [delivery]\n\
         kind = \"dir\"\n\
         path = \"delivered\"\n",
        hsm = hsm_section("gateway", module),
        key = tls_key("gateway", tls),
        quic = p.gateway_quic,
        metrics = p.gateway_metrics,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Role};

    #[test]
    fn generated_configs_parse() {
        let p = Ports::from_base(DEFAULT_BASE_PORT).unwrap();
        let module = Path::new(SOFTHSM_MODULE);
        let edge = Config::parse(
            Path::new("/x/edge.toml"),
            &edge_toml(&p, module, TlsKeys::Hsm),
        )
        .unwrap();
        assert_eq!(edge.tls.key.hsm_label(), Some(TLS_KEY_LABEL));
        assert_eq!(edge.role, Role::Edge);
        assert_eq!(
            edge.transport.connect.unwrap().port(),
            DEFAULT_BASE_PORT + 2
        );
        assert_eq!(
            edge.ingest.dicom_listen.unwrap().port(),
            DEFAULT_BASE_PORT + 4
        );
        assert_eq!(
            edge.ingest.dicom_tls_listen.unwrap().port(),
            DEFAULT_BASE_PORT + 5
        );
        let peers: Vec<_> = edge
            .ingest
            .dicom
            .peers
            .iter()
            .map(|p| {
                (
                    p.ae_title.as_str(),
                    p.address.to_string(),
                    p.hospital.as_str(),
                )
            })
            .collect();
        assert_eq!(
            peers,
            [
                ("STORESCU", "127.0.0.1".to_owned(), "hospital-a"),
                ("HOSPITAL-A", "127.0.0.1".to_owned(), "hospital-a"),
            ]
        );
        assert_eq!(
            edge.audit.patient_key,
            Path::new("/x/secrets/edge.patient.key")
        );
        let gw = Config::parse(
            Path::new("/x/gateway.toml"),
            &gateway_toml(&p, module, TlsKeys::Files),
        )
        .unwrap();
        assert_eq!(gw.tls.key.file(), Some(Path::new("/x/pki/gateway.key")));
        assert_eq!(gw.role, Role::Gateway);
        assert_eq!(
            gw.audit.patient_key,
            Path::new("/x/secrets/gateway.patient.key")
        );
        assert!(!edge.hsm.allow_extractable && !gw.hsm.allow_extractable);
        assert_eq!(gw.metrics_listen.port(), DEFAULT_BASE_PORT + 3);
    }

    #[test]
    fn refuses_a_non_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x"), b"x").unwrap();
        let e = create(
            dir.path(),
            DEFAULT_BASE_PORT,
            Path::new(SOFTHSM_MODULE),
            TlsKeys::Hsm,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        assert!(Ports::from_base(65534).is_err());
    }
}
