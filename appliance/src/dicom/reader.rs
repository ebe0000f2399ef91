//! The one reader of DICOM Part-10 bytes from outside: an incremental, bounded element walker.
//!
//! Every door reads untrusted instances through [`Reader`]: the STOW-RS prefix
//! ([`crate::ingest::part10::PrefixParser`]), the HTTPS patient check and the
//! de-identification head ([`head_end`], [`check_head`]), the C-STORE instance
//! ([`super::part10::read_instance_from`]) and, for issue 19, the whole instance as it
//! streams to the spool (walked to its end, [`Reader::finish`]).
//!
//! What it guarantees:
//!
//! - **Bounded.** Nothing is allocated from a length read off the wire: a value is skipped
//!   by counting its bytes, and only the few values the doors need (the meta group's UIDs,
//!   SOP Class/Instance UID, PatientID, Study/Series Instance UID at the top level) are
//!   kept, each at most [`MAX_CAPTURED`] bytes. The state is a 12-byte header buffer and
//!   one frame per open sequence or item (at most [`MAX_DEPTH`] sequences deep); a deflated
//!   data set is inflated through a fixed 32 KiB window, and at most [`MAX_INFLATED`] bytes
//!   of it are walked.
//! - **Incremental.** [`Reader::feed`] takes the bytes in pieces of any size, in order; a
//!   piece never has to be given twice. [`Reader::finish`] says whether the bytes ended at
//!   an element boundary outside any sequence.
//! - **One reading.** Meta group (explicit VR little endian, its group length checked
//!   against its elements), then the data set in its transfer syntax: implicit or explicit
//!   VR little endian, explicit VR big endian, deflated (inflated as it arrives), and the
//!   encapsulated syntaxes (pixel data fragments followed item by item). An explicit VR must
//!   be two upper-case letters; a VR other than the ones with a 2-byte length is read with
//!   the 4-byte one (PS3.5 7.1.2). A UN element of undefined length holds implicit VR
//!   little endian items (PS3.5 6.2.2). Top-level tags must ascend strictly; an element
//!   must end inside its enclosing item. With a stop tag, the walk ends before the first
//!   top-level element at or after it ([`Progress::Stopped`]).

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

/// Deepest sequence nesting accepted.
pub const MAX_DEPTH: usize = 16;
/// Longest value kept of the attributes the reader collects (a UID is at most 64 bytes, a
/// PatientID at most 64 characters of up to 4 bytes).
pub const MAX_CAPTURED: usize = 256;
/// Output window of the inflater: the size of deflate's history, so that everything one
/// call inflates (up to a corrupt block) is handed out in that call and walked.
const INFLATE_WINDOW: usize = 32 * 1024;
/// Most inflated bytes of a deflated data set walked.
pub const MAX_INFLATED: u64 = 4 << 30;
/// Bytes of the preamble and the `DICM` prefix.
pub const PREFIX_LEN: usize = 132;

/// Implicit VR Little Endian.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Big Endian (retired).
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
/// Deflated Explicit VR Little Endian.
pub const DEFLATED_LE: &str = "1.2.840.10008.1.2.1.99";

const UNDEFINED: u32 = u32::MAX;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);

/// How a data set is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Explicit VR.
    pub explicit: bool,
    /// Big endian.
    pub big_endian: bool,
    /// Deflated (RFC 1951, no header) after the meta group.
    pub deflated: bool,
}

const EXPLICIT_LE: Encoding = Encoding {
    explicit: true,
    big_endian: false,
    deflated: false,
};
const IMPLICIT_LE: Encoding = Encoding {
    explicit: false,
    big_endian: false,
    deflated: false,
};

/// The encoding of a data set in transfer syntax `ts` (any syntax not named here is
/// explicit VR little endian, as all the encapsulated ones are).
pub fn encoding(ts: &str) -> Encoding {
    match ts {
        IMPLICIT_VR_LE => IMPLICIT_LE,
        EXPLICIT_VR_BE => Encoding {
            big_endian: true,
            ..EXPLICIT_LE
        },
        // Deflated, JPIP Referenced Deflate, JPIP HTJ2K Referenced Deflate.
        DEFLATED_LE | "1.2.840.10008.1.2.4.95" | "1.2.840.10008.1.2.4.205" => Encoding {
            deflated: true,
            ..EXPLICIT_LE
        },
        _ => EXPLICIT_LE,
    }
}

/// Whether an explicit VR element with this VR has the 12-byte header (2 reserved bytes and
/// a 4-byte length). Only the VRs defined with a 2-byte length have the short header; any
/// other, including a VR this reader does not know, has the long one (PS3.5 7.1.2).
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

/// Why the bytes are not a usable Part-10 instance; the text names the problem (and the
/// element, when there is one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReadError(pub String);

fn err<T>(why: impl Into<String>) -> Result<T, ReadError> {
    Err(ReadError(why.into()))
}

fn tag_name(t: (u16, u16)) -> String {
    format!("({:04X},{:04X})", t.0, t.1)
}

/// What [`Reader::feed`] reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Every byte given was walked: give more, or call [`Reader::finish`].
    NeedMore,
    /// The stop tag was reached ([`Reader::stopped_at`]); further bytes are ignored.
    Stopped,
}

