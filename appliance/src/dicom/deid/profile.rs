//! The Basic Application Level Confidentiality Profile (PS3.15 Annex E) and the options a
//! purpose may select: what happens to one attribute.

use dicom_core::{Tag, VR};

use super::action::BasicAction;
use super::table;

/// What is done to one element, once the table, the VR and the options are considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Removed.
    Remove,
    /// Written with an empty value (a sequence: no items).
    Empty,
    /// Replaced by a dummy value of its VR (a sequence: its items are cleaned).
    Dummy,
    /// A UID replaced by the transfer's new UID.
    Uid,
    /// Kept (a sequence: its items are cleaned).
    Keep,
    /// Dates shifted by the patient's offset, times kept (Retain Longitudinal Temporal
    /// Information with Modified Dates).
    ShiftDates,
    /// Kept when it contains none of the instance's identifying values, otherwise `Step` of
    /// the Basic Profile (Clean Descriptors).
    CleanText(&'static Step),
}

/// The options of the profile a purpose selects (`policy.deidentify_options`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProfileOptions {
    /// `retain-longitudinal-modified-dates`: dates are shifted by a keyed per-patient offset
    /// instead of being removed; times are kept.
    pub retain_longitudinal_modified_dates: bool,
    /// `clean-descriptors`: free-text descriptors of the study, series and protocol are
    /// kept when they contain none of the instance's identifying values.
    pub clean_descriptors: bool,
    /// `retain-device-identity`: station names, device serial numbers and identifiers are
    /// kept.
    pub retain_device_identity: bool,
    /// `clean-pixel-data`: the sender attests that the pixel data carries no burned-in
    /// identifying text, so instances flagged (or known) to have burned-in annotation pass.
    pub clean_pixel_data: bool,
}

/// The option names accepted in `policy.deidentify_options`.
pub const OPTION_NAMES: [&str; 4] = [
    "retain-longitudinal-modified-dates",
    "clean-descriptors",
    "retain-device-identity",
    "clean-pixel-data",
];

