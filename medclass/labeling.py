"""Image-level labels and the annotation loop, for every annotation front door.

The MONAI Label app (``monailabel_app/``) and the Slicer module both speak the
label format defined here: a JSON object ``{"label": "<class>"}`` for
single-label tasks, ``{"labels": ["<class>", ...]}`` for multi-label ones.
This module validates it, turns labelled images into a
:class:`~medclass.data.LabelledSet` for :func:`medclass.training.train`, keeps
the served checkpoint (:class:`PublishedModel`: atomic publication, reload when
it changes) and picks the next image to label from stored scores
(:func:`choose_next`). The app's classes are thin wrappers around these.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from medclass.data.sources import LabelledSet, Sample
from medclass.errors import MedClassError
from medclass.tasks import Task

#: Where the app keeps an image's scores in the datastore's image info.
SCORES_KEY = "medclass"
#: Where a hand-out (next sample) is recorded, so two annotators get different images.
RESERVED_KEY = "medclass_reserved"


def parse_label(payload: Any, task: Task, params: dict | None = None) -> list[str]:
    """Validate an image-level label and return its class names.

    Parameters
    ----------
    payload : dict, str or bytes
        The label file's content: ``{"label": "<class>"}`` or ``{"labels": [...]}``
        (JSON text or an already parsed object). May be empty when ``params``
        carries the label.
    task : Task
        The model's task: its class names and type.
    params : dict, optional
        The request's parameters; ``label``/``labels`` there are used when the
        payload has none.

    Returns
    -------
    list of str
        One class name (single-label tasks) or any number (multi-label; an
        empty list means "none of the findings").

    Raises
    ------
    MedClassError
        Not JSON, no label, an unknown class, or several classes for a
        single-label task.
    """
    allowed = ", ".join(task.classes)
    if isinstance(payload, (bytes, bytearray)):
        payload = payload.decode("utf-8", errors="replace")
    if isinstance(payload, str):
        text = payload.strip()
        try:
            payload = json.loads(text) if text else {}
        except json.JSONDecodeError as e:
            raise MedClassError(f"the label is not JSON ({e.msg} at character {e.pos})",
                                'send {"label": "<class>"}' + f" with one of: {allowed}") from None
    if not isinstance(payload, dict):
        raise MedClassError(f"the label must be a JSON object, got {type(payload).__name__}",
                            'send {"label": "<class>"}' + f" with one of: {allowed}")
    source = payload if ("label" in payload or "labels" in payload) else (params or {})
    if "labels" in source and source["labels"] is not None:
        names = source["labels"]
        if isinstance(names, str):
            names = [n for n in names.split("|")]
        if not isinstance(names, list):
            raise MedClassError("'labels' must be a list of class names", f"e.g. {{\"labels\": [\"{task.classes[0]}\"]}}")
    elif source.get("label") not in (None, ""):
        names = [source["label"]]
    else:
        raise MedClassError("no label given",
                            f'send {{"label": "<class>"}} (or {{"labels": [...]}} for multi-label) with one of: {allowed}')
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in task.classes]
    if unknown:
        raise MedClassError(f"unknown class {', '.join(map(repr, unknown))}", f"use one of: {allowed}")
    if task.type != "multilabel" and len(names) != 1:
        raise MedClassError(f"a {task.type} task takes exactly one class per image, got {len(names)}",
                            f'send {{"label": "<class>"}} with one of: {allowed}')
    return list(dict.fromkeys(names))


def label_payload(names: Iterable[str] | str, task: Task) -> dict[str, Any]:
    """The JSON object a client sends for ``names`` (inverse of :func:`parse_label`)."""
    names = [names] if isinstance(names, str) else list(names)
    return {"labels": names} if task.type == "multilabel" else {"label": names[0]}


def encode_label(names: list[str], task: Task) -> int | list[int]:
    """A validated label as the training target (class index, or a 0/1 list)."""
    if task.type == "multilabel":
        return [int(c in names) for c in task.classes]
    return task.classes.index(names[0])


def labelled_set(name: str, items: Iterable[tuple[str, str, list[str]]], task: Task) -> LabelledSet:
    """A :class:`~medclass.data.LabelledSet` from ``(image id, image path, class names)`` triples."""
    samples = [Sample(key, encode_label(names, task), path) for key, path, names in items]
    if not samples:
        raise MedClassError("no labelled images", "label some images first (PUT /datastore/label)")
    counts = np.bincount([s.label for s in samples], minlength=len(task.classes)) \
        if task.type != "multilabel" else np.array([sum(s.label[k] for s in samples) for k in range(len(task.classes))])
    missing = [c for c, n in zip(task.classes, counts) if n == 0]
    if task.type != "multilabel" and missing:
        raise MedClassError(f"no labelled image of class {', '.join(missing)} yet ({len(samples)} labelled)",
                            "label at least a few images of every class before training")
    fp = hashlib.sha1(json.dumps([(s.key, s.label) for s in samples]).encode()).hexdigest()[:16]
    return LabelledSet(name, samples, task, fp, {}, "image-level labels from the annotation datastore")


@dataclass
class PublishedModel:
    """The checkpoint an annotation server serves for one model name.

    Training writes a new ``model.pt`` elsewhere and :meth:`publish` moves it
    in place atomically; :meth:`classifier` notices the new file (its size and
    modification time) and reloads it, so the next request uses the new model
    without a restart.
    """

    path: Path
    device: str = "auto"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._lock = threading.Lock()
        self._cached: tuple[str, Any] | None = None

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    @property
    def version(self) -> str | None:
        """Changes whenever a new checkpoint is published; ``None`` before the first."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return f"{st.st_mtime_ns}-{st.st_size}"

    def card(self) -> dict[str, Any] | None:
        from medclass.checkpoint import read_card

        return read_card(self.path) if self.exists else None

    def classifier(self):
        """The current :class:`~medclass.inference.Classifier` (reloaded after a publication)."""
        from medclass.inference import Classifier

        with self._lock:
            version = self.version
            if version is None:
                raise MedClassError(f"no trained model at {self.path}",
                                    "label images of every class and start a training run")
            if self._cached is None or self._cached[0] != version:
                self._cached = (version, Classifier(self.path, self.device))
            return self._cached[1]

    def publish(self, checkpoint: str | Path) -> str:
        """Copy ``checkpoint`` into place atomically; returns the new version."""
        import shutil

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return self.version or ""


