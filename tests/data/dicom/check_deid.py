#!/usr/bin/python3
"""Checks de-identified DICOM files with pydicom, independently of the code that wrote them.

usage: check_deid.py [--any-transfer-syntax] TABLE_RS PLANTED_DIR DELIVERED_FILE...

TABLE_RS is appliance/src/dicom/deid/table.rs (PS3.15 Table E.1-1, generated from the
standard's table); only its tags are read. Each delivered file is paired with the planted
file of the same InstanceNumber (see plant.py). Checked:

- pydicom reads the whole file; the file meta agrees with the data set (Media Storage SOP
  Class/Instance UID, transfer syntax as the source's unless --any-transfer-syntax, for a
  door that negotiates it); the pixel data is the source's;
- no private element, no element left as UN, at any depth;
- every Table E.1-1 attribute, at any depth, is absent, empty, a dummy value, a new UID
  (2.25.), the PatientID pseudonym (BL-), or a sequence (whose items are checked too);
- PatientIdentityRemoved YES, DeidentificationMethodCodeSequence names 113100;
- the sequences plant.py wrote (as UN in explicit VR files) are sequences whose references
  follow the new UIDs (ReferencedImageSequence: the SOP Instance UID, SourceImageSequence:
  the Series Instance UID);
- the raw bytes contain none of the planted values, none of the source's UIDs (other than
  DICOM-defined ones) and none of the source's values of Table E.1-1 attributes.

Prints one line per problem and exits 1 if there is any.
"""

import os
import re
import sys

import pydicom
import pydicom.config
import pydicom.sequence
from pydicom.uid import UID_dictionary

PLANTED = [
    b"Wong",
    b"Siu Ming",
    b"Queen Mary",
    b"Chan^Tai",
    b"ACC-4711",
    b"HKID",
    b"ACME",
    b"19700101",
    b"Operator^Lee",
    b"1.2.826.0.1.3680043.10.999",
]
DUMMIES = {"", "ANONYMOUS", "19000101", "19000101000000", "000000", "0", "000Y"}


def table(path):
    text = open(path, encoding="utf-8").read()
    exact = {int(t, 16) for t in re.findall(r"\(0x([0-9A-F]{8}), [A-Za-z]+, \"", text)}
    masked = [
        (int(t, 16), int(m, 16))
        for t, m in re.findall(r"\(0x([0-9A-F]{8}), 0x([0-9A-F]{8}), [A-Za-z]+, \"", text)
    ]
    if len(exact) + len(masked) < 600:
        sys.exit(f"{path}: only {len(exact) + len(masked)} attributes read")
    return lambda tag: tag in exact or any(tag & m == t for t, m in masked)


def values(elem):
    v = elem.value
    if v is None:
        return []
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return [str(x) for x in v]
    return [str(v)]


def distinctive(v):
    """A value worth searching the bytes for: text with letters (a name, an id) or a date;
    not a bare number such as 0.0, which any attribute may hold."""
    if v in DUMMIES or len(v) < 6:
        return False
    return any(c.isalpha() for c in v) or (v.isdigit() and len(v) >= 8)


def defined_uid(uid):
    return uid.startswith("1.2.840.10008.") or uid in UID_dictionary


