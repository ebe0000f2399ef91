//! STOW-RS under a careless or hostile client: a flood of empty parts, a body in 1-byte
//! chunks, more parts than `ingest.stow_max_parts`. The edge stays small (its peak RSS,
//! `VmHWM`, under 256 MiB), logs one line per request, and serves another hospital meanwhile.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use baylink_tests::{Deployment, Service, payload};

use super::ingest::{Api, sequence_uids, transfers};

/// The edge's peak resident set may not exceed this.
const MAX_HWM_KIB: u64 = 256 * 1024;
/// One empty part and the delimiter after it (boundary `b`).
const EMPTY_PART: &[u8] = b"\r\n\r\n\r\n--b";
const STOW_TYPE: &str = "Content-Type: multipart/related; type=\"application/dicom\"; boundary=b";

/// The peak resident set of process `pid` (`VmHWM`, KiB).
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status:\n{status}"))
}

fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(if vr == b"UI" { 0 } else { b' ' });
    }
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&value);
}

/// A Part 10 instance (explicit VR little endian) of `patient` with `filler` short elements
/// before the PatientID: the prefix the edge must walk to route it.
fn instance(patient: &str, uid: &str, filler: u16) -> Vec<u8> {
    const CLASS: &[u8] = b"1.2.840.10008.5.1.4.1.1.7";
    let mut f = vec![0u8; 128];
    f.extend_from_slice(b"DICM");
    element(&mut f, 2, 1, b"OB", &[0, 1]);
    element(&mut f, 2, 2, b"UI", CLASS);
    element(&mut f, 2, 3, b"UI", uid.as_bytes());
    element(&mut f, 2, 0x10, b"UI", b"1.2.840.10008.1.2.1");
    element(&mut f, 8, 0x16, b"UI", CLASS);
    element(&mut f, 8, 0x18, b"UI", uid.as_bytes());
    for i in 0..filler {
        element(&mut f, 8, 0x1000 + i, b"SH", b"AB");
    }
    element(&mut f, 0x10, 0x10, b"PN", b"Doe^Jane");
    element(&mut f, 0x10, 0x20, b"LO", patient.as_bytes());
    element(&mut f, 0x20, 0x0D, b"UI", b"1.2.826.0.1.3680043.2.1125.77");
    element(&mut f, 0x20, 0x0E, b"UI", b"1.2.826.0.1.3680043.2.1125.78");
    element(&mut f, 0x7FE0, 0x10, b"OW", &[7u8; 4096]);
    f
}

/// hospital-b declares, uploads 1 MiB and commits while hospital-a's request runs.
fn other_hospital_uploads(api: &Api<'_>) {
    let d = api.d;
    let dir = d.path("hospital-b");
    std::fs::create_dir_all(&dir).unwrap();
    let f = payload(&dir, "b.bin", 1 << 20, 5).unwrap();
    let a = api.declare(
        "hospital-b",
        r#"{"patient_id":"P-0002","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
    );
    assert_eq!(a.status, 201, "hospital-b's declaration: {a:?}");
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let r = api.put("hospital-b", &id, "b.bin", &f, &[]);
    assert_eq!(r.status, 201, "hospital-b's upload: {r:?}");
    let c = api.commit("hospital-b", &id);
    assert_eq!(c.status, 202, "hospital-b's commit: {c:?}");
}

/// A STOW-RS request by hospital-a whose body curl reads from a pipe (chunked): `first`,
/// then empty parts until at least `min_parts` are written and `stop` is set (or the edge
/// stops reading), then the closing delimiter.
struct Flood {
    curl: Child,
    writer: JoinHandle<u64>,
    out: std::path::PathBuf,
    headers: std::path::PathBuf,
}

