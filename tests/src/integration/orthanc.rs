//! Delivery into the health-record store: the gateway's `delivery.kind = "dicomweb"` against
//! a real Orthanc with its DICOMweb plugin (STOW-RS), each test with its own Orthanc. The
//! https tests put stunnel in front of it (Debian's Orthanc 1.10 crashes on its own HTTPS).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baylink_tests::{
    Deployment, EVENT_WAIT, Orthanc, Service, TlsProxy, orthanc_unavailable, signal, skip_if,
    stunnel_unavailable,
};

use super::check_config::check_config;
use super::compliance::audit_records;
use super::deliver_retry::stow_acked;

/// How long a test waits for the gateway to log a step.
const LOG_WAIT: Duration = EVENT_WAIT;
use super::dicom::{instance, sop_uid};

/// A deployment whose gateway delivers to the DICOMweb base `url`, with `extra` more
/// `[delivery]` keys.
fn deployment(url: &str, extra: &[(&str, &str)]) -> Deployment {
    with_delivery(Deployment::new().unwrap(), url, extra)
}

/// Points the gateway of `d` at the DICOMweb base `url`, with `extra` more `[delivery]`
/// keys.
fn with_delivery(d: Deployment, url: &str, extra: &[(&str, &str)]) -> Deployment {
    let gw = "gateway.toml";
    d.set(gw, "delivery", "kind", "\"dicomweb\"").unwrap();
    d.set(gw, "delivery", "url", &format!("\"{url}\"")).unwrap();
    for (key, value) in extra {
        d.set(gw, "delivery", key, value).unwrap();
    }
    d
}

/// Sends `files` as one transfer; returns its id.
fn send(d: &Deployment, files: &[PathBuf], gateway: &Service) -> String {
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    d.send_ok(&files, gateway).1
}

/// The gateway's audit records of `kind` for transfer `id`.
fn gateway_audit(d: &Deployment, kind: &str, id: &str) -> Vec<serde_json::Value> {
    audit_records(d, "gateway")
        .into_iter()
        .filter(|r| r["kind"] == kind && r["transfer"] == id)
        .collect()
}

fn skip() -> bool {
    skip_if(orthanc_unavailable())
}

fn stored_identical(orthanc: &Orthanc, uid: &str, source: &Path) {
    let stored = orthanc
        .instance_file(uid)
        .unwrap()
        .unwrap_or_else(|| panic!("Orthanc has no instance {uid}:\n{}", orthanc.log()));
    assert_eq!(
        stored,
        std::fs::read(source).unwrap(),
        "Orthanc's copy of {uid} differs from {}",
        source.display()
    );
}

#[test]
fn a_study_lands_in_orthanc_byte_identical_in_batches_and_again_harmlessly() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    // Three instances of just over 1 KiB each, at most 2048 bytes per request: one STOW-RS
    // request each.
    let d = deployment(&orthanc.dicomweb_url(), &[("batch_bytes", "2048")]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("study");
    let files: Vec<PathBuf> = (1..=3).map(|n| instance(&src, n, Some("P-0001"))).collect();
    assert!(std::fs::metadata(&files[0]).unwrap().len() > 1024);

    let id = send(&d, &files, &gateway);
    let line = gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    assert!(
        line.contains(&format!(
            "location={}/studies/1.2.826.0.1.3680043.10.543.100",
            orthanc.dicomweb_url()
        )),
        "{line}"
    );
    for (n, f) in (1..=3).zip(&files) {
        stored_identical(&orthanc, &sop_uid(n), f);
    }
    assert_eq!(orthanc.instance_count().unwrap(), 3);
    let marker = d.path(&format!("spool/gateway/{id}/delivered"));
    assert!(
        std::fs::read_to_string(&marker)
            .unwrap()
            .starts_with(&orthanc.dicomweb_url()),
        "the delivered marker names the store"
    );
    assert_eq!(gateway_audit(&d, "delivered", &id).len(), 1);

    // The same instances again in a new transfer (as after a crash between STOW-RS and the
    // `delivered` mark): delivered, nothing duplicated.
    let again = send(&d, &files[..2], &gateway);
    gateway.wait_for_log(&[&again, "delivered"], LOG_WAIT);
    assert_eq!(orthanc.instance_count().unwrap(), 3);
    for (n, f) in (1..=3).zip(&files) {
        stored_identical(&orthanc, &sop_uid(n), f);
    }
}