/// The attributes the doors need, as read (padding removed; not validated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// Media Storage SOP Class UID (0002,0002).
    pub media_sop_class: Option<String>,
    /// Media Storage SOP Instance UID (0002,0003).
    pub media_sop_instance: Option<String>,
    /// Transfer Syntax UID (0002,0010).
    pub transfer_syntax: Option<String>,
    /// SOP Class UID (0008,0016).
    pub sop_class: Option<String>,
    /// SOP Instance UID (0008,0018).
    pub sop_instance: Option<String>,
    /// PatientID (0010,0020).
    pub patient_id: Option<String>,
    /// Study Instance UID (0020,000D).
    pub study_instance: Option<String>,
    /// Series Instance UID (0020,000E).
    pub series_instance: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    GroupLength,
    MediaClass,
    MediaInstance,
    TransferSyntax,
    SopClass,
    SopInstance,
    PatientId,
    Study,
    Series,
}

fn meta_slot(tag: (u16, u16)) -> Option<Slot> {
    match tag {
        (0x0002, 0x0000) => Some(Slot::GroupLength),
        (0x0002, 0x0002) => Some(Slot::MediaClass),
        (0x0002, 0x0003) => Some(Slot::MediaInstance),
        (0x0002, 0x0010) => Some(Slot::TransferSyntax),
        _ => None,
    }
}

fn data_slot(tag: (u16, u16)) -> Option<Slot> {
    match tag {
        (0x0008, 0x0016) => Some(Slot::SopClass),
        (0x0008, 0x0018) => Some(Slot::SopInstance),
        (0x0010, 0x0020) => Some(Slot::PatientId),
        (0x0020, 0x000D) => Some(Slot::Study),
        (0x0020, 0x000E) => Some(Slot::Series),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Preamble,
    Meta,
    DataSet,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Items up to the end or the sequence delimiter.
    Sequence,
    /// Elements up to the end or the item delimiter.
    Item,
    /// Encapsulated pixel data: fragment items up to the sequence delimiter.
    Fragments,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Kind,
    /// The element that opened it (for messages).
    tag: (u16, u16),
    /// Offset where it ends; `None` for an undefined length.
    end: Option<u64>,
    /// Encoding of what it holds.
    enc: Encoding,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Skip {
        tag: (u16, u16),
        len: u32,
        left: u64,
    },
    Keep {
        tag: (u16, u16),
        slot: Slot,
        left: usize,
        buf: Vec<u8>,
    },
}

struct Inflate {
    z: flate2::Decompress,
    window: Box<[u8]>,
    ended: bool,
}

impl std::fmt::Debug for Inflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflate")
            .field("total_in", &self.z.total_in())
            .field("total_out", &self.z.total_out())
            .field("ended", &self.ended)
            .finish()
    }
}

/// The incremental element walker (see the module documentation).
#[derive(Debug)]
pub struct Reader {
    stop: Option<(u16, u16)>,
    stage: Stage,
    /// Input bytes consumed.
    raw: u64,
    /// Offset in the decoded stream: the file's offset, or for a deflated data set the
    /// data set start plus the inflated bytes.
    pos: u64,
    hdr: [u8; 12],
    hdr_len: usize,
    value: Value,
    stack: Vec<Frame>,
    enc: Encoding,
    last: Option<(u16, u16)>,
    group_end: Option<u64>,
    data_start: u64,
    stopped_at: Option<u64>,
    facts: Facts,
    inflate: Option<Inflate>,
    failed: Option<ReadError>,
}

impl Reader {
    /// A reader at the start of a file (the preamble); with `stop`, the walk ends before the
    /// first top-level data set element whose tag is `>= stop`.
    pub fn new(stop: Option<(u16, u16)>) -> Reader {
        Reader {
            stop,
            stage: Stage::Preamble,
            raw: 0,
            pos: 0,
            hdr: [0; 12],
            hdr_len: 0,
            value: Value::None,
            stack: Vec::new(),
            enc: EXPLICIT_LE,
            last: None,
            group_end: None,
            data_start: 0,
            stopped_at: None,
            facts: Facts::default(),
            inflate: None,
            failed: None,
        }
    }

