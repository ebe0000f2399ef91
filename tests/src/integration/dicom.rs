//! The edge's DICOM C-STORE SCP, driven by dcmtk's real SCUs (`echoscu`, `storescu`,
//! `dcmsend`) against a running edge and gateway. Test instances are made in the test from a
//! text dump with `dump2dcm` (small CT images with 16x16 pixel data).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::ingest::transfers;
use baylink_tests::{Deployment, EVENT_WAIT, Service};

/// The SOP Instance UID of test instance `n`.
pub(super) fn sop_uid(n: u32) -> String {
    format!("1.2.826.0.1.3680043.10.543.{n}")
}

/// Writes a small CT instance for `patient` with dump2dcm; `patient = None` leaves PatientID
/// out (a data set the SCP cannot use).
pub(super) fn instance(dir: &Path, n: u32, patient: Option<&str>) -> PathBuf {
    instance_named(dir, n, patient, &format!("Test^Patient{n}"))
}

/// [`instance`] with PatientName (0010,0010) `name`.
pub(super) fn instance_named(dir: &Path, n: u32, patient: Option<&str>, name: &str) -> PathBuf {
    let pixels: Vec<String> = (0..256u32)
        .map(|i| format!("{:04x}", (i * 37 + n) & 0xffff))
        .collect();
    let patient_line = patient
        .map(|p| format!("(0010,0020) LO {p}\n"))
        .unwrap_or_default();
    let dump = format!(
        "(0002,0010) UI =LittleEndianExplicit\n\
         (0008,0016) UI =CTImageStorage\n\
         (0008,0018) UI {uid}\n\
         (0008,0060) CS CT\n\
         (0010,0010) PN {name}\n\
         {patient_line}\
         (0020,000d) UI 1.2.826.0.1.3680043.10.543.100\n\
         (0020,000e) UI 1.2.826.0.1.3680043.10.543.101\n\
         (0028,0002) US 1\n\
         (0028,0004) CS MONOCHROME2\n\
         (0028,0010) US 16\n\
         (0028,0011) US 16\n\
         (0028,0100) US 16\n\
         (0028,0101) US 16\n\
         (0028,0102) US 15\n\
         (0028,0103) US 0\n\
         (7fe0,0010) OW {px}\n",
        uid = sop_uid(n),
        px = pixels.join("\\"),
    );
    std::fs::create_dir_all(dir).unwrap();
    let txt = dir.join(format!("i{n}.dump"));
    let dcm = dir.join(format!("i{n}.dcm"));
    std::fs::write(&txt, dump).unwrap();
    let out = run(Command::new("dump2dcm").arg(&txt).arg(&dcm));
    assert!(out.status.success(), "dump2dcm: {}", text(&out));
    dcm
}

/// Runs a dcmtk tool with its network time-outs bounded.
pub(super) fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("dcmtk tool runs")
}

/// How many C-STORE responses `storescu -v` reported with `status`, as it prints them
/// (`Success`, `Unknown Status: 0x124` for refused: not authorised, ...).
pub(super) fn store_responses(storescu_output: &str, status: &str) -> usize {
    storescu_output
        .matches(&format!("Received Store Response ({status})"))
        .count()
}

pub(super) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// dcmtk SCU arguments shared by every call: AE titles, time-outs, address.
pub(super) fn scu(tool: &str, d: &Deployment, calling: &str, called: &str) -> Command {
    let mut c = Command::new(tool);
    c.args([
        "-aet", calling, "-aec", called, "-to", "20", "-ta", "20", "-td", "20",
    ]);
    c.arg("127.0.0.1").arg((d.base_port + 4).to_string());
    c
}

pub(super) fn start(d: &Deployment) -> (Service, Service) {
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let edge = d.serve(&d.edge_config()).expect("edge starts");
    (gateway, edge)
}

/// The transfer directories under `delivered/`.
/// Transfers in the edge spool (hidden scratch directories aside).
pub(super) fn spool_transfers(d: &Deployment) -> usize {
    transfers(d).len()
}

