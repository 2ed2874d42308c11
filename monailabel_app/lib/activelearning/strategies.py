"""``POST /activelearning/<strategy>``: the next image to label, for classifiers.

Strategies: :data:`medclass.active.STRATEGY_DESCRIPTIONS` (``random``, ``entropy``,
``margin``, ``least-confidence``, ``bald``, ``coreset``, ``hybrid``, ``typiclust``). The ranking lives in :func:`medclass.labeling.choose_next`;
this class reads the stored scores (scoring first any image the served model
has not scored), skips images handed out to another annotator in the last
``hold_seconds`` and records the hand-out before it answers, under a lock, so
two annotators asking at once get different images. An anonymous client (no
``client_id``) is never starved by hand-outs it cannot be told apart from:
when nothing else is left, an anonymously held image is handed out again
(:func:`medclass.labeling.candidate_pools`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.strategy import Strategy

from lib.configs.classification import AppConfig
from lib.scoring.uncertainty import ensure_scored, load_embeddings
from medclass.active import NEEDS_EMBEDDINGS, NEEDS_SCORES, STRATEGY_DESCRIPTIONS
from medclass.errors import MedClassError
from medclass.labeling import RESERVED_KEY, SCORES_KEY, candidate_pools, choose_next

log = logging.getLogger(__name__)

_LOCK = threading.Lock()

#: Strategies that rank by what the scoring run stores: its scores or its embeddings.
SCORED = NEEDS_SCORES | NEEDS_EMBEDDINGS
#: Strategies that need the served model's embeddings of the pool.
EMBEDDED = NEEDS_EMBEDDINGS


class ClassificationStrategy(Strategy):
    def __init__(self, name: str, cfg: AppConfig) -> None:
        super().__init__(STRATEGY_DESCRIPTIONS[name])
        self.name, self.cfg = name, cfg

    def __call__(self, request, datastore) -> dict[str, Any]:
        model = request.get("model") or next(iter(self.cfg.models))
        if model not in self.cfg.models:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; served: {', '.join(self.cfg.models)}")
        slot = self.cfg.models[model]
        if slot.refitter is not None and not slot.refitter.wait(self.cfg.refit_wait_seconds):
            log.warning("%s: the head refit after the last labels is still running; answering without it", model)
        if self.name in SCORED and slot.published.version is not None:
            # Images without a score from the served model (the start-up scoring still
            # running, or images added since) are scored now rather than answered with a 409.
            ensure_scored(self.cfg, model, datastore)
        client = request.get("client_id")
        with _LOCK:
            infos = datastore.image_infos()
            free, fallback = candidate_pools(datastore.get_unlabeled_images(), infos, client,
                                             self.cfg.hold_seconds)
            version = slot.published.version
            scores = {i: v[SCORES_KEY][model] for i, v in infos.items()
                      if (v.get(SCORES_KEY) or {}).get(model, {}).get("version") == version}
            emb = load_embeddings(self.cfg, model, version) if self.name in EMBEDDED else None
            labelled = datastore.get_labeled_images()
            picked, error = None, None
            for pool in ([free, free + fallback] if fallback else [free]):
                try:
                    picked = choose_next(self.name, pool, scores, emb, labelled, seed=request.get("seed"))
                except MedClassError as e:
                    error = e
                    continue
                if picked is not None:
                    break
            if picked is None and error is not None:
                raise HTTPException(status_code=409, detail=f"{self.name}: {error.message}. {error.remedy}")
            if picked is None:
                log.info("%s: nothing left to label (%d unlabelled, all held by other annotators)", self.name,
                         len(datastore.get_unlabeled_images()))
                return {}
            image_id, detail = picked
            if image_id in fallback:
                detail["rehanded"] = True  # held by an anonymous hand-out: nothing else was left
            datastore.update_image_infos({image_id: {RESERVED_KEY: {"client": client, "ts": time.time(),
                                                                    "strategy": self.name}}})
        log.info("%s picked %s (%s)", self.name, image_id, detail)
        return {"id": image_id, "strategy": self.name, "model": model, "selection": detail}