def reserved_ids(infos: dict[str, dict], hold_seconds: float, now: float | None = None) -> set[str]:
    """Images handed out within the last ``hold_seconds`` (still being labelled)."""
    now = time.time() if now is None else now
    out = set()
    for image_id, info in infos.items():
        r = (info or {}).get(RESERVED_KEY)
        if r and now - float(r.get("ts", 0)) < hold_seconds:
            out.add(image_id)
    return out


def choose_next(
    strategy: str,
    candidates: list[str],
    scores: dict[str, dict[str, Any]] | None = None,
    embeddings: dict[str, np.ndarray] | None = None,
    labelled: list[str] | None = None,
    seed: int | None = None,
) -> tuple[str, dict[str, Any]] | None:
    """Pick the next image to label among ``candidates``.

    Parameters
    ----------
    strategy : str
        One of :data:`medclass.active.STRATEGIES`.
    candidates : list of str
        Unlabelled image ids not handed out to someone else.
    scores : dict, optional
        Image id → ``{"version": ..., "scores": {method: value}}`` or ``{"error": ...}``
        as stored by the scoring task.
    embeddings : dict, optional
        Image id → embedding vector, for ``coreset`` and ``hybrid``.
    labelled : list of str, optional
        Labelled image ids (the set core-set keeps its distance from).
    seed : int, optional
        For ``random`` and tie breaking; ``None`` draws a fresh one.

    Returns
    -------
    (str, dict) or None
        The image id and what the choice was based on; ``None`` when nothing is
        left to label.

    Raises
    ------
    MedClassError
        Unknown strategy, or the scores/embeddings it needs are missing.
    """
    from medclass.active import STRATEGIES, select

    if strategy not in STRATEGIES:
        raise MedClassError(f"unknown strategy {strategy!r}", f"use one of: {', '.join(STRATEGIES)}")
    if not candidates:
        return None
    seed = int(np.random.default_rng().integers(2**31)) if seed is None else seed
    pool = list(candidates)
    detail: dict[str, Any] = {"strategy": strategy, "candidates": len(pool)}
    method = {"hybrid": "entropy"}.get(strategy, strategy)
    score_vec = None
    if strategy in ("entropy", "margin", "least-confidence", "bald", "hybrid"):
        scored, failed = [], 0
        for i in pool:
            entry = (scores or {}).get(i) or {}
            if "error" in entry:
                failed += 1  # a failure is not a score: leave the image out, say so
            elif method in entry.get("scores", {}):
                scored.append(i)
        if not scored:
            raise MedClassError(f"no {method} scores for the {len(pool)} unlabelled images yet",
                                "run the scoring task (POST /scoring/medclass_uncertainty; it also runs "
                                "after every training)")
        detail.update(scored=len(scored), unscored=len(pool) - len(scored) - failed, failed=failed)
        pool = scored
        score_vec = np.array([float(scores[i]["scores"][method]) for i in pool])
    pool_emb = lab_emb = None
    if strategy in ("coreset", "hybrid"):
        have = [i for i in pool if embeddings is not None and i in embeddings]
        if not have:
            raise MedClassError("no embeddings for the unlabelled images yet",
                                "run the scoring task (POST /scoring/medclass_uncertainty) with a trained model")
        if score_vec is not None:
            keep = set(have)
            score_vec = np.array([s for i, s in zip(pool, score_vec) if i in keep])
        pool = have
        pool_emb = np.stack([embeddings[i] for i in pool])
        lab = [i for i in (labelled or []) if i in embeddings]
        lab_emb = np.stack([embeddings[i] for i in lab]) if lab else None
    k = select(strategy, 1, scores=score_vec, pool_embeddings=pool_emb, labelled_embeddings=lab_emb, seed=seed,
               pool_size=len(pool))[0]
    chosen = pool[k]
    if score_vec is not None:
        detail["score"] = round(float(score_vec[k]), 6)
    return chosen, detail