#[test]
fn requests_in_flight_together_store_every_instance_and_record_each_answer() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    // Eight instances of just over 1 KiB, one per request, three requests open at once.
    let d = deployment(
        &orthanc.dicomweb_url(),
        &[("batch_bytes", "2048"), ("requests_in_flight", "3")],
    );
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("study");
    let files: Vec<PathBuf> = (1..=8).map(|n| instance(&src, n, Some("P-0001"))).collect();

    let id = send(&d, &files, &gateway);
    gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    for (n, f) in (1..=8).zip(&files) {
        stored_identical(&orthanc, &sop_uid(n), f);
    }
    assert_eq!(orthanc.instance_count().unwrap(), 8);
    // Every answer is in `stow.acked`, one request each, whatever order they came in.
    assert_eq!(confirmed_files(&d, &id), 8);
    let acked = stow_acked(&d, &id);
    assert_eq!(acked["batches"].as_array().unwrap().len(), 8, "{acked}");
    assert_eq!(acked["ended"], true, "{acked}");
    assert_eq!(gateway_audit(&d, "delivered", &id).len(), 1);
}

#[test]
fn content_the_store_refuses_is_set_aside_and_the_queue_moves_on() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let d = deployment(&orthanc.dicomweb_url(), &[]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("in");
    std::fs::create_dir_all(&src).unwrap();
    // Not DICOM at all: refused by the gateway before any request.
    let text = src.join("report.txt");
    std::fs::write(&text, "not an image").unwrap();
    // A Part 10 prefix and garbage after it: Orthanc answers 400 with a STOW-RS answer.
    let garbage = src.join("garbage.dcm");
    let mut bytes = vec![0u8; 128];
    bytes.extend_from_slice(b"DICM");
    bytes.extend_from_slice(&[0x5a; 300]);
    std::fs::write(&garbage, bytes).unwrap();

    let not_dicom = send(&d, std::slice::from_ref(&text), &gateway);
    let refused = send(&d, std::slice::from_ref(&garbage), &gateway);
    let good = instance(&src, 9, Some("P-0001"));
    let after = send(&d, std::slice::from_ref(&good), &gateway);

    let line = gateway.wait_for_log(&[&not_dicom, "undeliverable"], LOG_WAIT);
    assert!(
        line.contains("report.txt: not a DICOM Part 10 file"),
        "{line}"
    );
    let line = gateway.wait_for_log(&[&refused, "undeliverable"], LOG_WAIT);
    assert!(
        line.contains("garbage.dcm: the store answered 400 Bad Request"),
        "{line}"
    );
    gateway.wait_for_log(&[&after, "delivered"], LOG_WAIT);
    stored_identical(&orthanc, &sop_uid(9), &good);
    assert_eq!(orthanc.instance_count().unwrap(), 1);

    for id in [&not_dicom, &refused] {
        let reason =
            std::fs::read_to_string(d.path(&format!("spool/gateway/{id}/undeliverable"))).unwrap();
        assert!(reason.contains("undeliverable"), "{reason}");
        assert!(!d.path(&format!("spool/gateway/{id}/delivered")).exists());
        let failed = gateway_audit(&d, "failed", id);
        assert_eq!(failed.len(), 1, "one `failed` record for {id}");
        assert!(
            failed[0]["detail"]
                .as_str()
                .unwrap()
                .contains("undeliverable"),
            "{failed:?}"
        );
    }

    // A restart does not try the set-aside transfers again (start-up recovery queues
    // before the service reports ready).
    gateway.terminate().unwrap();
    let gateway = d.serve(&d.gateway_config()).unwrap();
    assert!(
        !gateway
            .log()
            .contains("delivering a transfer committed before the restart"),
        "{}",
        gateway.log()
    );

    // The operator's way to try one again: remove its `undeliverable` file, then SIGHUP.
    // Only that transfer is queued (the delivered one is not delivered twice); here it is
    // still not DICOM, so it is set aside once more, with a second `failed` record.
    std::fs::remove_file(d.path(&format!("spool/gateway/{not_dicom}/undeliverable"))).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let line = gateway.wait_for_log(&["SIGHUP", "delivery queue rescanned"], LOG_WAIT);
    assert!(line.contains("requeued=1"), "{line}");
    gateway.wait_for_log(&[&not_dicom, "undeliverable"], LOG_WAIT);
    assert_eq!(gateway_audit(&d, "failed", &not_dicom).len(), 2);
    assert!(
        !gateway
            .log()
            .contains(&format!("delivered transfer={after}"))
    );
}