pub(super) fn delivered_transfers(d: &Deployment) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(d.path("delivered"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Waits (60 s at most) until a delivered transfer holds exactly `names`; returns its dir.
pub(super) fn wait_for_delivery(d: &Deployment, names: &[String], edge: &Service) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut want: Vec<_> = names.to_vec();
    want.sort();
    loop {
        for t in delivered_transfers(d) {
            let mut got: Vec<String> = std::fs::read_dir(&t)
                .unwrap()
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            got.sort();
            if got == want {
                return t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no transfer with {want:?} delivered within 60 s; delivered: {:?}\nedge log:\n{}",
            delivered_transfers(d),
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The data set of a Part-10 file: what follows the preamble, `DICM` and the meta group.
pub(super) fn data_set(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[128..132], b"DICM", "{} is not Part-10", path.display());
    assert_eq!(
        &b[132..136],
        &[2, 0, 0, 0],
        "meta group starts with (0002,0000)"
    );
    let group_len = u32::from_le_bytes(b[140..144].try_into().unwrap()) as usize;
    b[144 + group_len..].to_vec()
}

/// The meta group's Transfer Syntax UID, via dcmdump (an independent parser).
pub(super) fn dump(path: &Path) -> String {
    let out = run(Command::new("dcmdump").arg(path));
    assert!(
        out.status.success(),
        "dcmdump {}: {}",
        path.display(),
        text(&out)
    );
    text(&out)
}

/// `GET /healthz` on the edge's metrics port.
pub(super) fn edge_healthy(d: &Deployment) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", d.base_port + 1)) else {
        return false;
    };
    s.set_read_timeout(Some(EVENT_WAIT)).unwrap();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.1 200")
}

#[test]
fn echo_succeeds_and_unknown_ae_titles_are_rejected() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);

    for calling in ["STORESCU", "HOSPITAL-A"] {
        let out = run(&mut scu("echoscu", &d, calling, "BAYLINK"));
        assert!(out.status.success(), "echo as {calling}: {}", text(&out));
    }

    let out = run(&mut scu("echoscu", &d, "STORESCU", "NOT-BAYLINK"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("Called AE Title Not Recognized"),
        "{}",
        text(&out)
    );

    let out = run(&mut scu("echoscu", &d, "INTRUDER", "BAYLINK"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&out)
    );
    let log = edge.log();
    assert!(
        log.lines().any(|l| l.contains("association rejected")
            && l.contains("calling_ae=\"INTRUDER\"")
            && l.contains("ip=127.0.0.1")),
        "the refusal is logged with AE title and address:\n{log}"
    );

    // Still serving.
    let out = run(&mut scu("echoscu", &d, "STORESCU", "BAYLINK"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(edge_healthy(&d));
    assert!(delivered_transfers(&d).is_empty());
}

#[test]
fn storescu_association_becomes_one_transfer_with_identical_data_sets() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    // The first instance is the longest: the SCP's scratch file, rewritten in place for each
    // instance, still holds its tail while the next ones arrive.
    let mut files = vec![instance_named(
        &src,
        1,
        Some("P-0001"),
        "Test^Patient1^With^A^Much^Longer^Name",
    )];
    files.extend((2..=3).map(|n| instance(&src, n, Some("P-0001"))));
    assert!(
        std::fs::metadata(&files[0]).unwrap().len() > std::fs::metadata(&files[1]).unwrap().len()
    );

    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .arg("-v")
        .args(&files));
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 3, "{t}");

    let names: Vec<_> = (1..=3).map(|n| format!("{}.dcm", sop_uid(n))).collect();
    let t = wait_for_delivery(&d, &names, &edge);
    assert_eq!(
        delivered_transfers(&d).len(),
        1,
        "one association, one transfer"
    );
    for (n, src) in (1..=3).zip(&files) {
        let got = t.join(format!("{}.dcm", sop_uid(n)));
        // The SCP writes its own file meta group (its implementation UID), so the meta group
        // differs; the data set (PatientID, UIDs, pixel data and all) must be byte-identical,
        // since the same transfer syntax (explicit VR little endian) was negotiated.
        assert_eq!(
            data_set(&got),
            data_set(src),
            "data set of instance {n} differs"
        );
        let meta = dump(&got);
        assert!(
            meta.contains("(0002,0010) UI =LittleEndianExplicit"),
            "{meta}"
        );
        assert!(
            meta.contains(&format!("(0002,0003) UI [{}]", sop_uid(n))),
            "{meta}"
        );
        assert!(meta.contains("(0010,0020) LO [P-0001]"), "{meta}");
    }
    // The received scratch copies are gone (their bytes live in the one sealed transfer).
    assert_eq!(count_dir(&d.path("spool/edge/.incoming")), 0);
    assert_eq!(spool_transfers(&d), 1);
}

#[test]
fn instances_over_the_policy_file_limit_fail_before_their_success_status() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "policy", "max_files", "2").unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let files: Vec<_> = (71..=73)
        .map(|n| instance(&src, n, Some("P-0001")))
        .collect();
    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .args(["-v", "-nh"])
        .args(&files));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 2, "{t}");
    // The third would break policy.max_files: refused (0x0124) before it was acknowledged,
    // never accepted and then dropped at A-RELEASE.
    assert_eq!(store_responses(&t, "Unknown Status: 0x124"), 1, "{t}");
    let names: Vec<_> = (71..=72).map(|n| format!("{}.dcm", sop_uid(n))).collect();
    wait_for_delivery(&d, &names, &edge);
    let records = std::fs::read_to_string(d.path("audit/edge/records.log")).unwrap();
    assert!(
        records
            .lines()
            .any(|l| l.contains("\"refused\"") && l.contains("size-limit")),
        "{records}"
    );
    // The refused instance was written into the transfer as it arrived: nothing of it is
    // left there.
    wait_parts_empty(&d);
}

