//! The Storage Commitment request parser `dicom::commitment::parse_action` on arbitrary bytes
//! (the N-ACTION-RQ data set a modality sends on the edge's DICOM doors).
//!
//! Input: bit 0 of byte 0 picks explicit (1) or implicit (0) VR little endian; the rest is
//! the data set.
//!
//! Checks, beyond not panicking:
//! - an accepted request has a Transaction UID and between 1 and `MAX_REFERENCES`
//!   references, every UID valid;
//! - the N-EVENT-REPORT data set `encode_report` writes for it (all committed) parses back
//!   to the same request, in both encodings, and is bounded by the request's size;
//! - a report listing every instance as failed carries no Referenced SOP Sequence, so it
//!   does not parse as a request.
#![no_main]

use baylink::dicom::commitment::{MAX_REFERENCES, Reference, encode_report, parse_action};
use baylink::dicom::part10::validate_uid;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, ds)) = data.split_first() else {
        return;
    };
    let explicit = mode & 1 == 1;
    let Ok(req) = parse_action(ds, explicit) else {
        return;
    };
    assert!(!req.references.is_empty() && req.references.len() <= MAX_REFERENCES);
    for uid in std::iter::once(&req.transaction_uid)
        .chain(req.references.iter().flat_map(|r| [&r.class, &r.instance]))
    {
        assert!(validate_uid(uid).is_ok(), "UID `{uid}`");
    }
    for out_explicit in [false, true] {
        let (event, report) =
            encode_report(&req.transaction_uid, &req.references, &[], out_explicit);
        assert_eq!(event, 1);
        assert!(
            report.len() <= 2 * ds.len() + 64,
            "a report of {} bytes for a request of {}",
            report.len(),
            ds.len()
        );
        let again = parse_action(&report, out_explicit).expect("the report parses back");
        assert_eq!(again, req, "the report does not say what was asked");

        let failed: Vec<(Reference, u16)> = req
            .references
            .iter()
            .cloned()
            .map(|r| (r, 0x0110))
            .collect();
        let (event, report) = encode_report(&req.transaction_uid, &[], &failed, out_explicit);
        assert_eq!(event, 2);
        assert!(parse_action(&report, out_explicit).is_err());
    }
});
