//! Synthetic DICOM studies for `cargo xtask demo` and `baylink-bench orthanc`.
//!
//! [`CtStudy`] writes one CT study of one axial series as a PACS would hold it: CT Image
//! Storage instances of 512 × 512 16-bit slices (12 bits stored, rescale intercept −1024),
//! explicit VR little endian, one file per slice, every identifier synthetic. The pixels are a
//! simple chest phantom (air, skin and fat, soft tissue, two lungs, the spine, noise), so that
//! a viewer shows something recognisable and the data does not compress to nothing.
//!
//! Written with dicom-rs (`dicom-object`), independently of the appliance's own DICOM code.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use dicom_core::value::C;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileDicomObject, FileMetaTableBuilder, InMemDicomObject};

/// SOP Class UID of CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Explicit VR little endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Rows and columns of every slice.
pub const MATRIX: u16 = 512;
/// Pixel data bytes of one slice.
pub const SLICE_PIXEL_BYTES: u64 = MATRIX as u64 * MATRIX as u64 * 2;
/// Slice spacing (and thickness) in millimetres.
const SLICE_MM: f64 = 0.625;
/// In-plane pixel spacing in millimetres.
const PIXEL_MM: f64 = 0.703125;

/// One synthetic CT study: one patient, one series of `slices` axial slices.
#[derive(Debug, Clone)]
pub struct CtStudy {
    /// PatientID (0010,0020).
    pub patient_id: String,
    /// PatientName (0010,0010), DICOM person name (`Family^Given`).
    pub patient_name: String,
    /// Number of slices (instances).
    pub slices: u32,
    /// Random 128-bit value the study's UIDs are made from (`2.25.<integer>`): a new study has
    /// new UIDs, so repeated runs never collide in a PACS.
    uid_base: u128,
}

impl CtStudy {
    /// A study of `slices` slices (at least 1) for `patient_id`, with fresh UIDs.
    pub fn new(patient_id: &str, patient_name: &str, slices: u32) -> anyhow::Result<CtStudy> {
        let mut seed = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .context("cannot read /dev/urandom")?;
        Ok(CtStudy {
            patient_id: patient_id.to_owned(),
            patient_name: patient_name.to_owned(),
            slices: slices.max(1),
            // The low 32 bits count the study's objects; the top bit set keeps every UID at
            // 39 digits.
            uid_base: (u128::from_le_bytes(seed) | (1 << 127)) & !u128::from(u32::MAX),
        })
    }

