"""``POST /activelearning/<strategy>``: the next image to label, for classifiers.

Strategies: ``random``, ``entropy``, ``margin``, ``least-confidence``,
``bald``, ``coreset`` (k-center on the model's embeddings: diversity, for the
cold start) and ``hybrid`` (the most uncertain few, then the one farthest from
what is labelled). The ranking lives in :func:`medclass.labeling.choose_next`;
this class reads the stored scores, skips images handed out to another
annotator in the last ``hold_seconds`` and records the hand-out before it
answers, under a lock, so two annotators asking at once get different images.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.strategy import Strategy

from lib.configs.classification import AppConfig
from lib.scoring.uncertainty import load_embeddings
from medclass.errors import MedClassError
from medclass.labeling import RESERVED_KEY, SCORES_KEY, choose_next, reserved_ids

log = logging.getLogger(__name__)

_LOCK = threading.Lock()

DESCRIPTIONS = {
    "random": "a random unlabelled image",
    "entropy": "the unlabelled image whose predicted probabilities have the highest entropy",
    "margin": "the unlabelled image with the smallest margin between its two most likely classes",
    "least-confidence": "the unlabelled image whose most likely class is least probable",
    "bald": "the image the model's Monte-Carlo dropout samples disagree on most (BALD)",
    "coreset": "the image farthest from every labelled one in the model's embedding space (diversity)",
    "hybrid": "among the most uncertain images, the one farthest from the labelled ones",
}


class ClassificationStrategy(Strategy):
    def __init__(self, name: str, cfg: AppConfig) -> None:
        super().__init__(DESCRIPTIONS[name])
        self.name, self.cfg = name, cfg

    def __call__(self, request, datastore) -> dict[str, Any]:
        model = request.get("model") or next(iter(self.cfg.models))
        if model not in self.cfg.models:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; served: {', '.join(self.cfg.models)}")
        slot = self.cfg.models[model]
        # Without a client id every request counts as another annotator: an image
        # handed out stays reserved for hold_seconds. With one, an annotator may get
        # back the image they were given and have not labelled yet.
        client = request.get("client_id")
        with _LOCK:
            infos = datastore.image_infos()
            busy = reserved_ids({i: v for i, v in infos.items()
                                 if client is None or (v.get(RESERVED_KEY) or {}).get("client") != client},
                                self.cfg.hold_seconds)
            candidates = [i for i in datastore.get_unlabeled_images() if i not in busy]
            version = slot.published.version
            scores = {i: v[SCORES_KEY][model] for i, v in infos.items()
                      if (v.get(SCORES_KEY) or {}).get(model, {}).get("version") == version}
            emb = load_embeddings(self.cfg, model, version) if self.name in ("coreset", "hybrid") else None
            try:
                picked = choose_next(self.name, candidates, scores, emb, datastore.get_labeled_images(),
                                     seed=request.get("seed"))
            except MedClassError as e:
                raise HTTPException(status_code=409, detail=f"{self.name}: {e.message}. {e.remedy}") from None
            if picked is None:
                log.info("%s: nothing left to label (%d reserved by others)", self.name, len(busy))
                return {}
            image_id, detail = picked
            datastore.update_image_infos({image_id: {RESERVED_KEY: {"client": client, "ts": time.time(),
                                                                    "strategy": self.name}}})
        log.info("%s picked %s (%s)", self.name, image_id, detail)
        return {"id": image_id, "strategy": self.name, "model": model, "selection": detail}