#[test]
fn dcmsend_works_too() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let f = instance(&d.path("instances"), 7, Some("P-0002"));
    let out = run(scu("dcmsend", &d, "HOSPITAL-A", "BAYLINK").arg(&f));
    assert!(out.status.success(), "{}", text(&out));
    let t = wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(7))], &edge);
    assert_eq!(
        data_set(&t.join(format!("{}.dcm", sop_uid(7)))),
        data_set(&f)
    );
}

#[test]
fn refused_and_malformed_instances_get_failure_statuses_and_the_rest_proceeds() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let no_consent = instance(&src, 9, Some("P-0099"));
    let no_patient = instance(&src, 10, None);
    let other_patient = instance(&src, 11, Some("P-0002"));
    let good: Vec<_> = [1, 2].map(|n| instance(&src, n, Some("P-0001"))).to_vec();

    // 1. An association with only the patient without consent: storescu stops at the
    //    failure (its default) and exits non-zero; nothing is sent.
    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .arg("-v")
        .arg(&no_consent));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("0x124"),
        "status 0x0124 reported: {}",
        text(&out)
    );
    // Audited before it was answered, as the HTTPS door records a refused declaration: the
    // rule and the hospital, the patient only as its keyed hash.
    let refused: Vec<_> = super::compliance::audit_records(&d, "edge")
        .into_iter()
        .filter(|r| r["kind"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["rule"], "consent-missing", "{refused:?}");
    assert_eq!(refused[0]["hospital"], "hospital-a", "{refused:?}");
    assert!(!refused[0].to_string().contains("P-0099"), "{refused:?}");

    // 2. A mixed association (storescu --no-halt): bad ones refused, good ones proceed.
    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .args(["-v", "-nh"])
        .arg(&no_consent)
        .arg(&good[0])
        .arg(&no_patient)
        .arg(&other_patient)
        .arg(&good[1])
        .arg(&good[1]));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 2, "{t}");
    // No consent and another patient than the association's: 0x0124 (refused: not authorized).
    assert_eq!(store_responses(&t, "Unknown Status: 0x124"), 2, "{t}");
    // No PatientID: 0xC000 (cannot understand).
    assert!(store_responses(&t, "Error: CannotUnderstand") > 0, "{t}");
    // The same instance twice: 0x0111 (duplicate SOP instance).
    assert!(store_responses(&t, "Unknown Status: 0x111") > 0, "{t}");

    let names: Vec<_> = [1, 2].map(|n| format!("{}.dcm", sop_uid(n))).to_vec();
    wait_for_delivery(&d, &names, &edge);
    // Exactly one transfer in the spool and at the destination: the refused-only association
    // sent nothing, and nothing of the refused instances went anywhere.
    assert_eq!(delivered_transfers(&d).len(), 1);
    assert_eq!(spool_transfers(&d), 1);
    // The log names the rule, never the patient.
    let log = edge.log();
    assert!(log.contains("rule consent-missing"), "{log}");
    assert!(!log.contains("P-0099"), "{log}");

    assert!(edge_healthy(&d));
    let out = run(&mut scu("echoscu", &d, "STORESCU", "BAYLINK"));
    assert!(out.status.success(), "{}", text(&out));
}

/// A minimal SCU speaking the upper layer protocol directly, to send what dcmtk will not:
/// a data set that is not DICOM, an A-ABORT, a connection dropped mid-instance.
pub(super) struct RawScu {
    s: std::net::TcpStream,
}

const CT_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

fn item(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![kind, 0];
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn ae(title: &str) -> [u8; 16] {
    let mut a = [b' '; 16];
    a[..title.len()].copy_from_slice(title.as_bytes());
    a
}

/// An implicit VR little endian element of group 0000.
fn cmd_element(out: &mut Vec<u8>, element: u16, value: &[u8]) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(&v);
}

