"""The annotation loop through the real MONAI Label server and MONAI Label's own client:
scores ready at start, MONAI Label's classification format, publication only of a model
that is no worse, the fast (head-only) retraining, and anonymous clients never starved.

One server (this module's ``loop_server``) serves the session's small resnet18 over 48
real Br35H JPEGs and one corrupt file; the tests run in file order. A second one, with
the default settings, shows the server refitting the head by itself after labels.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from monailabel.client import MONAILabelClient

from medclass.labeling import heldout_split
from medclass.tasks import Task

STRATEGIES = ["random", "entropy", "margin", "least-confidence", "bald", "coreset", "hybrid"]


@pytest.fixture(scope="module")
def loop_server(tmp_path_factory, trained, br35h_dir, label_server_launcher):
    import shutil

    from medclass.checkpoint import read_card

    start, stop = label_server_launcher
    base = tmp_path_factory.mktemp("label-loop")
    studies = base / "studies"
    studies.mkdir()
    truth = {}
    names = {"yes": "tumour", "no": "no tumour"}
    for cls in ("yes", "no"):
        for p in sorted((br35h_dir / cls).glob("*.jpg"))[100:124]:
            shutil.copy(p, studies / f"{cls}_{p.stem}.jpg")
            truth[f"{cls}_{p.stem}"] = names[cls]
    (studies / "broken_image.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    card = read_card(trained / "model.pt")
    # The server's own refit after each label is off here: these tests drive publication
    # through POST /train, one run at a time (test_the_server_refits_after_a_label covers it).
    proc, url = start(studies, base / "models", base / "server.log",
                      {"models": "resnet18", "checkpoint": str(trained / "model.pt"), "epochs": "1",
                       "retrain_on_label": "false"})
    try:
        yield {"url": url, "model": "resnet18", "truth": truth, "task": Task(**card["task"]), "log": base / "server.log"}
    finally:
        stop(proc)


def _put_label(url, image_id, cls):
    r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                     files={"label": ("label.json", json.dumps({"label": cls}).encode(), "application/json")},
                     timeout=60)
    assert r.status_code == 200, r.text


def _train(url, model, params) -> dict:
    """Start a training run, wait until it is over, and return what it reported."""
    r = requests.post(f"{url}/train/{model}", json=params, timeout=60)
    assert r.status_code == 200, r.text
    while True:
        task = requests.get(f"{url}/train/", timeout=60).json()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(0.5)
    assert task["status"] == "DONE", task
    return requests.get(f"{url}/info/", timeout=60).json()["train_stats"][model]["last_run"]


def _objects(url) -> dict:
    return requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"]


def _version(url, model) -> str:
    return requests.get(f"{url}/info/", timeout=60).json()["train_stats"][model]["version"]


def test_every_strategy_answers_right_after_start_through_monai_labels_client(loop_server):
    client = MONAILabelClient(loop_server["url"])
    for strategy in STRATEGIES:
        res = client.next_sample(strategy, {})  # no "run the scoring task" first
        assert res["id"] in loop_server["truth"] or res["id"] == "broken_image", (strategy, res)
        if strategy != "random":
            assert res["id"] != "broken_image"
    version = _version(loop_server["url"], loop_server["model"])
    scored = {k: v["image"]["info"]["medclass"][loop_server["model"]] for k, v in _objects(loop_server["url"]).items()}
    assert all(s["version"] == version for s in scored.values())
    assert "error" in scored["broken_image"]


def test_infer_carries_monai_labels_classification_format(loop_server, tmp_path):
    client = MONAILabelClient(loop_server["url"], tmpdir=str(tmp_path))
    image_id = sorted(loop_server["truth"])[0]
    _, params = client.infer(loop_server["model"], image_id, {})
    # Without a result file MONAI Label's client hands back the JSON body undecoded.
    params = json.loads(params) if isinstance(params, (bytes, str)) else params
    pred = params["prediction"]
    classes = loop_server["task"].classes
    assert [p["idx"] for p in pred] == list(range(len(classes)))
    assert [p["label"] for p in pred] == classes
    for p in pred:
        assert p["score"] == pytest.approx(params["probabilities"][p["label"]])
    assert params["label"] == max(pred, key=lambda p: p["score"])["label"]


def test_too_few_labels_of_a_class_is_a_message_not_a_model(loop_server):
    url, model, truth = loop_server["url"], loop_server["model"], loop_server["truth"]
    before = _version(url, model)
    one_tumour = next(i for i in sorted(truth) if truth[i] == "tumour")
    _put_label(url, one_tumour, "tumour")
    for i in [i for i in sorted(truth) if truth[i] == "no tumour"][:3]:
        _put_label(url, i, "no tumour")
    run = _train(url, model, {})
    assert run["published"] is False
    assert "too few labels" in run["message"] and "tumour: 1" in run["message"]
    assert _version(url, model) == before


def test_a_worse_model_is_kept_and_force_publishes_it(loop_server):
    """Training images labelled with the wrong class (the held-out ones right): the
    refitted head is worse on the held-out images than the served model, so it is not
    published; with ``force`` it is, and the datastore is re-scored with it."""
    url, model, truth, task = loop_server["url"], loop_server["model"], loop_server["truth"], loop_server["task"]
    ids = sorted(truth)[:16] + sorted(truth)[-16:]  # both classes
    earlier = {k for k, v in _objects(url).items() if v.get("labels", {}).get("final")}  # labelled right before
    split = heldout_split([(i, "", [truth[i]]) for i in sorted(set(ids) | earlier)], task)
    other = {"tumour": "no tumour", "no tumour": "tumour"}
    for i in ids:
        _put_label(url, i, truth[i] if split[i] == "test" else other[truth[i]])
    before = _version(url, model)
    kept = _train(url, model, {})
    assert kept["mode"] == "head" and kept["n_heldout"] == sum(v == "test" for v in split.values())
    # What the code guarantees: published exactly when the new score is at least the served one.
    assert kept["published"] == (kept["new_score"] >= kept["served_score"])
    assert not kept["published"], kept  # a head fitted to inverted labels ranks the held-out images inversely
    assert "kept the served model" in kept["message"]
    assert _version(url, model) == before

    forced = _train(url, model, {"force": True})
    assert forced["published"] is True and forced["mode"] == "head"
    after = _version(url, model)
    assert after != before == kept["version"] and forced["version"] == after
    # Re-scored from the stored embeddings before the task was done: every image carries
    # the new version, so the strategies rank with the published model at once.
    scored = {k: v["image"]["info"]["medclass"][model] for k, v in _objects(url).items()}
    assert {s["version"] for s in scored.values()} == {after}
    for i in ids:  # relabel right for the next tests
        _put_label(url, i, truth[i])


def test_fast_retrain_then_the_next_sample_answers_at_once(loop_server):
    url, model = loop_server["url"], loop_server["model"]
    run = _train(url, model, {})
    assert run["mode"] == "head" and run["published"] == (run["new_score"] >= run["served_score"])
    version = _version(url, model)
    assert version == run["version"]
    res = MONAILabelClient(url).next_sample("entropy", {})
    assert res["id"] in loop_server["truth"]
    entry = _objects(url)[res["id"]]["image"]["info"]["medclass"][model]
    assert entry["version"] == version


def test_an_anonymous_client_is_not_starved_after_training(loop_server):
    """The reported failure: after a training run, images held by anonymous hand-outs left
    only the unscorable file, and a score strategy answered 409 'run the scoring task'."""
    url, model, truth = loop_server["url"], loop_server["model"], loop_server["truth"]
    objs = _objects(url)
    left = [i for i in sorted(truth) if "medclass_reserved" not in objs[i]["image"]["info"]
            and not objs[i].get("labels", {}).get("final")][-4:]  # unlabelled, never handed out
    assert len(left) == 4
    for i in sorted(truth):
        if i not in left:
            _put_label(url, i, truth[i])
    _train(url, model, {"force": True})
    client = MONAILabelClient(url)  # client_id None
    assert MONAILabelClient(url)._client_id is None
    first = [client.next_sample("margin", {})["id"] for _ in left]
    assert sorted(first) == sorted(left)  # every free image once: anonymous requests still get different images
    again = client.next_sample("margin", {})  # nothing free is left but what this client holds
    assert again["id"] in left and again["selection"]["rehanded"] is True
    assert client.next_sample("random", {})["id"] in set(left) | {"broken_image"}
    # Anonymous hand-outs do not starve a named annotator either; its own hand-out is
    # never given to someone else.
    named = MONAILabelClient(url, client_id="alice")
    _put_label(url, left[0], truth[left[0]])
    got = named.next_sample("margin", {})["id"]
    assert got in left[1:]
    for _ in range(3):
        assert client.next_sample("margin", {})["id"] != got


@pytest.fixture(scope="module")
def refit_server(tmp_path_factory, trained, br35h_dir, label_server_launcher):
    import shutil

    start, stop = label_server_launcher
    base = tmp_path_factory.mktemp("label-refit")
    studies = base / "studies"
    studies.mkdir()
    truth = {}
    for cls, name in (("yes", "tumour"), ("no", "no tumour")):
        for p in sorted((br35h_dir / cls).glob("*.jpg"))[200:208]:
            shutil.copy(p, studies / f"{cls}_{p.stem}.jpg")
            truth[f"{cls}_{p.stem}"] = name
    proc, url = start(studies, base / "models", base / "server.log",
                      {"models": "resnet18", "checkpoint": str(trained / "model.pt")})
    try:
        yield {"url": url, "model": "resnet18", "truth": truth}
    finally:
        stop(proc)


def test_the_server_refits_after_a_label_and_the_next_sample_uses_it(refit_server, tmp_path):
    url, model, truth = refit_server["url"], refit_server["model"], refit_server["truth"]
    client = MONAILabelClient(url, client_id="reader-1")
    ids = sorted(truth)
    for i in ids[:4] + ids[-4:]:  # four of each class, through MONAI Label's client
        f = tmp_path / "label.json"
        f.write_text(json.dumps({"label": truth[i]}))
        client.save_label(i, str(f), tag="final")
    res = client.next_sample("entropy", {})  # waits for the refit the labels asked for
    info = requests.get(f"{url}/info/", timeout=60).json()["train_stats"][model]
    run, version = info["last_run"], info["version"]
    assert run is not None and run["mode"] == "head", run
    assert run["images"] == 8 and run["published"] == (run["new_score"] >= run["served_score"])
    assert run["version"] == version
    assert res["id"] in ids[4:-4]
    scored = {k: v["image"]["info"]["medclass"][model] for k, v in _objects(url).items()}
    assert {s["version"] for s in scored.values()} == {version}


@pytest.fixture(scope="module")
def init_server(tmp_path_factory, trained, br35h_dir, label_server_launcher):
    """A new project: no checkpoint served, ``--conf init`` names a model.pt to start from."""
    import shutil

    start, stop = label_server_launcher
    base = tmp_path_factory.mktemp("label-init")
    studies = base / "studies"
    studies.mkdir()
    truth = {}
    # Other class names than the init model's (MONAI Label's launcher splits a --conf value at spaces).
    for cls, name in (("yes", "tumour"), ("no", "normal")):
        for p in sorted((br35h_dir / cls).glob("*.jpg"))[300:306]:
            shutil.copy(p, studies / f"{cls}_{p.stem}.jpg")
            truth[f"{cls}_{p.stem}"] = name
    proc, url = start(studies, base / "models", base / "server.log",
                      {"models": "resnet18", "classes": "normal,tumour", "image_size": "32",
                       "init": str(trained / "model.pt")})
    try:
        yield {"url": url, "model": "resnet18", "truth": truth, "model_dir": base / "models"}
    finally:
        stop(proc)


def test_the_first_training_starts_from_conf_init(init_server):
    from medclass.checkpoint import read_card

    url, model, truth = init_server["url"], init_server["model"], init_server["truth"]
    assert _version(url, model) is None  # nothing served yet
    ids = sorted(truth)  # six of each class
    for i in ids[1:-1]:
        _put_label(url, i, truth[i])
    run = _train(url, model, {})  # the default request: a head on the initial encoder
    assert run["mode"] == "probe" and run["published"] is True and run["served_score"] is None, run
    card = read_card(init_server["model_dir"] / model / "model.pt")
    assert card["training"]["init"]["path"] == "model.pt"
    assert card["training"]["config"]["freeze_encoder"] is True
    # Published, so scored before the task was done: a score strategy answers at once.
    res = MONAILabelClient(url).next_sample("margin", {})
    assert res["id"] in (ids[0], ids[-1])
    scored = {k: v["image"]["info"]["medclass"][model] for k, v in _objects(url).items()}
    assert {s["version"] for s in scored.values()} == {_version(url, model)}
