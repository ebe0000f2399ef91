//! De-identification for purpose `research` and the `patient-mismatch` rule, on the three
//! doors (HTTPS PUT, STOW-RS, C-STORE with dcmtk's `storescu`), checked on what the gateway
//! delivers: the raw bytes (no identifying string left), dcmtk's `dcmdump` (an independent
//! parser) for the attributes, and the pixel data bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use baylink_tests::{Deployment, sha256_file};
use serde_json::Value;

use super::dicom::{dump, run, scu, store_responses, text};
use super::ingest::{Api, DEADLINE, multipart, sequence_uids, spooled_payload, stow_with};

const ROOT: &str = "1.2.826.0.1.3680043.10.999";
const RESEARCH: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"research","destination":"hk-ehealth"}"#;
const CARE: &str = r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#;
/// Strings of the test instances that must not survive de-identification.
const IDENTIFYING: [&str; 10] = [
    "Wong",
    "P-0001",
    "Chan^",
    "Queen Mary",
    "HKID",
    "ACME",
    "ACC-4711",
    "19700101",
    "20240131",
    ROOT,
];

fn sop(n: u32) -> String {
    format!("{ROOT}.{n}")
}

fn pixels(n: u32) -> Vec<u8> {
    (0..512u32).map(|i| (i * 37 + n) as u8).collect()
}

/// A CT instance of series `ROOT.101` (study `ROOT.100`) for `patient`, full of
/// identifying attributes, a private block, and a reference to instance `n - 1`; 512 bytes
/// of pixel data at the end.
fn instance(dir: &Path, n: u32, patient: &str) -> PathBuf {
    let words: Vec<String> = pixels(n)
        .chunks(2)
        .map(|w| format!("{:04x}", u16::from_le_bytes([w[0], w[1]])))
        .collect();
    let dump = format!(
        "(0002,0010) UI =LittleEndianExplicit\n\
         (0008,0016) UI =CTImageStorage\n\
         (0008,0018) UI [{sop}]\n\
         (0008,0020) DA [20240131]\n\
         (0008,0050) SH [ACC-4711]\n\
         (0008,0060) CS [CT]\n\
         (0008,0080) LO [Queen Mary Hospital]\n\
         (0008,0090) PN [Chan^Tai Man]\n\
         (0008,1140) SQ (Sequence with undefined length #=1)\n\
         \x20 (fffe,e000) na (Item with undefined length #=2)\n\
         \x20   (0008,1150) UI =CTImageStorage\n\
         \x20   (0008,1155) UI [{reference}]\n\
         \x20 (fffe,e00d) na (ItemDelimitationItem)\n\
         (fffe,e0dd) na (SequenceDelimitationItem)\n\
         (0009,0010) LO [ACME]\n\
         (0009,1001) LO [HKID A123456]\n\
         (0010,0010) PN [Wong^Siu Ming]\n\
         (0010,0020) LO [{patient}]\n\
         (0010,0030) DA [19700101]\n\
         (0020,000d) UI [{ROOT}.100]\n\
         (0020,000e) UI [{ROOT}.101]\n\
         (0020,0052) UI [{ROOT}.102]\n\
         (0028,0002) US 1\n\
         (0028,0004) CS [MONOCHROME2]\n\
         (0028,0010) US 16\n\
         (0028,0011) US 16\n\
         (0028,0100) US 16\n\
         (0028,0101) US 16\n\
         (0028,0102) US 15\n\
         (0028,0103) US 0\n\
         (7fe0,0010) OW {px}\n",
        sop = sop(n),
        reference = sop(n - 1),
        px = words.join("\\"),
    );
    std::fs::create_dir_all(dir).unwrap();
    let txt = dir.join(format!("i{n}-{patient}.dump"));
    let dcm = dir.join(format!("i{n}-{patient}.dcm"));
    std::fs::write(&txt, dump).unwrap();
    let out = run(Command::new("dump2dcm").arg(&txt).arg(&dcm));
    assert!(out.status.success(), "dump2dcm: {}", text(&out));
    let bytes = std::fs::read(&dcm).unwrap();
    assert_eq!(
        &bytes[bytes.len() - 512..],
        &pixels(n)[..],
        "pixel data last"
    );
    dcm
}

/// The value of `tag` (e.g. `(0020,000d)`) in dcmdump's output, at the first line naming it.
fn value(dump: &str, tag: &str) -> Option<String> {
    let line = dump.lines().find(|l| l.trim_start().starts_with(tag))?;
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    Some(line[open + 1..close].to_owned())
}

