//! De-identification of DICOM instances for purposes such as `research`, and the PatientID
//! check every instance of a transfer passes through ([`DicomGate`]).
//!
//! # Profile
//!
//! A documented subset of the DICOM PS3.15 Annex E *Basic Application Level Confidentiality
//! Profile*. Actions (Annex E letters): **X** remove, **Z** replace by an empty value,
//! **D** replace by a dummy value, **U** replace by a new UID. The rules apply at every
//! nesting depth (inside sequence items too).
//!
//! | Attribute | Tag | Action |
//! |---|---|---|
//! | PatientName | (0010,0010) | Z |
//! | PatientID | (0010,0020) | D: `BL-` + keyed hash of the id (see below) |
//! | PatientBirthDate | (0010,0030) | Z |
//! | PatientBirthTime | (0010,0032) | X |
//! | PatientSex | (0010,0040) | Z (Annex E; the Retain Patient Characteristics option is not offered) |
//! | PatientInsurancePlanCodeSequence | (0010,0050) | X |
//! | OtherPatientIDs / OtherPatientNames / OtherPatientIDsSequence | (0010,1000) (0010,1001) (0010,1002) | X |
//! | PatientBirthName, PatientAge, PatientSize, PatientWeight | (0010,1005) (0010,1010) (0010,1020) (0010,1030) | X |
//! | PatientAddress, MedicalRecordLocator, PatientMotherBirthName | (0010,1040) (0010,1090) (0010,1060) | X |
//! | PatientTelephoneNumbers, EthnicGroup, Occupation | (0010,2154) (0010,2160) (0010,2180) | X |
//! | AdditionalPatientHistory, PatientComments | (0010,21B0) (0010,4000) | X |
//! | AdmissionID, CurrentPatientLocation, PatientInstitutionResidence | (0038,0010) (0038,0300) (0038,0400) | X |
//! | InstitutionName, InstitutionAddress, InstitutionCodeSequence, InstitutionalDepartmentName | (0008,0080) (0008,0081) (0008,0082) (0008,1040) | X |
//! | ReferringPhysicianName | (0008,0090) | Z |
//! | ReferringPhysicianAddress / Telephone / IdentificationSequence | (0008,0092) (0008,0094) (0008,0096) | X |
//! | PhysiciansOfRecord, PerformingPhysicianName (+ IdentificationSequence) | (0008,1048) (0008,1050) (0008,1052) | X |
//! | NameOfPhysiciansReadingStudy, OperatorsName, OperatorIdentificationSequence | (0008,1060) (0008,1070) (0008,1072) | X |
//! | RequestingPhysician, RequestingService, ScheduledPerformingPhysicianName | (0032,1032) (0032,1033) (0040,0006) | X |
//! | AccessionNumber, StudyID | (0008,0050) (0020,0010) | Z |
//! | StationName, DeviceSerialNumber | (0008,1010) (0018,1000) | X |
//! | StudyDescription, SeriesDescription, AdmittingDiagnosesDescription, ImageComments | (0008,1030) (0008,103E) (0008,1080) (0020,4000) | X |
//! | RequestAttributesSequence, RequestedProcedureID, RequestedProcedureDescription | (0040,0275) (0040,1001) (0032,1060) | X |
//! | ScheduledProcedureStepID, PerformedProcedureStepID / Description / StartDate / StartTime | (0040,0009) (0040,0253) (0040,0254) (0040,0244) (0040,0245) | X |
//! | PerformedStationAETitle / Name / Location | (0040,0241) (0040,0242) (0040,0243) | X |
//! | ContentSequence (structured report content) | (0040,A730) | X |
//! | StudyDate, StudyTime, ContentDate, ContentTime | (0008,0020) (0008,0030) (0008,0023) (0008,0033) | Z |
//! | SeriesDate/Time, AcquisitionDate/Time/DateTime, InstanceCreationDate/Time | (0008,0021) (0008,0031) (0008,0022) (0008,0032) (0008,002A) (0008,0012) (0008,0013) | X |
//! | TimezoneOffsetFromUTC | (0008,0201) | X |
//! | Private attributes (odd groups) | (gggg,eeee), gggg odd | X |
//! | Overlay and curve groups | (60xx,eeee) (50xx,eeee) | X |
//! | Every UID that is not a DICOM-defined one | VR UI, value not under `1.2.840.10008.` | U |
//!
//! Added: PatientIdentityRemoved (0012,0062) = `YES`, DeidentificationMethod (0012,0063) =
//! [`DEIDENTIFICATION_METHOD`]. The file meta group is rebuilt: Media Storage SOP Instance UID
//! follows the new SOP Instance UID, the source/sending/receiving AE titles and private
//! meta information are dropped, and a fresh zero preamble replaces the original one.
//!
//! **Dates** are removed or emptied, not shifted: the type 2 ones (StudyDate/Time,
//! ContentDate/Time) become empty, the others disappear.
//!
//! **UIDs**: a UID `u` of transfer `t` becomes `2.25.<n>` where `n` is the first 128 bits
//! (big endian, decimal) of HMAC-SHA256(key, `"uid" 0x00 t 0x00 u`). Within a transfer the
//! same UID always maps to the same new UID (instances of one series stay one series, and
//! references inside sequences follow); across transfers the mapping differs. UIDs defined
//! by the DICOM standard (SOP classes, transfer syntaxes, coding schemes: the `1.2.840.10008.`
//! root) and the SOP Class UID attributes are kept.
//!
//! **PatientID pseudonym**: `BL-` + the first 16 bytes (hex) of HMAC-SHA256(key,
//! `"patient" 0x00 id`): the same patient gets the same pseudonym from one appliance, so a
//! research destination can group a patient's transfers without learning who it is.
//!
//! **Key**: derived from the appliance's audit patient key (`audit.patient_key`), as
//! HMAC-SHA256(patient key, [`KEY_LABEL`]); it never leaves the appliance.
//!
//! # Not covered
//! - Identifying text burned into the pixel data (BurnedInAnnotation is not checked).
//! - Elements after encapsulated (undefined length) Pixel Data are copied unchanged. After
//!   native pixel data, or in a file without pixel data, any element after the head (a
//!   private group 7FE1, trailing padding, digital signatures) is refused with rule
//!   `deid-unsupported`, since it would pass unparsed.
//! - Free text in attributes not listed above, and the Annex E options (clean descriptors,
//!   retain dates, ...).
//! - Deflated and big endian transfer syntaxes: refused with rule `deid-unsupported`.
//!
//! # Streaming
//! The instance is held only up to the first top-level element at or after (7FE0,0000)
//! (at most [`MAX_HEAD_BYTES`]); that head is parsed with dicom-rs, rewritten and written;
//! the rest of the file (pixel data onward) is passed through unchanged.

