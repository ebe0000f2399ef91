//! Just enough DICOM Part 10 to route an instance: the SOP Class and Instance UIDs from the
//! file meta information and the PatientID (0010,0020) from the data set, read from a prefix
//! of the file (the rest streams to the spool unparsed).
//!
//! Handles explicit VR little endian meta information, then an explicit or implicit VR little
//! endian data set, skipping sequences of defined or undefined length on the way. Deflated and
//! big-endian data sets are refused (their PatientID cannot be read from a plain prefix).
//! Every length is checked against what remains before it is used; nothing is allocated from a
//! length read off the wire.

/// Offset of `DICM` after the 128-byte preamble.
const PREAMBLE: usize = 128;
/// The data set walk gives up below this nesting depth.
const MAX_DEPTH: usize = 16;

/// What routing needs from an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// (0002,0002) Media Storage SOP Class UID.
    pub sop_class: String,
    /// (0002,0003) Media Storage SOP Instance UID.
    pub sop_instance: String,
    /// (0002,0010) Transfer Syntax UID.
    pub transfer_syntax: String,
    /// (0010,0020) Patient ID.
    pub patient_id: String,
}

/// Why a prefix does not yield an [`Instance`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Part10Error {
    /// The prefix ends before the PatientID: give more bytes.
    #[error("need more bytes")]
    NeedMore,
    /// Not a usable DICOM Part 10 file; the text names the problem.
    #[error("{0}")]
    Malformed(String),
}

fn malformed(why: impl Into<String>) -> Part10Error {
    Part10Error::Malformed(why.into())
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    explicit: bool,
}

