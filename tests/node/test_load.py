"""Load: 8 concurrent dcmtk storescu associations x 100 real CT instances; every instance
acknowledged with success is on disk and in SQLite, the counts match exactly, and the
node still answers C-ECHO.

``stable_seconds`` is an hour here, so that classification stays out of the way: this test
is about ingest, and the other tests cover classification.
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from .conftest import HOST, dcmtk_env, needs_dcmtk, wait_until

ASSOCIATIONS, PER_ASSOCIATION, STUDIES = 8, 100, 4


def write_ct_instances(folder: Path, n: int, studies: int) -> dict[str, list[Path]]:
    """``n`` copies of CT_small.dcm with their own SOP Instance UIDs, spread over ``studies`` studies."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uids = [(pydicom.uid.generate_uid(), pydicom.uid.generate_uid()) for _ in range(studies)]
    out: dict[str, list[Path]] = {}
    for i in range(n):
        study, series = uids[i * studies // n]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        p = folder / f"ct{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.setdefault(study, []).append(p)
    return out


@needs_dcmtk
def test_8_concurrent_associations_x_100_instances_are_all_accounted_for(node_factory, tmp_path):
    node = node_factory(stable_seconds=3600, metrics_port=-1)
    by_study = write_ct_instances(tmp_path / "in", ASSOCIATIONS * PER_ASSOCIATION, STUDIES)
    files = sorted(p for ps in by_study.values() for p in ps)
    # Association k sends every 8th file: each study arrives over several associations at once.
    batches = [files[k::ASSOCIATIONS] for k in range(ASSOCIATIONS)]
    procs = [subprocess.Popen(["storescu", "-v", "-aet", f"LOAD{k}", "-aec", "MEDCLASS", HOST, str(node.port),
                               *map(str, batch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
             for k, batch in enumerate(batches)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]

    acknowledged = 0
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:]
        acknowledged += out.count("Received Store Response (Success)")
    assert acknowledged == len(files) == ASSOCIATIONS * PER_ASSOCIATION

    rows = node.db.query("SELECT sop_uid, study_uid, path, size FROM instances")
    assert len(rows) == acknowledged
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    assert {r["sop_uid"] for r in rows} == set(sent)
    for r in rows:  # each spooled file is complete and holds the data set as sent
        assert Path(r["path"]).stat().st_size == r["size"]
        original = pydicom.dcmread(sent[r["sop_uid"]])
        original.pop(0xFFFCFFFC, None)  # CT_small's Data Set Trailing Padding, which storescu leaves out
        assert pydicom.dcmread(r["path"]) == original
    studies = {r["study_uid"]: r["n_instances"] for r in node.db.query("SELECT study_uid, n_instances FROM studies")}
    assert studies == {uid: len(ps) for uid, ps in by_study.items()}
    assert not list((Path(node.config.data_dir) / "spool").rglob("*.part"))
    assert node.db.query("SELECT COUNT(*) AS n FROM quarantine")[0]["n"] == 0

    def counted() -> bool:  # ingest helper processes report their counts to the node within a quarter second
        with urllib.request.urlopen(f"http://{HOST}:{node.metrics_port}/metrics", timeout=10) as resp:
            return f'medclass_node_instances_received_total{{modality="CT"}} {float(acknowledged)}' in \
                resp.read().decode()

    wait_until(counted, 10, 0.1, "every acknowledged instance in /metrics")

    ae = AE(ae_title="AFTERLOAD")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
