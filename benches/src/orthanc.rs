//! `baylink-bench orthanc`: a CT study from the PACS into the record store, through baylink
//! and straight, in the same run against the same Orthanc.
//!
//! One synthetic CT study (baylink-synth: 512 × 512 16-bit slices, `--study-size` bytes) and
//! one Orthanc with its DICOMweb plugin and its DICOM listener, started by the bench. Each run
//! measures, in alternating order:
//!
//! - **baseline** (what a hospital has today): dcmtk `storescu` straight into Orthanc's C-STORE
//!   SCP. Orthanc answers each C-STORE once the instance is stored, so the time is storescu's
//!   run, first C-STORE to the last response; the instance count is checked afterwards.
//! - **baylink**: the same `storescu` into the edge's C-STORE SCP of a dev-env deployment
//!   whose gateway delivers into that Orthanc over STOW-RS. The time runs from the first
//!   C-STORE to the moment Orthanc's instance count reaches the study's (polled every 50 ms),
//!   split into stages: C-STORE (storescu's run: consent check, durable spool, seal and HSM
//!   signature before A-RELEASE), transmit (→ the edge has the verified receipt), deliver
//!   (→ the last instance is in Orthanc), and, apart, the delivery notice at the edge.
//!
//! storescu and Orthanc run with `TCP_NODELAY=1` unless `--dcmtk-nagle`: dcmtk leaves
//! Nagle's algorithm on by default, and then a small segment written behind an
//! unacknowledged one waits for the other end's delayed ACK (about 40 ms), for many
//! instances of a study. On loopback that made storescu straight into Orthanc twelve times
//! slower (64 s instead of 5 s for 1000 slices) and the edge's C-STORE stage a quarter
//! slower.
//!
//! Between runs the study is deleted from Orthanc, so every run stores it anew. Reported:
//! each contestant's median seconds over `--runs`, the ratio baylink / baseline of the
//! medians, the stage medians, and every run, as a table on stderr and JSON.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use baylink_synth::CtStudy;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::baylink_run::{Deployment, Gateway, probe_base_port};
use crate::ingest::{default_baylink, start_edge, work_dir};
use crate::proc::Machine;
use crate::size::parse_size;

/// Debian's path of Orthanc's DICOMweb plugin.
const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";
/// How long one contestant's run may take.
const RUN_LIMIT: Duration = Duration::from_secs(900);
/// How often Orthanc's instance count is polled during a baylink run.
const POLL: Duration = Duration::from_millis(50);

/// Arguments of `baylink-bench orthanc`.
#[derive(Debug, clap::Args)]
pub struct OrthancArgs {
    /// Size of the CT study (bytes, or with a unit: 500MiB, 1GiB); 512 KiB slices.
    #[arg(long, default_value = "500MiB", value_parser = parse_size)]
    study_size: u64,
    /// Runs of each contestant (alternating which goes first); medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Where the JSON report goes.
    #[arg(long)]
    json: PathBuf,
    /// The baylink binary (default: next to this one).
    #[arg(long)]
    baylink: Option<PathBuf>,
    /// Work directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Leave Nagle's algorithm on in dcmtk's sockets (its default): storescu's, and
    /// Orthanc's C-STORE SCP, which is dcmtk's. By default both run with `TCP_NODELAY=1`:
    /// with Nagle on, a small segment written behind an unacknowledged one waits for the
    /// other end's delayed ACK (about 40 ms), for many instances of a study, which measures
    /// a socket option rather than the store.
    #[arg(long)]
    dcmtk_nagle: bool,
}

/// One baylink run, seconds from the first C-STORE.
#[derive(Debug, Clone, Serialize)]
struct ChannelRun {
    /// storescu's run into the edge (ends once the transfer is sealed and signed).
    cstore: f64,
    /// The edge holds the gateway's verified receipt (`committed`).
    receipt: f64,
    /// The first instance is in Orthanc.
    first_stored: f64,
    /// The last instance is in Orthanc: the figure.
    all_stored: f64,
    /// The gateway's signed delivery notice is at the edge (`delivered`).
    notice: f64,
}

/// Medians of the stages, in seconds each (not cumulative).
#[derive(Debug, Serialize)]
struct Stages {
    cstore_into_edge: f64,
    seal_end_to_receipt: f64,
    receipt_to_first_stored: f64,
    first_to_last_stored: f64,
    last_stored_to_notice: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    study_bytes: u64,
    slices: u32,
    runs: u32,
    /// storescu (both contestants) and Orthanc's C-STORE SCP ran with Nagle's algorithm off
    /// (`TCP_NODELAY=1`).
    dcmtk_tcp_nodelay: bool,
    machine: Machine,
    /// Median seconds, storescu straight into Orthanc.
    baseline_seconds: f64,
    /// Median seconds, first C-STORE into the edge → last instance in Orthanc.
    baylink_seconds: f64,
    /// baylink / baseline.
    ratio: f64,
    baseline_mib_per_s: f64,
    baylink_mib_per_s: f64,
    stages: Stages,
    baseline_runs: Vec<f64>,
    baylink_runs: Vec<ChannelRun>,
}

