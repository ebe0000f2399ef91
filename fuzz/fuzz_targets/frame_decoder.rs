//! Arbitrary bytes, cut at arbitrary points, into `FrameDecoder`.
//!
//! Input: byte 0 picks the limits, bytes 1..9 seed the cut points, the rest
//! is the control stream. Checks, beyond not panicking:
//! - the cuts change nothing: the same frames and the same error come out as
//!   when the whole stream is pushed at once;
//! - the decoder never holds more than one unfinished frame within the limit;
//! - every frame it accepts re-encodes to bytes that decode to the same frame.
#![no_main]

use baylink_net::proto::{FRAME_HEADER_LEN, Frame, FrameDecoder, Limits, ProtoError};
use libfuzzer_sys::fuzz_target;

fn limits(selector: u8) -> Limits {
    match selector % 3 {
        0 => Limits::default(),
        1 => Limits {
            max_frame_len: 64,
            max_text_len: 16,
            max_chunks: 100,
            ..Limits::default()
        },
        _ => Limits {
            max_frame_len: 4096,
            max_text_len: 300,
            ..Limits::default()
        },
    }
}

fn decode<'a>(
    limits: Limits,
    pieces: impl Iterator<Item = &'a [u8]>,
) -> (Vec<Frame>, Option<ProtoError>) {
    let mut decoder = FrameDecoder::new(limits);
    let mut frames = Vec::new();
    for piece in pieces {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    // Sticky.
                    assert_eq!(decoder.next_frame(), Err(e.clone()));
                    return (frames, Some(e));
                }
            }
        }
        assert!(decoder.buffered() < FRAME_HEADER_LEN + limits.max_frame_len as usize);
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let limits = limits(data[0]);
    let mut seed = u64::from_le_bytes(data[1..9].try_into().expect("8 bytes")) | 1;
    let stream = &data[9..];

    let whole = decode(limits, std::iter::once(stream));

    let mut pieces = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = match seed % 8 {
            0 => rest.len(),
            1..=3 => 1,
            _ => 1 + (seed >> 8) as usize % 64,
        }
        .min(rest.len());
        pieces.push(&rest[..n]);
        rest = &rest[n..];
    }
    let split = decode(limits, pieces.into_iter());
    assert_eq!(whole, split, "cut points changed the decoded frames");

    for frame in whole.0 {
        let bytes = frame.to_bytes();
        let mut decoder = FrameDecoder::new(limits);
        decoder.push(&bytes);
        assert_eq!(decoder.next_frame(), Ok(Some(frame)));
        assert_eq!(decoder.buffered(), 0);
    }
});
