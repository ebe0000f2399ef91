//! End-to-end transfers: edge `send` to a gateway `serve`, bytes compared at the destination.

use std::process::Command;

use baylink_tests::{
    Deployment, baylink_bin, payload, sha256_file, skip_if, summary, xfs_unavailable,
};

/// Chunk size the small-transfer tests configure, so chunk boundaries are cheap to cross.
const SMALL_CHUNK: u64 = 64 * 1024;

fn deployment_with_chunk(chunk: u64) -> Deployment {
    let d = Deployment::new().expect("dev-env");
    d.set("edge.toml", "transport", "chunk_size", &chunk.to_string())
        .expect("edit config");
    d
}

/// Sends `sizes` as one transfer and checks every delivered file is byte-identical.
fn roundtrip(d: &Deployment, sizes: &[u64]) -> serde_json::Value {
    roundtrip_logged(d, sizes, |_| {})
}

/// [`roundtrip`], handing the gateway's log to `check` once the send has finished.
fn roundtrip_logged(d: &Deployment, sizes: &[u64], check: impl Fn(&str)) -> serde_json::Value {
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| payload(&src, &format!("file-{i}.dcm"), len, i as u64 + 7).unwrap())
        .collect();
    let mut args: Vec<&str> = vec!["--no-progress"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let out = d.send(&args).expect("send runs");
    assert!(
        out.status.success(),
        "send failed: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    let s = summary(&out).unwrap();
    let id = s["transfer_id"].as_str().unwrap().to_owned();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("transfer {id}")),
        "stderr names the transfer"
    );
    assert_eq!(s["files"], sizes.len());
    assert_eq!(s["bytes"], sizes.iter().sum::<u64>());
    assert_eq!(s["wire_bytes"], sizes.iter().sum::<u64>());
    assert_eq!(s["receipt"], "verified");
    assert_eq!(s["merkle_root"].as_str().unwrap().len(), 64);
    // The offer was answered before `send` could finish, so its log lines are written.
    check(&gateway.log());

    // Delivery runs after the receipt: wait for it by stopping the gateway, which drains.
    let status = gateway.terminate().expect("gateway stops");
    assert!(status.success(), "gateway exit: {status}");
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let got = d.delivered(&id, name);
        assert!(got.exists(), "{} was not delivered", got.display());
        assert_eq!(
            sha256_file(f).unwrap(),
            sha256_file(&got).unwrap(),
            "{name} differs"
        );
    }
    s
}

#[test]
fn empty_file_arrives() {
    roundtrip(&deployment_with_chunk(SMALL_CHUNK), &[0]);
}

#[test]
fn one_byte_file_arrives() {
    roundtrip(&deployment_with_chunk(SMALL_CHUNK), &[1]);
}

#[test]
fn chunk_boundaries_arrive() {
    roundtrip(
        &deployment_with_chunk(SMALL_CHUNK),
        &[SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1],
    );
}

#[test]
fn multi_file_transfer_arrives() {
    roundtrip(
        &deployment_with_chunk(SMALL_CHUNK),
        &[3 * SMALL_CHUNK + 17, 0, 5, 10 * SMALL_CHUNK, 12_345],
    );
}

#[test]
fn heavy_one_gib_with_default_chunks_arrives() {
    let d = Deployment::new().expect("dev-env");
    let s = roundtrip(&d, &[1 << 30]);
    eprintln!("1 GiB: {s}");
}

/// File names of 255 bytes (the protocol's limit): one ASCII, one of multi-byte UTF-8.
pub(crate) fn longest_names() -> [String; 2] {
    let ascii = format!("{}.dcm", "n".repeat(251));
    // 83 three-byte characters, one two-byte character and `.dcm`.
    let utf8 = format!("{}é.dcm", "診".repeat(83));
    assert_eq!((ascii.len(), utf8.len()), (255, 255));
    [ascii, utf8]
}

/// A name as long as a name may be is stored under the appliance's own key on both spools
/// (its `.part` would be over the file system's 255-byte limit) and delivered under the
/// hospital's name, byte-identical.
#[test]
fn names_of_255_bytes_arrive_byte_identical() {
    let d = deployment_with_chunk(SMALL_CHUNK);
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let src = d.path("payload");
    std::fs::create_dir_all(&src).unwrap();
    let files: Vec<_> = longest_names()
        .iter()
        .enumerate()
        .map(|(i, name)| payload(&src, name, 3 * SMALL_CHUNK + 5, i as u64 + 40).unwrap())
        .collect();
    let (s, id) = d.send_ok(&[&files[0], &files[1]], &gateway);
    assert_eq!(s["files"], 2);
    let status = gateway.terminate().expect("gateway stops");
    assert!(status.success(), "gateway exit: {status}");
    for (f, name) in files.iter().zip(longest_names()) {
        let got = d.delivered(&id, &name);
        assert!(got.exists(), "{} was not delivered", got.display());
        assert_eq!(sha256_file(f).unwrap(), sha256_file(&got).unwrap());
    }
    // Both spools hold the payload under keys, never under the hospital's names.
    for side in ["edge", "gateway"] {
        let data = d.path(&format!("spool/{side}/{id}/data"));
        let mut keys: Vec<String> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        keys.sort();
        let mut want: Vec<String> = longest_names()
            .iter()
            .map(|n| baylink::transfer_dir::payload_key(n))
            .collect();
        want.sort();
        assert_eq!(keys, want, "{side}");
    }
}

