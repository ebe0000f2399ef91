//! `cargo xtask demo`: a CT study from a hospital's PACS into the record store, across the
//! appliances, with every piece of evidence checked on the way.
//!
//! Steps: the Debian packages (softhsm2, dcmtk, orthanc, orthanc-dicomweb, openssl, curl,
//! pip and pydicom) and pynetdicom (pinned, from PyPI); `cargo build --release -p baylink`;
//! `baylink dev-env DIR` on free ports; a private Orthanc (DICOMweb plugin) as the gateway's
//! `[delivery]`; the gateway and the edge (`baylink serve`, awaited until `READY=1`); a
//! synthetic CT study of patient P-0001 (dicom-rs, 512 × 512 16-bit slices); `storescu`
//! (dcmtk) into the edge's C-STORE SCP; the modality's Storage Commitment request for every
//! slice (pynetdicom, `tests/data/dicom/commitment_scu.py`, on an association kept open for
//! the report); the transfer followed through the hospital API (`?wait=`) until the gateway's
//! signed delivery notice is back at the edge; the N-EVENT-REPORT committing every slice; the
//! study counted in Orthanc and two slices compared byte for byte; the receipt and the notice
//! checked with `openssl` against the gateway's key as its HSM exports it; a second study, of
//! P-0099 (no consent), refused at C-STORE with the rule named; both appliances stopped
//! (SIGTERM, exit 0); both audit logs verified with `baylink audit verify`. Orthanc stays
//! running, so the study can be looked at, unless `--clean` removes the directory.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use baylink_synth::CtStudy;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd;
use crate::evidence::{self, NOTICE_PREFIX, RECEIPT_PREFIX};
use crate::notify::NotifySocket;
use crate::orthanc::Orthanc;
use crate::packages;
use crate::size::human;

/// Options of the demo.
#[derive(Debug)]
pub struct Options {
    /// Approximate size of the CT study in bytes.
    pub size: u64,
    /// Remove the demo directory afterwards (and stop Orthanc, whose storage is in it).
    pub clean: bool,
    /// A prebuilt baylink binary (skips the build).
    pub baylink: Option<PathBuf>,
    /// Do not install missing Debian packages.
    pub skip_install: bool,
}

/// The patient of the study: has consent in the dev-env registry.
const PATIENT: &str = "P-0001";
/// The patient of the refused study: no consent record.
const PATIENT_WITHOUT_CONSENT: &str = "P-0099";
/// dev-env's Storage SCU entry: AE title STORESCU from 127.0.0.1 is hospital-a.
const CALLING_AE: &str = "STORESCU";
/// How long the appliances may take to signal readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the transfer may take from the end of the association to the delivery notice.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an appliance may take to drain and exit after SIGTERM (`drain.timeout` is 30 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo; the directory stays unless `--clean` was given and everything passed.
pub fn run(opts: &Options) -> Result<()> {
    packages::ensure(packages::DEMO, !opts.skip_install)?;
    packages::ensure_python(packages::TEST_PYTHON_PACKAGES, !opts.skip_install)?;
    let bin = match &opts.baylink {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => bail!("--baylink {}: no such file", path.display()),
        None => build()?,
    };
    let dir = make_demo_dir()?;
    println!("demo: directory {}", dir.display());
    let started = Instant::now();
    let result = run_in(&bin, &dir, opts.size);
    match result {
        Ok(orthanc) => {
            if opts.clean {
                drop(orthanc);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => println!("demo: Orthanc stopped, removed {}", dir.display()),
                    Err(e) => println!("demo: could not remove {}: {e}", dir.display()),
                }
            } else {
                let url = orthanc.url();
                let pid = orthanc.leave_running();
                println!(
                    "demo: Orthanc keeps running (pid {}) so that the study can be looked at: \
                     {url}/app/explorer.html",
                    pid.map_or_else(|| "?".to_owned(), |p| p.to_string())
                );
                if let Some(pid) = pid {
                    println!(
                        "demo: stop it and remove everything with: kill {pid}; rm -rf {}",
                        dir.display()
                    );
                }
            }
            println!(
                "demo: done in {:.0} s after the build",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            eprintln!(
                "demo: failed; directory kept for inspection: {}",
                dir.display()
            );
            Err(e)
        }
    }
}

