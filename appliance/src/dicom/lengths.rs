//! A length check of the head of a Part-10 file, run before dicom-rs sees it.
//!
//! dicom-rs allocates (and zeroes) a value's declared length before reading it, so a 12-byte
//! element header claiming 4 GiB would cost 4 GiB of memory. This walk reads only headers: it
//! follows the meta group and the data set (sequences and items at any depth, up to
//! [`MAX_DEPTH`]) up to the first top-level element at or after the stop tag, and refuses any
//! element whose value would end beyond the bytes actually present (at most
//! [`super::part10::HEAD_LIMIT`] of them). What dicom-rs then allocates is bounded by the
//! head size.

use std::io::Read;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// Deepest sequence nesting accepted in the head.
pub const MAX_DEPTH: usize = 16;

const UNDEFINED: u32 = u32::MAX;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);

/// How the data set is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Encoding {
    explicit: bool,
    big_endian: bool,
}

struct Walk<'a> {
    buf: &'a [u8],
    enc: Encoding,
    /// `buf` is a prefix cut at the head limit (not the whole stream).
    cut: bool,
}

struct Header {
    tag: (u16, u16),
    vr: Option<[u8; 2]>,
    len: u32,
    size: usize,
}

/// Whether an explicit VR element with this VR has the 12-byte header (2 reserved bytes and a
/// 4-byte length). Only the VRs defined with a 2-byte length have the short header; any
/// other, including a VR this reader does not know, is read with the long one, as PS3.5
/// 7.1.2 asks and as dicom-rs reads it (as UN), so the lengths checked here are the ones
/// dicom-rs will allocate.
pub fn long_length(vr: &[u8; 2]) -> bool {
    !matches!(
        vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FD"
            | b"FL"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

/// Checks the head of a Part-10 file (`file` starts at the preamble). `Err` names the first
/// element whose declared length runs past the bytes present, or why the head is unusable.
pub fn check_head(file: &[u8], cut: bool, stop: (u16, u16)) -> Result<(), String> {
    if !super::part10::has_prefix(file) {
        return Err("no DICM prefix after the 128-byte preamble".into());
    }
    let meta = Walk {
        buf: file,
        enc: Encoding {
            explicit: true,
            big_endian: false,
        },
        cut,
    };
    // The meta group: explicit VR little endian elements of group 0002.
    let mut pos = 132;
    let mut ts = None;
    // Where (0002,0000) says the meta group ends: dicom-rs reads the meta group up to there,
    // so the data set walked here must start where dicom-rs's does.
    let mut group_end = None;
    loop {
        let Some(h) = meta.header(pos)? else {
            return Ok(()); // Ends inside the meta group: dicom-rs reports it.
        };
        if h.tag.0 != 0x0002 {
            break;
        }
        let end = meta.value_end(pos, &h)?;
        if h.tag == (0x0002, 0x0000) && h.len == 4 {
            let len = meta.u32_at(pos + h.size).unwrap_or_default();
            group_end = Some(u64::try_from(end).unwrap_or(u64::MAX) + u64::from(len));
        }
        if h.tag == (0x0002, 0x0010) {
            let v = &file[pos + h.size..end];
            ts = Some(super::part10::trim_padding(&String::from_utf8_lossy(v)).to_owned());
        }
        pos = end;
    }
    if let Some(g) = group_end
        && g != pos as u64
    {
        return Err(format!(
            "the meta group length (0002,0000) ends the group at byte {g}, its elements at {pos}"
        ));
    }
    let ts = ts.ok_or("the meta group has no Transfer Syntax UID")?;
    let enc = match ts.as_str() {
        "1.2.840.10008.1.2" => Encoding {
            explicit: false,
            big_endian: false,
        },
        "1.2.840.10008.1.2.2" => Encoding {
            explicit: true,
            big_endian: true,
        },
        _ => Encoding {
            explicit: true,
            big_endian: false,
        },
    };
    if ts == "1.2.840.10008.1.2.1.99" {
        // Deflated: walk the inflated head instead.
        let limit = super::part10::HEAD_LIMIT;
        let mut inflated = Vec::new();
        // On an error, what inflated so far stays in `inflated`. An error is expected when
        // the compressed bytes were cut at the head limit; otherwise the stream is corrupt.
        let result = flate2::read::DeflateDecoder::new(&file[pos..])
            .take(limit + 1)
            .read_to_end(&mut inflated);
        if let Err(e) = result
            && !cut
        {
            return Err(format!("deflated data set does not inflate: {e}"));
        }
        let cut = cut || inflated.len() as u64 > limit;
        inflated.truncate(limit as usize);
        let w = Walk {
            buf: &inflated,
            enc,
            cut,
        };
        return w
            .elements(0, inflated.len(), 0, Some(stop), false)
            .map(|_| ());
    }
    let w = Walk {
        buf: file,
        enc,
        cut,
    };
    w.elements(pos, file.len(), 0, Some(stop), false)
        .map(|_| ())
}

/// Where the head of a data set ends (see [`head_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadEnd {
    /// Offset (from the start of the file) of the first top-level element at or after the
    /// stop tag, or the file's length when a complete file has none.
    At(usize, Option<NextElement>),
    /// The bytes given end inside the head: give more.
    NeedMore,
}

/// The element header found at the end of the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextElement {
    /// Its tag (group, element).
    pub tag: (u16, u16),
    /// Its value length; `None` when undefined (encapsulated pixel data, a sequence).
    pub len: Option<u32>,
    /// Bytes of its header (8 or 12).
    pub header: usize,
}