/// On a file system that shares blocks (XFS with reflink), `send` of a file on the spool's
/// file system clones it into the spool instead of copying it (`cloned_bytes` says so), and
/// the gateway gets the same bytes. The clone is the transfer's own: a write to the source
/// after the seal leaves the spool's payload, and what was signed, as they were.
#[test]
fn send_clones_a_file_on_the_spools_file_system() {
    if skip_if(xfs_unavailable()) {
        return;
    }
    let d = deployment_with_chunk(SMALL_CHUNK);
    let gateway = d.serve(&d.gateway_config()).expect("gateway starts");
    let len = 5 * SMALL_CHUNK + 123;
    let original = payload(d.dir.path(), "scan.dcm", len, 11).unwrap();
    let image = d.path("xfs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "mkfs.xfs: {mkfs:?}");
    let mount = d.path("xfs");
    std::fs::create_dir_all(&mount).unwrap();
    d.set(
        "edge.toml",
        "spool",
        "dir",
        &format!("{:?}", mount.join("spool")),
    )
    .unwrap();

    // The mount lives as long as this shell: it sends, overwrites the source, and copies
    // the edge's spool out for the checks below.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-euc"])
        .arg(
            r#"mount -o loop "$0" "$1"
cp "$2" "$1/scan.dcm"
"$3" send --no-progress --config "$4" "$1/scan.dcm" > "$5"
printf 'changed after the seal' | dd of="$1/scan.dcm" bs=1 seek=100 conv=notrunc 2>/dev/null
cp -r "$1/spool" "$6""#,
        )
        .arg(&image)
        .arg(&mount)
        .arg(&original)
        .arg(baylink_bin())
        .arg(d.edge_config())
        .arg(d.path("summary.json"))
        .arg(d.path("spool-copy"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("summary.json")).unwrap()).unwrap();
    assert_eq!(s["cloned_bytes"], len, "{s}");
    assert_eq!(s["bytes"], len);
    let id = s["transfer_id"].as_str().unwrap().to_owned();

    let spooled: Vec<_> = std::fs::read_dir(d.path("spool-copy").join(&id).join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(spooled.len(), 1, "{spooled:?}");
    let want = sha256_file(&original).unwrap();
    assert_eq!(
        sha256_file(&spooled[0]).unwrap(),
        want,
        "the clone kept its bytes"
    );
    let status = gateway.terminate().expect("gateway stops");
    assert!(status.success(), "gateway exit: {status}");
    assert_eq!(sha256_file(&d.delivered(&id, "scan.dcm")).unwrap(), want);
}

/// Where the spool's file system cannot clone (the test's temporary directory on ext4 or
/// tmpfs), `send` copies, and says it cloned nothing.
#[test]
fn send_copies_where_the_file_system_cannot_clone() {
    let d = deployment_with_chunk(SMALL_CHUNK);
    let probe = d.path("probe");
    std::fs::write(&probe, b"probe").unwrap();
    let clones = Command::new("cp")
        .arg("--reflink=always")
        .arg(&probe)
        .arg(d.path("probe-clone"))
        .output()
        .unwrap()
        .status
        .success();
    let s = roundtrip(&d, &[3 * SMALL_CHUNK + 5]);
    if clones {
        eprintln!("the temporary directory's file system clones: nothing to check here");
        return;
    }
    assert_eq!(s["cloned_bytes"], 0, "{s}");
}

/// A new transfer's chunks go to the gateway while `send` is still sealing: the gateway
/// stages them, takes those matching the signed manifest at the offer, and nothing is sent
/// twice. The delivered file is byte-identical.
#[test]
fn chunks_streamed_while_sealing_are_taken_by_the_offer() {
    const SIZE: u64 = 64 << 20;
    let d = Deployment::new().expect("dev-env");
    let s = roundtrip_logged(&d, &[SIZE], |log| {
        assert!(
            log.contains("announced: staging chunks until the offer"),
            "the gateway did not stage the announced transfer:\n{log}"
        );
        assert!(
            log.contains("staged chunks taken by the offer"),
            "no staged chunk was taken at the offer:\n{log}"
        );
    });
    assert_eq!(s["wire_bytes"], SIZE, "a chunk was sent twice");
    assert!(s["streamed_bytes"].as_u64().unwrap() > 0, "{s}");
}

/// A transfer of more files than the gateway stages for one announcement (1024) is not
/// taken: nothing is streamed, and the send goes on as without streaming.
#[test]
fn an_announcement_the_gateway_does_not_take_streams_nothing() {
    let d = Deployment::new().expect("dev-env");
    let s = roundtrip_logged(&d, &[100; 1025], |log| {
        assert!(!log.contains("staged chunks taken"), "{log}");
    });
    assert_eq!(s["streamed_bytes"], 0, "{s}");
}

/// With `transport.stream_while_sealing = false` nothing is announced: the chunks go once
/// the manifest is signed.
#[test]
fn send_streams_nothing_while_sealing_when_told_not_to() {
    let d = Deployment::new().expect("dev-env");
    d.set("edge.toml", "transport", "stream_while_sealing", "false")
        .unwrap();
    let s = roundtrip_logged(&d, &[8 << 20], |log| {
        assert!(!log.contains("announced"), "{log}");
    });
    assert_eq!(s["streamed_bytes"], 0, "{s}");
}
