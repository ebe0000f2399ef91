//! How the gateway retries a STOW-RS delivery: the real gateway against a scripted store on
//! 127.0.0.1 that gives the answers Orthanc cannot be made to give (503 then success, 429
//! with `Retry-After`, a 4xx, a failure between batches), in front of a real Orthanc where
//! a test needs the store itself. The store is the downstream we do not own; everything of
//! baylink's is real.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use baylink_tests::{Deployment, EVENT_WAIT, Orthanc, Service, orthanc_unavailable, skip_if};

use super::compliance::audit_records;
use super::dicom::{instance, sop_uid};
use super::ingest::Api;
use super::notice::{audit_verifies, notified, upload, wait_settled};

/// One request the stub store received.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    /// When its first line arrived.
    start: Instant,
    /// The same by the system clock (to compare with an HTTP-date).
    wall: SystemTime,
    /// When the stub had written its answer.
    answered: Instant,
    /// The request body (the multipart of DICOM instances).
    body: Vec<u8>,
    /// The number of parts in it.
    parts: usize,
}

impl Seen {
    /// Whether the instance with SOP Instance UID `uid` is in this request.
    pub(super) fn carries(&self, uid: &str) -> bool {
        self.body.windows(uid.len()).any(|w| w == uid.as_bytes())
    }
}

/// What the stub does with a request.
pub(super) enum Answer {
    /// Answers itself: status, extra header lines, body.
    Say(u16, Vec<String>, String),
    /// Passes the request to the HTTP server on this 127.0.0.1 port (a real store) and
    /// relays its answer.
    Forward(u16),
}

/// Decides the answer to request `n` (0-based) from what it carried.
pub(super) type Script = dyn Fn(usize, &Seen) -> Answer + Send + Sync;

/// A scripted DICOMweb store: HTTP/1.1 on a free 127.0.0.1 port, one request per connection
/// (as the gateway sends them), each answered by the script and recorded.
pub(super) struct StubStore {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StubStore {
    pub(super) fn start(script: Box<Script>) -> StubStore {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                // A request cut short (the gateway killed mid-way) is not recorded.
                let _ = serve_one(conn, &script, &log);
            }
        });
        StubStore {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The DICOMweb base URL (`delivery.url`).
    pub(super) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/dicom-web", self.port)
    }

    /// The requests received so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for StubStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(conn: TcpStream, script: &Script, log: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(EVENT_WAIT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(()); // the wake-up connection
    }
    let (start, wall) = (Instant::now(), SystemTime::now());
    // The request line and headers, as they came but for `Connection`, for forwarding.
    let mut head = line.clone();
    let (mut length, mut boundary) = (0usize, String::new());
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "content-type" => {
                if let Some((_, b)) = value.split_once("boundary=") {
                    boundary = b.trim_matches('"').to_owned();
                }
            }
            "connection" => continue,
            _ => {}
        }
        head.push_str(&line);
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let delimiter = format!("--{boundary}\r\n");
    let parts = body
        .windows(delimiter.len())
        .filter(|w| *w == delimiter.as_bytes())
        .count();
    let mut seen = Seen {
        start,
        wall,
        answered: start,
        body,
        parts,
    };
    let n = log.lock().unwrap().len();
    let out = match script(n, &seen) {
        Answer::Say(status, headers, text) => {
            let mut out = format!(
                "HTTP/1.1 {status} Scripted\r\nContent-Type: application/dicom+json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n",
                text.len()
            );
            for h in headers {
                out.push_str(&h);
                out.push_str("\r\n");
            }
            out.push_str("\r\n");
            out.push_str(&text);
            out.into_bytes()
        }
        Answer::Forward(port) => {
            let mut store = TcpStream::connect(("127.0.0.1", port))?;
            store.set_read_timeout(Some(EVENT_WAIT))?;
            store.write_all(head.as_bytes())?;
            store.write_all(&seen.body)?;
            let mut out = Vec::new();
            store.read_to_end(&mut out)?;
            out
        }
    };
    let mut conn = conn;
    conn.write_all(&out)?;
    conn.flush()?;
    seen.answered = Instant::now();
    log.lock().unwrap().push(seen);
    Ok(())
}

