//! DICOM ingest on the edge: a C-STORE Storage SCP built on dicom-rs.
//!
//! - [`part10`]: read what the relay needs from a Part-10 instance (meta group, SOP UIDs,
//!   PatientID) and build the Part-10 header for a data set received over the network.
//! - [`reader`]: the one bounded, incremental Part-10 element walker every door reads
//!   untrusted instances with (meta group, SOP UIDs, PatientID, Study/Series UIDs, the head's
//!   end for de-identification, whether an instance ends where its last element does).
//! - [`commitment`]: the Storage Commitment Push Model SCP (N-ACTION, N-EVENT-REPORT).
//! - [`dimse`]: C-ECHO / C-STORE / N-ACTION / N-EVENT-REPORT command sets and the failure
//!   statuses the SCP answers with.
//! - [`scp`]: the association server (tokio, `dicom-ul`), streaming instances to disk.
//! - [`settings`]: the `ingest.dicom_*` and `[[ingest.dicom_peers]]` settings
//!   ([`settings::DicomSection`]), their defaults and checks; [`valid_ae_title`] here.
//! - [`sink`]: where an association's accepted instances go ([`sink::AssociationSink`]), and
//!   today's implementation that sends them through the existing `Edge::send`.
//!
//! What this module deliberately does not do: decode pixel data (the relay passes every
//! transfer syntax through unchanged), or keep a whole instance in memory.

pub mod commitment;
pub mod deid;
pub mod dimse;
pub mod part10;
pub mod reader;
pub mod scp;
pub mod settings;
pub mod sink;
#[cfg(test)]
pub(crate) mod test_bytes;

/// An AE title as PS3.5 allows it: 1..=16 characters of the default repertoire, no
/// backslash, not all spaces (leading and trailing spaces are not significant).
pub fn valid_ae_title(s: &str) -> bool {
    let t = s.trim();
    !t.is_empty() && s.len() <= 16 && s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

/// Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Storage SOP classes the SCP accepts, with their names.
pub const STORAGE_SOP_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.1", "Computed Radiography Image"),
    (
        "1.2.840.10008.5.1.4.1.1.1.1",
        "Digital X-Ray Image - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "Digital X-Ray Image - For Processing",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.2",
        "Digital Mammography X-Ray Image - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "Digital Mammography X-Ray Image - For Processing",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.3",
        "Digital Intra-Oral X-Ray Image - For Presentation",
    ),
    ("1.2.840.10008.5.1.4.1.1.2", "CT Image"),
    ("1.2.840.10008.5.1.4.1.1.2.1", "Enhanced CT Image"),
    (
        "1.2.840.10008.5.1.4.1.1.3.1",
        "Ultrasound Multi-frame Image",
    ),
    ("1.2.840.10008.5.1.4.1.1.4", "MR Image"),
    ("1.2.840.10008.5.1.4.1.1.4.1", "Enhanced MR Image"),
    ("1.2.840.10008.5.1.4.1.1.6.1", "Ultrasound Image"),
    ("1.2.840.10008.5.1.4.1.1.6.2", "Enhanced US Volume"),
    ("1.2.840.10008.5.1.4.1.1.7", "Secondary Capture Image"),
    (
        "1.2.840.10008.5.1.4.1.1.7.1",
        "Multi-frame Single Bit Secondary Capture Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.2",
        "Multi-frame Grayscale Byte Secondary Capture Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.3",
        "Multi-frame Grayscale Word Secondary Capture Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.4",
        "Multi-frame True Color Secondary Capture Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.11.1",
        "Grayscale Softcopy Presentation State",
    ),
    ("1.2.840.10008.5.1.4.1.1.12.1", "X-Ray Angiographic Image"),
    ("1.2.840.10008.5.1.4.1.1.12.1.1", "Enhanced XA Image"),
    (
        "1.2.840.10008.5.1.4.1.1.12.2",
        "X-Ray Radiofluoroscopic Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.13.1.3",
        "Breast Tomosynthesis Image",
    ),
    ("1.2.840.10008.5.1.4.1.1.20", "Nuclear Medicine Image"),
    ("1.2.840.10008.5.1.4.1.1.66", "Raw Data"),
    ("1.2.840.10008.5.1.4.1.1.66.1", "Spatial Registration"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation"),
    ("1.2.840.10008.5.1.4.1.1.77.1.1", "VL Endoscopic Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.4", "VL Photographic Image"),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",
        "Ophthalmic Photography 8 Bit Image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.77.1.6",
        "VL Whole Slide Microscopy Image",
    ),
    ("1.2.840.10008.5.1.4.1.1.88.11", "Basic Text SR"),
    ("1.2.840.10008.5.1.4.1.1.88.22", "Enhanced SR"),
    ("1.2.840.10008.5.1.4.1.1.88.33", "Comprehensive SR"),
    (
        "1.2.840.10008.5.1.4.1.1.88.59",
        "Key Object Selection Document",
    ),
    ("1.2.840.10008.5.1.4.1.1.104.1", "Encapsulated PDF"),
    ("1.2.840.10008.5.1.4.1.1.104.2", "Encapsulated CDA"),
    (
        "1.2.840.10008.5.1.4.1.1.128",
        "Positron Emission Tomography Image",
    ),
    ("1.2.840.10008.5.1.4.1.1.130", "Enhanced PET Image"),
    ("1.2.840.10008.5.1.4.1.1.481.1", "RT Image"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RT Dose"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RT Structure Set"),
    ("1.2.840.10008.5.1.4.1.1.481.4", "RT Beams Treatment Record"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "RT Plan"),
    (
        "1.2.840.10008.5.1.4.1.1.481.6",
        "RT Brachy Treatment Record",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.481.7",
        "RT Treatment Summary Record",
    ),
    ("1.2.840.10008.5.1.4.1.1.481.8", "RT Ion Plan"),
    (
        "1.2.840.10008.5.1.4.1.1.481.9",
        "RT Ion Beams Treatment Record",
    ),
];

