"""What the widget shows: server answers turned into results, training progress, the install plan."""

from __future__ import annotations

import pytest
from SlicerMedClassLib.dependencies import Missing, install_plan, missing_packages
from SlicerMedClassLib.results import ClassificationResult, result_from_server, training_progress


def test_server_answer_of_the_classification_app():
    answer = {"label": "yes", "probabilities": {"no": 0.25, "yes": 0.75}, "classes": ["no", "yes"],
              "model": "resnet18", "model_version": "3", "task": "binary"}
    r = result_from_server(answer, source="http://127.0.0.1:8000/resnet18")
    assert r.probabilities == {"no": 0.25, "yes": 0.75} and r.label == "yes" and r.task == "binary"
    assert r.classes == ["no", "yes"] and r.heatmap_node is None and r.note
    assert r.rows() == [("yes", 0.75), ("no", 0.25)]


def test_probabilities_as_a_list_take_the_class_order():
    r = result_from_server({"scores": [0.1, 0.7, 0.2]}, classes=["normal", "benign", "malignant"])
    assert r.probabilities == {"normal": 0.1, "benign": 0.7, "malignant": 0.2}
    assert r.label == "benign"  # no label sent: the most probable class


def test_multilabel_answer_keeps_the_list():
    r = result_from_server({"labels": ["effusion"], "probabilities": {"effusion": 0.8, "nodule": 0.1},
                            "task": "multilabel"})
    assert r.label == ["effusion"] and r.label_text() == "effusion"
    assert ClassificationResult({"a": 0.1}, []).label_text() == "(no finding above threshold)"


@pytest.mark.parametrize("answer, match", [
    ({"label": "x"}, "no class probabilities"),
    ({"probabilities": [0.5, 0.5]}, "2 probabilities but the model has 3"),
    ({"probabilities": {"a": float("nan"), "b": 1.0}}, "non-finite"),
    (["not", "an", "object"], "not a JSON object"),
])
def test_unusable_server_answers(answer, match):
    with pytest.raises(ValueError, match=match):
        result_from_server(answer, classes=["a", "b", "c"])


def test_training_progress_from_monai_label_task():
    assert training_progress(None).state == "none" and not training_progress(None).running
    task = {"id": "1", "status": "RUNNING", "start_ts": "2026-01-01 10:00:00",
            "details": ["loading 40 images", "Epoch 2/8 loss 0.41", "validation auc 0.81"]}
    p = training_progress(task)
    assert p.running and p.fraction == pytest.approx(0.25)
    assert "validation auc 0.81" in p.message and "10:00:00" in p.message
    assert training_progress({"status": "RUNNING", "details": ["starting"]}).fraction is None  # busy indicator
    done = training_progress({"status": "DONE", "details": ["epoch 8 of 8"]})
    assert not done.running and done.fraction == 1.0
    assert "failed" in training_progress({"status": "ERROR"}).message


def test_nothing_to_install_in_this_environment():
    assert missing_packages() == []  # torch and medclass are importable here
    assert "All Python packages" in install_plan([])


def test_install_plan_says_what_and_how_before_asking():
    plan = install_plan([Missing("torch", "torch>=2.13", "PyTorch extension", "runs the models"),
                         Missing("medclass", "slicer-medclass", "pip", "the shared core")])
    assert "torch>=2.13, through PyTorch extension" in plan
    assert "slicer-medclass, through pip" in plan
    assert plan.rstrip().endswith("Install now?")