/// `cargo build --release --locked -p baylink`, then the binary's path in cargo's target dir.
fn build() -> Result<PathBuf> {
    let root = cmd::workspace_root();
    println!("demo: cargo build --release --locked -p baylink");
    cmd::run(
        Command::new(cmd::cargo())
            .args(["build", "--release", "--locked", "-p", "baylink"])
            .current_dir(&root),
    )
    .context("building baylink failed")?;
    let meta = cmd::output(
        Command::new(cmd::cargo())
            .args(["metadata", "--format-version", "1", "--no-deps", "--locked"])
            .current_dir(&root),
    )?;
    let meta: serde_json::Value =
        serde_json::from_str(&meta).context("cargo metadata printed something that is not JSON")?;
    let target = meta
        .get("target_directory")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("cargo metadata has no target_directory"))?;
    let bin = Path::new(target).join("release").join("baylink");
    if !bin.is_file() {
        bail!("the build succeeded but {} is not there", bin.display());
    }
    Ok(bin)
}

/// Creates a new, empty `baylink-demo-XXXXXXXX` under the temp dir (`$TMPDIR` or `/tmp`).
fn make_demo_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let seed = std::process::id() ^ (Instant::now().elapsed().subsec_nanos());
    for i in 0..100u32 {
        let dir = base.join(format!(
            "baylink-demo-{:08x}",
            seed.wrapping_mul(2_654_435_761).wrapping_add(i)
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", dir.display()));
            }
        }
    }
    bail!(
        "could not find a free baylink-demo-* name in {}",
        base.display()
    )
}

/// A base port N such that dev-env's ports N..N+5 are free (TCP N, N+1, N+3, N+4, N+5 and
/// UDP N+2), tried from a point derived from the process id so parallel demos spread.
fn free_base_port() -> Result<u16> {
    let start = (std::process::id() % 2000) as u16;
    for i in 0..2000u16 {
        let base = 20_000 + ((start + i) % 2000) * 6;
        let tcp = [0u16, 1, 3, 4, 5]
            .iter()
            .map(|d| TcpListener::bind(("127.0.0.1", base + d)))
            .collect::<Result<Vec<_>, _>>();
        if tcp.is_ok() && UdpSocket::bind(("127.0.0.1", base + 2)).is_ok() {
            return Ok(base);
        }
    }
    bail!("no free block of six ports between 20000 and 32000")
}

/// What happened to the study, for the summary.
#[derive(Debug, Default)]
struct Story {
    slices: u32,
    bytes: u64,
    generate: Duration,
    /// storescu's run: C-STORE of every slice, each checked against the consent registry and
    /// made durable, then the transfer sealed and HSM-signed before A-RELEASE is answered.
    cstore: Duration,
    /// End of the association → receipt verified at the edge (`committed`).
    receipt: Duration,
    /// Receipt → the gateway's signed delivery notice at the edge (`delivered`): STOW-RS into
    /// Orthanc, notice signed and sent back.
    delivered: Duration,
    transfer_id: String,
    merkle_root: String,
    process_id: String,
    states: Vec<(String, Duration)>,
    study_url: String,
    receipt_check: String,
    notice_check: String,
    refused_status: String,
    refused_rule: String,
    edge_audit: String,
    gateway_audit: String,
    /// The Storage Commitment report the modality received.
    commitment: String,
}

/// The modality's Storage Commitment request (pynetdicom, `tests/data/dicom/commitment_scu.py`),
/// running beside the delivery on an association it keeps open for the report.
struct Commitment {
    child: Child,
    started: Instant,
}

impl Commitment {
    /// How long the modality keeps its association open for the report. The edge closes an
    /// association after `ingest.dicom_idle_timeout` (60 s by default) of silence; a larger
    /// study's report then goes to the modality's own listener (`commitment_port`).
    const WAIT: Duration = Duration::from_secs(55);

    fn request(port: u16, transaction: &str, uids: &[String]) -> Result<Commitment> {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/dicom/commitment_scu.py");
        let child = Command::new("/usr/bin/python3")
            .arg(&script)
            .args(["request", "--port", &port.to_string(), "--ae", CALLING_AE])
            .args(["--transaction", transaction])
            .args(["--same-association", &Self::WAIT.as_secs().to_string()])
            .arg("--uids")
            .args(uids)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", script.display()))?;
        Ok(Commitment {
            child,
            started: Instant::now(),
        })
    }

