"""The DICOM node against real peers: dcmtk's echoscu/storescu and a real Orthanc PACS."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import urllib.request

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import BasicTextSRStorage, CTImageStorage, Verification

from dicom_node.cli import main as node_main
from medclass.sr import read_classification_sr

from .conftest import (
    HOST,
    copy_study,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    needs_orthanc,
    storescu,
    study_state,
    wait_until,
)


@needs_dcmtk
def test_echoscu(node_factory):
    node = node_factory()
    r = subprocess.run(["echoscu", "-aec", "MEDCLASS", HOST, str(node.port)], capture_output=True, text=True,
                       timeout=60, env=dcmtk_env())
    assert r.returncode == 0, r.stderr


@pytest.mark.both_paths
@needs_dcmtk
@needs_orthanc
def test_storescu_study_is_spooled_classified_and_sr_arrives_in_orthanc(node_factory, orthanc_factory, ct_study,
                                                                      tmp_path):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]})
    node = node_factory(port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}", metrics_port=-1)
    study_uid = str(pydicom.dcmread(ct_study[0], stop_before_pixels=True).StudyInstanceUID)
    tss = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in ct_study}
    assert len(tss) >= 2  # at least one compressed transfer syntax

    r = storescu(node.port, ct_study)
    assert r.returncode == 0, r.stderr
    # Acknowledged means durable: on disk and recorded, as received (transfer syntax kept).
    rows = node.db.query("SELECT * FROM instances WHERE study_uid=?", (study_uid,))
    assert len(rows) == 4
    for row in rows:
        ds = pydicom.dcmread(row["path"], stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == row["sop_uid"]
    assert {str(pydicom.dcmread(r["path"], stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for r in rows} == tss

    wait_until(lambda: study_state(node, study_uid) == "classified", 60, what="the study to be classified")
    srs = wait_until(lambda: pacs.datasets("SR"), 60, 0.5, "the SR in Orthanc")
    assert len(srs) == 1
    sr = srs[0]
    assert sr.StudyInstanceUID == study_uid
    values = read_classification_sr(sr)
    result = json.loads(node.db.query("SELECT result FROM studies WHERE study_uid=?", (study_uid,))[0]["result"])[0]
    assert result["images"] == 4
    assert values["probabilities"] == pytest.approx(result["probabilities"])
    assert values["algorithm"][0] == "resnet18"
    assert values["verification"] == "UNVERIFIED"
    assert len(values["findings"]) == 1 and values["findings"][0][0] == "SCT"

    # metrics and status: the sender counts the SR once it has released the association, which may be
    # after Orthanc shows the SR, so wait for the outbox row first
    wait_until(lambda: node.db.query("SELECT state FROM outbox")[0]["state"] == "sent", 10, what="outbox marked sent")
    with urllib.request.urlopen(f"http://{HOST}:{node.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'medclass_node_instances_received_total{modality="CT"} 4.0' in text
    assert 'medclass_node_sent_total{kind="sr"} 1.0' in text


@needs_orthanc
def test_orthanc_pushes_a_mammogram_study_to_the_node(node_factory, orthanc_factory, mammogram_paths, tmp_path,
                                                      capsys):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]})
    node = node_factory(port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}")
    up = pacs.upload(mammogram_paths[0])
    study_id = up["ParentStudy"]
    job = pacs.post("/modalities/medclass/store", {"Resources": [study_id], "Synchronous": True})
    assert job is not None
    srs = wait_until(lambda: pacs.datasets("SR"), 240, 0.5, "the SR of the pushed study")
    assert len(srs) == 1
    mg = pydicom.dcmread(mammogram_paths[0], stop_before_pixels=True)
    assert srs[0].StudyInstanceUID == mg.StudyInstanceUID
    assert srs[0].PatientID == mg.PatientID
    # Orthanc holds the SR a moment before the node has its C-STORE answer and marks the item sent.
    wait_until(lambda: node.db.query("SELECT state FROM outbox")[0]["state"] == "sent", 10, what="outbox marked sent")

    assert node_main(["status", "--data-dir", node.config.data_dir]) == 0
    out = capsys.readouterr().out
    assert "classified" in out and "yes" in out


def _send(port: int, ds_or_path, context, aet: str = "TESTSCU"):
    ae = AE(ae_title=aet)
    ae.add_requested_context(context)
    assoc = ae.associate(HOST, port, ae_title="MEDCLASS")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds_or_path)
        return status.Status
    finally:
        assoc.release()


def _send_raw(port: int, sop_class, payload: bytes) -> int:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, pydicom.uid.ImplicitVRLittleEndian)
    assoc = ae.associate(HOST, port, ae_title="MEDCLASS")
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, pydicom.uid.generate_uid()
        req.DataSet = BytesIO(payload)
        cx = assoc.accepted_contexts[0]
        assoc._reactor_checkpoint.clear()  # pause the reactor, as send_c_store() does
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        return rsp.Status
    finally:
        assoc.release()


@pytest.mark.both_paths
def test_bad_input_is_refused_and_quarantined_and_the_node_keeps_serving(node_factory, tmp_path):
    node = node_factory()
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))

    # an image without pixel data
    no_pixels = copy.deepcopy(ct)
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = pydicom.uid.generate_uid()
    assert _send(node.port, no_pixels, CTImageStorage) == 0xC210

    # random bytes as the data set of a C-STORE request (sent below the pynetdicom API,
    # which refuses to send what it cannot parse)
    assert _send_raw(node.port, CTImageStorage, os.urandom(4096)) == 0xC210

    # a non-image object: a logged skip (success, so a PACS's push does not fail), kept in quarantine
    sr = pydicom.Dataset()
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = pydicom.uid.generate_uid()
    sr.StudyInstanceUID = ct.StudyInstanceUID
    sr.SeriesInstanceUID = pydicom.uid.generate_uid()
    sr.Modality = "SR"
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    assert _send(node.port, sr, BasicTextSRStorage) == 0x0000

    reasons = [r["reason"] for r in node.db.query("SELECT reason FROM quarantine ORDER BY id")]
    assert len(reasons) == 3
    assert "without Pixel Data" in reasons[0]
    assert "cannot parse" in reasons[1]
    assert "not an image" in reasons[2]
    for r in node.db.query("SELECT path FROM quarantine"):
        assert os.path.exists(r["path"])
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0

    # still serving: echo and a good image
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    assert _send(node.port, ct, CTImageStorage) == 0x0000


def test_undecodable_pixels_are_quarantined_by_the_worker(node_factory):
    node = node_factory()
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    good, bad = copy.deepcopy(ct), copy.deepcopy(ct)
    for d in (good, bad):
        d.SOPInstanceUID = pydicom.uid.generate_uid()
    bad.PixelData = bad.PixelData[:100]  # truncated pixel data: accepted on the wire, fails to decode
    assert _send(node.port, good, CTImageStorage) == 0
    assert _send(node.port, bad, CTImageStorage) == 0
    wait_until(lambda: study_state(node, str(ct.StudyInstanceUID)) == "classified", 60, what="classification")
    result = json.loads(node.db.query("SELECT result FROM studies")[0]["result"])[0]
    assert result["images"] == 1
    assert node.db.query("SELECT COUNT(*) AS n FROM quarantine WHERE sop_uid=?", (bad.SOPInstanceUID,))[0]["n"] == 1


@needs_dcmtk
def test_unknown_calling_ae_is_rejected(node_factory):
    node = node_factory(allow=[{"ae_title": "GOODSCU", "host": HOST}])

    def echo(aet):
        return subprocess.run(["echoscu", "-aet", aet, "-aec", "MEDCLASS", HOST, str(node.port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())

    assert echo("BADSCU").returncode != 0
    assert echo("GOODSCU").returncode == 0


@pytest.mark.both_paths
@needs_dcmtk
@needs_orthanc
def test_pacs_down_sr_is_retried_until_it_arrives_exactly_once(node_factory, orthanc_factory, ct_study, tmp_path):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]}, start=False)
    node = node_factory(port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}")
    study = copy_study(ct_study[:2], tmp_path / "study")
    assert storescu(node.port, study).returncode == 0
    wait_until(lambda: (node.db.query("SELECT attempts FROM outbox") or [{"attempts": 0}])[0]["attempts"] >= 2, 60,
               what="two failed attempts")
    row = node.db.query("SELECT state, last_error FROM outbox")[0]
    assert row["state"] == "pending" and "refused or did not answer" in row["last_error"]

    pacs.start()
    srs = wait_until(lambda: pacs.datasets("SR"), 60, 0.5, "the SR after the PACS came back")
    wait_until(lambda: node.db.query("SELECT state FROM outbox")[0]["state"] == "sent", 20, what="outbox sent")
    time.sleep(2.5)  # longer than the largest retry delay: nothing more is sent
    assert len(pacs.datasets("SR")) == len(srs) == 1
    assert len(pacs.get("/instances")) == 1


@needs_dcmtk
@needs_orthanc
def test_kill_9_mid_study_loses_nothing_and_the_sr_arrives_once(node_process, orthanc_factory, checkpoint,
                                                               ct_study, tmp_path):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]})
    data = tmp_path / "data"
    args = ["--checkpoint", str(checkpoint), "--data-dir", str(data),
            "--return-to", f"ORTHANC@{HOST}:{pacs.dicom_port}", "--stable-seconds", "4", "--device", "cpu",
            "--classify-any-modality"]  # a chest X-ray model given CT
    study = copy_study(ct_study, tmp_path / "study")
    node = node_process(args, node_port).start()
    assert storescu(node_port, study[:2]).returncode == 0  # acknowledged ...
    node.kill9()  # ... then the node dies before the study is stable

    from dicom_node.spool import JobDatabase

    db = JobDatabase(data / "node.db")
    rows = db.query("SELECT path FROM instances")
    assert len(rows) == 2 and all(os.path.getsize(r["path"]) > 0 for r in rows)
    db.close()

    node = node_process(args, node_port).start()
    assert storescu(node_port, study[2:]).returncode == 0

    def reports_read():
        return [{**read_classification_sr(ds), "sop_uid": str(ds.SOPInstanceUID)} for ds in pacs.datasets("SR")]

    wait_until(lambda: any(r["complete"] for r in reports_read()), 90, 0.5, "a COMPLETE SR after the restart")
    time.sleep(1)
    reports = reports_read()
    study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    assert all(r["study_uid"] == study_uid for r in reports)
    # One current report. On a loaded machine the restarted node may find the study quiet before the
    # rest arrives: it then reports the two images as PARTIAL (it knows the study was interrupted),
    # and the complete report supersedes that one. Never two unlinked reports.
    complete = [r for r in reports if r["complete"]]
    partial = [r for r in reports if not r["complete"]]
    assert len(complete) == 1 and len(partial) <= 1
    assert set(complete[0]["predecessors"]) == {r["sop_uid"] for r in partial}
    db = JobDatabase(data / "node.db")
    assert db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 4
    assert json.loads(db.query("SELECT result FROM studies")[0]["result"])[0]["images"] == 4
    db.close()