/// `file` without its StudyInstanceUID (0020,000D): the element is cut out of the data set
/// (explicit VR little endian, no group length), so the rest stays well formed.
fn without_study_uid(file: &Path) {
    let bytes = std::fs::read(file).unwrap();
    let value = b"1.2.826.0.1.3680043.10.543.100";
    let mut element = vec![0x20, 0x00, 0x0d, 0x00, b'U', b'I', value.len() as u8, 0];
    element.extend_from_slice(value);
    let at = bytes
        .windows(element.len())
        .position(|w| w == element.as_slice())
        .expect("the instance has a StudyInstanceUID");
    let mut cut = bytes[..at].to_vec();
    cut.extend_from_slice(&bytes[at + element.len()..]);
    std::fs::write(file, cut).unwrap();
}

/// One transfer, sent with `baylink send` of raw files (no hospital door checked them), holds
/// instances the store refuses among good ones, spread over several STOW-RS requests: an
/// instance without a StudyInstanceUID (Orthanc refuses it in its answer, FailureReason
/// 0xC000, storing its neighbours) and one whose data set ends in the middle of an element
/// (Orthanc names it nowhere; alone, it is refused again). Every good instance lands in
/// Orthanc byte-identical, the later requests are sent, and the signed notice (outcome
/// `partial`) lists each refused instance with the store's reason.
#[test]
fn refused_instances_do_not_sink_their_transfer_and_the_notice_lists_them() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    // Instances of about 1.1 KiB, at most 2300 bytes per request: [61, 62], [63, 64],
    // [65, 66], [67].
    let d = deployment(&orthanc.dicomweb_url(), &[("batch_bytes", "2300")]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("study");
    let files: Vec<PathBuf> = (61..=67)
        .map(|n| instance(&src, n, Some("P-0001")))
        .collect();
    without_study_uid(&files[2]);
    let whole = std::fs::read(&files[4]).unwrap();
    std::fs::write(&files[4], &whole[..900]).unwrap(); // inside the pixel data
    let args: Vec<&str> = [
        "--no-progress",
        "--wait-delivered",
        "--delivered-timeout",
        "60s",
    ]
    .into_iter()
    .chain(files.iter().map(|f| f.to_str().unwrap()))
    .collect();
    let out = d.send(&args).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let s = baylink_tests::summary(&out).unwrap();
    let id = s["transfer_id"].as_str().unwrap().to_owned();
    let n = &s["delivery"];
    assert_eq!(
        n["outcome"],
        "partial",
        "{s}
send: {stderr}
gateway:
{}
orthanc:
{}",
        gateway.log(),
        orthanc.log()
    );
    // Not delivered whole: exit 6, each refused instance on stderr.
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("not delivered whole: the record store refused 2 instance(s)")
            && stderr.contains(&sop_uid(63))
            && stderr.contains(&sop_uid(65)),
        "{stderr}"
    );
    assert_eq!(n["signature"], "verified");
    assert_eq!(n["refused_total"], 2, "{n}");
    let refused = n["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2, "{n}");
    let no_study = &refused[0];
    assert_eq!(no_study["file"], "i63.dcm");
    assert_eq!(no_study["sop_instance_uid"], sop_uid(63).as_str());
    assert_eq!(no_study["sop_class_uid"], "1.2.840.10008.5.1.4.1.1.2");
    assert_eq!(no_study["failure_reason"], "0xc000", "{no_study}");
    assert!(
        no_study["reason"]
            .as_str()
            .unwrap()
            .contains("the store answered 400 Bad Request: failure reason 0xc000"),
        "{no_study}"
    );
    let cut = &refused[1];
    assert_eq!(cut["file"], "i65.dcm");
    assert_eq!(
        cut["sop_instance_uid"],
        sop_uid(65).as_str(),
        "from its meta header"
    );
    assert_eq!(cut["failure_reason"], serde_json::Value::Null);
    assert!(
        cut["reason"]
            .as_str()
            .unwrap()
            .contains("named it neither stored nor failed"),
        "{cut}"
    );

    // Every good instance is in Orthanc as it was sent, the last request's too.
    for (n, f) in [(61, 0), (62, 1), (64, 3), (66, 5), (67, 6)] {
        stored_identical(&orthanc, &sop_uid(n), &files[f]);
    }
    assert_eq!(orthanc.instance_count().unwrap(), 5);
    for n in [63, 65] {
        assert!(orthanc.instance_file(&sop_uid(n)).unwrap().is_none());
    }

    // The gateway: delivered (not set aside), its record naming the refusals; the per-instance
    // outcome kept in stow.acked.
    let line = gateway.wait_for_log(&[&id, "delivered but for the instances"], LOG_WAIT);
    assert!(line.contains("refused=2"), "{line}");
    assert!(
        !d.path(&format!("spool/gateway/{id}/undeliverable"))
            .exists()
    );
    assert!(d.path(&format!("spool/gateway/{id}/delivered")).exists());
    let delivered = gateway_audit(&d, "delivered", &id);
    assert_eq!(delivered.len(), 1);
    let detail = delivered[0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("partial: 5 of 7 instances stored; 2 instances refused: i63.dcm ("),
        "{detail}"
    );
    assert!(gateway_audit(&d, "failed", &id).is_empty());
    let acked = stow_acked(&d, &id);
    assert_eq!(acked["ended"], true, "{acked}");
    assert_eq!(acked["refused"].as_array().unwrap().len(), 2, "{acked}");

    // The edge recorded the notice with the refused instances.
    let records = super::notice::notified(&d, &id);
    assert_eq!(records.len(), 1, "{records:?}");
    let detail = records[0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("partial; store answer sha256 "),
        "{detail}"
    );
    assert!(
        detail.contains(&format!(
            "; 2 refused: {} 0xc000, {}",
            sop_uid(63),
            sop_uid(65)
        )),
        "{detail}"
    );
    assert!(gateway.terminate().unwrap().success());
    super::notice::audit_verifies(&d.edge_config());
    super::notice::audit_verifies(&d.gateway_config());
}