    /// Waits for the modality's report and says what it holds; an error unless every one of
    /// `slices` instances was committed.
    fn report(self, slices: usize) -> Result<String> {
        let out = self
            .child
            .wait_with_output()
            .context("waiting for the Storage Commitment SCU")?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "the Storage Commitment SCU failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: serde_json::Value = serde_json::from_str(said.trim())
            .with_context(|| format!("the Storage Commitment SCU printed {said}"))?;
        ensure!(
            answer["status"] == 0,
            "N-ACTION (Request Storage Commitment) answered {}",
            answer["status"]
        );
        let report = &answer["report"];
        ensure!(
            report.is_object(),
            "no N-EVENT-REPORT within {} s of the request",
            Self::WAIT.as_secs()
        );
        let committed = report["committed"].as_array().map_or(0, Vec::len);
        let failed = report["failed"].as_array().map_or(0, Vec::len);
        ensure!(
            committed == slices && failed == 0,
            "the Storage Commitment report commits {committed} of {slices} instances \
             ({failed} failed): {report}"
        );
        Ok(format!(
            "N-EVENT-REPORT type {} on the same association, {committed} of {slices} \
             instances committed, {:.1} s after the request",
            report["event_type"],
            self.started.elapsed().as_secs_f64()
        ))
    }
}

