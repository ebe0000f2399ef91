//! The edge's DICOM C-STORE SCP, driven by dcmtk's real SCUs (`echoscu`, `storescu`,
//! `dcmsend`) against a running edge and gateway. Test instances are made in the test from a
//! text dump with `dump2dcm` (small CT images with 16x16 pixel data).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, Service};

/// The SOP Instance UID of test instance `n`.
fn sop_uid(n: u32) -> String {
    format!("1.2.826.0.1.3680043.10.543.{n}")
}

/// Writes a small CT instance for `patient` with dump2dcm; `patient = None` leaves PatientID
/// out (a data set the SCP cannot use).
fn instance(dir: &Path, n: u32, patient: Option<&str>) -> PathBuf {
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
         (0010,0010) PN Test^Patient{n}\n\
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
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("dcmtk tool runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// dcmtk SCU arguments shared by every call: AE titles, time-outs, address.
fn scu(tool: &str, d: &Deployment, calling: &str, called: &str) -> Command {
    let mut c = Command::new(tool);
    c.args([
        "-aet", calling, "-aec", called, "-to", "20", "-ta", "20", "-td", "20",
    ]);
    c.arg("127.0.0.1").arg((d.base_port + 4).to_string());
    c
}

fn start(d: &Deployment) -> (Service, Service) {
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let edge = d.serve(&d.edge_config()).expect("edge starts");
    (gateway, edge)
}

/// The transfer directories under `delivered/`.
fn delivered_transfers(d: &Deployment) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(d.path("delivered"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Waits (60 s at most) until a delivered transfer holds exactly `names`; returns its dir.
fn wait_for_delivery(d: &Deployment, names: &[String], edge: &Service) -> PathBuf {
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
fn data_set(path: &Path) -> Vec<u8> {
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
fn dump(path: &Path) -> String {
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
fn edge_healthy(d: &Deployment) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", d.base_port + 1)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
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
    let files: Vec<_> = (1..=3).map(|n| instance(&src, n, Some("P-0001"))).collect();

    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .arg("-v")
        .args(&files));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out)
            .matches("Received Store Response (Success)")
            .count(),
        3,
        "{}",
        text(&out)
    );

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
    // The staging copy is removed once the transfer is sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    let staging = d.path("spool/edge/.staging");
    while std::fs::read_dir(&staging).map(|r| r.count()).unwrap_or(0) > 0 {
        assert!(Instant::now() < deadline, "staging not cleaned up");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    assert_eq!(
        t.matches("Received Store Response (Success)").count(),
        2,
        "{t}"
    );
    // No consent and another patient than the association's: 0x0124 (refused: not authorized).
    assert_eq!(
        t.matches("Received Store Response (Unknown Status: 0x124)")
            .count(),
        2,
        "{t}"
    );
    // No PatientID: 0xC000 (cannot understand).
    assert!(
        t.contains("Received Store Response (Error: CannotUnderstand)"),
        "{t}"
    );
    // The same instance twice: 0x0111 (duplicate SOP instance).
    assert!(
        t.contains("Received Store Response (Unknown Status: 0x111)"),
        "{t}"
    );

    let names: Vec<_> = [1, 2].map(|n| format!("{}.dcm", sop_uid(n))).to_vec();
    wait_for_delivery(&d, &names, &edge);
    // Exactly one transfer in the spool and at the destination: the refused-only association
    // sent nothing, and nothing of the refused instances went anywhere.
    assert_eq!(delivered_transfers(&d).len(), 1);
    let spool_transfers = std::fs::read_dir(d.path("spool/edge"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(spool_transfers, 1);
    let log = edge.log();
    assert!(log.contains("no consent for patient P-0099"), "{log}");

    assert!(edge_healthy(&d));
    let out = run(&mut scu("echoscu", &d, "STORESCU", "BAYLINK"));
    assert!(out.status.success(), "{}", text(&out));
}
