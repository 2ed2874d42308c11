"""The linear probe: a classifier head fitted on a fixed encoder's embeddings, in seconds.

Every front door that refits a head goes through here: the MONAI Label app after
each label (its embeddings come from the scoring run), the Slicer module without
a server (:class:`SlicerMedClassLib.local.LocalTrainer`), anything that wants a
classifier from an encoder and a few hundred labels.

* :func:`probe_start`: the network to probe. A medclass ``model.pt`` of the same
  task keeps its head as the starting point; an encoder (``medclass pretrain``), a
  ``model.pt`` of another task, a state dict or a named initialisation
  (``imagenet``) is loaded with ``--init`` semantics
  (:func:`medclass.transfer.load_init`) into a model with a new head.
* :func:`embed`: the encoder's pooled embeddings of images, in eval mode.
* :func:`medclass.labeling.fit_head`: the logistic regression on them (L-BFGS,
  class-weighted, L2), the one fitting routine.
* :func:`probe_card`: the model card of the result. The encoder is unchanged, so
  what the card says about the encoder (its ``init``) is carried over; the source's
  calibration and operating points belonged to the old head and are dropped.
* :func:`refit_probe`: all of it on labelled images, held-out split by image id
  (:func:`medclass.labeling.heldout_split`), written only when the new head is no
  worse on the held-out images than the model it would replace.
"""

from __future__ import annotations

import copy
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medclass.errors import MedClassError
from medclass.tasks import Task


@dataclass
class ProbeStart:
    """The network a head is fitted on.

    Attributes
    ----------
    model : torch.nn.Module
        Eval mode, on the CPU; its ``head`` is the starting point of the fit.
    card : dict
        The source's model card (an encoder's, or a ``model.pt``'s).
    task : Task
        The task the head predicts.
    preprocess : dict
        The preprocessing spec the encoder was trained with.
    init : dict or None
        ``training.init`` of the result: the :class:`~medclass.transfer.InitReport`
        of a newly loaded initialisation, else the source's own.
    source : str
        The file (or name) the network came from.
    """

    model: Any
    card: dict[str, Any]
    task: Task
    preprocess: dict[str, Any]
    init: dict[str, Any] | None
    source: str
    kind: str = "checkpoint"
    notes: list[str] = field(default_factory=list)


def probe_start(source: str | Path, task: Task | None = None, model: str | None = None,
                image_size: int | None = None) -> ProbeStart:
    """The network to fit a head on, from ``source`` with ``--init`` semantics.

    Parameters
    ----------
    source : str or Path
        A medclass ``model.pt`` (of this task: its head is refitted; of another: a
        new head), an encoder checkpoint from ``medclass pretrain``, a plain state
        dict, or a name the model offers (``imagenet``; needs ``model``).
    task : Task, optional
        The task to predict; default: the source's (a ``model.pt``).
    model : str, optional
        Registry name, for a state dict or a named initialisation.
    image_size : int, optional
        Input size, for a state dict or a named initialisation (default 64).

    Raises
    ------
    MedClassError
        No task known, a classic model, or weights that do not fit (one line).
    """
    import torch

    from medclass.checkpoint import load_checkpoint, read_card
    from medclass.labeling import has_linear_head
    from medclass.models import create_model
    from medclass.transfer import load_init

    path = Path(str(source)).expanduser()
    card: dict[str, Any] = {}
    if path.is_file():
        try:
            card = read_card(path)
        except MedClassError:
            card = {}  # a plain state dict
    if card and card.get("kind") != "encoder" and "weights.pt" not in _members(path):
        raise MedClassError(f"{path.name} is a classic (non-torch) model: it has no encoder to fit a head on",
                            "start from a cnn or attention model, or an encoder from 'medclass pretrain'")
    own_task = Task(**card["task"]) if card.get("task") else None
    task = task or own_task
    if task is None:
        raise MedClassError(f"{Path(str(source)).name} does not say which classes to predict",
                            "give the class names (an encoder or a state dict has none)")
    if own_task is not None and card.get("kind") != "encoder" and _same_task(own_task, task):
        loaded = load_checkpoint(path, "cpu")
        net = loaded.model
        init = (card.get("training") or {}).get("init")
        start = ProbeStart(net, card, task, dict(card["preprocess"]), init, str(path), "checkpoint")
    else:
        name = (card.get("model") or {}).get("name") or model
        if not name:
            raise MedClassError(f"--init {source}: which model is it for?", "give the model name (--model)")
        args = dict((card.get("model") or {}).get("args") or {})
        spec = dict(card.get("preprocess") or {"spatial_dims": 2, "image_size": image_size or 64, "channels": 1})
        if image_size:
            spec["image_size"] = image_size
        args.update(spatial_dims=spec.get("spatial_dims", 2), num_outputs=task.num_outputs,
                    image_size=spec["image_size"])
        args.setdefault("in_channels", spec.get("channels", 1))
        net = create_model(name, **args)
        report = load_init(net, source)
        net.eval()
        kind = "encoder" if card.get("kind") == "encoder" else report.kind
        start = ProbeStart(net, card or {"model": {"name": name, "args": args}, "preprocess": spec}, task, spec,
                           report.as_card(), str(source), kind, [report.summary()])
    if not has_linear_head(start.model):
        raise MedClassError(f"{start.card.get('model', {}).get('name')} has no linear head on an embedding",
                            "fine-tune the whole model instead")
    start.model = start.model.to(torch.device("cpu")).eval()
    return start


