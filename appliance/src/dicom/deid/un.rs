//! Elements encoded as VR UN, resolved before the profile is applied.
//!
//! A system that did not know a tag (or a whole sequence) writes it as UN in explicit VR;
//! a UN sequence's items stay in implicit VR little endian (PS3.5 6.2.2), often with an
//! undefined length. A reader that takes UN as opaque bytes would copy the identifiers
//! inside such an element through unseen. [`resolve`] rewrites an explicit VR little endian
//! data set so that dicom-rs sees every element with its real VR:
//!
//! - a UN element whose tag the data dictionary knows gets its dictionary VR back (the
//!   value bytes are the same: UN keeps the little endian encoding);
//! - a UN element that is a sequence (a known SQ tag, or an undefined length) is parsed as
//!   implicit VR little endian items, whose elements are resolved the same way, at every
//!   depth, and written as an explicit VR SQ;
//! - an element of a private group, or one whose tag the dictionary does not know, stays
//!   UN (the profile removes private elements and refuses an unknown public one).
//!
//! Every sequence and item is written with an undefined length (their contents change
//! size), which every reader accepts.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

use super::MAX_DEPTH;
use crate::dicom::reader::long_length;

const UNDEFINED: u32 = u32::MAX;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);

/// Why a data set cannot be resolved; the text names the element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnError(pub String);

/// The dictionary's VR for a public tag (`None` for private or unknown tags). Ambiguous
/// VRs take the little endian reading that keeps every value representable.
pub(super) fn dictionary_vr(tag: (u16, u16)) -> Option<VR> {
    if tag.0 % 2 == 1 {
        return None;
    }
    let entry = StandardDataDictionary.by_tag(Tag(tag.0, tag.1))?;
    Some(match entry.vr() {
        VirtualVr::Exact(vr) => vr,
        VirtualVr::Xs => VR::US,
        VirtualVr::Ox | VirtualVr::Px => VR::OB,
        VirtualVr::Lt => VR::OW,
        // A future kind of ambiguity: the bytes stay opaque.
        _ => VR::UN,
    })
}

/// Rewrites little endian `data` (a data set without meta group, in explicit VR when
/// `explicit`, else implicit VR) into explicit VR little endian with no UN element the
/// dictionary can resolve (see the module docs). Every declared length is checked against
/// the bytes present, so what a parser then allocates is bounded by `data`.
pub fn resolve(data: &[u8], explicit: bool) -> Result<Vec<u8>, UnError> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 4);
    let r = Reader { buf: data };
    let end = r.elements(0, data.len(), explicit, false, 0, &mut out)?;
    if end != data.len() {
        return Err(UnError(format!(
            "{} bytes after the data set's last element",
            data.len() - end
        )));
    }
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
}

struct Head {
    tag: (u16, u16),
    /// Explicit VR as written; `None` in implicit VR.
    vr: Option<[u8; 2]>,
    len: u32,
    size: usize,
}

fn tag_name(t: (u16, u16)) -> String {
    format!("({:04X},{:04X})", t.0, t.1)
}

fn put_header(out: &mut Vec<u8>, tag: (u16, u16), vr: &[u8; 2], len: u32) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(vr);
    if long_length(vr) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        // Callers write a short-length VR only for lengths below 0x10000.
        out.extend_from_slice(&(len as u16).to_le_bytes());
    }
}

fn put_delimiter(out: &mut Vec<u8>, tag: (u16, u16), len: u32) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