fn run_in(bin: &Path, dir: &Path, size: u64) -> Result<Orthanc> {
    let base = free_base_port()?;
    cmd::run(
        Command::new(bin)
            .arg("dev-env")
            .arg(dir)
            .args(["--base-port", &base.to_string()]),
    )
    .context("baylink dev-env failed")?;
    warn_if_short_of_space(dir, size);

    // The record store, and the gateway delivering into it.
    let orthanc = Orthanc::start(&dir.join("orthanc"))?;
    println!(
        "demo: Orthanc {} (DICOMweb {}, log {})",
        orthanc.url(),
        orthanc.dicomweb_url(),
        orthanc.log.display()
    );
    deliver_to(&dir.join("gateway.toml"), &orthanc.dicomweb_url())?;

    let mut gateway = Service::start(bin, dir, "gateway")?;
    let mut edge = Service::start(bin, dir, "edge")?;
    let api = Api {
        base: format!("https://127.0.0.1:{base}"),
        dir: dir.to_owned(),
    };

    let mut story = Story::default();
    let study = {
        let t = Instant::now();
        let study = CtStudy::new(PATIENT, "Demo^Patient", CtStudy::slices_for(size))?;
        let files = study.write(&dir.join("study"))?;
        story.generate = t.elapsed();
        story.slices = study.slices;
        story.bytes = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()))
            .sum::<std::io::Result<u64>>()?;
        println!(
            "demo: CT study of {PATIENT}: {} slices of 512 x 512 x 16 bit, {} in {} ({:.1} s)",
            study.slices,
            human(story.bytes),
            dir.join("study").display(),
            story.generate.as_secs_f64()
        );
        study
    };

    // The hospital's PACS sends the study by C-STORE.
    let t = Instant::now();
    let out = storescu(dir, base + 4, &dir.join("study"), false)?;
    story.cstore = t.elapsed();
    if !out.status.success() {
        return Err(edge.with_log_tail(anyhow!(
            "storescu failed ({}): {}",
            cmd::describe(out.status),
            text(&out)
        )));
    }
    let association_end = Instant::now();
    println!(
        "demo: storescu: {} instances answered Success in {:.1} s; the transfer is sealed",
        story.slices,
        story.cstore.as_secs_f64()
    );
    let id = edge_transfer(bin, dir)?;
    println!("demo: transfer {id}");

    // The modality asks for Storage Commitment of every slice, keeping the association open
    // for the report (it takes the SCP role): the edge answers only from the gateway's
    // signed delivery notice, once the record store holds them.
    let uids: Vec<String> = (0..study.slices).map(|n| study.instance_uid(n)).collect();
    let commitment = Commitment::request(base + 4, &format!("{}.1", study.study_uid()), &uids)?;

    // Follow it: sealed → sending → committed (receipt verified) → delivered (notice).
    let mut state = String::new();
    let deadline = association_end + DELIVERY_TIMEOUT;
    while state != "delivered" {
        ensure!(
            Instant::now() < deadline,
            "transfer {id} is still `{state}` {} s after the association ended",
            DELIVERY_TIMEOUT.as_secs()
        );
        gateway.check_running()?;
        edge.check_running()?;
        let status = api.get_json(&format!("/v1/transfers/{id}?wait=30"))?;
        let now = status["state"].as_str().unwrap_or_default().to_owned();
        if now == state {
            continue;
        }
        let at = association_end.elapsed();
        println!("demo:   {now} (+{:.2} s)", at.as_secs_f64());
        match now.as_str() {
            "committed" => story.receipt = at,
            "delivered" => story.delivered = at.saturating_sub(story.receipt),
            "partial" | "failed" | "refused" => {
                return Err(gateway
                    .with_log_tail(anyhow!("transfer {id} ended `{now}`: {}", status["error"])));
            }
            _ => {}
        }
        story.states.push((now.clone(), at));
        state = now;
    }
    story.transfer_id = id.clone();
    story.commitment = commitment.report(study.slices as usize)?;
    println!("demo: Storage Commitment: {}", story.commitment);

    // The study in the record store.
    let study_id = orthanc
        .study_id(&study.study_uid())?
        .ok_or_else(|| anyhow!("Orthanc has no study {}", study.study_uid()))?;
    let instances = orthanc.get(&format!("/studies/{study_id}/instances"))?;
    let stored = instances.as_array().map_or(0, Vec::len);
    ensure!(
        stored == study.slices as usize,
        "Orthanc holds {stored} instances of the study, not {}",
        study.slices
    );
    for n in [0, study.slices - 1] {
        let uid = study.instance_uid(n);
        let oid = orthanc
            .instance_id(&uid)?
            .ok_or_else(|| anyhow!("Orthanc has no instance {uid}"))?;
        let copy = orthanc.get_bytes(&format!("/instances/{oid}/file"))?;
        let source = dir.join("study").join(CtStudy::file_name(n));
        // The edge stores the data set as received behind a file meta group of its own:
        // the data sets must be identical.
        let sent = std::fs::read(&source)?;
        ensure!(
            data_set(&copy).is_some() && data_set(&copy) == data_set(&sent),
            "Orthanc's copy of {uid} differs from {} (data set after the file meta group)",
            source.display()
        );
    }
    story.study_url = format!("{}/app/explorer.html#study?uuid={study_id}", orthanc.url());
    println!(
        "demo: Orthanc holds the study's {stored} instances (first and last slice: data set byte-identical)"
    );

    // The evidence, checked with openssl against the gateway's key as its HSM exports it.
    let evidence_dir = dir.join("evidence");
    std::fs::create_dir_all(&evidence_dir)?;
    let gateway_key = evidence_dir.join("gateway.pub.pem");
    let pem = cmd::output(
        Command::new(bin)
            .args(["hsm", "pubkey", "--config"])
            .arg(dir.join("gateway.toml")),
    )
    .context("exporting the gateway's public key from its HSM failed")?;
    std::fs::write(&gateway_key, pem)?;
    let receipt = api.download(
        &format!("/v1/transfers/{id}/receipt"),
        &evidence_dir.join("receipt.json"),
    )?;
    story.receipt_check = evidence::verify_with_openssl(
        &receipt,
        "receipt",
        RECEIPT_PREFIX,
        &gateway_key,
        &evidence_dir,
        "receipt",
    )?;
    story.merkle_root = receipt["merkle_root"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    story.process_id = receipt["process_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let notice = api.download(
        &format!("/v1/transfers/{id}/delivery"),
        &evidence_dir.join("delivery.json"),
    )?;
    ensure!(
        notice["fields"]["outcome"] == "delivered",
        "the delivery notice says {}",
        notice["fields"]["outcome"]
    );
    story.notice_check = evidence::verify_with_openssl(
        &notice,
        "notice",
        NOTICE_PREFIX,
        &gateway_key,
        &evidence_dir,
        "delivery-notice",
    )?;
    println!(
        "demo: receipt and delivery notice: openssl says {}",
        story.receipt_check
    );

    // A study of a patient without consent: refused instance by instance, nothing sent.
    let refused = CtStudy::new(PATIENT_WITHOUT_CONSENT, "Nobody^Consented", 2)?;
    refused.write(&dir.join("refused"))?;
    let out = storescu(dir, base + 4, &dir.join("refused"), true)?;
    let said = text(&out);
    let refusals = said.matches("Unknown Status: 0x124").count();
    ensure!(
        refusals == 2,
        "storescu was not refused twice with 0x0124 for {PATIENT_WITHOUT_CONSENT}: {said}"
    );
    story.refused_status = "0x0124 refused: not authorized".to_owned();
    story.refused_rule = refused_rule(dir)?;
    ensure!(
        story.refused_rule == "consent-missing",
        "the edge refused {PATIENT_WITHOUT_CONSENT} with rule {}, not consent-missing",
        story.refused_rule
    );
    println!(
        "demo: {PATIENT_WITHOUT_CONSENT}: both instances refused ({}), rule {}",
        story.refused_status, story.refused_rule
    );

    // Stop both appliances, then check both audit logs offline.
    for service in [&mut edge, &mut gateway] {
        let status = service.terminate(STOP_TIMEOUT)?;
        if !status.success() {
            return Err(service.with_log_tail(anyhow!(
                "{} did not exit cleanly after SIGTERM ({})",
                service.name,
                cmd::describe(status)
            )));
        }
    }
    story.edge_audit = audit_verify(
        Command::new(bin)
            .args(["audit", "verify", "--config"])
            .arg(dir.join("edge.toml"))
            .arg("--witness-key")
            .arg(dir.join("keys/gateway.pub.pem")),
    )?;
    story.gateway_audit = audit_verify(
        Command::new(bin)
            .args(["audit", "verify", "--config"])
            .arg(dir.join("gateway.toml")),
    )?;

    print_summary(&story, &orthanc, dir);
    Ok(orthanc)
}

