"""The MONAI Label app, driven through the real server's HTTP API and MONAI Label's own client.

One server (the session fixture ``label_server``) serves a small resnet18 trained
on real Br35H images over 40 real Br35H JPEGs. The tests run in file order:
labels, scoring and strategies first, then a training run that must change the
served model.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient


def _put_label(server, image_id, payload=None, params=None, raw=None):
    body = raw if raw is not None else json.dumps(payload or {}).encode()
    return requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "final"},
                        files={"label": ("label.json", body, "application/json")},
                        data={"params": json.dumps(params or {})}, timeout=60)


def _datastore(server) -> dict:
    return requests.get(f"{server.url}/datastore/?output=all", timeout=60).json()


def _labelled(server) -> set[str]:
    objs = _datastore(server)["objects"]
    return {k for k, v in objs.items() if v.get("labels", {}).get("final")}


def test_info_lists_the_model_as_classification(label_server):
    info = MONAILabelClient(label_server.url).info()
    m = info["models"][label_server.model]
    assert m["type"] == "classification"
    assert m["labels"] == label_server.classes == m["classes"]
    assert info["labels"] == label_server.classes
    assert set(info["strategies"]) >= {"random", "entropy", "margin", "least-confidence", "bald", "coreset",
                                       "hybrid"}
    assert "medclass_uncertainty" in info["scoring"]
    assert info["label_format"] == {"label": "<class>"}


def test_infer_returns_a_probability_per_class_equal_to_medclass(label_server, trained):
    from medclass.inference import Classifier

    image_id = next(i for i in label_server.image_ids if i.startswith("yes_"))
    r = requests.post(f"{label_server.url}/infer/{label_server.model}", params={"image": image_id, "output": "json"},
                      timeout=120)
    assert r.status_code == 200, r.text
    res = r.json()
    assert set(res["probabilities"]) == set(label_server.classes)
    assert sum(res["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert res["label"] in label_server.classes
    local = Classifier(trained / "model.pt", device="cpu").predict_paths([label_server.studies / f"{image_id}.jpg"])[0]
    for c in label_server.classes:
        assert res["probabilities"][c] == pytest.approx(local.probabilities[c], abs=1e-4)


def test_infer_through_monai_label_client_with_heatmap(label_server, tmp_path):
    import SimpleITK as sitk

    from medclass.io import read_image

    client = MONAILabelClient(label_server.url, tmpdir=str(tmp_path))
    image_id = label_server.image_ids[0]
    out_file, params = client.infer(label_server.model, image_id, {"heatmap": True})
    assert set(params["probabilities"]) == set(label_server.classes)
    assert params["heatmap_method"] == "gradcam"
    heat = sitk.GetArrayFromImage(sitk.ReadImage(out_file))
    image = read_image(label_server.studies / f"{image_id}.jpg")
    assert heat.shape == image.array.shape[1:]
    assert 0 <= heat.min() and heat.max() <= 1 and heat.max() > heat.min()


def test_infer_on_a_missing_image_is_a_client_error(label_server):
    r = requests.post(f"{label_server.url}/infer/{label_server.model}", params={"image": "no_such_image",
                                                                                "output": "json"}, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert "no image 'no_such_image'" in r.json()["detail"]


def test_save_label_marks_the_image_labelled(label_server):
    image_id = label_server.image_ids[1]
    r = _put_label(label_server, image_id, {"label": label_server.truth[image_id]})
    assert r.status_code == 200, r.text
    assert image_id in _labelled(label_server)
    stats = requests.get(f"{label_server.url}/datastore/?output=stats", timeout=60).json()
    assert stats["completed"] >= 1
    # The stored label file is the normalised JSON.
    lab = requests.get(f"{label_server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
    assert lab.json() == {"label": label_server.truth[image_id]}


def test_label_in_params_and_through_monai_label_client(label_server, tmp_path):
    a, b = label_server.image_ids[2], label_server.image_ids[3]
    assert _put_label(label_server, a, {}, params={"label": label_server.truth[a]}).status_code == 200
    f = tmp_path / "label.json"
    f.write_text(json.dumps({"label": label_server.truth[b]}))
    MONAILabelClient(label_server.url).save_label(b, str(f), tag="final")
    assert {a, b} <= _labelled(label_server)


@pytest.mark.parametrize("payload,raw,needle", [
    ({"label": "glioma"}, None, "unknown class"),
    ({}, None, "no label"),
    (None, b"not json", "not json"),
    ({"labels": ["tumour", "no tumour"]}, None, "exactly one class"),
])
def test_bad_labels_get_a_4xx_with_the_reason(label_server, payload, raw, needle):
    image_id = label_server.image_ids[4]
    r = _put_label(label_server, image_id, payload, raw=raw)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"].lower()
    assert image_id not in _labelled(label_server)


def test_label_for_an_unknown_image_is_404(label_server):
    r = _put_label(label_server, "no_such_image", {"label": label_server.classes[0]})
    assert r.status_code == 404, r.text


def _wait_for(server, kind: str) -> dict:
    """The latest train/scoring task once it has finished (the server also scores by itself
    at start-up and after training and next-sample requests)."""
    while True:
        r = requests.get(f"{server.url}/{kind}/", timeout=60)
        if r.status_code == 404:  # none ever started
            return {}
        task = r.json()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(1)


def _wait_for_scoring(server) -> None:
    _wait_for(server, "scoring")


def test_scoring_stores_scores_and_reports_failures(label_server):
    _wait_for_scoring(label_server)
    r = requests.post(f"{label_server.url}/scoring/medclass_uncertainty", params={"run_sync": "true"}, timeout=600)
    assert r.status_code == 200, r.text
    objs = _datastore(label_server)["objects"]
    scored = {k: v["image"]["info"].get("medclass", {}).get(label_server.model, {}) for k, v in objs.items()}
    for image_id in label_server.image_ids:
        s = scored[image_id]["scores"]
        assert set(s) == {"entropy", "margin", "least-confidence", "bald"}
        assert all(np.isfinite(v) for v in s.values())
    # The corrupt JPEG in the studies folder is recorded as a failure, not as a score.
    assert "error" in scored["broken_image"] and "scores" not in scored["broken_image"]


@pytest.mark.parametrize("strategy", ["random", "entropy", "margin", "least-confidence", "bald", "coreset", "hybrid"])
def test_every_strategy_returns_an_unlabelled_image(label_server, strategy):
    r = requests.post(f"{label_server.url}/activelearning/{strategy}", json={"client_id": f"t-{strategy}"},
                      timeout=120)
    assert r.status_code == 200, r.text
    image_id = r.json()["id"]
    assert image_id in set(label_server.image_ids) | {"broken_image"}
    assert image_id not in _labelled(label_server)
    if strategy != "random":
        assert image_id != "broken_image"  # a scoring failure is never ranked


def test_entropy_picks_the_most_uncertain_image(label_server):
    objs = _datastore(label_server)["objects"]
    labelled = _labelled(label_server)
    ent = {k: v["image"]["info"]["medclass"][label_server.model]["scores"]["entropy"]
           for k, v in objs.items() if k in label_server.image_ids and k not in labelled}
    r = requests.post(f"{label_server.url}/activelearning/entropy", json={"client_id": "t-entropy"}, timeout=120)
    assert r.json()["id"] == max(ent, key=ent.get)


def test_two_annotators_asking_at_once_get_different_images(label_server):
    def ask(_):
        return MONAILabelClient(label_server.url).next_sample("margin", {})["id"]

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(ask, range(4)))
    assert len(set(ids)) == 4, ids


def test_training_reports_metrics_and_changes_the_served_model(label_server):
    url, model = label_server.url, label_server.model
    before = requests.post(f"{url}/infer/{model}", params={"image": label_server.image_ids[0], "output": "json"},
                           timeout=120).json()
    for image_id in label_server.image_ids:  # label everything (40 images, both classes)
        assert _put_label(label_server, image_id, {"label": label_server.truth[image_id]}).status_code == 200
    # A full fine-tune, forced: a worse model is otherwise kept (see test_retrain.py).
    r = requests.post(f"{url}/train/{model}", json={"max_epochs": 2, "mode": "full", "force": True}, timeout=60)
    assert r.status_code == 200, r.text
    status = _wait_for(label_server, "train")
    assert status["status"] == "DONE", status
    metric_lines = [ln for ln in status["details"] if ln.startswith("metrics ")]
    assert metric_lines, status["details"]
    metrics = json.loads(metric_lines[-1][len("metrics "):])
    assert metrics["images"] == 40 and metrics["accuracy"] is not None
    assert metrics["mode"] == "full" and metrics["published"] is True and metrics["n_heldout"] >= 2
    stats = requests.get(f"{url}/info/", timeout=60).json()["train_stats"][model]
    assert stats["version"] == metrics["version"] and stats["accuracy"] == metrics["accuracy"]
    after = requests.post(f"{url}/infer/{model}", params={"image": label_server.image_ids[0], "output": "json"},
                          timeout=120).json()
    assert after["model_version"] != before["model_version"]
    assert after["probabilities"] != before["probabilities"]
