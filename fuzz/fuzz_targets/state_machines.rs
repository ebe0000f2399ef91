//! The `Receiver` and `Sender` state machines driven by arbitrary events.
//!
//! The input is a list of 3-byte operations (kind, a, b): data-stream
//! events, caller verdicts and frames from the peer, valid or not, in any
//! order. Checks, beyond not panicking:
//! - the receiver never holds a chunk as good unless it was in an accepted
//!   have-set or arrived with the manifest's digest;
//! - it asks to commit only with every chunk good;
//! - the sender never sends a chunk the receiver holds, finishes only with
//!   every chunk acknowledged, and sends each chunk at most
//!   `1 + max_chunk_retries` times.
#![no_main]

use std::sync::Arc;

use baylink_net::proto::{
    ChunkHeader, ChunkSet, ErrorCode, Frame, Limits, Manifest, ManifestBuilder, Receipt, Receiver,
    ReceiverAction, ReceiverConfig, Sender, SenderAction, SenderConfig, TransferId, sha256,
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const RETRIES: u32 = 2;

fn manifest() -> Manifest {
    let chunk_size = 4;
    let mut builder = ManifestBuilder::new(TransferId([3; 16]), "edge", [0; 32], "C-1", chunk_size);
    let mut next = 0u8;
    for (i, size) in [0u64, 5, 17, 3].into_iter().enumerate() {
        let digests = (0..size.div_ceil(4))
            .map(|_| {
                next += 1;
                sha256(&[next])
            })
            .collect();
        builder
            .add_file(format!("f{i}"), size, digests)
            .expect("valid file");
    }
    builder.finish(1).expect("valid manifest")
}

fn bitmap(n: u32, bits: u8) -> ChunkSet {
    let mut set = ChunkSet::new(n);
    for i in 0..n {
        if bits >> (i % 8) & 1 == 1 {
            set.insert(i);
        }
    }
    set
}

fuzz_target!(|data: &[u8]| {
    let m = Arc::new(manifest());
    let bytes = Bytes::from(m.to_bytes());
    let n = m.chunk_count();
    let receipt = Receipt {
        transfer_id: m.transfer_id,
        merkle_root: m.merkle_root,
        manifest_digest: m.digest(),
        process_id: m.process_id.clone(),
        receiver: "gw".into(),
        committed_unix_ms: 2,
    }
    .to_bytes();

    let mut rx = Receiver::new(
        Limits::default(),
        ReceiverConfig {
            max_chunk_retries: RETRIES,
        },
    );
    let mut tx = Sender::new(
        m.clone(),
        bytes.clone(),
        Bytes::from_static(b"sig"),
        SenderConfig {
            max_in_flight: 3,
            max_chunk_retries: RETRIES,
        },
    );
    let _ = rx.handle_frame(Frame::Offer {
        manifest: bytes.clone(),
        signature: Bytes::from_static(b"sig"),
    });
    // Chunks the receiver may legitimately hold as good.
    let mut vouched = ChunkSet::new(n);

    for op in data.chunks_exact(3) {
        let (kind, a, b) = (op[0], op[1], op[2]);
        let index = u32::from(a) % (n + 2);
        match kind % 12 {
            0 => {
                let len = if b & 1 == 0 {
                    m.chunk(index).map_or(1, |c| c.len)
                } else {
                    u32::from(b)
                };
                let transfer_id = if b & 2 == 0 {
                    m.transfer_id
                } else {
                    TransferId([b; 16])
                };
                let _ = rx.chunk_header(&ChunkHeader {
                    transfer_id,
                    index,
                    len,
                });
            }
            1 => {
                let right = b & 1 == 0;
                let digest = match m.chunk_digest(index) {
                    Some(d) if right => *d,
                    _ => [b; 32],
                };
                if right && index < n {
                    vouched.insert(index);
                }
                rx.chunk_received(index, digest);
            }
            2 => rx.chunk_aborted(index),
            3 => {
                let have = bitmap(if b == 0 { n + 1 } else { n }, a);
                if have.len() == n {
                    for i in have.iter() {
                        vouched.insert(i);
                    }
                }
                rx.offer_accepted(have);
            }
            4 => rx.committed(Bytes::from(receipt.clone()), Bytes::new()),
            5 if b == 0xff => rx.offer_refused(ErrorCode::Refused, "no"),
            6 if b == 0xff => rx.abort(ErrorCode::NoSpace, "full"),
            7 => {
                let frame = match b % 7 {
                    0 => Frame::ChunkOk { index },
                    1 => Frame::ChunkBad {
                        index,
                        reason: "bad".into(),
                    },
                    2 => Frame::have(m.transfer_id, &bitmap(n, a)),
                    3 => Frame::Receipt {
                        receipt: Bytes::from(receipt.clone()),
                        signature: Bytes::new(),
                    },
                    4 => Frame::Receipt {
                        receipt: Bytes::copy_from_slice(op),
                        signature: Bytes::new(),
                    },
                    5 => Frame::Hello {
                        version: a.into(),
                        appliance_id: String::new(),
                    },
                    _ => Frame::Error {
                        code: ErrorCode::Internal,
                        text: String::new(),
                    },
                };
                let _ = tx.handle_frame(frame);
            }
            8 => tx.chunk_stream_failed(index),
            9 => tx.chunk_written(index),
            10 => {
                let frame = match b % 4 {
                    0 => Frame::Offer {
                        manifest: bytes.clone(),
                        signature: Bytes::from_static(b"sig"),
                    },
                    1 => Frame::Offer {
                        manifest: Bytes::copy_from_slice(op),
                        signature: Bytes::new(),
                    },
                    2 => Frame::ChunkOk { index },
                    _ => Frame::Hello {
                        version: a.into(),
                        appliance_id: String::new(),
                    },
                };
                let _ = rx.handle_frame(frame);
            }
            _ => {}
        }

        while let Some(action) = rx.poll_action() {
            if action == ReceiverAction::Commit {
                assert!(rx.good().is_full(), "commit before every chunk is good");
            }
        }
        for i in rx.good().iter() {
            assert!(vouched.contains(i), "chunk {i} good without its digest");
        }
        while let Some(action) = tx.poll_action() {
            match action {
                SenderAction::SendChunk { index } => {
                    assert!(index < n && !tx.acked().contains(index));
                }
                SenderAction::Done { .. } => assert!(tx.acked().is_full()),
                _ => {}
            }
        }
        assert!(tx.wire_bytes() <= m.total_bytes() * u64::from(RETRIES + 1));
    }
});