impl Reader<'_> {
    fn u16_at(&self, p: usize) -> Result<u16, UnError> {
        self.buf
            .get(p..p + 2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
            .ok_or_else(|| UnError("the data set ends inside an element header".into()))
    }

    fn u32_at(&self, p: usize) -> Result<u32, UnError> {
        self.buf
            .get(p..p + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| UnError("the data set ends inside an element header".into()))
    }

    fn header(&self, p: usize, explicit: bool) -> Result<Head, UnError> {
        let tag = (self.u16_at(p)?, self.u16_at(p + 2)?);
        if tag.0 == 0xFFFE || !explicit {
            return Ok(Head {
                tag,
                vr: None,
                len: self.u32_at(p + 4)?,
                size: 8,
            });
        }
        let vr: [u8; 2] = self
            .buf
            .get(p + 4..p + 6)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| UnError("the data set ends inside an element header".into()))?;
        if long_length(&vr) {
            Ok(Head {
                tag,
                vr: Some(vr),
                len: self.u32_at(p + 8)?,
                size: 12,
            })
        } else {
            Ok(Head {
                tag,
                vr: Some(vr),
                len: u32::from(self.u16_at(p + 6)?),
                size: 8,
            })
        }
    }

    /// Copies elements from `p` up to `end` (or to the item delimiter when `undefined_item`,
    /// which is consumed but not written); returns the position reached.
    fn elements(
        &self,
        mut p: usize,
        end: usize,
        explicit: bool,
        undefined_item: bool,
        depth: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, UnError> {
        if depth > MAX_DEPTH {
            return Err(UnError(format!("sequences nested deeper than {MAX_DEPTH}")));
        }
        loop {
            if p >= end {
                if undefined_item {
                    return Err(UnError("an item has no item delimiter".into()));
                }
                return Ok(p);
            }
            let h = self.header(p, explicit)?;
            if h.tag == ITEM_END && undefined_item {
                return Ok(p + 8);
            }
            if h.tag.0 == 0xFFFE {
                return Err(UnError(format!(
                    "{} where a data element was expected",
                    tag_name(h.tag)
                )));
            }
            let value = p + h.size;
            let unresolved = matches!(h.vr, None | Some([b'U', b'N']));
            let known = if unresolved {
                dictionary_vr(h.tag)
            } else {
                None
            };
            let sequence = h.vr == Some(*b"SQ")
                || (unresolved && (h.len == UNDEFINED || known == Some(VR::SQ)));
            if sequence {
                // Items of an explicit SQ are explicit; those of a UN (or of any element in
                // implicit VR) are implicit.
                let items_explicit = explicit && h.vr == Some(*b"SQ");
                put_header(out, h.tag, b"SQ", UNDEFINED);
                p = self.items(value, end, h.len, items_explicit, depth + 1, out)?;
                put_delimiter(out, SEQUENCE_END, 0);
                continue;
            }
            if h.len == UNDEFINED {
                return Err(UnError(format!(
                    "element {} has an undefined length but is not a sequence",
                    tag_name(h.tag)
                )));
            }
            let value_end = value
                .checked_add(h.len as usize)
                .filter(|&e| e <= end)
                .ok_or_else(|| {
                    UnError(format!(
                        "element {} declares {} bytes, more than its enclosing data set holds",
                        tag_name(h.tag),
                        h.len
                    ))
                })?;
            let vr: [u8; 2] = match (h.vr, known) {
                (Some(vr), _) if !unresolved => vr,
                (_, Some(vr)) => {
                    let b = vr.to_bytes();
                    if !long_length(&b) && h.len > 0xFFFF {
                        *b"UN"
                    } else {
                        b
                    }
                }
                _ => *b"UN",
            };
            put_header(out, h.tag, &vr, h.len);
            out.extend_from_slice(&self.buf[value..value_end]);
            p = value_end;
        }
    }

    /// Copies the items of a sequence whose value starts at `p` (defined length `len`, or
    /// up to the sequence delimiter); returns the position after the sequence.
    fn items(
        &self,
        mut p: usize,
        end: usize,
        len: u32,
        explicit: bool,
        depth: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, UnError> {
        let seq_end = if len == UNDEFINED {
            end
        } else {
            p.checked_add(len as usize)
                .filter(|&e| e <= end)
                .ok_or_else(|| UnError("a sequence runs past its enclosing data set".into()))?
        };
        loop {
            if p >= seq_end {
                if len == UNDEFINED {
                    return Err(UnError("a sequence has no sequence delimiter".into()));
                }
                return Ok(p);
            }
            let tag = (self.u16_at(p)?, self.u16_at(p + 2)?);
            let item_len = self.u32_at(p + 4)?;
            match tag {
                SEQUENCE_END if len == UNDEFINED => return Ok(p + 8),
                // A delimiter closing a defined-length sequence (some writers add one).
                SEQUENCE_END if p + 8 == seq_end => return Ok(seq_end),
                ITEM => {
                    put_delimiter(out, ITEM, UNDEFINED);
                    p = if item_len == UNDEFINED {
                        self.elements(p + 8, seq_end, explicit, true, depth, out)?
                    } else {
                        let item_end = (p + 8)
                            .checked_add(item_len as usize)
                            .filter(|&e| e <= seq_end)
                            .ok_or_else(|| {
                                UnError("an item runs past its enclosing sequence".into())
                            })?;
                        self.elements(p + 8, item_end, explicit, false, depth, out)?
                    };
                    put_delimiter(out, ITEM_END, 0);
                }
                other => {
                    return Err(UnError(format!(
                        "{} where a sequence item was expected",
                        tag_name(other)
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::dicom::test_bytes::{explicit, implicit};

    /// A VR this code does not know has a 4-byte length, as the reader that walked the
    /// instance first (and dicom-rs) read it: the element after it is found where the
    /// reader found it.
    #[test]
    fn an_unknown_vr_is_read_with_the_long_length_the_reader_gave_it() {
        let mut data = explicit(0x0008, 0x0070, b"ZZ", b"ACME");
        data.extend(explicit(0x0010, 0x0010, b"PN", b"Wong^Siu"));
        let out = resolve(&data, true).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn implicit_elements_get_their_dictionary_vr_and_unknown_ones_stay_un() {
        let mut data = implicit(0x0010, 0x0010, b"Wong^Siu");
        data.extend(implicit(0x0009, 0x1001, b"HKID"));
        data.extend(implicit(0x0028, 0x0010, &16u16.to_le_bytes()));
        let out = resolve(&data, false).unwrap();
        assert_eq!(&out[4..8], b"PN\x08\x00");
        assert_eq!(&out[20..24], b"UN\0\0");
        assert_eq!(&out[36..40], b"US\x02\x00");
    }

    #[test]
    fn truncated_or_unbalanced_input_is_an_error_naming_the_problem() {
        let mut seq = vec![
            0x08, 0x00, 0x40, 0x11, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ];
        seq.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        seq.extend(implicit(0x0010, 0x0010, b"Wong^Siu"));
        let e = resolve(&seq, true).unwrap_err();
        assert!(e.0.contains("no item delimiter"), "{e}");
        let mut long = implicit(0x0010, 0x0010, b"Wong^Siu");
        long[4] = 200;
        let e = resolve(&long, false).unwrap_err();
        assert!(e.0.contains("(0010,0010) declares 200 bytes"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any bytes: an explicit data set or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            explicit in proptest::bool::ANY,
        ) {
            let _ = resolve(&data, explicit);
        }
    }
}
