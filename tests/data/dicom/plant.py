#!/usr/bin/python3
"""Plants identifiers into copies of the corpus files (for the de-identification test).

usage: plant.py SRC_DIR OUT_DIR

Every file gets the declared patient (P-0001) and identifying values at the top level, in a
private block, and in sequences two levels deep; in explicit VR files one of those
sequences (ReferencedImageSequence, whose items reference the instance's own SOP Instance
UID, with a defined length), SourceImageSequence (undefined length) and the
FrameOfReferenceUID are written as UN, the sequences' items in implicit VR, as a system that
did not know the tags would. InstanceNumber is set to 9000 + the file's index
(sorted by name) so the checker can pair a delivered file with its source, and the SOP
Instance UID made unique (some corpus files are one instance in several encodings).
"""

import os
import sys

import pydicom
import pydicom.config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import Tag

FRAME = "1.2.826.0.1.3680043.10.999.52"


def implicit_value(elem):
    """The value bytes of `elem` encoded in implicit VR little endian (no header)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_data_element(fp, elem)
    raw = fp.getvalue()[8:]
    # pydicom closes the sequence with a delimiter; a defined-length UN needs none.
    if raw.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"):
        raw = raw[:-8]
    return raw


def plant(ds, index):
    explicit = not ds.file_meta.TransferSyntaxUID.is_implicit_VR
    ds.PatientID = "P-0001"
    ds.PatientName = "Wong^Siu Ming"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Queen Mary Hospital"
    ds.ReferringPhysicianName = "Chan^Tai Man"
    ds.AccessionNumber = "ACC-4711"
    ds.OperatorsName = "Operator^Lee"
    ds.ProtocolName = "HKID-PROTOCOL Wong"
    ds.StudyDescription = "Study of Wong Siu Ming"
    ds.InstanceNumber = 9000 + index
    # Some corpus files are one instance in several encodings: one SOP Instance UID each.
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.999.{1000 + index}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    block = ds.private_block(0x0009, "ACME", create=True)
    block.add_new(0x01, "LO", "HKID A123456")
    # Depth 2: an item referencing the instance itself, holding a nested item that names
    # the patient and an institution.
    nested = Dataset()
    nested.PatientName = "Wong^Nested"
    nested.InstitutionName = "Queen Mary Nested"
    nested.ReferencedSOPClassUID = ds.SOPClassUID
    nested.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.InstitutionName = "Queen Mary Item"
    item.SourceImageSequence = Sequence([nested])
    images = DataElement(0x00081140, "SQ", Sequence([item]))
    other = Dataset()
    other.PatientName = "Wong^Other"
    other.OtherPatientIDs = "HKID-OTHER"
    ds.ReferencedPatientSequence = Sequence([other])
    source = Dataset()
    source.PatientName = "Wong^Undefined"
    source.ReferencedSOPClassUID = ds.SOPClassUID
    source.ReferencedSOPInstanceUID = ds.SeriesInstanceUID
    sources = DataElement(0x00082112, "SQ", Sequence([source]))
    if explicit:
        un = DataElement(0x00081140, "UN", b"")
        un.value = implicit_value(images)
        ds.add(un)
        # SourceImageSequence as UN of undefined length (pydicom adds the delimiter).
        ds[0x00082112] = RawDataElement(
            Tag(0x00082112), "UN", 0xFFFFFFFF, implicit_value(sources), 0, False, True
        )
        ds.add(DataElement(0x00200052, "UN", (FRAME + "\0").encode()))
    else:
        ds.add(images)
        ds.add(sources)
        ds.FrameOfReferenceUID = FRAME


def main(src, out):
    # Keep UN as written (pydicom would otherwise read it back as the dictionary's VR).
    pydicom.config.replace_un_with_known_vr = False
    os.makedirs(out, exist_ok=True)
    names = sorted(n for n in os.listdir(src) if n.endswith(".dcm"))
    for index, name in enumerate(names):
        ds = pydicom.dcmread(os.path.join(src, name))
        plant(ds, index)
        ds.save_as(os.path.join(out, name), write_like_original=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
