//! Faults in the middle of a transfer: the gateway or the sender is killed with SIGKILL; the
//! transfer completes from the spool, byte-identical, without sending everything again.

use std::path::Path;

use baylink_tests::{Deployment, payload, sha256_file, summary};

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
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    let s = summary(&out).unwrap();
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
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    let s = summary(&out).unwrap();
    assert_eq!(s["transfer_id"], id.as_str());
    assert_eq!(s["bytes"], SIZE);
    let wire = s["wire_bytes"].as_u64().unwrap();
    assert!(wire < SIZE, "resume sent everything again: {wire}");
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, &id, &src);
}
