//! A hostile or broken edge, played by hand over real QUIC with the edge's real certificate:
//! every bad input ends the transfer with an error frame naming the reason, and nothing
//! reaches the delivery directory.

use std::sync::Arc;

use baylink_net::proto::{
    ChunkHasher, ChunkHeader, ErrorCode, Frame, FrameDecoder, Limits, ManifestBuilder,
    PROTOCOL_VERSION, TransferId, encode,
};
use baylink_net::transport::{self, LinkTuning, TlsIdentity};
use baylink_tests::{Deployment, EVENT_WAIT, Service};
use bytes::BytesMut;

struct Peer {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Peer {
    async fn connect(d: &Deployment) -> Peer {
        let ca = transport::load_ca(&d.path("pki/ca.pem")).unwrap();
        let id =
            TlsIdentity::from_pem_files(&d.path("pki/edge.pem"), &d.path("pki/edge.key")).unwrap();
        let endpoint = transport::client_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &ca,
            &id,
            &LinkTuning::default(),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", d.base_port + 2).parse().unwrap();
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Peer {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(Limits::default()),
        }
    }

    async fn frame(&mut self, f: &Frame) {
        let mut buf = BytesMut::new();
        encode(f, &mut buf);
        self.send.write_all(&buf).await.unwrap();
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    async fn hello(&mut self) {
        self.frame(&Frame::Hello {
            version: PROTOCOL_VERSION,
            appliance_id: "edge".into(),
        })
        .await;
    }

    /// The next frame from the gateway (None when its side ends), bounded in time.
    async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(EVENT_WAIT, async {
            let mut buf = vec![0u8; 65536];
            loop {
                if let Some(f) = self.decoder.next_frame().unwrap() {
                    return Some(f);
                }
                match self.recv.read(&mut buf).await {
                    Ok(Some(n)) => self.decoder.push(&buf[..n]),
                    _ => return None,
                }
            }
        })
        .await
        .expect("the gateway answers within EVENT_WAIT")
    }