    /// The attributes read so far.
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// Input bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.raw
    }

    /// Offset of the element the walk stopped before (a file offset unless deflated).
    pub fn stopped_at(&self) -> Option<u64> {
        self.stopped_at
    }

    /// Whether the meta group has been read (the data set encoding is known).
    pub fn in_data_set(&self) -> bool {
        matches!(self.stage, Stage::DataSet | Stage::Stopped)
    }

    /// Offset where the data set starts (after the meta group), once known.
    pub fn data_set_start(&self) -> Option<u64> {
        self.in_data_set().then_some(self.data_start)
    }

    /// The data set's encoding, once the meta group has been read.
    pub fn data_set_encoding(&self) -> Option<Encoding> {
        self.in_data_set().then_some(self.enc)
    }

    /// Walks the next bytes of the file. An error is final: every later call returns it.
    pub fn feed(&mut self, input: &[u8]) -> Result<Progress, ReadError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.feed_inner(input);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    /// The file ended: `Ok` when it ended at an element boundary outside any sequence (or
    /// the walk had stopped), else what was cut.
    pub fn finish(&mut self) -> Result<(), ReadError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.finish_inner();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn finish_inner(&mut self) -> Result<(), ReadError> {
        match self.stage {
            Stage::Stopped => return Ok(()),
            Stage::Preamble => return err("the file ends inside the preamble"),
            Stage::Meta if self.hdr_len == 0 && matches!(self.value, Value::None) => {
                // A meta group and an empty data set.
                self.end_meta()?;
            }
            Stage::Meta | Stage::DataSet => {}
        }
        match &self.value {
            Value::Skip { tag, len, left } => {
                return err(format!(
                    "element {} declares {len} bytes, more than the {} present",
                    tag_name(*tag),
                    u64::from(*len) - left
                ));
            }
            Value::Keep { tag, left, buf, .. } => {
                return err(format!(
                    "element {} declares {} bytes, more than the {} present",
                    tag_name(*tag),
                    buf.len() + left,
                    buf.len()
                ));
            }
            Value::None => {}
        }
        if self.hdr_len > 0 {
            return err(format!(
                "the data ends inside an element header at byte {}",
                self.pos - self.hdr_len as u64
            ));
        }
        if self.stage == Stage::Meta {
            return err("the file ends inside the meta group");
        }
        if let Some(f) = self.stack.last() {
            return err(format!(
                "the data set ends inside {} {}",
                match f.kind {
                    Kind::Sequence | Kind::Item => "the sequence",
                    Kind::Fragments => "the encapsulated pixel data",
                },
                tag_name(self.stack[0].tag)
            ));
        }
        if let Some(i) = &self.inflate
            && !i.ended
        {
            return err("the deflated data set is cut (its deflate stream does not end)");
        }
        Ok(())
    }

    fn feed_inner(&mut self, mut input: &[u8]) -> Result<Progress, ReadError> {
        loop {
            match self.stage {
                Stage::Stopped => return Ok(Progress::Stopped),
                Stage::Preamble => {
                    let seen = self.raw as usize;
                    let n = (PREFIX_LEN - seen).min(input.len());
                    for (i, b) in input[..n].iter().enumerate() {
                        if seen + i >= 128 {
                            self.hdr[seen + i - 128] = *b;
                        }
                    }
                    input = &input[n..];
                    self.raw += n as u64;
                    self.pos = self.raw;
                    if (self.raw as usize) < PREFIX_LEN {
                        return Ok(Progress::NeedMore);
                    }
                    if &self.hdr[..4] != b"DICM" {
                        return err(
                            "not a DICOM Part 10 file: no DICM after the 128-byte preamble",
                        );
                    }
                    self.stage = Stage::Meta;
                }
                Stage::Meta => {
                    let n = self.walk(input)?;
                    input = &input[n..];
                    self.raw += n as u64;
                    if self.stage == Stage::Meta {
                        return Ok(Progress::NeedMore);
                    }
                }
                Stage::DataSet => {
                    let n = self.data_set_input(input)?;
                    self.raw += n as u64;
                    return Ok(if self.stage == Stage::Stopped {
                        Progress::Stopped
                    } else {
                        Progress::NeedMore
                    });
                }
            }
        }
    }

    /// Data set bytes as they come in the file (deflated or not); returns those consumed.
    fn data_set_input(&mut self, input: &[u8]) -> Result<usize, ReadError> {
        let Some(mut inf) = self.inflate.take() else {
            return self.walk(input);
        };
        let mut used = 0;
        let r = loop {
            if inf.ended || self.stage == Stage::Stopped {
                // Bytes after the end of the deflate stream (an even-length pad) are ignored.
                used = input.len();
                break Ok(());
            }
            let (in0, out0) = (inf.z.total_in(), inf.z.total_out());
            let status = inf.z.decompress(
                &input[used..],
                &mut inf.window,
                flate2::FlushDecompress::None,
            );
            used += (inf.z.total_in() - in0) as usize;
            let produced = (inf.z.total_out() - out0) as usize;
            if inf.z.total_out() > MAX_INFLATED {
                break err(format!(
                    "the deflated data set inflates to more than {MAX_INFLATED} bytes"
                ));
            }
            // What inflated before a corrupt block is walked first: the first error in the
            // stream is the one reported, however the input was cut into pieces.
            if let Err(e) = self.walk(&inf.window[..produced]) {
                break Err(e);
            }
            let status = match status {
                Ok(s) => s,
                // The walk stopped in what inflated before the corrupt block: what follows
                // the stop is not read, as when it comes in a later piece.
                Err(_) if self.stage == Stage::Stopped => continue,
                Err(e) => break err(format!("the deflated data set does not inflate: {e}")),
            };
            if status == flate2::Status::StreamEnd {
                inf.ended = true;
                continue;
            }
            if produced == 0 && (used == input.len() || status == flate2::Status::BufError) {
                break Ok(());
            }
        };
        self.inflate = Some(inf);
        r.map(|()| used)
    }

    fn u16_at(&self, at: usize, enc: Encoding) -> u16 {
        let b = [self.hdr[at], self.hdr[at + 1]];
        if enc.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, at: usize, enc: Encoding) -> u32 {
        let b = [
            self.hdr[at],
            self.hdr[at + 1],
            self.hdr[at + 2],
            self.hdr[at + 3],
        ];
        if enc.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// The encoding of the element being read.
    fn current(&self) -> Encoding {
        match self.stage {
            Stage::Meta | Stage::Preamble => EXPLICIT_LE,
            _ => self.stack.last().map_or(self.enc, |f| f.enc),
        }
    }

    /// Where the innermost defined-length container ends.
    fn container_end(&self) -> Option<u64> {
        self.stack.iter().rev().find_map(|f| f.end)
    }

    /// Walks decoded bytes (meta group or data set); returns how many were consumed (all,
    /// unless the meta group or the walk ended inside them).
    fn walk(&mut self, data: &[u8]) -> Result<usize, ReadError> {
        let mut i = 0;
        loop {
            if self.stage == Stage::Stopped {
                return Ok(i);
            }
            // A value in progress.
            match &mut self.value {
                Value::Skip { left, .. } => {
                    let n = (*left).min((data.len() - i) as u64);
                    *left -= n;
                    i += n as usize;
                    self.pos += n;
                    if *left > 0 {
                        return Ok(i);
                    }
                    self.value = Value::None;
                    self.close_frames();
                    continue;
                }
                Value::Keep { left, buf, .. } => {
                    let n = (*left).min(data.len() - i);
                    buf.extend_from_slice(&data[i..i + n]);
                    *left -= n;
                    i += n;
                    self.pos += n as u64;
                    if *left > 0 {
                        return Ok(i);
                    }
                    let Value::Keep { slot, buf, .. } =
                        std::mem::replace(&mut self.value, Value::None)
                    else {
                        unreachable!("matched above")
                    };
                    self.keep(slot, &buf)?;
                    self.close_frames();
                    continue;
                }
                Value::None => {}
            }
            // An element header.
            let enc = self.current();
            let need = if self.hdr_len < 4 {
                4
            } else if !enc.explicit || self.u16_at(0, enc) == 0xFFFE {
                8
            } else if self.hdr_len < 6 {
                6
            } else if long_length(&[self.hdr[4], self.hdr[5]]) {
                12
            } else {
                8
            };
            if self.hdr_len < need {
                if i == data.len() {
                    return Ok(i);
                }
                if self.stage == Stage::Meta && self.hdr_len < 2 {
                    // Only as far as the group: a group other than 0002 starts the data set.
                    let before = self.hdr_len;
                    let n = (2 - before).min(data.len() - i);
                    self.hdr[before..before + n].copy_from_slice(&data[i..i + n]);
                    self.hdr_len += n;
                    i += n;
                    self.pos += n as u64;
                    if self.hdr_len < 2 {
                        return Ok(i);
                    }
                    if self.u16_at(0, enc) != 0x0002 {
                        // Hand those two bytes over to the data set.
                        let first = self.hdr[0];
                        self.hdr_len = 0;
                        self.pos -= 2;
                        self.end_meta()?;
                        if before == 1 {
                            // The first came in an earlier piece (already consumed).
                            self.data_set_input(&[first])?;
                            return Ok(i - 1);
                        }
                        return Ok(i - 2);
                    }
                    continue;
                }
                let n = (need - self.hdr_len).min(data.len() - i);
                self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&data[i..i + n]);
                self.hdr_len += n;
                i += n;
                self.pos += n as u64;
                if self.hdr_len == 4 {
                    self.on_tag(enc)?;
                    if self.stage == Stage::Stopped {
                        return Ok(i);
                    }
                }
                if self.hdr_len == 6 && enc.explicit && self.u16_at(0, enc) != 0xFFFE {
                    let vr = [self.hdr[4], self.hdr[5]];
                    if !vr.iter().all(u8::is_ascii_uppercase) {
                        return err(format!(
                            "element {} has the VR bytes {:02X} {:02X}, not a VR",
                            tag_name(self.tag(enc)),
                            vr[0],
                            vr[1]
                        ));
                    }
                }
                continue;
            }
            // The header is complete.
            let tag = self.tag(enc);
            let (vr, len) = if need == 12 {
                (Some([self.hdr[4], self.hdr[5]]), self.u32_at(8, enc))
            } else if need == 8 && enc.explicit && tag.0 != 0xFFFE {
                (
                    Some([self.hdr[4], self.hdr[5]]),
                    u32::from(self.u16_at(6, enc)),
                )
            } else {
                (None, self.u32_at(4, enc))
            };
            let start = self.pos - need as u64;
            self.hdr_len = 0;
            self.element(tag, vr, len, start, enc)?;
        }
    }

    fn tag(&self, enc: Encoding) -> (u16, u16) {
        (self.u16_at(0, enc), self.u16_at(2, enc))
    }

    /// The tag of the next element is known: order, stop.
    fn on_tag(&mut self, enc: Encoding) -> Result<(), ReadError> {
        let tag = self.tag(enc);
        let top = self.stage == Stage::Meta || self.stack.is_empty();
        if !top {
            return Ok(());
        }
        if self.stage == Stage::DataSet
            && let Some(s) = self.stop
            && tag >= s
        {
            self.stopped_at = Some(self.pos - 4);
            self.stage = Stage::Stopped;
            return Ok(());
        }
        if tag.0 == 0xFFFE {
            return err(format!(
                "{} outside a sequence (an item or delimiter tag at the top level)",
                tag_name(tag)
            ));
        }
        if let Some(last) = self.last
            && tag <= last
        {
            return err(format!(
                "data set elements out of order: {} after {}",
                tag_name(tag),
                tag_name(last)
            ));
        }
        self.last = Some(tag);
        Ok(())
    }

    /// Stores a kept value.
    fn keep(&mut self, slot: Slot, value: &[u8]) -> Result<(), ReadError> {
        if slot == Slot::GroupLength {
            let [a, b, c, d] = value else {
                return err("the meta group length (0002,0000) is not 4 bytes");
            };
            self.group_end = Some(self.pos + u64::from(u32::from_le_bytes([*a, *b, *c, *d])));
            return Ok(());
        }
        let text = String::from_utf8_lossy(value)
            .trim_end_matches(['\0', ' '])
            .trim_start_matches(' ')
            .to_owned();
        let f = &mut self.facts;
        let place = match slot {
            Slot::GroupLength => unreachable!("handled above"),
            Slot::MediaClass => &mut f.media_sop_class,
            Slot::MediaInstance => &mut f.media_sop_instance,
            Slot::TransferSyntax => &mut f.transfer_syntax,
            Slot::SopClass => &mut f.sop_class,
            Slot::SopInstance => &mut f.sop_instance,
            Slot::PatientId => &mut f.patient_id,
            Slot::Study => &mut f.study_instance,
            Slot::Series => &mut f.series_instance,
        };
        *place = Some(text);
        Ok(())
    }

    /// The meta group is over: it decides how the data set is read.
    fn end_meta(&mut self) -> Result<(), ReadError> {
        if let Some(g) = self.group_end
            && g != self.pos
        {
            return err(format!(
                "the meta group length (0002,0000) ends the group at byte {g}, its elements at {}",
                self.pos
            ));
        }
        let Some(ts) = &self.facts.transfer_syntax else {
            return err("the meta group has no Transfer Syntax UID (0002,0010)");
        };
        self.enc = encoding(ts);
        if self.enc.deflated {
            self.inflate = Some(Inflate {
                z: flate2::Decompress::new(false),
                window: vec![0u8; INFLATE_WINDOW].into_boxed_slice(),
                ended: false,
            });
        }
        self.stage = Stage::DataSet;
        self.data_start = self.pos;
        self.last = None;
        Ok(())
    }

    fn is_sequence(tag: (u16, u16), vr: Option<[u8; 2]>) -> bool {
        match vr {
            Some(vr) => &vr == b"SQ",
            None => matches!(
                StandardDataDictionary
                    .by_tag(Tag(tag.0, tag.1))
                    .map(|e| e.vr()),
                Some(VirtualVr::Exact(VR::SQ))
            ),
        }
    }

    fn push(&mut self, frame: Frame) -> Result<(), ReadError> {
        if frame.kind != Kind::Item
            && self.stack.iter().filter(|f| f.kind != Kind::Item).count() >= MAX_DEPTH
        {
            return err(format!("sequences nested deeper than {MAX_DEPTH}"));
        }
        self.stack.push(frame);
        self.close_frames();
        Ok(())
    }

    /// Pops the defined-length containers that end here.
    fn close_frames(&mut self) {
        while let Some(f) = self.stack.last()
            && f.end == Some(self.pos)
        {
            self.stack.pop();
        }
    }

    /// One complete element header at `start` (the value follows at `self.pos`).
    fn element(
        &mut self,
        tag: (u16, u16),
        vr: Option<[u8; 2]>,
        len: u32,
        start: u64,
        enc: Encoding,
    ) -> Result<(), ReadError> {
        let end = (len != UNDEFINED).then(|| self.pos + u64::from(len));
        if let (Some(e), Some(c)) = (end, self.container_end())
            && e > c
        {
            return err(format!(
                "element {} (at byte {start}) runs past its enclosing item",
                tag_name(tag)
            ));
        }
        if self.stage == Stage::Meta {
            if len == UNDEFINED {
                return err(format!(
                    "meta element {} has an undefined length",
                    tag_name(tag)
                ));
            }
            return self.value(tag, len, meta_slot(tag));
        }
        match self.stack.last().map(|f| f.kind) {
            Some(Kind::Sequence) => {
                let undefined = self.stack.last().is_some_and(|f| f.end.is_none());
                match tag {
                    SEQUENCE_END if undefined => {
                        self.stack.pop();
                        self.close_frames();
                        Ok(())
                    }
                    ITEM => self.push(Frame {
                        kind: Kind::Item,
                        tag,
                        end,
                        enc,
                    }),
                    other => err(format!(
                        "{} (at byte {start}) inside a sequence, where an item was expected",
                        tag_name(other)
                    )),
                }
            }
            Some(Kind::Fragments) => match tag {
                SEQUENCE_END => {
                    self.stack.pop();
                    self.close_frames();
                    Ok(())
                }
                ITEM if len != UNDEFINED => self.value(tag, len, None),
                other => err(format!(
                    "{} (at byte {start}) where a pixel data fragment was expected",
                    tag_name(other)
                )),
            },
            Some(Kind::Item) if tag == ITEM_END => {
                if self.stack.last().is_some_and(|f| f.end.is_some()) {
                    return err(format!(
                        "an item delimiter (at byte {start}) in an item of defined length"
                    ));
                }
                self.stack.pop();
                self.close_frames();
                Ok(())
            }
            Some(Kind::Item) | None => {
                if tag.0 == 0xFFFE {
                    return err(format!(
                        "{} (at byte {start}) where a data element was expected",
                        tag_name(tag)
                    ));
                }
                if len == UNDEFINED {
                    let (kind, inner) = match vr.as_ref() {
                        Some(b"SQ") => (Kind::Sequence, enc),
                        // A sequence written as UN: implicit VR little endian items.
                        Some(b"UN") => (Kind::Sequence, IMPLICIT_LE),
                        Some(b"OB" | b"OW") => (Kind::Fragments, enc),
                        None if tag == (0x7FE0, 0x0010) => (Kind::Fragments, enc),
                        None => (Kind::Sequence, enc),
                        Some(v) => {
                            return err(format!(
                                "element {} (at byte {start}) has VR {} and an undefined length",
                                tag_name(tag),
                                String::from_utf8_lossy(v)
                            ));
                        }
                    };
                    return self.push(Frame {
                        kind,
                        tag,
                        end: None,
                        enc: inner,
                    });
                }
                if len > 0 && Self::is_sequence(tag, vr) {
                    return self.push(Frame {
                        kind: Kind::Sequence,
                        tag,
                        end,
                        enc,
                    });
                }
                let slot = if self.stack.is_empty() {
                    data_slot(tag)
                } else {
                    None
                };
                self.value(tag, len, slot)
            }
        }
    }

    /// Starts skipping or keeping a value of defined length.
    fn value(&mut self, tag: (u16, u16), len: u32, slot: Option<Slot>) -> Result<(), ReadError> {
        match slot {
            Some(slot) => {
                if len as usize > MAX_CAPTURED {
                    return err(format!(
                        "element {} declares {len} bytes, more than such a value holds \
                         ({MAX_CAPTURED})",
                        tag_name(tag)
                    ));
                }
                self.value = Value::Keep {
                    tag,
                    slot,
                    left: len as usize,
                    buf: Vec::with_capacity(len as usize),
                };
            }
            None => {
                self.value = Value::Skip {
                    tag,
                    len,
                    left: u64::from(len),
                };
            }
        }
        Ok(())
    }
}

