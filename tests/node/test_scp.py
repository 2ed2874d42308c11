"""The SCP's fast paths against pydicom and pynetdicom: the Part 10 header it writes before the
received bytes, and the few elements it reads from them."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

from dicom_node.scp import part10_header, read_header


def test_part10_header_is_what_pynetdicom_writes():
    sop_class, sop_uid = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1"  # an odd-length UID
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=ExplicitVRLittleEndian))
    assert part10_header(sop_class, sop_uid, str(ExplicitVRLittleEndian)) == expected


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_header_and_received_bytes_make_the_file_and_read_header_finds_the_uids(syntax):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
    header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, str(syntax), "STORESCU")
    back = pydicom.dcmread(io.BytesIO(header + raw))
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    if syntax.is_little_endian:  # pydicom writes the little endian pixel data of the file unswapped
        assert (back.pixel_array == ds.pixel_array).all()

    h = read_header(raw, syntax.is_implicit_VR, syntax.is_little_endian)
    assert (h.StudyInstanceUID, h.SeriesInstanceUID, h.SOPInstanceUID, h.Modality) == (
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, "CT")
    assert "PixelData" in h
    del ds.PixelData
    assert "PixelData" not in read_header(encode(ds, syntax.is_implicit_VR, syntax.is_little_endian),
                                          syntax.is_implicit_VR, syntax.is_little_endian)