#[test]
fn a_store_that_is_down_is_retried_until_it_answers() {
    if skip() {
        return;
    }
    // Orthanc's port is known before it runs: start it after the transfer is committed.
    let placeholder = Orthanc::start().unwrap();
    let url = placeholder.dicomweb_url();
    let port = placeholder.port;
    drop(placeholder);
    let d = deployment(&url, &[]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let src = d.path("study");
    let file = instance(&src, 4, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);
    let line = gateway.wait_for_log(&[&id, "delivery failed"], LOG_WAIT);
    assert!(line.contains("cannot connect"), "{line}");

    let orthanc = Orthanc::start_on(port).unwrap();
    gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    stored_identical(&orthanc, &sop_uid(4), &file);
}

/// Orthanc behind a TLS proxy that requires client certificates from the deployment CA,
/// serving the gateway's own certificate (it names 127.0.0.1) as the store's.
fn tls_store(d: &Deployment, orthanc: &Orthanc) -> TlsProxy {
    let pki = |f: &str| d.path(&format!("pki/{f}"));
    TlsProxy::start(
        (&pki("gateway.pem"), &pki("gateway.key"), &pki("ca.pem")),
        &pki("ca.pem"),
        orthanc.port,
        (&pki("gateway.pem"), &pki("gateway.key")),
        "/system",
    )
    .unwrap()
}

/// Orthanc behind stunnel, and a running gateway that delivers to it over https, trusting
/// the deployment's `ca` (a path inside it) and presenting its own certificate.
struct HttpsStore {
    gateway: Service,
    d: Deployment,
    proxy: TlsProxy,
    orthanc: Orthanc,
}

fn https_store(ca: &str) -> HttpsStore {
    https_store_with(ca, &[])
}

/// [`https_store`] with more `[delivery]` keys.
fn https_store_with(ca: &str, extra: &[(&str, &str)]) -> HttpsStore {
    let orthanc = Orthanc::start().unwrap();
    let d = Deployment::with_tls_key_files().unwrap();
    let proxy = tls_store(&d, &orthanc);
    let url = format!("https://127.0.0.1:{}/dicom-web", proxy.port);
    let ca = format!("\"{ca}\"");
    let mut keys = vec![
        ("ca", ca.as_str()),
        ("cert", "\"pki/gateway.pem\""),
        ("key", "\"pki/gateway.key\""),
    ];
    keys.extend_from_slice(extra);
    let d = with_delivery(d, &url, &keys);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    HttpsStore {
        gateway,
        d,
        proxy,
        orthanc,
    }
}

fn skip_tls() -> bool {
    skip_if(stunnel_unavailable()) || skip()
}

#[test]
fn an_https_store_gets_the_study_with_the_gateways_client_certificate() {
    if skip_tls() {
        return;
    }
    let HttpsStore {
        gateway,
        d,
        proxy,
        orthanc,
    } = https_store("pki/ca.pem");
    let src = d.path("study");
    let files: Vec<PathBuf> = (5..=6).map(|n| instance(&src, n, Some("P-0001"))).collect();
    let id = send(&d, &files, &gateway);
    let line = gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    // The location is the store's own RetrieveURL (Orthanc does not know its proxy).
    assert!(
        line.contains("/dicom-web/studies/1.2.826.0.1.3680043.10.543.100"),
        "{line}"
    );
    assert!(
        proxy.log().contains("accepted connection"),
        "{}",
        proxy.log()
    );
    for (n, f) in (5..=6).zip(&files) {
        stored_identical(&orthanc, &sop_uid(n), f);
    }
}

/// A CA of the store's own and a server certificate for 127.0.0.1 it signed (openssl), for
/// a deployment that keeps no PEM server key: `(ca, cert, key)` under `dir`.
fn store_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let p = |f: &str| dir.join(f);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "400"],
            &["-subj", "/CN=record store test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "store.key",
                "-out",
                "store.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        p("store.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "store.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "store.pem",
        "-days",
        "400",
        "-extfile",
        "store.ext",
    ]);
    (p("ca.pem"), p("store.pem"), p("store.key"))
}