/// Walks a held head of a Part-10 file (`file` starts at the preamble) up to the first
/// top-level element at or after `stop`, as de-identification does before it rewrites the
/// head. `cut` says that `file` is a prefix cut at a size limit (running out of bytes is
/// then an error naming the limit); otherwise the bytes must end at an element boundary
/// outside any sequence, or at the stop element.
pub fn check_head(file: &[u8], cut: bool, stop: (u16, u16)) -> Result<(), String> {
    let mut r = Reader::new(Some(stop));
    match r.feed(file).map_err(|e| e.0)? {
        Progress::Stopped => Ok(()),
        Progress::NeedMore if cut => Err(format!(
            "the attributes before {} exceed the {} bytes read",
            tag_name(stop),
            file.len()
        )),
        Progress::NeedMore => r.finish().map_err(|e| e.0),
    }
}

/// Where the head of a data set ends (see [`head_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadEnd {
    /// Offset (from the start of the file) of the first top-level element at or after the
    /// stop tag, or the file's length when a complete file has none.
    At(usize),
    /// The bytes given end inside the head: give more.
    NeedMore,
}

/// Why [`head_end`] cannot find the end of the head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The data set is encoded in a way that cannot be rewritten in place (deflated, big
    /// endian).
    #[error("transfer syntax {0} cannot be rewritten in place")]
    Unsupported(String),
    /// The bytes are not a usable Part-10 head; the text names the problem.
    #[error("{0}")]
    Malformed(String),
}

