"""Scoring: each image's uncertainty under the served model, stored in the datastore.

One method computes every score the strategies rank by (entropy, margin,
least confidence, BALD by Monte-Carlo dropout) and the embeddings core-set
needs. Scores are stored per image with the model version they came from, so a
re-run after training rescores everything and a re-run without a new model
only scores images that have none. An image that cannot be read or scored is
stored with its error, never with a made-up score.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.configs.classification import AppConfig
from medclass.errors import MedClassError
from medclass.labeling import SCORES_KEY, score_images

log = logging.getLogger(__name__)

NAME = "medclass_uncertainty"


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
            version = slot.published.version
            if version is None:
                report[name] = {"skipped": "no trained model yet"}
                continue
            clf = slot.published.classifier()
            infos = datastore.image_infos()
            old = load_embeddings(self.cfg, name, version)
            todo = [i for i in datastore.list_images()
                    if (infos.get(i, {}).get(SCORES_KEY, {}).get(name, {}).get("version") != version
                        or i not in old)]
            paths, failed = {}, {}
            for i in todo:
                try:
                    paths[i] = datastore.get_image_uri(i)
                except Exception as e:  # noqa: BLE001 - a PACS error for one series must not stop the run
                    failed[i] = f"cannot fetch the image: {e}"
            scores, emb = score_images(clf, paths, mc_samples=self.cfg.mc_samples)
            scores.update({i: {"error": msg} for i, msg in failed.items()})
            updates = {}
            for i, entry in scores.items():
                merged = dict(infos.get(i, {}).get(SCORES_KEY, {}))
                merged[name] = {"version": version, **entry}
                updates[i] = {SCORES_KEY: merged}
            datastore.update_image_infos(updates)
            old.update(emb)
            if old:
                ids = sorted(old)
                p = embeddings_path(self.cfg, name)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_suffix(".tmp.npz")
                np.savez(tmp, ids=np.array(ids), vectors=np.stack([old[i] for i in ids]), version=np.array(version))
                tmp.replace(p)
            errors = {i: e["error"] for i, e in scores.items() if "error" in e}
            for i, msg in list(errors.items())[:5]:
                log.warning("could not score %s: %s", i, msg)
            report[name] = {"version": version, "scored": len(scores) - len(errors), "failed": len(errors),
                            "errors": dict(list(errors.items())[:20])}
            print(f"scoring {name}: {report[name]['scored']} scored, {len(errors)} failed", flush=True)
        if not report:
            raise MedClassError("no model to score with", "train a model first")
        return report