/// The gateway's client key for the store can stay in the HSM (`delivery.key =
/// "pkcs11:object=..."`): the store, which requires a client certificate from the
/// deployment's CA, accepts the handshake the token signed and gets the study.
#[test]
fn an_https_store_gets_the_study_with_a_client_key_held_in_the_hsm() {
    if skip_tls() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    // dev-env's default: the gateway's TLS key is on its token, and no PEM key exists.
    let d = Deployment::new().unwrap();
    assert!(!d.path("pki/gateway.key").exists());
    let (store_ca, store_cert, store_key) = store_pki(&d.path("store-pki"));
    let pki = |f: &str| d.path(&format!("pki/{f}"));
    let proxy = TlsProxy::start(
        (&store_cert, &store_key, &store_ca),
        &pki("ca.pem"),
        orthanc.port,
        (&pki("hospital-a.pem"), &pki("hospital-a.key")),
        "/system",
    )
    .unwrap();
    let d = with_delivery(
        d,
        &format!("https://127.0.0.1:{}/dicom-web", proxy.port),
        &[
            ("ca", &format!("{store_ca:?}")),
            ("cert", "\"pki/gateway.pem\""),
            ("key", "\"pkcs11:object=baylink-tls\""),
        ],
    );
    let check = check_config(&d.gateway_config(), false);
    assert!(check.status.success(), "{check:?}");
    let gateway = d.serve(&d.gateway_config()).unwrap();
    assert!(
        gateway.log().contains("config_key=delivery.key"),
        "{}",
        gateway.log()
    );
    let file = instance(&d.path("study"), 8, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);
    gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    assert!(
        proxy.log().contains("accepted connection"),
        "{}",
        proxy.log()
    );
    stored_identical(&orthanc, &sop_uid(8), &file);
}

