"""The SCP's fast paths against pydicom and pynetdicom: the Part 10 header it writes before the
received bytes, and the few elements it reads from them."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

from dicom_node.fastpath.header import header_asks_urgent, part10_header, scan_header
from dicom_node.scp import file_meta_bytes, read_header


def test_part10_header_is_what_pynetdicom_writes():
    sop_class, sop_uid = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1"  # an odd-length UID
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=ExplicitVRLittleEndian))
    assert part10_header(sop_class, sop_uid, str(ExplicitVRLittleEndian)) == expected
    # The path without fast_path writes the same bytes with pydicom.
    for ae in (None, "STORESCU", "ODD"):
        assert file_meta_bytes(sop_class, sop_uid, str(ExplicitVRLittleEndian), ae) == \
            part10_header(sop_class, sop_uid, str(ExplicitVRLittleEndian), ae)


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


def _dataset_bytes(path: str) -> tuple[bytes, pydicom.uid.UID] | None:
    """The data set's bytes as a C-STORE would carry them (after the File Meta Information)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False)
    except Exception:
        return None
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or "StudyInstanceUID" not in ds or ts.is_deflated:
        return None
    with open(path, "rb") as f:
        data = f.read()
    start = data.find(b"DICM")
    if start != 128:
        return None
    pos = 132
    # Skip group 0002 (explicit VR little endian, always).
    while data[pos:pos + 2] == b"\x02\x00":
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            pos += 12 + int.from_bytes(data[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6:pos + 8], "little")
    return data[pos:], ts


def _installed_test_files() -> list[str]:
    """pydicom's own test files and pydicom-data's, from disk (``get_testdata_files('*.dcm')``
    would also try to download the ones not installed)."""
    from pydicom.data import data_manager

    roots = [Path(data_manager.DATA_ROOT) / "test_files"]
    roots += [Path(src.data_path) for src in data_manager.external_data_sources().values()]
    return sorted(str(p) for root in roots for p in root.rglob("*.dcm"))


def test_scan_header_agrees_with_pydicom_on_every_real_file_it_reads():
    scanned = 0
    files = _installed_test_files()
    assert len(files) > 100, "pydicom's and pydicom-data's test files are installed"
    for path in files:
        item = _dataset_bytes(path)
        if item is None:
            continue
        raw, ts = item
        fast = scan_header(raw, ts.is_implicit_VR, ts.is_little_endian)
        try:
            h = read_header(raw, ts.is_implicit_VR, ts.is_little_endian)
            expected = (str(h.StudyInstanceUID), str(h.SeriesInstanceUID), str(h.SOPInstanceUID),
                        str(h.get("Modality", "") or ""),
                        any(t in h for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
                        header_asks_urgent(h))
        except Exception:
            expected = None
        if fast is not None:  # whatever the scan reads, it reads as pydicom does
            assert fast == expected, path
            scanned += 1
        elif ts.is_little_endian and expected is not None:
            # Only unusual data sets are left to pydicom: none of the ordinary modality images.
            assert not any(name in path for name in ("CT_small", "MR_small", "JPEG2000", "emri_small")), path
    assert scanned > 50


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
@pytest.mark.parametrize("where,value,urgent", [
    (None, None, False), ("top", "STAT", True), ("top", "high ", True), ("top", "ROUTINE", False),
    ("request", "STAT", True), ("request", "LOW", False), ("second_request", "HIGH", True),
])
def test_scan_header_reads_the_requested_priority_as_pydicom_does(syntax, where, value, urgent):
    """STAT/HIGH in Requested Procedure Priority, at the top level or in any Request Attributes
    Sequence item (defined or undefined length), makes the study urgent; the scan agrees with pydicom."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if where == "top":
        ds.RequestedProcedurePriority = value
    elif where is not None:
        items = [pydicom.Dataset(), pydicom.Dataset()]
        items[0].RequestedProcedureID = "RP1"
        items[0 if where == "request" else 1].RequestedProcedurePriority = value
        items[1].ScheduledProcedureStepID = "SPS2"
        ds.RequestAttributesSequence = items
    for undefined in (False, True):
        if where not in (None, "top"):
            ds.RequestAttributesSequence.is_undefined_length = undefined
            for item in ds.RequestAttributesSequence:
                item.is_undefined_length_sequence_item = undefined
        raw = encode(ds, syntax == ImplicitVRLittleEndian, True)
        fast = scan_header(raw, syntax == ImplicitVRLittleEndian, True)
        assert fast is not None and fast[5] is urgent
        assert header_asks_urgent(read_header(raw, syntax == ImplicitVRLittleEndian, True)) is urgent
        assert fast[:5] == scan_header(encode(pydicom.dcmread(get_testdata_file("CT_small.dcm")),
                                              syntax == ImplicitVRLittleEndian, True), syntax == ImplicitVRLittleEndian,
                                       True)[:5]


@pytest.mark.parametrize("damage", ["random", "truncated_header", "truncated_pixels", "no_uid"])
def test_scan_header_leaves_damaged_data_to_pydicom(damage):
    import os

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if damage == "no_uid":
        del ds.StudyInstanceUID
    raw = encode(ds, False, True)
    raw = {"random": os.urandom(len(raw)), "truncated_header": raw[:300],
           "truncated_pixels": raw[:raw.find(b"\xe0\x7f\x10\x00") + 500], "no_uid": raw}[damage]
    assert scan_header(raw, False, True) is None


@pytest.mark.parametrize("sop_class,sop_uid,message_id,status", [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", 7, 0x0000),  # odd-length instance UID
    ("1.2.840.10008.5.1.4.1.1.1", "1.2.3.4.56", 65535, 0xC210),
    ("1.2.840.10008.5.1.4.1.1.12.1", "1.2", 1, 0xA700),  # odd-length class UID
])
def test_fast_store_response_is_what_pynetdicom_encodes(sop_class, sop_uid, message_id, status):
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node.fastpath.reactor import store_response_pdv

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 16384))
    assert store_response_pdv(message_id, sop_class, sop_uid, status) == pdata.presentation_data_value_list[0][1]


def test_the_fast_path_refuses_to_start_on_another_pynetdicom(monkeypatch, tmp_path):
    # What an upgrade of pynetdicom would do: the node stops at start instead of silently moving to
    # a path its tests did not run; fast_path = false starts on pynetdicom's own loops.
    import pynetdicom

    from dicom_node.config import NodeConfig
    from dicom_node.scp import StorageSCP
    from dicom_node.spool import JobDatabase, Spool
    from medclass.errors import MedClassError

    spool = Spool(tmp_path, JobDatabase(tmp_path / "node.db"))
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(MedClassError, match=r"fast_path needs pynetdicom 3\.0\.4.*this is pynetdicom 3\.1\.0.*"
                       "fast_path = false"):
        StorageSCP(NodeConfig(fast_path=True), spool)
    assert StorageSCP(NodeConfig(fast_path=False), spool).fast is False
    spool.close()
