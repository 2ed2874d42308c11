"""Classifying and training without a server (SlicerMedClassLib.local.LocalTrainer) on real
Br35H images: a linear probe from an --init model.pt of another task, a head refit that is
published only when no worse on held-out labels, a short fine-tune, labels kept on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from SlicerMedClassLib.local import LocalTrainer

from medclass.checkpoint import read_card
from medclass.inference import Classifier
from medclass.labeling import heldout_split
from medclass.tasks import Task

CLASSES = ["normal", "tumour"]
FOLDER_CLASS = {"yes": "tumour", "no": "normal"}


def images(br35h_dir: Path, start: int, n: int) -> list[tuple[str, Path, str]]:
    out = []
    for folder, cls in FOLDER_CLASS.items():
        for p in sorted((br35h_dir / folder).glob("*.jpg"))[start : start + n]:
            out.append((f"{folder}_{p.stem}", p, cls))
    return out


def test_init_probe_then_refit_only_if_no_worse_then_fine_tune(trained, br35h_dir, tmp_path):
    trainer = LocalTrainer(tmp_path / "work", init=str(trained / "model.pt"), classes=CLASSES, device="cpu")
    assert trainer.checkpoint is None
    with pytest.raises(ValueError, match="no trained model"):
        trainer.classify([next((br35h_dir / "yes").glob("*.jpg"))])
    with pytest.raises(ValueError, match="too few labels"):
        trainer.add_label("only", next((br35h_dir / "yes").glob("*.jpg")), "tumour")
        trainer.refit()
    trainer.remove_label("only")
    labelled = images(br35h_dir, 500, 15)
    for key, path, cls in labelled:
        trainer.add_label(key, path, cls)

    # The first refit: a linear probe on the --init model's encoder (another task: a new head).
    first = trainer.refit()
    assert first["published"] is True and first["mode"] == "probe" and first["served_score"] is None
    assert first["fit_seconds"] < first["seconds"]
    card = read_card(trainer.checkpoint)
    assert card["task"] == Task("binary", CLASSES).as_dict()
    assert card["training"]["init"]["path"] == "model.pt" and card["training"]["init"]["kind"] == "checkpoint"
    assert trainer.served_init() == card["training"]["init"]
    preds = trainer.classify([p for _k, p, _c in images(br35h_dir, 800, 2)])
    assert len(preds) == 4 and all(p.label in CLASSES for p in preds)

    # Training labels inverted, held-out ones right: the refitted head is worse on the held-out
    # images, so the working model stays; with force it is replaced.
    version = trainer.published.version
    split = heldout_split([(k, "", [c]) for k, _p, c in labelled], trainer.task)
    other = {"tumour": "normal", "normal": "tumour"}
    for key, path, cls in labelled:
        trainer.add_label(key, path, cls if split[key] == "test" else other[cls])
    kept = trainer.refit()
    assert kept["mode"] == "head" and kept["published"] is False, kept
    assert "kept the served model" in kept["message"] and trainer.published.version == version
    forced = trainer.refit(force=True)
    assert forced["published"] is True and trainer.published.version != version

    # Labels live in the folder: a new trainer on it has them (and the working model).
    for key, path, cls in labelled:
        trainer.add_label(key, path, cls)
    again = LocalTrainer(tmp_path / "work", device="cpu")
    assert again.classes == CLASSES and len(again.labels) == len(labelled)
    # A short fine-tune of the whole model, --init the working model: published iff no worse.
    before = again.published.version
    tuned = again.fine_tune(epochs=1, batch_size=16)
    assert tuned["mode"] == "full" and tuned["init"] == str(again.checkpoint)
    assert tuned["published"] == (tuned["new_score"] >= tuned["served_score"])
    assert (again.published.version != before) == tuned["published"]
    run_card = read_card(Path(tuned["run"]) / "model.pt")
    assert run_card["training"]["init"]["kind"] == "checkpoint"
    assert run_card["training"]["config"]["freeze_encoder"] is False


def test_a_checkpoint_classifies_as_the_core_does_and_refits_its_head(trained, br35h_dir, tmp_path):
    trainer = LocalTrainer(tmp_path / "work", checkpoint=trained / "model.pt", device="cpu")
    assert trainer.classes == read_card(trained / "model.pt")["task"]["classes"]
    paths = [p for _k, p, _c in images(br35h_dir, 820, 2)]
    core = Classifier(trained / "model.pt", "cpu").predict_paths(paths)
    mine = trainer.classify(paths)
    for a, b in zip(core, mine):
        assert a.label == b.label
        for c in a.probabilities:
            assert b.probabilities[c] == pytest.approx(a.probabilities[c], abs=1e-6)
    names = {"tumour": "tumour", "normal": "no tumour"}
    for key, path, cls in images(br35h_dir, 600, 12):
        trainer.add_label(key, path, names[cls])
    run = trainer.refit()
    assert run["mode"] == "head" and run["published"] == (run["new_score"] >= run["served_score"])
    with pytest.raises(ValueError, match="unknown class"):
        trainer.add_label("x", paths[0], "normal")
    with pytest.raises(ValueError, match="encoder|not a medclass checkpoint"):
        LocalTrainer(tmp_path / "other", checkpoint=tmp_path / "work" / "labels.json")
