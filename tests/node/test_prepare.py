"""Instances prepared as they arrive (dicom_node.prepare): the same result, recomputed when lost.

The node's cache of prepared images is an optimisation: these tests check that a study
classified from it gets exactly the probabilities of the inline path, that whatever is
missing or torn (a crash between arrival and classification) is prepared again from the
spooled file, that a file the pool cannot read is still quarantined with its reason, and
that a series too large for the report's image library is reported by reference, valid for
dciodvfy, naming every image.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobDatabase, StudyState
from dicom_node.metrics import NodeMetrics
from dicom_node.prepare import ArrivalPreparer, PreparedCache, prepare_instances
from dicom_node.selector import SeriesSelector
from dicom_node.spool import Spool
from dicom_node.worker import InferenceWorker
from medclass.inference import Classifier

from .conftest import HOST, free_port, needs_dcmtk, storescu, wait_until


def _series(out: Path, n: int) -> list[Path]:
    """``n`` CT instances (CT_small.dcm) of one new study and series."""
    out.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for i in range(n):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        ds.PixelData = (ds.pixel_array + 7 * i).astype(ds.pixel_array.dtype).tobytes()  # images differ
        paths.append(out / f"ct{i:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _spool(node_dir: Path, paths: list[Path]) -> tuple[JobDatabase, Spool, str]:
    db = JobDatabase(node_dir / "node.db")
    spool = Spool(node_dir, db)
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        spool.store(p.read_bytes(), study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                    sop_uid=ds.SOPInstanceUID, sop_class=ds.SOPClassUID, modality="CT", calling_ae="TEST")
    spool.close()  # commits the instance rows
    db = JobDatabase(node_dir / "node.db")
    return db, Spool(node_dir, db), str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _classify(node_dir: Path, checkpoint: Path, paths: list[Path], prepare: bool, damage=None):
    """Spool ``paths`` as the SCP does, optionally prepare them as the node does on arrival, classify."""
    cfg = NodeConfig(data_dir=str(node_dir), checkpoint=str(checkpoint), device="cpu", classify_any_modality=True,
                     preprocess_on_arrival=prepare, preprocess_workers=1)
    db, spool, study = _spool(node_dir, paths)
    metrics = NodeMetrics()
    worker = InferenceWorker(cfg, db, spool, metrics)
    if prepare:
        preparer = ArrivalPreparer(db, SeriesSelector([], str(checkpoint), True), worker.cache, workers=1)
        try:
            while preparer.poll() or not preparer.idle():
                time.sleep(0.05)
        finally:
            preparer.close()
        if damage:
            damage(worker.cache, worker.model(str(checkpoint)).preprocess_fingerprint, db.instances(study))
    assert study in db.mark_stable(cutoff=time.time(), now=time.time())
    assert worker.run_once()
    row = db.study(study)
    spool.close()
    return row, {w: metrics.images_prepared.labels(w)._value.get() for w in ("arrival", "inline")}, worker


def test_cache_holds_exactly_what_the_model_prepares(checkpoint, tmp_path):
    paths = _series(tmp_path / "in", 3)
    clf = Classifier(str(checkpoint), "cpu")
    items = [("study", f"sop{i}", str(p)) for i, p in enumerate(paths)]
    assert prepare_instances(str(checkpoint), str(tmp_path / "cache"), items) == 3
    assert prepare_instances(str(checkpoint), str(tmp_path / "cache"), items) == 0  # already there
    cache = PreparedCache(tmp_path / "cache")
    for (_, sop, path) in items:
        tensor, meta = cache.load(clf.preprocess_fingerprint, "study", sop)
        want, want_meta = clf.prepare(path)
        assert np.array_equal(tensor.numpy(), want.numpy())
        assert meta["sop_uid"] == want_meta["sop_uid"] and meta["modality"] == "CT"
    direct = clf.classify_study(paths)
    cached = clf.classify_prepared([cache.load(clf.preprocess_fingerprint, "study", s) for _, s, _ in items])
    assert np.array_equal(direct.probabilities, cached.probabilities)


def test_another_preprocessing_never_reads_the_cache(checkpoint, tmp_path):
    from medclass.checkpoint import load_checkpoint

    clf = Classifier(str(checkpoint), "cpu")
    other = load_checkpoint(str(checkpoint), "cpu")
    other.card["preprocess"] = {**other.preprocess_spec, "image_size": 48}
    assert Classifier(other).preprocess_fingerprint != clf.preprocess_fingerprint


def test_a_study_classified_from_the_arrival_cache_equals_the_inline_path(checkpoint, tmp_path):
    paths = _series(tmp_path / "in", 6)
    inline, counts_inline, _ = _classify(tmp_path / "inline", checkpoint, paths, prepare=False)
    cached, counts_cached, _ = _classify(tmp_path / "cached", checkpoint, paths, prepare=True)
    assert inline["state"] == cached["state"] == "classified"
    assert counts_cached == {"arrival": 6, "inline": 0}
    assert inline["result"] == cached["result"]


def test_lost_or_torn_cache_entries_are_prepared_again_from_the_spool(checkpoint, tmp_path):
    paths = _series(tmp_path / "in", 6)

    def crash(cache, fp, instances):
        cache.path(fp, instances[0]["study_uid"], instances[0]["sop_uid"]).unlink()  # never written
        torn = cache.path(fp, instances[1]["study_uid"], instances[1]["sop_uid"])
        torn.write_bytes(torn.read_bytes()[:100])  # cut short in its header
        torn = cache.path(fp, instances[2]["study_uid"], instances[2]["sop_uid"])
        torn.write_bytes(torn.read_bytes()[:-8])  # cut short in its pixels

    inline, _, _ = _classify(tmp_path / "inline", checkpoint, paths, prepare=False)
    cached, counts, worker = _classify(tmp_path / "cached", checkpoint, paths, prepare=True, damage=crash)
    assert counts == {"arrival": 3, "inline": 3}
    assert cached["state"] == "classified" and cached["result"] == inline["result"]
    # The study's entries are gone once it is done.
    assert not any(worker.cache.root.glob(f"*/*/*{PreparedCache.suffix}"))


def test_a_file_the_pool_cannot_read_is_quarantined_with_its_reason(checkpoint, tmp_path):
    paths = _series(tmp_path / "in", 4)
    ds = pydicom.dcmread(paths[2])
    del ds.PixelData  # a header the SCP accepts, no image: neither the pool nor the worker can prepare it
    ds.save_as(paths[2], enforce_file_format=True)
    row, counts, worker = _classify(tmp_path / "node", checkpoint, paths, prepare=True)
    assert row["state"] == "classified"
    assert counts == {"arrival": 3, "inline": 1}
    skipped = [i for i in worker.db.instances(row["study_uid"], include_skipped=True) if i["skipped"]]
    assert len(skipped) == 1 and "pixel" in skipped[0]["skipped"].lower()


@needs_dcmtk
def test_node_prepares_a_large_series_on_arrival_and_reports_every_image_by_reference(checkpoint, tmp_path):
    from dicom_node.node import DicomNode

    n = 40  # more than the report's image library takes (medclass.sr.IMAGE_LIBRARY_MAX_IMAGES)
    paths = _series(tmp_path / "in", n)
    # The study becomes stable only when the test says so (stable_seconds lowered below): what the pool
    # prepared by then is up to the pool's speed, and this test is about the result, not a race.
    node = DicomNode(NodeConfig(port=free_port(), bind=HOST, data_dir=str(tmp_path / "node"),
                                checkpoint=str(checkpoint), stable_seconds=3600, device="cpu",
                                classify_any_modality=True, preprocess_workers=1), poll_seconds=0.1).start()
    try:
        assert node.preparer is not None  # the default
        wait_until(node.preparer.warm, timeout=300, what="the pool's warm-up")
        assert storescu(node.port, paths).returncode == 0
        study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        cache = node.worker.cache
        wait_until(lambda: len(list(cache.root.glob(f"*/*/*{PreparedCache.suffix}"))) == n, timeout=300,
                   what="every image prepared")
        node.assembler.stable_seconds = 0.5
        wait_until(lambda: node.db.state(study) == StudyState.CLASSIFIED, timeout=300)
        counts = {w: node.metrics.images_prepared.labels(w)._value.get() for w in ("arrival", "inline")}
        assert counts == {"arrival": n, "inline": 0}
        sr_path = next((tmp_path / "node" / "outbox").rglob("*.dcm"))
    finally:
        node.stop()
    sr = pydicom.dcmread(sr_path)
    named = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
             for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert named == sent
    assert str(sr.PatientID) == str(pydicom.dcmread(paths[0], stop_before_pixels=True).PatientID)
    if shutil.which("dciodvfy"):
        v = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True)
        assert [x for x in (v.stdout + v.stderr).splitlines() if x.startswith("Error")] == []