/// A `delivery.key` naming a key the token does not hold stops `check-config` and `serve`
/// with the key named (fail closed: no delivery without the configured identity).
#[test]
fn a_delivery_key_missing_from_the_token_is_refused_by_name() {
    let d = Deployment::new().unwrap();
    let d = with_delivery(
        d,
        "https://127.0.0.1:9/dicom-web",
        &[
            ("ca", "\"pki/ca.pem\""),
            ("cert", "\"pki/gateway.pem\""),
            ("key", "\"pkcs11:object=no-such-key\""),
        ],
    );
    let check = check_config(&d.gateway_config(), false);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success(), "{text}");
    assert!(text.contains("error: delivery.key:"), "{text}");
    assert!(text.contains("no-such-key"), "{text}");
    let refused = format!("{:#}", d.serve(&d.gateway_config()).unwrap_err());
    assert!(
        refused.contains("exited")
            && refused.contains("delivery.key")
            && refused.contains("no-such-key"),
        "serve refuses it too, naming it: {refused}"
    );
}

#[test]
fn a_store_whose_certificate_is_not_from_delivery_ca_gets_nothing() {
    if skip_tls() {
        return;
    }
    // The rogue certificate stands in for a CA the store's certificate does not chain to.
    // (`proxy` bound, so it lives as long as the test.)
    let HttpsStore {
        gateway,
        d,
        orthanc,
        proxy: _proxy,
    } = https_store("pki/rogue.pem");
    let file = instance(&d.path("study"), 7, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);
    let line = gateway.wait_for_log(&[&id, "delivery failed"], LOG_WAIT);
    assert!(line.contains("TLS handshake with the store"), "{line}");
    assert!(
        !gateway.log().contains("undeliverable"),
        "a TLS failure is retried, not set aside"
    );
    assert_eq!(orthanc.instance_count().unwrap(), 0);
}

