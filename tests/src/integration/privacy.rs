//! No patient identifier in any log line or metric: every door of the edge (HTTPS upload,
//! refusal, research de-identification, STOW-RS, C-STORE, `send`) is driven with patients
//! whose ids and names appear nowhere else, then every line the edge and the gateway logged
//! (at debug level) and every metric they export is searched for them. The hospital's own
//! answers may name its patient; logs and metrics carry transfer ids, rules and pseudonyms.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baylink_tests::{Deployment, Service, baylink_bin};

use super::dicom::{instance_named, run, scu, store_responses, text};
use super::ingest::{Api, multipart, stow_with};

/// Patients with a consent record (added by the test).
const CARE: &str = "PZQ-LOGSCAN-4417";
const STOW: &str = "PZQ-LOGSCAN-5521";
const CSTORE: &str = "PZQ-LOGSCAN-6630";
const SEND: &str = "PZQ-LOGSCAN-3392";
/// Patients without one.
const REFUSED_HTTPS: &str = "PZQ-NOCONSENT-8812";
const REFUSED_STOW: &str = "PZQ-NOCONSENT-9903";
const REFUSED_CSTORE: &str = "PZQ-NOCONSENT-7704";
/// Not usable as a PatientID (two values): refused as malformed.
const UNUSABLE: &str = "PZQ-UNUSABLE-2207\\SECOND";
/// The PatientName of every test instance.
const NAME: &str = "Leakcheck^Wilhelmina";

const ALL: [&str; 8] = [
    CARE,
    STOW,
    CSTORE,
    SEND,
    REFUSED_HTTPS,
    REFUSED_STOW,
    REFUSED_CSTORE,
    "PZQ-UNUSABLE-2207",
];

fn declaration(patient: &str, purpose: &str) -> String {
    format!(
        r#"{{"patient_id":"{patient}","category":"diagnostic-image","purpose":"{purpose}","destination":"hk-ehealth"}}"#
    )
}

/// Consent records for the patients that have one; references are opaque.
fn add_consents(d: &Deployment) {
    let path = d.path("policy/consents.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (n, patient) in [CARE, STOW, CSTORE, SEND].iter().enumerate() {
        text.push_str(&format!(
            "\n[[consent]]\n\
             patient_id = \"{patient}\"\n\
             reference = \"CR-SCAN-{n}\"\n\
             categories = [\"*\"]\n\
             purposes = [\"care\", \"research\"]\n\
             destinations = [\"hk-ehealth\"]\n\
             valid_from = \"2020-01-01T00:00:00Z\"\n\
             valid_until = \"2099-01-01T00:00:00Z\"\n\
             evidence_sha256 = \"{}\"\n",
            "ab".repeat(32)
        ));
    }
    std::fs::write(&path, text).unwrap();
}

/// `baylink serve` logging at debug level for baylink's own crates.
fn serve_verbose(d: &Deployment, config: &Path) -> Service {
    Service::start(
        Command::new(baylink_bin())
            .env(
                "RUST_LOG",
                "info,baylink=debug,baylink_net=debug,baylink_hsm=debug",
            )
            .arg("serve")
            .arg("--config")
            .arg(config),
        d.dir.path(),
    )
    .unwrap()
}

/// Uploads `file` over HTTPS as one transfer and commits it; returns the transfer id.
fn upload(api: &Api<'_>, patient: &str, purpose: &str, file: &Path) -> String {
    let a = api.declare("hospital-a", &declaration(patient, purpose));
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let put = api.put("hospital-a", &id, "scan.dcm", file, &[]);
    assert_eq!(put.status, 201, "{put:?}");
    let c = api.commit("hospital-a", &id);
    assert_eq!(c.status, 202, "{c:?}");
    id
}