/// Transfer syntaxes the SCP accepts. Data sets are stored as received: compressed pixel
/// data is never decoded.
pub const TRANSFER_SYNTAXES: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian (retired)"),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)"),
    (
        "1.2.840.10008.1.2.4.57",
        "JPEG Lossless, Non-Hierarchical (Process 14)",
    ),
    (
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless, First-Order Prediction (Process 14 SV1)",
    ),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless Only"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_hold_valid_uids_that_dicom_rs_can_parse() {
        for (uid, name) in STORAGE_SOP_CLASSES.iter().chain(TRANSFER_SYNTAXES) {
            assert!(part10::validate_uid(uid).is_ok(), "{name}: {uid}");
        }
        for (uid, name) in TRANSFER_SYNTAXES {
            assert!(
                dicom_ul::association::server::is_supported(uid),
                "{name} ({uid}) is not in the dicom-rs transfer syntax registry"
            );
        }
        let mut seen = std::collections::HashSet::new();
        assert!(STORAGE_SOP_CLASSES.iter().all(|(u, _)| seen.insert(*u)));
    }

    #[test]
    fn ae_titles_are_1_to_16_printable_characters_without_backslash() {
        for good in [
            "BAYLINK",
            "CT1",
            "A",
            "SIXTEEN-CHARS-AE",
            " PADDED ",
            "lower case",
        ] {
            assert!(valid_ae_title(good), "{good:?}");
        }
        for bad in [
            "",
            "    ",
            "SEVENTEEN-CHARS-A",
            "BACK\\SLASH",
            "TAB\tAE",
            "NEW\nLINE",
            "CAF\u{e9}",
        ] {
            assert!(!valid_ae_title(bad), "{bad:?}");
        }
    }
}