/// SIGHUP renews `delivery.ca` (with `delivery.cert` and `delivery.key`) as it renews
/// `tls.*`: a store the CA file does not vouch for gets nothing, and once the file holds the
/// store's CA and the gateway is reloaded, the next attempt delivers, with no restart.
#[test]
fn a_delivery_ca_renewed_on_sighup_serves_the_next_attempt() {
    if skip_tls() {
        return;
    }
    let HttpsStore {
        gateway,
        d,
        orthanc,
        proxy: _proxy,
    } = https_store_with(
        "pki/rogue.pem",
        &[("retry_base", "\"200ms\""), ("retry_max", "\"1s\"")],
    );
    let file = instance(&d.path("study"), 8, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);
    let line = gateway.wait_for_log(&[&id, "delivery failed"], LOG_WAIT);
    assert!(line.contains("TLS handshake with the store"), "{line}");
    // A reload that cannot read delivery.ca changes nothing and says so, naming the key.
    std::fs::rename(d.path("pki/rogue.pem"), d.path("pki/rogue.pem.old")).unwrap();
    signal(gateway.pid(), "HUP").unwrap();
    let line = gateway.wait_for_log(&["TLS not reloaded"], LOG_WAIT);
    assert!(line.contains("delivery.ca: cannot read"), "{line}");
    // The renewed file is put in place whole, as an operator's `mv` would.
    let staged = d.path("pki/rogue.pem.new");
    std::fs::copy(d.path("pki/ca.pem"), &staged).unwrap();
    std::fs::rename(&staged, d.path("pki/rogue.pem")).unwrap();
    signal(gateway.pid(), "HUP").unwrap();
    gateway.wait_for_log(&["delivery TLS reloaded"], LOG_WAIT);
    gateway.wait_for_log(&[&id, "delivered"], LOG_WAIT);
    stored_identical(&orthanc, &sop_uid(8), &file);
}

