"""The classification SR (medclass.sr): built from real files, read back, validated by dcmtk and dicom3tools."""

from __future__ import annotations

import io
import shutil
import subprocess

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medclass.checkpoint import read_card
from medclass.sr import PRIVATE_SCHEME, build_classification_sr, read_classification_sr


@pytest.fixture(scope="module")
def card(checkpoint):
    return read_card(checkpoint)


def _roundtrip(sr) -> pydicom.Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, sr, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_sr_roundtrip_from_a_real_ct(card, tmp_path):
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    probs = {"normal": 0.25, "pneumonia": 0.75}
    sr = build_classification_sr([src], card, probs, "pneumonia", device_name="MEDCLASS")
    back = _roundtrip(sr)

    assert back.StudyInstanceUID == src.StudyInstanceUID  # same study
    assert back.SeriesInstanceUID != src.SeriesInstanceUID  # new series
    assert back.PatientID == src.PatientID and back.PatientName == src.PatientName
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.Manufacturer == "SlicerMedClass"
    parsed = hd.sr.Comprehensive3DSR.from_dataset(back)
    assert isinstance(parsed.content, hd.sr.MeasurementReport)
    values = read_classification_sr(back)
    assert values["probabilities"] == pytest.approx(probs)
    assert values["findings"] == [("SCT", "233604007", "Pneumonia")]  # from the card's class_codes
    assert values["algorithm"] == ("resnet18", card["medclass_version"])
    group = parsed.content.get_image_measurement_groups()[0]
    assert [i.referenced_sop_instance_uid for i in group.source_images] == [src.SOPInstanceUID]


def test_sr_private_code_and_multilabel(card):
    card = {**card, "class_codes": {}}
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    sr = build_classification_sr([src], card, {"normal": 0.6, "pneumonia": 0.4}, ["normal", "pneumonia"])
    values = read_classification_sr(_roundtrip(sr))
    assert [f[0] for f in values["findings"]] == [PRIVATE_SCHEME, PRIVATE_SCHEME]
    assert [f[2] for f in values["findings"]] == ["normal", "pneumonia"]


def test_sr_rejects_bad_input(card):
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    with pytest.raises(ValueError, match="at least one source image"):
        build_classification_sr([], card, {"normal": 1.0}, "normal")
    with pytest.raises(ValueError, match="not in the model card"):
        build_classification_sr([src], card, {"tumour": 1.0}, "tumour")


@pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None,
                    reason="dicom3tools / dcmtk not installed")
