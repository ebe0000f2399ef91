//! DICOM Part-10 files: what the SCP reads from an instance and the header it writes for one.
//!
//! Reading goes through the one bounded Part-10 reader ([`super::reader`]) and stops right
//! after the Patient module's PatientID: the SOP Class and Instance UIDs (group 0008) and the
//! PatientID (0010,0020) come before it in tag order, so pixel data, which the relay never
//! decodes, is never read. Reading is bounded in bytes ([`HEAD_LIMIT`]) and never allocates
//! from a declared length. dicom-rs only writes here (the file meta group).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use dicom_object::FileMetaTableBuilder;

use super::reader::{Facts, Progress, Reader};

/// Longest UID PS3.5 allows.
pub const MAX_UID_LEN: usize = 64;
/// Longest PatientID (VR LO) accepted.
pub const MAX_PATIENT_ID_LEN: usize = 64;
/// Bytes read at most from the start of a file to find the meta group, the SOP UIDs and the
/// PatientID.
pub const HEAD_LIMIT: u64 = 4 * 1024 * 1024;
/// Implementation Class UID written into the meta group of the files the SCP builds
/// (a UUID-derived UID under the `2.25` arc).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.208112417186813537203917447442939470119";
/// Implementation Version Name written into the meta group.
pub const IMPLEMENTATION_VERSION_NAME: &str = "BAYLINK_0";

/// Why a string is not a UID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    /// Empty string.
    #[error("empty UID")]
    Empty,
    /// Over [`MAX_UID_LEN`] characters.
    #[error("UID of {0} characters (at most 64)")]
    TooLong(usize),
    /// A character other than a digit or a dot, or an empty or zero-led component.
    #[error("`{0}` is not a UID (digits and dots, no empty or zero-led component)")]
    Syntax(String),
}

/// Bytes of a Part 10 file's 128-byte preamble and its `DICM` prefix.
pub const PREFIX_LEN: usize = 132;

/// Whether `head` (the start of a file) has a Part 10 preamble followed by `DICM` (PS3.10
/// 7.1); false if it is shorter than [`PREFIX_LEN`].
pub fn has_prefix(head: &[u8]) -> bool {
    head.get(128..PREFIX_LEN) == Some(b"DICM".as_slice())
}

/// Checks a UID as PS3.5 9.1 defines it: components of digits separated by dots, no empty
/// component, no leading zero in a component other than `0` itself, at most 64 characters.
pub fn validate_uid(uid: &str) -> Result<(), UidError> {
    if uid.is_empty() {
        return Err(UidError::Empty);
    }
    if uid.len() > MAX_UID_LEN {
        return Err(UidError::TooLong(uid.len()));
    }
    let ok = uid.split('.').all(|c| {
        !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) && (c == "0" || !c.starts_with('0'))
    });
    if ok {
        Ok(())
    } else {
        let shown: String = uid.chars().take(MAX_UID_LEN).collect();
        Err(UidError::Syntax(shown.escape_debug().to_string()))
    }
}

/// Removes the padding DICOM puts after string values (trailing NUL or space).
pub fn trim_padding(s: &str) -> &str {
    s.trim_end_matches(['\0', ' '])
}

/// Why an instance could not be read or a header not built.
#[derive(Debug, thiserror::Error)]
pub enum Part10Error {
    /// The file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be read.
    #[error("cannot read the instance: {0}")]
    Read(#[source] std::io::Error),
    /// The bytes are not a well-formed Part-10 instance (the text names the problem).
    #[error("not a well-formed DICOM instance: {0}")]
    Malformed(String),
    /// A required attribute is absent or empty.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A UID attribute holds something that is not a UID.
    #[error("{what}: {source}")]
    BadUid {
        /// Which attribute.
        what: &'static str,
        /// Why.
        #[source]
        source: UidError,
    },
    /// The PatientID is not usable as a consent key.
    #[error(
        "PatientID {0:?} is not usable (1..=64 characters, no control characters or backslash)"
    )]
    BadPatientId(String),
    /// The data set's SOP UIDs differ from the meta group's.
    #[error("{what} of the data set ({dataset}) differs from the file meta's ({meta})")]
    Mismatch {
        /// Which UID.
        what: &'static str,
        /// Value in the data set.
        dataset: String,
        /// Value in the meta group.
        meta: String,
    },
    /// The meta group could not be built or written.
    #[error("cannot write the file meta group: {0}")]
    Write(#[source] Box<dicom_object::meta::Error>),
}