impl RawScu {
    /// Associates as `calling` with one presentation context (id 1): CT image, explicit LE.
    pub(super) fn associate(d: &Deployment, calling: &str) -> RawScu {
        let s = std::net::TcpStream::connect(("127.0.0.1", d.base_port + 4)).unwrap();
        s.set_read_timeout(Some(EVENT_WAIT)).unwrap();
        let mut body = Vec::new();
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&ae("BAYLINK"));
        body.extend_from_slice(&ae(calling));
        body.extend_from_slice(&[0; 32]);
        body.extend(item(0x10, b"1.2.840.10008.3.1.1.1"));
        let mut pc = vec![1, 0, 0, 0];
        pc.extend(item(0x30, CT_IMAGE.as_bytes()));
        pc.extend(item(0x40, EXPLICIT_LE.as_bytes()));
        body.extend(item(0x20, &pc));
        let mut user = item(0x51, &16384u32.to_be_bytes());
        user.extend(item(0x52, b"1.2.826.0.1.3680043.10.543.9999"));
        body.extend(item(0x50, &user));
        let mut scu = RawScu { s };
        scu.send_pdu(0x01, &body);
        let (kind, ac) = scu.read_pdu();
        assert_eq!(kind, 0x02, "association accepted");
        // Presentation context result item: reason byte 0 = acceptance.
        let pos = ac.iter().position(|&b| b == 0x21).expect("context result");
        assert_eq!(ac[pos + 6], 0, "presentation context accepted");
        scu
    }

    fn send_pdu(&mut self, kind: u8, body: &[u8]) {
        let mut p = vec![kind, 0];
        p.extend_from_slice(&(body.len() as u32).to_be_bytes());
        p.extend_from_slice(body);
        self.s.write_all(&p).unwrap();
    }

    fn read_pdu(&mut self) -> (u8, Vec<u8>) {
        let mut h = [0u8; 6];
        self.s.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[2..6].try_into().unwrap()) as usize;
        assert!(len < 1 << 20);
        let mut b = vec![0; len];
        self.s.read_exact(&mut b).unwrap();
        (h[0], b)
    }

    /// One PDV in one P-DATA-TF PDU.
    pub(super) fn pdv(&mut self, command: bool, last: bool, data: &[u8]) {
        let mut body = Vec::new();
        body.extend_from_slice(&(data.len() as u32 + 2).to_be_bytes());
        body.push(1);
        body.push(u8::from(command) | (u8::from(last) << 1));
        body.extend_from_slice(data);
        self.send_pdu(0x04, &body);
    }

    pub(super) fn store_command(&mut self, message_id: u16, sop_instance: &str) {
        let mut c = Vec::new();
        cmd_element(&mut c, 0x0002, CT_IMAGE.as_bytes());
        cmd_element(&mut c, 0x0100, &1u16.to_le_bytes());
        cmd_element(&mut c, 0x0110, &message_id.to_le_bytes());
        cmd_element(&mut c, 0x0700, &0u16.to_le_bytes());
        cmd_element(&mut c, 0x0800, &0u16.to_le_bytes());
        cmd_element(&mut c, 0x1000, sop_instance.as_bytes());
        let mut full = Vec::new();
        cmd_element(&mut full, 0x0000, &(c.len() as u32).to_le_bytes());
        full.extend(c);
        self.pdv(true, true, &full);
    }

    /// C-STORE of `data_set` (split in two fragments); returns the response status.
    pub(super) fn store(&mut self, message_id: u16, sop_instance: &str, data_set: &[u8]) -> u16 {
        self.store_command(message_id, sop_instance);
        let half = data_set.len() / 2;
        self.pdv(false, false, &data_set[..half]);
        self.pdv(false, true, &data_set[half..]);
        let (kind, body) = self.read_pdu();
        assert_eq!(kind, 0x04, "P-DATA response");
        // PDV header (4 length + 1 id + 1 control), then the command set: find (0000,0900).
        let cmd = &body[6..];
        let mut pos = 0;
        while pos + 8 <= cmd.len() {
            let element = u16::from_le_bytes([cmd[pos + 2], cmd[pos + 3]]);
            let len = u32::from_le_bytes(cmd[pos + 4..pos + 8].try_into().unwrap()) as usize;
            if element == 0x0900 {
                return u16::from_le_bytes([cmd[pos + 8], cmd[pos + 9]]);
            }
            pos += 8 + len;
        }
        panic!("no status in the response");
    }

    pub(super) fn release(mut self) {
        self.send_pdu(0x05, &[0; 4]);
        let (kind, _) = self.read_pdu();
        assert_eq!(kind, 0x06, "A-RELEASE-RP");
    }

    pub(super) fn abort(mut self) {
        self.send_pdu(0x07, &[0; 4]);
    }

    /// Waits (the read timeout at most) for the edge to end the association on its own: the
    /// type of the PDU it sends (0x07 for A-ABORT), or `None` if the connection closes or
    /// stays silent.
    pub(super) fn wait_for_end(mut self) -> Option<u8> {
        let mut h = [0u8; 6];
        self.s.read_exact(&mut h).ok().map(|()| h[0])
    }
}

