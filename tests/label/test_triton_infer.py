"""The MONAI Label app with ``--conf inference triton://...``: infer runs on a real Triton server.

The app serves the conftest ``trained`` checkpoint; a tritonserver (nvidia-pytriton's) serves
the same checkpoint exported with ``medclass export --format triton --backend python``.
Infer equals local inference within 1e-4; with Triton stopped it answers 503 with a one-line
reason, while scoring for active learning (local by design) still works.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import requests

pytest.importorskip("tritonclient.grpc")
from peers import TritonServer, tritonserver_dist  # noqa: E402

pytestmark = pytest.mark.skipif(tritonserver_dist() is None, reason="tritonserver (nvidia-pytriton) not installed")


def test_infer_through_triton_then_503_when_it_is_down(trained, br35h_dir, tmp_path, label_server_launcher):
    from medclass.cli import main
    from medclass.inference import Classifier

    start, stop = label_server_launcher
    repo = tmp_path / "repo"
    assert main(["export", "--checkpoint", str(trained / "model.pt"), "--format", "triton", "--backend", "python",
                 "--model-name", "br35h", "--max-batch-size", "8", "--out", str(repo)]) == 0
    studies = tmp_path / "studies"
    studies.mkdir()
    images = sorted((br35h_dir / "yes").glob("*.jpg"))[:3] + sorted((br35h_dir / "no").glob("*.jpg"))[:3]
    for p in images:
        shutil.copy(p, studies / p.name)
    # monailabel's launcher puts the folder of its environment first on PYTHONPATH; this checkout's
    # code must win over it (a worktree beside the environment's own checkout).
    root = Path(__file__).resolve().parents[2]
    pyexe = tmp_path / "python"
    pyexe.write_text(f'#!/bin/sh\nPYTHONPATH="{root}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    pyexe.chmod(0o755)
    triton = TritonServer(tmp_path / "triton", repo).start()
    proc = None
    try:
        proc, url = start(studies, tmp_path / "models", tmp_path / "server.log",
                          {"models": "resnet18", "checkpoint": str(trained / "model.pt"),
                           "inference": triton.url("br35h"), "score_on_start": "false",
                           "retrain_on_label": "false"}, env={"MONAILABEL_PYEXE": str(pyexe)})
        local = Classifier(trained / "model.pt", "cpu")
        for p in images[:2]:
            r = requests.post(f"{url}/infer/resnet18", params={"image": p.stem, "output": "json"}, timeout=120)
            assert r.status_code == 200, r.text
            want = local.predict_paths([p])[0].probabilities
            assert max(abs(r.json()["probabilities"][c] - want[c]) for c in want) < 1e-4
        triton.stop()
        r = requests.post(f"{url}/infer/resnet18", params={"image": images[2].stem, "output": "json"}, timeout=120)
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert "unavailable" in detail and triton.url("br35h") in detail and "\n" not in detail
        # Scoring for active learning runs the local checkpoint: unaffected by the server being down.
        r = requests.post(f"{url}/scoring/medclass_uncertainty", params={"run_sync": "true"}, timeout=600)
        assert r.status_code == 200, r.text
    finally:
        if proc is not None:
            stop(proc)
        triton.stop()