/// Finds where the part of a Part-10 file before `stop` ends (`file` starts at the
/// preamble): the offset of the first top-level data set element whose tag is `>= stop`.
///
/// `complete` says that `file` is the whole file; otherwise running out of bytes in the head
/// is [`HeadEnd::NeedMore`]. Deflated and big endian data sets are
/// [`HeadError::Unsupported`] (their offsets are not the file's, or their bytes would have
/// to be re-encoded to be rewritten).
pub fn head_end(file: &[u8], complete: bool, stop: (u16, u16)) -> Result<HeadEnd, HeadError> {
    let mut r = Reader::new(Some(stop));
    let fed = r.feed(file);
    if let Some(ts) = &r.facts().transfer_syntax
        && r.in_data_set()
    {
        let enc = encoding(ts);
        if enc.deflated || enc.big_endian {
            return Err(HeadError::Unsupported(ts.clone()));
        }
    }
    match fed.map_err(|e| HeadError::Malformed(e.0))? {
        Progress::Stopped => {
            let at = r.stopped_at().unwrap_or_default();
            Ok(HeadEnd::At(usize::try_from(at).unwrap_or(usize::MAX)))
        }
        Progress::NeedMore if !complete => Ok(HeadEnd::NeedMore),
        Progress::NeedMore => {
            r.finish().map_err(|e| HeadError::Malformed(e.0))?;
            if let Some(ts) = &r.facts().transfer_syntax {
                let enc = encoding(ts);
                if enc.deflated || enc.big_endian {
                    return Err(HeadError::Unsupported(ts.clone()));
                }
            }
            Ok(HeadEnd::At(file.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::dicom::test_bytes::{explicit, implicit};

    fn meta(ts: &str) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(explicit(2, 2, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0"));
        m.extend(explicit(2, 3, b"UI", b"1.2.3.4\0"));
        let mut t = ts.as_bytes().to_vec();
        if t.len() % 2 == 1 {
            t.push(0);
        }
        m.extend(explicit(2, 0x10, b"UI", &t));
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend(explicit(2, 0, b"UL", &(m.len() as u32).to_le_bytes()));
        out.extend(m);
        out
    }

    /// A complete explicit VR instance: UIDs, a nested sequence, the patient, pixel data.
    fn instance() -> Vec<u8> {
        let mut f = meta("1.2.840.10008.1.2.1");
        f.extend(explicit(8, 0x16, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0"));
        f.extend(explicit(8, 0x18, b"UI", b"1.2.3.4\0"));
        f.extend_from_slice(&[0x08, 0x00, 0x32, 0x10, b'S', b'Q', 0, 0]);
        f.extend_from_slice(&UNDEFINED.to_le_bytes());
        f.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        f.extend_from_slice(&UNDEFINED.to_le_bytes());
        f.extend(explicit(8, 0x100, b"SH", b"CODE"));
        f.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        f.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        f.extend(explicit(0x10, 0x20, b"LO", b"P-0001"));
        f.extend(explicit(0x20, 0x0D, b"UI", b"1.2.3.5\0"));
        f.extend(explicit(0x20, 0x0E, b"UI", b"1.2.3.6\0"));
        f.extend(explicit(0x7FE0, 0x10, b"OW", &[7u8; 64]));
        f
    }

    fn walk(file: &[u8], piece: usize) -> (Result<(), ReadError>, Facts) {
        let mut r = Reader::new(None);
        let result = file
            .chunks(piece)
            .try_for_each(|c| r.feed(c).map(drop))
            .and_then(|()| r.finish());
        (result, r.facts().clone())
    }

    #[test]
    fn a_whole_instance_walks_to_its_end_in_any_pieces() {
        let f = instance();
        for piece in [1, 2, 3, 7, 64, f.len()] {
            let (result, facts) = walk(&f, piece);
            assert_eq!(result, Ok(()), "piece {piece}");
            assert_eq!(facts.patient_id.as_deref(), Some("P-0001"));
            assert_eq!(facts.study_instance.as_deref(), Some("1.2.3.5"));
            assert_eq!(facts.series_instance.as_deref(), Some("1.2.3.6"));
            assert_eq!(facts.sop_instance.as_deref(), Some("1.2.3.4"));
            assert_eq!(
                facts.transfer_syntax.as_deref(),
                Some("1.2.840.10008.1.2.1")
            );
        }
    }

    #[test]
    fn an_instance_cut_anywhere_is_not_complete() {
        let f = instance();
        let meta_end = meta("1.2.840.10008.1.2.1").len();
        // Cut at every byte: only the element boundaries at the top level are complete.
        let mut boundaries = 0;
        for n in 0..f.len() {
            if walk(&f[..n], 5).0.is_ok() {
                boundaries += 1;
                assert!(n >= meta_end, "{n}");
            }
        }
        // Meta end, and after each of the 6 top-level data set elements but the last.
        assert_eq!(boundaries, 7);
        let (e, _) = walk(&f[..f.len() - 10], 9);
        assert!(e.unwrap_err().0.contains("(7FE0,0010) declares 64 bytes"));
    }

    #[test]
    fn stops_before_the_stop_tag() {
        let f = instance();
        let mut r = Reader::new(Some((0x0010, 0x0021)));
        assert_eq!(r.feed(&f).unwrap(), Progress::Stopped);
        let at = r.stopped_at().unwrap() as usize;
        assert_eq!(&f[at..at + 4], &[0x20, 0x00, 0x0D, 0x00]);
        assert_eq!(r.facts().patient_id.as_deref(), Some("P-0001"));
        assert_eq!(r.facts().study_instance, None);
    }

    #[test]
    fn implicit_vr_length_bytes_are_not_taken_for_a_vr() {
        // The first data set element's length bytes sit where an explicit VR would: the meta
        // group ends on the group number alone.
        let mut f = meta(IMPLICIT_VR_LE);
        f.extend(implicit(8, 0x18, b"1.2.3.4\0"));
        f.extend(implicit(0x10, 0x20, b"P-0002"));
        for piece in [1, 3, f.len()] {
            let (result, facts) = walk(&f, piece);
            assert_eq!(result, Ok(()));
            assert_eq!(facts.patient_id.as_deref(), Some("P-0002"));
        }
    }

    #[test]
    fn vr_bytes_that_are_not_a_vr_are_refused_in_a_deflated_data_set() {
        // The `part10` fuzz finding: a deflated data set whose elements have the VR bytes
        // `\0\0`, followed by an element declaring 2.5 GB. Refused at the first bad VR,
        // without reading on.
        let mut ds = Vec::new();
        ds.extend(explicit(8, 0x16, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0"));
        ds.extend_from_slice(&[0x08, 0x00, 0x20, 0x00, 0, 0, 8, 0]);
        ds.extend_from_slice(b"20240101");
        ds.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
        ds.extend_from_slice(&2_500_000_000u32.to_le_bytes());
        let mut f = meta(DEFLATED_LE);
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &ds).unwrap();
        f.extend(enc.finish().unwrap());
        let (e, _) = walk(&f, 13);
        assert_eq!(
            e.unwrap_err().0,
            "element (0008,0020) has the VR bytes 00 00, not a VR"
        );
        let e = super::super::part10::read_instance_from(&f[..]).unwrap_err();
        assert!(e.to_string().contains("not a VR"), "{e}");

        // Without the bad element: the 2.5 GB value is skipped by counting, and the file
        // ends inside it.
        ds.drain(34..50);
        let mut f = meta(DEFLATED_LE);
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &ds).unwrap();
        f.extend(enc.finish().unwrap());
        let (e, _) = walk(&f, 13);
        assert!(
            e.unwrap_err()
                .0
                .contains("(0009,1010) declares 2500000000 bytes"),
            "{f:?}"
        );
    }

    #[test]
    fn the_first_error_in_the_stream_is_reported_whatever_the_pieces() {
        // The `part10` fuzz finding: a deflated data set whose inflated bytes hold a bad VR
        // before its deflate stream turns corrupt. Walked whole, the bytes inflated in the
        // call that met the corrupt block were dropped and the inflate error reported; in
        // pieces, the bad VR. Both now report the bad VR, and a corrupt block after good
        // elements is the inflate error in both.
        let stored_then_corrupt = |ds: &[u8]| {
            let mut f = meta(DEFLATED_LE);
            // One stored block, not final (BFINAL 0, BTYPE 00), then a block of the
            // reserved type 11.
            f.push(0x00);
            f.extend_from_slice(&(ds.len() as u16).to_le_bytes());
            f.extend_from_slice(&(!(ds.len() as u16)).to_le_bytes());
            f.extend_from_slice(ds);
            f.push(0x07);
            f.extend_from_slice(&[0u8; 8]);
            f
        };
        let mut ds = Vec::new();
        ds.extend(explicit(8, 0x16, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0"));
        ds.extend_from_slice(&[0x08, 0x00, 0x20, 0x00, 0xED, 0xFF, 8, 0]);
        ds.extend_from_slice(b"20240101");
        let f = stored_then_corrupt(&ds);
        for piece in [1, 5, 64, f.len() - 9, f.len()] {
            let (e, _) = walk(&f, piece);
            assert_eq!(
                e.unwrap_err().0,
                "element (0008,0020) has the VR bytes ED FF, not a VR",
                "piece {piece}"
            );
        }
        ds.truncate(34);
        let f = stored_then_corrupt(&ds);
        for piece in [1, 5, 64, f.len()] {
            let (e, _) = walk(&f, piece);
            assert!(
                e.unwrap_err().0.contains("does not inflate"),
                "piece {piece}"
            );
        }

        // A walk with a stop tag that stops before the corrupt block is not told of it (the
        // second `part10` finding: the STOW-RS prefix reader, which stops after PatientID,
        // said "does not inflate" whole and "no PatientID" in pieces).
        ds.extend(explicit(0x10, 0x20, b"LO", b"P-0004"));
        ds.extend(explicit(0x20, 0x0D, b"UI", b"1.2.3.5\0"));
        let f = stored_then_corrupt(&ds);
        for piece in [1, 5, 64, f.len() - 9, f.len()] {
            let mut r = Reader::new(Some((0x0010, 0x0021)));
            let mut progress = Progress::NeedMore;
            for c in f.chunks(piece) {
                progress = r.feed(c).unwrap();
                if progress == Progress::Stopped {
                    break;
                }
            }
            assert_eq!(progress, Progress::Stopped, "piece {piece}");
            assert_eq!(r.finish(), Ok(()), "piece {piece}");
            assert_eq!(r.facts().patient_id.as_deref(), Some("P-0004"));
        }
    }

    #[test]
    fn big_endian_and_bounds() {
        let mut f = meta(EXPLICIT_VR_BE);
        f.extend_from_slice(&[0x00, 0x10, 0x00, 0x20, b'L', b'O', 0x00, 0x06]);
        f.extend_from_slice(b"P-0003");
        let (result, facts) = walk(&f, 4);
        assert_eq!(result, Ok(()));
        assert_eq!(facts.patient_id.as_deref(), Some("P-0003"));

        // A kept value over MAX_CAPTURED, elements out of order, too deep a nesting.
        let mut f = meta("1.2.840.10008.1.2.1");
        f.extend(explicit(0x10, 0x20, b"LO", &[b'x'; 300]));
        assert!(
            walk(&f, 64)
                .0
                .unwrap_err()
                .0
                .contains("more than such a value")
        );
        let mut f = meta("1.2.840.10008.1.2.1");
        f.extend(explicit(0x10, 0x20, b"LO", b"P1"));
        f.extend(explicit(0x08, 0x18, b"UI", b"1.2"));
        assert!(walk(&f, 64).0.unwrap_err().0.contains("out of order"));
        let mut f = meta("1.2.840.10008.1.2.1");
        for _ in 0..=MAX_DEPTH {
            f.extend_from_slice(&[0x08, 0x00, 0x32, 0x10, b'S', b'Q', 0, 0]);
            f.extend_from_slice(&UNDEFINED.to_le_bytes());
            f.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            f.extend_from_slice(&UNDEFINED.to_le_bytes());
        }
        assert!(walk(&f, 64).0.unwrap_err().0.contains("nested deeper"));
    }
}
