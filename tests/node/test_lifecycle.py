"""The study life cycle (dicom_node.jobs) and the exactly-once rules of the report, against a real
Orthanc and dcmtk: an unchanged resend gives no new SR, a grown study gets a superseding one, an
interrupted study is reported PARTIAL, and a report the PACS refuses goes to the dead letter until
``medclass node resend``."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE

from dicom_node.cli import main as node_main
from dicom_node.jobs import (
    SCHEMA_VERSION,
    IllegalTransition,
    JobDatabase,
    OutboxState,
    Priority,
    StudyState,
    sop_digest,
)
from dicom_node.worker import failure_reason
from medclass.errors import MedClassError
from medclass.sr import read_classification_sr

from .conftest import (
    HOST,
    copy_study,
    free_port,
    needs_dcmtk,
    needs_orthanc,
    storescu,
    study_state,
    wait_until,
)

# ---------------------------------------------------------------------------------------------- units


def _instance(sop: str, study: str = "1.2.3") -> tuple:
    return (sop, study, "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "CT", f"/spool/{sop}.dcm", 10, "SCU")


def test_urgent_studies_are_claimed_before_a_routine_backlog(tmp_path):
    """A study whose request asked for STAT/HIGH is taken before routine studies stable longer."""
    db = JobDatabase(tmp_path / "node.db")
    for k in range(3):
        db.record_instances([_instance(f"1.2.{k}.1", f"1.2.{k}")], now=100.0 + k)  # routine backlog
    db.record_instances([(*_instance("1.2.9.1", "1.2.9"), 1)], now=105.0)  # STAT, stable last
    db.record_instances([_instance("1.2.9.2", "1.2.9")], now=106.0)  # a later routine instance: still urgent
    stable = [db.mark_stable(cutoff=cutoff, now=200.0 + cutoff) for cutoff in (100.0, 101.0, 102.0, 106.0)]
    assert stable == [["1.2.0"], ["1.2.1"], ["1.2.2"], ["1.2.9"]]
    assert db.study("1.2.9")["asks_urgent"] == 1
    assert [db.claim_ready() for _ in range(5)] == ["1.2.9", "1.2.0", "1.2.1", "1.2.2", None]


def test_study_state_transitions_are_named_and_checked(tmp_path):
    with pytest.raises(IllegalTransition):
        StudyState.RECEIVING.check(StudyState.CLASSIFIED)
    with pytest.raises(IllegalTransition):
        StudyState.CLASSIFIED.check(StudyState.CLASSIFYING)
    StudyState.CLASSIFIED.check(StudyState.RECEIVING)  # a new instance reopens any study

    db = JobDatabase(tmp_path / "node.db")
    db.record_instances([_instance("1.2.3.4.1")], now=100.0)
    assert db.state("1.2.3") is StudyState.RECEIVING
    assert db.claim_ready() is None  # not stable yet
    assert db.mark_stable(cutoff=99.0, now=200.0) == []  # the instance came after the cutoff
    assert db.mark_stable(cutoff=100.0, now=200.0) == ["1.2.3"]
    assert db.claim_ready() == "1.2.3" and db.state("1.2.3") is StudyState.CLASSIFYING
    digest = sop_digest(["1.2.3.4.1"])
    report = dict(sop_uid="9.1", series_uid="9.2", sop_class="1.2.840.10008.5.1.4.1.1.88.34", model_key="m:x.pt",
                  complete=True, path=None)
    outbox = [dict(key="sr:9.1", kind="sr", destination="PACS@h:1", path="/o/9.1.dcm", priority=Priority.ROUTINE),
              dict(key="fw:1", kind="forward", destination="URG@h:2", path=None, priority=Priority.URGENT)]
    assert db.finish_classified("1.2.3", 1, [{"label": "a"}], digest, [report], outbox)
    assert db.state("1.2.3") is StudyState.CLASSIFIED and db.study("1.2.3")["digest"] == digest
    assert [o["kind"] for o in db.due(now=1e12)] == ["forward", "sr"]  # urgent first
    with pytest.raises(IllegalTransition):  # classified -> skipped only through a new classification
        db.finish_skipped("1.2.3", "x")
    assert db.previous_report("1.2.3", "m:x.pt", 2)["sop_uid"] == "9.1"
    assert db.previous_report("1.2.3", "m:x.pt", 1) is None

    # Reopened while classifying (a new instance): the finish is dropped, not an error.
    db.record_instances([_instance("1.2.3.4.2")], now=300.0)
    db.mark_stable(cutoff=300.0, now=301.0)
    assert db.claim_ready() == "1.2.3"
    db.record_instances([_instance("1.2.3.4.3")], now=302.0)
    assert db.finish_failed("1.2.3", "boom") is False
    assert db.state("1.2.3") is StudyState.RECEIVING
    # ... and quiet again (ready) before the classification ended, as under load: dropped too, and the
    # worker takes the study again, whole (this raised IllegalTransition in the worker's thread).
    db.mark_stable(cutoff=302.0, now=303.0)
    assert db.claim_ready() == "1.2.3"
    db.record_instances([_instance("1.2.3.4.4")], now=304.0)
    db.mark_stable(cutoff=304.0, now=305.0)
    assert db.state("1.2.3") is StudyState.READY
    assert db.finish_classified("1.2.3", 2, [{"label": "a"}], "d2") is False
    assert db.finish_failed("1.2.3", "boom") is False
    assert db.state("1.2.3") is StudyState.READY and db.claim_ready() == "1.2.3"
    assert db.finish_classified("1.2.3", 2, [{"label": "a"}], "d2")

    # Dead letter and resend, with no node running.
    item = db.due(now=1e12)[0]
    db.mark_dead(item["id"], 1, "refused", 5.0)
    assert db.outbox_count(OutboxState.DEAD) == 1 and len(db.due(now=1e12)) == 1
    assert db.resend_dead("another.study") == 0
    assert db.resend_dead("1.2.3") == 1
    assert db.outbox_count(OutboxState.DEAD) == 0 and len(db.due(now=1e12)) == 2
    db.close()


_VERSION_0 = """
CREATE TABLE instances (sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, sop_class TEXT,
    modality TEXT, path TEXT NOT NULL, size INTEGER, calling_ae TEXT, received REAL NOT NULL, skipped TEXT);