    /// How many slices make a study of about `bytes` (at least one).
    pub fn slices_for(bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(SLICE_PIXEL_BYTES))
            .unwrap_or(u32::MAX)
            .max(1)
    }

    fn uid(&self, n: u32) -> String {
        format!("2.25.{}", self.uid_base + u128::from(n))
    }

    /// StudyInstanceUID (0020,000D).
    pub fn study_uid(&self) -> String {
        self.uid(0)
    }

    /// SeriesInstanceUID (0020,000E).
    pub fn series_uid(&self) -> String {
        self.uid(1)
    }

    /// SOP Instance UID of slice `n` (0-based).
    pub fn instance_uid(&self, n: u32) -> String {
        self.uid(16 + n)
    }

    /// The file name slice `n` is written under.
    pub fn file_name(n: u32) -> String {
        format!("CT{:06}.dcm", n + 1)
    }

    /// Slice `n` (0-based) as a Part 10 object.
    pub fn instance(&self, n: u32) -> anyhow::Result<FileDicomObject<InMemDicomObject>> {
        let z = -(f64::from(n) * SLICE_MM);
        let text = |s: &str| PrimitiveValue::from(s);
        let mut o = InMemDicomObject::new_empty();
        let mut put = |tag, vr, value| {
            o.put(DataElement::new(tag, vr, value));
        };
        put(tags::SPECIFIC_CHARACTER_SET, VR::CS, text("ISO_IR 100"));
        put(tags::IMAGE_TYPE, VR::CS, text("ORIGINAL\\PRIMARY\\AXIAL"));
        put(tags::SOP_CLASS_UID, VR::UI, text(CT_IMAGE_STORAGE));
        put(tags::SOP_INSTANCE_UID, VR::UI, text(&self.instance_uid(n)));
        put(tags::STUDY_DATE, VR::DA, text("20260114"));
        put(tags::SERIES_DATE, VR::DA, text("20260114"));
        put(tags::STUDY_TIME, VR::TM, text("093000"));
        put(tags::SERIES_TIME, VR::TM, text("093112"));
        put(tags::ACCESSION_NUMBER, VR::SH, text("SYN-0001"));
        put(tags::MODALITY, VR::CS, text("CT"));
        put(tags::MANUFACTURER, VR::LO, text("baylink synthetic"));
        put(tags::REFERRING_PHYSICIAN_NAME, VR::PN, text(""));
        put(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            text("CT CHEST (synthetic)"),
        );
        put(tags::SERIES_DESCRIPTION, VR::LO, text("AXIAL 0.625 mm"));
        put(tags::PATIENT_NAME, VR::PN, text(&self.patient_name));
        put(tags::PATIENT_ID, VR::LO, text(&self.patient_id));
        put(tags::PATIENT_BIRTH_DATE, VR::DA, text("19700101"));
        put(tags::PATIENT_SEX, VR::CS, text("O"));
        put(tags::BODY_PART_EXAMINED, VR::CS, text("CHEST"));
        put(tags::SLICE_THICKNESS, VR::DS, text("0.625"));
        put(tags::KVP, VR::DS, text("120"));
        put(tags::PATIENT_POSITION, VR::CS, text("HFS"));
        put(tags::STUDY_INSTANCE_UID, VR::UI, text(&self.study_uid()));
        put(tags::SERIES_INSTANCE_UID, VR::UI, text(&self.series_uid()));
        put(tags::STUDY_ID, VR::SH, text("1"));
        put(tags::SERIES_NUMBER, VR::IS, text("2"));
        put(tags::INSTANCE_NUMBER, VR::IS, text(&(n + 1).to_string()));
        let corner = -(f64::from(MATRIX) * PIXEL_MM) / 2.0;
        put(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            text(&format!("{corner}\\{corner}\\{z}")),
        );
        put(
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            text("1\\0\\0\\0\\1\\0"),
        );
        put(tags::FRAME_OF_REFERENCE_UID, VR::UI, text(&self.uid(2)));
        put(tags::SLICE_LOCATION, VR::DS, text(&z.to_string()));
        put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
        put(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            text("MONOCHROME2"),
        );
        put(tags::ROWS, VR::US, PrimitiveValue::from(MATRIX));
        put(tags::COLUMNS, VR::US, PrimitiveValue::from(MATRIX));
        put(
            tags::PIXEL_SPACING,
            VR::DS,
            text(&format!("{PIXEL_MM}\\{PIXEL_MM}")),
        );
        put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16));
        put(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16));
        put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16));
        put(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        );
        put(tags::WINDOW_CENTER, VR::DS, text("40\\-600"));
        put(tags::WINDOW_WIDTH, VR::DS, text("400\\1500"));
        put(tags::RESCALE_INTERCEPT, VR::DS, text("-1024"));
        put(tags::RESCALE_SLOPE, VR::DS, text("1"));
        put(tags::RESCALE_TYPE, VR::LO, text("HU"));
        let pixels = phantom(
            f64::from(n) / f64::from(self.slices.max(2) - 1),
            self.uid_base as u64 ^ u64::from(n),
        );
        put(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(C::from_vec(pixels)),
        );
        o.with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_VR_LE))
            .context("cannot build the file meta group")
    }

    /// Writes every slice into `dir` (created if missing) as `CT000001.dcm`, ..., on all
    /// cores; the paths in slice order.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(self.slices as usize) as u32;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    s.spawn(move || -> anyhow::Result<()> {
                        for n in (w..self.slices).step_by(workers as usize) {
                            let path = dir.join(CtStudy::file_name(n));
                            self.instance(n)?
                                .write_to_file(&path)
                                .with_context(|| format!("cannot write {}", path.display()))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
            }
            anyhow::Ok(())
        })?;
        Ok((0..self.slices)
            .map(|n| dir.join(CtStudy::file_name(n)))
            .collect())
    }
}