/// A private Orthanc: HTTP and DICOM on free loopback ports, storage under the work dir.
#[derive(Debug)]
struct Orthanc {
    http: u16,
    dicom: u16,
    /// How its C-STORE SCP runs, and how storescu runs against it and the edge.
    dcmtk: Dcmtk,
    _child: Child,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

impl Orthanc {
    async fn start(dir: &Path, dcmtk: Dcmtk) -> anyhow::Result<Orthanc> {
        std::fs::create_dir_all(dir.join("db"))?;
        let (http, dicom) = (free_port()?, free_port()?);
        let config = serde_json::json!({
            "Name": "baylink-bench",
            "StorageDirectory": dir.join("db"),
            "IndexDirectory": dir.join("db"),
            "HttpPort": http,
            "DicomServerEnabled": true,
            "DicomAet": "ORTHANC",
            "DicomPort": dicom,
            "DicomCheckCalledAet": false,
            "DicomAlwaysAllowStore": true,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        });
        let config_path = dir.join("orthanc.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let log = std::fs::File::create(dir.join("orthanc.log"))?;
        let mut child = Command::new("Orthanc")
            .env("TCP_NODELAY", dcmtk.env())
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start Orthanc (apt-get install orthanc orthanc-dicomweb)")?;
        let mut orthanc = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "Orthanc exited ({status}); see {}",
                    dir.join("orthanc.log").display()
                );
            }
            if curl(&[&format!("http://127.0.0.1:{http}/system")])
                .await
                .is_ok()
            {
                orthanc = Some(Orthanc {
                    http,
                    dicom,
                    dcmtk,
                    _child: child,
                });
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        orthanc.context("Orthanc did not answer within 60 s")
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    async fn instances(&self) -> anyhow::Result<u64> {
        let stats: serde_json::Value =
            serde_json::from_slice(&curl(&[&self.url("/statistics")]).await?)?;
        stats["CountInstances"]
            .as_u64()
            .context("Orthanc's /statistics has no CountInstances")
    }

    /// Deletes every study (between runs).
    async fn clear(&self) -> anyhow::Result<()> {
        let studies: Vec<String> = serde_json::from_slice(&curl(&[&self.url("/studies")]).await?)?;
        for s in studies {
            curl(&["-X", "DELETE", &self.url(&format!("/studies/{s}"))]).await?;
        }
        ensure!(
            self.instances().await? == 0,
            "Orthanc still holds instances"
        );
        Ok(())
    }
}

async fn curl(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "300"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run curl")?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// How dcmtk's programs (storescu, and Orthanc's C-STORE SCP) are run.
#[derive(Debug, Clone, Copy)]
struct Dcmtk {
    /// `TCP_NODELAY=1` (dcmtk then turns Nagle's algorithm off); otherwise dcmtk's default.
    nodelay: bool,
}

impl Dcmtk {
    /// The value of `TCP_NODELAY` in the environment of a program using dcmtk.
    fn env(self) -> &'static str {
        if self.nodelay { "1" } else { "0" }
    }
}

/// `storescu` of every file under `study` to `aec` at 127.0.0.1:`port` as `aet`; fails
/// unless every instance was answered Success.
async fn storescu(
    dcmtk: Dcmtk,
    aet: &str,
    aec: &str,
    port: u16,
    study: &Path,
    n: u32,
) -> anyhow::Result<()> {
    let out = Command::new("storescu")
        .env("TCP_NODELAY", dcmtk.env())
        .args([
            "-v", "-aet", aet, "-aec", aec, "-to", "30", "-ta", "30", "-td", "300",
        ])
        .args(["+sd", "+r", "127.0.0.1"])
        .arg(port.to_string())
        .arg(study)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run storescu (apt-get install dcmtk)")?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let ok = text.matches("Received Store Response (Success)").count();
    ensure!(
        out.status.success() && ok == n as usize,
        "storescu to {aec}: {} ({ok} of {n} answered Success): {}",
        out.status,
        text.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
    );
    Ok(())
}

/// The edge's hospital API as hospital-a (curl with the dev-env client certificate).
#[derive(Debug)]
struct Api {
    base: String,
    env: PathBuf,
}

impl Api {
    async fn state(&self, id: &str) -> anyhow::Result<String> {
        let ca = self.env.join("pki/ca.pem");
        let cert = self.env.join("pki/hospital-a.pem");
        let key = self.env.join("pki/hospital-a.key");
        let body = curl(&[
            "--cacert",
            &ca.to_string_lossy(),
            "--cert",
            &cert.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
            &format!("{}/v1/transfers/{id}", self.base),
        ])
        .await?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        Ok(v["state"].as_str().unwrap_or_default().to_owned())
    }
}

/// The transfers in the edge's spool.
async fn edge_transfers(baylink: &Path, env: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(baylink)
        .args(["spool", "--json", "--config"])
        .arg(env.join("edge.toml"))
        .stdin(Stdio::null())
        .output()
        .await?;
    ensure!(out.status.success(), "baylink spool failed: {}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v["transfers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["transfer"].as_str().map(str::to_owned))
        .collect())
}

/// Points the gateway's `[delivery]` at the store's DICOMweb base URL.
fn deliver_to(gateway_toml: &Path, url: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(gateway_toml)?;
    let mut doc: toml::Table = text.parse()?;
    let mut delivery = toml::Table::new();
    delivery.insert("kind".into(), "dicomweb".into());
    delivery.insert("url".into(), url.into());
    doc.insert("delivery".into(), toml::Value::Table(delivery));
    std::fs::write(gateway_toml, toml::to_string(&doc)?)?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the bench and writes the JSON report.
pub async fn run(args: OrthancArgs) -> anyhow::Result<()> {
    let baylink = match &args.baylink {
        Some(b) => b.clone(),
        None => default_baylink()?,
    };
    let (work, _tmp) = work_dir(args.work_dir.as_deref(), "baylink-orthanc-")?;
    let dcmtk = Dcmtk {
        nodelay: !args.dcmtk_nagle,
    };

    let study = CtStudy::new(
        "P-0001",
        "Bench^Patient",
        CtStudy::slices_for(args.study_size),
    )?;
    let study_dir = work.join("study");
    let started = Instant::now();
    let files = study.write(&study_dir)?;
    let study_bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    eprintln!(
        "CT study: {} slices, {} bytes, written in {:.1} s",
        study.slices,
        study_bytes,
        started.elapsed().as_secs_f64()
    );

    let orthanc = Orthanc::start(&work.join("orthanc"), dcmtk).await?;
    let base_port = probe_base_port()?;
    let env = work.join("env");
    Deployment::create(&baylink, &env, base_port).await?;
    deliver_to(&env.join("gateway.toml"), &orthanc.url("/dicom-web"))?;
    let deployment = Deployment::load(&env)?;
    let gateway = Gateway::start(&baylink, &deployment, &work, None).await?;
    let (mut edge, _) = start_edge(&baylink, &deployment.edge.path, &work).await?;
    let api = Api {
        base: format!("https://127.0.0.1:{base_port}"),
        env: env.clone(),
    };

    let mut baseline_runs = Vec::new();
    let mut baylink_runs = Vec::new();
    for run in 0..args.runs {
        let order: [bool; 2] = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for channel in order {
            orthanc.clear().await?;
            if channel {
                let r = tokio::time::timeout(
                    RUN_LIMIT,
                    channel_run(
                        &baylink,
                        &env,
                        &api,
                        &orthanc,
                        &study_dir,
                        study.slices,
                        base_port,
                    ),
                )
                .await
                .context("a baylink run took too long")??;
                eprintln!(
                    "run {}: baylink  {:.2} s (C-STORE {:.2}, receipt {:.2}, first stored {:.2}, notice {:.2})",
                    run + 1,
                    r.all_stored,
                    r.cstore,
                    r.receipt,
                    r.first_stored,
                    r.notice
                );
                baylink_runs.push(r);
            } else {
                let t = Instant::now();
                storescu(
                    dcmtk,
                    "STORESCU",
                    "ORTHANC",
                    orthanc.dicom,
                    &study_dir,
                    study.slices,
                )
                .await?;
                let s = t.elapsed().as_secs_f64();
                let held = orthanc.instances().await?;
                ensure!(
                    held == u64::from(study.slices),
                    "Orthanc holds {held} instances after storescu, not {}",
                    study.slices
                );
                eprintln!("run {}: baseline {s:.2} s", run + 1);
                baseline_runs.push(s);
            }
        }
    }

    let baseline = median(baseline_runs.clone());
    let channel = median(baylink_runs.iter().map(|r| r.all_stored).collect());
    let stage = |f: fn(&ChannelRun) -> f64| median(baylink_runs.iter().map(f).collect());
    let mib = study_bytes as f64 / f64::from(1 << 20);
    let report = Report {
        study_bytes,
        slices: study.slices,
        runs: args.runs,
        dcmtk_tcp_nodelay: dcmtk.nodelay,
        machine: Machine::current(),
        baseline_seconds: baseline,
        baylink_seconds: channel,
        ratio: if baseline > 0.0 {
            channel / baseline
        } else {
            0.0
        },
        baseline_mib_per_s: if baseline > 0.0 { mib / baseline } else { 0.0 },
        baylink_mib_per_s: if channel > 0.0 { mib / channel } else { 0.0 },
        stages: Stages {
            cstore_into_edge: stage(|r| r.cstore),
            seal_end_to_receipt: stage(|r| r.receipt - r.cstore),
            receipt_to_first_stored: stage(|r| r.first_stored - r.receipt),
            first_to_last_stored: stage(|r| r.all_stored - r.first_stored),
            last_stored_to_notice: stage(|r| r.notice - r.all_stored),
        },
        baseline_runs,
        baylink_runs,
    };
    print_table(&report);
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.json, &json)
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    println!("{json}");
    edge.kill().await?;
    gateway.stop().await?;
    Ok(())
}

/// One baylink run: storescu into the edge, then Orthanc's count and the transfer's state
/// polled until the study is stored and the notice is back.
async fn channel_run(
    baylink: &Path,
    env: &Path,
    api: &Api,
    orthanc: &Orthanc,
    study: &Path,
    slices: u32,
    base_port: u16,
) -> anyhow::Result<ChannelRun> {
    let dcmtk = orthanc.dcmtk;
    let before = edge_transfers(baylink, env).await?;
    let t0 = Instant::now();
    storescu(dcmtk, "STORESCU", "BAYLINK", base_port + 4, study, slices).await?;
    let cstore = t0.elapsed().as_secs_f64();
    let new: Vec<String> = edge_transfers(baylink, env)
        .await?
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    let [id] = new.as_slice() else {
        bail!("{} new transfers in the edge spool, not 1", new.len());
    };
    let (mut receipt, mut first, mut all, mut notice) = (None, None, None, None);
    while all.is_none() || notice.is_none() {
        let now = t0.elapsed().as_secs_f64();
        if all.is_none() {
            let held = orthanc.instances().await?;
            if held > 0 && first.is_none() {
                first = Some(now);
            }
            if held >= u64::from(slices) {
                all = Some(now);
            }
        }
        if receipt.is_none() || notice.is_none() {
            match api.state(id).await?.as_str() {
                "committed" => {
                    receipt.get_or_insert(now);
                }
                "delivered" => {
                    receipt.get_or_insert(now);
                    notice.get_or_insert(now);
                }
                s @ ("partial" | "failed" | "refused") => bail!("transfer {id} ended {s}"),
                _ => {}
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let all_stored = all.unwrap_or_default();
    Ok(ChannelRun {
        cstore,
        receipt: receipt.unwrap_or_default(),
        first_stored: first.unwrap_or(all_stored),
        all_stored,
        notice: notice.unwrap_or_default(),
    })
}

fn print_table(r: &Report) {
    eprintln!(
        "\n| CT study {} MiB ({} slices), median of {} | seconds | MiB/s |",
        r.study_bytes >> 20,
        r.slices,
        r.runs
    );
    eprintln!("|---|---|---|");
    eprintln!(
        "| storescu → Orthanc (baseline) | {:.2} | {:.0} |",
        r.baseline_seconds, r.baseline_mib_per_s
    );
    eprintln!(
        "| storescu → edge → QUIC → gateway → STOW-RS → Orthanc | {:.2} | {:.0} |",
        r.baylink_seconds, r.baylink_mib_per_s
    );
    eprintln!("| ratio | {:.2}× | |", r.ratio);
    let s = &r.stages;
    eprintln!(
        "\nstages (medians, s): C-STORE into the edge {:.2}, → receipt {:.2}, → first instance in Orthanc {:.2}, → last {:.2}; notice at the edge {:.2} later",
        s.cstore_into_edge,
        s.seal_end_to_receipt,
        s.receipt_to_first_stored,
        s.first_to_last_stored,
        s.last_stored_to_notice
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn the_gateway_delivers_to_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gateway.toml");
        std::fs::write(
            &p,
            "role = \"gateway\"\n[delivery]\nkind = \"dir\"\npath = \"d\"\n",
        )
        .unwrap();
        deliver_to(&p, "http://127.0.0.1:1/dicom-web").unwrap();
        let doc: toml::Table = std::fs::read_to_string(&p).unwrap().parse().unwrap();
        assert_eq!(doc["delivery"]["kind"].as_str(), Some("dicomweb"));
        assert_eq!(
            doc["delivery"]["url"].as_str(),
            Some("http://127.0.0.1:1/dicom-web")
        );
        assert!(doc["delivery"].get("path").is_none());
    }
}