def check(listed, planted, got_path, problems, same_syntax):
    name = os.path.basename(got_path)
    raw = open(got_path, "rb").read()
    got = pydicom.dcmread(got_path)
    say = lambda what: problems.append(f"{name} (from {planted.filename}): {what}")
    meta = got.file_meta
    if meta.MediaStorageSOPInstanceUID != got.SOPInstanceUID:
        say("MediaStorageSOPInstanceUID differs from SOPInstanceUID")
    if meta.MediaStorageSOPClassUID != got.SOPClassUID:
        say("MediaStorageSOPClassUID differs from SOPClassUID")
    if same_syntax and meta.TransferSyntaxUID != planted.file_meta.TransferSyntaxUID:
        say(f"transfer syntax {meta.TransferSyntaxUID}, source {planted.file_meta.TransferSyntaxUID}")
    if "PixelData" in planted and got.get("PixelData") != planted.PixelData:
        say("pixel data differs from the source's")
    if got.get("PatientIdentityRemoved") != "YES":
        say("PatientIdentityRemoved is not YES")
    codes = [i.get("CodeValue") for i in got.get("DeidentificationMethodCodeSequence", [])]
    if "113100" not in codes:
        say(f"DeidentificationMethodCodeSequence {codes} lacks 113100")
    if not str(got.get("PatientID", "")).startswith("BL-"):
        say(f"PatientID {got.get('PatientID')!r} is not a pseudonym")
    # plant.py's sequences (written as UN in explicit VR files) were read and cleaned, not
    # dropped: their references follow the instance's new UIDs.
    for keyword, target in (
        ("ReferencedImageSequence", got.SOPInstanceUID),
        ("SourceImageSequence", got.SeriesInstanceUID),
    ):
        seq = got.get(keyword)
        if not isinstance(seq, pydicom.sequence.Sequence):
            say(f"{keyword} missing or not a sequence")
            continue
        refs = [str(i.get("ReferencedSOPInstanceUID", "")) for i in seq]
        if str(target) not in refs:
            say(f"{keyword} references {refs}, not the new {target}")
    for elem in got.iterall():
        tag = int(elem.tag)
        where = f"{elem.tag} {elem.keyword or ''}"
        if elem.tag.is_private:
            say(f"private element {where}")
        if elem.VR == "UN":
            say(f"element left as UN {where}")
        if not listed(tag) or elem.VR == "SQ" or tag == 0x00100020:
            continue
        for v in values(elem):
            v = v.strip()
            if elem.VR == "UI":
                if v and not v.startswith("2.25.") and not defined_uid(v):
                    say(f"{where}: UID {v} not replaced")
            elif v not in DUMMIES:
                say(f"{where}: identifying value {v!r} left")
    # The source's identifying values and UIDs, anywhere in the bytes.
    needles = set(PLANTED)
    sources = [planted.file_meta, planted]
    for ds in sources:
        for elem in ds.iterall():
            if elem.VR == "SQ" or elem.tag.is_private:
                continue
            for v in values(elem):
                v = v.strip().strip("\0")
                if elem.VR == "UI" and len(v) >= 8 and not defined_uid(v):
                    needles.add(v.encode())
                elif elem.VR != "UI" and listed(int(elem.tag)) and distinctive(v):
                    needles.add(v.encode("latin-1", "ignore"))
    for n in sorted(needles):
        if n and n in raw:
            say(f"source value {n!r} still in the bytes")


def main(table_rs, planted_dir, delivered, same_syntax):
    listed = table(table_rs)
    by_number = {}
    for n in sorted(x for x in os.listdir(planted_dir) if x.endswith(".dcm")):
        ds = pydicom.dcmread(os.path.join(planted_dir, n))
        by_number[int(ds.InstanceNumber)] = ds
    problems = []
    seen = set()
    for path in delivered:
        got = pydicom.dcmread(path, stop_before_pixels=True)
        number = int(got.get("InstanceNumber", -1))
        if number not in by_number:
            problems.append(f"{path}: InstanceNumber {number} matches no planted file")
            continue
        seen.add(number)
        check(listed, by_number[number], path, problems, same_syntax)
    for p in problems:
        print(p)
    print(f"checked {len(seen)} files, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    args = sys.argv[1:]
    same = "--any-transfer-syntax" not in args
    args = [a for a in args if a != "--any-transfer-syntax"]
    if len(args) < 3:
        sys.exit(__doc__)
    # Read UN as written: an element left as UN is a finding, not to be resolved here.
    pydicom.config.replace_un_with_known_vr = False
    main(args[0], args[1], args[2:], same)
