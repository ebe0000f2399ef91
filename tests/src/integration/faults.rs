//! Faults at rest and a full disk: a spool chunk that no longer matches its digest is caught
//! before it is sent or committed, and a gateway whose spool fills up pauses the transfer and
//! resumes it once space returns.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baylink::transfer_dir::payload_key;
use baylink_tests::{Deployment, EVENT_WAIT, payload, sent};

use crate::resume::{assert_delivered, only_transfer};

const SIZE: u64 = 256 << 20;

/// Flips every bit of the byte at `offset` in `path`.
fn flip_byte(path: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0xFF;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn heavy_gateway_chunk_flipped_at_rest_is_fetched_again() {
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SIZE, 21).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let mut sender = d.spawn_send(&src, true).unwrap();
    let state = d.wait_for_gateway_progress(&mut sender);
    gw.kill().unwrap();
    // Chunk 0 is on record as durable (the first checkpoint covers it): damage it on disk.
    let part = state
        .parent()
        .unwrap()
        .join(format!("data/{}.part", payload_key("series.bin")));
    flip_byte(&part, 1000);

    let gw = d.serve(&d.gateway_config()).unwrap();
    let out = sender.wait_with_output().unwrap();
    let s = sent(&out, &gw);
    assert!(
        gw.log().contains("no longer matches its digest at rest"),
        "the damaged chunk was not noticed:\n{}",
        gw.log()
    );
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, s["transfer_id"].as_str().unwrap(), &src);
}

#[test]
fn heavy_edge_chunk_flipped_at_rest_is_caught_before_sending() {
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SIZE, 22).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let mut sender = d.spawn_send(&src, false).unwrap();
    d.wait_for_gateway_progress(&mut sender);
    sender.kill().unwrap();
    sender.wait().unwrap();
    let id = only_transfer(&d.path("spool/edge"));
    // The last chunk has not crossed yet (chunks go roughly in order): damage the sealed copy.
    let sealed = d
        .path("spool/edge")
        .join(&id)
        .join("data")
        .join(payload_key("series.bin"));
    flip_byte(&sealed, SIZE - 1);

    let out = d.send(&["--resume", &id]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a corrupt spool was sent: {stderr}");
    assert!(
        stderr.contains("no longer matches its digest"),
        "unclear error: {stderr}"
    );
    assert!(
        !d.path("delivered").join(&id).exists(),
        "a transfer with a corrupt chunk was delivered"
    );
    // The edge told the gateway why it gave up, in a frame on the control stream (unlike a
    // close frame, stream data is retransmitted until acknowledged): the gateway let go of
    // the transfer at once, not after its 30 s idle timeout (which also held up its drain).
    let line = gw.wait_for_log(&["transfer failed", "no longer matches"], EVENT_WAIT);
    assert!(line.contains(&id), "{line}");
    // The gateway never saw a bad chunk from this edge and is still serving.
    assert!(!gw.log().contains("does not match"), "{}", gw.log());
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn heavy_gateway_disk_full_pauses_then_resumes() {
    if baylink_tests::skip_if(baylink_tests::mount_namespace_unavailable()) {
        return;
    }
    const SMALL: u64 = 64 << 20;
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SMALL, 23).unwrap();
    let spool = d.path("spool/gateway");
    // The gateway runs in its own mount namespace with its spool on a 24 MiB tmpfs: the
    // 64 MiB transfer cannot fit until the test grows the file system. `delivered/` stays on
    // the real disk, so delivery also crosses file systems.
    let gw = d
        .serve_on_small_disk(&d.gateway_config(), "spool/gateway", "24m")
        .unwrap();

    let sender = d.spawn_send(&src, true).unwrap();
    gw.wait_for_log(&["spool is full"], Duration::from_secs(120));
    assert!(
        std::fs::read_dir(d.path("delivered"))
            .unwrap()
            .next()
            .is_none(),
        "something was delivered from a full spool"
    );
    // Space comes back: grow the tmpfs inside the gateway's mount namespace.
    let st = Command::new("nsenter")
        .args(["-t", &gw.pid().to_string(), "-m", "--", "mount", "-o"])
        .arg("remount,size=256m")
        .arg(&spool)
        .status()
        .unwrap();
    assert!(st.success(), "cannot grow the tmpfs");

    let out = sender.wait_with_output().unwrap();
    let s = sent(&out, &gw);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spool is full"),
        "the edge did not say why it waited: {stderr}"
    );
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, s["transfer_id"].as_str().unwrap(), &src);
}

/// A power cut loses what was written but not yet fsynced. This test is harsher: after a
/// SIGKILL it cuts the gateway's `.part` file back to its first 8 MiB and lets the file grow
/// again as zeros, destroying whatever the kernel had not written out and more. The restarted
/// gateway trusts only chunks it can read back intact, so the transfer still completes
/// byte-identical.
#[test]
fn heavy_gateway_power_cut_losing_unsynced_writes_recovers() {
    let d = Deployment::new().unwrap();
    let src = payload(d.dir.path(), "series.bin", SIZE, 24).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let mut sender = d.spawn_send(&src, true).unwrap();
    let state = d.wait_for_gateway_progress(&mut sender);
    gw.kill().unwrap();
    let part = state
        .parent()
        .unwrap()
        .join(format!("data/{}.part", payload_key("series.bin")));
    let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(8 << 20).unwrap();
    f.set_len(len).unwrap();
    f.sync_all().unwrap();

    let gw = d.serve(&d.gateway_config()).unwrap();
    let out = sender.wait_with_output().unwrap();
    let s = sent(&out, &gw);
    // The first checkpoint covers 64 MiB, so chunks past the first 8 MiB were on record.
    assert!(
        gw.log().contains("no longer matches its digest at rest"),
        "{}",
        gw.log()
    );
    assert!(gw.terminate().unwrap().success());
    assert_delivered(&d, s["transfer_id"].as_str().unwrap(), &src);
}
