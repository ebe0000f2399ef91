//! A streaming `multipart/*` splitter (RFC 2046): parts come out piece by piece as the body
//! arrives, so a STOW-RS request of any size passes through bounded memory.
//!
//! Only what STOW-RS needs: part headers are parsed for `Content-Type`; the buffer holds at
//! most one incoming frame plus the delimiter's length (headers at most [`MAX_HEADERS`]).

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

/// Largest header block of one part.
pub const MAX_HEADERS: usize = 16 * 1024;
/// Longest boundary RFC 2046 allows.
pub const MAX_BOUNDARY: usize = 70;

/// Why the body could not be split.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    /// The body ended inside a part or before the closing delimiter.
    #[error("the multipart body ends before its closing boundary")]
    Truncated,
    /// A part's header block is not valid or is too long.
    #[error("bad part headers: {0}")]
    BadHeaders(String),
    /// The body stream failed (client gone).
    #[error("the request body broke off: {0}")]
    Body(String),
    /// No bytes for longer than the idle timeout.
    #[error("no body bytes within the idle timeout")]
    Idle,
}

/// The headers of one part that STOW-RS looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHeaders {
    /// `Content-Type`, if given (lower-cased, parameters kept).
    pub content_type: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Inside a part's body.
    Body,
    /// Just after a delimiter: `--` (end) or line end and headers follow.
    AfterDelimiter,
    /// After the closing delimiter.
    End,
}

/// Splits a multipart body stream.
pub struct MultipartReader<S> {
    stream: S,
    buf: BytesMut,
    /// `CRLF--boundary`.
    delimiter: Vec<u8>,
    state: State,
    idle: Duration,
    eof: bool,
    /// The body stream failed or went idle: nothing more will come from it.
    broken: bool,
}

impl<S> std::fmt::Debug for MultipartReader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultipartReader")
            .field("state", &self.state)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// The `boundary` parameter of a `multipart/*` content type, checked (1 to 70 characters).