/// Checks a delivered de-identified instance made from `n`; returns its dcmdump.
fn assert_deidentified(got: &Path, n: u32) -> String {
    let bytes = std::fs::read(got).unwrap();
    for needle in IDENTIFYING {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle:?} still in {}",
            got.display()
        );
    }
    assert_eq!(
        &bytes[bytes.len() - 512..],
        &pixels(n)[..],
        "pixel data intact"
    );
    let d = dump(got);
    assert_eq!(value(&d, "(0012,0062)").as_deref(), Some("YES"), "{d}");
    assert!(value(&d, "(0010,0020)").unwrap().starts_with("BL-"), "{d}");
    assert_eq!(value(&d, "(0010,0010)"), None, "{d}"); // emptied: dcmdump shows (no value)
    for tag in [
        "(0008,0018)",
        "(0020,000d)",
        "(0020,000e)",
        "(0020,0052)",
        "(0002,0003)",
    ] {
        assert!(value(&d, tag).unwrap().starts_with("2.25."), "{tag}: {d}");
    }
    assert_eq!(value(&d, "(0002,0003)"), value(&d, "(0008,0018)"), "{d}");
    assert!(d.contains("=CTImageStorage"), "SOP class kept: {d}");
    d
}

/// Two de-identified instances of one series: one study, one series, and the reference of
/// `b` to `a` follows `a`'s new SOP Instance UID.
fn assert_one_series(a: &str, b: &str) {
    for tag in ["(0020,000d)", "(0020,000e)", "(0020,0052)"] {
        assert_eq!(value(a, tag), value(b, tag), "{tag}");
    }
    assert_ne!(value(a, "(0008,0018)"), value(b, "(0008,0018)"));
    assert_eq!(value(b, "(0008,1155)"), value(a, "(0008,0018)"));
}

/// The edge's audit records (JSON) of transfer `id`.
fn audit_records(d: &Deployment, id: &str) -> Vec<Value> {
    std::fs::read_to_string(d.path("audit/edge/records.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l.split_once(' ').unwrap().1).unwrap())
        .filter(|r| r["transfer"] == id)
        .collect()
}

fn assert_refused_recorded(d: &Deployment, id: &str) {
    let records = audit_records(d, id);
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "refused" && r["rule"] == "patient-mismatch"),
        "no refused/patient-mismatch record for {id}: {records:?}"
    );
    let raw = std::fs::read_to_string(d.path("audit/edge/records.log")).unwrap();
    assert!(!raw.contains("P-0002"), "raw patient id in the audit log");
}

/// Waits for `path` to be delivered.
fn wait_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < DEADLINE,
            "{} not delivered",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn declared_id(api: &Api<'_>, body: &str) -> String {
    let a = api.declare("hospital-a", body);
    assert_eq!(a.status, 201, "{a:?}");
    a.json()["id"].as_str().unwrap().to_owned()
}

#[test]
fn research_over_https_arrives_deidentified_and_care_byte_identical() {
    let d = Deployment::new().unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let src = d.path("instances");
    let (a, b) = (instance(&src, 11, "P-0001"), instance(&src, 12, "P-0001"));

    let research = declared_id(&api, RESEARCH);
    for (name, f) in [("a.dcm", &a), ("b.dcm", &b)] {
        let r = api.put("hospital-a", &research, name, f, &[]);
        assert_eq!(r.status, 201, "{r:?}");
    }
    assert_eq!(api.commit("hospital-a", &research).status, 202);
    let care = declared_id(&api, CARE);
    assert_eq!(api.put("hospital-a", &care, "a.dcm", &a, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &care).status, 202);

    api.wait_state(&research, "committed");
    let (ga, gb) = (
        d.delivered(&research, "a.dcm"),
        d.delivered(&research, "b.dcm"),
    );
    wait_file(&ga);
    wait_file(&gb);
    let da = assert_deidentified(&ga, 11);
    let db = assert_deidentified(&gb, 12);
    assert_one_series(&da, &db);

    // The same instance under `care`: byte-identical.
    api.wait_state(&care, "committed");
    let gc = d.delivered(&care, "a.dcm");
    wait_file(&gc);
    assert_eq!(sha256_file(&a).unwrap(), sha256_file(&gc).unwrap());
    // Another transfer, other UIDs.
    let again = declared_id(&api, RESEARCH);
    assert_eq!(api.put("hospital-a", &again, "a.dcm", &a, &[]).status, 201);
    assert_eq!(api.commit("hospital-a", &again).status, 202);
    api.wait_state(&again, "committed");
    let g2 = d.delivered(&again, "a.dcm");
    wait_file(&g2);
    let d2 = assert_deidentified(&g2, 11);
    assert_ne!(value(&d2, "(0020,000d)"), value(&da, "(0020,000d)"));
    assert_eq!(value(&d2, "(0010,0020)"), value(&da, "(0010,0020)"));
    // A non-DICOM file has no place in a research transfer.
    let pdf = src.join("report.pdf");
    std::fs::write(&pdf, b"%PDF-1.7 report of Wong Siu Ming").unwrap();
    let more = declared_id(&api, RESEARCH);
    let r = api.put("hospital-a", &more, "report.pdf", &pdf, &[]);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["rule"], "deid-unsupported");
    api.healthy();
}