pub(super) fn count_dir(p: &Path) -> usize {
    std::fs::read_dir(p).map(|r| r.count()).unwrap_or(0)
}

/// Waits until no part file is left in the edge's transfers.
fn wait_parts_empty(d: &Deployment) {
    let deadline = Instant::now() + EVENT_WAIT;
    while left_in_parts(d) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} part files left in the edge's transfers",
            left_in_parts(d)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every instance after an association's first is written into its transfer as it
/// arrives: one cut off a few MiB in has a part file in the transfer while it arrives (not
/// only a scratch copy), and once the connection drops nothing of it is left, stored or sent.
#[test]
fn an_instance_cut_off_while_it_is_written_into_the_transfer_leaves_nothing() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let ds: Vec<_> = (1..=2)
        .map(|n| data_set(&instance(&src, n, Some("P-0001"))))
        .collect();
    // Instance 2's data set up to its pixel data, which then declares 8 MiB.
    let at = ds[1]
        .windows(6)
        .position(|w| w == [0xe0, 0x7f, 0x10, 0x00, b'O', b'W'])
        .expect("pixel data");
    let mut head = ds[1][..at].to_vec();
    head.extend_from_slice(&[0xe0, 0x7f, 0x10, 0x00, b'O', b'W', 0, 0]);
    head.extend_from_slice(&(8u32 << 20).to_le_bytes());

    let mut scu = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(scu.store(1, &sop_uid(1), &ds[0]), 0x0000);
    scu.store_command(2, &sop_uid(2));
    scu.pdv(false, false, &head);
    // 3 MiB of the pixel data: several spool buffers' writes started.
    let piece = vec![0u8; 32 << 10];
    for _ in 0..96 {
        scu.pdv(false, false, &piece);
    }
    let deadline = Instant::now() + EVENT_WAIT;
    while left_in_parts(&d) == 0 {
        assert!(
            Instant::now() < deadline,
            "no part file in the transfer while the instance arrives"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(scu);

    let t = wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(1))], &edge);
    assert_eq!(data_set(&t.join(format!("{}.dcm", sop_uid(1)))), ds[0]);
    wait_parts_empty(&d);
    assert!(edge_healthy(&d));
}

/// A limit the store meets while an instance is written into its transfer is answered only
/// once the instance has passed the SCP's own checks, as when instances were handed over
/// whole after them: one of another patient is refused as such (0x0124, recorded), one of
/// the right patient gets Out of Resources (0xA700); neither is stored or sent.
#[test]
fn a_store_limit_met_while_an_instance_arrives_is_answered_after_its_checks() {
    let d = Deployment::new().unwrap();
    // Room for one small instance and part of another.
    d.set("edge.toml", "quota", "max_spool_bytes", "2000")
        .unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let ds: Vec<_> = [(1, "P-0001"), (2, "P-0002"), (3, "P-0001")]
        .into_iter()
        .map(|(n, p)| data_set(&instance(&src, n, Some(p))))
        .collect();
    let mut scu = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(scu.store(1, &sop_uid(1), &ds[0]), 0x0000);
    assert_eq!(scu.store(2, &sop_uid(2), &ds[1]), 0x0124, "{}", edge.log());
    assert_eq!(scu.store(3, &sop_uid(3), &ds[2]), 0xA700, "{}", edge.log());
    scu.release();

    wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(1))], &edge);
    let records = std::fs::read_to_string(d.path("audit/edge/records.log")).unwrap();
    assert!(
        records
            .lines()
            .any(|l| l.contains("\"refused\"") && l.contains("patient-mismatch")),
        "{records}"
    );
    assert!(
        edge.log()
            .contains("the store failed the instance while it arrived"),
        "{}",
        edge.log()
    );
    wait_parts_empty(&d);
}

/// Files in the `parts/` directories of the edge's transfers: instances being written, or
/// left behind.
fn left_in_parts(d: &Deployment) -> usize {
    transfers(d)
        .iter()
        .map(|t| count_dir(&t.join("parts")))
        .sum()
}