pub fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (k, v) = param.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= MAX_BOUNDARY && v.is_ascii()).then(|| v.to_owned())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut from = 0;
    while let Some(i) = haystack[from..=haystack.len() - needle.len()]
        .iter()
        .position(|&b| b == first)
    {
        let at = from + i;
        if &haystack[at..at + needle.len()] == needle {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

impl<S, E> MultipartReader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    /// A reader for a body with this boundary; waits at most `idle` for each frame.
    pub fn new(stream: S, boundary: &str, idle: Duration) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        // A leading CRLF lets the first delimiter (at the very start) match like the others.
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(b"\r\n");
        MultipartReader {
            stream,
            buf,
            delimiter,
            state: State::Preamble,
            idle,
            eof: false,
            broken: false,
        }
    }

    /// Reads one more frame into the buffer; false at the end of the body.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        match tokio::time::timeout(self.idle, self.stream.next()).await {
            Err(_) => {
                self.broken = true;
                Err(MultipartError::Idle)
            }
            Ok(None) => {
                self.eof = true;
                Ok(false)
            }
            Ok(Some(Err(e))) => {
                self.broken = true;
                Err(MultipartError::Body(e.to_string()))
            }
            Ok(Some(Ok(b))) => {
                self.buf.extend_from_slice(&b);
                Ok(true)
            }
        }
    }

    /// The body stream, unless it has ended, failed or gone idle: for a caller that answers
    /// early and drains what the client is still sending.
    pub fn unfinished_stream(&mut self) -> Option<&mut S> {
        (!self.eof && !self.broken).then_some(&mut self.stream)
    }

    /// The next piece of the current part's body; `None` at the end of the part.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if !matches!(self.state, State::Body | State::Preamble) {
            return Ok(None);
        }
        loop {
            if let Some(at) = find(&self.buf, &self.delimiter) {
                if at > 0 {
                    return Ok(Some(self.buf.split_to(at).freeze()));
                }
                self.buf.advance(self.delimiter.len());
                self.state = State::AfterDelimiter;
                return Ok(None);
            }
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep {
                let n = self.buf.len() - keep;
                return Ok(Some(self.buf.split_to(n).freeze()));
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated);
            }
        }
    }

    /// Moves to the next part (skipping what is left of the current one) and returns its
    /// headers; `None` after the closing delimiter.
    pub async fn next_part(&mut self) -> Result<Option<PartHeaders>, MultipartError> {
        while matches!(self.state, State::Body | State::Preamble) {
            self.read_chunk().await?;
        }
        if self.state == State::End {
            return Ok(None);
        }
        // After a delimiter: "--" closes, else optional white space and CRLF.
        while self.buf.len() < 2 {
            if !self.fill().await? {
                return Err(MultipartError::Truncated);
            }
        }
        if &self.buf[..2] == b"--" {
            self.state = State::End;
            return Ok(None);
        }
        // Each search starts where the last one could still have missed the end (3 bytes
        // back), so a header block arriving byte by byte is scanned once, not once per byte.
        let mut from = 0;
        let headers_end = loop {
            if let Some(at) = find(&self.buf[from..], b"\r\n\r\n") {
                break from + at;
            }
            from = self.buf.len().saturating_sub(3);
            if self.buf.len() > MAX_HEADERS {
                return Err(MultipartError::BadHeaders(format!(
                    "longer than {MAX_HEADERS} bytes"
                )));
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated);
            }
        };
        if headers_end > MAX_HEADERS {
            return Err(MultipartError::BadHeaders(format!(
                "longer than {MAX_HEADERS} bytes"
            )));
        }
        let block = self.buf.split_to(headers_end + 4);
        let text = std::str::from_utf8(&block)
            .map_err(|_| MultipartError::BadHeaders("not UTF-8".into()))?;
        let mut lines = text.split("\r\n");
        // The rest of the delimiter line: transport padding only.
        let padding = lines.next().unwrap_or_default();
        if !padding.trim_matches([' ', '\t']).is_empty() {
            return Err(MultipartError::BadHeaders(
                "text after the boundary on its line".into(),
            ));
        }
        let mut headers = PartHeaders::default();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| MultipartError::BadHeaders(format!("no colon in {line:?}")))?;
            if name.trim().eq_ignore_ascii_case("content-type") {
                headers.content_type = Some(value.trim().to_ascii_lowercase());
            }
        }
        self.state = State::Body;
        Ok(Some(headers))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn body(parts: &[&[u8]], boundary: &str) -> Vec<u8> {
        let mut out = b"preamble to ignore\r\n".to_vec();
        for p in parts {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    async fn split(
        data: Vec<u8>,
        frame: usize,
        boundary: &str,
    ) -> Result<Vec<Vec<u8>>, MultipartError> {
        let frames: Vec<Result<Bytes, std::io::Error>> = data
            .chunks(frame)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut r = MultipartReader::new(
            futures_util::stream::iter(frames),
            boundary,
            Duration::from_secs(5),
        );
        let mut parts = Vec::new();
        while let Some(h) = r.next_part().await? {
            assert_eq!(h.content_type.as_deref(), Some("application/dicom"));
            let mut p = Vec::new();
            while let Some(c) = r.read_chunk().await? {
                p.extend_from_slice(&c);
            }
            parts.push(p);
        }
        Ok(parts)
    }

    #[tokio::test]
    async fn splits_whatever_the_frame_size() {
        // Bodies that contain near-misses of the delimiter.
        let a: Vec<u8> = b"\r\n--bound\r\n--boundar".repeat(50);
        let b: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let parts: [&[u8]; 3] = [&a, b"", &b];
        for frame in [1, 2, 3, 7, 64, 1000, 100_000] {
            let got = split(body(&parts, "boundary"), frame, "boundary")
                .await
                .unwrap();
            assert_eq!(got.len(), 3, "frame {frame}");
            assert_eq!(got[0], a);
            assert!(got[1].is_empty());
            assert_eq!(got[2], b);
        }
    }

    #[tokio::test]
    async fn truncated_and_bad_headers_are_errors() {
        let mut data = body(&[b"abc"], "xyz");
        data.truncate(data.len() - 10);
        assert!(matches!(
            split(data, 5, "xyz").await,
            Err(MultipartError::Truncated)
        ));
        let huge = format!(
            "--xyz\r\nX: {}\r\n\r\nbody\r\n--xyz--",
            "a".repeat(MAX_HEADERS + 10)
        );
        assert!(matches!(
            split(huge.into_bytes(), 4096, "xyz").await,
            Err(MultipartError::BadHeaders(_))
        ));
    }

    #[test]
    fn boundary_parameter() {
        assert_eq!(
            boundary(r#"multipart/related; type="application/dicom"; boundary="abc 1""#).as_deref(),
            Some("abc 1")
        );
        assert_eq!(
            boundary("multipart/related; boundary=x-y").as_deref(),
            Some("x-y")
        );
        assert_eq!(boundary("multipart/related"), None);
        assert_eq!(
            boundary(&format!("multipart/related; boundary={}", "a".repeat(71))),
            None
        );
    }
}