CREATE TABLE studies (study_uid TEXT PRIMARY KEY, first_received REAL NOT NULL, last_received REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'receiving',
    revision INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT, classified REAL, stable REAL);
CREATE TABLE quarantine (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, reason TEXT NOT NULL,
    calling_ae TEXT, sop_uid TEXT, study_uid TEXT, at REAL NOT NULL);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE NOT NULL, study_uid TEXT NOT NULL,
    kind TEXT NOT NULL, destination TEXT NOT NULL, path TEXT, priority INTEGER NOT NULL DEFAULT 2,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT, created REAL NOT NULL, sent REAL);
INSERT INTO studies (study_uid, first_received, last_received, n_instances, state, revision)
    VALUES ('1.2.3', 1, 1, 1, 'classified', 1);
INSERT INTO outbox (key, study_uid, kind, destination, priority, state, created) VALUES
    ('a', '1.2.3', 'forward', 'U@h:1', 1, 'pending', 1), ('b', '1.2.3', 'sr', 'P@h:1', 0, 'pending', 1),
    ('c', '1.2.3', 'forward', 'L@h:1', 2, 'failed', 1);
"""


def test_a_node_db_of_the_previous_layout_is_migrated_in_place(tmp_path):
    c = sqlite3.connect(tmp_path / "node.db")
    c.executescript(_VERSION_0)
    c.close()
    db = JobDatabase(tmp_path / "node.db")
    assert db.query("PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert {r["key"]: (r["urgency"], r["state"]) for r in db.query("SELECT * FROM outbox")} == {
        "a": ("urgent", "pending"), "b": ("routine", "pending"), "c": ("low", "dead")}
    assert [o["key"] for o in db.due(now=10)] == ["a", "b"]
    assert db.study("1.2.3")["interrupted"] == 0 and db.study("1.2.3")["digest"] is None
    db.record_instances([_instance("1.2.3.4.1")], now=5.0)  # the node goes on with it
    assert db.state("1.2.3") is StudyState.RECEIVING
    db.close()
    assert JobDatabase(tmp_path / "node.db").migrate() == SCHEMA_VERSION  # a second open changes nothing


def test_a_node_upgraded_in_place_starts_and_serves(node_factory, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    c = sqlite3.connect(data / "node.db")
    c.executescript(_VERSION_0)
    c.close()
    node = node_factory(data_dir=str(data))
    assert node.db.state("1.2.3") is StudyState.CLASSIFIED
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS")
    assert assoc.is_established and assoc.send_c_store(ds).Status == 0
    assoc.release()
    wait_until(lambda: study_state(node, str(ds.StudyInstanceUID)) == "classified", 60, what="a new study classified")


def test_a_failure_is_one_line_with_a_remedy():
    line = failure_reason(MedClassError("the image is too small", "send the original"), "1.2.3")
    assert line.startswith("the image is too small; send the original; then 'medclass node resend 1.2.3'")
    line = failure_reason(AttributeError("'FileDataset' object has no attribute 'PatientID'\nmore"), "1.2.3")
    assert "\n" not in line and "AttributeError" in line and "medclass node resend 1.2.3" in line and "-v" in line


# ---------------------------------------------------------------------------------------------- real peers


def _dsr(path) -> str:
    d = subprocess.run(["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stderr
    return d.stdout


def _dciodvfy_errors(path) -> list[str]:
    v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]


@needs_dcmtk
@needs_orthanc
@pytest.mark.both_paths
@needs_dcmtk
def test_a_stat_study_is_classified_before_the_routine_backlog(node_factory, tmp_path):
    """Three routine studies then one whose header asks for STAT, in one association: the node takes
    the STAT study before the routine studies that became stable before it."""
    node = node_factory(stable_seconds=3.0)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    files, uids = [], []
    for k in range(4):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        if k == 3:
            item = pydicom.Dataset()
            item.RequestedProcedureID, item.RequestedProcedurePriority = "RP1", "STAT"
            ds.RequestAttributesSequence = [item]
        ds.save_as(tmp_path / f"s{k}.dcm", enforce_file_format=True)
        files.append(tmp_path / f"s{k}.dcm")
        uids.append(str(ds.StudyInstanceUID))
    assert src.StudyInstanceUID not in uids
    assert storescu(node.port, files).returncode == 0
    done = wait_until(lambda: all(study_state(node, u) == "classified" for u in uids) and
                      [node.db.study(u) for u in uids], 120, what="four studies classified")
    assert [s["asks_urgent"] for s in done] == [0, 0, 0, 1]
    assert done[3]["stable"] >= max(s["stable"] for s in done[:3])  # stable last ...
    assert done[3]["classified"] < max(s["classified"] for s in done[:3])  # ... yet not classified last


def test_a_c_store_sent_at_high_priority_marks_its_study_urgent(node_factory):
    """Another node forwards its urgent studies at DIMSE priority HIGH: this node takes them first too."""
    node = node_factory(stable_seconds=30.0)
    ae = AE(ae_title="TESTSCU")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    uids = []
    for priority in (1, 2, 0):  # HIGH, LOW, MEDIUM
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS")
        assert assoc.is_established and assoc.send_c_store(ds, priority=priority).Status == 0
        assoc.release()
        uids.append(str(ds.StudyInstanceUID))
    assert [node.db.study(u)["asks_urgent"] for u in uids] == [1, 0, 0]


def test_unchanged_resend_gives_no_new_report_and_a_grown_study_supersedes_it(node_factory, orthanc_factory,
                                                                             ct_study, tmp_path):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]})
    node = node_factory(port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}")
    study = copy_study(ct_study, tmp_path / "study")  # two series of two instances
    uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    studies = node.metrics.studies

    assert storescu(node.port, study[:2]).returncode == 0
    first = wait_until(lambda: pacs.datasets("SR"), 60, 0.5, "the first SR")[0]

    # The same instances again (same bytes): the study comes back to classified without a new report.
    assert storescu(node.port, study[:2]).returncode == 0
    wait_until(lambda: studies.labels("unchanged")._value.get() == 1, 60, what="the resend to be recognised")
    assert study_state(node, uid) == "classified"
    assert len(node.db.outbox(uid)) == 1 and len(node.db.reports(uid)) == 1

    # The second series arrives: a new report that supersedes the first, in the same SR series.
    assert storescu(node.port, study[2:]).returncode == 0
    srs = wait_until(lambda: [s for s in pacs.datasets("SR") if s.SOPInstanceUID != first.SOPInstanceUID], 60, 0.5,
                     "the superseding SR")
    assert len(pacs.datasets("SR")) == 2 and len(srs) == 1
    second = srs[0]
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    assert "PredecessorDocumentsSequence" not in first
    (pre_study,) = second.PredecessorDocumentsSequence
    assert pre_study.StudyInstanceUID == uid
    (pre_series,) = pre_study.ReferencedSeriesSequence
    assert pre_series.SeriesInstanceUID == first.SeriesInstanceUID
    (pre,) = pre_series.ReferencedSOPSequence
    assert (pre.ReferencedSOPClassUID, pre.ReferencedSOPInstanceUID) == (first.SOPClassUID, first.SOPInstanceUID)
    values = read_classification_sr(second)
    assert values["predecessors"] == [first.SOPInstanceUID] and values["complete"]
    assert read_classification_sr(first)["complete"]
    assert json.loads(node.db.study(uid)["result"])[0]["images"] == 4

    if shutil.which("dciodvfy") and shutil.which("dsrdump"):
        path = tmp_path / "superseding.dcm"
        second.save_as(path, enforce_file_format=True)
        assert _dciodvfy_errors(path) == []
        dump = _dsr(path)
        assert "TID 1500" in dump
        assert re.search(r"Predecessor Docs\s*:\s*1\n", dump) and re.search(r"Completion Flag\s*:\s*COMPLETE", dump)


@needs_dcmtk
@needs_orthanc
def test_a_study_interrupted_by_a_stop_is_reported_partial_until_it_grows(node_factory, orthanc_factory, ct_study,
                                                                          tmp_path, capsys):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]})
    data = str(tmp_path / "data")
    ret = f"ORTHANC@{HOST}:{pacs.dicom_port}"
    study = copy_study(ct_study, tmp_path / "study")
    uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)

    node = node_factory(port=node_port, data_dir=data, return_to=ret, stable_seconds=600)
    assert storescu(node.port, study[:2]).returncode == 0
    node.stop()  # mid-study: the node cannot know whether more was coming
    node = node_factory(port=node_port, data_dir=data, return_to=ret)
    assert node.db.study(uid)["interrupted"] == 1
    partial = wait_until(lambda: pacs.datasets("SR"), 60, 0.5, "the SR after the restart")[0]
    assert partial.CompletionFlag == "PARTIAL" and not read_classification_sr(partial)["complete"]
    assert node_main(["status", "--data-dir", data]) == 0
    assert "PARTIAL" in capsys.readouterr().out

    # The rest arrives: a COMPLETE report that supersedes the partial one.
    assert storescu(node.port, study[2:]).returncode == 0
    srs = wait_until(lambda: [s for s in pacs.datasets("SR") if s.SOPInstanceUID != partial.SOPInstanceUID], 60,
                     0.5, "the complete SR")
    assert srs[0].CompletionFlag == "COMPLETE"
    assert read_classification_sr(srs[0])["predecessors"] == [partial.SOPInstanceUID]
    if shutil.which("dsrdump"):
        path = tmp_path / "partial.dcm"
        partial.save_as(path, enforce_file_format=True)
        assert re.search(r"Completion Flag\s*:\s*PARTIAL", _dsr(path))


@needs_dcmtk
@needs_orthanc
def test_a_refused_report_goes_dead_is_shown_and_resend_queues_it_again(node_factory, orthanc_factory, ct_study,
                                                                        tmp_path, capsys):
    # A real refusal: Orthanc's Lua filter raising makes Orthanc answer 0xA700 (as it does for an empty
    # StudyInstanceUID), with the association accepted.
    lua = tmp_path / "refuse-sr.lua"
    lua.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                   "  if dicom.Modality == 'SR' then error('this PACS takes no SR') end\n"
                   "  return true\nend\n")
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]}, LuaScripts=[str(lua)])
    node = node_factory(port=node_port, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}")
    data = node.config.data_dir
    study = copy_study(ct_study[:2], tmp_path / "study")
    uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, study).returncode == 0

    wait_until(lambda: [o["state"] for o in node.db.outbox(uid)] == ["dead"], 60, what="the SR in the dead letter")
    (item,) = node.db.outbox(uid)
    assert item["attempts"] == 1  # not retried: the refusal is not transient
    assert "0xA700" in item["last_error"]
    assert study_state(node, uid) == "classified"
    assert node_main(["status", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "dead" in out and "0xA700" in out and f"medclass node resend {uid}" in out
    assert uid in out  # whole, to copy

    # The administrator fixes the PACS, then resends (the node keeps running).
    pacs.stop()
    pacs.settings.pop("LuaScripts")
    pacs.start()
    assert node_main(["resend", "--data-dir", data, uid]) == 0
    srs = wait_until(lambda: pacs.datasets("SR"), 60, 0.5, "the SR after the resend")
    assert len(srs) == 1 and srs[0].StudyInstanceUID == uid
    wait_until(lambda: [o["state"] for o in node.db.outbox(uid)] == ["sent"], 20, what="the outbox item sent")
    assert node_main(["resend", "--data-dir", data, "--all-dead"]) == 1  # nothing dead any more
    capsys.readouterr()


def test_a_peer_down_for_longer_than_give_up_after_hours_goes_dead(node_factory, ct_study, tmp_path, capsys):
    # Nothing listens on the destination: a transient failure, retried until the bound.
    node = node_factory(return_to=f"PACS@{HOST}:{free_port()}", give_up_after_hours=2.0 / 3600)
    study = copy_study(ct_study[:1], tmp_path / "study")
    uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    ds = pydicom.dcmread(study[0])
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS")
    assert assoc.is_established and assoc.send_c_store(ds).Status == 0
    assoc.release()
    wait_until(lambda: [o["state"] for o in node.db.outbox(uid)] == ["dead"], 60, what="the SR given up")
    (item,) = node.db.outbox(uid)
    assert item["attempts"] >= 2 and "give_up_after_hours" in item["last_error"]
    assert "refused or did not answer" in item["last_error"]