/// A STOW-RS confirmation of every part of `seen`, naming request `n` in its RetrieveURL.
fn confirm(n: usize, seen: &Seen) -> Answer {
    let items = vec!["{}"; seen.parts].join(",");
    Answer::Say(
        200,
        Vec::new(),
        format!(
            r#"{{"00081190":{{"vr":"UR","Value":["http://stub/dicom-web/studies/req{n}"]}},
               "00081199":{{"vr":"SQ","Value":[{items}]}}}}"#
        ),
    )
}

pub(super) fn answer(status: u16, headers: &[&str], body: &str) -> Answer {
    Answer::Say(
        status,
        headers.iter().map(|h| (*h).to_owned()).collect(),
        body.to_owned(),
    )
}

/// A deployment whose gateway delivers to `store` with fast retries (`retry_max` as
/// given), plus `extra` `[delivery]` keys, and its running gateway.
fn gateway_for(
    store: &StubStore,
    retry_max: &str,
    extra: &[(&str, &str)],
) -> (Deployment, Service) {
    let d = Deployment::new().unwrap();
    let gw = "gateway.toml";
    d.set(gw, "delivery", "kind", "\"dicomweb\"").unwrap();
    d.set(gw, "delivery", "url", &format!("\"{}\"", store.url()))
        .unwrap();
    d.set(gw, "delivery", "retry_base", "\"100ms\"").unwrap();
    d.set(gw, "delivery", "retry_max", &format!("\"{retry_max}\""))
        .unwrap();
    for (key, value) in extra {
        d.set(gw, "delivery", key, value).unwrap();
    }
    let gateway = d.serve(&d.gateway_config()).unwrap();
    (d, gateway)
}

/// Transfer `id`'s `stow.acked` on the gateway of `d`: what the store answered so far.
pub(super) fn stow_acked(d: &Deployment, id: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(d.path(&format!("spool/gateway/{id}/stow.acked"))).unwrap(),
    )
    .unwrap()
}

/// Sends `files` as one transfer; its id.
fn send(d: &Deployment, files: &[PathBuf], gateway: &Service) -> String {
    let files: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
    d.send_ok(&files, gateway).1
}