def score_images(
    classifier,
    paths: dict[str, str],
    methods: Iterable[str] | None = None,
    mc_samples: int = 10,
    chunk: int = 256,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Uncertainty scores and embeddings of images, for the active-learning strategies.

    Parameters
    ----------
    classifier : Classifier
        The served model.
    paths : dict
        Image id → file (or DICOM series folder).
    methods : iterable of str, optional
        Default: every method of :data:`medclass.active.SCORE_METHODS` the model
        supports (BALD needs a torch model).
    mc_samples : int
        Monte-Carlo dropout passes for BALD.
    chunk : int
        Images read and scored at a time (bounds memory).

    Returns
    -------
    scores : dict
        Image id → ``{"scores": {method: value}}``, or ``{"error": message}``
        for an image that could not be read or scored: a failure is recorded as
        such, never as a score.
    embeddings : dict
        Image id → embedding vector (float32).
    """
    import torch

    from medclass.active import SCORE_METHODS, score_pool

    loaded = classifier.loaded
    methods = [m for m in (methods or SCORE_METHODS) if loaded.is_torch or m != "bald"]
    ids = list(paths)
    scores: dict[str, dict[str, Any]] = {}
    embeddings: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), chunk):
        part, images = [], []
        for i in ids[start : start + chunk]:
            try:
                images.append(classifier.read(paths[i]))
                part.append(i)
            except MedClassError as e:
                scores[i] = {"error": str(e)}
        if not part:
            continue
        x = torch.stack([classifier.preprocess(im) for im in images])
        extra = classifier.extra_inputs([im.meta for im in images])
        out = score_pool(loaded, x, extra, methods=methods, mc_samples=mc_samples)
        for j, i in enumerate(part):
            values = {m: float(out[m][j]) for m in methods}
            bad = [m for m, v in values.items() if not np.isfinite(v)]
            if bad:
                scores[i] = {"error": f"non-finite {', '.join(bad)} score"}
                continue
            scores[i] = {"scores": {m: round(v, 6) for m, v in values.items()}}
            embeddings[i] = np.asarray(out["embedding"][j], dtype=np.float32)
    return scores, embeddings