/// What the relay needs from one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Transfer Syntax UID (0002,0010).
    pub transfer_syntax: String,
    /// Media Storage SOP Class UID (0002,0002).
    pub media_sop_class_uid: String,
    /// Media Storage SOP Instance UID (0002,0003).
    pub media_sop_instance_uid: String,
    /// SOP Class UID (0008,0016) of the data set.
    pub sop_class_uid: String,
    /// SOP Instance UID (0008,0018) of the data set.
    pub sop_instance_uid: String,
    /// PatientID (0010,0020).
    pub patient_id: String,
}

/// Reads an instance's meta group and the start of its data set from a Part-10 file
/// (preamble, `DICM`, meta group, data set) and checks the UIDs and the PatientID.
pub fn read_instance(path: &Path) -> Result<InstanceInfo, Part10Error> {
    let file = File::open(path).map_err(|source| Part10Error::Open {
        path: path.to_owned(),
        source,
    })?;
    read_instance_from(BufReader::new(file))
}

/// As [`read_instance`], from any reader positioned at the start of the 128-byte preamble.
pub fn read_instance_from(mut reader: impl Read) -> Result<InstanceInfo, Part10Error> {
    // Everything needed sorts before (0010,0021): stop there.
    const STOP: (u16, u16) = (0x0010, 0x0021);
    let mut walker = Reader::new(Some(STOP));
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(Part10Error::Read)?;
        if n == 0 {
            walker.finish().map_err(|e| Part10Error::Malformed(e.0))?;
            break;
        }
        read += n as u64;
        let progress = walker
            .feed(&buf[..n])
            .map_err(|e| Part10Error::Malformed(e.0))?;
        if progress == Progress::Stopped {
            break;
        }
        if read >= HEAD_LIMIT {
            return Err(Part10Error::Malformed(format!(
                "the attributes before PatientID exceed {HEAD_LIMIT} bytes"
            )));
        }
    }
    instance_info(walker.facts())
}

/// Checks what the reader found: the UIDs (present, well-formed, the data set's equal to the
/// meta group's) and the PatientID.
pub fn instance_info(facts: &Facts) -> Result<InstanceInfo, Part10Error> {
    let uid = |value: &Option<String>, what: &'static str| -> Result<String, Part10Error> {
        let v = trim_padding(value.as_deref().unwrap_or_default());
        if v.is_empty() {
            return Err(Part10Error::Missing(what));
        }
        validate_uid(v).map_err(|source| Part10Error::BadUid { what, source })?;
        Ok(v.to_owned())
    };
    let info = InstanceInfo {
        transfer_syntax: uid(&facts.transfer_syntax, "Transfer Syntax UID (0002,0010)")?,
        media_sop_class_uid: uid(
            &facts.media_sop_class,
            "Media Storage SOP Class UID (0002,0002)",
        )?,
        media_sop_instance_uid: uid(
            &facts.media_sop_instance,
            "Media Storage SOP Instance UID (0002,0003)",
        )?,
        sop_class_uid: uid(&facts.sop_class, "SOP Class UID (0008,0016)")?,
        sop_instance_uid: uid(&facts.sop_instance, "SOP Instance UID (0008,0018)")?,
        patient_id: match facts.patient_id.as_deref().map(trim_padding) {
            Some(p) if !p.is_empty() => p.to_owned(),
            _ => return Err(Part10Error::Missing("PatientID (0010,0020)")),
        },
    };
    let p = &info.patient_id;
    if p.len() > MAX_PATIENT_ID_LEN || p.chars().any(|c| c.is_control() || c == '\\') {
        return Err(Part10Error::BadPatientId(p.chars().take(80).collect()));
    }
    if info.sop_class_uid != info.media_sop_class_uid {
        return Err(Part10Error::Mismatch {
            what: "SOP Class UID",
            dataset: info.sop_class_uid,
            meta: info.media_sop_class_uid,
        });
    }
    if info.sop_instance_uid != info.media_sop_instance_uid {
        return Err(Part10Error::Mismatch {
            what: "SOP Instance UID",
            dataset: info.sop_instance_uid,
            meta: info.media_sop_instance_uid,
        });
    }
    Ok(info)
}