use std::borrow::Cow;

use aws_lc_rs::hmac;
use baylink_net::proto::TransferId;
use bytes::{Bytes, BytesMut};
use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{InMemDicomObject, OpenFileOptions};

use super::lengths::{self, HeadEnd, HeadError};
use crate::ingest::part10::{self, Part10Error};
use crate::policy::Refusal;

/// Rule named when an instance's PatientID differs from its transfer's declaration.
pub const RULE_PATIENT_MISMATCH: &str = "patient-mismatch";
/// Rule named when a file of a de-identified transfer cannot be de-identified.
pub const RULE_DEID_UNSUPPORTED: &str = "deid-unsupported";
/// The label the de-identification key is derived with from the audit patient key.
pub const KEY_LABEL: &str = "\u{0}baylink deid key v1";
/// Value written to DeidentificationMethod (0012,0063).
pub const DEIDENTIFICATION_METHOD: &str = "baylink PS3.15 E basic profile subset v1";
/// Largest head (everything before the pixel data) a de-identified instance may have.
pub const MAX_HEAD_BYTES: usize = 64 * 1024 * 1024;
/// Most bytes held to read the PatientID of an instance (HTTPS PUT check).
pub const MAX_PATIENT_PREFIX: usize = 1024 * 1024;
/// The head ends at the first top-level element at or after this tag.
const HEAD_STOP: (u16, u16) = (0x7FE0, 0x0000);
/// Deepest sequence nesting rewritten.
const MAX_DEPTH: usize = 16;

/// What happens to an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// X: removed.
    Remove,
    /// Z: replaced by an empty value.
    Empty,
    /// D: replaced by the patient pseudonym (PatientID only).
    Pseudonym,
}

/// The attributes the profile removes or replaces (UIDs, private and overlay groups aside).
pub const ACTIONS: &[((u16, u16), Action)] = {
    use Action::{Empty as Z, Pseudonym as D, Remove as X};
    &[
        ((0x0008, 0x0012), X),
        ((0x0008, 0x0013), X),
        ((0x0008, 0x0020), Z),
        ((0x0008, 0x0021), X),
        ((0x0008, 0x0022), X),
        ((0x0008, 0x0023), Z),
        ((0x0008, 0x002A), X),
        ((0x0008, 0x0030), Z),
        ((0x0008, 0x0031), X),
        ((0x0008, 0x0032), X),
        ((0x0008, 0x0033), Z),
        ((0x0008, 0x0050), Z),
        ((0x0008, 0x0080), X),
        ((0x0008, 0x0081), X),
        ((0x0008, 0x0082), X),
        ((0x0008, 0x0090), Z),
        ((0x0008, 0x0092), X),
        ((0x0008, 0x0094), X),
        ((0x0008, 0x0096), X),
        ((0x0008, 0x0201), X),
        ((0x0008, 0x1010), X),
        ((0x0008, 0x1030), X),
        ((0x0008, 0x103E), X),
        ((0x0008, 0x1040), X),
        ((0x0008, 0x1048), X),
        ((0x0008, 0x1050), X),
        ((0x0008, 0x1052), X),
        ((0x0008, 0x1060), X),
        ((0x0008, 0x1070), X),
        ((0x0008, 0x1072), X),
        ((0x0008, 0x1080), X),
        ((0x0010, 0x0010), Z),
        ((0x0010, 0x0020), D),
        ((0x0010, 0x0030), Z),
        ((0x0010, 0x0032), X),
        ((0x0010, 0x0040), Z),
        ((0x0010, 0x0050), X),
        ((0x0010, 0x1000), X),
        ((0x0010, 0x1001), X),
        ((0x0010, 0x1002), X),
        ((0x0010, 0x1005), X),
        ((0x0010, 0x1010), X),
        ((0x0010, 0x1020), X),
        ((0x0010, 0x1030), X),
        ((0x0010, 0x1040), X),
        ((0x0010, 0x1060), X),
        ((0x0010, 0x1090), X),
        ((0x0010, 0x2154), X),
        ((0x0010, 0x2160), X),
        ((0x0010, 0x2180), X),
        ((0x0010, 0x21B0), X),
        ((0x0010, 0x4000), X),
        ((0x0018, 0x1000), X),
        ((0x0020, 0x0010), Z),
        ((0x0020, 0x4000), X),
        ((0x0032, 0x1032), X),
        ((0x0032, 0x1033), X),
        ((0x0032, 0x1060), X),
        ((0x0038, 0x0010), X),
        ((0x0038, 0x0300), X),
        ((0x0038, 0x0400), X),
        ((0x0040, 0x0006), X),
        ((0x0040, 0x0009), X),
        ((0x0040, 0x0241), X),
        ((0x0040, 0x0242), X),
        ((0x0040, 0x0243), X),
        ((0x0040, 0x0244), X),
        ((0x0040, 0x0245), X),
        ((0x0040, 0x0253), X),
        ((0x0040, 0x0254), X),
        ((0x0040, 0x0275), X),
        ((0x0040, 0x1001), X),
        ((0x0040, 0xA730), X),
    ]
};

