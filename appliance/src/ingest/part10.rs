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
        let long = crate::dicom::lengths::long_length(&vr);
        let len = if long {
            self.take(2)?;
            self.u32()?
        } else {
            u32::from(self.u16()?)
        };
        Ok(Element { tag, len })
    }

    fn skip(&mut self, len: u32) -> Result<(), Part10Error> {
        self.take(len as usize).map(drop)
    }
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .trim_start_matches(' ')
        .to_owned()
}

/// Where the walk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before `DICM`.
    Preamble,
    /// In the file meta information (group 0002).
    Meta,
    /// In the data set.
    DataSet,
}

/// An open container of undefined length, skipped element by element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A sequence: items up to the sequence delimiter.
    Sequence,
    /// An item: elements up to the item delimiter.
    Item,
}

/// An incremental reader of the routing facts: [`PrefixParser::parse`] is called again with
/// the same prefix grown by the bytes that arrived since, and resumes at the first element it
/// could not finish (its header is read again; a value it skips is never read). Parsing a
/// prefix that arrives in any number of pieces costs time linear in its length.
#[derive(Debug, Clone)]
pub struct PrefixParser {
    stage: Stage,
    /// Offset of the first element not yet walked.
    pos: usize,
    class: Option<String>,
    instance: Option<String>,
    syntax: Option<String>,
    explicit: bool,
    /// The last top-level data set tag (elements must come in order).
    last: (u16, u16),
    /// Open sequences and items of undefined length, outermost first.
    stack: Vec<Frame>,
}

impl Default for PrefixParser {
    fn default() -> Self {
        PrefixParser::new()
    }
}

impl PrefixParser {
    /// A parser at the start of a file.
    pub fn new() -> PrefixParser {
        PrefixParser {
            stage: Stage::Preamble,
            pos: 0,
            class: None,
            instance: None,
            syntax: None,
            explicit: true,
            last: (0, 0),
            stack: Vec::new(),
        }
    }

    /// Bytes of the prefix walked so far (a later call starts there).
    pub fn walked(&self) -> usize {
        self.pos
    }

    /// Reads on in `buf`, the file's first bytes: the same bytes as at the previous call, and
    /// possibly more. [`Part10Error::NeedMore`] means the prefix is too short so far.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Instance, Part10Error> {
        loop {
            let mut c = Cursor {
                buf,
                pos: self.pos,
                explicit: self.explicit,
            };
            let found = self.step(&mut c)?;
            // The step is complete: its bytes are never walked again.
            self.pos = c.pos;
            if let Some(instance) = found {
                return Ok(instance);
            }
        }
    }

    /// Walks one element (or the preamble). Changes `self` only when the step completes,
    /// so a [`Part10Error::NeedMore`] leaves the parser where it was.
    fn step(&mut self, c: &mut Cursor<'_>) -> Result<Option<Instance>, Part10Error> {
        match self.stage {
            Stage::Preamble => {
                if c.buf.len() < PREAMBLE + 4 {
                    return Err(Part10Error::NeedMore);
                }
                if &c.buf[PREAMBLE..PREAMBLE + 4] != b"DICM" {
                    return Err(malformed(
                        "not a DICOM Part 10 file (no DICM after the preamble)",
                    ));
                }
                c.pos = PREAMBLE + 4;
                self.stage = Stage::Meta;
                Ok(None)
            }
            Stage::Meta => {
                // Peek at the group: the meta information is group 0002 only.
                if c.buf.len() - c.pos < 2 {
                    return Err(Part10Error::NeedMore);
                }
                if u16::from_le_bytes([c.buf[c.pos], c.buf[c.pos + 1]]) != 0x0002 {
                    self.end_meta()?;
                    return Ok(None);
                }
                let el = c.header()?;
                if el.len == UNDEFINED {
                    return Err(malformed("undefined length in the file meta information"));
                }
                let value = c.take(el.len as usize)?;
                match el.tag.1 {
                    0x0002 => self.class = Some(text(value)),
                    0x0003 => self.instance = Some(text(value)),
                    0x0010 => self.syntax = Some(text(value)),
                    _ => {}
                }
                Ok(None)
            }
            Stage::DataSet => match self.stack.last() {
                Some(Frame::Sequence) => {
                    let el = c.header()?;
                    match el.tag {
                        (0xFFFE, 0xE0DD) => {
                            self.stack.pop();
                        }
                        (0xFFFE, 0xE000) if el.len == UNDEFINED => self.open(Frame::Item)?,
                        (0xFFFE, 0xE000) => c.skip(el.len)?,
                        (g, e) => {
                            return Err(malformed(format!(
                                "({g:04X},{e:04X}) inside a sequence, where an item was expected"
                            )));
                        }
                    }
                    Ok(None)
                }
                Some(Frame::Item) => {
                    let el = c.header()?;
                    if el.tag == (0xFFFE, 0xE00D) {
                        self.stack.pop();
                    } else if el.len == UNDEFINED {
                        self.open(Frame::Sequence)?;
                    } else {
                        c.skip(el.len)?;
                    }
                    Ok(None)
                }
                None => self.top_level(c),
            },
        }
    }

    /// The meta information is over: its three UIDs decide how the data set is read.
    fn end_meta(&mut self) -> Result<(), Part10Error> {
        let class = self.class.as_ref();
        let class = class.ok_or_else(|| malformed("no Media Storage SOP Class UID"))?;
        let instance = self.instance.as_ref();
        let instance = instance.ok_or_else(|| malformed("no Media Storage SOP Instance UID"))?;
        let syntax = self.syntax.as_ref();
        let syntax = syntax.ok_or_else(|| malformed("no Transfer Syntax UID"))?;
        for (what, uid) in [
            ("SOP Class UID", class),
            ("SOP Instance UID", instance),
            ("Transfer Syntax UID", syntax),
        ] {
            // The same rule as the C-STORE door (PS3.5 9.1).
            if let Err(e) = crate::dicom::part10::validate_uid(uid) {
                return Err(malformed(format!("{what}: {e}")));
            }
        }
        self.explicit = match syntax.as_str() {
            "1.2.840.10008.1.2" => false,
            "1.2.840.10008.1.2.2" => {
                return Err(malformed("explicit VR big endian is not accepted"));
            }
            "1.2.840.10008.1.2.1.99" => {
                return Err(malformed("deflated transfer syntax is not accepted"));
            }
            _ => true,
        };
        self.stage = Stage::DataSet;
        Ok(())
    }

    /// Enters a sequence or item of undefined length.
    fn open(&mut self, frame: Frame) -> Result<(), Part10Error> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(malformed(match frame {
                Frame::Sequence => "sequences nested too deeply",
                Frame::Item => "items nested too deeply",
            }));
        }
        self.stack.push(frame);
        Ok(())
    }

    /// One element of the data set itself: the PatientID ends the walk.
    fn top_level(&mut self, c: &mut Cursor<'_>) -> Result<Option<Instance>, Part10Error> {
        let el = c.header()?;
        if el.tag < self.last {
            return Err(malformed("data set elements out of order"));
        }
        if el.tag == (0x0010, 0x0020) {
            if el.len == UNDEFINED || el.len > 64 * 4 {
                return Err(malformed("PatientID has an impossible length"));
            }
            let patient_id = text(c.take(el.len as usize)?);
            if patient_id.is_empty() {
                return Err(malformed("PatientID is empty"));
            }
            let (Some(sop_class), Some(sop_instance), Some(transfer_syntax)) =
                (&self.class, &self.instance, &self.syntax)
            else {
                return Err(malformed("the data set starts before the meta information"));
            };
            return Ok(Some(Instance {
                sop_class: sop_class.clone(),
                sop_instance: sop_instance.clone(),
                transfer_syntax: transfer_syntax.clone(),
                patient_id,
            }));
        }
        if el.tag > (0x0010, 0x0020) {
            return Err(malformed("no PatientID (0010,0020)"));
        }
        if el.len == UNDEFINED {
            // SQ, or in implicit VR a sequence whose VR we do not know; UN/OB with undefined
            // length (encapsulated) is a sequence of items too.
            self.open(Frame::Sequence)?;
        } else {
            c.skip(el.len)?;
        }
        self.last = el.tag;
        Ok(None)
    }
}