struct Element {
    tag: (u16, u16),
    vr: Option<[u8; 2]>,
    len: u32,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Part10Error> {
        if self.buf.len() - self.pos < n {
            return Err(Part10Error::NeedMore);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, Part10Error> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Part10Error> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads an element header. Item and delimitation tags (FFFE,xxxx) never have a VR.
    fn header(&mut self) -> Result<Element, Part10Error> {
        let tag = (self.u16()?, self.u16()?);
        if tag.0 == 0xFFFE || !self.explicit {
            return Ok(Element {
                tag,
                vr: None,
                len: self.u32()?,
            });
        }
        let vr = self.take(2)?;
        let vr = [vr[0], vr[1]];
        if !vr.iter().all(u8::is_ascii_uppercase) {
            return Err(malformed(format!(
                "element ({:04X},{:04X}) has no valid VR",
                tag.0, tag.1
            )));
        }
        let long = matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        let len = if long {
            self.take(2)?;
            self.u32()?
        } else {
            u32::from(self.u16()?)
        };
        Ok(Element {
            tag,
            vr: Some(vr),
            len,
        })
    }

    fn skip(&mut self, len: u32) -> Result<(), Part10Error> {
        self.take(len as usize).map(drop)
    }

    /// Skips the items of a sequence of undefined length, up to its delimiter.
    fn skip_undefined_sequence(&mut self, depth: usize) -> Result<(), Part10Error> {
        if depth > MAX_DEPTH {
            return Err(malformed("sequences nested too deeply"));
        }
        loop {
            let el = self.header()?;
            match el.tag {
                (0xFFFE, 0xE0DD) => return Ok(()),
                (0xFFFE, 0xE000) if el.len == UNDEFINED => self.skip_undefined_item(depth + 1)?,
                (0xFFFE, 0xE000) => self.skip(el.len)?,
                (g, e) => {
                    return Err(malformed(format!(
                        "({g:04X},{e:04X}) inside a sequence, where an item was expected"
                    )));
                }
            }
        }
    }

    /// Skips the elements of an item of undefined length, up to its delimiter.
    fn skip_undefined_item(&mut self, depth: usize) -> Result<(), Part10Error> {
        if depth > MAX_DEPTH {
            return Err(malformed("items nested too deeply"));
        }
        loop {
            let el = self.header()?;
            if el.tag == (0xFFFE, 0xE00D) {
                return Ok(());
            }
            self.skip_value(&el, depth)?;
        }
    }

    fn skip_value(&mut self, el: &Element, depth: usize) -> Result<(), Part10Error> {
        if el.len == UNDEFINED {
            // SQ, or in implicit VR a sequence whose VR we do not know; UN/OB with undefined
            // length (encapsulated) is a sequence of items too.
            self.skip_undefined_sequence(depth + 1)
        } else {
            self.skip(el.len)
        }
    }
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .trim_start_matches(' ')
        .to_owned()
}

/// Reads the instance's routing facts from the first bytes of a Part 10 file.
/// [`Part10Error::NeedMore`] means the prefix is too short so far.
pub fn parse_prefix(buf: &[u8]) -> Result<Instance, Part10Error> {
    if buf.len() < PREAMBLE + 4 {
        return Err(Part10Error::NeedMore);
    }
    if &buf[PREAMBLE..PREAMBLE + 4] != b"DICM" {
        return Err(malformed(
            "not a DICOM Part 10 file (no DICM after the preamble)",
        ));
    }
    let mut c = Cursor {
        buf,
        pos: PREAMBLE + 4,
        explicit: true,
    };
    let (mut class, mut instance, mut syntax) = (None, None, None);
    loop {
        // Peek at the group: the meta information is group 0002 only.
        if c.buf.len() - c.pos < 2 {
            return Err(Part10Error::NeedMore);
        }
        if u16::from_le_bytes([c.buf[c.pos], c.buf[c.pos + 1]]) != 0x0002 {
            break;
        }
        let el = c.header()?;
        if el.len == UNDEFINED {
            return Err(malformed("undefined length in the file meta information"));
        }
        let value = c.take(el.len as usize)?;
        match el.tag.1 {
            0x0002 => class = Some(text(value)),
            0x0003 => instance = Some(text(value)),
            0x0010 => syntax = Some(text(value)),
            _ => {}
        }
    }
    let sop_class = class.ok_or_else(|| malformed("no Media Storage SOP Class UID"))?;
    let sop_instance = instance.ok_or_else(|| malformed("no Media Storage SOP Instance UID"))?;
    let transfer_syntax = syntax.ok_or_else(|| malformed("no Transfer Syntax UID"))?;
    for (what, uid) in [
        ("SOP Class UID", &sop_class),
        ("SOP Instance UID", &sop_instance),
        ("Transfer Syntax UID", &transfer_syntax),
    ] {
        // The same rule as the C-STORE door (PS3.5 9.1).
        if let Err(e) = crate::dicom::part10::validate_uid(uid) {
            return Err(malformed(format!("{what}: {e}")));
        }
    }
    c.explicit = match transfer_syntax.as_str() {
        "1.2.840.10008.1.2" => false,
        "1.2.840.10008.1.2.2" => {
            return Err(malformed("explicit VR big endian is not accepted"));
        }
        "1.2.840.10008.1.2.1.99" => {
            return Err(malformed("deflated transfer syntax is not accepted"));
        }
        _ => true,
    };
    let mut last = (0u16, 0u16);
    loop {
        let el = c.header()?;
        if el.tag < last {
            return Err(malformed("data set elements out of order"));
        }
        last = el.tag;
        if el.tag == (0x0010, 0x0020) {
            if el.len == UNDEFINED || el.len > 64 * 4 {
                return Err(malformed("PatientID has an impossible length"));
            }
            let patient_id = text(c.take(el.len as usize)?);
            if patient_id.is_empty() {
                return Err(malformed("PatientID is empty"));
            }
            return Ok(Instance {
                sop_class,
                sop_instance,
                transfer_syntax,
                patient_id,
            });
        }
        if el.tag > (0x0010, 0x0020) {
            return Err(malformed("no PatientID (0010,0020)"));
        }
        let _ = el.vr;
        c.skip_value(&el, 0)?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn el_explicit(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        if matches!(vr, b"OB" | b"SQ" | b"UN" | b"OW") {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    fn el_implicit(out: &mut Vec<u8>, g: u16, e: u16, len: u32, value: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(value);
    }

    fn meta(syntax: &str) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        el_explicit(&mut out, 2, 1, b"OB", &[0, 1]);
        el_explicit(&mut out, 2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0");
        el_explicit(&mut out, 2, 3, b"UI", b"1.2.3.4\0");
        let mut ts = syntax.as_bytes().to_vec();
        if ts.len() % 2 == 1 {
            ts.push(0);
        }
        el_explicit(&mut out, 2, 0x10, b"UI", &ts);
        out
    }

    fn explicit_file() -> Vec<u8> {
        let mut f = meta("1.2.840.10008.1.2.1");
        el_explicit(&mut f, 8, 0x18, b"UI", b"1.2.3.4\0");
        // A sequence of undefined length with one item of undefined length.
        f.extend_from_slice(&[0x08, 0x00, 0x32, 0x10]);
        f.extend_from_slice(b"SQ\0\0");
        f.extend_from_slice(&UNDEFINED.to_le_bytes());
        f.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        f.extend_from_slice(&UNDEFINED.to_le_bytes());
        el_explicit(&mut f, 8, 0x100, b"SH", b"CODE");
        f.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        f.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        el_explicit(&mut f, 0x10, 0x10, b"PN", b"Doe^Jane");
        el_explicit(&mut f, 0x10, 0x20, b"LO", b"P-0001");
        el_explicit(&mut f, 0x7FE0, 0x10, b"OW", &[1, 2, 3, 4]);
        f
    }

    #[test]
    fn explicit_vr_with_undefined_length_sequence() {
        let f = explicit_file();
        let i = parse_prefix(&f).unwrap();
        assert_eq!(i.patient_id, "P-0001");
        assert_eq!(i.sop_instance, "1.2.3.4");
        assert_eq!(i.sop_class, "1.2.840.10008.5.1.4.1.1.7");
        // Every strict prefix that stops before the PatientID's value asks for more.
        let end = f.len() - 16;
        for n in 0..end {
            assert_eq!(
                parse_prefix(&f[..n]),
                Err(Part10Error::NeedMore),
                "prefix {n}"
            );
        }
    }

    #[test]
    fn implicit_vr() {
        let mut f = meta("1.2.840.10008.1.2");
        el_implicit(&mut f, 8, 0x18, 8, b"1.2.3.4\0");
        el_implicit(&mut f, 8, 0x1032, 8, &[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        el_implicit(&mut f, 0x10, 0x20, 6, b"P-0002");
        assert_eq!(parse_prefix(&f).unwrap().patient_id, "P-0002");
    }

    #[test]
    fn malformed_inputs_are_named() {
        let mut no_dicm = explicit_file();
        no_dicm[129] = b'X';
        assert!(
            matches!(parse_prefix(&no_dicm), Err(Part10Error::Malformed(m)) if m.contains("DICM"))
        );

        let mut no_patient = meta("1.2.840.10008.1.2.1");
        el_explicit(&mut no_patient, 0x10, 0x30, b"DA", b"20240101");
        assert!(
            matches!(parse_prefix(&no_patient), Err(Part10Error::Malformed(m)) if m.contains("PatientID"))
        );

        let mut bad_uid = meta("1.2.840.10008.1.2.1");
        let at = bad_uid.windows(7).position(|w| w == b"1.2.3.4").unwrap();
        bad_uid[at] = b'/';
        el_explicit(&mut bad_uid, 0x10, 0x20, b"LO", b"P-0001");
        assert!(
            matches!(parse_prefix(&bad_uid), Err(Part10Error::Malformed(m)) if m.contains("is not a UID"))
        );

        let mut deflated = meta("1.2.840.10008.1.2.1.99");
        deflated.extend_from_slice(&[0x78, 0x9c, 0, 0]);
        assert!(matches!(
            parse_prefix(&deflated),
            Err(Part10Error::Malformed(_))
        ));

        // A huge declared length inside a sequence asks for more rather than allocating.
        let mut huge = meta("1.2.840.10008.1.2.1");
        huge.extend_from_slice(&[0x08, 0x00, 0x32, 0x10]);
        huge.extend_from_slice(b"SQ\0\0");
        huge.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert_eq!(parse_prefix(&huge), Err(Part10Error::NeedMore));
    }
}