/// Waits (120 s at most) until `n` transfers are delivered and the gateway logged each.
fn wait_for_deliveries(d: &Deployment, gateway: &Service, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ids: Vec<String> = std::fs::read_dir(d.path("delivered"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if ids.len() >= n {
            for id in ids {
                gateway.wait_for_log(&["delivered", &id], Duration::from_secs(60));
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} transfers delivered within 120 s:\n{}",
            ids.len(),
            gateway.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of `text` that name a test patient or the test PatientName.
fn leaks(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| ALL.iter().any(|p| l.contains(p)) || l.contains("Leakcheck"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn no_patient_id_or_name_in_any_log_line_or_metric() {
    let d = Deployment::new().unwrap();
    add_consents(&d);
    let gateway = serve_verbose(&d, &d.gateway_config());
    let edge = serve_verbose(&d, &d.edge_config());
    let api = Api { d: &d };
    let src = d.path("scan-instances");
    let mut delivered = 0;

    // HTTPS, care, with consent: sealed, sent, receipted.
    let care = instance_named(&src, 1, Some(CARE), NAME);
    let id = upload(&api, CARE, "care", &care);
    api.wait_state(&id, "committed");
    delivered += 1;

    // HTTPS without consent: refused; the hospital's answer names its own patient.
    let a = api.declare("hospital-a", &declaration(REFUSED_HTTPS, "care"));
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.json()["rule"], "consent-missing");
    assert!(a.body.contains(REFUSED_HTTPS), "the answer names it: {a:?}");

    // HTTPS, research: de-identified on the edge.
    let research = instance_named(&src, 2, Some(CARE), NAME);
    let id = upload(&api, CARE, "research", &research);
    api.wait_state(&id, "committed");
    delivered += 1;

    // STOW-RS: one instance stored, one of another patient refused in the same request.
    let good = instance_named(&src, 3, Some(STOW), NAME);
    let other = instance_named(&src, 4, Some(REFUSED_STOW), NAME);
    let (r, headers) = stow_with(&api, &multipart(&src, &[&good, &other]), "");
    assert_eq!(r.status, 202, "{r:?}");
    let id = headers
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-baylink-transfer:")
                .map(|v| v.trim().to_owned())
        })
        .expect("X-Baylink-Transfer header");
    api.wait_state(&id, "committed");
    delivered += 1;
    // STOW-RS of a patient without consent: nothing stored.
    let refused = instance_named(&src, 5, Some(REFUSED_STOW), NAME);
    let (r, _) = stow_with(&api, &multipart(&src, &[&refused]), "");
    assert_eq!(r.status, 409, "{r:?}");

    // C-STORE: one association, an instance with consent, one without, one whose PatientID
    // is unusable.
    let ok = instance_named(&src, 6, Some(CSTORE), NAME);
    let no = instance_named(&src, 7, Some(REFUSED_CSTORE), NAME);
    let unusable = instance_named(&src, 8, Some(UNUSABLE), NAME);
    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .args(["-v", "-nh"])
        .arg(&ok)
        .arg(&no)
        .arg(&unusable));
    let t = text(&out);
    assert_eq!(store_responses(&t, "Success"), 1, "{t}");
    assert_eq!(store_responses(&t, "Unknown Status: 0x124"), 1, "{t}");
    assert!(store_responses(&t, "Error: CannotUnderstand") > 0, "{t}");
    delivered += 1;

    // `baylink send`: its own log lines on stderr hold no patient either.
    let file = baylink_tests::payload(&src, "report.bin", 50_000, 7).unwrap();
    let out = d
        .send(&["--no-progress", "--patient", SEND, file.to_str().unwrap()])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    delivered += 1;
    assert_eq!(leaks(&stderr), Vec::<String>::new(), "send's stderr");

    wait_for_deliveries(&d, &gateway, delivered);

    // The flows ran and were logged (a silent service would pass the scan trivially).
    let edge_log = edge.log();
    for needle in [
        "declaration refused",
        "consent-missing",
        "STOW-RS refused by policy",
        "instance refused",
        "the PatientID is not usable",
        "instance accepted",
        "association released",
    ] {
        assert!(
            edge_log.contains(needle),
            "{needle} not logged:\n{edge_log}"
        );
    }
    assert_eq!(leaks(&edge_log), Vec::<String>::new(), "edge log");
    assert_eq!(leaks(&gateway.log()), Vec::<String>::new(), "gateway log");
    for (side, gw) in [("edge", false), ("gateway", true)] {
        let metrics = d.metrics(gw).unwrap();
        assert!(metrics.contains("baylink_"), "{metrics}");
        assert_eq!(leaks(&metrics), Vec::<String>::new(), "{side} /metrics");
    }
}