#[test]
fn https_patient_mismatch_is_refused_and_recorded() {
    let d = Deployment::new().unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let src = d.path("instances");
    let other = instance(&src, 21, "P-0002");
    let pdf = src.join("report.pdf");
    std::fs::write(&pdf, b"%PDF-1.7 a report").unwrap();

    let id = declared_id(&api, CARE);
    let r = api.put("hospital-a", &id, "other.dcm", &other, &[]);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["rule"], "patient-mismatch", "{r:?}");
    // The (empty) partial is discarded after the answer: wait for it, bounded.
    let start = Instant::now();
    while !spooled_payload(&d).is_empty() {
        assert!(start.elapsed() < DEADLINE, "{:?}", spooled_payload(&d));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_refused_recorded(&d, &id);

    // A report (not DICOM) passes unchanged; the transfer stays usable.
    assert_eq!(
        api.put("hospital-a", &id, "report.pdf", &pdf, &[]).status,
        201
    );
    assert_eq!(api.commit("hospital-a", &id).status, 202);
    api.wait_state(&id, "committed");
    let got = d.delivered(&id, "report.pdf");
    wait_file(&got);
    assert_eq!(sha256_file(&pdf).unwrap(), sha256_file(&got).unwrap());
    assert!(!d.delivered(&id, "other.dcm").exists());
    api.healthy();
}

#[test]
fn stow_research_is_deidentified_and_another_patient_fails_alone() {
    let d = Deployment::new().unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let src = d.path("instances");
    let (a, b, c) = (
        instance(&src, 31, "P-0001"),
        instance(&src, 32, "P-0001"),
        instance(&src, 33, "P-0002"),
    );
    let body = multipart(&src, &[&a, &c, &b]);
    let (r, headers) = stow_with(&api, &body, "?purpose=research");
    assert_eq!(r.status, 202, "{r:?}");
    let id = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-baylink-transfer:")
                .map(|v| v.trim().to_owned())
        })
        .expect("X-Baylink-Transfer header");
    let v = r.json();
    assert_eq!(sequence_uids(&v, "00081199").len(), 2, "{v}");
    assert_eq!(sequence_uids(&v, "00081198"), [(sop(33), Some(0x0110))]);
    assert_refused_recorded(&d, &id);

    api.wait_state(&id, "committed");
    let delivered = wait_files(&d.path("delivered").join(&id), 2);
    let dumps: Vec<(String, u32)> = delivered
        .iter()
        .map(|p| {
            let pixels_of = |n| std::fs::read(p).unwrap().ends_with(&pixels(n));
            let n = if pixels_of(31) { 31 } else { 32 };
            (assert_deidentified(p, n), n)
        })
        .collect();
    let (first, second) = if dumps[0].1 == 31 {
        (&dumps[0].0, &dumps[1].0)
    } else {
        (&dumps[1].0, &dumps[0].0)
    };
    assert_one_series(first, second);
    // Named by the new SOP Instance UIDs, not the original ones.
    for p in &delivered {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("2.25.") && name.ends_with(".dcm"),
            "{name}"
        );
    }
}