/// The value of `baylink_delivery_retries_total{cause="<cause>"}` on the gateway (0 if
/// absent).
fn retries(d: &Deployment, cause: &str) -> u64 {
    let text = d.metrics(true).unwrap();
    let prefix = format!("baylink_delivery_retries_total{{cause=\"{cause}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn deliver_retries_a_503_and_then_delivers_into_orthanc() {
    if skip_if(orthanc_unavailable()) {
        return;
    }
    // A real Orthanc behind a front that answers the first request 503 (a store warming up)
    // and passes the rest through.
    let orthanc = Orthanc::start().unwrap();
    let port = orthanc.port;
    let store = StubStore::start(Box::new(move |n, _| match n {
        0 => answer(503, &[], "warming up"),
        _ => Answer::Forward(port),
    }));
    let (d, gateway) = gateway_for(&store, "1s", &[]);
    let file = instance(&d.path("study"), 21, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);

    let line = gateway.wait_for_log(&[&id, "delivered"], EVENT_WAIT);
    assert!(
        line.contains("/dicom-web/studies/1.2.826.0.1.3680043.10.543.100"),
        "Orthanc's RetrieveURL: {line}"
    );
    let stored = orthanc
        .instance_file(&sop_uid(21))
        .unwrap()
        .unwrap_or_else(|| panic!("Orthanc has no instance:\n{}", orthanc.log()));
    assert_eq!(
        stored,
        std::fs::read(&file).unwrap(),
        "byte-identical in Orthanc"
    );
    let failed = gateway.wait_for_log(&[&id, "delivery failed"], EVENT_WAIT);
    assert!(failed.contains("503"), "{failed}");
    assert!(failed.contains("cause=server_error"), "{failed}");
    let seen = store.seen();
    assert_eq!(seen.len(), 2, "one refusal, one retry");
    assert!(seen.iter().all(|s| s.carries(&sop_uid(21))));
    assert_eq!(retries(&d, "server_error"), 1);
    assert!(
        !d.path(&format!("spool/gateway/{id}/undeliverable"))
            .exists()
    );
    assert!(d.path(&format!("spool/gateway/{id}/delivered")).exists());
}

/// `at` (whole seconds) as an HTTP-date (IMF-fixdate), by `date`.
fn http_date(at: SystemTime) -> String {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let out = std::process::Command::new("date")
        .env("LC_ALL", "C")
        .args([
            "-u",
            "+%a, %d %b %Y %H:%M:%S GMT",
            "-d",
            &format!("@{secs}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn deliver_waits_at_least_the_stores_retry_after_on_429() {
    // First Retry-After in seconds, then as an HTTP-date (3 s ahead, in whole seconds).
    let date = Arc::new(Mutex::new(None));
    let named = date.clone();
    let store = StubStore::start(Box::new(move |n, seen| match n {
        0 => answer(429, &["Retry-After: 2"], "slow down"),
        1 => {
            let secs = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 3;
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            *named.lock().unwrap() = Some(at);
            answer(
                429,
                &[&format!("Retry-After: {}", http_date(at))],
                "still busy",
            )
        }
        _ => confirm(n, seen),
    }));
    // retry_max above Retry-After, so the store's wait is not cut short by the cap.
    let (d, gateway) = gateway_for(&store, "10s", &[]);
    let file = instance(&d.path("study"), 22, Some("P-0001"));
    let id = send(&d, std::slice::from_ref(&file), &gateway);

    gateway.wait_for_log(&[&id, "delivered"], EVENT_WAIT);
    let failed = gateway.wait_for_log(&[&id, "delivery failed"], EVENT_WAIT);
    assert!(failed.contains("429"), "{failed}");
    assert!(failed.contains("retry_after=Some(2s)"), "{failed}");
    let seen = store.seen();
    assert_eq!(seen.len(), 3);
    let waited = seen[1].start.duration_since(seen[0].answered);
    assert!(
        waited >= Duration::from_secs(2),
        "retried {waited:?} after a 429 with Retry-After: 2"
    );
    let date = date.lock().unwrap().unwrap();
    assert!(
        seen[2].wall >= date,
        "retried {:?} before the Retry-After date",
        date.duration_since(seen[2].wall).unwrap_or_default()
    );
    assert_eq!(retries(&d, "throttled"), 2);
}

#[test]
fn deliver_sets_a_4xx_aside_at_once_with_the_stores_reason() {
    let store = StubStore::start(Box::new(|n, seen| {
        if seen.carries(&sop_uid(23)) {
            answer(413, &[], "request body larger than this store takes")
        } else {
            confirm(n, seen)
        }
    }));
    let (d, gateway) = gateway_for(&store, "1s", &[]);
    let src = d.path("study");
    let refused = send(&d, &[instance(&src, 23, Some("P-0001"))], &gateway);
    // The queue moves on: a later transfer is delivered.
    let after = send(&d, &[instance(&src, 24, Some("P-0001"))], &gateway);

    let line = gateway.wait_for_log(&[&refused, "undeliverable"], EVENT_WAIT);
    assert!(line.contains("the store answered 413"), "{line}");
    assert!(line.contains("larger than this store takes"), "{line}");
    gateway.wait_for_log(&[&after, "delivered"], EVENT_WAIT);

    // Exactly one request for the refused transfer (no retry), then the next transfer's.
    let seen = store.seen();
    assert_eq!(seen.len(), 2, "{} requests", seen.len());
    assert!(seen[0].carries(&sop_uid(23)) && seen[1].carries(&sop_uid(24)));
    assert!(
        !gateway
            .log()
            .lines()
            .any(|l| l.contains(&refused) && l.contains("delivery failed")),
        "a 413 is not retried:\n{}",
        gateway.log()
    );
    // The reason is kept: the `undeliverable` file and the `failed` audit record.
    let reason =
        std::fs::read_to_string(d.path(&format!("spool/gateway/{refused}/undeliverable"))).unwrap();
    assert!(
        reason.contains("413") && reason.contains("larger than this store takes"),
        "{reason}"
    );
    let failed: Vec<_> = audit_records(&d, "gateway")
        .into_iter()
        .filter(|r| r["kind"] == "failed" && r["transfer"] == refused.as_str())
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]["detail"].as_str().unwrap().contains("413"),
        "{failed:?}"
    );
    assert_eq!(retries(&d, "server_error") + retries(&d, "throttled"), 0);
}

#[test]
fn after_a_failed_request_the_open_one_is_answered_and_recorded_before_the_retry() {
    // Two instances, one per request, both open at once. The store serves one connection
    // at a time and fails the first request it reads, whichever it is, after a pause in
    // which the other request has reached it whole; that one is still open then, waiting
    // for its turn, and is confirmed.
    let store = StubStore::start(Box::new(move |n, seen| {
        if n == 0 {
            std::thread::sleep(Duration::from_millis(300));
            answer(503, &["Retry-After: 0"], "busy")
        } else {
            confirm(n, seen)
        }
    }));
    let src = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (41..=42)
        .map(|n| instance(src.path(), n, Some("P-0001")))
        .collect();
    let len = |f: &PathBuf| std::fs::metadata(f).unwrap().len();
    let batch_bytes = len(&files[0]).max(len(&files[1])).to_string();
    let (d, gateway) = gateway_for(
        &store,
        "1s",
        &[("batch_bytes", &batch_bytes), ("requests_in_flight", "2")],
    );
    let id = send(&d, &files, &gateway);
    gateway.wait_for_log(&[&id, "delivered"], EVENT_WAIT);
    assert!(
        gateway
            .log()
            .contains("STOW-RS: a request failed; no more are sent in this attempt"),
        "{}",
        gateway.log()
    );
    // The open request's answer was waited for and recorded in the attempt that failed:
    // the retry knew it and sent only the failed one. Three requests in all, each instance
    // confirmed once.
    let log = gateway.log();
    assert!(
        log.lines().any(
            |l| l.contains("already confirmed or refused are not sent again")
                && l.contains(&id)
                && l.contains("confirmed=1")
        ),
        "{log}"
    );
    let seen = store.seen();
    let failed = if seen[0].carries(&sop_uid(41)) {
        41
    } else {
        42
    };
    let other = 83 - failed;
    let carried = |n: u32| seen.iter().filter(|s| s.carries(&sop_uid(n))).count();
    assert_eq!(
        (seen.len(), carried(failed), carried(other)),
        (3, 2, 1),
        "requests: {:?}",
        seen.iter().map(|s| s.parts).collect::<Vec<_>>()
    );
    assert!(seen[1].carries(&sop_uid(other)) && seen[2].carries(&sop_uid(failed)));
    let acked = stow_acked(&d, &id);
    assert_eq!(acked["batches"].as_array().unwrap().len(), 2, "{acked}");
}

#[test]
fn deliver_sends_a_confirmed_batch_once_across_a_retry_and_a_restart() {
    // Batch 2 fails with 503 until `healed`; batch 1 is confirmed at once.
    let healed = Arc::new(AtomicBool::new(false));
    let ok = healed.clone();
    let store = StubStore::start(Box::new(move |n, seen| {
        if seen.carries(&sop_uid(33)) && !ok.load(Ordering::SeqCst) {
            answer(503, &["Retry-After: 0"], "busy")
        } else {
            confirm(n, seen)
        }
    }));
    // Three instances, at most the first two's bytes per request: [31, 32], [33].
    let src = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (31..=33)
        .map(|n| instance(src.path(), n, Some("P-0001")))
        .collect();
    let len = |f: &PathBuf| std::fs::metadata(f).unwrap().len();
    let batch_bytes = (len(&files[0]) + len(&files[1])).to_string();
    // One request at a time: the store sees batch 1 first.
    let (d, gateway) = gateway_for(
        &store,
        "1s",
        &[("batch_bytes", &batch_bytes), ("requests_in_flight", "1")],
    );
    let id = send(&d, &files, &gateway);

    // Batch 2 refused twice: the second time is a retry, which sends only batch 2.
    let deadline = Instant::now() + EVENT_WAIT;
    while store
        .seen()
        .iter()
        .filter(|s| s.carries(&sop_uid(33)))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "no retry of batch 2:\n{}",
            gateway.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked = std::fs::read_to_string(d.path(&format!("spool/gateway/{id}/stow.acked"))).unwrap();
    assert!(
        acked.contains("i31.dcm") && acked.contains("i32.dcm"),
        "{acked}"
    );
    assert!(!acked.contains("i33.dcm"), "{acked}");

    // A crash (SIGKILL), the store recovers, the gateway starts again.
    gateway.kill().unwrap();
    healed.store(true, Ordering::SeqCst);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let line = gateway.wait_for_log(&[&id, "delivered"], EVENT_WAIT);
    // The location is still the first batch's, whichever request ended the delivery.
    assert!(
        line.contains("location=http://stub/dicom-web/studies/req0"),
        "{line}"
    );
    gateway.wait_for_log(
        &["already confirmed or refused are not sent again", &id],
        EVENT_WAIT,
    );

    let seen = store.seen();
    for n in [31, 32] {
        let times = seen.iter().filter(|s| s.carries(&sop_uid(n))).count();
        assert_eq!(times, 1, "instance {n} (batch 1) sent {times} times");
    }
    assert_eq!(seen[0].parts, 2, "batch 1 is [31, 32]");
    for s in &seen[1..] {
        assert_eq!(s.parts, 1, "only batch 2 after batch 1");
        assert!(s.carries(&sop_uid(33)));
    }
    assert!(seen.len() >= 3);
    assert!(d.path(&format!("spool/gateway/{id}/delivered")).exists());
}

/// A transfer the store refuses instance by instance (STOW-RS 409 with FailedSOPSequence) is
/// set aside; the gateway's signed notice says so, and the hospital's status reaches `failed`
/// naming each refused instance with the store's FailureReason.
#[test]
fn delivery_notice_of_a_refused_transfer_fails_it_with_each_instances_reason() {
    let store = StubStore::start(Box::new(|_, _| {
        let uid = sop_uid(31);
        answer(
            409,
            &[],
            &format!(
                r#"{{"00081198":{{"vr":"SQ","Value":[{{"00081150":{{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.7"]}},"00081155":{{"vr":"UI","Value":["{uid}"]}},"00081197":{{"vr":"US","Value":[43264]}}}}]}}}}"#
            ),
        )
    }));
    let (d, gateway) = gateway_for(&store, "1s", &[]);
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let src = d.path("study");
    let file = instance(&src, 31, Some("P-0001"));
    let id = upload(&api, "x.dcm", &file);

    let s = wait_settled(&api, &id);
    assert_eq!(s["state"], "failed", "{s}\nedge:\n{}", edge.log());
    let error = s["error"].as_str().unwrap();
    assert!(error.contains("undeliverable"), "{error}");
    assert!(
        error.contains(&format!(
            "x.dcm ({}): the store answered 409 Conflict: failure reason 0xa900",
            sop_uid(31)
        )),
        "{error}"
    );
    // The receipt stays: the transfer crossed, the record store refused it.
    assert!(s["receipt"]["merkle_root"].is_string(), "{s}");
    let a = api.curl(
        Some("hospital-a"),
        &[&api.url(&format!("/v1/transfers/{id}/delivery"))],
    );
    assert_eq!(a.status, 200, "{a:?}");
    let doc = a.json();
    assert_eq!(doc["fields"]["outcome"], "undeliverable");
    // The notice lists the refused instance with the store's FailureReason.
    assert_eq!(doc["fields"]["refused_total"], 1, "{doc}");
    let r = &doc["fields"]["refused"][0];
    assert_eq!(r["file"], "x.dcm", "{doc}");
    assert_eq!(r["sop_instance_uid"], sop_uid(31).as_str());
    assert_eq!(
        r["sop_class_uid"], "1.2.840.10008.5.1.4.1.1.7",
        "the store's"
    );
    assert_eq!(r["failure_reason"], "0xa900");
    assert!(
        doc["fields"]["answer"]
            .as_str()
            .unwrap()
            .contains("failure reason 0xa900"),
        "{doc}"
    );
    let records = notified(&d, &id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("undeliverable; store answer sha256 "),
        "{records:?}"
    );
    assert_eq!(store.seen().len(), 1, "refused content is not retried");
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
    audit_verifies(&d.edge_config());
}

/// A hospital upload of three instances, two per request: the store refuses one instance of
/// the first request (409, FailedSOPSequence with FailureReason 0xA900) and stores nothing
/// of it. The gateway sends its neighbour again alone and the second request as planned
/// (both reach a real Orthanc), keeps the refusal, and the hospital's transfer ends
/// `partial`: `GET …/delivery` lists the refused instance with the store's reason.
#[test]
fn delivery_notice_of_a_partly_refused_upload_lists_the_refused_instance() {
    if skip_if(orthanc_unavailable()) {
        return;
    }
    let orthanc = Orthanc::start().unwrap();
    let port = orthanc.port;
    let bad = sop_uid(72);
    let store = StubStore::start(Box::new(move |_, seen| {
        if seen.carries(&bad) {
            answer(
                409,
                &[],
                &format!(
                    r#"{{"00081198":{{"vr":"SQ","Value":[{{"00081150":{{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.2"]}},"00081155":{{"vr":"UI","Value":["{bad}"]}},"00081197":{{"vr":"US","Value":[43264]}}}}]}}}}"#
                ),
            )
        } else {
            Answer::Forward(port)
        }
    }));
    let src = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (71..=73)
        .map(|n| instance(src.path(), n, Some("P-0001")))
        .collect();
    let len = |f: &PathBuf| std::fs::metadata(f).unwrap().len();
    let batch_bytes = (len(&files[0]) + len(&files[1])).to_string();
    let (d, gateway) = gateway_for(&store, "1s", &[("batch_bytes", &batch_bytes)]);
    let edge = d.serve(&d.edge_config()).unwrap();
    let api = Api { d: &d };
    let a = api.declare(
        "hospital-a",
        r#"{"patient_id":"P-0001","category":"diagnostic-image","purpose":"care","destination":"hk-ehealth"}"#,
    );
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.json()["id"].as_str().unwrap().to_owned();
    for (n, f) in (71..=73).zip(&files) {
        let r = api.put("hospital-a", &id, &format!("x{n}.dcm"), f, &[]);
        assert_eq!(r.status, 201, "{r:?}");
    }
    assert_eq!(api.commit("hospital-a", &id).status, 202);

    let s = wait_settled(&api, &id);
    assert_eq!(
        s["state"],
        "partial",
        "{s}
gateway:
{}
edge:
{}",
        gateway.log(),
        edge.log()
    );
    let error = s["error"].as_str().unwrap();
    assert!(
        error.contains("refused 1 of its instances")
            && error.contains(&format!(
                "{}: the store answered 409 Conflict: failure reason 0xa900",
                sop_uid(72)
            )),
        "{error}"
    );
    let a = api.curl(
        Some("hospital-a"),
        &[&api.url(&format!("/v1/transfers/{id}/delivery"))],
    );
    assert_eq!(a.status, 200, "{a:?}");
    let doc = a.json();
    let fields = &doc["fields"];
    assert_eq!(fields["outcome"], "partial", "{doc}");
    assert_eq!(fields["version"], 2);
    assert_eq!(fields["refused_total"], 1);
    assert_eq!(
        fields["refused"],
        serde_json::json!([{
            "file": "x72.dcm",
            "sop_instance_uid": sop_uid(72),
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "failure_reason": "0xa900",
            "reason": "the store answered 409 Conflict: failure reason 0xa900 (data set does not match SOP class)",
        }]),
        "{doc}"
    );
    assert!(
        fields["answer"]
            .as_str()
            .unwrap()
            .contains("/dicom-web/studies/1.2.826.0.1.3680043.10.543.100"),
        "Orthanc's RetrieveURL: {doc}"
    );
    // Both neighbours are in Orthanc as sent; the refused one was sent once, its neighbour
    // again alone, the second request as planned.
    for (n, f) in [(71, &files[0]), (73, &files[2])] {
        let stored = orthanc
            .instance_file(&sop_uid(n))
            .unwrap()
            .unwrap_or_else(|| panic!("Orthanc has no instance {n}:\n{}", orthanc.log()));
        assert_eq!(stored, std::fs::read(f).unwrap(), "{n} byte-identical");
    }
    assert_eq!(orthanc.instance_count().unwrap(), 2);
    let seen = store.seen();
    let mut parts: Vec<(usize, bool, bool, bool)> = seen
        .iter()
        .map(|s| {
            (
                s.parts,
                s.carries(&sop_uid(71)),
                s.carries(&sop_uid(72)),
                s.carries(&sop_uid(73)),
            )
        })
        .collect();
    // The first request first; the neighbour alone and the second request may come in
    // either order (two requests are open at once).
    parts[1..].sort_unstable();
    assert_eq!(
        parts,
        [
            (2, true, true, false),
            (1, false, false, true),
            (1, true, false, false)
        ]
    );
    let records = notified(&d, &id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("partial; store answer sha256 "),
        "{records:?}"
    );
    assert!(edge.terminate().unwrap().success());
    assert!(gateway.terminate().unwrap().success());
    audit_verifies(&d.edge_config());
}

/// The per-instance outcome survives a crash: the store refuses one instance of the first
/// request (409) and stores its neighbour when sent alone, then fails the second request
/// (503) until the gateway was killed and started again. After the restart only the second
/// request is sent: neither the refused instance nor its stored neighbour goes again, and
/// the transfer ends delivered but for the refused one, which the signed notice lists.
#[test]
fn deliver_keeps_a_refused_instance_across_a_restart_and_does_not_send_it_again() {
    let healed = Arc::new(AtomicBool::new(false));
    let ok = healed.clone();
    let bad = sop_uid(81);
    let store = StubStore::start(Box::new(move |n, seen| {
        if seen.carries(&bad) {
            answer(
                409,
                &[],
                &format!(
                    r#"{{"00081198":{{"vr":"SQ","Value":[{{"00081155":{{"vr":"UI","Value":["{bad}"]}},"00081197":{{"vr":"US","Value":[272]}}}}]}}}}"#
                ),
            )
        } else if seen.carries(&sop_uid(83)) && !ok.load(Ordering::SeqCst) {
            answer(503, &["Retry-After: 0"], "busy")
        } else {
            confirm(n, seen)
        }
    }));
    // [81, 82], then [83].
    let src = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = (81..=83)
        .map(|n| instance(src.path(), n, Some("P-0001")))
        .collect();
    let len = |f: &PathBuf| std::fs::metadata(f).unwrap().len();
    let batch_bytes = (len(&files[0]) + len(&files[1])).to_string();
    // One request at a time: [82] alone is answered before [83] is sent.
    let (d, gateway) = gateway_for(
        &store,
        "1s",
        &[("batch_bytes", &batch_bytes), ("requests_in_flight", "1")],
    );
    let id = send(&d, &files, &gateway);

    let deadline = Instant::now() + EVENT_WAIT;
    while store
        .seen()
        .iter()
        .filter(|s| s.carries(&sop_uid(83)))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "no retry of the second request:\n{}",
            gateway.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked = stow_acked(&d, &id);
    assert_eq!(acked["refused"][0]["file"], "i81.dcm", "{acked}");
    assert_eq!(acked["refused"][0]["failure_reason"], 272, "{acked}");
    assert_eq!(
        acked["batches"][0]["files"],
        serde_json::json!(["i82.dcm"]),
        "{acked}"
    );

    gateway.kill().unwrap();
    healed.store(true, Ordering::SeqCst);
    let gateway = d.serve(&d.gateway_config()).unwrap();
    let line = gateway.wait_for_log(&[&id, "delivered but for the instances"], EVENT_WAIT);
    assert!(line.contains("refused=1"), "{line}");
    gateway.wait_for_log(
        &["already confirmed or refused are not sent again", &id],
        EVENT_WAIT,
    );

    let seen = store.seen();
    let times = |n: u32| seen.iter().filter(|s| s.carries(&sop_uid(n))).count();
    assert_eq!(times(81), 1, "the refused instance is sent once");
    assert_eq!(times(82), 2, "with 81, then alone; not after the restart");
    assert!(times(83) >= 3, "{}", times(83));
    assert!(seen.last().unwrap().carries(&sop_uid(83)));
    assert!(d.path(&format!("spool/gateway/{id}/delivered")).exists());

    let notice = std::fs::read(d.path(&format!("spool/gateway/{id}/notice.bin"))).unwrap();
    let n = baylink_net::proto::DeliveryNotice::from_bytes(&notice).unwrap();
    assert_eq!(n.outcome.as_str(), "partial");
    let v = serde_json::to_value(&n).unwrap();
    assert_eq!(v["refused_total"], 1, "{v}");
    assert_eq!(
        v["refused"][0]["sop_instance_uid"],
        sop_uid(81).as_str(),
        "{v}"
    );
    assert_eq!(v["refused"][0]["failure_reason"], "0x0110", "{v}");
    assert!(
        v["refused"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("409 Conflict: failure reason 0x0110 (processing failure)"),
        "{v}"
    );
}