#[test]
fn malformed_data_set_fails_alone_and_abort_or_drop_still_sends_what_was_acknowledged() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let files: Vec<_> = (1..=4).map(|n| instance(&src, n, Some("P-0001"))).collect();
    let ds: Vec<_> = files.iter().map(|f| data_set(f)).collect();
    let garbage = vec![0xffu8; 300];

    // Aborted association: two good instances were accepted, then A-ABORT: both are sent.
    let mut a = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(a.store(1, &sop_uid(1), &ds[0]), 0x0000);
    assert_eq!(a.store(2, &sop_uid(2), &ds[1]), 0x0000);
    a.abort();

    // Dropped connection in the middle of an instance: the instance before it is sent, the
    // unfinished one is not.
    let mut b = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(b.store(1, &sop_uid(3), &ds[2]), 0x0000);
    b.store_command(2, &sop_uid(4));
    b.pdv(false, false, &ds[3][..100]);
    drop(b);

    // A data set that is not DICOM gets 0xC000; the instances around it proceed.
    let mut c = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(c.store(1, &sop_uid(4), &ds[3]), 0x0000);
    assert_eq!(
        c.store(2, "1.2.826.0.1.3680043.10.543.77", &garbage),
        0xC000
    );
    // A data set whose SOP Instance UID differs from the command's: 0xA900.
    assert_eq!(c.store(3, "1.2.826.0.1.3680043.10.543.78", &ds[0]), 0xA900);
    // A data set claiming a 3.5 GiB element ahead of the PatientID: 0xC000, checked before
    // anything is allocated for it.
    let mut huge = Vec::new();
    for (element, uid) in [
        (0x0016u16, CT_IMAGE),
        (0x0018, "1.2.826.0.1.3680043.10.543.79"),
    ] {
        let mut v = uid.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        huge.extend_from_slice(&0x0008u16.to_le_bytes());
        huge.extend_from_slice(&element.to_le_bytes());
        huge.extend_from_slice(b"UI");
        huge.extend_from_slice(&(v.len() as u16).to_le_bytes());
        huge.extend_from_slice(&v);
    }
    huge.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
    huge.extend_from_slice(&0xE000_0000u32.to_le_bytes());
    huge.extend_from_slice(&[0; 64]);
    assert_eq!(c.store(6, "1.2.826.0.1.3680043.10.543.79", &huge), 0xC000);
    assert!(edge.log().contains("(0009,1010) declares 3758096384 bytes"));
    // A SOP Instance UID that would escape the transfer directory: 0xC000.
    assert_eq!(c.store(4, "../../etc/passwd", &ds[1]), 0xC000);
    assert_eq!(c.store(5, &sop_uid(3), &ds[2]), 0x0000);
    c.release();

    let t = wait_for_delivery(
        &d,
        &[format!("{}.dcm", sop_uid(3)), format!("{}.dcm", sop_uid(4))],
        &edge,
    );
    assert_eq!(data_set(&t.join(format!("{}.dcm", sop_uid(4)))), ds[3]);
    let t = wait_for_delivery(
        &d,
        &[format!("{}.dcm", sop_uid(1)), format!("{}.dcm", sop_uid(2))],
        &edge,
    );
    assert_eq!(data_set(&t.join(format!("{}.dcm", sop_uid(2)))), ds[1]);
    let t = wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(3))], &edge);
    assert_eq!(data_set(&t.join(format!("{}.dcm", sop_uid(3)))), ds[2]);
    assert_eq!(
        delivered_transfers(&d).len(),
        3,
        "each association sent what was answered Success"
    );
    let log = edge.log();
    assert_eq!(
        log.matches("association aborted; the instances answered Success are sealed and sent")
            .count(),
        2,
        "{log}"
    );
    // Scratch is empty, no association left an open transfer behind (the spool holds only
    // the transfers that were delivered), and nothing of an instance that failed or was cut
    // off is left in its transfer: every instance after an association's first is written
    // into the transfer as it arrives, and dropping it must remove its part file.
    let deadline = Instant::now() + EVENT_WAIT;
    while count_dir(&d.path("spool/edge/.incoming")) > 0
        || spool_transfers(&d) != delivered_transfers(&d).len()
        || left_in_parts(&d) > 0
    {
        assert!(
            Instant::now() < deadline,
            "scratch, abandoned transfers or partial instances not cleaned up ({} part files)",
            left_in_parts(&d)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(edge_healthy(&d));
}

/// `dcmdump` of the data set only (what follows the meta group), for comparing parsed data
/// sets independently of their byte encoding.
fn dumped_data_set(path: &Path) -> String {
    let all = dump(path);
    let start = all
        .find("# Dicom-Data-Set")
        .unwrap_or_else(|| panic!("no data set in {}:\n{all}", path.display()));
    all[start..].to_owned()
}

/// Reads `(0002,0010) UI =Name` from a dcmdump listing.
fn transfer_syntax(path: &Path) -> String {
    dump(path)
        .lines()
        .find(|l| l.starts_with("(0002,0010)"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn compressed_deflated_and_implicit_transfer_syntaxes_pass_through_unchanged() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let conv = d.path("converted");
    std::fs::create_dir_all(&conv).unwrap();
    let mut files = Vec::new();
    for (n, tool, opts) in [
        (1, "dcmconv", &["+td"][..]),
        (2, "dcmconv", &["+ti"][..]),
        (3, "dcmcrle", &[][..]),
        (4, "dcmcjpeg", &[][..]),
    ] {
        let plain = instance(&src, n, Some("P-0001"));
        let out_file = conv.join(format!("i{n}.dcm"));
        let out = run(Command::new(tool).args(opts).arg(&plain).arg(&out_file));
        assert!(out.status.success(), "{tool}: {}", text(&out));
        files.push(out_file);
    }
    let expected: Vec<_> = files.iter().map(|f| transfer_syntax(f)).collect();
    assert_eq!(
        expected,
        [
            "=DeflatedLittleEndianExplicit",
            "=LittleEndianImplicit",
            "=RLELossless",
            "=JPEGLossless:Non-hierarchical-1stOrderPrediction"
        ]
    );

    // One association per file, each proposing that file's transfer syntax (storescu would
    // otherwise re-encode to an uncompressed one): one transfer each.
    for (n, (file, option)) in (1..=4).zip(files.iter().zip(["-xd", "-xi", "-xr", "-xs"])) {
        let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
            .args(["-v", option])
            .arg(file));
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(store_responses(&t, "Success") > 0, "{t}");
        let got = wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(n))], &edge)
            .join(format!("{}.dcm", sop_uid(n)));
        // The relay never re-encodes: same transfer syntax, same parsed data set (pixel data
        // included), and the same bytes.
        assert_eq!(
            transfer_syntax(&got),
            expected[n as usize - 1],
            "instance {n}"
        );
        assert_eq!(dumped_data_set(&got), dumped_data_set(file), "instance {n}");
        if n != 1 {
            // storescu re-deflates; the others are sent as stored.
            assert_eq!(data_set(&got), data_set(file), "instance {n} bytes");
        }
    }
    assert_eq!(delivered_transfers(&d).len(), 4);
}

