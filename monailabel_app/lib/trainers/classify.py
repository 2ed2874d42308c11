"""``POST /train/<model>``: train on the datastore's labels with medclass's one training loop."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.classification import AppConfig, ModelSlot
from medclass.labeling import labelled_set
from medclass.training import TrainConfig, train

log = logging.getLogger(__name__)


class ClassifyTrain(TrainTask):
    """Train ``slot.name`` on every image labelled ``final`` and publish the checkpoint.

    Request parameters (all optional): ``max_epochs`` (MONAI Label's name) or
    ``epochs``, ``image_size``, ``batch_size``, ``lr``, ``seed``, ``device``.
    Progress (one line per epoch, then the held-out AUC and accuracy) goes to
    the task's output, which ``GET /train/`` shows; the metrics also appear in
    ``/info/`` under ``train_stats``.
    """

    def __init__(self, slot: ModelSlot, cfg: AppConfig) -> None:
        super().__init__(f"train {slot.name} on the image-level labels")
        self.slot, self.cfg = slot, cfg

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self.cfg.epochs, "image_size": self.slot.image_size, "batch_size": 32,
                "lr": 1e-3, "seed": 0}

    def stats(self) -> dict[str, Any]:
        card = self.slot.published.card() or {}
        m = card.get("metrics", {})
        return {"model": self.slot.name, "version": self.slot.published.version,
                "trained_on": card.get("data", {}).get("n"), "auc": m.get("auc"), "accuracy": m.get("accuracy"),
                "created": card.get("created")}

    def __call__(self, request, datastore) -> dict[str, Any]:
        t0 = time.time()
        items = [(i, datastore.get_image_uri(i), datastore.read_label(i)) for i in datastore.get_labeled_images()]
        ds = labelled_set(f"monailabel-{self.slot.name}", items, self.slot.task)
        run = self.cfg.model_dir / self.slot.name / "runs" / time.strftime("%Y%m%d-%H%M%S")
        epochs = int(request.get("max_epochs") or request.get("epochs") or self.cfg.epochs)
        cfg = TrainConfig(data=ds.name, model=self.slot.name, out=str(run), epochs=epochs,
                          image_size=int(request.get("image_size") or self.slot.image_size),
                          batch_size=int(request.get("batch_size") or 32), lr=float(request.get("lr") or 1e-3),
                          seed=int(request.get("seed") or 0), device=request.get("device") or self.cfg.device,
                          progress=False)
        print(f"training {self.slot.name} on {len(ds)} labelled images, {epochs} epochs", flush=True)

        def on_epoch(rec: dict[str, float]) -> None:
            print(f"epoch {int(rec['epoch'])}/{epochs}: loss {rec['train_loss']:.4f}, "
                  f"validation score {rec['val_score']:.4f}", flush=True)

        result = train(cfg, ds, on_epoch=on_epoch)
        version = self.slot.published.publish(result.checkpoint)
        m = result.metrics
        summary = {"model": self.slot.name, "version": version, "images": len(ds),
                   "auc": m.get("auc"), "accuracy": m.get("accuracy"), "split": m.get("split"),
                   "n_test": m.get("n"), "epochs_run": len(result.history), "seconds": round(time.time() - t0, 1),
                   "run": str(run)}
        print("metrics " + json.dumps(summary), flush=True)
        return summary
