"""The module's annotation loop (SlicerMedClassLib.annotation.AnnotationLoop) against the real
MONAI Label server with the project's app: label, wait for the server's own head refit, the
next sample ranked by the refitted model; the fast and the full training on request; which
init the served model came from.

One server of its own (the session's resnet18 over 24 real Br35H JPEGs, refits after labels
on, ``--conf init`` the same checkpoint); the tests run in file order.
"""

from __future__ import annotations

import json
import shutil

import pytest
from SlicerMedClassLib.annotation import AnnotationLoop, run_text
from SlicerMedClassLib.client import MonaiLabelClient


@pytest.fixture(scope="module")
def server(tmp_path_factory, trained, br35h_dir, label_server_launcher):
    start, stop = label_server_launcher
    base = tmp_path_factory.mktemp("annotation")
    studies = base / "studies"
    studies.mkdir()
    truth = {}
    for folder, name in (("yes", "tumour"), ("no", "no tumour")):
        for p in sorted((br35h_dir / folder).glob("*.jpg"))[240:252]:
            shutil.copy(p, studies / f"{folder}_{p.stem}.jpg")
            truth[f"{folder}_{p.stem}"] = name
    proc, url = start(studies, base / "models", base / "server.log",
                      {"models": "resnet18", "checkpoint": str(trained / "model.pt"),
                       "init": str(trained / "model.pt"), "epochs": "1"})
    try:
        yield {"url": url, "model": "resnet18", "truth": truth, "model_dir": base / "models",
               "init": str(trained / "model.pt"), "log": base / "server.log"}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def loop(server) -> AnnotationLoop:
    client = MonaiLabelClient(server["url"], timeout=300, client_id="slicer-annotator")
    return AnnotationLoop(client, server["model"], "entropy")


def test_the_served_model_says_where_it_came_from(server, loop):
    served = loop.served()
    assert served.version is not None and served.retrain_on_label is True
    assert served.init is None  # the session's model was trained from scratch
    assert served.conf_init == server["init"]
    assert served.refit is None  # no label saved yet: nothing to wait for
    text = served.init_text()
    assert "trained from scratch" in text and server["init"] in text
    # MONAI Label's own client reads the same fields.
    from monailabel.client import MONAILabelClient

    stats = MONAILabelClient(server["url"]).info()["train_stats"][server["model"]]
    assert stats["init"] is None and stats["conf_init"] == server["init"] and stats["version"] == served.version


def test_each_label_is_refitted_before_the_next_sample(server, loop, capsys):
    truth = server["truth"]
    done, runs = [], []
    sample = loop.next_sample()
    for _ in range(8):
        assert sample is not None and sample["id"] in truth and sample["id"] not in done
        run = loop.submit(sample["id"], truth[sample["id"]])
        done.append(sample["id"])
        # The refit that returned saw every label so far (the wait is on the app's counters).
        assert run is not None and run["images"] == len(done), run
        counts = loop.served().refit
        assert counts["done"] >= counts["requested"] == len(done)
        if run.get("published") is not None and run.get("n_heldout"):
            runs.append(run)
            assert run["mode"] == "head"
            assert run["published"] == (run["new_score"] >= run["served_score"])
            assert run["version"] == loop.served().version
        else:  # before two labels of each class: a message, not a model
            assert "too few labels" in run["message"]
        sample = loop.next_sample()
    assert runs, "no refit had two labels of each class"
    served = loop.served()
    assert served.last_run == runs[-1] or served.last_run["images"] == len(done)
    # The sample the loop hands out next is ranked by the served (refitted) model's scores.
    objects = loop.client.datastore("all")["objects"]
    assert sample["id"] not in done
    assert objects[sample["id"]]["image"]["info"]["medclass"][server["model"]]["version"] == served.version
    with capsys.disabled():
        print("\nhead refit after a label, as the app reports it (s): fit "
              + ", ".join(f"{r['fit_seconds']:.3f}" for r in runs) + "; whole refit task "
              + ", ".join(f"{r['seconds']:.2f}" for r in runs))
    assert "published" in run_text(runs[-1]) or "kept" in run_text(runs[-1])


def test_refit_now_is_the_fast_mode(server, loop):
    run = loop.refit_now()
    assert run is not None and run["mode"] == "head" and run["images"] == 8
    assert run["published"] == (run["new_score"] >= run["served_score"])


def test_full_fine_tune_on_request_starts_from_the_served_model(server, loop):
    from medclass.checkpoint import read_card

    before = loop.served()
    run = loop.full_fine_tune(epochs=1, params={"batch_size": 4})
    assert run is not None and run["mode"] == "full" and run["epochs_run"] == 1
    assert run["published"] == (run["new_score"] >= run["served_score"])
    after = loop.served()
    assert (after.version != before.version) == run["published"]
    if run["published"]:
        card = read_card(server["model_dir"] / server["model"] / "model.pt")
        assert after.init == card["training"]["init"] and after.init["kind"] == "checkpoint"
        assert "initialised from" in after.init_text()
    # The run folder's model was started from the served model (--init), published or not.
    run_card = read_card(f"{run['run']}/model.pt")
    assert run_card["training"]["init"]["kind"] == "checkpoint"
    assert run_card["training"]["config"]["freeze_encoder"] is False
    # Every label is kept through the runs.
    labels = {k: v for k, v in loop.client.datastore("all")["objects"].items() if v.get("labels", {}).get("final")}
    assert len(labels) == 8
    assert json.dumps(run)  # the report is plain JSON for the widget