/// Why [`head_end`] cannot find the end of the head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The data set is encoded in a way a plain walk cannot follow (deflated, big endian).
    #[error("transfer syntax {0} cannot be rewritten in place")]
    Unsupported(String),
    /// The bytes are not a usable Part-10 head; the text names the problem.
    #[error("{0}")]
    Malformed(String),
}

/// Finds where the part of a Part-10 file before `stop` ends (`file` starts at the
/// preamble): the offset of the first top-level data set element whose tag is `>= stop`.
///
/// `complete` says that `file` is the whole file; otherwise running out of bytes anywhere in
/// the head is [`HeadEnd::NeedMore`] (the caller gives more, or calls again with `complete`
/// to learn what is wrong). Only explicit and implicit VR little endian data sets (including
/// the encapsulated transfer syntaxes) are walked; deflated and big endian ones are
/// [`HeadError::Unsupported`].
pub fn head_end(file: &[u8], complete: bool, stop: (u16, u16)) -> Result<HeadEnd, HeadError> {
    let more = |e: String| {
        if complete {
            Err(HeadError::Malformed(e))
        } else {
            Ok(HeadEnd::NeedMore)
        }
    };
    if file.len() < super::part10::PREFIX_LEN {
        return more("the file ends inside the preamble".into());
    }
    if !super::part10::has_prefix(file) {
        return Err(HeadError::Malformed(
            "no DICM prefix after the 128-byte preamble".into(),
        ));
    }
    let meta = Walk {
        buf: file,
        enc: Encoding {
            explicit: true,
            big_endian: false,
        },
        cut: !complete,
    };
    let mut pos = 132;
    let mut ts = None;
    // Bytes ran out after the Transfer Syntax UID: it can still be judged.
    let mut short = None;
    loop {
        let h = match meta.header(pos) {
            Ok(Some(h)) => h,
            Ok(None) if ts.is_some() => break, // a meta group and nothing else
            Ok(None) => return more("the file ends inside the meta group".into()),
            Err(e) if ts.is_some() => {
                short = Some(e);
                break;
            }
            Err(e) => return more(e),
        };
        if h.tag.0 != 0x0002 {
            break;
        }
        let end = match meta.value_end(pos, &h) {
            Ok(e) => e,
            Err(e) => return more(e),
        };
        if h.tag == (0x0002, 0x0010) {
            let v = &file[pos + h.size..end];
            ts = Some(super::part10::trim_padding(&String::from_utf8_lossy(v)).to_owned());
        }
        pos = end;
    }
    let ts =
        ts.ok_or_else(|| HeadError::Malformed("the meta group has no Transfer Syntax UID".into()))?;
    let enc = match ts.as_str() {
        "1.2.840.10008.1.2" => Encoding {
            explicit: false,
            big_endian: false,
        },
        // Big endian, deflated, and the JPIP deflated syntaxes.
        "1.2.840.10008.1.2.2"
        | "1.2.840.10008.1.2.1.99"
        | "1.2.840.10008.1.2.4.95"
        | "1.2.840.10008.1.2.4.205" => return Err(HeadError::Unsupported(ts)),
        _ => Encoding {
            explicit: true,
            big_endian: false,
        },
    };
    if let Some(e) = short {
        return more(e);
    }
    let w = Walk {
        buf: file,
        enc,
        cut: !complete,
    };
    match w.elements(pos, file.len(), 0, Some(stop), false) {
        Ok(p) if p >= file.len() => Ok(HeadEnd::At(file.len(), None)),
        Ok(p) => {
            let next = match w.header(p) {
                Ok(Some(h)) => Some(NextElement {
                    tag: h.tag,
                    len: (h.len != UNDEFINED).then_some(h.len),
                    header: h.size,
                }),
                Ok(None) => None,
                Err(e) => return more(e),
            };
            Ok(HeadEnd::At(p, next))
        }
        Err(e) => more(e),
    }
}

