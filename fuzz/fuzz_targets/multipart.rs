//! The STOW-RS body as the edge reads it: `ingest::multipart::boundary` on a content type,
//! the streaming `MultipartReader` over a body that arrives in fuzz-chosen frames, and each
//! part's first bytes into the incremental Part-10 prefix reader (`PrefixParser`), as
//! `ingest::stow` does.
//!
//! Input: byte 0 is the frame size (1..=256), byte 1 the boundary's length (0..=15), then
//! the boundary text, then the body. The content type is `multipart/related; boundary=`
//! followed by the boundary text (so quoting, padding and empty boundaries are tried too).
//!
//! Checks, beyond not panicking: the splitter ends (every call consumes input or
//! finishes), the bytes of all parts never exceed the body, and the prefix parser never
//! walks past the bytes it was given.
#![no_main]

use std::convert::Infallible;
use std::sync::LazyLock;
use std::time::Duration;

use baylink::ingest::multipart::{MultipartReader, boundary};
use baylink::ingest::part10::{Part10Error, PrefixParser};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
});

/// Reads the body as STOW-RS does; returns the part bytes seen.
async fn split(frames: Vec<Bytes>, boundary: &str, body_len: usize) -> usize {
    let stream = futures_util::stream::iter(frames.into_iter().map(Ok::<_, Infallible>));
    let mut reader = MultipartReader::new(stream, boundary, Duration::from_secs(3600));
    let mut total = 0usize;
    let mut parts = 0usize;
    while let Ok(Some(_headers)) = reader.next_part().await {
        parts += 1;
        assert!(parts <= body_len + 1, "more parts than body bytes");
        let mut prefix = Vec::new();
        let mut parser = PrefixParser::new();
        let mut parsed = false;
        loop {
            match reader.read_chunk().await {
                Ok(Some(chunk)) => {
                    assert!(!chunk.is_empty(), "an empty chunk");
                    total += chunk.len();
                    assert!(total <= body_len, "parts hold more bytes than the body");
                    if !parsed && prefix.len() < 64 * 1024 {
                        prefix.extend_from_slice(&chunk);
                        match parser.parse(&prefix) {
                            Err(Part10Error::NeedMore) => {}
                            _ => parsed = true,
                        }
                        assert!(parser.walked() <= prefix.len());
                    }
                }
                Ok(None) => break,
                Err(_) => return total,
            }
        }
    }
    total
}

fuzz_target!(|data: &[u8]| {
    let [frame, blen, rest @ ..] = data else {
        return;
    };
    let frame = usize::from(*frame) + 1;
    let blen = usize::from(blen % 16).min(rest.len());
    let (b, body) = rest.split_at(blen);
    let content_type = format!("multipart/related; boundary={}", String::from_utf8_lossy(b));
    let Some(boundary) = boundary(&content_type) else {
        return;
    };
    assert!(!boundary.is_empty() && boundary.len() <= 70);
    let frames: Vec<Bytes> = body.chunks(frame).map(Bytes::copy_from_slice).collect();
    RUNTIME.block_on(split(frames, &boundary, body.len()));
});
