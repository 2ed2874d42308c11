"""Evaluate a checkpoint on a dataset, by default on the held-out split it records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medclass.checkpoint import load_checkpoint
from medclass.data import load_dataset, materialize
from medclass.errors import MedClassError
from medclass.inference import forward_logits, forward_probabilities

SPLITS = ("test", "val", "all")


def select_split(card: dict[str, Any], ds, split: str) -> list[int]:
    """Indices of ``ds`` in ``split`` as recorded in the model card."""
    if split == "all":
        return list(range(len(ds)))
    if split not in SPLITS:
        raise MedClassError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    data = card.get("data", {})
    keys = data.get(f"{split}_keys")
    if keys is None:
        raise MedClassError(f"the checkpoint records no {split} split", "use --split all")
    if data.get("fingerprint") and data["fingerprint"] != ds.fingerprint:
        raise MedClassError(
            f"--data {ds.name} is not the dataset this model was trained on (fingerprint {ds.fingerprint}, "
            f"card {data['fingerprint']}); its {split} split cannot be reproduced",
            "use --split all to evaluate on every image of this dataset")
    where = {s.key: i for i, s in enumerate(ds.samples)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise MedClassError(f"{len(missing)} image(s) of the recorded {split} split are missing, e.g. {missing[0]}",
                            "use --split all")
    return [where[k] for k in keys]


def evaluate_checkpoint(checkpoint: str | Path | None, data: str | None, out: str | Path, split: str = "test",
                        device: str = "auto", n_boot: int = 1000, inference: str | None = None) -> dict[str, Any]:
    """Write ``out/metrics.json`` and the ROC, confusion and reliability plots.

    With ``inference="triton://HOST:PORT/MODEL"`` the forward passes run on that Triton
    server (see :class:`~medclass.inference.Classifier`); ``checkpoint`` is then optional
    (the served model's card records the dataset and split), and the calibration section
    (which needs the uncalibrated logits of a local model) is left out.
    """
    from medclass.metrics import evaluation_report
    from medclass.remote import is_remote

    remedy = "evaluate on data labelled with the model's classes"
    clf = None
    if is_remote(inference):
        from medclass.inference import Classifier

        clf = Classifier(checkpoint, device, inference=inference)
        loaded, ds = clf.loaded, _dataset_for(clf.loaded, data, remedy)
    else:
        loaded, ds = _model_and_data(checkpoint, data, device, remedy)
    card = loaded.card
    idx = select_split(card, ds, split)
    ts = materialize(ds, idx, loaded.preprocess_spec, multimodal=loaded.family == "crossmodal")
    probs = clf.forward(ts.x, ts.extra()) if clf is not None else forward_probabilities(loaded, ts.x, ts.extra())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluation_report(loaded.task.type, ts.y.numpy(), probs, loaded.task.classes, out, n_boot=n_boot)
    if card.get("calibration") and clf is None:
        metrics["calibration"] = calibration_effect(loaded, ts, probs)
    metrics.update(split=split, data=data, checkpoint=None if checkpoint is None else str(checkpoint),
                   model=loaded.name, skipped=ts.skipped)
    if clf is not None:
        metrics["inference"] = clf.inference
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def calibration_effect(loaded, ts, probs) -> dict[str, Any]:
    """ECE without and with the card's calibration on ``ts``, and (binary tasks) what the
    validation operating point at sensitivity >= 0.95 gives on it."""
    from medclass.calibration import OPERATING_METRICS, operating_point
    from medclass.metrics import compute_metrics

    task = loaded.task
    y = ts.y.numpy()
    raw = forward_probabilities(loaded, ts.x, ts.extra(), calibrated=False)
    cal = loaded.card["calibration"]
    out: dict[str, Any] = {"method": cal.get("method"), "temperature": cal.get("temperature"),
                           "ece_uncalibrated": compute_metrics(task.type, y, raw, task.classes)["ece"],
                           "ece_calibrated": compute_metrics(task.type, y, probs, task.classes)["ece"]}
    if task.type == "binary" and (cal.get("roc") or {}).get("val"):
        positive = task.classes[1]
        points = []
        for metric in OPERATING_METRICS:
            op = operating_point(loaded.card, positive, metric, 0.95)
            fires = probs[:, 1] >= op["threshold"]
            pos = y == 1
            op["sensitivity"] = float(fires[pos].mean()) if pos.any() else None
            op["specificity"] = float((~fires[~pos]).mean()) if (~pos).any() else None
            points.append(op)
        out["operating_points"] = points
    return out


def calibrate_checkpoint(checkpoint: str | Path, data: str | None = None, out: str | Path | None = None,
                         device: str = "auto") -> dict[str, Any]:
    """(Re)fit a checkpoint's calibration on the validation split its card records.

    Parameters
    ----------
    checkpoint : str or Path
        A ``model.pt``.
    data : str, optional
        The dataset (defaults to the one recorded in the card; must be the same images).
    out : str or Path, optional
        Where to write the calibrated checkpoint; defaults to replacing ``checkpoint``
        (atomically).
    device : str

    Returns
    -------
    dict
        The card's new ``calibration`` section.
    """
    from medclass.checkpoint import save_checkpoint

    loaded, ds = _model_and_data(checkpoint, data, device, "calibrate on the data the model was trained on")
    card = loaded.card
    mm = loaded.family == "crossmodal"
    val = materialize(ds, select_split(card, ds, "val"), loaded.preprocess_spec, multimodal=mm)
    try:
        test = materialize(ds, select_split(card, ds, "test"), loaded.preprocess_spec, multimodal=mm)
    except MedClassError:
        test = None
    card["calibration"] = calibrate_model(loaded, val, test)
    save_checkpoint(out or checkpoint, loaded.model, card)
    return card["calibration"]


def calibrate_model(loaded, val_set, test_set=None, batch_size: int = 64) -> dict[str, Any]:
    """:func:`medclass.calibration.calibrate` for a loaded model on materialised splits (:class:`medclass.data.TensorSet`).

    Used at the end of :func:`medclass.training.train` and by ``medclass calibrate``.
    """
    def outputs(ts):
        return forward_logits(loaded, ts.x, ts.extra(), batch_size).double().numpy(), ts.y.numpy()

    vz, vy = outputs(val_set)
    tz, ty = outputs(test_set) if test_set is not None and len(test_set) else (None, None)
    link = None
    if not loaded.is_torch:  # log-probabilities: softmax gives the model's own probabilities back
        def link(z):
            return torch.softmax(z, dim=1)
    from medclass.calibration import calibrate

    return calibrate(loaded.task.type, loaded.task.classes, vz, vy, tz, ty, rescale=loaded.is_torch, link=link)


def _model_and_data(checkpoint, data: str | None, device: str, remedy: str):
    """The loaded checkpoint and its dataset (``data``, else the one its card records), classes checked."""
    loaded = load_checkpoint(checkpoint, device)
    return loaded, _dataset_for(loaded, data, remedy)


def _dataset_for(loaded, data: str | None, remedy: str):
    """The dataset ``data`` (else the one the card records), its classes checked against the model's."""
    data = data or loaded.card.get("data", {}).get("spec")
    if not data:
        raise MedClassError("no --data given and the checkpoint records none", "pass --data")
    ds = load_dataset(data, loaded.card["task"]["type"])
    if ds.task.classes != loaded.task.classes:
        raise MedClassError(f"the dataset's classes {ds.task.classes} differ from the model's {loaded.task.classes}",
                            remedy)
    return ds
