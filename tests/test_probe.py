"""The linear probe (medclass.probe) on real Br35H images: a head on an encoder from a
short real pretraining run, a head refit of a trained model.pt, the model card of the
result, and publication only when the new head is no worse on held-out labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medclass.checkpoint import load_checkpoint, read_card
from medclass.errors import MedClassError
from medclass.inference import Classifier
from medclass.probe import embed, probe_start, refit_probe
from medclass.tasks import Task

TASK = Task("binary", ["normal", "tumour"])


def labelled(br35h_dir: Path, names: dict[str, str], start: int, n: int) -> list[tuple[str, Path, list[str]]]:
    """``n`` real images of each Br35H folder, as (id, path, [class])."""
    out = []
    for folder, cls in names.items():
        for p in sorted((br35h_dir / folder).glob("*.jpg"))[start : start + n]:
            out.append((f"{folder}_{p.stem}", p, [cls]))
    return out


def test_a_probe_on_an_encoder_is_a_normal_model_with_a_correct_card(encoder, br35h_dir, tmp_path):
    items = labelled(br35h_dir, {"yes": "tumour", "no": "normal"}, 400, 20)
    start = probe_start(encoder, TASK)
    assert start.kind == "encoder" and start.init["kind"] == "encoder"
    result = refit_probe(start, items, tmp_path / "model.pt")
    s = result.summary
    assert s["published"] is True and s["served_score"] is None  # nothing to compare with
    assert s["n_train"] + s["n_heldout"] == 40 and s["n_heldout"] >= 2
    card = read_card(result.checkpoint)
    assert card.get("kind") is None and card["task"] == TASK.as_dict()
    assert card["model"]["name"] == "cbam-resnet18" and card["model"]["args"]["width"] == 8
    assert card["training"]["mode"] == "probe" and card["training"]["freeze_encoder"] is True
    assert card["training"]["init"]["kind"] == "encoder" and card["training"]["init"]["path"] == encoder.name
    assert "calibration" not in card
    assert card["data"]["n"] == 40 and len(card["data"]["test_keys"]) == s["n_heldout"]
    assert card["metrics"]["split"] == "heldout"
    # The encoder is the pretrained one, unchanged: only head.* differs from the encoder's weights.
    loaded = load_checkpoint(result.checkpoint, "cpu")
    enc = start.model.state_dict()
    for k, v in loaded.model.state_dict().items():
        if not k.startswith("head."):
            assert np.array_equal(v.numpy(), enc[k].numpy()), k
    # It classifies like any model.pt, and its probabilities are the fitted head's.
    clf = Classifier(result.checkpoint, "cpu")
    images = [clf.read(p) for _i, p, _n in items[:4]]
    probs = clf.probabilities(images)
    from medclass.labeling import head_probabilities

    np.testing.assert_allclose(probs, head_probabilities(result.model, TASK, embed(start, images)), atol=1e-5)


def test_a_refit_of_a_trained_model_keeps_its_lineage_and_is_published_only_if_no_worse(trained, br35h_dir,
                                                                                       tmp_path):
    served = Classifier(trained / "model.pt", "cpu")
    task = served.task
    names = {"yes": "tumour", "no": "no tumour"}
    start = probe_start(trained / "model.pt")
    assert start.kind == "checkpoint" and start.task == task
    items = labelled(br35h_dir, names, 700, 20)
    ok = refit_probe(start, items, tmp_path / "ok.pt", served=served)
    assert ok.summary["published"] == (ok.summary["new_score"] >= ok.summary["served_score"])
    # Training labels inverted, held-out ones right: the new head ranks the held-out images
    # inversely, so it is kept out; force writes it anyway.
    from medclass.labeling import heldout_split

    split = heldout_split([(i, "", n) for i, _p, n in items], task)
    other = {"tumour": "no tumour", "no tumour": "tumour"}
    wrong = [(i, p, n if split[i] == "test" else [other[n[0]]]) for i, p, n in items]
    kept = refit_probe(start, wrong, tmp_path / "worse.pt", served=served)
    assert kept.checkpoint is None and not (tmp_path / "worse.pt").exists()
    assert kept.summary["published"] is False and "kept the served model" in kept.summary["message"]
    forced = refit_probe(start, wrong, tmp_path / "forced.pt", served=served, force=True)
    assert forced.summary["published"] is True
    card = read_card(forced.checkpoint)
    assert card["training"]["mode"] == "head" and card["training"]["source"] == "model.pt"
    assert card["task"] == read_card(trained / "model.pt")["task"]
    assert card["class_codes"] == read_card(trained / "model.pt")["class_codes"]


def test_too_few_labels_and_a_classic_model_are_messages(trained, br35h_dir, tmp_path):
    start = probe_start(trained / "model.pt")
    items = labelled(br35h_dir, {"yes": "tumour", "no": "no tumour"}, 900, 3)[:4]  # 3 tumour, 1 no tumour
    with pytest.raises(MedClassError, match="too few labels"):
        refit_probe(start, items, tmp_path / "m.pt")
    with pytest.raises(MedClassError, match="which classes|does not say"):
        probe_start(tmp_path / "missing.pt")