/// UID attributes kept as they are (they name classes, not instances).
const KEPT_UIDS: &[(u16, u16)] = &[(0x0008, 0x0016), (0x0008, 0x1150), (0x0004, 0x1510)];

/// Why an instance cannot pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeidError {
    /// A policy rule refuses the file ([`RULE_PATIENT_MISMATCH`], [`RULE_DEID_UNSUPPORTED`]).
    #[error("{}", .refusal.reason)]
    Refused {
        /// The rule and reason.
        refusal: Refusal,
        /// The instance's PatientID, when it was read (for the audit record).
        patient_id: Option<String>,
    },
    /// Not a usable DICOM instance; the text names the problem.
    #[error("malformed DICOM instance: {0}")]
    Malformed(String),
}

fn unsupported(reason: impl Into<String>) -> DeidError {
    DeidError::Refused {
        refusal: Refusal::new(RULE_DEID_UNSUPPORTED, reason),
        patient_id: None,
    }
}

/// The appliance's de-identification key.
#[derive(Clone)]
pub struct DeidKey(hmac::Key);

impl std::fmt::Debug for DeidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeidKey(..)")
    }
}

impl DeidKey {
    /// A key from secret bytes (at least 32 of them, from a keyed hash or random source).
    pub fn from_secret(secret: &[u8]) -> DeidKey {
        DeidKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// The de-identifier of one transfer.
    pub fn for_transfer(&self, transfer: &TransferId) -> Deidentifier {
        Deidentifier {
            key: self.0.clone(),
            transfer: transfer.to_string(),
        }
    }
}

/// Rewrites the instances of one transfer.
#[derive(Clone)]
pub struct Deidentifier {
    key: hmac::Key,
    transfer: String,
}

impl std::fmt::Debug for Deidentifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deidentifier")
            .field("transfer", &self.transfer)
            .finish_non_exhaustive()
    }
}

fn trim_uid(s: &str) -> &str {
    s.trim_end_matches(['\0', ' ']).trim_start()
}

impl Deidentifier {
    /// The new UID standing for `old` in this transfer: `2.25.<decimal>`.
    pub fn new_uid(&self, old: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"uid\0");
        ctx.update(self.transfer.as_bytes());
        ctx.update(b"\0");
        ctx.update(trim_uid(old).as_bytes());
        let tag = ctx.sign();
        let mut n = [0u8; 16];
        n.copy_from_slice(&tag.as_ref()[..16]);
        format!("2.25.{}", u128::from_be_bytes(n))
    }

    /// The pseudonym standing for `patient_id` (the same on every transfer of this appliance).
    pub fn pseudonym(&self, patient_id: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(b"patient\0");
        ctx.update(patient_id.as_bytes());
        let tag = ctx.sign();
        format!("BL-{}", hex::encode_upper(&tag.as_ref()[..16]))
    }

    /// Rewrites a complete head (preamble, meta group, data set up to the pixel data) into
    /// its de-identified form.
    pub fn rewrite_head(&self, head: &[u8]) -> Result<Vec<u8>, DeidError> {
        // dicom-rs allocates declared lengths: check each against the bytes present first.
        lengths::check_head(head, false, HEAD_STOP).map_err(DeidError::Malformed)?;
        let file = OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(head)
            .map_err(|e| DeidError::Malformed(e.to_string()))?;
        let mut meta = file.meta().clone();
        let obj = file.into_inner();
        let mut clean = self.clean(&obj, 0)?;
        let sop = clean
            .element_opt(Tag(0x0008, 0x0018))
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().map(|s| trim_uid(&s).to_owned()))
            .unwrap_or_else(|| self.new_uid(&meta.media_storage_sop_instance_uid));
        clean.put(DataElement::new(
            Tag(0x0012, 0x0062),
            VR::CS,
            PrimitiveValue::from("YES"),
        ));
        clean.put(DataElement::new(
            Tag(0x0012, 0x0063),
            VR::LO,
            PrimitiveValue::from(DEIDENTIFICATION_METHOD),
        ));
        meta.media_storage_sop_instance_uid = sop;
        meta.source_application_entity_title = None;
        meta.sending_application_entity_title = None;
        meta.receiving_application_entity_title = None;
        meta.private_information_creator_uid = None;
        meta.private_information = None;
        meta.implementation_class_uid = super::part10::IMPLEMENTATION_CLASS_UID.to_owned();
        meta.implementation_version_name =
            Some(super::part10::IMPLEMENTATION_VERSION_NAME.to_owned());
        meta.update_information_group_length();
        let mut out = Vec::with_capacity(head.len());
        clean
            .with_exact_meta(meta)
            .write_all(&mut out)
            .map_err(|e| unsupported(format!("cannot write the de-identified instance: {e}")))?;
        Ok(out)
    }

    fn clean(&self, obj: &InMemDicomObject, depth: usize) -> Result<InMemDicomObject, DeidError> {
        if depth > MAX_DEPTH {
            return Err(DeidError::Malformed(format!(
                "sequences nested deeper than {MAX_DEPTH}"
            )));
        }
        let mut out = Vec::new();
        for e in obj.iter() {
            let tag = e.tag();
            if tag.0 % 2 == 1 || (tag.0 & 0xFF00) == 0x6000 || (tag.0 & 0xFF00) == 0x5000 {
                continue; // private, overlay, curve: X
            }
            match ACTIONS.iter().find(|(t, _)| *t == (tag.0, tag.1)) {
                Some((_, Action::Remove)) => continue,
                Some((_, Action::Empty)) => {
                    out.push(DataElement::new(tag, e.vr(), PrimitiveValue::Empty));
                    continue;
                }
                Some((_, Action::Pseudonym)) => {
                    let id = e.to_str().map(|s| s.trim().to_owned()).unwrap_or_default();
                    out.push(DataElement::new(
                        tag,
                        VR::LO,
                        PrimitiveValue::from(self.pseudonym(&id)),
                    ));
                    continue;
                }
                None => {}
            }
            match e.value() {
                Value::Sequence(seq) => {
                    let items = seq
                        .items()
                        .iter()
                        .map(|i| self.clean(i, depth + 1))
                        .collect::<Result<Vec<_>, _>>()?;
                    out.push(DataElement::new(
                        tag,
                        VR::SQ,
                        // The items changed size: the rewritten sequence (and its items) are
                        // written with undefined lengths and delimiters, always consistent.
                        Value::Sequence(DataSetSequence::new(items, Length::UNDEFINED)),
                    ));
                }
                Value::Primitive(_) if e.vr() == VR::UI && !KEPT_UIDS.contains(&(tag.0, tag.1)) => {
                    out.push(self.remap_uids(e)?);
                }
                _ => out.push(e.clone()),
            }
        }
        Ok(InMemDicomObject::from_element_iter(out))
    }

    fn remap_uids(&self, e: &InMemElement) -> Result<InMemElement, DeidError> {
        let text: Cow<'_, str> = e.to_str().map_err(|err| {
            DeidError::Malformed(format!("UID ({:04X},{:04X}): {err}", e.tag().0, e.tag().1))
        })?;
        let mapped: Vec<String> = text
            .split('\\')
            .map(trim_uid)
            .map(|u| {
                if u.is_empty() || u.starts_with("1.2.840.10008.") {
                    u.to_owned()
                } else {
                    self.new_uid(u)
                }
            })
            .collect();
        Ok(DataElement::new(
            e.tag(),
            VR::UI,
            PrimitiveValue::Strs(mapped.into()),
        ))
    }
}