impl Walk<'_> {
    fn u16_at(&self, p: usize) -> Option<u16> {
        let b: [u8; 2] = self.buf.get(p..p + 2)?.try_into().ok()?;
        Some(if self.enc.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32_at(&self, p: usize) -> Option<u32> {
        let b: [u8; 4] = self.buf.get(p..p + 4)?.try_into().ok()?;
        Some(if self.enc.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// The element header at `p`; `None` when the bytes end first (`Err` if they end only
    /// because of the head limit).
    fn header(&self, p: usize) -> Result<Option<Header>, String> {
        let short = || {
            if self.cut {
                Err(format!(
                    "the attributes before PatientID exceed {} bytes",
                    super::part10::HEAD_LIMIT
                ))
            } else {
                Ok(None)
            }
        };
        let (Some(group), Some(element)) = (self.u16_at(p), self.u16_at(p + 2)) else {
            return short();
        };
        let tag = (group, element);
        if group == 0xFFFE || !self.enc.explicit {
            let Some(len) = self.u32_at(p + 4) else {
                return short();
            };
            return Ok(Some(Header {
                tag,
                vr: None,
                len,
                size: 8,
            }));
        }
        let Some(vr) = self.buf.get(p + 4..p + 6) else {
            return short();
        };
        let vr = [vr[0], vr[1]];
        let long = long_length(&vr);
        let (len, size) = if long {
            (self.u32_at(p + 8), 12)
        } else {
            (self.u16_at(p + 6).map(u32::from), 8)
        };
        let Some(len) = len else {
            return short();
        };
        Ok(Some(Header {
            tag,
            vr: Some(vr),
            len,
            size,
        }))
    }

    /// End of a defined-length value, checked against the bytes present.
    fn value_end(&self, p: usize, h: &Header) -> Result<usize, String> {
        let end = (p + h.size)
            .checked_add(h.len as usize)
            .filter(|&e| e <= self.buf.len());
        end.ok_or_else(|| {
            format!(
                "element ({:04X},{:04X}) declares {} bytes, more than the {} present",
                h.tag.0,
                h.tag.1,
                h.len,
                self.buf.len().saturating_sub(p + h.size)
            )
        })
    }

    fn is_sequence(&self, h: &Header) -> bool {
        match h.vr {
            Some(vr) => &vr == b"SQ",
            None => matches!(
                StandardDataDictionary
                    .by_tag(Tag(h.tag.0, h.tag.1))
                    .map(|e| e.vr()),
                Some(VirtualVr::Exact(VR::SQ))
            ),
        }
    }

    /// Walks elements from `p` to `end` (or to an item delimiter when `in_undefined_item`);
    /// at depth 0 stops before the first tag >= `stop`. Returns the position reached.
    fn elements(
        &self,
        mut p: usize,
        end: usize,
        depth: usize,
        stop: Option<(u16, u16)>,
        in_undefined_item: bool,
    ) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err(format!("sequences nested deeper than {MAX_DEPTH}"));
        }
        loop {
            if p >= end && !in_undefined_item {
                return Ok(p);
            }
            let Some(h) = self.header(p)? else {
                return Ok(self.buf.len());
            };
            if in_undefined_item && h.tag == ITEM_END {
                return Ok(p + 8);
            }
            if let Some(s) = stop
                && h.tag >= s
            {
                return Ok(p);
            }
            let value = p + h.size;
            if h.len == UNDEFINED {
                let encapsulated =
                    matches!(h.vr.as_ref(), Some(b"OB" | b"OW")) || h.tag == (0x7FE0, 0x0010);
                p = if encapsulated {
                    self.fragments(value)?
                } else if h.vr == Some(*b"UN") {
                    // A sequence written as UN: its items are in implicit VR little endian
                    // (PS3.5 6.2.2), whatever the data set's encoding.
                    let implicit = Walk {
                        buf: self.buf,
                        enc: Encoding {
                            explicit: false,
                            big_endian: false,
                        },
                        cut: self.cut,
                    };
                    implicit.items(value, self.buf.len(), depth + 1, true)?
                } else {
                    // SQ, or an unknown private tag of undefined length: a sequence.
                    self.items(value, self.buf.len(), depth + 1, true)?
                };
            } else {
                let e = self.value_end(p, &h)?;
                if e > end {
                    return Err(format!(
                        "element ({:04X},{:04X}) runs past its enclosing item",
                        h.tag.0, h.tag.1
                    ));
                }
                if self.is_sequence(&h) {
                    self.items(value, e, depth + 1, false)?;
                }
                p = e;
            }
        }
    }

    /// Items of a sequence from `p`: up to `end` (defined length) or to the sequence
    /// delimiter (`undefined`). Returns the position after the sequence.
    fn items(
        &self,
        mut p: usize,
        end: usize,
        depth: usize,
        undefined: bool,
    ) -> Result<usize, String> {
        loop {
            if p >= end && !undefined {
                return Ok(p);
            }
            let Some(h) = self.header(p)? else {
                return Ok(self.buf.len());
            };
            match h.tag {
                SEQUENCE_END if undefined => return Ok(p + 8),
                ITEM if h.len == UNDEFINED => {
                    p = self.elements(p + 8, self.buf.len(), depth, None, true)?;
                }
                ITEM => {
                    let e = self.value_end(p, &h)?;
                    p = self.elements(p + 8, e, depth, None, false)?;
                }
                other => {
                    return Err(format!(
                        "({:04X},{:04X}) where a sequence item was expected",
                        other.0, other.1
                    ));
                }
            }
        }
    }

    /// Fragments of encapsulated pixel data: items of raw bytes up to the sequence delimiter.
    fn fragments(&self, mut p: usize) -> Result<usize, String> {
        loop {
            let Some(h) = self.header(p)? else {
                return Ok(self.buf.len());
            };
            match h.tag {
                SEQUENCE_END => return Ok(p + 8),
                ITEM => p = self.value_end(p, &h)?,
                other => {
                    return Err(format!(
                        "({:04X},{:04X}) where a pixel data fragment was expected",
                        other.0, other.1
                    ));
                }
            }
        }
    }
}