def _members(path: Path) -> set[str]:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return set()


def _same_task(a: Task, b: Task) -> bool:
    return a.type == b.type and list(a.classes) == list(b.classes)


def embed(start: ProbeStart, images: list, batch_size: int = 64) -> np.ndarray:
    """``(N, F)`` float32 embeddings (``forward_features``, eval mode) of :class:`~medclass.io.ImageData` objects."""
    import torch

    from medclass.active.scores import embeddings
    from medclass.checkpoint import LoadedModel
    from medclass.transforms import preprocess

    if not images:
        return np.zeros((0, 0), np.float32)
    x = torch.stack([preprocess(im, start.preprocess) for im in images])
    return embeddings(LoadedModel(start.model, {}, start.task, torch.device("cpu")), x, batch_size=batch_size)


def probe_card(source_card: dict[str, Any], model: Any, task: Task, preprocess: dict[str, Any],
               data: dict[str, Any], metrics: dict[str, Any], training: dict[str, Any],
               init: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model card of a network whose head was refitted on a fixed encoder.

    Parameters
    ----------
    source_card : dict
        The card of the network the encoder came from (``model.pt`` or encoder).
    model : torch.nn.Module
        The refitted network (its registry arguments come from ``source_card``).
    task : Task
        What the new head predicts.
    preprocess : dict
        The encoder's preprocessing spec.
    data, metrics : dict
        What the head was fitted on, and its held-out metrics.
    training : dict
        How (``mode``, ``seconds``, ...); ``init`` is added.
    init : dict, optional
        ``training.init`` (where the encoder's weights came from); default: the source's.

    Returns
    -------
    dict
        A normal card (loads with :func:`medclass.checkpoint.load_checkpoint`), without
        the source's calibration: it was fitted to the old head's logits.
    """
    from medclass.checkpoint import make_card

    m = source_card.get("model") or {}
    args = dict(m.get("args") or {})
    args["num_outputs"] = task.num_outputs
    same = source_card.get("task") and _same_task(Task(**source_card["task"]), task)
    codes = {c: tuple(v) for c, v in (source_card.get("class_codes") or {}).items()} if same else None
    source_init = (source_card.get("training") or {}).get("init")
    training = {**training, "init": init if init is not None else source_init, "freeze_encoder": True,
                "trained_parameters": "head"}
    card = make_card(m["name"], args, task, dict(preprocess), codes, data,
                     {k: v for k, v in metrics.items() if k not in ("per_class", "per_label")}, training,
                     source_card.get("aggregation", "mean") if same else "mean")
    for key in ("modality", "body_part"):
        if (source_card.get("data") or {}).get(key) is not None and key not in card["data"]:
            card["data"][key] = source_card["data"][key]
    card["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return card


@dataclass
class ProbeResult:
    """What :func:`refit_probe` did."""

    checkpoint: Path | None
    summary: dict[str, Any]
    model: Any = None
    card: dict[str, Any] | None = None


def refit_probe(start: ProbeStart, items: list[tuple[str, Any, list[str]]], out: str | Path,
                served=None, force: bool = False, seed: int = 0, read=None) -> ProbeResult:
    """Fit ``start``'s head on labelled images; write ``out`` only if no worse than ``served``.

    Parameters
    ----------
    start : ProbeStart
        The encoder (and starting head).
    items : list of (str, image, list of str)
        ``(image id, file path or ImageData, class names)`` of every labelled image.
    out : str or Path
        Where the new ``model.pt`` is written (when it is published).
    served : Classifier, optional
        The model the new one would replace; compared on the same held-out images.
    force : bool
        Write it whatever the comparison says.
    seed : int
        Seeds the fit.
    read : callable, optional
        Path to :class:`~medclass.io.ImageData` (default :func:`medclass.io.read_image`).

    Returns
    -------
    ProbeResult
        ``checkpoint`` is ``None`` when the served model was kept; ``summary`` says
        why (``published``, ``metric``, ``new_score``, ``served_score``, ``fit_seconds``).

    Raises
    ------
    MedClassError
        Too few labels of a class (one is held out), or no image could be read.
    """
    from medclass.checkpoint import save_checkpoint
    from medclass.io import read_image
    from medclass.labeling import (
        decide_publication,
        encode_label,
        fit_head,
        head_probabilities,
        heldout_split,
        labelled_set,
    )
    from medclass.metrics import compute_metrics

    t0 = time.perf_counter()
    task = start.task
    read = read or read_image
    images, usable, skipped = [], [], []
    for key, src, names in items:
        try:
            images.append(src if hasattr(src, "array") else read(src))
            usable.append((key, src, names))
        except MedClassError as e:
            skipped.append(f"{key}: {e}")
    if not usable:
        raise MedClassError("none of the labelled images could be read", "label readable images")
    split = heldout_split([(k, "", n) for k, _s, n in usable], task)
    emb = embed(start, images)
    y = [encode_label(n, task) for _k, _s, n in usable]
    tr = [j for j, (k, *_r) in enumerate(usable) if split[k] == "train"]
    ho = [j for j, (k, *_r) in enumerate(usable) if split[k] == "test"]
    embed_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    net = fit_head(start.model, task, emb[tr], [y[j] for j in tr], seed=seed)
    fit_s = time.perf_counter() - t1
    y_ho = np.asarray([y[j] for j in ho])
    new_probs = head_probabilities(net, task, emb[ho])
    served_probs = served.probabilities([images[j] for j in ho]) if served is not None else None
    decision = decide_publication(task, y_ho, new_probs, served_probs, force)
    summary = {**decision.as_dict(), "images": len(usable), "n_train": len(tr), "n_heldout": len(ho),
               "skipped": skipped, "embed_seconds": round(embed_s, 3), "fit_seconds": round(fit_s, 3),
               "message": None if decision.publish else decision.reason, "source": start.source}
    if not decision.publish:
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        return ProbeResult(None, summary)
    ds = labelled_set("probe", [(k, str(s) if not hasattr(s, "array") else k, n) for k, s, n in usable], task,
                      split)
    data = {"spec": "labelled images", "name": ds.name, "fingerprint": ds.fingerprint, "n": len(usable),
            "n_train": len(tr), "n_test": len(ho), "test_keys": [usable[j][0] for j in ho]}
    metrics = compute_metrics(task.type, y_ho, new_probs, list(task.classes))
    metrics.update(split="heldout", model=start.card["model"]["name"])
    card = probe_card(start.card, net, task, start.preprocess, data, metrics,
                      {"mode": "probe" if start.kind != "checkpoint" else "head", "source": Path(start.source).name,
                       "seconds": round(fit_s, 3)}, start.init)
    path = save_checkpoint(out, net, card)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return ProbeResult(path, summary, net, copy.deepcopy(card))


__all__ = ["ProbeResult", "ProbeStart", "embed", "probe_card", "probe_start", "refit_probe"]