/// One 512 × 512 slice of the chest phantom at `t` (0 at the top of the scan, 1 at the
/// bottom), as stored values (HU + 1024, 12 bits), with seeded noise.
fn phantom(t: f64, seed: u64) -> Vec<u16> {
    let mut rng = seed | 1;
    let mut noise = move || {
        // xorshift64*, two draws summed: a cheap, roughly bell-shaped ±1.
        let mut draw = || {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f64 / f64::from(1u32 << 24)
        };
        draw() + draw() - 1.0
    };
    // The chest widens, then narrows; the lungs appear below the apex and give way to the
    // abdomen towards the end.
    let body = 0.85 + 0.15 * (std::f64::consts::PI * t).sin();
    let lung = if (0.05..0.8).contains(&t) {
        (std::f64::consts::PI * (t - 0.05) / 0.75).sin().sqrt()
    } else {
        0.0
    };
    let inside = |x: f64, y: f64, cx: f64, cy: f64, a: f64, b: f64| {
        let (dx, dy) = ((x - cx) / a, (y - cy) / b);
        dx * dx + dy * dy <= 1.0
    };
    let size = usize::from(MATRIX);
    let mut out = Vec::with_capacity(size * size);
    for row in 0..size {
        for col in 0..size {
            let (x, y) = (col as f64, row as f64);
            let (hu, sigma) = if !inside(x, y, 256.0, 260.0, 210.0 * body, 150.0 * body) {
                if (440.0..448.0).contains(&y) && (40.0..472.0).contains(&x) {
                    (200.0, 10.0) // the table
                } else {
                    (-1000.0, 5.0)
                }
            } else if !inside(x, y, 256.0, 260.0, 196.0 * body, 136.0 * body) {
                (-100.0, 15.0) // skin and subcutaneous fat
            } else if ((x - 256.0).powi(2) + (y - 360.0).powi(2)).sqrt() < 26.0 {
                let r = ((x - 256.0).powi(2) + (y - 360.0).powi(2)).sqrt();
                if r < 19.0 {
                    (300.0, 30.0)
                } else {
                    (1200.0, 40.0)
                } // vertebra
            } else if lung > 0.0
                && (inside(x, y, 172.0, 245.0, 72.0 * lung, 100.0 * lung)
                    || inside(x, y, 340.0, 245.0, 68.0 * lung, 100.0 * lung))
            {
                (-850.0, 40.0)
            } else {
                (40.0, 20.0) // soft tissue
            };
            let value = (hu + 1024.0 + sigma * 2.0 * noise()).clamp(0.0, 4095.0);
            out.push(value as u16);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_object::OpenFileOptions;

    #[test]
    fn a_study_reads_back_as_ct_with_its_identifiers() {
        let dir = tempfile::tempdir().unwrap();
        let study = CtStudy::new("P-0001", "Demo^Patient", 3).unwrap();
        let files = study.write(dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        let mut instances = std::collections::BTreeSet::new();
        for (n, f) in files.iter().enumerate() {
            let len = std::fs::metadata(f).unwrap().len();
            assert!(
                len > SLICE_PIXEL_BYTES && len < SLICE_PIXEL_BYTES + 2048,
                "{len}"
            );
            let o = OpenFileOptions::new().open_file(f).unwrap();
            assert_eq!(o.meta().media_storage_sop_class_uid(), CT_IMAGE_STORAGE);
            assert_eq!(o.meta().transfer_syntax(), EXPLICIT_VR_LE);
            let s = |tag| o.element(tag).unwrap().to_str().unwrap().into_owned();
            assert_eq!(s(tags::PATIENT_ID), "P-0001");
            assert_eq!(s(tags::STUDY_INSTANCE_UID), study.study_uid());
            assert_eq!(s(tags::SERIES_INSTANCE_UID), study.series_uid());
            assert_eq!(s(tags::INSTANCE_NUMBER), (n + 1).to_string());
            assert!(study.study_uid().len() <= 64);
            instances.insert(s(tags::SOP_INSTANCE_UID));
            let px = o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
            assert_eq!(px.len() as u64, SLICE_PIXEL_BYTES);
        }
        assert_eq!(instances.len(), 3);
        // A second study has other UIDs.
        let other = CtStudy::new("P-0001", "Demo^Patient", 3).unwrap();
        assert_ne!(other.study_uid(), study.study_uid());
    }

    #[test]
    fn the_phantom_has_air_tissue_lung_and_bone() {
        let px = phantom(0.4, 7);
        let at = |x: usize, y: usize| i32::from(px[y * 512 + x]) - 1024;
        assert!(at(5, 5) < -950, "air {}", at(5, 5));
        assert!(at(172, 245) < -700, "lung {}", at(172, 245));
        assert!(
            (-50..150).contains(&at(256, 200)),
            "tissue {}",
            at(256, 200)
        );
        assert!(at(256, 380) > 1000, "bone {}", at(256, 380));
    }

    #[test]
    fn slice_counts() {
        assert_eq!(CtStudy::slices_for(0), 1);
        assert_eq!(CtStudy::slices_for(1), 1);
        assert_eq!(CtStudy::slices_for(256 << 20), 512);
    }
}
