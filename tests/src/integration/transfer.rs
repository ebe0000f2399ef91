//! End-to-end transfers: edge `send` to a gateway `serve`, bytes compared at the destination.

use baylink_tests::{Deployment, payload, sha256_file, summary};

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
