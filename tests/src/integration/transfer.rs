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