/// Waits until `dir` holds `n` files; returns them.
fn wait_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    let start = Instant::now();
    loop {
        let files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if files.len() == n {
            return files;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{} holds {files:?}, not {n} files",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn cstore_research_peer_is_deidentified_and_another_patient_fails_alone() {
    let d = Deployment::new().unwrap();
    let config = d.edge_config();
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(
        "\n[[ingest.dicom_peers]]\nae_title = \"RESEARCH\"\naddress = \"127.0.0.1\"\n\
         hospital = \"hospital-a\"\npurpose = \"research\"\n",
    );
    std::fs::write(&config, toml).unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&config).unwrap();
    let src = d.path("instances");
    let files = [
        instance(&src, 41, "P-0001"),
        instance(&src, 42, "P-0002"),
        instance(&src, 43, "P-0001"),
    ];
    // --no-halt: storescu goes on after a failure.
    let out = run(scu("storescu", &d, "RESEARCH", "BAYLINK")
        .args(["-v", "-nh"])
        .args(&files));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 2, "{t}");
    // Another patient than the association's: 0x0124 (refused: not authorized).
    assert_eq!(store_responses(&t, "Unknown Status: 0x124"), 1, "{t}");

    let dirs = wait_files(&d.path("delivered"), 1);
    let id = dirs[0].file_name().unwrap().to_string_lossy().into_owned();
    let delivered = wait_files(&dirs[0], 2);
    let mut dumps = Vec::new();
    for p in &delivered {
        let n = if std::fs::read(p).unwrap().ends_with(&pixels(41)) {
            41
        } else {
            43
        };
        dumps.push((n, assert_deidentified(p, n)));
    }
    dumps.sort();
    assert_eq!(dumps.iter().map(|x| x.0).collect::<Vec<_>>(), [41, 43]);
    for tag in ["(0020,000d)", "(0020,000e)"] {
        assert_eq!(value(&dumps[0].1, tag), value(&dumps[1].1, tag), "{tag}");
    }
    assert_refused_recorded(&d, &id);
    assert!(edge.log().contains("patient-mismatch"), "{}", edge.log());

    // A deflated instance cannot be de-identified in place: refused (0x0124, rule
    // deid-unsupported, recorded), nothing of it delivered.
    let deflated = src.join("deflated.dcm");
    let plain = instance(&src, 44, "P-0001");
    let out = run(Command::new("dcmconv")
        .arg("+td")
        .arg(&plain)
        .arg(&deflated));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(scu("storescu", &d, "RESEARCH", "BAYLINK")
        .args(["-v", "-xd"])
        .arg(&deflated));
    let t = text(&out);
    assert!(store_responses(&t, "Unknown Status: 0x124") > 0, "{t}");
    let records = std::fs::read_to_string(d.path("audit/edge/records.log")).unwrap();
    assert!(records.contains("deid-unsupported"), "{records}");
    assert_eq!(wait_files(&d.path("delivered"), 1), dirs);
    // The association opened a transfer for its first instance; with nothing accepted it is
    // dropped at release, not left open in the spool.
    let open: Vec<_> = std::fs::read_dir(d.path("spool/edge"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && *n != id)
        .collect();
    assert!(open.is_empty(), "left in the spool: {open:?}");
}

/// `baylink send` reads local files as they are: a research transfer through it would carry
/// them undeidentified, so it is refused (exit 2, rule recorded), nothing sealed.
#[test]
fn send_refuses_a_purpose_that_must_be_deidentified() {
    let d = Deployment::new().unwrap();
    let f = instance(&d.path("instances"), 61, "P-0001");
    let out = d
        .send(&["--purpose", "research", f.to_str().unwrap()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("purpose research is de-identified"), "{err}");
    assert_eq!(baylink_tests::spool_entries(&d.path("spool/edge")).len(), 0);
    let records = std::fs::read_to_string(d.path("audit/edge/records.log")).unwrap();
    assert!(records.contains("deid-unsupported"), "{records}");
}

/// The corpus of real files (pydicom's test files, see `tests/data/dicom/README.md`).
fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dicom")
}

/// The Python with pydicom (Debian's python3-pydicom installs into the system Python).
const PYTHON: &str = "/usr/bin/python3";