/// What a [`DicomGate`] checks and does to one file of a transfer.
#[derive(Debug, Clone)]
pub struct GateRules {
    /// The transfer's declared patient: a DICOM file's PatientID must equal it.
    pub patient_id: String,
    /// De-identify DICOM files (and refuse other files), when the purpose asks for it.
    pub deid: Option<Deidentifier>,
}

#[derive(Debug)]
enum Stage {
    /// Fewer than 132 bytes seen: DICOM or not is not known yet.
    Sniff,
    /// A DICOM file whose PatientID is not read yet.
    Patient,
    /// A DICOM file to de-identify, its head not complete yet.
    Head,
    /// Everything from here on passes unchanged.
    Through,
}

/// The streaming check of one file: feed it the file's bytes in order; it gives back the
/// bytes to store. A DICOM Part-10 file (`DICM` at offset 128) must carry the declared
/// PatientID (read from a prefix of at most [`MAX_PATIENT_PREFIX`] bytes); with
/// de-identification, the head is held (at most [`MAX_HEAD_BYTES`]), rewritten and given
/// back, then the rest passes through. Other files pass unchanged, or are refused when the
/// transfer is de-identified.
#[derive(Debug)]
pub struct DicomGate {
    rules: GateRules,
    stage: Stage,
    held: BytesMut,
    /// Try to find the head's end again once this many bytes are held.
    next_try: usize,
    /// Bytes of the original file consumed so far (counted once the head is rewritten).
    consumed: u64,
    /// In a de-identified file, where the pixel data ends: nothing may follow it (elements
    /// after it would pass unparsed).
    allowed_end: Option<u64>,
}

impl DicomGate {
    /// A gate for one file.
    pub fn new(rules: GateRules) -> DicomGate {
        DicomGate {
            rules,
            stage: Stage::Sniff,
            held: BytesMut::new(),
            next_try: 0,
            consumed: 0,
            allowed_end: None,
        }
    }

    /// Says that the file is a DICOM instance whose PatientID the caller already checked
    /// with a full parser (the C-STORE SCP reads deflated data sets too, which the prefix
    /// reader does not): the gate skips its own check. Call before the first bytes.
    pub fn patient_checked(&mut self) {
        if matches!(self.stage, Stage::Sniff) && self.held.is_empty() {
            self.stage = if self.rules.deid.is_some() {
                Stage::Head
            } else {
                Stage::Through
            };
        }
    }

    /// Takes the next bytes of the file; returns what may be stored now (possibly nothing).
    pub fn feed(&mut self, data: Bytes) -> Result<Option<Bytes>, DeidError> {
        if matches!(self.stage, Stage::Through) {
            self.consumed += data.len() as u64;
            if let Some(end) = self.allowed_end
                && self.consumed > end
            {
                return Err(unsupported(
                    "elements follow the pixel data: they cannot be de-identified",
                ));
            }
            return Ok(Some(data));
        }
        self.held.extend_from_slice(&data);
        self.advance(false)
    }

    /// The file ended: returns what is still to be stored.
    pub fn finish(&mut self) -> Result<Option<Bytes>, DeidError> {
        if matches!(self.stage, Stage::Through) {
            return Ok(None);
        }
        self.advance(true)
    }