/// A hospital upload over HTTPS, delivered by STOW-RS into a real Orthanc: the hospital's
/// long poll reaches `delivered`, and the gateway's signed notice names the transfer, its
/// Merkle root and Orthanc's RetrieveURL.
#[test]
fn delivery_notice_a_hospital_upload_in_orthanc_reaches_delivered() {
    if skip() {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let d = deployment(&orthanc.dicomweb_url(), &[]);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = super::ingest::Api { d: &d };
    let src = d.path("study");
    let file = instance(&src, 41, Some("P-0001"));
    let id = super::notice::upload(&api, "i41.dcm", &file);

    let s = super::notice::wait_settled(&api, &id);
    assert_eq!(
        s["state"],
        "delivered",
        "{s}\ngateway:\n{}\nedge:\n{}",
        gateway.log(),
        edge.log()
    );
    stored_identical(&orthanc, &sop_uid(41), &file);
    let a = api.curl(
        Some("hospital-a"),
        &[&api.url(&format!("/v1/transfers/{id}/delivery"))],
    );
    assert_eq!(a.status, 200, "{a:?}");
    let n = &a.json()["fields"];
    assert_eq!(n["outcome"], "delivered");
    assert_eq!(n["transfer_id"], id.as_str());
    assert_eq!(n["merkle_root"], s["receipt"]["merkle_root"]);
    assert!(
        n["answer"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/studies/", orthanc.dicomweb_url())),
        "{n}"
    );
    assert_eq!(super::notice::notified(&d, &id).len(), 1);
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
    super::notice::audit_verifies(&d.edge_config());
}

/// How many files of transfer `id` the gateway has recorded as confirmed by the store
/// (`stow.acked`); 0 before the first answer.
fn confirmed_files(d: &Deployment, id: &str) -> usize {
    let Ok(bytes) = std::fs::read(d.path(&format!("spool/gateway/{id}/stow.acked"))) else {
        return 0;
    };
    let acked: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    acked["batches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["files"].as_array().map_or(0, Vec::len))
        .sum()
}

/// The hospital's side end to end: dcmtk `storescu` → the edge's C-STORE door → QUIC →
/// gateway → STOW-RS → Orthanc. Orthanc is frozen in the middle of the delivery (a request
/// in flight, the rest not sent), then killed with SIGKILL and started again on its storage,
/// as a crash of the record store's host would leave it. Every instance is in the record
/// once (one `NewInstance` change each in Orthanc's change log), its data set byte-identical
/// to what the modality sent, and the hospital's `GET /v1/transfers/{id}` reaches
/// `delivered`.
#[test]
fn a_storescu_study_lands_once_across_an_orthanc_crash_mid_delivery() {
    use super::dicom::{data_set, run, scu, store_responses, text};

    if skip() {
        return;
    }
    const N: u32 = 24;
    let mut orthanc = Orthanc::start().unwrap();
    // One instance per STOW-RS request: the delivery has many steps to be cut between.
    let d = deployment(&orthanc.dicomweb_url(), &[("batch_bytes", "1")]);
    let (gateway, edge) = super::dicom::start(&d);
    let src = d.path("study");
    let files: Vec<PathBuf> = (1..=N)
        .map(|n| instance(&src, 600 + n, Some("P-0001")))
        .collect();

    let out = run(scu("storescu", &d, "STORESCU", "BAYLINK")
        .arg("-v")
        .args(&files));
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert_eq!(store_responses(&said, "Success"), N as usize, "{said}");

    // The first instance in the store: freeze the store where it is.
    let deadline = std::time::Instant::now() + EVENT_WAIT;
    while orthanc.instance_count().unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing reached Orthanc within {EVENT_WAIT:?}\ngateway:\n{}\nedge:\n{}",
            gateway.log(),
            edge.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    orthanc.freeze().unwrap();
    let ids = baylink_tests::spool_entries(&d.path("spool/edge"));
    assert_eq!(ids.len(), 1, "one association, one transfer: {ids:?}");
    let id = &ids[0];
    let before = confirmed_files(&d, id);
    assert!(
        before < N as usize,
        "the delivery had ended when the store was frozen ({before} of {N} confirmed): \
         nothing was cut"
    );
    orthanc.crash_and_restart().unwrap();

    let api = super::ingest::Api { d: &d };
    let s = super::notice::wait_settled(&api, id);
    assert_eq!(
        s["state"],
        "delivered",
        "{s}\ngateway:\n{}\nedge:\n{}\nOrthanc:\n{}",
        gateway.log(),
        edge.log(),
        orthanc.log()
    );
    assert_eq!(orthanc.instance_count().unwrap(), N as usize);
    let stored_dir = d.path("stored");
    std::fs::create_dir_all(&stored_dir).unwrap();
    for (n, file) in (601..=600 + N).zip(&files) {
        let uid = sop_uid(n);
        let stored = orthanc
            .instance_file(&uid)
            .unwrap()
            .unwrap_or_else(|| panic!("Orthanc has no instance {uid}"));
        let copy = stored_dir.join(format!("{n}.dcm"));
        std::fs::write(&copy, stored).unwrap();
        // The edge writes its own file meta group; the data set travels unchanged.
        assert!(
            data_set(&copy) == data_set(file),
            "Orthanc's data set of {uid} differs from what storescu sent"
        );
    }
    let changes: serde_json::Value =
        serde_json::from_slice(&orthanc.get("/changes?limit=10000").unwrap()).unwrap();
    let new_instances = changes["Changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ChangeType"] == "NewInstance")
        .count();
    assert_eq!(
        new_instances, N as usize,
        "each instance stored once: {changes}"
    );
}

/// `baylink-bench orthanc` on a small study: both contestants store every slice in a real
/// Orthanc, dcmtk runs with Nagle's algorithm off, and the report's stages add up.
#[test]
fn heavy_bench_orthanc_stores_a_small_study_both_ways() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = baylink_tests::run_bench(
        &["orthanc", "--study-size", "4MiB", "--runs", "1"],
        dir.path(),
    );
    assert_eq!(r["dcmtk_tcp_nodelay"], true, "{r}");
    assert_eq!(r["slices"], 8, "{r}");
    assert_eq!(r["baseline_runs"].as_array().unwrap().len(), 1, "{r}");
    let run = &r["baylink_runs"][0];
    let at = |k: &str| run[k].as_f64().unwrap();
    assert!(
        0.0 < at("cstore")
            && at("cstore") <= at("receipt")
            && at("receipt") <= at("first_stored")
            && at("first_stored") <= at("all_stored"),
        "{run}"
    );
    assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");
}