/// Real files of several kinds (CT, MR, RT dose and plan, SR, NM, SEG; explicit and
/// implicit VR, native and encapsulated pixel data, trailing padding after the pixel data)
/// with identifiers planted by pydicom at several depths and in UN encoding, sent as
/// `purpose=research` over STOW-RS; what the gateway delivers is checked by pydicom
/// (`check_deid.py`): no Table E.1-1 attribute with an identifying value at any depth, no
/// private or UN element, no planted value and no original UID in the bytes, file meta
/// consistent with the data set, pixel data unchanged. What cannot be de-identified
/// (deflated; an OT image that may have burned-in text) is refused with the reason.
#[test]
fn real_files_with_planted_identifiers_pass_an_independent_check() {
    let d = Deployment::new().unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let planted = d.path("planted");
    let out = run(Command::new(PYTHON)
        .arg(corpus().join("plant.py"))
        .arg(corpus())
        .arg(&planted));
    assert!(out.status.success(), "plant.py: {}", text(&out));
    let refused_names = ["SC_rgb_small_odd.dcm", "image_dfl.dcm"];
    let mut good: Vec<PathBuf> = std::fs::read_dir(&planted)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !refused_names.contains(&p.file_name().unwrap().to_str().unwrap()))
        .collect();
    good.sort();
    assert_eq!(good.len(), 10, "{good:?}");
    // The planted UN encoding is there before the edge sees the files.
    let ct = std::fs::read(planted.join("CT_small.dcm")).unwrap();
    assert!(
        ct.windows(6).any(|w| w == b"\x08\x00\x40\x11UN"),
        "no UN sequence planted"
    );
    assert!(
        ct.windows(12)
            .any(|w| w == b"\x08\x00\x12\x21UN\0\0\xff\xff\xff\xff"),
        "no undefined-length UN sequence planted"
    );

    let body = multipart(
        &planted,
        &good.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let (r, headers) = stow_with(&api, &body, "?purpose=research");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(sequence_uids(&v, "00081199").len(), good.len(), "{v}");
    let id = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-baylink-transfer:")
                .map(|v| v.trim().to_owned())
        })
        .expect("X-Baylink-Transfer header");
    api.wait_state(&id, "committed");
    let delivered = wait_files(&d.path("delivered").join(&id), good.len());
    let out = run(Command::new(PYTHON)
        .arg(corpus().join("check_deid.py"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../appliance/src/dicom/deid/table.rs"))
        .arg(&planted)
        .args(&delivered));
    let report = text(&out);
    assert!(out.status.success(), "check_deid.py:\n{report}");
    assert!(
        report.contains(&format!("checked {} files, 0 problems", good.len())),
        "{report}"
    );

    // Refused, with the reason in the answer, nothing stored.
    let research = declared_id(&api, RESEARCH);
    for (name, why) in [
        ("SC_rgb_small_odd.dcm", "BurnedInAnnotation"),
        ("image_dfl.dcm", "deflated"),
    ] {
        let r = api.put("hospital-a", &research, name, &planted.join(name), &[]);
        assert_eq!(r.status, 403, "{name}: {r:?}");
        let answer = r.json();
        assert_eq!(answer["rule"], "deid-unsupported", "{name}: {answer}");
        assert!(answer.to_string().contains(why), "{name}: {answer}");
    }
    api.healthy();
}

/// The uncompressed files of the corpus over C-STORE (a research peer, dcmtk's
/// `storescu`, which negotiates the transfer syntax and re-encodes UN sequences it can
/// read): what is delivered passes the same independent check; what cannot be
/// de-identified (the OT image, the deflated file) fails alone with 0x0124.
#[test]
fn real_files_over_cstore_pass_the_same_check() {
    let d = Deployment::new().unwrap();
    let config = d.edge_config();
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(
        "\n[[ingest.dicom_peers]]\nae_title = \"RESEARCH\"\naddress = \"127.0.0.1\"\n\
         hospital = \"hospital-a\"\npurpose = \"research\"\n",
    );
    std::fs::write(&config, toml).unwrap();
    let _gateway = d.serve(&d.gateway_config()).unwrap();
    let _edge = d.serve(&config).unwrap();
    let planted = d.path("planted");
    let out = run(Command::new(PYTHON)
        .arg(corpus().join("plant.py"))
        .arg(corpus())
        .arg(&planted));
    assert!(out.status.success(), "plant.py: {}", text(&out));
    // Compressed files and the SEG (not in storescu's default presentation contexts) stay
    // with the STOW-RS test.
    let left_out = ["JPEG2000.dcm", "MR_small_RLE.dcm", "liver_1frame.dcm"];
    let mut files: Vec<PathBuf> = std::fs::read_dir(&planted)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !left_out.contains(&p.file_name().unwrap().to_str().unwrap()))
        .collect();
    files.sort();
    assert_eq!(files.len(), 9);
    // --no-halt: storescu goes on after a failure.
    let out = run(scu("storescu", &d, "RESEARCH", "BAYLINK")
        .args(["-v", "-nh"])
        .args(&files));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 7, "{t}");
    assert_eq!(store_responses(&t, "Unknown Status: 0x124"), 2, "{t}");
    let dirs = wait_files(&d.path("delivered"), 1);
    let delivered = wait_files(&dirs[0], 7);
    let out = run(Command::new(PYTHON)
        .arg(corpus().join("check_deid.py"))
        .arg("--any-transfer-syntax")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../appliance/src/dicom/deid/table.rs"))
        .arg(&planted)
        .args(&delivered));
    let report = text(&out);
    assert!(out.status.success(), "check_deid.py:\n{report}");
    assert!(report.contains("checked 7 files, 0 problems"), "{report}");
}
