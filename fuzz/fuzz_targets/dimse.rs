//! The DIMSE command set decoder `dicom::dimse::parse_command` on arbitrary bytes (what a
//! calling AE sends in the command P-DATA fragments of a C-STORE or C-ECHO association).
//!
//! Checks, beyond not panicking: an accepted command is answered by `dimse::response`
//! (with a comment cut from the input), the answer is an even-length implicit VR little
//! endian command set, bounded by the request, whose group length counts the rest.
#![no_main]

use baylink::dicom::dimse::{parse_command, response, status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = parse_command(data) else {
        return;
    };
    // A UID that is not UTF-8 is read lossily: at most 3 bytes of text per byte.
    assert!(cmd.affected_sop_class_uid.len() <= 3 * data.len());
    assert!(cmd.affected_sop_instance_uid.len() <= 3 * data.len());
    let comment = String::from_utf8_lossy(&data[..data.len().min(80)]).into_owned();
    for (st, c) in [
        (status::SUCCESS, None),
        (status::CANNOT_UNDERSTAND, Some(comment.as_str())),
    ] {
        let rsp = response(&cmd, st, c);
        assert!(
            rsp.len() <= 3 * data.len() + 256,
            "response of {} bytes",
            rsp.len()
        );
        assert!(rsp.len().is_multiple_of(2), "odd-length command set");
        assert!(rsp.len() >= 12);
        assert_eq!(
            &rsp[..8],
            &[0, 0, 0, 0, 4, 0, 0, 0],
            "no group length first"
        );
        let group_len = u32::from_le_bytes(rsp[8..12].try_into().expect("4 bytes"));
        assert_eq!(group_len as usize, rsp.len() - 12, "group length");
    }
});
