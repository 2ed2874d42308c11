"""The module's MONAI Label client against the real server (``monailabel start_server``
with the project's app, the session fixture ``label_server`` of tests/conftest.py).

The server is shared with tests/label, whose training test labels every image and
replaces the served model: comparisons use the checkpoint the server publishes
(``model_dir/<model>/model.pt``), and the fixture ``unlabelled`` gives some images
back before the active-learning tests.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import slicer
from mrml_volumes import ijk_to_ras, load_with_slicer_reader, volume_from_picture
from pydicom.data import get_testdata_file
from SlicerMedClassLib.client import MonaiLabelClient, MonaiLabelError
from SlicerMedClassLib.results import result_from_server, training_progress


@pytest.fixture(scope="module")
def client(label_server) -> MonaiLabelClient:
    return MonaiLabelClient(label_server.url, timeout=300, client_id="slicer-tests")


def truth(server, image_id: str) -> str:
    return server.truth[image_id]


def served_checkpoint(server) -> Path:
    """The checkpoint the app serves now (the fixture's, until a training run replaces it)."""
    path = server.model_dir / server.model / "model.pt"
    assert path.is_file(), f"the app publishes its model at {path}"
    return path


def labelled(client) -> set[str]:
    objects = client.datastore("all")["objects"]
    return {k for k, v in objects.items() if (v.get("labels") or {}).get("final")}


@pytest.fixture
def unlabelled(label_server, client) -> list[str]:
    """Image ids without a final label; when every image is labelled, some labels are removed."""
    done = labelled(client)
    free = [i for i in label_server.image_ids if i not in done]
    if len(free) < 12:
        for image_id in [i for i in label_server.image_ids if i in done][: 12 - len(free)]:
            req = urllib.request.Request(f"{label_server.url}/datastore/label?id={image_id}&tag=final",
                                         method="DELETE")
            urllib.request.urlopen(req, timeout=60).read()
        # The datastore notices the removed label files through its file watcher, a moment later.
        while len(free) < 12:
            time.sleep(0.5)
            done = labelled(client)
            free = [i for i in label_server.image_ids if i not in done]
    assert free
    return free


# --------------------------------------------------------------------------- info and inference


def test_info_lists_the_model_as_classification_with_its_classes(label_server, client):
    info = client.info()
    assert info["models"][label_server.model]["type"] == "classification"
    assert client.classification_models(info) == {label_server.model: label_server.classes}
    assert {"random", "entropy", "margin", "bald"} <= set(client.strategies(info))


def test_infer_an_image_id_returns_a_probability_per_class(label_server, client):
    from medclass.inference import Classifier

    image_id = label_server.image_ids[0]
    answer = client.infer(label_server.model, image_id)
    result = result_from_server(answer, label_server.classes)
    assert set(result.probabilities) == set(label_server.classes)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert result.label in label_server.classes
    local = Classifier(served_checkpoint(label_server), device="cpu").predict_paths(
        [label_server.studies / f"{image_id}.jpg"])
    for name, p in local[0].probabilities.items():
        assert result.probabilities[name] == pytest.approx(p, abs=1e-4)


def test_server_heat_map_lands_on_the_volume_loaded_from_the_same_image(label_server, client, tmp_path):
    from SlicerMedClassLib.logic import ClassificationLogic

    image_id = label_server.image_ids[-2]
    path = client.download_image(image_id, tmp_path)
    assert path.read_bytes() == (label_server.studies / f"{image_id}.jpg").read_bytes()
    scene = slicer.vtkMRMLScene()
    volume = volume_from_picture(scene, path, scalar=False)

    answer, heat_file = client.infer_heatmap(label_server.model, tmp_path, image_id=image_id)
    result = ClassificationLogic(scene).server_result(volume, answer, heat_file, label_server.classes)

    assert heat_file is not None and heat_file.is_file()
    heat = result.heatmap_node
    assert heat is not None and scene.GetNodeByID(heat.GetID()) is heat
    assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(ijk_to_ras(heat), ijk_to_ras(volume))
    values = slicer.util.arrayFromVolume(heat)
    assert values.min() >= 0 and values.max() <= 1 and np.ptp(values) > 0.5
    assert result.method == answer["heatmap_method"] == "gradcam"


def test_a_volume_saved_from_slicer_is_classified_by_upload_like_locally(label_server, client, tmp_path):
    from SlicerMedClassLib.logic import ClassificationLogic

    scene = slicer.vtkMRMLScene()
    volume = load_with_slicer_reader(scene, get_testdata_file("CT_small.dcm"))
    # What SlicerMedClassLogic.saveVolumeForUpload does: NRRD through Slicer's storage node.
    nrrd = tmp_path / "ct.nrrd"
    writer = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    writer.SetFileName(str(nrrd))
    writer.SetUseCompression(0)
    assert writer.WriteData(volume)

    remote = result_from_server(client.infer_file(label_server.model, nrrd), label_server.classes)
    answer, heat_file = client.infer_heatmap(label_server.model, tmp_path / "heat", file=nrrd)
    local = ClassificationLogic(scene, device="cpu").classify(volume, served_checkpoint(label_server))

    for name, p in local.probabilities.items():
        assert remote.probabilities[name] == pytest.approx(p, abs=1e-4)
        assert answer["probabilities"][name] == pytest.approx(p, abs=1e-4)
    assert heat_file is not None


def test_infer_of_a_missing_image_carries_the_servers_message(label_server, client):
    with pytest.raises(MonaiLabelError) as e:
        client.infer(label_server.model, "no_such_image")
    assert 400 <= e.value.status < 500
    assert "no_such_image" in str(e.value) and label_server.url in str(e.value)
    assert e.value.detail


# --------------------------------------------------------------------------- labels


def test_save_label_then_the_datastore_shows_it_labelled(label_server, client):
    image_id = label_server.image_ids[-1]
    before = client.datastore()
    answer = client.save_label(image_id, label=truth(label_server, image_id))
    assert answer["image"] == image_id
    assert image_id in labelled(client)
    stats = client.datastore()
    assert stats["total"] == before["total"]
    assert stats["completed"] >= 1 and stats["label_tags"].get("final", 0) >= 1
    stored = client.datastore("all")["objects"][image_id]["labels"]["final"]
    assert stored["info"].get("label") == truth(label_server, image_id)


def test_unknown_class_is_a_value_error_with_the_servers_4xx_message(label_server, client):
    image_id = label_server.image_ids[-3]
    with pytest.raises(ValueError) as e:
        client.save_label(image_id, label="glioblastoma multiforme")
    err = e.value
    assert isinstance(err, MonaiLabelError) and 400 <= err.status < 500
    assert "glioblastoma multiforme" in err.detail and "unknown class" in err.detail.lower()
    assert f"HTTP {err.status}" in str(err) and "/datastore/label" in str(err)


def test_label_arguments_are_checked_before_sending(client):
    with pytest.raises(ValueError, match="either label"):
        client.save_label("x", label="a", labels=["b"])
    with pytest.raises(ValueError, match="no image id"):
        client.save_label("", label="a")


# --------------------------------------------------------------------------- active learning


@pytest.mark.parametrize("strategy", ["random", "entropy", "margin", "least-confidence", "bald", "coreset", "hybrid"])
def test_next_sample_returns_an_unlabelled_image(label_server, client, unlabelled, strategy):
    # Uncertainty strategies need the scoring task's scores: the widget's call scores when the server says so.
    sample = client.next_sample_scored(strategy, client_id=f"slicer-{strategy}")
    assert sample is not None
    assert sample["id"] in set(label_server.image_ids) | {"broken_image"}
    assert sample["id"] not in labelled(client)


def test_uncertainty_strategy_without_scores_is_a_409_naming_the_scoring_task(label_server, client, unlabelled):
    # Labels changed since the last scoring (the fixture may have removed some): new scores are needed
    # only for images never scored; ask the app directly and accept either answer.
    try:
        sample = client.next_sample("margin", client_id="slicer-409")
    except MonaiLabelError as e:
        assert e.status == 409 and "scoring" in e.detail
    else:
        assert sample is None or sample["id"] not in labelled(client)
    assert "medclass_uncertainty" in client.scoring_methods()


def test_unknown_strategy_is_a_value_error(client):
    with pytest.raises(MonaiLabelError) as e:
        client.next_sample("no-such-strategy")
    assert e.value.status is not None and e.value.status >= 400


# --------------------------------------------------------------------------- training


def test_train_reports_progress_until_done_then_stop_ends_a_run(label_server, client):
    for image_id in label_server.image_ids[:6] + label_server.image_ids[-6:]:  # both classes
        client.save_label(image_id, label=truth(label_server, image_id))
    task = client.train(label_server.model, {"max_epochs": 1})
    assert task.get("id") and task.get("status") in ("SUBMITTED", "RUNNING")
    seen = [training_progress(client.train_status())]
    while seen[-1].running:  # SUBMITTED until the worker thread starts the process, then RUNNING
        time.sleep(1)
        seen.append(training_progress(client.train_status()))
    final = seen[-1]
    assert final.state == "DONE", final.message
    assert final.fraction == 1.0 and not final.running

    client.train(label_server.model, {"max_epochs": 50, "mode": "full"})  # long enough to stop
    while not client.train_status(check_if_running=True):  # the process starts on a worker thread
        time.sleep(0.2)
    assert training_progress(client.train_status()).running
    stopped = client.stop_train()
    assert stopped["status"] == "STOPPED"
    assert client.train_status(check_if_running=True) is False
    assert training_progress(client.train_status()).state == "STOPPED"


# --------------------------------------------------------------------------- failures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_value_error_with_a_remedy():
    port = free_port()  # nothing listens there any more
    client = MonaiLabelClient(f"http://127.0.0.1:{port}", timeout=10)
    with pytest.raises(ValueError) as e:
        client.info()
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "cannot reach" in msg and "start_server" in msg
    assert e.value.status is None


def test_a_server_that_is_not_monai_label_is_named_as_such(tmp_path):
    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "index.html").write_text("<html>a web page</html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        client = MonaiLabelClient(f"http://127.0.0.1:{httpd.server_address[1]}", timeout=30)
        with pytest.raises(ValueError, match="not with JSON"):
            client.info()
        with pytest.raises(MonaiLabelError) as e:
            client.datastore()  # no such path on this server: its 404 page, not JSON
        assert e.value.status == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("url", ["", "ftp://example.org", "http://"])
def test_bad_server_urls(url):
    with pytest.raises(ValueError):
        MonaiLabelClient(url)


def test_url_without_scheme_means_http():
    assert MonaiLabelClient("127.0.0.1:8000/").server_url == "http://127.0.0.1:8000"


def test_datastore_image_download_into_a_file_path(label_server, client, tmp_path):
    image_id = label_server.image_ids[5]
    dest = client.download_image(image_id, tmp_path / "sub" / "copy.jpg")
    assert dest == tmp_path / "sub" / "copy.jpg"
    assert dest.read_bytes() == (label_server.studies / f"{image_id}.jpg").read_bytes()
    json.dumps(client.datastore())  # plain JSON types
    assert Path(dest).stat().st_size > 1000


def test_the_client_knows_the_strategies_medclass_offers():
    # The client imports without medclass, so it keeps a copy of the strategy names.
    from SlicerMedClassLib.client import DEFAULT_STRATEGIES

    from medclass.active import STRATEGIES

    assert tuple(DEFAULT_STRATEGIES) == tuple(STRATEGIES)