    fn release(&mut self) -> Option<Bytes> {
        self.stage = Stage::Through;
        let b = std::mem::take(&mut self.held).freeze();
        (!b.is_empty()).then_some(b)
    }

    fn advance(&mut self, eof: bool) -> Result<Option<Bytes>, DeidError> {
        loop {
            match self.stage {
                Stage::Through => return Ok(self.release()),
                Stage::Sniff => {
                    if self.held.len() < super::part10::PREFIX_LEN && !eof {
                        return Ok(None);
                    }
                    if super::part10::has_prefix(&self.held) {
                        self.stage = Stage::Patient;
                    } else if self.rules.deid.is_some() {
                        return Err(unsupported(
                            "not a DICOM Part 10 file: a de-identified transfer carries only \
                             DICOM instances",
                        ));
                    } else {
                        return Ok(self.release());
                    }
                }
                Stage::Patient if !eof && self.held.len() < self.next_try => return Ok(None),
                Stage::Patient => match part10::parse_prefix(&self.held) {
                    Ok(inst) if inst.patient_id != self.rules.patient_id => {
                        return Err(DeidError::Refused {
                            refusal: Refusal::new(
                                RULE_PATIENT_MISMATCH,
                                "the instance's PatientID (0010,0020) differs from the \
                                 transfer's declared patient",
                            ),
                            patient_id: Some(inst.patient_id),
                        });
                    }
                    Ok(_) if self.rules.deid.is_some() => {
                        self.next_try = 0;
                        self.stage = Stage::Head;
                    }
                    Ok(_) => return Ok(self.release()),
                    Err(Part10Error::Malformed(why)) => {
                        if self.rules.deid.is_some()
                            && matches!(
                                lengths::head_end(&self.held, eof, HEAD_STOP),
                                Err(HeadError::Unsupported(_))
                            )
                        {
                            return Err(unsupported(format!("{why}: cannot be de-identified")));
                        }
                        return Err(DeidError::Malformed(why));
                    }
                    Err(Part10Error::NeedMore) if eof => {
                        return Err(DeidError::Malformed(
                            "the instance ends before its PatientID".into(),
                        ));
                    }
                    Err(Part10Error::NeedMore) if self.held.len() >= MAX_PATIENT_PREFIX => {
                        return Err(DeidError::Malformed(format!(
                            "no PatientID within the first {MAX_PATIENT_PREFIX} bytes"
                        )));
                    }
                    Err(Part10Error::NeedMore) => {
                        // Parse again only once the held bytes doubled: linear overall.
                        self.next_try = self.held.len().saturating_mul(2).min(MAX_PATIENT_PREFIX);
                        return Ok(None);
                    }
                },
                Stage::Head => {
                    if !eof && self.held.len() < self.next_try {
                        return Ok(None);
                    }
                    let (end, next) = match lengths::head_end(&self.held, eof, HEAD_STOP) {
                        Ok(HeadEnd::At(p, next)) => (p, next),
                        Ok(HeadEnd::NeedMore) if self.held.len() >= MAX_HEAD_BYTES => {
                            return Err(unsupported(format!(
                                "the attributes before the pixel data exceed {MAX_HEAD_BYTES} \
                                 bytes"
                            )));
                        }
                        Ok(HeadEnd::NeedMore) => {
                            // Walk again only once the held bytes doubled: linear overall.
                            self.next_try = self.held.len().saturating_mul(2).min(MAX_HEAD_BYTES);
                            return Ok(None);
                        }
                        Err(HeadError::Unsupported(ts)) => {
                            return Err(unsupported(format!(
                                "transfer syntax {ts} cannot be de-identified"
                            )));
                        }
                        Err(HeadError::Malformed(why)) => return Err(DeidError::Malformed(why)),
                    };
                    if end > MAX_HEAD_BYTES {
                        return Err(unsupported(format!(
                            "the attributes before the pixel data exceed {MAX_HEAD_BYTES} bytes"
                        )));
                    }
                    // What may follow the head: the pixel data (group 7FE0) and nothing after
                    // it, so that no attribute passes unparsed. After encapsulated pixel data
                    // (undefined length) trailing elements are not detected (see the docs).
                    self.allowed_end = match next {
                        None => Some(end as u64),
                        Some(n) if n.tag.0 != 0x7FE0 => {
                            return Err(unsupported(format!(
                                "element ({:04X},{:04X}) after the attributes cannot be \
                                 de-identified",
                                n.tag.0, n.tag.1
                            )));
                        }
                        Some(n) => n
                            .len
                            .map(|len| end as u64 + n.header as u64 + u64::from(len)),
                    };
                    if let Some(allowed) = self.allowed_end
                        && self.held.len() as u64 > allowed
                    {
                        return Err(unsupported(
                            "elements follow the pixel data: they cannot be de-identified",
                        ));
                    }
                    self.consumed = self.held.len() as u64;
                    let deid = self.rules.deid.as_ref().expect("Head only with deid");
                    let head = deid.rewrite_head(&self.held[..end])?;
                    let rest = self.held.split_off(end);
                    let mut out = BytesMut::with_capacity(head.len() + rest.len());
                    out.extend_from_slice(&head);
                    out.extend_from_slice(&rest);
                    self.held = BytesMut::new();
                    self.stage = Stage::Through;
                    return Ok(Some(out.freeze()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use dicom_object::FileMetaTableBuilder;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const STUDY: &str = "1.2.826.0.1.3680043.10.543.100";
    const SERIES: &str = "1.2.826.0.1.3680043.10.543.101";
    const FRAME: &str = "1.2.826.0.1.3680043.10.543.102";

    fn sop(n: u32) -> String {
        format!("1.2.826.0.1.3680043.10.543.{n}")
    }

    fn pixels(n: u32) -> Vec<u8> {
        (0..512u32).map(|i| (i * 31 + n) as u8).collect()
    }

    fn el(g: u16, e: u16, vr: VR, v: &str) -> InMemElement {
        DataElement::new(Tag(g, e), vr, PrimitiveValue::from(v))
    }

    /// A small CT instance made with dicom-rs: identifying attributes, a private block, a
    /// reference to instance `n - 1` inside a sequence, 16x16 pixels.
    fn instance(n: u32, patient: &str, ts: &str) -> Vec<u8> {
        let reference = InMemDicomObject::from_element_iter([
            el(0x0008, 0x1150, VR::UI, CT),
            el(0x0008, 0x1155, VR::UI, &sop(n - 1)),
        ]);
        let obj = InMemDicomObject::from_element_iter([
            el(0x0008, 0x0016, VR::UI, CT),
            el(0x0008, 0x0018, VR::UI, &sop(n)),
            el(0x0008, 0x0020, VR::DA, "20240131"),
            el(0x0008, 0x0050, VR::SH, "ACC-77"),
            el(0x0008, 0x0060, VR::CS, "CT"),
            el(0x0008, 0x0080, VR::LO, "Queen Mary Hospital"),
            el(0x0008, 0x0090, VR::PN, "Chan^Tai Man"),
            el(0x0008, 0x1070, VR::PN, "Operator^One"),
            DataElement::new(
                Tag(0x0008, 0x1140),
                VR::SQ,
                Value::Sequence(DataSetSequence::from(vec![reference])),
            ),
            el(0x0009, 0x0010, VR::LO, "ACME"),
            el(0x0009, 0x1001, VR::LO, "HKID A123456(7)"),
            el(0x0010, 0x0010, VR::PN, "Wong^Siu Ming"),
            el(0x0010, 0x0020, VR::LO, patient),
            el(0x0010, 0x0030, VR::DA, "19700101"),
            el(0x0010, 0x0040, VR::CS, "M"),
            el(0x0010, 0x1040, VR::LO, "1 Harbour Road"),
            el(0x0020, 0x000D, VR::UI, STUDY),
            el(0x0020, 0x000E, VR::UI, SERIES),
            el(0x0020, 0x0010, VR::SH, "S-9"),
            el(0x0020, 0x0052, VR::UI, FRAME),
            DataElement::new(Tag(0x0028, 0x0010), VR::US, PrimitiveValue::from(16u16)),
            DataElement::new(Tag(0x0028, 0x0011), VR::US, PrimitiveValue::from(16u16)),
            DataElement::new(Tag(0x0028, 0x0100), VR::US, PrimitiveValue::from(16u16)),
            DataElement::new(
                Tag(0x7FE0, 0x0010),
                VR::OW,
                PrimitiveValue::U8(pixels(n).into()),
            ),
        ]);
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax(ts)
                    .media_storage_sop_class_uid(CT)
                    .media_storage_sop_instance_uid(sop(n))
                    .source_application_entity_title("MODALITY1"),
            )
            .unwrap();
        let mut out = Vec::new();
        file.write_all(&mut out).unwrap();
        out
    }

    fn key() -> DeidKey {
        DeidKey::from_secret(&[7u8; 32])
    }

    /// Runs `file` through a gate in 7-byte pieces.
    fn gate(file: &[u8], rules: GateRules) -> Result<Vec<u8>, DeidError> {
        let mut g = DicomGate::new(rules);
        let mut out = Vec::new();
        for piece in file.chunks(7) {
            if let Some(b) = g.feed(Bytes::copy_from_slice(piece))? {
                out.extend_from_slice(&b);
            }
        }
        if let Some(b) = g.finish()? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    fn deid(file: &[u8], d: &Deidentifier) -> Vec<u8> {
        gate(
            file,
            GateRules {
                patient_id: "P-0001".into(),
                deid: Some(d.clone()),
            },
        )
        .unwrap()
    }

    fn parse(file: &[u8]) -> dicom_object::DefaultDicomObject {
        OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(file)
            .unwrap()
    }

    fn text(obj: &InMemDicomObject, g: u16, e: u16) -> Option<String> {
        obj.element_opt(Tag(g, e))
            .unwrap()
            .map(|e| trim_uid(&e.to_str().unwrap()).trim().to_owned())
    }

    #[test]
    fn identifying_attributes_go_uids_follow_and_pixels_stay() {
        const EXPLICIT: &str = "1.2.840.10008.1.2.1";
        let t1 = key().for_transfer(&TransferId::new_v7());
        let (a, b) = (
            instance(11, "P-0001", EXPLICIT),
            instance(12, "P-0001", EXPLICIT),
        );
        let (da, db) = (deid(&a, &t1), deid(&b, &t1));
        // The pixel data is the same bytes, at the end of the file.
        let px = parse(&a)
            .element(Tag(0x7FE0, 0x0010))
            .unwrap()
            .to_bytes()
            .unwrap()
            .to_vec();
        let tail = &a[a.len() - 512..];
        assert_eq!(tail, &pixels(11)[..]);
        assert_eq!(&da[da.len() - 512..], tail);
        let oa = parse(&da);
        let ob = parse(&db);
        assert_eq!(
            oa.element(Tag(0x7FE0, 0x0010))
                .unwrap()
                .to_bytes()
                .unwrap()
                .to_vec(),
            px
        );
        for (g, e) in [
            (0x0008, 0x0080),
            (0x0008, 0x1070),
            (0x0009, 0x0010),
            (0x0009, 0x1001),
            (0x0010, 0x1040),
        ] {
            assert_eq!(text(&oa, g, e), None, "({g:04X},{e:04X}) removed");
        }
        for (g, e) in [
            (0x0008, 0x0020),
            (0x0008, 0x0050),
            (0x0008, 0x0090),
            (0x0010, 0x0010),
            (0x0010, 0x0030),
            (0x0010, 0x0040),
            (0x0020, 0x0010),
        ] {
            assert_eq!(
                text(&oa, g, e).as_deref(),
                Some(""),
                "({g:04X},{e:04X}) emptied"
            );
        }
        // No identifying string survives anywhere in the bytes.
        for needle in [
            "Wong",
            "P-0001",
            "Chan",
            "Queen Mary",
            "HKID",
            "ACME",
            "MODALITY1",
            "543.",
        ] {
            assert!(
                !da.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} still in the file"
            );
        }
        let pseudonym = text(&oa, 0x0010, 0x0020).unwrap();
        assert!(
            pseudonym.starts_with("BL-") && pseudonym.len() == 35,
            "{pseudonym}"
        );
        assert_eq!(text(&ob, 0x0010, 0x0020).unwrap(), pseudonym);
        assert_eq!(text(&oa, 0x0012, 0x0062).as_deref(), Some("YES"));
        assert_eq!(
            text(&oa, 0x0012, 0x0063).as_deref(),
            Some(DEIDENTIFICATION_METHOD)
        );
        // UIDs: new, 2.25-rooted, the same study/series/frame across the transfer's instances.
        for (g, e) in [(0x0020, 0x000D), (0x0020, 0x000E), (0x0020, 0x0052)] {
            let u = text(&oa, g, e).unwrap();
            assert!(u.starts_with("2.25.") && u.len() <= 64, "{u}");
            assert_eq!(Some(u), text(&ob, g, e));
        }
        assert_eq!(text(&oa, 0x0008, 0x0016).as_deref(), Some(CT));
        let new_sop_a = text(&oa, 0x0008, 0x0018).unwrap();
        assert_ne!(new_sop_a, sop(11));
        assert_eq!(oa.meta().media_storage_sop_instance_uid(), new_sop_a);
        assert_eq!(oa.meta().source_application_entity_title, None);
        // b references a (instance 11) inside ReferencedImageSequence: the reference follows.
        let seq = ob.element(Tag(0x0008, 0x1140)).unwrap();
        let item = &seq.items().unwrap()[0];
        assert_eq!(text(item, 0x0008, 0x1155), Some(new_sop_a.clone()));
        assert_eq!(text(item, 0x0008, 0x1150).as_deref(), Some(CT));
        // Another transfer: other UIDs, same pseudonym.
        let t2 = key().for_transfer(&TransferId::new_v7());
        let o2 = parse(&deid(&a, &t2));
        assert_ne!(text(&o2, 0x0008, 0x0018).unwrap(), new_sop_a);
        assert_ne!(text(&o2, 0x0020, 0x000D), text(&oa, 0x0020, 0x000D));
        assert_eq!(text(&o2, 0x0010, 0x0020).unwrap(), pseudonym);
    }

    #[test]
    fn implicit_vr_is_rewritten_in_its_own_syntax() {
        const IMPLICIT: &str = "1.2.840.10008.1.2";
        let t = key().for_transfer(&TransferId::new_v7());
        let a = instance(21, "P-0001", IMPLICIT);
        let da = deid(&a, &t);
        let o = parse(&da);
        assert_eq!(o.meta().transfer_syntax(), IMPLICIT);
        assert_eq!(text(&o, 0x0010, 0x0010).as_deref(), Some(""));
        assert_eq!(&da[da.len() - 512..], &pixels(21)[..]);
    }

    #[test]
    fn patient_mismatch_unsupported_syntaxes_and_non_dicom() {
        const EXPLICIT: &str = "1.2.840.10008.1.2.1";
        let a = instance(31, "P-0002", EXPLICIT);
        let care = GateRules {
            patient_id: "P-0001".into(),
            deid: None,
        };
        match gate(&a, care.clone()) {
            Err(DeidError::Refused {
                refusal,
                patient_id,
            }) => {
                assert_eq!(refusal.rule, RULE_PATIENT_MISMATCH);
                assert_eq!(patient_id.as_deref(), Some("P-0002"));
            }
            other => panic!("{other:?}"),
        }
        // The right patient under `care`: byte-identical.
        let ok = instance(32, "P-0001", EXPLICIT);
        assert_eq!(gate(&ok, care.clone()).unwrap(), ok);
        // A PDF under `care` passes; under research it is refused.
        let pdf = b"%PDF-1.7 a report".repeat(20);
        assert_eq!(gate(&pdf, care).unwrap(), pdf);
        let research = GateRules {
            patient_id: "P-0001".into(),
            deid: Some(key().for_transfer(&TransferId::new_v7())),
        };
        let rule = |r: Result<Vec<u8>, DeidError>| match r {
            Err(DeidError::Refused { refusal, .. }) => refusal.rule,
            other => panic!("{other:?}"),
        };
        assert_eq!(rule(gate(&pdf, research.clone())), RULE_DEID_UNSUPPORTED);
        assert_eq!(rule(gate(b"tiny", research.clone())), RULE_DEID_UNSUPPORTED);
        // Big endian: cannot be de-identified safely.
        let be = instance(33, "P-0001", "1.2.840.10008.1.2.2");
        assert_eq!(rule(gate(&be, research)), RULE_DEID_UNSUPPORTED);
    }

    #[test]
    fn elements_after_the_head_other_than_pixel_data_are_refused() {
        const EXPLICIT: &str = "1.2.840.10008.1.2.1";
        let research = GateRules {
            patient_id: "P-0001".into(),
            deid: Some(key().for_transfer(&TransferId::new_v7())),
        };
        let with = |tag: (u16, u16), drop_pixels: bool| {
            let mut obj = parse(&instance(41, "P-0001", EXPLICIT));
            if drop_pixels {
                obj.remove_element(Tag(0x7FE0, 0x0010));
            }
            obj.put(el(tag.0, tag.1, VR::LO, "HKID A123456"));
            let mut out = Vec::new();
            obj.write_all(&mut out).unwrap();
            out
        };
        for (tag, drop_pixels) in [
            ((0x7FE1, 0x0010), false),
            ((0x7FE1, 0x0010), true),
            ((0xFFFC, 0xFFFC), true),
        ] {
            match gate(&with(tag, drop_pixels), research.clone()) {
                Err(DeidError::Refused { refusal, .. }) => {
                    assert_eq!(refusal.rule, RULE_DEID_UNSUPPORTED, "{tag:04X?}");
                }
                other => panic!("{tag:04X?}: {other:?}"),
            }
        }
        // Without pixel data and nothing after: fine, and the whole file is rewritten.
        let mut obj = parse(&instance(42, "P-0001", EXPLICIT));
        obj.remove_element(Tag(0x7FE0, 0x0010));
        let mut sr = Vec::new();
        obj.write_all(&mut sr).unwrap();
        let out = gate(&sr, research).unwrap();
        assert_eq!(text(&parse(&out), 0x0010, 0x0010).as_deref(), Some(""));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// A valid instance with header bytes changed or cut, fed in pieces of any size: the
        /// gate gives bytes or a typed error, never a panic; de-identified output is Part 10.
        #[test]
        fn mutated_instances_never_panic_the_gate(
            edits in proptest::collection::vec((0usize..900, proptest::num::u8::ANY), 1..8),
            cut in 0usize..1200,
            piece in 1usize..300,
        ) {
            let mut f = instance(51, "P-0001", "1.2.840.10008.1.2.1");
            for (pos, byte) in edits {
                let p = 128 + pos % (f.len() - 128);
                f[p] = byte;
            }
            f.truncate(f.len() - cut.min(f.len() - 100));
            let mut g = DicomGate::new(GateRules {
                patient_id: "P-0001".into(),
                deid: Some(key().for_transfer(&TransferId::new_v7())),
            });
            let mut out = Vec::new();
            let mut result = Ok(());
            for p in f.chunks(piece) {
                match g.feed(Bytes::copy_from_slice(p)) {
                    Ok(b) => out.extend_from_slice(&b.unwrap_or_default()),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if result.is_ok()
                && let Ok(rest) = g.finish()
            {
                out.extend_from_slice(&rest.unwrap_or_default());
                proptest::prop_assert_eq!(&out[128..132], b"DICM");
            }
        }
    }

    /// Explicit VR little endian element bytes (2-byte length VRs).
    fn raw(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = value.to_vec();
        if v.len() % 2 == 1 {
            v.push(if vr == b"UI" { 0 } else { b' ' });
        }
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(&v);
        out
    }

    /// Sequences and items of defined length (what many modalities write): their lengths
    /// change with the rewrite, and the output must still parse with the references mapped.
    #[test]
    fn defined_length_sequences_are_rewritten_consistently() {
        let mut item = raw(0x0008, 0x1150, b"UI", CT.as_bytes());
        item.extend(raw(0x0008, 0x1155, b"UI", sop(70).as_bytes()));
        item.extend(raw(0x0009, 0x1001, b"LO", b"HKID A123456"));
        let mut seq = vec![0xFE, 0xFF, 0x00, 0xE0];
        seq.extend_from_slice(&(item.len() as u32).to_le_bytes());
        seq.extend(item);
        let mut f =
            super::super::part10::file_header(CT, &sop(71), "1.2.840.10008.1.2.1", "X").unwrap();
        f.extend(raw(0x0008, 0x0016, b"UI", CT.as_bytes()));
        f.extend(raw(0x0008, 0x0018, b"UI", sop(71).as_bytes()));
        f.extend_from_slice(&[0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0]);
        f.extend_from_slice(&(seq.len() as u32).to_le_bytes());
        f.extend(seq);
        f.extend(raw(0x0010, 0x0010, b"PN", b"Wong^Siu Ming"));
        f.extend(raw(0x0010, 0x0020, b"LO", b"P-0001"));
        f.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 4, 0, 0, 0, 1, 2, 3, 4,
        ]);
        let t = key().for_transfer(&TransferId::new_v7());
        let out = deid(&f, &t);
        assert_eq!(&out[out.len() - 4..], &[1, 2, 3, 4]);
        let o = parse(&out);
        let item = &o.element(Tag(0x0008, 0x1140)).unwrap().items().unwrap()[0];
        assert_eq!(text(item, 0x0008, 0x1155), Some(t.new_uid(&sop(70))));
        assert_eq!(text(item, 0x0009, 0x1001), None);
        assert_eq!(text(&o, 0x0010, 0x0010).as_deref(), Some(""));
        assert!(!out.windows(4).any(|w| w == b"HKID"));
    }

    #[test]
    fn uid_scheme_is_keyed_and_bounded() {
        let id = TransferId::new_v7();
        let u = key().for_transfer(&id).new_uid("1.2.3");
        assert_eq!(u, key().for_transfer(&id).new_uid("1.2.3\0"));
        assert_ne!(
            u,
            DeidKey::from_secret(&[8u8; 32])
                .for_transfer(&id)
                .new_uid("1.2.3")
        );
        assert!(u.len() <= 44 && u[5..].bytes().all(|b| b.is_ascii_digit()));
    }
}