/// Builds the start of a Part-10 file for a data set received over the network: the 128-byte
/// zero preamble, `DICM` and the file meta group (explicit VR little endian) naming the SOP
/// Class and Instance UIDs and the transfer syntax the data set is encoded in. The data set's
/// bytes follow unchanged, so what lands at the destination is a normal `.dcm` file.
pub fn file_header(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax: &str,
    source_ae_title: &str,
) -> Result<Vec<u8>, Part10Error> {
    for (what, v) in [
        ("SOP Class UID", sop_class_uid),
        ("SOP Instance UID", sop_instance_uid),
        ("Transfer Syntax UID", transfer_syntax),
    ] {
        validate_uid(v).map_err(|source| Part10Error::BadUid { what, source })?;
    }
    let mut builder = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid)
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if super::valid_ae_title(source_ae_title) {
        builder = builder.source_application_entity_title(source_ae_title.trim());
    }
    let meta = builder
        .build()
        .map_err(|e| Part10Error::Write(Box::new(e)))?;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|e| Part10Error::Write(Box::new(e)))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::test_bytes::{even, padded, short_length};

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    fn instance(class: &str, inst: &str, patient: &str) -> Vec<u8> {
        let mut f = file_header(CT, "1.2.3.4", EXPLICIT_LE, "STORESCU").unwrap();
        f.extend(padded(0x0008, 0x0016, b"UI", class.as_bytes()));
        f.extend(padded(0x0008, 0x0018, b"UI", inst.as_bytes()));
        f.extend(padded(0x0010, 0x0010, b"PN", b"Test^Patient"));
        f.extend(padded(0x0010, 0x0020, b"LO", patient.as_bytes()));
        f.extend(padded(0x0028, 0x0010, b"US", &4u16.to_le_bytes()));
        f
    }

    #[test]
    fn uid_rules() {
        assert!(validate_uid("1.2.840.10008.1.2").is_ok());
        assert!(validate_uid("0.1").is_ok());
        assert_eq!(validate_uid(""), Err(UidError::Empty));
        assert!(matches!(
            validate_uid(&"1".repeat(65)),
            Err(UidError::TooLong(65))
        ));
        for bad in ["1..2", ".1", "1.", "1.02", "1.2a", "../etc", "1/2", "1.2\0"] {
            assert!(validate_uid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn header_and_dataset_read_back() {
        let f = instance(CT, "1.2.3.4", "P-0001");
        let info = read_instance_from(&f[..]).unwrap();
        assert_eq!(
            info,
            InstanceInfo {
                transfer_syntax: EXPLICIT_LE.into(),
                media_sop_class_uid: CT.into(),
                media_sop_instance_uid: "1.2.3.4".into(),
                sop_class_uid: CT.into(),
                sop_instance_uid: "1.2.3.4".into(),
                patient_id: "P-0001".into(),
            }
        );
    }

    #[test]
    fn malformed_and_mismatched_instances_are_typed_errors() {
        let e = read_instance_from(&b"not dicom at all"[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");
        let mut junk = vec![0u8; 128];
        junk.extend_from_slice(b"DICM");
        junk.extend_from_slice(&[0xff; 300]);
        let e = read_instance_from(&junk[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");

        let e = read_instance_from(&instance(CT, "1.2.3.5", "P-0001")[..]).unwrap_err();
        assert!(
            matches!(
                e,
                Part10Error::Mismatch {
                    what: "SOP Instance UID",
                    ..
                }
            ),
            "{e}"
        );

        let e = read_instance_from(&instance(CT, "1.2.x", "P-0001")[..]).unwrap_err();
        assert!(matches!(e, Part10Error::BadUid { .. }), "{e}");

        let e = read_instance_from(&instance(CT, "1.2.3.4", "")[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Missing(_)), "{e}");

        let e = read_instance_from(&instance(CT, "1.2.3.4", "P\\1")[..]).unwrap_err();
        assert!(matches!(e, Part10Error::BadPatientId(_)), "{e}");

        // Cut inside the data set.
        let f = instance(CT, "1.2.3.4", "P-0001");
        let e = read_instance_from(&f[..f.len() - 20]).unwrap_err();
        assert!(
            matches!(e, Part10Error::Malformed(_) | Part10Error::Missing(_)),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_vr_is_checked_with_the_long_length_dicom_rs_allocates() {
        // Found by the `part10` fuzz target: (0002,0002) with the VR `ZZ` read as UN by
        // dicom-rs, whose 4-byte length is the value's first bytes ("1.2." = 775040561).
        let mut f = file_header(CT, "1.2.3.4", EXPLICIT_LE, "").unwrap();
        let at = f
            .windows(6)
            .position(|w| w == [0x02, 0x00, 0x02, 0x00, b'U', b'I'])
            .unwrap();
        f[at + 4..at + 6].copy_from_slice(b"ZZ");
        f.extend(padded(0x0008, 0x0016, b"UI", CT.as_bytes()));
        let e = read_instance_from(&f[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");
        assert!(
            e.to_string()
                .contains("(0002,0002) declares 775040561 bytes"),
            "{e}"
        );

        // The same in the data set.
        let mut f = file_header(CT, "1.2.3.4", EXPLICIT_LE, "").unwrap();
        f.extend(short_length(0x0008, 0x0016, b"ZZ", &even(CT.as_bytes(), 0)));
        let e = read_instance_from(&f[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");
    }

    #[test]
    fn a_meta_group_length_that_disagrees_with_its_elements_is_refused() {
        // Found by the `part10` fuzz target: a meta element whose group is not 0002 ends the
        // meta group for the head check, whose data set walk then stopped at that tag
        // (above PatientID), while dicom-rs reads the meta group to its group length and
        // went on to an element declaring 3 GB.
        let mut f = file_header(CT, "1.2.3.4", EXPLICIT_LE, "STORESCU").unwrap();
        let at = f
            .windows(4)
            .position(|w| w == [0x02, 0x00, 0x16, 0x00])
            .unwrap();
        f[at + 1] = 0x10; // (0002,0016) becomes (1002,0016)
        f.extend(padded(0x0008, 0x0016, b"UI", CT.as_bytes()));
        f.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
        f.extend_from_slice(&0x1000_0000u32.to_le_bytes());
        f.extend_from_slice(&[0u8; 64]);
        let e = read_instance_from(&f[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");
        assert!(
            e.to_string().contains("meta group length (0002,0000)"),
            "{e}"
        );
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_parsing() {
        // A private OB element before the PatientID claiming 3.5 GiB.
        let mut f = file_header(CT, "1.2.3.4", EXPLICIT_LE, "").unwrap();
        f.extend(padded(0x0008, 0x0016, b"UI", CT.as_bytes()));
        f.extend(padded(0x0008, 0x0018, b"UI", b"1.2.3.4"));
        f.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
        f.extend_from_slice(&0xE000_0000u32.to_le_bytes());
        f.extend_from_slice(&[0u8; 64]);
        let started = std::time::Instant::now();
        let e = read_instance_from(&f[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");
        assert!(
            e.to_string()
                .contains("(0009,1010) declares 3758096384 bytes"),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));

        // The same inside a sequence item (a defined-length SQ holding an undefined item).
        let mut f = file_header(CT, "1.2.3.4", EXPLICIT_LE, "").unwrap();
        f.extend(padded(0x0008, 0x0016, b"UI", CT.as_bytes()));
        f.extend(padded(0x0008, 0x0018, b"UI", b"1.2.3.4"));
        f.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0]);
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        f.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        f.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, b'U', b'T', 0, 0]);
        f.extend_from_slice(&0x7000_0000u32.to_le_bytes());
        f.extend_from_slice(&[b'x'; 32]);
        let e = read_instance_from(&f[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");

        // Deflated: checked on the inflated head.
        let mut f = file_header(CT, "1.2.3.4", "1.2.840.10008.1.2.1.99", "").unwrap();
        let mut ds = padded(0x0008, 0x0016, b"UI", CT.as_bytes());
        ds.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
        ds.extend_from_slice(&0xE000_0000u32.to_le_bytes());
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, &ds).unwrap();
        f.extend(enc.finish().unwrap());
        let e = read_instance_from(&f[..]).unwrap_err();
        assert!(matches!(e, Part10Error::Malformed(_)), "{e}");
    }

    #[test]
    fn header_refuses_bad_uids() {
        assert!(file_header(CT, "../../etc/passwd", EXPLICIT_LE, "X").is_err());
        assert!(file_header(CT, "1.2", "1.2.840.10008.1.2.1.", "X").is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// A valid instance with bytes changed or cut: an [`InstanceInfo`] or a typed error,
        /// never a panic, and a returned PatientID always obeys the rules.
        #[test]
        fn mutated_instances_never_panic(
            edits in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 1..8),
            cut in 0usize..400,
        ) {
            let mut f = instance(CT, "1.2.3.4", "P-0001");
            for (pos, byte) in edits {
                let p = 128 + pos % (f.len() - 128);
                f[p] = byte;
            }
            let keep = f.len() - cut.min(f.len() - 132);
            if let Ok(info) = read_instance_from(&f[..keep]) {
                proptest::prop_assert!(!info.patient_id.is_empty());
                proptest::prop_assert!(validate_uid(&info.sop_instance_uid).is_ok());
            }
        }
    }
}