#[test]
fn association_limit_and_idle_timeout_hold() {
    let d = Deployment::new().unwrap();
    d.set("edge.toml", "ingest", "dicom_max_associations", "1")
        .unwrap();
    d.set("edge.toml", "ingest", "dicom_idle_timeout", "\"1s\"")
        .unwrap();
    let (_gateway, edge) = start(&d);
    let f = instance(&d.path("instances"), 1, Some("P-0001"));

    // One association holds the only slot: the next is rejected, and says why in the log.
    let mut held = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(held.store(1, &sop_uid(1), &data_set(&f)), 0x0000);
    let out = run(&mut scu("echoscu", &d, "STORESCU", "BAYLINK"));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Association Rejected"),
        "{}",
        text(&out)
    );
    assert!(edge.log().contains("ingest.dicom_max_associations reached"));

    // The held association goes silent: the idle time-out aborts it and sends its instance.
    let deadline = Instant::now() + EVENT_WAIT;
    while !edge.log().contains("association_end=idle-timeout") {
        assert!(
            Instant::now() < deadline,
            "idle association not aborted:\n{}",
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The peer sees the connection end (an A-ABORT, then EOF).
    let mut rest = Vec::new();
    let _ = held.s.read_to_end(&mut rest);

    // The slot is free again; the acknowledged instance is delivered.
    let out = run(&mut scu("echoscu", &d, "STORESCU", "BAYLINK"));
    assert!(out.status.success(), "{}", text(&out));
    let t = wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(1))], &edge);
    assert_eq!(
        data_set(&t.join(format!("{}.dcm", sop_uid(1)))),
        data_set(&f)
    );
    assert_eq!(spool_transfers(&d), 1);
}

/// `file` with StudyInstanceUID (0020,000D) removed (dcmtk's `dcmodify`).
pub(super) fn without_study_uid(file: &Path) -> PathBuf {
    let out = file.with_extension("nostudy.dcm");
    std::fs::copy(file, &out).unwrap();
    let r = run(Command::new("dcmodify")
        .args(["-nb", "-ea", "(0020,000d)"])
        .arg(&out));
    assert!(r.status.success(), "dcmodify: {}", text(&r));
    out
}

