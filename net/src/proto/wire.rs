//! Big-endian field readers and writers shared by the canonical encodings.
//!
//! The [`Reader`] never panics and never allocates: every length is checked
//! against its limit and against the bytes actually left before a slice is
//! taken.

use bytes::BufMut;

use super::ProtoError;

/// A cursor over an encoded value.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, naming it `what` in errors.
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// Reads the 4-byte magic and the `u16` version that open every signed value, refusing
    /// another magic or a version other than `version`.
    pub(crate) fn header(&mut self, magic: [u8; 4], version: u16) -> Result<(), ProtoError> {
        if self.array::<4>()? != magic {
            return Err(ProtoError::BadMagic { what: self.what });
        }
        let got = self.u16()?;
        if got != version {
            return Err(ProtoError::UnsupportedVersion {
                what: self.what,
                version: got,
                supported: version,
            });
        }
        Ok(())
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(ProtoError::Truncated { what: self.what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    pub(crate) fn str16(&mut self, max: u16, field: &'static str) -> Result<&'a str, ProtoError> {
        let len = self.u16()?;
        if len > max {
            return Err(ProtoError::TooLong {
                what: field,
                len: len.into(),
                max: max.into(),
            });
        }
        let bytes = self.take(len.into())?;
        std::str::from_utf8(bytes).map_err(|_| ProtoError::BadUtf8 { what: field })
    }

    /// `u16`-length-prefixed bytes.
    pub(crate) fn bytes16(&mut self) -> Result<&'a [u8], ProtoError> {
        let len = self.u16()?;
        self.take(len.into())
    }

    /// `u32`-length-prefixed bytes of at most `max` bytes.
    pub(crate) fn bytes32(
        &mut self,
        max: u32,
        field: &'static str,
    ) -> Result<&'a [u8], ProtoError> {
        let len = self.u32()?;
        if len > max {
            return Err(ProtoError::TooLong {
                what: field,
                len: len.into(),
                max: max.into(),
            });
        }
        let len = usize::try_from(len).map_err(|_| ProtoError::Truncated { what: self.what })?;
        self.take(len)
    }

    /// Succeeds only if everything was read: canonical encodings have no
    /// trailing bytes.
    pub(crate) fn finish(self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                what: self.what,
                count: self.buf.len(),
            })
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes a `u16`-length-prefixed string, cut at a character boundary if it
/// is longer than `u16::MAX` bytes (the builders refuse such strings first).
pub(crate) fn put_str16(buf: &mut impl BufMut, s: &str) {
    let s = truncate_str(s, u16::MAX.into());
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

/// Writes `u16`-length-prefixed bytes, cut to `u16::MAX` bytes.
pub(crate) fn put_bytes16(buf: &mut impl BufMut, b: &[u8]) {
    let b = &b[..b.len().min(u16::MAX.into())];
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

/// Writes `u32`-length-prefixed bytes, cut to `u32::MAX` bytes.
pub(crate) fn put_bytes32(buf: &mut impl BufMut, b: &[u8]) {
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    buf.put_u32(len);
    buf.put_slice(&b[..len as usize]);
}

/// A `usize` count as the `u32` the wire carries (saturating: the builders
/// refuse counts anywhere near `u32::MAX` first).
pub(crate) fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(truncate_str("abc", 10), "abc");
        assert_eq!(truncate_str("", 0), "");
    }

    #[test]
    fn reader_checks_lengths_before_taking() {
        let mut r = Reader::new(&[0, 5, b'a', b'b'], "thing");
        assert_eq!(
            r.str16(10, "f"),
            Err(ProtoError::Truncated { what: "thing" })
        );
        let mut r = Reader::new(&[0, 5, b'a', b'b'], "thing");
        assert!(matches!(
            r.str16(4, "f"),
            Err(ProtoError::TooLong { len: 5, max: 4, .. })
        ));
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff], "thing");
        assert!(matches!(
            r.bytes32(u32::MAX, "f"),
            Err(ProtoError::Truncated { .. })
        ));
        let mut r = Reader::new(&[0, 1, 0xff], "thing");
        assert_eq!(r.str16(4, "f"), Err(ProtoError::BadUtf8 { what: "f" }));
        let r = Reader::new(&[1], "thing");
        assert_eq!(
            r.finish(),
            Err(ProtoError::TrailingBytes {
                what: "thing",
                count: 1
            })
        );
    }

    #[test]
    fn put_str16_cuts_oversized_strings() {
        let long = "é".repeat(40_000); // 80 000 bytes
        let mut out = Vec::new();
        put_str16(&mut out, &long);
        let mut r = Reader::new(&out, "x");
        let s = r.str16(u16::MAX, "s").unwrap();
        assert_eq!(s.len(), 65_534);
        r.finish().unwrap();
    }
}