impl Flood {
    fn start(
        d: &Deployment,
        first: &[u8],
        min_parts: u64,
        stop: Arc<AtomicBool>,
        max_time: &str,
    ) -> Flood {
        let out = d.path("flood.out");
        let headers = d.path("flood.headers");
        let url = format!("https://127.0.0.1:{}/dicom-web/studies", d.base_port);
        let mut curl = Command::new("curl")
            .args(["-sS", "--max-time", max_time, "--cacert"])
            .arg(d.path("pki/ca.pem"))
            .arg("--cert")
            .arg(d.path("pki/hospital-a.pem"))
            .arg("--key")
            .arg(d.path("pki/hospital-a.key"))
            .args([
                "-X",
                "POST",
                "-H",
                STOW_TYPE,
                "-H",
                "Expect:",
                "-T",
                "-",
                "-w",
                "%{http_code}",
            ])
            .arg("-o")
            .arg(&out)
            .arg("-D")
            .arg(&headers)
            .arg(url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = curl.stdin.take().unwrap();
        let mut head = b"--b\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        head.extend_from_slice(first);
        head.extend_from_slice(b"\r\n--b");
        let block = EMPTY_PART.repeat(64 * 1024 / EMPTY_PART.len());
        let per_block = (block.len() / EMPTY_PART.len()) as u64;
        let writer = std::thread::spawn(move || {
            let mut parts = 0u64;
            let mut go = || -> std::io::Result<()> {
                stdin.write_all(&head)?;
                while parts < min_parts || !stop.load(Ordering::Relaxed) {
                    stdin.write_all(&block)?;
                    parts += per_block;
                }
                stdin.write_all(b"--\r\n")
            };
            // A write fails once the edge has answered and curl stopped sending: that ends it.
            let _ = go();
            parts
        });
        Flood {
            curl,
            writer,
            out,
            headers,
        }
    }

    /// Parts written, and the answer: status, body, headers.
    fn finish(self) -> (u64, u16, String, String) {
        let parts = self.writer.join().unwrap();
        let done = self.curl.wait_with_output().unwrap();
        let status = String::from_utf8_lossy(&done.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let body = std::fs::read_to_string(&self.out).unwrap_or_default();
        let headers = std::fs::read_to_string(&self.headers).unwrap_or_default();
        (parts, status, body, headers)
    }
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Lines of the edge's log about STOW-RS.
fn stow_log_lines(edge: &Service) -> Vec<String> {
    edge.log()
        .lines()
        .filter(|l| l.contains("STOW-RS"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn stow_flood_of_empty_parts_keeps_the_edge_small_and_serves_others() {
    let d = Deployment::new().unwrap();
    // No part limit in the way: the whole flood is read, failed parts only counted.
    d.set("edge.toml", "ingest", "stow_max_parts", "10000000")
        .unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };

    let stop = Arc::new(AtomicBool::new(false));
    let flood = Flood::start(&d, b"", 400_000, stop.clone(), "300");
    other_hospital_uploads(&api);
    stop.store(true, Ordering::Relaxed);
    let (parts, status, body, headers) = flood.finish();

    // What the user cares about first: the edge's memory and its log.
    let total = parts + 1;
    let hwm = vm_hwm_kib(edge.pid());
    let lines = stow_log_lines(&edge);
    eprintln!(
        "flood: {total} empty parts, edge VmHWM {hwm} KiB, {} STOW-RS log lines",
        lines.len()
    );
    assert!(
        hwm < MAX_HWM_KIB,
        "the edge peaked at {hwm} KiB for {total} parts"
    );
    assert_eq!(
        lines.len(),
        1,
        "one log line for the request: {:?}",
        &lines[..lines.len().min(5)]
    );
    assert!(
        lines[0].contains(&format!("parts={total}")) && lines[0].contains("malformed="),
        "{}",
        lines[0]
    );

    assert_eq!(status, 409, "nothing stored: {body}\n{headers}");
    // The first part (empty too) and every empty one failed; 1 000 are listed, all counted.
    assert_eq!(
        header(&headers, "x-baylink-failed-count"),
        Some(total.to_string().as_str()),
        "{headers}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let failed = sequence_uids(&v, "00081198");
    assert_eq!(failed.len(), 1000);
    assert!(failed.iter().all(|f| f.1 == Some(0xC000)), "{failed:?}");
}

#[test]
fn stow_over_the_part_limit_is_refused_with_413_and_nothing_kept() {
    let d = Deployment::new().unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };

    // A good instance (the transfer is declared), then three times the limit of empty parts.
    let first = instance("P-0001", "1.2.826.0.1.3680043.2.1125.5.1", 4);
    // A fixed body (stop is set from the start): the edge reads it all, draining after the
    // limit, so curl reads the answer rather than a reset.
    let flood = Flood::start(&d, &first, 30_000, Arc::new(AtomicBool::new(true)), "60");
    other_hospital_uploads(&api);
    let (parts, status, body, _) = flood.finish();

    assert_eq!(status, 413, "{body}\n{}", edge.log());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["limit"], "ingest.stow_max_parts", "{v}");
    assert!(v["error"].as_str().unwrap().contains("10000 parts"), "{v}");
    assert!(parts >= 30_000);
    // The declared transfer was dropped with its instance: only hospital-b's is in the spool.
    assert_eq!(transfers(&d).len(), 1, "{:?}", transfers(&d));
    let hwm = vm_hwm_kib(edge.pid());
    assert!(hwm < MAX_HWM_KIB, "the edge peaked at {hwm} KiB");
    let lines = stow_log_lines(&edge);
    assert_eq!(lines.len(), 1, "one log line for the request: {lines:?}");
    assert!(lines[0].contains("status=413"), "{}", lines[0]);
}

/// Sends a STOW-RS request whose body travels in 1-byte HTTP chunks, through `openssl
/// s_client` (curl cannot be told how to cut a body): the raw answer.
fn stow_in_one_byte_chunks(d: &Deployment, body: &[u8]) -> String {
    let mut s = Command::new("timeout")
        .args(["120", "openssl", "s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{}", d.base_port))
        .arg("-CAfile")
        .arg(d.path("pki/ca.pem"))
        .arg("-cert")
        .arg(d.path("pki/hospital-a.pem"))
        .arg("-key")
        .arg(d.path("pki/hospital-a.key"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut request = format!(
        "POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n{STOW_TYPE}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for b in body {
        request.extend_from_slice(b"1\r\n");
        request.push(*b);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut stdin = s.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&request));
    let out = s.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn stow_in_one_byte_chunks_parses_the_prefix_once() {
    let d = Deployment::new().unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };

    // 300 KiB of short elements before the PatientID, every byte its own chunk: a parse from
    // the start after each chunk would walk 30 000 elements 300 000 times.
    let first = instance("P-0001", "1.2.826.0.1.3680043.2.1125.6.1", 30_000);
    let mut body = b"--b\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    body.extend_from_slice(&first);
    body.extend_from_slice(b"\r\n--b");
    for _ in 0..1000 {
        body.extend_from_slice(EMPTY_PART);
    }
    body.extend_from_slice(b"--\r\n");

    let upload = std::thread::scope(|s| {
        let other = s.spawn(|| other_hospital_uploads(&api));
        let answer = stow_in_one_byte_chunks(&d, &body);
        other.join().unwrap();
        answer
    });
    let status_line = upload.lines().next().unwrap_or_default();
    assert!(status_line.starts_with("HTTP/1.1 202"), "answer: {upload}");
    assert!(
        upload
            .to_ascii_lowercase()
            .contains("x-baylink-failed-count: 1000"),
        "{upload}"
    );
    let hwm = vm_hwm_kib(edge.pid());
    eprintln!(
        "1-byte chunks: {} body bytes, edge VmHWM {hwm} KiB",
        body.len()
    );
    assert!(hwm < MAX_HWM_KIB, "the edge peaked at {hwm} KiB");
    let lines = stow_log_lines(&edge);
    assert_eq!(lines.len(), 1, "one log line for the request: {lines:?}");
    assert!(lines[0].contains("stored=1"), "{}", lines[0]);
}

#[test]
fn stow_cut_off_mid_body_leaves_no_transfer_open() {
    let d = Deployment::new().unwrap();
    let _edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    // One good instance (the transfer is declared and the instance stored), then the body
    // ends without the closing delimiter.
    let mut body = b"--b\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    body.extend_from_slice(&instance("P-0001", "1.2.826.0.1.3680043.2.1125.7.1", 4));
    body.extend_from_slice(b"\r\n--b\r\nContent-Type: application/dicom\r\n\r\nDICM");
    let path = d.path("cut.body");
    std::fs::write(&path, body).unwrap();
    let data = format!("@{}", path.display());
    let url = api.url("/dicom-web/studies");
    let a = api.curl(
        Some("hospital-a"),
        &["-X", "POST", "-H", STOW_TYPE, "--data-binary", &data, &url],
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.body.contains("closing boundary"), "{a:?}");
    assert!(transfers(&d).is_empty(), "{:?}", transfers(&d));
}
