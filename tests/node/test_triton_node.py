"""The node with ``inference = "triton://..."``: a real tritonserver down, then up; nothing lost.

The node's test checkpoint is exported with ``medclass export --format triton --backend
python`` and served by the tritonserver of the nvidia-pytriton wheel (tests/peers.py
:class:`TritonServer`) on fixed loopback ports, started only after the studies arrived.
"""

from __future__ import annotations

import json

import pydicom
import pytest

pytest.importorskip("tritonclient.grpc")
from peers import TritonServer, tritonserver_dist  # noqa: E402

from .conftest import copy_study, needs_dcmtk, storescu, wait_until  # noqa: E402

pytestmark = [pytest.mark.skipif(tritonserver_dist() is None, reason="tritonserver (nvidia-pytriton) not installed"),
              needs_dcmtk]

MODEL = "chest"


def _gauge(node, url: str) -> float | None:
    from prometheus_client import generate_latest

    for line in generate_latest(node.metrics.registry).decode().splitlines():
        if line.startswith("medclass_node_inference_up{") and url in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_triton_down_then_up_loses_nothing(node_factory, checkpoint, ct_study, tmp_path):
    from dicom_node.status import format_table, study_rows
    from medclass.cli import main
    from medclass.inference import Classifier

    repo = tmp_path / "repo"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "triton", "--backend", "python",
                 "--model-name", MODEL, "--max-batch-size", "8", "--out", str(repo)]) == 0
    triton = TritonServer(tmp_path / "triton", repo)  # its ports are chosen now; it starts later
    url = triton.url(MODEL)
    node = node_factory(inference=url)
    # Two studies while the server is down: one routine, one whose header asks for STAT.
    routine = copy_study(ct_study, tmp_path / "routine")
    stat = copy_study(ct_study, tmp_path / "stat")
    for p in stat:
        ds = pydicom.dcmread(p)
        ds.RequestedProcedurePriority = "STAT"
        ds.save_as(p)
    uids = [str(pydicom.dcmread(s[0]).StudyInstanceUID) for s in (routine, stat)]
    for files in (routine, stat):
        r = storescu(node.port, files)
        assert r.returncode == 0, r.stderr
    try:
        def waiting():
            # Both wait in ready; the one first in line (retried with a backoff) says why.
            rows = {r["study_uid"]: r for r in node.db.recent_studies(10)}
            return all(rows.get(u, {}).get("state") == "ready" for u in uids) and any(
                (rows[u]["error"] or "").startswith("waiting for inference server; retrying") for u in uids)

        wait_until(waiting, 60, what="both studies to wait for the inference server")
        assert _gauge(node, url) == 0
        table = format_table(study_rows(node.config.data_dir))
        assert "waiting for inference server; retrying" in table and url in table
        triton.start()
        wait_until(lambda: all(node.db.state(u) == "classified" for u in uids), 120,
                   what="both studies to be classified once the server is up")
        assert _gauge(node, url) == 1
    finally:
        triton.stop()
    local = Classifier(checkpoint, "cpu")
    for uid, files in zip(uids, (routine, stat)):
        study = node.db.study(uid)
        assert study["error"] is None and study["revision"] == 1  # one report, no duplicate
        assert len(node.db.instances(uid, include_skipped=True)) == len(files)  # nothing lost
        result = json.loads(study["result"])
        assert len(result) == 1 and result[0]["images"] == len(files)
        want = local.classify_study(files).probabilities
        assert max(abs(result[0]["probabilities"][c] - want[c]) for c in want) < 1e-4
        assert node.db.reports(uid)  # the SR was built


def test_urgent_header_and_route_priority():
    from dicom_node.fastpath.header import header_asks_urgent as _asks_urgent
    from dicom_node.selector import SeriesSelector

    ds = pydicom.Dataset()
    assert not _asks_urgent(ds)
    ds.RequestedProcedurePriority = "STAT"
    assert _asks_urgent(ds)
    item = pydicom.Dataset()
    item.RequestedProcedurePriority = "HIGH"
    ds2 = pydicom.Dataset()
    ds2.RequestAttributesSequence = [item]
    assert _asks_urgent(ds2)
    sel = SeriesSelector([{"modality": "CT", "checkpoint": "/m/ct.pt", "priority": "urgent",
                           "inference": "triton://gpu:8001/ct"}, {"modality": "CR", "checkpoint": "/m/cr.pt"}],
                         inference="triton://gpu:8001/chest")
    assert sel.inference_of("/m/ct.pt") == "triton://gpu:8001/ct" and sel.priority_of("/m/ct.pt") == "urgent"
    assert sel.inference_of("/m/cr.pt") == "triton://gpu:8001/chest" and sel.priority_of("/m/cr.pt") == "routine"


def test_bad_inference_settings_are_refused(tmp_path):
    from dicom_node.config import load_config
    from dicom_node.selector import SeriesSelector
    from medclass.errors import MedClassError

    cfg = tmp_path / "node.toml"
    cfg.write_text('checkpoint = "m.pt"\ninference = "http://gpu:8001/chest"\n')
    with pytest.raises(MedClassError, match="not an inference backend"):
        load_config(cfg)
    with pytest.raises(MedClassError, match="priority"):
        SeriesSelector([{"checkpoint": "/m.pt", "priority": "stat"}])
    with pytest.raises(MedClassError, match="malformed"):
        SeriesSelector([{"checkpoint": "/m.pt", "inference": "triton://gpu:8001"}])


def test_two_nodes_share_one_triton_server(node_factory, checkpoint, ct_study, tmp_path):
    """Two nodes (two sites: own AE title and spool) classify through one server; Triton counts both."""
    import threading

    from medclass.cli import main

    repo = tmp_path / "repo"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "triton", "--backend", "python",
                 "--model-name", MODEL, "--max-batch-size", "8", "--out", str(repo)]) == 0
    with TritonServer(tmp_path / "triton", repo) as triton:
        nodes = [node_factory(ae_title=f"SITE{i}", inference=triton.url(MODEL)) for i in (1, 2)]
        studies = [copy_study(ct_study, tmp_path / f"site{i}") for i in (1, 2)]
        uids = [str(pydicom.dcmread(s[0]).StudyInstanceUID) for s in studies]
        results = []
        sends = [threading.Thread(target=lambda n=n, s=s: results.append(storescu(n.port, s, called=n.config.ae_title)))
                 for n, s in zip(nodes, studies)]
        for t in sends:
            t.start()
        for t in sends:
            t.join()
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        for node, uid in zip(nodes, uids):
            wait_until(lambda node=node, uid=uid: node.db.state(uid) == "classified", 120,
                       what=f"{node.config.ae_title} to classify its study")
            assert node.db.study(uid)["error"] is None
        assert nodes[0].db.study(uids[1]) is None and nodes[1].db.study(uids[0]) is None  # separate spools
        m = triton.metrics()
        assert m["nv_inference_request_success"] >= 2 and m["nv_inference_count"] >= 2 * len(ct_study)
