"""Classify and train without a server: a checkpoint, the user's labels, a head refit in seconds.

:class:`LocalTrainer` keeps a working model in a folder of the user's choice::

    trainer = LocalTrainer("runs/local", init="encoder.pt", classes=["normal", "tumour"])
    trainer.add_label("case-1", "/data/case-1.nrrd", "tumour")
    ...
    report = trainer.refit()          # a linear head on the encoder's embeddings: seconds
    trainer.classify(["/data/case-9.nrrd"])
    report = trainer.fine_tune(epochs=5)  # the whole model, starting from the working model

``init`` has ``medclass train --init`` semantics: an encoder from ``medclass
pretrain``, a ``model.pt`` (of another task: a new head), a state dict, or a name
a model offers (``imagenet``). Once a model is served (``checkpoint``, or the
first refit) refits and fine-tunes start from it. As in the MONAI Label app, a
new model replaces the working one only when it is no worse on held-out labels
(split by image id, :func:`medclass.labeling.heldout_split`) or on ``force``.

The head refit is :func:`medclass.probe.refit_probe` and the fine-tune is
:func:`medclass.training.train`: the core's code, nothing of its own. medclass and
torch are imported on first use. Nothing here touches MRML: the widget saves a
volume to a file (or passes an ImageData) and calls this on a worker thread.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

MODEL_FILE = "model.pt"
LABELS_FILE = "labels.json"


class LocalTrainer:
    """A working model and its labels, in ``folder``.

    Parameters
    ----------
    folder : str or Path
        Holds the working ``model.pt``, ``labels.json`` and the runs of :meth:`fine_tune`.
    checkpoint : str or Path, optional
        A ``model.pt`` to classify with until the first refit (copied in as the working model).
    init : str, optional
        Where the first refit / fine-tune starts when no model is served yet (see the module docstring).
    classes : list of str, optional
        Class names, when neither ``checkpoint`` nor ``init`` is a model of the task.
    task : str, optional
        ``binary``, ``multiclass``, ``multilabel`` or ``ordinal`` (default from the classes).
    model : str, optional
        Registry name, for an ``init`` that is a state dict or a named initialisation.
    device : str
        For classification and fine-tuning (the head refit runs on the CPU).
    """

    def __init__(self, folder, checkpoint=None, init: str | None = None, classes: list[str] | None = None,
                 task: str | None = None, model: str | None = None, device: str = "cpu") -> None:
        from medclass.inference import PublishedModel

        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.published = PublishedModel(self.folder / MODEL_FILE, device)
        self.init, self.model_name, self.device = (str(init) if init else None), model, device
        self._lock = threading.Lock()
        if checkpoint is not None:
            p = Path(checkpoint).expanduser()
            if p.is_dir():
                p = p / MODEL_FILE
            from medclass.checkpoint import read_card
            from medclass.errors import MedClassError

            try:
                card = read_card(p)
            except MedClassError as e:
                raise ValueError(str(e)) from None
            if card.get("kind") == "encoder":
                raise ValueError(f"{p} is an encoder (no classifier head): pass it as init, not as the checkpoint")
            if p.resolve() != self.published.path.resolve():
                self.published.publish(p)
        self.task = self._task(classes, task)
        self.labels: dict[str, tuple[str, list[str]]] = self._load_labels()

    # ------------------------------------------------------------------ state
    def _task(self, classes, kind):
        from medclass.checkpoint import read_card
        from medclass.tasks import Task

        if classes:
            names = [str(c) for c in classes]
            t = Task(kind or ("binary" if len(names) == 2 else "multiclass"), names)
            if self.published.exists:
                own = Task(**read_card(self.published.path)["task"])
                if (own.type, list(own.classes)) != (t.type, list(t.classes)):
                    raise ValueError(f"the working model predicts {', '.join(own.classes)}, not "
                                     f"{', '.join(t.classes)}; choose another folder for a new task")
            return t
        for source in ([self.published.path] if self.published.exists else []) + ([self.init] if self.init else []):
            try:
                card = read_card(source)
            except Exception:  # noqa: BLE001 - a state dict or a named init: no classes there
                continue
            if card.get("task"):
                return Task(**card["task"])
        raise ValueError("which classes? give the class names (an encoder or a state dict has none)")

    @property
    def classes(self) -> list[str]:
        return list(self.task.classes)

    @property
    def checkpoint(self) -> Path | None:
        """The working model, ``None`` before the first refit of an ``init``."""
        return self.published.path if self.published.exists else None

    def served_init(self) -> dict[str, Any] | None:
        """``training.init`` of the working model's card: where its encoder's weights came from."""
        if not self.published.exists:
            return None
        card = self.published.card() or {}
        return (card.get("training") or {}).get("init")

    def _labels_path(self) -> Path:
        return self.folder / LABELS_FILE

    def _load_labels(self) -> dict[str, tuple[str, list[str]]]:
        p = self._labels_path()
        if not p.is_file():
            return {}
        try:
            raw = json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
        return {k: (v["path"], list(v["labels"])) for k, v in raw.items()
                if isinstance(v, dict) and "path" in v and all(n in self.task.classes for n in v.get("labels", []))}

    def _save_labels(self) -> None:
        data = {k: {"path": p, "labels": n} for k, (p, n) in self.labels.items()}
        tmp = self._labels_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self._labels_path())

    def add_label(self, key: str, path, label: str | list[str]) -> None:
        """Label the image file ``path`` (kept in ``labels.json`` under ``key``) with a class (or classes)."""
        from medclass.errors import MedClassError
        from medclass.labeling import label_payload, parse_label

        if not key:
            raise ValueError("no image key given")
        p = Path(path)
        if not p.exists():
            raise ValueError(f"no such image file: {p}")
        try:
            names = parse_label(label_payload(label, self.task), self.task)
        except MedClassError as e:
            raise ValueError(str(e)) from None
        with self._lock:
            self.labels[str(key)] = (str(p), names)
            self._save_labels()

    def remove_label(self, key: str) -> None:
        with self._lock:
            self.labels.pop(str(key), None)
            self._save_labels()

    def _items(self) -> list[tuple[str, str, list[str]]]:
        with self._lock:
            return [(k, p, n) for k, (p, n) in sorted(self.labels.items())]

    # ------------------------------------------------------------------ classify
    def classifier(self):
        """The working model's :class:`medclass.inference.Classifier`."""
        from medclass.errors import MedClassError

        try:
            return self.published.classifier()
        except MedClassError as e:
            raise ValueError(f"{e}; label images of every class and refit" if self.init else str(e)) from None

    def classify(self, paths) -> list:
        """Predictions (``label``, ``probabilities``) of image files with the working model."""
        return self.classifier().predict_paths(paths)

    # ------------------------------------------------------------------ training
    def refit(self, force: bool = False, seed: int = 0) -> dict[str, Any]:
        """Fit a linear head on the encoder's embeddings of the labelled images (seconds).

        Starts from the working model (its encoder stays, its head is refitted), or
        from ``init`` when none is served yet (a linear probe). Publishes only when
        no worse on the held-out labels than the working model, or on ``force``.

        Returns
        -------
        dict
            ``published``, ``message``, ``new_score``, ``served_score``, ``metric``,
            ``n_train``, ``n_heldout``, ``fit_seconds``, ``seconds``, ``version``.

        Raises
        ------
        ValueError
            Too few labels of a class, no init and no model, unreadable images.
        """
        from medclass.errors import MedClassError
        from medclass.probe import probe_start, refit_probe

        t0 = time.perf_counter()
        source = self.checkpoint or self.init
        if source is None:
            raise ValueError("nothing to start from: choose a checkpoint or an init (encoder, model.pt or imagenet)")
        try:
            start = probe_start(source, self.task, self.model_name)
            served = self.classifier() if self.checkpoint else None
            out = self.folder / f".refit-{time.time_ns()}.pt"
            result = refit_probe(start, self._items(), out, served, force, seed, read=self._reader(served))
        except MedClassError as e:
            raise ValueError(str(e)) from None
        summary = dict(result.summary, mode="head" if self.checkpoint else "probe")
        if result.checkpoint is not None:
            try:
                summary["version"] = self.published.publish(result.checkpoint)
            finally:
                result.checkpoint.unlink(missing_ok=True)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        return summary

    @staticmethod
    def _reader(served):
        if served is not None:
            return served.read
        return None

    def fine_tune(self, epochs: int = 5, image_size: int | None = None, lr: float | None = None,
                  batch_size: int | None = None, force: bool = False, seed: int = 0,
                  freeze_encoder: bool = False, on_epoch=None) -> dict[str, Any]:
        """Train the whole model on the labelled images, ``--init`` the working model (or ``init``).

        Publishes only when no worse on the held-out labels than the working model.
        ``freeze_encoder`` trains the head alone by gradient descent (``--freeze-encoder``).
        """
        import numpy as np

        from medclass.checkpoint import read_card
        from medclass.errors import MedClassError
        from medclass.inference import Classifier
        from medclass.labeling import decide_publication, encode_label, heldout_split, labelled_set
        from medclass.training import TrainConfig, train

        t0 = time.perf_counter()
        source = str(self.checkpoint) if self.checkpoint else self.init
        items = self._items()
        try:
            card = read_card(source) if source and Path(source).is_file() else {}
        except MedClassError:
            card = {}
        name = (card.get("model") or {}).get("name") or self.model_name
        if not name:
            raise ValueError("which model? give the model name for this init")
        size = int(image_size or (card.get("preprocess") or {}).get("image_size") or 64)
        try:
            split = heldout_split(items, self.task)
            ds = labelled_set("local-labels", items, self.task, split)
            run = self.folder / "runs" / time.strftime("%Y%m%d-%H%M%S")
            args: dict[str, Any] = dict(data=ds.name, model=name, out=str(run), epochs=int(epochs), image_size=size,
                                        seed=seed, device=self.device, progress=False, init=source,
                                        freeze_encoder=freeze_encoder)
            if lr:
                args["lr"] = float(lr)
            if batch_size:
                args["batch_size"] = int(batch_size)
            result = train(TrainConfig(**args), ds, on_epoch=on_epoch)
            new = Classifier(result.checkpoint, self.device)
            ho = [it for it in items if split[it[0]] == "test"]
            images = [new.read(p) for _k, p, _n in ho]
            y = np.asarray([encode_label(n, self.task) for _k, _p, n in ho])
            served = self.classifier().probabilities(images) if self.checkpoint else None
            decision = decide_publication(self.task, y, new.probabilities(images), served, force)
        except MedClassError as e:
            raise ValueError(str(e)) from None
        summary = {**decision.as_dict(), "mode": "full", "images": len(items), "n_heldout": len(ho),
                   "n_train": len(items) - len(ho), "epochs_run": len(result.history), "run": str(run),
                   "init": source, "message": None if decision.publish else decision.reason}
        if decision.publish:
            summary["version"] = self.published.publish(result.checkpoint)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        return summary
