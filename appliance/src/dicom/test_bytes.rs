//! DICOM bytes written by hand for the unit tests of the readers, the Part-10 writer and
//! de-identification: data elements in explicit and implicit VR little endian, and the
//! padding rule. Values are written exactly as given unless a test asks for padding, so a
//! malformed file is as easy to build as a valid one.

use super::reader::long_length;

/// The length of an item or sequence whose end is a delimiter.
pub const UNDEFINED: u32 = u32::MAX;

/// An explicit VR little endian element: tag, VR, the length field the VR has (2 bytes, or
/// 2 reserved and 4), then `value` as given.
pub fn explicit(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + value.len());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if long_length(vr) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
    out
}

/// An explicit VR element with a 2-byte length field whatever its VR says (an unknown VR
/// written by a writer that took it for a short one).
pub fn short_length(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// [`explicit`] of `value` padded to an even length as PS3.5 pads it: a UID with NUL,
/// anything else with a space.
pub fn padded(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    explicit(
        group,
        elem,
        vr,
        &even(value, if vr == b"UI" { 0 } else { b' ' }),
    )
}

/// An implicit VR little endian element: tag, 4-byte length, `value` as given.
pub fn implicit(group: u16, elem: u16, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// An explicit VR `UN` element whose length field says `len` ([`UNDEFINED`] when `None`),
/// whatever `value` holds.
pub fn un(group: u16, elem: u16, value: &[u8], len: Option<u32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + value.len());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(b"UN\0\0");
    out.extend_from_slice(&len.unwrap_or(UNDEFINED).to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// `value`, with one `pad` byte added when its length is odd.
pub fn even(value: &[u8], pad: u8) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    v
}

#[test]
fn long_vrs_get_a_four_byte_length() {
    assert_eq!(explicit(0x7FE0, 0x10, b"OW", &[1, 2]).len(), 12 + 2);
    assert_eq!(explicit(0x0010, 0x20, b"LO", b"P1").len(), 8 + 2);
    assert_eq!(
        padded(0x0008, 0x18, b"UI", b"1.2.3"),
        explicit(0x0008, 0x18, b"UI", b"1.2.3\0")
    );
    assert_eq!(
        padded(0x0010, 0x20, b"LO", b"P-1"),
        explicit(0x0010, 0x20, b"LO", b"P-1 ")
    );
}