    /// Reads frames until an Error frame; returns its code and text.
    async fn error(&mut self) -> (ErrorCode, String) {
        while let Some(f) = self.next().await {
            if let Frame::Error { code, text } = f {
                return (code, text);
            }
        }
        panic!("the gateway ended the stream without an error frame");
    }
}

fn gateway(d: &Deployment) -> Service {
    d.serve(&d.gateway_config()).unwrap()
}

fn assert_nothing_delivered(d: &Deployment) {
    assert_eq!(
        std::fs::read_dir(d.path("delivered")).unwrap().count(),
        0,
        "something reached the delivery directory"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A manifest with the given (size, name) files, chunk size 4096, fake declaration.
fn manifest_bytes(files: &[(&str, &[u8])]) -> (baylink_net::proto::Manifest, Vec<u8>) {
    let mut b = ManifestBuilder::new(TransferId::new_v7(), "edge", [7; 32], "C-1", 4096);
    for (name, data) in files {
        let mut h = ChunkHasher::new(4096);
        h.update(data);
        b.add_file((*name).to_owned(), data.len() as u64, h.finish())
            .unwrap();
    }
    let m = b.finish(1).unwrap();
    let bytes = m.to_bytes();
    (m, bytes)
}

fn offer(manifest: Vec<u8>) -> Frame {
    Frame::Offer {
        manifest: manifest.into(),
        signature: vec![0u8; 64].into(),
    }
}

#[test]
fn frame_longer_than_its_limit_ends_the_transfer() {
    let d = Deployment::with_tls_key_files().unwrap();
    let gw = gateway(&d);
    runtime().block_on(async {
        let mut p = Peer::connect(&d).await;
        p.hello().await;
        // An Offer frame header claiming 4 GiB of payload.
        let mut hdr = BytesMut::new();
        encode(&offer(vec![1]), &mut hdr);
        let kind = hdr[0];
        p.raw(&[kind, 0xff, 0xff, 0xff, 0xff]).await;
        let (code, text) = p.error().await;
        assert_eq!(code, ErrorCode::FrameTooLong, "{text}");
    });
    assert!(gw.terminate().unwrap().success());
    assert_nothing_delivered(&d);
}

#[test]
fn unknown_frame_type_ends_the_transfer() {
    let d = Deployment::with_tls_key_files().unwrap();
    let gw = gateway(&d);
    runtime().block_on(async {
        let mut p = Peer::connect(&d).await;
        p.hello().await;
        p.raw(&[0x7f, 0, 0, 0, 0]).await;
        let (code, text) = p.error().await;
        assert_eq!(code, ErrorCode::UnknownFrame, "{text}");
    });
    assert!(gw.terminate().unwrap().success());
    assert_nothing_delivered(&d);
}

#[test]
fn bad_file_names_from_the_peer_are_refused() {
    let d = Deployment::with_tls_key_files().unwrap();
    let gw = gateway(&d);
    runtime().block_on(async {
        // Same length as the planted name, so only the name changes in the canonical bytes.
        for bad in ["a/bc", "..ab", "ab\0c", ".abc"] {
            let (_, mut bytes) = manifest_bytes(&[("wxyz", b"hello")]);
            let at = bytes
                .windows(4)
                .position(|w| w == b"wxyz")
                .expect("name in the manifest");
            bytes[at..at + 4].copy_from_slice(bad.as_bytes());
            let mut p = Peer::connect(&d).await;
            p.hello().await;
            p.frame(&offer(bytes)).await;
            let (code, text) = p.error().await;
            assert_eq!(code, ErrorCode::BadFileName, "{bad:?}: {text}");
        }
    });
    let log = gw.log();
    assert!(gw.terminate().unwrap().success());
    assert!(log.contains("file name"), "the refusal is logged:\n{log}");
    assert_nothing_delivered(&d);
    assert_eq!(
        baylink_tests::spool_entries(&d.path("spool/gateway")).len(),
        0
    );
}

#[test]
fn manifests_over_the_configured_limits_are_refused() {
    let d = Deployment::with_tls_key_files().unwrap();
    d.set("gateway.toml", "limits", "max_files", "3").unwrap();
    d.set("gateway.toml", "limits", "max_chunks", "3").unwrap();
    let gw = gateway(&d);
    runtime().block_on(async {
        let (_, many_files) = manifest_bytes(&[("a", b""), ("b", b""), ("c", b""), ("d", b"")]);
        let mut p = Peer::connect(&d).await;
        p.hello().await;
        p.frame(&offer(many_files)).await;
        let (code, text) = p.error().await;
        assert_eq!(code, ErrorCode::TooManyFiles, "{text}");

        let (_, many_chunks) = manifest_bytes(&[("a", &[0u8; 4 * 4096])]);
        let mut p = Peer::connect(&d).await;
        p.hello().await;
        p.frame(&offer(many_chunks)).await;
        let (code, text) = p.error().await;
        assert_eq!(code, ErrorCode::TooManyChunks, "{text}");
    });
    assert!(gw.terminate().unwrap().success());
    assert_nothing_delivered(&d);
}

/// Signs a manifest with the edge's HSM key, as the real edge would.
fn sign_as_edge(d: &Deployment, manifest: &[u8]) -> Vec<u8> {
    let cfg = baylink::config::Config::load(&d.edge_config()).unwrap();
    // SAFETY: nextest runs each test in its own process; this runs before any HSM use and
    // while no other thread of this test reads the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", cfg.hsm.softhsm_conf.as_ref().unwrap());
    }
    let token = baylink_hsm::Token::open(&baylink::keys::hsm_config(&cfg).unwrap()).unwrap();
    let msg = [baylink::signing::MANIFEST_CONTEXT, manifest].concat();
    token.signer().unwrap().sign(&msg).unwrap().0.to_vec()
}

#[test]
fn chunks_that_never_match_their_digest_fail_the_transfer() {
    let d = Deployment::with_tls_key_files().unwrap();
    let data = vec![42u8; 6000];
    let (manifest, bytes) = manifest_bytes(&[("scan.dcm", &data)]);
    let signature = sign_as_edge(&d, &bytes);
    let gw = gateway(&d);
    let id = manifest.transfer_id;
    runtime().block_on(async {
        let mut p = Peer::connect(&d).await;
        p.hello().await;
        p.frame(&Frame::Offer {
            manifest: bytes.into(),
            signature: signature.into(),
        })
        .await;
        loop {
            match p.next().await {
                Some(Frame::Have { .. }) => break,
                Some(_) => {}
                None => panic!("no Have from the gateway"),
            }
        }
        let conn = Arc::new(p.conn.clone());
        let mut bad_frames = 0;
        // Keep sending chunk 0 with wrong bytes until the gateway gives up.
        let (code, text) = loop {
            let loc = manifest.chunk(0).unwrap();
            let header = ChunkHeader {
                transfer_id: id,
                index: 0,
                len: loc.len,
            };
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&header.encode()).await.unwrap();
            s.write_all(&vec![0u8; loc.len as usize]).await.unwrap();
            s.finish().unwrap();
            match p.next().await {
                Some(Frame::ChunkBad { index, .. }) => {
                    assert_eq!(index, 0);
                    bad_frames += 1;
                    assert!(bad_frames < 100, "the gateway never gave up");
                }
                Some(Frame::Error { code, text }) => break (code, text),
                Some(Frame::ChunkOk { .. }) => panic!("a wrong chunk was accepted"),
                Some(_) => {}
                None => panic!("stream ended without an error frame"),
            }
        };
        assert!(bad_frames >= 1);
        assert!(
            matches!(
                code,
                ErrorCode::TooManyRetries | ErrorCode::ChunkDigestMismatch
            ),
            "{code:?}: {text}"
        );
    });
    let log = gw.log();
    assert!(gw.terminate().unwrap().success());
    assert!(log.contains("transfer failed"), "gateway log:\n{log}");
    assert_nothing_delivered(&d);
    // audit: the failure was recorded as `refused` with its rule before the error frame.
    let records = std::fs::read_to_string(d.path("audit/gateway/records.log")).unwrap();
    assert!(
        records.lines().any(|l| l.contains(r#""kind":"refused""#)
            && (l.contains(r#""rule":"too-many-retries""#)
                || l.contains(r#""rule":"chunk-digest-mismatch""#))),
        "{records}"
    );
    assert!(
        !d.path("spool/gateway").join(id.to_string()).exists(),
        "the failed transfer's spool directory was removed"
    );
}

#[test]
fn a_signature_over_another_manifest_is_refused() {
    let d = Deployment::with_tls_key_files().unwrap();
    // The edge's HSM signs one manifest; the peer then offers a different one (one file's
    // bytes changed, so its chunk digest and Merkle root differ) under that signature.
    let (signed, signed_bytes) = manifest_bytes(&[("scan.dcm", &[1u8; 5000])]);
    let signature = sign_as_edge(&d, &signed_bytes);
    let mut b = ManifestBuilder::new(signed.transfer_id, "edge", [7; 32], "C-1", 4096);
    let mut h = ChunkHasher::new(4096);
    h.update(&[2u8; 5000]);
    b.add_file("scan.dcm".to_owned(), 5000, h.finish()).unwrap();
    let tampered = b.finish(1).unwrap().to_bytes();
    assert_ne!(tampered, signed_bytes);
    let gw = gateway(&d);
    runtime().block_on(async {
        let mut p = Peer::connect(&d).await;
        p.hello().await;
        p.frame(&Frame::Offer {
            manifest: tampered.into(),
            signature: signature.into(),
        })
        .await;
        let (code, text) = p.error().await;
        assert_eq!(code, ErrorCode::BadSignature, "{text}");
        assert!(
            text.contains("manifest signature does not verify"),
            "{text}"
        );
    });
    assert!(gw.terminate().unwrap().success());
    assert_nothing_delivered(&d);
}
