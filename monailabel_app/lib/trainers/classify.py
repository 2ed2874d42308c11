"""``POST /train/<model>``: retrain on the datastore's labels; publish only a model that is no worse.

Two modes:

``head`` (the default while a model is served)
    The served model's encoder stays; its linear head is refitted on the
    encoder's embeddings of the labelled images (stored by the scoring run),
    and the datastore is re-scored from the same embeddings. No image is read
    again, so the next sample is ready seconds after a label.
``full``
    ``medclass``'s training loop on the images: a warm start from the served
    model (or from ``--conf init``, an encoder checkpoint or a ``model.pt``,
    before the first model), or from scratch with ``{"init": "scratch"}``.

Either way the labelled images are split by image id into training images and
held-out ones (:func:`medclass.labeling.heldout_split`); the new model is
published only when its held-out score is at least the served model's on the
same images (``{"force": true}`` publishes anyway). Too few labels of a class
gives a message, not a model. The task's last output line, ``metrics {...}``,
says what happened; ``/info/``'s ``train_stats`` keeps it as ``last_run``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
import time
from dataclasses import fields
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.classification import AppConfig, ModelSlot
from lib.scoring.uncertainty import compute_scores, load_embeddings, rescore_from_embeddings, store_scores
from medclass.errors import MedClassError
from medclass.labeling import (
    PublicationDecision,
    decide_publication,
    encode_label,
    fit_head,
    has_linear_head,
    head_probabilities,
    heldout_split,
    labelled_set,
)
from medclass.training import TrainConfig, train

log = logging.getLogger(__name__)

MODES = ("head", "full")
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def _truthy(v) -> bool:
    return str(v).lower() in ("1", "true", "yes", "on")


class ClassifyTrain(TrainTask):
    """Retrain ``slot.name`` on every image labelled ``final``; publish it if it is no worse.

    Request parameters (all optional): ``mode`` (``head`` or ``full``),
    ``force``, and for ``full``: ``max_epochs`` (MONAI Label's name) or
    ``epochs``, ``image_size``, ``batch_size``, ``lr``, ``seed``, ``device``,
    ``init`` (a checkpoint path, ``served`` or ``scratch``).
    """

    def __init__(self, slot: ModelSlot, cfg: AppConfig) -> None:
        super().__init__(f"train {slot.name} on the image-level labels")
        self.slot, self.cfg = slot, cfg

    def config(self) -> dict[str, Any]:
        return {"mode": self.cfg.train_mode, "force": False, "max_epochs": self.cfg.epochs,
                "image_size": self.slot.image_size, "batch_size": TrainConfig.batch_size, "lr": TrainConfig.lr,
                "seed": 0}

    def _last_run_path(self):
        return self.cfg.model_dir / self.slot.name / "last_train.json"

    def stats(self) -> dict[str, Any]:
        card = self.slot.published.card() or {}
        m = card.get("metrics", {})
        last = None
        if self._last_run_path().is_file():
            try:
                last = json.loads(self._last_run_path().read_text())
            except (OSError, json.JSONDecodeError):
                last = None
        training = card.get("training") or {}
        refitter = self.slot.refitter
        return {"model": self.slot.name, "version": self.slot.published.version,
                "trained_on": card.get("data", {}).get("n"), "auc": m.get("auc"), "accuracy": m.get("accuracy"),
                "created": card.get("created"), "mode": training.get("mode"), "last_run": last,
                # Where the served encoder's weights came from (the model card's training.init,
                # carried through head refits), and the app's --conf init for a first training.
                "init": training.get("init"), "conf_init": str(self.cfg.init) if self.cfg.init else None,
                "retrain_on_label": self.cfg.retrain_on_label,
                # The server's own refits after labels: a client that saved a label waits until
                # "done" reaches the "requested" it read after saving (no clock, no sleep).
                "refit": refitter.counts() if refitter is not None else None}

    # ------------------------------------------------------------------ entry point
    def __call__(self, request, datastore) -> dict[str, Any]:
        t0 = time.time()
        mode = str(request.get("mode") or self.cfg.train_mode).lower()
        if mode not in MODES:
            return self._finish({"published": False, "message": f"unknown mode {mode!r}; use one of: "
                                                                 f"{', '.join(MODES)}"}, t0)
        force = _truthy(request.get("force"))
        items = []
        for i in datastore.get_labeled_images():
            try:
                items.append((i, datastore.get_image_uri(i), datastore.read_label(i)))
            except MedClassError as e:
                log.warning("skipping the label of %s: %s", i, e)
        served = self.slot.published.exists
        auto = bool(request.get("auto"))  # the server's own refit after a label: head mode or nothing
        if auto and not served:
            return {"published": False, "skipped": "no model is served yet"}
        probe = False
        if mode == "head" and not served:
            if request.get("init") or self.cfg.init:
                probe = True  # a linear probe on the --conf init encoder: its head only trains
                print("no model is served yet: training a head on the initial encoder", flush=True)
            else:
                print("no model is served yet: training the whole model", flush=True)
            mode = "full"
        try:
            if mode == "head":
                clf = self.slot.published.classifier()
                if not has_linear_head(clf.loaded.model):
                    if auto:
                        return {"published": False, "skipped": f"{self.slot.name} has no linear head to refit"}
                    print(f"{self.slot.name} has no linear head on an embedding: training the whole model",
                          flush=True)
                    mode = "full"
            if mode == "head":
                summary = self._head(items, datastore, force, clf, request)
            else:
                summary = self._full(items, datastore, force, request, freeze_encoder=probe)
        except MedClassError as e:
            # The annotation lead's to fix (e.g. too few labels): a message, not a model.
            summary = {"published": False, "message": f"{e.message}. {e.remedy}", "images": len(items)}
        summary["mode"] = "probe" if probe else mode
        return self._finish(summary, t0)

    def _finish(self, summary: dict[str, Any], t0: float) -> dict[str, Any]:
        summary = {"model": self.slot.name, **summary, "version": self.slot.published.version,
                   "seconds": round(time.time() - t0, 2),
                   "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if summary.get("message"):
            print(summary["message"], flush=True)
        path = self._last_run_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary))
        print("metrics " + json.dumps(summary), flush=True)
        return summary

    # ------------------------------------------------------------------ head mode
    def _head(self, items, datastore, force: bool, clf, request) -> dict[str, Any]:
        task, name = self.slot.task, self.slot.name
        version = self.slot.published.version
        t0 = time.time()
        emb = load_embeddings(self.cfg, name, version)
        missing = [i for i, _p, _n in items if i not in emb]
        if missing:  # labelled images the scoring run has not reached (or added since)
            scores, extra = compute_scores(self.cfg, clf, datastore, missing)
            emb.update(extra)
        usable = [it for it in items if it[0] in emb]
        if len(usable) < len(items):
            print(f"{len(items) - len(usable)} labelled image(s) could not be read; left out", flush=True)
        split = heldout_split(usable, task)
        tr = [it for it in usable if split[it[0]] == "train"]
        ho = [it for it in usable if split[it[0]] == "test"]
        x_tr = np.stack([emb[i] for i, _p, _n in tr])
        x_ho = np.stack([emb[i] for i, _p, _n in ho])
        y_tr = [encode_label(n, task) for _i, _p, n in tr]
        y_ho = np.asarray([encode_label(n, task) for _i, _p, n in ho])
        seed = int(request.get("seed") or 0)
        print(f"fitting the head of {name} on the embeddings of {len(tr)} labelled images "
              f"({len(ho)} held out)", flush=True)
        net = fit_head(clf.loaded.model, task, x_tr, y_tr, seed=seed)
        decision = decide_publication(task, y_ho, head_probabilities(net, task, x_ho),
                                      head_probabilities(clf.loaded.model, task, x_ho), force)
        fit_s = time.time() - t0
        summary = self._summary(decision, usable, len(tr), len(ho))
        summary["fit_seconds"] = round(fit_s, 2)
        if not decision.publish:
            return summary
        from medclass.checkpoint import save_checkpoint
        from medclass.metrics import compute_metrics
        from medclass.probe import probe_card

        ds = labelled_set(f"monailabel-{name}", usable, task, split)
        data = {"spec": "monailabel datastore", "name": ds.name, "fingerprint": ds.fingerprint,
                "n": len(usable), "n_train": len(tr), "n_test": len(ho), "test_keys": [i for i, *_ in ho]}
        metrics = compute_metrics(task.type, y_ho, head_probabilities(net, task, x_ho), list(task.classes))
        metrics.update(split="heldout", model=name)
        # The one card of a refitted head (medclass.probe): the encoder's init carried over,
        # the old head's calibration dropped.
        card = probe_card(clf.card, net, task, clf.loaded.preprocess_spec, data, metrics,
                          {"mode": "head", "warm_start": version, "encoder": "served model's, unchanged",
                           "seconds": round(fit_s, 2)})
        # No run folder per refit (one per label when the server refits by itself): the
        # candidate is written beside the served file and published from there.
        ckpt = save_checkpoint(self.slot.published.path.with_name(f".head-{os.getpid()}.pt"), net, card)
        try:
            new_version = self.slot.published.publish(ckpt)
        finally:
            ckpt.unlink(missing_ok=True)
        # Same encoder, same embeddings: re-score from them (no image is read) before the
        # task reports done, so every strategy answers at once with the new model.
        t1 = time.time()
        all_emb = load_embeddings(self.cfg, name, version)
        all_emb.update(emb)
        report = rescore_from_embeddings(self.cfg, name, datastore, net, new_version, all_emb)
        summary.update(version=new_version, rescored=report["scored"],
                       rescore_seconds=round(time.time() - t1, 2))
        return summary

    # ------------------------------------------------------------------ full mode
    def _full(self, items, datastore, force: bool, request, freeze_encoder: bool = False) -> dict[str, Any]:
        from medclass.inference import Classifier

        task, name = self.slot.task, self.slot.name
        split = heldout_split(items, task)
        ds = labelled_set(f"monailabel-{name}", items, task, split)
        run = self._run_dir()
        epochs = int(request.get("max_epochs") or request.get("epochs") or self.cfg.epochs)
        args = dict(data=ds.name, model=name, out=str(run), epochs=epochs,
                    image_size=int(request.get("image_size") or self.slot.image_size),
                    lr=float(request.get("lr") or TrainConfig.lr), seed=int(request.get("seed") or 0),
                    device=request.get("device") or self.cfg.device, progress=False)
        if request.get("batch_size"):
            args["batch_size"] = int(request["batch_size"])  # else TrainConfig's default, as the CLI
        init = self._init_for(request)
        if init is not None and "init" not in _TRAIN_FIELDS:
            if request.get("init"):
                raise MedClassError("this medclass cannot start training from a checkpoint (no TrainConfig.init)",
                                    'train with {"init": "scratch"} or update medclass')
            print(f"this medclass cannot start from {init}: training from scratch", flush=True)
            init = None
        if init is not None:
            args["init"] = init
            args["freeze_encoder"] = freeze_encoder
        cfg = TrainConfig(**args)
        n_ho = sum(1 for v in split.values() if v == "test")
        print(f"training {name} on {len(ds) - n_ho} labelled images ({n_ho} held out), {epochs} epochs"
              + (f", starting from {init}" if init else ", from scratch"), flush=True)

        def on_epoch(rec: dict[str, float]) -> None:
            print(f"epoch {int(rec['epoch'])}/{epochs}: loss {rec['train_loss']:.4f}, "
                  f"validation score {rec['val_score']:.4f}", flush=True)

        result = train(cfg, ds, on_epoch=on_epoch)
        new = Classifier(result.checkpoint, self.cfg.device)
        ho = [it for it in items if split[it[0]] == "test"]
        images = [new.read(p) for _i, p, _n in ho]
        y_ho = np.asarray([encode_label(n, task) for _i, _p, n in ho])
        served_probs = None
        if self.slot.published.exists:
            served_probs = self.slot.published.classifier().probabilities(images)
        decision = decide_publication(task, y_ho, new.probabilities(images), served_probs, force)
        summary = self._summary(decision, items, len(items) - len(ho), len(ho))
        m = result.metrics
        summary.update(auc=m.get("auc"), accuracy=m.get("accuracy"), epochs_run=len(result.history), run=str(run))
        if not decision.publish:
            return summary
        # Score the datastore with the new model before publishing it, then tag the scores
        # with its version: strategies answer with the new model as soon as the task is done.
        t1 = time.time()
        scores, emb = compute_scores(self.cfg, new, datastore, datastore.list_images())
        version = self.slot.published.publish(result.checkpoint)
        report = store_scores(self.cfg, name, datastore, version, scores, emb, keep_embeddings=False)
        summary.update(version=version, rescored=report["scored"], rescore_seconds=round(time.time() - t1, 2))
        return summary

    def _init_for(self, request) -> str | None:
        """The checkpoint a full training run starts from: the request's ``init``, else the
        served model, else ``--conf init``; ``scratch`` means none."""
        init = request.get("init")
        if init == "scratch":
            return None
        if init and init != "served":
            return str(init)
        if self.slot.published.exists:
            return str(self.slot.published.path)
        return str(self.cfg.init) if self.cfg.init else None

    def _run_dir(self):
        return self.cfg.model_dir / self.slot.name / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"

    def _summary(self, decision: PublicationDecision, items, n_train: int, n_heldout: int) -> dict[str, Any]:
        return {**decision.as_dict(), "images": len(items), "n_train": n_train, "n_heldout": n_heldout,
                "message": None if decision.publish else decision.reason}


class HeadRefitter:
    """Refits the served model's head in the server process after labels are saved.

    MONAI Label runs ``POST /train`` in a new Python process, which spends most of
    a fast run importing torch and the app; the same head refit done here, in the
    server, makes the next sample ready about a second after a label. Labels
    saved while a refit runs are taken by one more refit (they coalesce). A
    next-sample request waits for a pending refit (:meth:`wait`), so it ranks with
    the scores of the model that has seen every label. The refit publishes only a
    model that is no worse on the held-out labels, as every training run does.
    """

    def __init__(self, trainer: ClassifyTrain, datastore) -> None:
        self.trainer, self.datastore = trainer, datastore
        self._cond = threading.Condition()
        self._pending = self._running = False
        self._requested = self._done = 0
        threading.Thread(target=self._loop, name=f"medclass-refit-{trainer.slot.name}", daemon=True).start()

    def request(self) -> None:
        """Ask for a refit (returns at once)."""
        with self._cond:
            self._pending = True
            self._requested += 1
            self._cond.notify_all()

    def counts(self) -> dict[str, Any]:
        """``requested`` refits, refits ``done`` (every request up to that number has been served), ``running``."""
        with self._cond:
            return {"requested": self._requested, "done": self._done, "running": self._running or self._pending}

    def wait(self, timeout: float) -> bool:
        """Wait until no refit is pending or running; False when ``timeout`` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pending or self._running), timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending)
                self._pending, self._running = False, True
                target = self._requested  # this run sees every label saved before these requests
            try:
                self.trainer({"mode": "head", "auto": True}, self.datastore)
            except Exception:  # noqa: BLE001 - a failed refit must not stop the server; the next label retries
                log.exception("refitting the head of %s failed", self.trainer.slot.name)
            finally:
                with self._cond:
                    self._running = False
                    self._done = target
                    self._cond.notify_all()
