"""Real-world DICOM a node meets in its first week, against the real Orthanc and dcmtk.

Each test sends files built from real ones by changing the attribute in question:
Type 2 patient and study attributes removed (anonymised exports), an empty Study,
Series or SOP Instance UID, and (see tests/test_io.py) a window the header cannot
use. The node must report what it can, refuse what no PACS could file, and keep
serving.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.fastpath import AVAILABLE as FAST_PATH_AVAILABLE
from medclass.checkpoint import read_card
from medclass.sr import TYPE2_PATIENT_AND_STUDY, build_classification_sr, read_classification_sr

from .conftest import (
    HOST,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    needs_orthanc,
    storescu,
    study_state,
    wait_until,
)

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")


@pytest.fixture(scope="module")
def card(checkpoint):
    return read_card(checkpoint)


def _rewrite(paths: list[Path], out: Path, change) -> list[Path]:
    """The files as a new study (new UIDs, same transfer syntax), each header changed by ``change``."""
    out.mkdir(parents=True, exist_ok=True)
    study, series, res = pydicom.uid.generate_uid(), {}, []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), pydicom.uid.generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        change(ds)
        q = out / Path(p).name
        ds.save_as(q)
        res.append(q)
    return res


def _drop_type2(ds: pydicom.Dataset) -> None:
    for keyword in TYPE2_PATIENT_AND_STUDY:
        if keyword in ds:
            delattr(ds, keyword)


def _unusable_type2(ds: pydicom.Dataset) -> None:
    # Values highdicom refuses: not M/F/O, dates and times not in DICOM's DA/TM form.
    ds.PatientSex, ds.StudyDate, ds.PatientBirthDate, ds.StudyTime = "Male", "2023-01-01", "1970/01/01", "noon"


def _dciodvfy_errors(path: Path) -> list[str]:
    v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]


# --------------------------------------------------------------------------- Type 2 attributes


@needs_dciodvfy
@pytest.mark.parametrize("change, empty", [
    (_drop_type2, TYPE2_PATIENT_AND_STUDY),
    (_unusable_type2, ("PatientSex", "StudyDate", "PatientBirthDate", "StudyTime")),
], ids=["type-2-attributes-absent", "type-2-values-unusable"])
def test_sr_of_an_image_without_usable_type2_attributes_is_valid(card, tmp_path, change, empty):
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    change(src)
    before = src.to_json_dict()

    sr = build_classification_sr([src], card, {"normal": 0.3, "pneumonia": 0.7}, "pneumonia")

    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    for keyword in TYPE2_PATIENT_AND_STUDY:
        assert keyword in back, keyword  # Type 2: present, empty when the source had nothing usable
        if keyword in empty:
            assert back[keyword].value in (None, ""), keyword
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert read_classification_sr(back)["probabilities"] == pytest.approx({"normal": 0.3, "pneumonia": 0.7})
    assert src.to_json_dict() == before  # the caller's header is not changed


@needs_dcmtk
@needs_orthanc
def test_a_study_without_type2_attributes_gets_its_sr_in_orthanc(node_factory, orthanc_factory, ct_study, tmp_path,
                                                                capsys):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]})
    node = node_factory(port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}")
    study = _rewrite(ct_study, tmp_path / "anonymised", _drop_type2)
    study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    assert all(k not in pydicom.dcmread(p, stop_before_pixels=True) for p in study for k in TYPE2_PATIENT_AND_STUDY)

    r = storescu(node.port, study)
    assert r.returncode == 0, r.stderr

    srs = wait_until(lambda: pacs.datasets("SR"), 90, 0.5, "the SR of the study without Type 2 attributes")
    assert len(srs) == 1 and srs[0].StudyInstanceUID == study_uid
    assert srs[0].PatientID == "" and srs[0].AccessionNumber == ""
    assert study_state(node, study_uid) == "classified"
    result = json.loads(node.db.query("SELECT result FROM studies WHERE study_uid=?", (study_uid,))[0]["result"])[0]
    assert read_classification_sr(srs[0])["probabilities"] == pytest.approx(result["probabilities"])
    assert node.db.query("SELECT COUNT(*) AS n FROM quarantine")[0]["n"] == 0


# --------------------------------------------------------------------------- empty UIDs


def _echo(port: int) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="MEDCLASS")
    assert assoc.is_established
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


@needs_dcmtk
@pytest.mark.parametrize("event_reactors", [
    pytest.param(True, marks=pytest.mark.skipif(not FAST_PATH_AVAILABLE, reason="the fast path needs the "
                                                "pinned pynetdicom")),
    False,
], ids=["fast-path", "pynetdicom-path"])
def test_empty_uids_are_refused_at_c_store_and_the_node_keeps_serving(node_factory, tmp_path, monkeypatch,
                                                                      event_reactors):
    node = node_factory(scp_processes=1, stable_seconds=0.5, fast_path=event_reactors)
    handler = node.scp.server.RequestHandlerClass.__name__
    assert (handler == "EventRequestHandler") == event_reactors
    src = [Path(get_testdata_file("CT_small.dcm"))]
    empty_study = _rewrite(src, tmp_path / "study", lambda d: setattr(d, "StudyInstanceUID", ""))
    empty_series = _rewrite(src, tmp_path / "series", lambda d: setattr(d, "SeriesInstanceUID", ""))
    good = _rewrite(src, tmp_path / "good", lambda d: None)

    for path, what in ((empty_study, "Study"), (empty_series, "Series")):
        r = subprocess.run(["storescu", "-v", "-aet", "STORESCU", "-aec", "MEDCLASS", HOST, str(node.port),
                            str(path[0])], capture_output=True, text=True, env=dcmtk_env())
        output = r.stdout + r.stderr
        # dcmtk shows the failure status the node answered
        assert "Error: CannotUnderstand" in output, output
        reasons = [q["reason"] for q in node.db.query("SELECT reason FROM quarantine ORDER BY id")]
        assert f"empty {what} Instance UID" in reasons[-1]

    assert _echo(node.port) == 0
    assert storescu(node.port, good).returncode == 0
    good_uid = str(pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID)
    wait_until(lambda: study_state(node, good_uid) == "classified", 60, what="the good study to be classified")
    # Nothing of the refused instances was spooled or classified.
    assert [r["study_uid"] for r in node.db.query("SELECT study_uid FROM studies")] == [good_uid]
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    assert node.metrics.rejected.labels("empty_uid")._value.get() == 2


def test_an_empty_sop_instance_uid_in_the_data_set_is_refused(node_factory):
    # pynetdicom's send_c_store (and dcmtk's storescu) will not send a data set without its
    # SOP Instance UID, so the request is sent below that API, naming a UID the data set lacks.
    import time
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage

    node = node_factory(scp_processes=1)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, pydicom.uid.generate_uid()
        req.DataSet = BytesIO(encode(ds, is_implicit_vr=False, is_little_endian=True))
        assoc._reactor_checkpoint.clear()  # pause the reactor, as send_c_store() does
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
    assert rsp.Status == 0xC210
    assert "empty SOP Instance UID" in node.db.query("SELECT reason FROM quarantine")[0]["reason"]
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