/// Reads the instance's routing facts from the first bytes of a Part 10 file.
/// [`Part10Error::NeedMore`] means the prefix is too short so far. A prefix that grows
/// piece by piece is read with a [`PrefixParser`] instead.
pub fn parse_prefix(buf: &[u8]) -> Result<Instance, Part10Error> {
    PrefixParser::new().parse(buf)
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
    fn a_prefix_fed_piece_by_piece_reads_as_the_whole() {
        let f = explicit_file();
        let whole = parse_prefix(&f).unwrap();
        for piece in [1, 2, 3, 5, 8, 13, 64] {
            let mut p = PrefixParser::new();
            let mut walked = 0;
            let mut got = None;
            for end in (piece..f.len() + piece).step_by(piece) {
                match p.parse(&f[..end.min(f.len())]) {
                    Ok(i) => {
                        got = Some(i);
                        break;
                    }
                    Err(Part10Error::NeedMore) => {}
                    Err(e) => panic!("piece {piece}, {end} bytes: {e}"),
                }
                // Resumes where it stopped: never behind, never past the bytes given.
                assert!(p.walked() >= walked && p.walked() <= end, "piece {piece}");
                walked = p.walked();
            }
            assert_eq!(got.as_ref(), Some(&whole), "piece {piece}");
        }
    }

    #[test]
    fn many_small_elements_fed_a_byte_at_a_time_are_walked_once() {
        // 64 KiB of short elements before the PatientID, one byte more at each call: every
        // call resumes at the element it could not finish, so it walks a few bytes only.
        let mut f = meta("1.2.840.10008.1.2.1");
        let first = f.len();
        for i in 0..8192u16 {
            el_explicit(&mut f, 8, 0x1000 + i, b"SH", b"AB");
        }
        el_explicit(&mut f, 0x10, 0x20, b"LO", b"P-0003");
        let mut p = PrefixParser::new();
        let mut behind = 0usize;
        for end in 1..=f.len() {
            match p.parse(&f[..end]) {
                Ok(i) => {
                    assert_eq!(i.patient_id, "P-0003");
                    assert_eq!(end, f.len());
                    break;
                }
                Err(Part10Error::NeedMore) => {
                    if end > first {
                        // At most one unfinished element: the longest is the PatientID's
                        // (8-byte header, 6-byte value).
                        behind = behind.max(end - p.walked());
                    }
                }
                Err(e) => panic!("{end}: {e}"),
            }
        }
        assert!(behind < 14, "a call left {behind} bytes unwalked");
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
