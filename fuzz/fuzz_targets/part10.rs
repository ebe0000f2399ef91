//! The one Part-10 reader on arbitrary bytes: `dicom::reader::Reader` walked to the end in
//! pieces and at once, and what calls it: `dicom::part10::read_instance_from` (the C-STORE
//! head), `dicom::reader::{check_head, head_end}` (the de-identification head) and the
//! STOW-RS prefix reader `ingest::part10::PrefixParser`.
//!
//! Input: byte 0 is the size of the pieces the prefix arrives in (1..=256) and picks the
//! stop tag; the rest is the file, from its preamble.
//!
//! Checks, beyond not panicking:
//! - the prefix fed piece by piece (the same growing buffer each call, as STOW-RS does)
//!   gives the same instance or error as the whole prefix at once, and `NeedMore` only
//!   while bytes are missing;
//! - the parser's walked offset never goes past the bytes given, nor backwards;
//! - `head_end` on a complete file never asks for more, and its offset is within the file;
//! - the reader walked to the end in pieces agrees with the reader given the whole file.
#![no_main]

use baylink::dicom::reader::{HeadEnd, Reader, check_head, head_end};
use baylink::dicom::part10::read_instance_from;
use baylink::ingest::part10::{Part10Error, PrefixParser, parse_prefix};
use libfuzzer_sys::fuzz_target;

const STOPS: [(u16, u16); 4] = [
    (0x0010, 0x0021),
    (0x7FE0, 0x0010),
    (0x0008, 0x0000),
    (0xFFFF, 0xFFFF),
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let step = usize::from(mode) + 1;
    let stop = STOPS[usize::from(mode) % STOPS.len()];

    let _ = read_instance_from(file);
    let _ = check_head(file, false, stop);
    let _ = check_head(file, true, stop);
    match head_end(file, true, stop) {
        Ok(HeadEnd::NeedMore) => panic!("a complete file needs more"),
        Ok(HeadEnd::At(at)) => assert!(at <= file.len(), "head end past the file"),
        Err(_) => {}
    }
    let _ = head_end(file, false, stop);

    let mut once = Reader::new(None);
    let once_result = once.feed(file).and_then(|_| once.finish());
    let mut piecewise = Reader::new(None);
    let piece_result = file
        .chunks(step)
        .try_for_each(|c| piecewise.feed(c).map(drop))
        .and_then(|()| piecewise.finish());
    assert_eq!(once_result, piece_result, "piecewise and whole walk differ");
    assert_eq!(once.facts(), piecewise.facts(), "piecewise and whole facts differ");

    let whole = parse_prefix(file);
    let mut parser = PrefixParser::new();
    let mut end = 0;
    let pieces = loop {
        end = (end + step).min(file.len());
        let before = parser.walked();
        let r = parser.parse(&file[..end]);
        assert!(parser.walked() >= before, "the parser went backwards");
        assert!(parser.walked() <= end, "walked past the bytes given");
        match r {
            Err(Part10Error::NeedMore) if end < file.len() => continue,
            r => break r,
        }
    };
    assert_eq!(pieces, whole, "piecewise and whole prefix differ");
});
