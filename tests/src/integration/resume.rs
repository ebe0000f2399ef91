//! Faults in the middle of a transfer: the gateway or the sender is killed with SIGKILL; the
//! transfer completes from the spool, byte-identical, without sending everything again.

use std::path::Path;

use baylink_tests::{Deployment, EVENT_WAIT, baylink_bin, payload, sent, sha256_file};

const SIZE: u64 = 512 << 20;

pub(crate) fn only_transfer(spool: &Path) -> String {
    let mut ids = baylink_tests::spool_entries(spool);
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids.remove(0)
}

pub(crate) fn assert_delivered(d: &Deployment, id: &str, src: &Path) {
    let got = d.delivered(id, src.file_name().unwrap().to_str().unwrap());
    assert!(got.exists(), "{} was not delivered", got.display());
    assert_eq!(sha256_file(src).unwrap(), sha256_file(&got).unwrap());
}

#[test]
fn heavy_gateway_killed_mid_transfer_then_restarted_completes() {
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SIZE, 11).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let mut sender = d.spawn_send(&src, true).unwrap();
    d.wait_for_gateway_progress(&mut sender);
    gw.kill().unwrap();
    // The sender keeps retrying; a new gateway on the same spool picks the transfer up.
    let gw = d.serve(&d.gateway_config()).unwrap();
    let out = sender.wait_with_output().unwrap();
    let s = sent(&out, &gw);
    let wire = s["wire_bytes"].as_u64().unwrap();
    assert!(wire < 2 * SIZE, "resent too much: {wire} of {SIZE}");
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, s["transfer_id"].as_str().unwrap(), &src);
}

#[test]
fn heavy_sender_killed_then_resume_finishes_from_the_spool() {
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SIZE, 12).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let mut sender = d.spawn_send(&src, false).unwrap();
    d.wait_for_gateway_progress(&mut sender);
    sender.kill().unwrap();
    sender.wait().unwrap();
    let id = only_transfer(&d.path("spool/edge"));

    let out = d.send(&["--resume", &id]).unwrap();
    let s = sent(&out, &gw);
    assert_eq!(s["transfer_id"], id.as_str());
    assert_eq!(s["bytes"], SIZE);
    let wire = s["wire_bytes"].as_u64().unwrap();
    assert!(wire < SIZE, "resume sent everything again: {wire}");
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, &id, &src);
}

/// A transfer in flight during an upgrade from the layout that stored payload under the
/// hospital's names (`data/<name>` on the edge, `data/<name>.part` on the gateway): both
/// spools are put back into that layout while the transfer is stopped, and `--resume`
/// finishes it from the chunks the gateway already holds.
#[test]
fn a_transfer_in_flight_during_the_upgrade_resumes_from_the_old_layout() {
    use baylink::transfer_dir::payload_key;
    const SIZE: u64 = 160 << 20;
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SIZE, 13).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let mut sender = d.spawn_send(&src, false).unwrap();
    let state = d.wait_for_gateway_progress(&mut sender);
    sender.kill().unwrap();
    sender.wait().unwrap();
    gw.kill().unwrap();
    let id = only_transfer(&d.path("spool/edge"));
    let key = payload_key("series.bin");
    let edge_data = d.path(&format!("spool/edge/{id}/data"));
    std::fs::rename(edge_data.join(&key), edge_data.join("series.bin")).unwrap();
    let gw_data = state.parent().unwrap().join("data");
    std::fs::rename(
        gw_data.join(format!("{key}.part")),
        gw_data.join("series.bin.part"),
    )
    .unwrap();

    let gw = d.serve(&d.gateway_config()).unwrap();
    let out = d.send(&["--resume", &id]).unwrap();
    let s = sent(&out, &gw);
    let wire = s["wire_bytes"].as_u64().unwrap();
    assert!(wire < SIZE, "the gateway's chunks were not adopted: {wire}");
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, &id, &src);
    assert!(edge_data.join(&key).exists() && !edge_data.join("series.bin").exists());
}

/// A gateway killed while the edge is still sealing and streaming chunks to it: what it
/// staged goes with it (a gateway that starts clears `.staging/`), the send offers on a new
/// connection once the gateway is back and sends every chunk there, and the file arrives
/// byte-identical.
#[test]
fn heavy_gateway_killed_while_chunks_stream_during_the_seal() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SIZE, 14).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    // `spawn_send` turns streaming off; this send keeps the default.
    let sender = Command::new(baylink_bin())
        .args(["send", "--no-progress", "--config"])
        .arg(d.edge_config())
        .arg(&src)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once staged bytes are on its disk, while the seal goes on.
    let staging = d.path("spool/gateway/.staging");
    let deadline = Instant::now() + EVENT_WAIT;
    let staged_bytes = || -> u64 { walk_sizes(&staging) };
    while staged_bytes() == 0 {
        assert!(Instant::now() < deadline, "nothing was staged");
        std::thread::sleep(Duration::from_millis(5));
    }
    gw.kill().unwrap();
    assert!(staged_bytes() > 0);
    let gw = d.serve(&d.gateway_config()).unwrap();
    assert_eq!(staged_bytes(), 0, "a gateway that starts clears .staging");
    let out = sender.wait_with_output().unwrap();
    let s = sent(&out, &gw);
    // Streamed to the gateway that died, then all of it again.
    assert!(s["wire_bytes"].as_u64().unwrap() >= SIZE, "{s}");
    assert_eq!(s["streamed_bytes"], 0, "{s}");
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, s["transfer_id"].as_str().unwrap(), &src);
    assert_eq!(staged_bytes(), 0);
}

/// The bytes of every file under `dir` (0 when it does not exist).
fn walk_sizes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => walk_sizes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