def test_sr_passes_dciodvfy_and_dsrdump(card, tmp_path, mammogram_paths):
    srcs = [pydicom.dcmread(p, stop_before_pixels=True) for p in mammogram_paths[:1]]
    sr = build_classification_sr(srcs, card, {"normal": 0.1, "pneumonia": 0.9}, "pneumonia")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    d = subprocess.run(["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stderr
    assert "TID 1500" in d.stdout and "TID 1501" in d.stdout
    assert "Probability of pneumonia" in d.stdout


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_sr_of_a_large_series_names_every_image_and_passes_dciodvfy(card, tmp_path):
    """Above IMAGE_LIBRARY_MAX_IMAGES the image library's descriptors are left out (they made a 256-slice
    report take 24 s to build); the source references and the evidence still name every image."""
    from medclass.sr import IMAGE_LIBRARY_MAX_IMAGES

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    srcs = []
    for i in range(IMAGE_LIBRARY_MAX_IMAGES + 8):
        ds = pydicom.Dataset(base)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        srcs.append(ds)
    sr = build_classification_sr(srcs, card, {"normal": 0.3, "pneumonia": 0.7}, "pneumonia")
    back = _roundtrip(sr)
    evidence = {i.ReferencedSOPInstanceUID for s in back.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == {ds.SOPInstanceUID for ds in srcs}
    group = hd.sr.Comprehensive3DSR.from_dataset(back).content.get_image_measurement_groups()[0]
    assert [i.referenced_sop_instance_uid for i in group.source_images] == [ds.SOPInstanceUID for ds in srcs]
    assert read_classification_sr(back)["probabilities"] == pytest.approx({"normal": 0.3, "pneumonia": 0.7})
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    assert [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")] == []


def _series_of(base: pydicom.Dataset, n: int, series: int) -> list[pydicom.Dataset]:
    """``n`` headers of ``base`` in ``series`` series (interleaved), each with its own SOP Instance UID."""
    uids = [pydicom.uid.generate_uid() for _ in range(series)]
    out = []
    for i in range(n):
        ds = pydicom.Dataset(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uids[i % series], pydicom.uid.generate_uid(), i + 1
        out.append(ds)
    return out


def _comparable(sr) -> pydicom.Dataset:
    """The report as written and read back, with what differs between two builds of the same result fixed:
    creation dates and times, and the tracking UID (highdicom makes a new one per build)."""
    back = _roundtrip(sr)
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"):
        setattr(back, keyword, "")
    for item in back.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20000101"

    def walk(items):
        for item in items:
            if item.get("ValueType") == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "112040":
                item.UID = "1.2.3"  # Tracking Unique Identifier
            walk(item.get("ContentSequence", []))

    walk(back.ContentSequence)
    return back


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("n, series, charset", [(40, 2, None), (3, 1, "ISO_IR 192")])
def test_encoded_references_equal_highdicoms(card, n, series, charset, monkeypatch):
    """A report whose references are added encoded (the default above IMAGE_LIBRARY_MAX_IMAGES) holds, byte for
    byte, what highdicom builds for the same images: same codes, same references, same evidence; also for a
    small study (both without the image library), several series, an instance named twice, and text in UTF-8."""
    import medclass.sr as sr_module

    monkeypatch.setattr(sr_module, "IMAGE_LIBRARY_MAX_IMAGES", 2)  # the small study too: no image library
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    srcs = _series_of(base, n, series)
    srcs.append(srcs[1])  # named twice: twice in the group, once in the evidence (as highdicom does)
    if charset:
        srcs[0] = pydicom.Dataset(srcs[0])
        srcs[0].SpecificCharacterSet = charset
        card = {**card, "class_codes": {}, "task": {**card["task"], "classes": ["normal", "Lungenödem"]}}
    probs = dict(zip(card["task"]["classes"], (0.3, 0.7)))
    kw = dict(series_instance_uid="1.2.826.0.1.3680043.10.511.9.1", sop_instance_uid="1.2.826.0.1.3680043.10.511.9.2",
              operating_points=None, prediction_set=list(card["task"]["classes"]), coverage=0.9)
    encoded = build_classification_sr(srcs, card, probs, card["task"]["classes"][1], encode_references=True, **kw)
    built = build_classification_sr(srcs, card, probs, card["task"]["classes"][1], encode_references=False, **kw)
    a, b = _comparable(encoded), _comparable(built)
    assert a == b
    assert _bytes(a) == _bytes(b)
    refs = [i.referenced_sop_instance_uid for i in encoded.content.get_image_measurement_groups()[0].source_images]
    assert refs == [ds.SOPInstanceUID for ds in srcs]  # the built object's own content, not only its bytes
    # Read in memory (raw elements parsed in the report's character set) and after a write, as the node does.
    assert read_classification_sr(encoded) == read_classification_sr(built)
    assert read_classification_sr(_roundtrip(encoded)) == read_classification_sr(_roundtrip(built))


def test_encoded_references_fall_back_to_highdicom(card, monkeypatch):
    """Should pydicom or highdicom one day encode a reference otherwise, the encoded first reference no longer
    matches and highdicom builds them all, with a warning: the report stays right, only slower."""
    import medclass.sr as sr_module

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    srcs = _series_of(base, 40, 1)
    monkeypatch.setattr(sr_module, "_CONCEPT_ITEM", sr_module._item(b""))
    with pytest.warns(RuntimeWarning, match="highdicom builds them"):
        sr = build_classification_sr(srcs, card, {"normal": 0.3, "pneumonia": 0.7}, "pneumonia")
    back = _roundtrip(sr)
    group = hd.sr.Comprehensive3DSR.from_dataset(back).content.get_image_measurement_groups()[0]
    assert [i.referenced_sop_instance_uid for i in group.source_images] == [ds.SOPInstanceUID for ds in srcs]
