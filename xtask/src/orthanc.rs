//! A private Orthanc for the demo: the health-record store the gateway delivers into over
//! DICOMweb STOW-RS. Its storage, config and log live in the demo directory; HTTP on a free
//! loopback port, no DICOM listener, no remote access.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd;

/// Debian's path of Orthanc's DICOMweb plugin (package orthanc-dicomweb).
pub const DICOMWEB_PLUGIN: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";

/// How long Orthanc may take to answer its REST API after start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Orthanc; killed on drop unless [`Orthanc::leave_running`] was called.
#[derive(Debug)]
pub struct Orthanc {
    /// HTTP port on 127.0.0.1.
    pub port: u16,
    /// Its log file.
    pub log: PathBuf,
    child: Option<Child>,
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough on a machine that is not
/// handing out ports as fast as we take them).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0)).context("cannot bind a port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

impl Orthanc {
    /// Starts Orthanc with its files under `dir` and waits until its REST API answers.
    pub fn start(dir: &Path) -> Result<Orthanc> {
        std::fs::create_dir_all(dir.join("db"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let port = free_port()?;
        let config = serde_json::json!({
            "Name": "baylink-demo",
            "StorageDirectory": dir.join("db"),
            "IndexDirectory": dir.join("db"),
            "HttpPort": port,
            "DicomServerEnabled": false,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "HttpDescribeErrors": true,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        });
        let config_path = dir.join("orthanc.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = dir.join("orthanc.log");
        let log_file =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new("Orthanc");
        command
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::display(&command)))?;
        let mut orthanc = Orthanc {
            port,
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while orthanc.get("/system").is_err() {
            if let Some(status) = orthanc.child()?.try_wait()? {
                bail!(
                    "Orthanc exited ({}) before it answered; its log: {}",
                    cmd::describe(status),
                    orthanc.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Orthanc did not answer within {} s; its log: {}",
                    READY_TIMEOUT.as_secs(),
                    orthanc.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(orthanc)
    }

    fn child(&mut self) -> Result<&mut Child> {
        self.child
            .as_mut()
            .ok_or_else(|| anyhow!("Orthanc is not running"))
    }

    /// The REST API's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The DICOMweb base URL (the gateway's `delivery.url`).
    pub fn dicomweb_url(&self) -> String {
        format!("{}/dicom-web", self.url())
    }

    /// GET `path` of the REST API as JSON.
    pub fn get(&self, path: &str) -> Result<serde_json::Value> {
        let body = curl(&[&format!("{}{path}", self.url())])?;
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// POST `body` to `path` of the REST API; the answer as JSON.
    pub fn post(&self, path: &str, body: &str) -> Result<serde_json::Value> {
        let out = curl(&["--data-binary", body, &format!("{}{path}", self.url())])?;
        serde_json::from_slice(&out).with_context(|| format!("POST {path}: not JSON"))
    }

    /// GET `path` of the REST API as raw bytes.
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        curl(&[&format!("{}{path}", self.url())])
    }

    /// Orthanc's id of the study with StudyInstanceUID `uid`, if it holds it.
    pub fn study_id(&self, uid: &str) -> Result<Option<String>> {
        let found = self.post("/tools/lookup", uid)?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["Type"] == "Study")
            .and_then(|f| f["ID"].as_str())
            .map(str::to_owned))
    }

    /// Orthanc's id of the instance with SOP Instance UID `uid`, if it holds it.
    pub fn instance_id(&self, uid: &str) -> Result<Option<String>> {
        let found = self.post("/tools/lookup", uid)?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["Type"] == "Instance")
            .and_then(|f| f["ID"].as_str())
            .map(str::to_owned))
    }

    /// Lets Orthanc outlive the demo (it keeps serving the study); its pid.
    pub fn leave_running(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs curl with `args` (60 s at most); its output, or an error naming what it said.
pub fn curl(args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "60"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run curl")?;
    if !out.status.success() {
        bail!(
            "curl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}