impl ProfileOptions {
    /// Options from their names; `Err` names the unknown one.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<ProfileOptions, String> {
        let mut o = ProfileOptions::default();
        for n in names {
            match n.as_ref() {
                "retain-longitudinal-modified-dates" => o.retain_longitudinal_modified_dates = true,
                "clean-descriptors" => o.clean_descriptors = true,
                "retain-device-identity" => o.retain_device_identity = true,
                "clean-pixel-data" => o.clean_pixel_data = true,
                other => {
                    return Err(format!(
                        "unknown de-identification option {other:?} (known: {})",
                        OPTION_NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(o)
    }

    /// The CID 7050 codes (code value, meaning) of what is applied, for
    /// DeidentificationMethodCodeSequence (0012,0064).
    pub fn codes(&self) -> Vec<(&'static str, &'static str)> {
        let mut c = vec![("113100", "Basic Application Confidentiality Profile")];
        if self.clean_pixel_data {
            c.push(("113101", "Clean Pixel Data Option"));
        }
        if self.clean_descriptors {
            c.push(("113105", "Clean Descriptors Option"));
        }
        if self.retain_longitudinal_modified_dates {
            c.push((
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            ));
        }
        if self.retain_device_identity {
            c.push(("113109", "Retain Device Identity Option"));
        }
        c
    }
}

/// Attributes the Retain Device Identity option keeps (K in Table E.1-1's option column).
pub const DEVICE_IDENTITY: &[(u16, u16)] = &[
    (0x0008, 0x1010), // Station Name
    (0x0018, 0x1000), // Device Serial Number
    (0x0018, 0x1002), // Device UID
    (0x0018, 0x1003), // Device ID
    (0x0018, 0x1004), // Plate ID
    (0x0018, 0x1005), // Generator ID
    (0x0018, 0x1007), // Cassette ID
    (0x0018, 0x1008), // Gantry ID
    (0x0018, 0x700A), // Detector ID
    (0x0040, 0x0001), // Scheduled Station AE Title
    (0x0040, 0x0010), // Scheduled Station Name
    (0x0040, 0x0241), // Performed Station AE Title
    (0x0040, 0x0242), // Performed Station Name
    (0x0050, 0x0020), // Device Description
    (0x3008, 0x0105), // Source Serial Number
    (0x300A, 0x00B2), // Treatment Machine Name
    (0x3010, 0x002D), // Device Label
];

/// Descriptors the Clean Descriptors option keeps once checked (C in Table E.1-1's option
/// column; descriptions of the study, series, protocol and acquisition, not of the patient).
pub const DESCRIPTORS: &[(u16, u16)] = &[
    (0x0008, 0x1030), // Study Description
    (0x0008, 0x103E), // Series Description
    (0x0008, 0x2111), // Derivation Description
    (0x0018, 0x0010), // Contrast/Bolus Agent
    (0x0018, 0x1030), // Protocol Name
    (0x0018, 0x1400), // Acquisition Device Processing Description
    (0x0018, 0x4000), // Acquisition Comments
    (0x0018, 0x9424), // Acquisition Protocol Description
    (0x0020, 0x4000), // Image Comments
    (0x0020, 0x9158), // Frame Comments
    (0x0032, 0x1060), // Requested Procedure Description
    (0x0032, 0x1070), // Requested Contrast Agent
    (0x0040, 0x0007), // Scheduled Procedure Step Description
    (0x0040, 0x0254), // Performed Procedure Step Description
];

/// Modalities whose images often carry burned-in text (screen captures, ultrasound and
/// endoscopy overlays, scanned documents): without BurnedInAnnotation (0028,0301) = `NO`
/// they are treated as annotated.
pub const BURNED_IN_MODALITIES: &[&str] = &["US", "ES", "XC", "SC", "OT", "GM", "SM", "DOC"];

/// Patient's Birth Date and Birth Time: not shifted by the Retain Longitudinal option.
const PATIENT_BIRTH: [(u16, u16); 2] = [(0x0010, 0x0030), (0x0010, 0x0032)];

/// Text Value (0040,A160), not in Table E.1-1: the free text of a structured report's TEXT
/// content items (the table's Content Sequence is D) may name anyone, so it gets a dummy.
pub const TEXT_VALUE: (u16, u16) = (0x0040, 0xA160);

/// The Table E.1-1 entry of `tag`: its Basic Profile action and attribute name.
pub fn basic_action(tag: Tag) -> Option<(BasicAction, &'static str)> {
    let t = (u32::from(tag.0) << 16) | u32::from(tag.1);
    if let Ok(i) = table::EXACT.binary_search_by_key(&t, |e| e.0) {
        let (_, a, name) = table::EXACT[i];
        return Some((a, name));
    }
    table::MASKED
        .iter()
        .find(|(v, m, ..)| t & m == *v)
        .map(|&(_, _, a, name)| (a, name))
}

/// What happens to an element of `tag` and `vr` under `options`; `None`: not in the table.
///
/// Combined actions take the choice that keeps the instance valid whatever the attribute's
/// type in its IOD: X/Z and X/Z/U* empty (a sequence of X/Z/U* keeps its items, cleaned,
/// with their UIDs replaced), X/D, Z/D and X/Z/D write a dummy value.
pub fn step(tag: Tag, vr: VR, options: &ProfileOptions) -> Option<Step> {
    if (tag.0, tag.1) == TEXT_VALUE {
        return Some(Step::Dummy);
    }
    let (action, _) = basic_action(tag)?;
    let pair = (tag.0, tag.1);
    if options.retain_device_identity && DEVICE_IDENTITY.contains(&pair) {
        return Some(Step::Keep);
    }
    // Dates of the procedure, not of the patient: the birth date and time keep their action.
    if options.retain_longitudinal_modified_dates
        && matches!(vr, VR::DA | VR::DT | VR::TM)
        && !PATIENT_BIRTH.contains(&pair)
    {
        return Some(Step::ShiftDates);
    }
    let basic = match action {
        BasicAction::Remove => Step::Remove,
        BasicAction::Empty | BasicAction::RemoveOrEmpty => Step::Empty,
        BasicAction::RemoveEmptyOrUids if vr == VR::SQ => Step::Keep,
        BasicAction::RemoveEmptyOrUids => Step::Empty,
        BasicAction::Dummy
        | BasicAction::EmptyOrDummy
        | BasicAction::RemoveOrDummy
        | BasicAction::RemoveEmptyOrDummy => Step::Dummy,
        BasicAction::Uid => Step::Uid,
    };
    if options.clean_descriptors && DESCRIPTORS.contains(&pair) {
        return Some(Step::CleanText(match basic {
            Step::Remove => &Step::Remove,
            Step::Empty => &Step::Empty,
            _ => &Step::Dummy,
        }));
    }
    Some(basic)
}

/// A dummy value for `vr` (D): `None` when the VR has no textual dummy (binary VRs get
/// zero bytes of their width from the caller).
pub fn dummy_text(vr: VR) -> Option<&'static str> {
    Some(match vr {
        VR::AE => "ANONYMOUS",
        VR::AS => "000Y",
        VR::CS => "ANONYMOUS",
        VR::DA => "19000101",
        VR::DT => "19000101000000",
        VR::TM => "000000",
        VR::DS | VR::IS => "0",
        VR::LO | VR::LT | VR::SH | VR::ST | VR::UT | VR::UC | VR::PN => "ANONYMOUS",
        VR::UR => "",
        _ => return None,
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `date` (`YYYYMMDD` at the start of a DA or DT value) moved by `shift` days; the rest of
/// a DT value (time, offset) is kept. `None` when it is not such a date.
pub fn shift_date(value: &str, shift: i64) -> Option<String> {
    let v = value.trim();
    let digits = v.get(..8)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| digits[r].parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let (y2, m2, d2) = civil_from_days(days_from_civil(y, m, d) + shift);
    if !(0..=9999).contains(&y2) {
        return None;
    }
    Some(format!("{y2:04}{m2:02}{d2:02}{}", &v[8..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_table_is_the_standards_and_combined_actions_resolve() {
        assert_eq!(table::EXACT.len() + table::MASKED.len(), 655);
        assert!(table::EXACT.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        let o = ProfileOptions::default();
        let s = |g, e, vr| step(Tag(g, e), vr, &o);
        assert_eq!(s(0x0010, 0x0010, VR::PN), Some(Step::Empty)); // Patient's Name Z
        assert_eq!(s(0x0008, 0x0080, VR::LO), Some(Step::Dummy)); // Institution Name X/Z/D
        assert_eq!(s(0x0008, 0x1140, VR::SQ), Some(Step::Keep)); // X/Z/U*
        assert_eq!(s(0x0020, 0x0052, VR::UI), Some(Step::Uid));
        assert_eq!(s(0x0040, 0xA075, VR::PN), Some(Step::Dummy)); // Verifying Observer Name
        assert_eq!(s(0xFFFC, 0xFFFC, VR::OB), Some(Step::Remove));
        assert_eq!(s(0x6002, 0x3000, VR::OW), Some(Step::Remove)); // overlay data, masked
        assert_eq!(s(0x0008, 0x0060, VR::CS), None); // Modality: not in the table
        assert_eq!(s(0x0040, 0xA160, VR::UT), Some(Step::Dummy)); // SR Text Value
        let all = ProfileOptions::from_names(&OPTION_NAMES).unwrap();
        let s = |g, e, vr| step(Tag(g, e), vr, &all);
        assert_eq!(s(0x0008, 0x1010, VR::SH), Some(Step::Keep));
        assert_eq!(s(0x0008, 0x0020, VR::DA), Some(Step::ShiftDates));
        assert_eq!(s(0x0010, 0x0030, VR::DA), Some(Step::Empty)); // birth date: Z still
        assert_eq!(
            s(0x0008, 0x1030, VR::LO),
            Some(Step::CleanText(&Step::Remove))
        );
        assert!(ProfileOptions::from_names(&["retain-everything"]).is_err());
        assert_eq!(all.codes().len(), 5);
    }

    #[test]
    fn dates_shift_across_months_and_leap_years() {
        assert_eq!(shift_date("20240301", -1).as_deref(), Some("20240229"));
        assert_eq!(shift_date("20000101", -365).as_deref(), Some("19990101"));
        assert_eq!(shift_date("20000101", -1).as_deref(), Some("19991231"));
        assert_eq!(
            shift_date("20240131120000.5+0800", 30).as_deref(),
            Some("20240301120000.5+0800")
        );
        assert_eq!(shift_date("2024", 3), None);
        assert_eq!(shift_date("20241340", 3), None);
    }
}
