"""SlicerMedClass as a MONAI Label app: image-level classification with active learning.

Start it with ``monailabel start_server --app monailabel_app --studies DIR``
(``make label STUDIES=DIR``). Everything model-related lives in ``medclass``;
the classes under ``lib/`` adapt it to MONAI Label's task interfaces.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

# The app's lib/ is imported as the package "lib" (MONAI Label puts the app folder on
# sys.path); medclass is installed in the environment.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib.activelearning.strategies import ClassificationStrategy  # noqa: E402
from lib.configs.classification import load_config  # noqa: E402
from lib.datastore import DICOMwebClassificationDatastore, LocalClassificationDatastore  # noqa: E402
from lib.infers.classify import ClassifyInfer  # noqa: E402
from lib.scoring.uncertainty import NAME as SCORING  # noqa: E402
from lib.scoring.uncertainty import UncertaintyScoring, ensure_scored  # noqa: E402
from lib.trainers.classify import ClassifyTrain, HeadRefitter  # noqa: E402
from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402

import medclass  # noqa: E402
from medclass.active import STRATEGIES  # noqa: E402

log = logging.getLogger(__name__)


class MedClassApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.cfg = load_config(app_dir, conf or {})
        log.info("models: %s; classes: %s", ", ".join(self.cfg.models), ", ".join(self.cfg.task.classes))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf or {}, name="SlicerMedClass",
                         description="Image-level classification with active learning (binary, multi-class, "
                                     "multi-label, ordinal) on the shared medclass models",
                         version=medclass.__version__, labels=list(self.cfg.task.classes))

        # MONAI Label would start a scoring subprocess after every next-sample request and
        # every training; this app scores by itself instead: once at start, inside each
        # training run that publishes a model, and for images a strategy finds unscored.
        self._auto_update_scoring = False

    def on_init_complete(self):
        super().on_init_complete()
        if not self.cfg.score_on_start:
            return
        served = [n for n, slot in self.cfg.models.items() if slot.published.exists]
        if served:
            # In the background, so that the server answers at once; a strategy that needs
            # the scores before this is done waits for it (the same lock) instead of a 409.
            threading.Thread(target=self._score_on_start, args=(served,), name="medclass-scoring",
                             daemon=True).start()

    def _score_on_start(self, names: list[str]) -> None:
        for name in names:
            try:
                ensure_scored(self.cfg, name, self.datastore())
            except Exception:  # noqa: BLE001 - a scoring failure must not take the server down
                log.exception("start-up scoring of %s failed", name)

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return self.init_remote_datastore()
        return LocalClassificationDatastore(self.studies, self.cfg.task)

    def init_remote_datastore(self):
        from monailabel.datastore.dicom import DICOMwebClientX

        url = self.studies.rstrip("/")
        client = DICOMwebClientX(url=url, session=None, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        # MONAI Label's default search filter is {"Modality": "CT"} (and its launcher exports
        # every setting to the environment, so it cannot be told apart from a chosen one); a
        # classifier works on any image modality, so every image series is listed unless
        # --conf dicomweb_filter '{"Modality": "CR"}' narrows it.
        return DICOMwebClassificationDatastore(client, self.cfg.task, self.cfg.dicomweb_filter, cache)

    def init_infers(self):
        return {name: ClassifyInfer(slot) for name, slot in self.cfg.models.items()}

    def init_trainers(self):
        return {name: ClassifyTrain(slot, self.cfg) for name, slot in self.cfg.models.items()}

    def on_save_label(self, image_id, label_id):
        res = super().on_save_label(image_id, label_id)
        if self.cfg.retrain_on_label and self._server_mode:
            # Refit the served heads in this process (seconds), not in a training subprocess.
            for name, slot in self.cfg.models.items():
                if slot.refitter is None and slot.published.exists and name in self._trainers:
                    slot.refitter = HeadRefitter(self._trainers[name], self.datastore())
                if slot.refitter is not None:
                    slot.refitter.request()
        return res

    def init_strategies(self):
        return {name: ClassificationStrategy(name, self.cfg) for name in STRATEGIES}

    def init_scoring_methods(self):
        return {SCORING: UncertaintyScoring(self.cfg)}

    def infer(self, request, datastore=None):
        image = request.get("image")
        ds = datastore or self.datastore()
        if isinstance(image, str) and image and not os.path.exists(image) and image not in ds.list_images():
            from fastapi import HTTPException

            raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore ({ds.name()})")
        return super().infer(request, datastore)

    def info(self):
        d = super().info()
        d["task"] = {"type": self.cfg.task.type, "classes": list(self.cfg.task.classes)}
        d["label_format"] = ({"labels": ["<class>", "..."]} if self.cfg.task.type == "multilabel"
                             else {"label": "<class>"})
        return d
