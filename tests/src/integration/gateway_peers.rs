//! The gateway talks only to its edges: a certificate from the deployment CA that is not a
//! configured edge (a hospital's) is refused in the TLS handshake, and a chunk stream may
//! feed only a transfer offered on its own connection.

use std::time::{Duration, Instant};

use baylink_net::proto::{ChunkHeader, TransferId};
use baylink_net::transport::{self, LinkTuning, TlsIdentity};
use baylink_tests::{Deployment, payload, sent, signal};

use crate::resume::assert_delivered;

/// Bound on every wait for the gateway.
const LIMIT: Duration = Duration::from_secs(60);
/// TLS alert `access_denied`.
const ACCESS_DENIED: u8 = 49;
/// `baylink::link::STOP_OTHER_CONNECTION`.
const STOP_OTHER_CONNECTION: u32 = 4;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A client endpoint presenting `pki/<name>.pem`, connecting to the gateway's QUIC port.
fn connect_as(d: &Deployment, name: &str) -> (quinn::Endpoint, quinn::Connecting) {
    let ca = transport::load_ca(&d.path("pki/ca.pem")).unwrap();
    let id = TlsIdentity::from_pem_files(
        &d.path(&format!("pki/{name}.pem")),
        &d.path(&format!("pki/{name}.key")),
    )
    .unwrap();
    let endpoint = transport::client_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &ca,
        &id,
        &LinkTuning::default(),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", d.base_port + 2).parse().unwrap();
    let connecting = endpoint.connect(addr, "localhost").unwrap();
    (endpoint, connecting)
}

#[test]
fn hospital_certificate_is_refused_in_the_gateway_handshake() {
    let d = Deployment::new().unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    runtime().block_on(async {
        let (_endpoint, connecting) = connect_as(&d, "hospital-a");
        let error = tokio::time::timeout(LIMIT, async {
            match connecting.await {
                Err(e) => e,
                // TLS 1.3: the client finishes its side first; the server's refusal closes
                // the connection right after.
                Ok(conn) => conn.closed().await,
            }
        })
        .await
        .expect("the gateway ends a hospital's connection within 60 s");
        match &error {
            quinn::ConnectionError::ConnectionClosed(close) => assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::crypto(ACCESS_DENIED),
                "{error}"
            ),
            other => panic!("expected a refused handshake, got: {other}"),
        }
    });
    let line = gw.wait_for_log(&["not an allowed peer"], LIMIT);
    assert!(line.contains("hospital-a"), "{line}");
    assert!(!gw.log().contains("edge connected"), "{}", gw.log());
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn heavy_chunk_for_another_connections_transfer_is_refused_and_the_transfer_completes() {
    let d = Deployment::with_tls_key_files().unwrap();
    // One chunk in flight keeps the transfer going long enough to be caught in the middle.
    d.set("edge.toml", "transport", "max_in_flight", "1")
        .unwrap();
    let src = payload(d.dir.path(), "series.bin", 256 << 20, 31).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let sender = d.spawn_send(&src, true).unwrap();
    let line = gw.wait_for_log(&["offer accepted"], LIMIT);
    // Hold the sender still: its transfer stays open at the gateway (well inside the 30 s
    // QUIC idle timeout) while another connection tries to feed it.
    signal(sender.id(), "STOP").unwrap();
    let id: TransferId = line
        .split("transfer=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the offer line names the transfer")
        .trim_matches('"')
        .parse()
        .unwrap();

    let stop = runtime().block_on(async {
        // Same edge identity, a second connection.
        let (_endpoint, connecting) = connect_as(&d, "edge");
        let conn = connecting.await.unwrap();
        let mut send = conn.open_uni().await.unwrap();
        // Chunk 0 of that transfer, with a length the manifest does not give it.
        let header = ChunkHeader {
            transfer_id: id,
            index: 0,
            len: 1,
        };
        let mut bytes = header.encode().to_vec();
        bytes.push(0);
        let stop = match send.write_all(&bytes).await {
            // The refusal can arrive before the write is done.
            Err(quinn::WriteError::Stopped(code)) => Some(code),
            Err(e) => panic!("chunk stream failed: {e}"),
            // Not finished: a finished stream whose bytes were acknowledged reports no stop.
            Ok(()) => tokio::time::timeout(LIMIT, send.stopped())
                .await
                .expect("the gateway answers the chunk stream within 60 s")
                .unwrap(),
        };
        conn.close(0u32.into(), b"done");
        stop
    });
    signal(sender.id(), "CONT").unwrap();
    assert_eq!(
        stop.map(quinn::VarInt::into_inner),
        Some(u64::from(STOP_OTHER_CONNECTION)),
        "the chunk stream was not refused as another connection's:\n{}",
        gw.log()
    );

    let out = sender.wait_with_output().unwrap();
    let s = sent(&out, &gw);
    assert_eq!(s["transfer_id"].as_str().unwrap(), id.to_string());
    d.wait_delivered(&id.to_string(), "series.bin", LIMIT);
    assert_delivered(&d, &id.to_string(), &src);
    assert!(
        gw.log().contains("offered on another connection"),
        "{}",
        gw.log()
    );
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn heavy_stalled_chunk_streams_are_reset_and_the_transfer_completes() {
    let d = Deployment::new().unwrap();
    d.set("gateway.toml", "transport", "chunk_stall_timeout", "\"2s\"")
        .unwrap();
    let src = payload(d.dir.path(), "series.bin", 256 << 20, 32).unwrap();
    let gw = d.serve(&d.gateway_config()).unwrap();
    let mut sender = d.spawn_send(&src, true).unwrap();
    // Chunks are flowing (a QUIC stream reaches the gateway only with its first bytes),
    // so the sender holds streams that are part-way through.
    d.wait_for_gateway_progress(&mut sender);
    // Freeze the sender with chunk streams open: they bring no more bytes. A freeze can
    // land between chunks (every open stream already complete at the gateway, the next
    // not yet opened): then nothing stalls, so the sender runs a moment and is frozen again.
    for _ in 0..10 {
        signal(sender.id(), "STOP").unwrap();
        let start = Instant::now();
        while !gw.log().contains("chunk stream reset") && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(sender.id(), "CONT").unwrap();
        if gw.log().contains("chunk stream reset") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = gw.log();
    let reset = log
        .lines()
        .find(|l| l.contains("chunk stream reset"))
        .unwrap_or_else(|| {
            panic!("no stalled chunk stream was reset in ten freezes of 5 s:\n{log}")
        });
    assert!(reset.contains("transport.chunk_stall_timeout"), "{reset}");

    // The edge sends the reset chunks again.
    let out = sender.wait_with_output().unwrap();
    let s = sent(&out, &gw);
    let id = s["transfer_id"].as_str().unwrap();
    d.wait_delivered(id, "series.bin", LIMIT);
    assert_delivered(&d, id, &src);
    assert!(gw.terminate().unwrap().success());
}
