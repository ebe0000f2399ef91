//! Just enough DICOM Part 10 to route an instance: the SOP Class and Instance UIDs from the
//! file meta information and the PatientID (0010,0020) from the data set, read from a prefix
//! of the file (the rest streams to the spool) by the one bounded Part-10 reader,
//! [`crate::dicom::reader::Reader`].
//!
//! Every transfer syntax the reader walks is read (a deflated data set is inflated as its
//! bytes arrive, big endian is read as such); nothing is allocated from a length read off
//! the wire.

use crate::dicom::reader::{Facts, Progress, Reader};

/// The walk stops before this tag: the PatientID is the last attribute routing needs.
const STOP: (u16, u16) = (0x0010, 0x0021);

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

/// An incremental reader of the routing facts: [`PrefixParser::parse`] is called again with
/// the same prefix grown by the bytes that arrived since, and walks only the new bytes.
/// Parsing a prefix that arrives in any number of pieces costs time linear in its length.
#[derive(Debug)]
pub struct PrefixParser {
    reader: Reader,
    /// Bytes of the prefix given to the reader.
    fed: usize,
    done: Option<Result<Instance, Part10Error>>,
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
            reader: Reader::new(Some(STOP)),
            fed: 0,
            done: None,
        }
    }

    /// Bytes of the prefix walked so far (a later call starts there).
    pub fn walked(&self) -> usize {
        self.fed
    }

    /// What the reader found so far (the meta group's UIDs name a refused part).
    pub fn facts(&self) -> &Facts {
        self.reader.facts()
    }

    /// The reader, to walk the rest of the instance after the prefix.
    pub fn into_reader(self) -> Reader {
        self.reader
    }

    /// Reads on in `buf`, the file's first bytes: the same bytes as at the previous call, and
    /// possibly more. [`Part10Error::NeedMore`] means the prefix is too short so far.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Instance, Part10Error> {
        if let Some(done) = &self.done {
            return done.clone();
        }
        let new = buf.get(self.fed..).unwrap_or_default();
        let progress = self.reader.feed(new);
        self.fed = buf.len().max(self.fed);
        let result = match progress {
            // What the PatientID decided stands, whatever follows it in the bytes given (a
            // piece that ends right after it decides the same): the reader keeps its error,
            // and the walk to the instance's end refuses it.
            Err(e) => self.found().unwrap_or_else(|| Err(malformed(e.0))),
            Ok(p) => match self.found() {
                Some(r) => r,
                None if p == Progress::Stopped => Err(malformed("no PatientID (0010,0020)")),
                None => Err(Part10Error::NeedMore),
            },
        };
        if !matches!(result, Err(Part10Error::NeedMore)) {
            self.done = Some(result.clone());
        }
        result
    }

    /// The instance once its PatientID has been read.
    fn found(&self) -> Option<Result<Instance, Part10Error>> {
        let f = self.reader.facts();
        let patient_id = f.patient_id.as_ref()?;
        if patient_id.is_empty() {
            return Some(Err(malformed("PatientID is empty")));
        }
        let check = |uid: &Option<String>, what: &str| -> Result<String, Part10Error> {
            let uid = uid
                .as_ref()
                .ok_or_else(|| malformed(format!("no Media Storage {what}")))?;
            // The same rule as the C-STORE door (PS3.5 9.1).
            crate::dicom::part10::validate_uid(uid)
                .map_err(|e| malformed(format!("{what}: {e}")))?;
            Ok(uid.clone())
        };
        Some((|| {
            Ok(Instance {
                sop_class: check(&f.media_sop_class, "SOP Class UID")?,
                sop_instance: check(&f.media_sop_instance, "SOP Instance UID")?,
                transfer_syntax: check(&f.transfer_syntax, "Transfer Syntax UID")?,
                patient_id: patient_id.clone(),
            })
        })())
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
    use crate::dicom::test_bytes::{explicit, implicit};

    const UNDEFINED: u32 = u32::MAX;

    fn meta(syntax: &str) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend(explicit(2, 1, b"OB", &[0, 1]));
        out.extend(explicit(2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0"));
        out.extend(explicit(2, 3, b"UI", b"1.2.3.4\0"));
        let mut ts = syntax.as_bytes().to_vec();
        if ts.len() % 2 == 1 {
            ts.push(0);
        }
        out.extend(explicit(2, 0x10, b"UI", &ts));
        out
    }

    fn explicit_file() -> Vec<u8> {
        let mut f = meta("1.2.840.10008.1.2.1");
        f.extend(explicit(8, 0x18, b"UI", b"1.2.3.4\0"));
        // A sequence of undefined length with one item of undefined length.
        f.extend_from_slice(&[0x08, 0x00, 0x32, 0x10]);
        f.extend_from_slice(b"SQ\0\0");
        f.extend_from_slice(&UNDEFINED.to_le_bytes());
        f.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        f.extend_from_slice(&UNDEFINED.to_le_bytes());
        f.extend(explicit(8, 0x100, b"SH", b"CODE"));
        f.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        f.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        f.extend(explicit(0x10, 0x10, b"PN", b"Doe^Jane"));
        f.extend(explicit(0x10, 0x20, b"LO", b"P-0001"));
        f.extend(explicit(0x7FE0, 0x10, b"OW", &[1, 2, 3, 4]));
        f
    }

    /// Fuzz finding (`part10`): an empty PatientID followed by an element out of order was
    /// "out of order" when the whole prefix was given, "PatientID is empty" when a piece
    /// ended right after the PatientID. The PatientID decides either way.
    #[test]
    fn what_follows_the_patient_id_does_not_change_the_answer() {
        let mut f = meta("1.2.840.10008.1.2.1");
        f.extend(explicit(8, 0x18, b"UI", b"1.2.3.4\0"));
        f.extend(explicit(0x10, 0x20, b"LO", b""));
        let cut = f.len();
        f.extend(explicit(0x10, 0x00, b"UL", &[0, 0, 0, 0]));
        let whole = parse_prefix(&f);
        assert_eq!(whole, Err(malformed("PatientID is empty")));
        let mut p = PrefixParser::new();
        assert_eq!(p.parse(&f[..cut]), whole);
        assert_eq!(p.parse(&f), whole);
        // The walk on from the prefix still refuses the element out of order.
        let mut parser = PrefixParser::new();
        let mut f = meta("1.2.840.10008.1.2.1");
        f.extend(explicit(8, 0x18, b"UI", b"1.2.3.4\0"));
        f.extend(explicit(0x10, 0x20, b"LO", b"P-0001"));
        f.extend(explicit(0x10, 0x00, b"UL", &[0, 0, 0, 0]));
        assert_eq!(parser.parse(&f).unwrap().patient_id, "P-0001");
        assert!(parser.into_reader().finish().is_err());
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
            f.extend(explicit(8, 0x1000 + i, b"SH", b"AB"));
        }
        f.extend(explicit(0x10, 0x20, b"LO", b"P-0003"));
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
    fn deflated_and_big_endian_are_read() {
        let mut ds = Vec::new();
        ds.extend(explicit(8, 0x18, b"UI", b"1.2.3.4\0"));
        ds.extend(explicit(0x10, 0x20, b"LO", b"P-0004"));
        ds.extend(explicit(0x7FE0, 0x10, b"OW", &[0u8; 4096]));
        let mut f = meta("1.2.840.10008.1.2.1.99");
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &ds).unwrap();
        f.extend(enc.finish().unwrap());
        assert_eq!(parse_prefix(&f).unwrap().patient_id, "P-0004");
        for piece in [1, 7, 100] {
            let mut p = PrefixParser::new();
            let got = (piece..f.len() + piece)
                .step_by(piece)
                .find_map(|end| p.parse(&f[..end.min(f.len())]).ok());
            assert_eq!(got.unwrap().patient_id, "P-0004", "piece {piece}");
        }

        let mut f = meta("1.2.840.10008.1.2.2");
        f.extend_from_slice(&[0x00, 0x10, 0x00, 0x20, b'L', b'O', 0x00, 0x06]);
        f.extend_from_slice(b"P-0005");
        assert_eq!(parse_prefix(&f).unwrap().patient_id, "P-0005");
    }

    #[test]
    fn implicit_vr() {
        let mut f = meta("1.2.840.10008.1.2");
        f.extend(implicit(8, 0x18, b"1.2.3.4\0"));
        f.extend(implicit(8, 0x1032, &[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]));
        f.extend(implicit(0x10, 0x20, b"P-0002"));
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
        no_patient.extend(explicit(0x10, 0x30, b"DA", b"20240101"));
        assert!(
            matches!(parse_prefix(&no_patient), Err(Part10Error::Malformed(m)) if m.contains("PatientID"))
        );

        let mut bad_uid = meta("1.2.840.10008.1.2.1");
        let at = bad_uid.windows(7).position(|w| w == b"1.2.3.4").unwrap();
        bad_uid[at] = b'/';
        bad_uid.extend(explicit(0x10, 0x20, b"LO", b"P-0001"));
        assert!(
            matches!(parse_prefix(&bad_uid), Err(Part10Error::Malformed(m)) if m.contains("is not a UID"))
        );

        // A VR that is not two upper-case letters (the fuzz finding's `\0\0`).
        let mut no_vr = meta("1.2.840.10008.1.2.1");
        no_vr.extend_from_slice(&[0x08, 0x00, 0x18, 0x00, 0, 0, 4, 0, b'1', b'.', b'2', 0]);
        assert!(
            matches!(parse_prefix(&no_vr), Err(Part10Error::Malformed(m)) if m.contains("not a VR"))
        );

        // A huge declared length inside a sequence asks for more rather than allocating.
        let mut huge = meta("1.2.840.10008.1.2.1");
        huge.extend_from_slice(&[0x08, 0x00, 0x32, 0x10]);
        huge.extend_from_slice(b"SQ\0\0");
        huge.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert_eq!(parse_prefix(&huge), Err(Part10Error::NeedMore));
    }
}