/// Points the gateway's `[delivery]` at the store's DICOMweb base URL.
fn deliver_to(gateway_toml: &Path, url: &str) -> Result<()> {
    let text = std::fs::read_to_string(gateway_toml)
        .with_context(|| format!("cannot read {}", gateway_toml.display()))?;
    let from = "[delivery]\nkind = \"dir\"\npath = \"delivered\"\n";
    ensure!(
        text.contains(from),
        "{} has no directory [delivery] section to replace",
        gateway_toml.display()
    );
    let to = format!(
        "[delivery]\n# The demo's Orthanc (STOW-RS).\nkind = \"dicomweb\"\nurl = \"{url}\"\n"
    );
    std::fs::write(gateway_toml, text.replace(from, &to))
        .with_context(|| format!("cannot write {}", gateway_toml.display()))
}

/// dcmtk's storescu sending every file of `study` to the edge's C-STORE SCP as one
/// association; `go_on` (-nh) goes on after a refused instance.
fn storescu(dir: &Path, port: u16, study: &Path, go_on: bool) -> Result<std::process::Output> {
    let mut c = Command::new("storescu");
    c.args(["-v", "-aet", CALLING_AE, "-aec", "BAYLINK"])
        .args(["-to", "30", "-ta", "30", "-td", "120"]);
    if go_on {
        c.arg("-nh");
    }
    c.args(["+sd", "+r", "127.0.0.1"])
        .arg(port.to_string())
        .arg(study)
        .current_dir(dir)
        .stdin(Stdio::null());
    println!(
        "demo: {}",
        cmd::display(&c).replace(&format!("{}/", dir.display()), "")
    );
    c.output()
        .with_context(|| format!("cannot run `{}`", cmd::display(&c)))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The one transfer in the edge's spool (`baylink spool --json`).
fn edge_transfer(bin: &Path, dir: &Path) -> Result<String> {
    let out = cmd::output(
        Command::new(bin)
            .args(["spool", "--json", "--config"])
            .arg(dir.join("edge.toml")),
    )?;
    let inventory: serde_json::Value =
        serde_json::from_str(&out).context("baylink spool --json printed no JSON")?;
    let transfers: Vec<&str> = inventory["transfers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["transfer"].as_str())
        .collect();
    match transfers.as_slice() {
        [one] => Ok((*one).to_owned()),
        other => bail!("the edge spool holds {} transfers, not 1", other.len()),
    }
}

/// The rule the edge's log names for its latest refused instance (`... (rule <name>)`).
fn refused_rule(dir: &Path) -> Result<String> {
    let log =
        std::fs::read_to_string(dir.join("edge.log")).context("cannot read the edge's log")?;
    log.lines()
        .rev()
        .filter(|l| l.contains("instance refused"))
        .find_map(|l| {
            let rest = &l[l.find("(rule ")? + "(rule ".len()..];
            Some(rest[..rest.find(')')?].to_owned())
        })
        .ok_or_else(|| anyhow!("the edge's log names no rule for a refused instance"))
}

/// Runs `baylink audit verify`; its last line (`audit ok: N records, root <hex>`).
fn audit_verify(c: &mut Command) -> Result<String> {
    let out = cmd::output(c.stdout(Stdio::piped()))?;
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    ensure!(
        last.starts_with("audit ok:"),
        "`{}` said: {out}",
        cmd::display(c)
    );
    Ok(last.trim_start_matches("audit ok: ").to_owned())
}

/// The edge's hospital API as hospital-a (curl with the dev-env client certificate).
#[derive(Debug)]
struct Api {
    base: String,
    dir: PathBuf,
}

impl Api {
    fn curl(&self, path: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail-with-body", "--max-time", "90", "--cacert"])
            .arg(self.dir.join("pki/ca.pem"))
            .arg("--cert")
            .arg(self.dir.join("pki/hospital-a.pem"))
            .arg("--key")
            .arg(self.dir.join("pki/hospital-a.key"))
            .arg(format!("{}{path}", self.base))
            .stdin(Stdio::null());
        c
    }

    fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let mut c = self.curl(path);
        let out = c.output().context("cannot run curl")?;
        ensure!(out.status.success(), "GET {path}: {}", text(&out).trim());
        serde_json::from_slice(&out.stdout).with_context(|| format!("GET {path}: not JSON"))
    }

    /// GET `path` into `file`; the JSON.
    fn download(&self, path: &str, file: &Path) -> Result<serde_json::Value> {
        let v = self.get_json(path)?;
        std::fs::write(file, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("cannot write {}", file.display()))?;
        Ok(v)
    }
}

fn rate(bytes: u64, took: Duration) -> String {
    let s = took.as_secs_f64();
    if s > 0.0 {
        format!(
            "{:>7.1} MiB/s  {:>5.2} Gbit/s",
            bytes as f64 / s / f64::from(1 << 20),
            bytes as f64 * 8.0 / s / 1e9
        )
    } else {
        String::new()
    }
}

fn print_summary(s: &Story, orthanc: &Orthanc, dir: &Path) {
    let total = s.cstore + s.receipt + s.delivered;
    println!();
    println!(
        "CT study of {PATIENT}: {} slices, {} ({} bytes), transfer {}",
        s.slices,
        human(s.bytes),
        s.bytes,
        s.transfer_id
    );
    println!();
    println!("  stage                                                         time   throughput");
    for (what, took) in [
        (
            "C-STORE into the edge, consent checked, sealed + HSM-signed",
            s.cstore,
        ),
        (
            "across QUIC, verified by the gateway, signed receipt checked",
            s.receipt,
        ),
        (
            "STOW-RS into Orthanc, signed delivery notice at the edge",
            s.delivered,
        ),
        ("first C-STORE -> delivered notice", total),
    ] {
        println!(
            "  {what:<60} {:>6.1} s  {}",
            took.as_secs_f64(),
            rate(s.bytes, took)
        );
    }
    println!();
    println!("  merkle root      {}", s.merkle_root);
    println!("  consent          {} (the receipt names it)", s.process_id);
    println!(
        "  receipt          {}: openssl dgst -sha256 -verify (gateway key from its HSM)",
        s.receipt_check
    );
    println!("  delivery notice  {}: the same check", s.notice_check);
    println!("  commitment       {}", s.commitment);
    println!("  edge audit       ok, {}", s.edge_audit);
    println!("  gateway audit    ok, {}", s.gateway_audit);
    println!(
        "  refused          {PATIENT_WITHOUT_CONSENT} (no consent): C-STORE status {}, rule {}",
        s.refused_status, s.refused_rule
    );
    println!("  study in Orthanc {}", s.study_url);
    println!("  Orthanc DICOMweb {}", orthanc.dicomweb_url());
    println!("  evidence         {}", dir.join("evidence").display());
    println!();
}

fn warn_if_short_of_space(dir: &Path, size: u64) {
    // The study, the edge spool, the gateway spool and Orthanc's copy: up to 4 copies.
    let Ok(available) = cmd::free_bytes(dir) else {
        return;
    };
    let needed = size.saturating_mul(4);
    if available < needed {
        println!(
            "demo: warning: {} free under {}, the demo may need up to {} (4 copies); set TMPDIR \
             to a roomier place or use a smaller --size",
            human(available),
            dir.display(),
            human(needed)
        );
    }
}

/// A running appliance (`baylink serve --config DIR/<name>.toml`); killed (SIGKILL) if
/// dropped while still running.
#[derive(Debug)]
struct Service {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    /// Starts it with its output in `DIR/<name>.log` and waits for `READY=1`.
    fn start(bin: &Path, dir: &Path, name: &'static str) -> Result<Service> {
        let notify = NotifySocket::bind(&dir.join(format!("{name}.notify")))?;
        let log = dir.join(format!("{name}.log"));
        let file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut serve = Command::new(bin);
        serve
            .arg("serve")
            .arg("--config")
            .arg(dir.join(format!("{name}.toml")))
            .env("NOTIFY_SOCKET", notify.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        println!("demo: {} (log: {})", cmd::display(&serve), log.display());
        let child = serve
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::display(&serve)))?;
        let mut service = Service {
            name,
            child: Some(child),
            log,
        };
        let took = notify
            .wait_ready(service.child()?, name, READY_TIMEOUT)
            .map_err(|e| service.with_log_tail(e))?;
        println!("demo: {name} ready after {:.1} s", took.as_secs_f64());
        Ok(service)
    }

    fn child(&mut self) -> Result<&mut Child> {
        let name = self.name;
        self.child
            .as_mut()
            .ok_or_else(|| anyhow!("the {name} was already stopped"))
    }

    /// Fails, with the end of its log, if it has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child()?.try_wait()? {
            return Err(self.with_log_tail(anyhow!(
                "the {} exited ({})",
                self.name,
                cmd::describe(status)
            )));
        }
        Ok(())
    }

    /// SIGTERM, then wait at most `timeout` for the exit; SIGKILL after that (an error).
    fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.name;
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the {name} was already stopped"))?;
        if let Some(status) = child.try_wait()? {
            bail!("the {name} had already exited ({})", cmd::describe(status));
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM).with_context(|| format!("cannot send SIGTERM to the {name}"))?;
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(timeout) {
            Ok(status) => status.with_context(|| format!("waiting for the {name} failed"))?,
            Err(_) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = rx.recv();
                let _ = waiter.join();
                bail!(
                    "the {name} did not exit within {} s of SIGTERM; killed it",
                    timeout.as_secs()
                );
            }
        };
        let _ = waiter.join();
        Ok(status)
    }

    /// Adds the end of its log to `err`.
    fn with_log_tail(&self, err: anyhow::Error) -> anyhow::Error {
        match tail(&self.log, 30) {
            Some(t) if !t.is_empty() => anyhow!(
                "{err:#}\n--- {} log ({}), last lines:\n{t}",
                self.name,
                self.log.display()
            ),
            _ => err,
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && matches!(child.try_wait(), Ok(None))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The data set of a Part 10 file: what follows the file meta group, whose length is the
/// value of (0002,0000) right after the `DICM` preamble.
fn data_set(file: &[u8]) -> Option<&[u8]> {
    if file.get(128..132)? != b"DICM" || file.get(132..138)? != [2, 0, 0, 0, b'U', b'L'] {
        return None;
    }
    let len = u32::from_le_bytes(file.get(140..144)?.try_into().ok()?);
    file.get(144usize.checked_add(usize::try_from(len).ok()?)?..)
}

/// The last `n` lines of a text file.
fn tail(path: &Path, n: usize) -> Option<String> {
    let f = File::open(path).ok()?;
    let mut lines: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in BufReader::new(f).lines() {
        let line = line.ok()?;
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    Some(Vec::from(lines).join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_pointed_at_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "role = \"gateway\"\n\n[delivery]\nkind = \"dir\"\npath = \"delivered\"\n",
        )
        .unwrap();
        deliver_to(&path, "http://127.0.0.1:8042/dicom-web").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("kind = \"dicomweb\"\nurl = \"http://127.0.0.1:8042/dicom-web\""));
        assert!(!text.contains("path = \"delivered\""));
        // A config without dev-env's section is refused, not half-edited.
        assert!(deliver_to(&path, "http://x").is_err());
    }

    #[test]
    fn the_data_set_follows_the_meta_group() {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        f.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0, 2, 0, 0, 0]);
        f.extend_from_slice(&[0xaa, 0xbb, 1, 2, 3]);
        assert_eq!(data_set(&f), Some(&[1u8, 2, 3][..]));
        assert_eq!(data_set(&f[..130]), None);
        f[128] = b'X';
        assert_eq!(data_set(&f), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "1\n2\n3\n4\n").unwrap();
        assert_eq!(tail(&path, 2).unwrap(), "3\n4");
    }
}
