"""Scoring: each image's uncertainty under the served model, stored in the datastore.

One method computes every score the strategies rank by (entropy, margin,
least confidence, BALD by Monte-Carlo dropout) and the embeddings core-set
needs. Scores are stored per image with the model version they came from, so a
re-run after training rescores everything and a re-run without a new model
only scores images that have none. An image that cannot be read or scored is
stored with its error, never with a made-up score.

The app scores by itself, so that every strategy answers without a manual
``POST /scoring``: at start (a background thread, see ``main.py``), after every
training run that publishes a model (inside the training task, before it
reports done), and, for images added later, when a strategy finds them
unscored (:func:`ensure_scored`).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.configs.classification import AppConfig
from medclass.errors import MedClassError
from medclass.labeling import SCORES_KEY, score_images, scores_from_embeddings

log = logging.getLogger(__name__)

NAME = "medclass_uncertainty"

# One scoring run per model at a time within a process: the start-up scoring and a
# strategy that finds images unscored must not both score the same images.
_LOCKS: dict[str, threading.Lock] = defaultdict(threading.Lock)


def embeddings_path(cfg: AppConfig, model: str):
    return cfg.model_dir / model / "embeddings.npz"


def load_embeddings(cfg: AppConfig, model: str, version: str | None) -> dict[str, np.ndarray]:
    """Embeddings stored by the last scoring run of ``model`` (empty if stale or missing)."""
    p = embeddings_path(cfg, model)
    if not p.is_file():
        return {}
    with np.load(p, allow_pickle=False) as z:
        if str(z["version"]) != str(version):
            return {}
        return dict(zip(z["ids"].tolist(), z["vectors"]))


def save_embeddings(cfg: AppConfig, model: str, version: str, emb: dict[str, np.ndarray]) -> None:
    if not emb:
        return
    ids = sorted(emb)
    p = embeddings_path(cfg, model)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.array(ids), vectors=np.stack([emb[i] for i in ids]), version=np.array(version))
    tmp.replace(p)


def unscored(datastore, model: str, version: str | None, cfg: AppConfig | None = None) -> list[str]:
    """Images without a score (or a recorded failure) from ``version`` of ``model``,
    or without an embedding when ``cfg`` is given."""
    infos = datastore.image_infos()
    emb = load_embeddings(cfg, model, version) if cfg is not None else None
    out = []
    for i in datastore.list_images():
        entry = (infos.get(i, {}).get(SCORES_KEY) or {}).get(model) or {}
        if entry.get("version") != version:
            out.append(i)
        elif emb is not None and "scores" in entry and i not in emb:
            out.append(i)
    return out


def compute_scores(cfg: AppConfig, classifier, datastore, ids: list[str]) -> tuple[dict, dict]:
    """Scores and embeddings of ``ids`` under ``classifier`` (failures recorded as such)."""
    paths, failed = {}, {}
    for i in ids:
        try:
            paths[i] = datastore.get_image_uri(i)
        except Exception as e:  # noqa: BLE001 - a PACS error for one series must not stop the run
            failed[i] = f"cannot fetch the image: {e}"
    scores, emb = score_images(classifier, paths, mc_samples=cfg.mc_samples)
    scores.update({i: {"error": msg} for i, msg in failed.items()})
    return scores, emb


def store_scores(cfg: AppConfig, model: str, datastore, version: str, scores: dict, emb: dict,
                 keep_embeddings: bool = True) -> dict[str, Any]:
    """Write ``scores`` (tagged with ``version``) and the embeddings; returns a short report."""
    infos = datastore.image_infos()
    updates = {}
    for i, entry in scores.items():
        merged = dict(infos.get(i, {}).get(SCORES_KEY) or {})
        merged[model] = {"version": version, **entry}
        updates[i] = {SCORES_KEY: merged}
    datastore.update_image_infos(updates)
    if keep_embeddings:
        old = load_embeddings(cfg, model, version)
        old.update(emb)
        emb = old
    save_embeddings(cfg, model, version, emb)
    errors = {i: e["error"] for i, e in scores.items() if "error" in e}
    for i, msg in list(errors.items())[:5]:
        log.warning("could not score %s: %s", i, msg)
    return {"version": version, "scored": len(scores) - len(errors), "failed": len(errors),
            "errors": dict(list(errors.items())[:20])}


def ensure_scored(cfg: AppConfig, model: str, datastore) -> dict[str, Any] | None:
    """Score the images that have no score from the served version of ``model``.

    Returns the report, or None when nothing is served or nothing was missing.
    """
    slot = cfg.models[model]
    with _LOCKS[model]:
        version = slot.published.version
        if version is None:
            return None
        todo = unscored(datastore, model, version, cfg)
        if not todo:
            return None
        clf = slot.published.classifier()
        scores, emb = compute_scores(cfg, clf, datastore, todo)
        if slot.published.version != version:  # a training run published meanwhile: these are stale
            return None
        report = store_scores(cfg, model, datastore, version, scores, emb)
    print(f"scoring {model}: {report['scored']} scored, {report['failed']} failed", flush=True)
    return report


def rescore_from_embeddings(cfg: AppConfig, model: str, datastore, net, version: str,
                            emb: dict[str, np.ndarray]) -> dict[str, Any]:
    """Store the scores of a model whose only change is its head, from the encoder's embeddings.

    Images without an embedding (unreadable ones) keep their recorded failure,
    re-tagged with ``version`` so they are not retried on every request.
    """
    task = cfg.models[model].task
    ids = sorted(emb)
    scores: dict[str, dict[str, Any]] = {}
    if ids:
        out = scores_from_embeddings(net, task, np.stack([emb[i] for i in ids]), mc_samples=cfg.mc_samples)
        for j, i in enumerate(ids):
            values = {m: float(v[j]) for m, v in out.items()}
            if all(np.isfinite(v) for v in values.values()):
                scores[i] = {"scores": {m: round(v, 6) for m, v in values.items()}}
            else:
                scores[i] = {"error": "non-finite score"}
    for i, info in datastore.image_infos().items():
        entry = (info.get(SCORES_KEY) or {}).get(model) or {}
        if i not in scores and "error" in entry:
            scores[i] = {"error": entry["error"]}
    return store_scores(cfg, model, datastore, version, scores, emb, keep_embeddings=False)


class UncertaintyScoring(ScoringMethod):
    """Score every image with each served model; request ``{"model": NAME}`` limits it to one."""

    def __init__(self, cfg: AppConfig) -> None:
        super().__init__("uncertainty (entropy, margin, least confidence, BALD) and embeddings of every image")
        self.cfg = cfg

    def __call__(self, request, datastore) -> dict[str, Any]:
        report: dict[str, Any] = {}
        names = [request["model"]] if request.get("model") else list(self.cfg.models)
        for name in names:
            slot = self.cfg.models[name]
            if slot.published.version is None:
                report[name] = {"skipped": "no trained model yet"}
                continue
            done = ensure_scored(self.cfg, name, datastore)
            report[name] = done or {"version": slot.published.version, "scored": 0, "failed": 0,
                                    "errors": {}, "note": "every image already had a score from this model"}
        if not report:
            raise MedClassError("no model to score with", "train a model first")
        return report