/// Issue 19: an instance cut in the middle of an element, and one without StudyInstanceUID,
/// are refused alone (with the reason in the log and the status); the good ones beside them
/// are stored and sent, the refused ones are not.
#[test]
fn instances_cut_short_or_without_study_uid_are_refused_and_the_rest_proceed() {
    let d = Deployment::new().unwrap();
    let (_gateway, edge) = start(&d);
    let src = d.path("instances");
    let good: Vec<_> = [1, 2, 3]
        .map(|n| instance(&src, n, Some("P-0001")))
        .to_vec();
    let no_study = without_study_uid(&instance(&src, 4, Some("P-0001")));

    // dcmtk's storescu: the file without StudyInstanceUID gets 0xA900, the good one Success.
    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .args(["-v", "-nh"])
        .arg(&good[0])
        .arg(&no_study));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 1, "{t}");
    assert!(
        t.contains("DataSetDoesNotMatchSOPClass") || t.to_ascii_lowercase().contains("0xa900"),
        "status 0xA900 reported: {t}"
    );
    let only = wait_for_delivery(&d, &[format!("{}.dcm", sop_uid(1))], &edge);
    assert_eq!(
        data_set(&only.join(format!("{}.dcm", sop_uid(1)))),
        data_set(&good[0])
    );
    assert!(
        edge.log()
            .contains("Study Instance UID (0020,000D) is missing"),
        "{}",
        edge.log()
    );

    // storescu will not send a cut file: the raw SCU does. The data set of instance 5 ends
    // in the middle of its pixel data: 0xC000; the instances around it proceed.
    let cut = data_set(&instance(&src, 5, Some("P-0001")));
    let mut a = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(a.store(1, &sop_uid(2), &data_set(&good[1])), 0x0000);
    assert_eq!(a.store(2, &sop_uid(5), &cut[..cut.len() - 100]), 0xC000);
    assert_eq!(a.store(3, &sop_uid(3), &data_set(&good[2])), 0x0000);
    a.release();
    let t = wait_for_delivery(
        &d,
        &[format!("{}.dcm", sop_uid(2)), format!("{}.dcm", sop_uid(3))],
        &edge,
    );
    assert_eq!(
        data_set(&t.join(format!("{}.dcm", sop_uid(3)))),
        data_set(&good[2])
    );
    let log = edge.log();
    assert!(
        log.contains("the data set is not well formed: element (7FE0,0010) declares 512 bytes"),
        "{log}"
    );
    assert_eq!(delivered_transfers(&d).len(), 2);
    assert!(edge_healthy(&d));
}

/// The size of the first staged file of the one transfer the gateway has staged, if any.
fn staged_len(d: &Deployment) -> Option<u64> {
    let staging = d.path("spool/gateway/.staging");
    let dir = std::fs::read_dir(staging)
        .ok()?
        .filter_map(Result::ok)
        .next()?;
    std::fs::metadata(dir.path().join("0"))
        .ok()
        .map(|m| m.len())
}

/// Waits (at most `limit`) until the gateway has staged at least `bytes` (at least one if
/// 0) of the first file of the one transfer announced to it; panics with its log.
pub(super) fn wait_staged(d: &Deployment, gateway: &Service, bytes: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while staged_len(d).unwrap_or(0) < bytes.max(1) {
        assert!(
            Instant::now() < deadline,
            "{bytes} bytes of the first file not staged at the gateway:\n{}",
            gateway.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Instances stream to the gateway while the association is still open: the first one
/// stored is announced and its bytes are staged at the gateway before the next arrives, and
/// the offer after A-RELEASE takes them, so that only the rest is sent once it is sealed.
#[test]
fn instances_stream_to_the_gateway_before_the_association_ends() {
    let d = Deployment::new().unwrap();
    let (gateway, edge) = start(&d);
    let src = d.path("instances");
    let files: Vec<_> = (1..=3).map(|n| instance(&src, n, Some("P-0001"))).collect();
    let ds: Vec<_> = files.iter().map(|f| data_set(f)).collect();

    let mut scu = RawScu::associate(&d, "HOSPITAL-A");
    assert_eq!(scu.store(1, &sop_uid(1), &ds[0]), 0x0000);
    gateway.wait_for_log(&["announced: staging chunks until the offer"], EVENT_WAIT);
    wait_staged(&d, &gateway, 0, EVENT_WAIT);
    assert_eq!(scu.store(2, &sop_uid(2), &ds[1]), 0x0000);
    assert_eq!(scu.store(3, &sop_uid(3), &ds[2]), 0x0000);
    scu.release();

    let names: Vec<_> = (1..=3).map(|n| format!("{}.dcm", sop_uid(n))).collect();
    let t = wait_for_delivery(&d, &names, &edge);
    for (n, want) in (1..=3).zip(&ds) {
        assert_eq!(
            &data_set(&t.join(format!("{}.dcm", sop_uid(n)))),
            want,
            "{n}"
        );
    }
    gateway.wait_for_log(&["staged chunks taken by the offer"], EVENT_WAIT);
    let line = edge.wait_for_log(&["transfer receipted", "streamed_bytes="], EVENT_WAIT);
    let streamed = baylink_tests::log_number(&line, "streamed_bytes");
    assert!(streamed > 0, "nothing streamed before the offer: {line}");
}
