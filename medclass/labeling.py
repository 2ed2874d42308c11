"""Image-level labels and the annotation loop, for every annotation front door.

The MONAI Label app (``monailabel_app/``) and the Slicer module both speak the
label format defined here: a JSON object ``{"label": "<class>"}`` for
single-label tasks, ``{"labels": ["<class>", ...]}`` for multi-label ones.
This module validates it, turns labelled images into a
:class:`~medclass.data.LabelledSet` for :func:`medclass.training.train`, keeps
the served checkpoint (:class:`medclass.inference.PublishedModel`: atomic publication, reload when
it changes) and picks the next image to label from stored scores
(:func:`choose_next`). The app's classes are thin wrappers around these.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from medclass.data.sources import LabelledSet, Sample
from medclass.errors import MedClassError
from medclass.tasks import Task

if TYPE_CHECKING:
    import torch

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


def labelled_set(name: str, items: Iterable[tuple[str, str, list[str]]], task: Task,
                 splits: dict[str, str] | None = None) -> LabelledSet:
    """A :class:`~medclass.data.LabelledSet` from ``(image id, image path, class names)`` triples.

    ``splits`` (image id -> ``"train"`` / ``"test"``, from :func:`heldout_split`)
    fixes each image's split, so :func:`medclass.training.train` evaluates on
    the same held-out images the served model is compared on.
    """
    samples = [Sample(key, encode_label(names, task), path, split=(splits or {}).get(key))
               for key, path, names in items]
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


def reserved_ids(infos: dict[str, dict], hold_seconds: float, now: float | None = None) -> set[str]:
    """Images handed out within the last ``hold_seconds`` (still being labelled)."""
    now = time.time() if now is None else now
    out = set()
    for image_id, info in infos.items():
        r = (info or {}).get(RESERVED_KEY)
        if r and now - float(r.get("ts", 0)) < hold_seconds:
            out.add(image_id)
    return out


def candidate_pools(unlabelled: Iterable[str], infos: dict[str, dict], client: str | None, hold_seconds: float,
                    now: float | None = None) -> tuple[list[str], list[str]]:
    """The images a next-sample request may get: first choice and fallback.

    Parameters
    ----------
    unlabelled : iterable of str
        Unlabelled image ids.
    infos : dict
        Image id -> image info (holds the hand-out records).
    client : str or None
        The asking annotator's ``client_id``; None for an anonymous client
        (``MONAILabelClient``'s default).
    hold_seconds : float
        How long a hand-out stays reserved.

    Returns
    -------
    free : list of str
        Images nobody else holds. A named client may get back the images it
        holds; for an anonymous request every live hand-out counts as another
        annotator's, so two anonymous annotators asking at once get different
        images.
    fallback : list of str
        Images held by anonymous hand-outs, oldest first. Anonymous annotators
        cannot be told apart, so when the free images are used up (or none of
        them can be ranked) these are handed out again rather than starving the
        client that holds them (or anyone else). Images held by a named client
        are never in it: they stay reserved for that client.
    """
    now = time.time() if now is None else now
    free, held = [], []
    for i in unlabelled:
        r = (infos.get(i) or {}).get(RESERVED_KEY)
        live = bool(r) and now - float(r.get("ts", 0)) < hold_seconds
        if not live or (client is not None and r.get("client") == client):
            free.append(i)
        elif r.get("client") is None:
            held.append((float(r.get("ts", 0)), i))
    return free, [i for _ts, i in sorted(held)]


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
    from medclass.active import NEEDS_EMBEDDINGS, NEEDS_SCORES, STRATEGIES, select

    if strategy not in STRATEGIES:
        raise MedClassError(f"unknown strategy {strategy!r}", f"use one of: {', '.join(STRATEGIES)}")
    if not candidates:
        return None
    seed = int(np.random.default_rng().integers(2**31)) if seed is None else seed
    pool = list(candidates)
    detail: dict[str, Any] = {"strategy": strategy, "candidates": len(pool)}
    method = {"hybrid": "entropy"}.get(strategy, strategy)
    score_vec = None
    if strategy in NEEDS_SCORES:
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
    if strategy in NEEDS_EMBEDDINGS:
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


# --------------------------------------------------------------------------- publication

#: Fewest labelled images of each class before a training run: one to learn from, one
#: held out to compare the new model with the served one.
MIN_LABELS_PER_CLASS = 2
#: Share of the labelled images held out from training to compare models on.
HELDOUT_FRACTION = 0.2


def _hash_fraction(image_id: str) -> float:
    """A stable number in [0, 1) per image id: the held-out rule must not move as labels grow."""
    return int(hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def heldout_split(items: list[tuple[str, str, list[str]]], task: Task,
                  fraction: float = HELDOUT_FRACTION) -> dict[str, str]:
    """Split labelled images into training images and held-out ones, by image id.

    An image is held out when the hash of its id falls below ``fraction``, so
    the same image stays held out in every later run (the served model never
    trained on it, which keeps the comparison fair); every class (every
    finding, for multi-label) keeps at least one held-out image and one
    training image.

    Parameters
    ----------
    items : list of (str, str, list of str)
        ``(image id, path, class names)`` of every labelled image.
    task : Task
        The labelling task.
    fraction : float
        Share held out.

    Returns
    -------
    dict
        Image id -> ``"train"`` or ``"test"`` (held out).

    Raises
    ------
    MedClassError
        Fewer than :data:`MIN_LABELS_PER_CLASS` labelled images of some class.
    """
    members: dict[str, list[str]] = {c: [] for c in task.classes}
    for key, _path, names in items:
        for n in names:
            members[n].append(key)
    short = {c: len(v) for c, v in members.items() if len(v) < MIN_LABELS_PER_CLASS}
    if short:
        counts = ", ".join(f"{c}: {n}" for c, n in short.items())
        raise MedClassError(f"too few labels to train and compare with the served model ({counts}; "
                            f"{len(items)} labelled in all)",
                            f"label at least {MIN_LABELS_PER_CLASS} images of every class "
                            "(one is held out to check that a new model is no worse than the served one)")
    split = {key: ("test" if _hash_fraction(key) < fraction else "train") for key, _p, _n in items}
    for keys in members.values():
        ranked = sorted(keys, key=_hash_fraction)
        if not any(split[k] == "test" for k in keys):
            split[ranked[0]] = "test"
        if not any(split[k] == "train" for k in keys):
            split[ranked[-1]] = "train"
    return split


def heldout_score(task: Task, y: np.ndarray, probs: np.ndarray) -> tuple[str, float]:
    """The number two models are compared by on held-out images, and its name.

    Quadratic weighted kappa for ordinal tasks, else the (macro) AUC; accuracy
    where the AUC is undefined (e.g. a multi-label finding without a negative).
    """
    from medclass.metrics import compute_metrics

    m = compute_metrics(task.type, np.asarray(y), np.asarray(probs, dtype=np.float64), list(task.classes))
    if task.type == "ordinal" and m.get("qwk") is not None:
        return "qwk", float(m["qwk"])
    if m.get("auc") is not None:
        return "auc", float(m["auc"])
    return "accuracy", float(m["accuracy"])


@dataclass
class PublicationDecision:
    """Whether a newly trained model replaces the served one, and why."""

    publish: bool
    reason: str
    metric: str
    new_score: float
    served_score: float | None
    n_heldout: int

    def as_dict(self) -> dict[str, Any]:
        return {"published": self.publish, "reason": self.reason, "metric": self.metric,
                "new_score": round(self.new_score, 6),
                "served_score": None if self.served_score is None else round(self.served_score, 6),
                "n_heldout": self.n_heldout}


def decide_publication(task: Task, y: np.ndarray, new_probs: np.ndarray, served_probs: np.ndarray | None,
                       force: bool = False) -> PublicationDecision:
    """Publish a new model only when it scores at least as well as the served one.

    Parameters
    ----------
    task : Task
        The labelling task.
    y : np.ndarray
        Targets of the held-out images (class indices, or 0/1 rows for multi-label).
    new_probs, served_probs : np.ndarray
        ``(N, K)`` probabilities of the new and the served model on the same images;
        ``served_probs`` is None when nothing is served yet.
    force : bool
        Publish whatever the scores (the annotation lead's explicit choice).
    """
    metric, new = heldout_score(task, y, new_probs)
    served = heldout_score(task, y, served_probs)[1] if served_probs is not None else None
    n = len(y)
    if served is None:
        return PublicationDecision(True, "no model was served yet", metric, new, None, n)
    if force:
        return PublicationDecision(True, f"forced (held-out {metric} {new:.4f} vs the served model's {served:.4f})",
                                   metric, new, served, n)
    if new >= served:
        return PublicationDecision(True, f"held-out {metric} {new:.4f} >= the served model's {served:.4f} "
                                         f"on the same {n} images", metric, new, served, n)
    return PublicationDecision(False, f"kept the served model: held-out {metric} {new:.4f} < its {served:.4f} "
                                      f"on the same {n} images (train with force=true to publish anyway)",
                               metric, new, served, n)


# --------------------------------------------------------------------------- fast retraining

def has_linear_head(model: Any) -> bool:
    """Whether ``model`` is ``head(forward_features(x))`` with a linear head (the zoo's torch models)."""
    import torch.nn as nn

    return (isinstance(model, nn.Module) and callable(getattr(model, "forward_features", None))
            and isinstance(getattr(model, "head", None), nn.Linear))


def targets(task: Task, encoded: list) -> torch.Tensor:
    """Encoded labels (:func:`encode_label`) as a training target tensor."""
    import torch

    if task.type == "multilabel":
        return torch.tensor(np.asarray(encoded, dtype=np.float32))
    return torch.tensor(np.asarray(encoded, dtype=np.int64))


def fit_head(model: Any, task: Task, features: np.ndarray, encoded: list, weight_decay: float = 1e-3,
             max_iter: int = 100, seed: int = 0) -> Any:
    """A copy of ``model`` whose linear head is refitted on fixed embeddings.

    The encoder is left as it is; the head (a multinomial / one-vs-rest logistic
    regression, or the ordinal model's cumulative logits) is fitted by L-BFGS on
    the full batch with the task's class-weighted loss and an L2 penalty,
    starting from the served head: a convex problem of a few thousand weights,
    solved in well under a second on a CPU.

    Parameters
    ----------
    model : torch.nn.Module
        A model with :func:`has_linear_head`.
    task : Task
        The labelling task.
    features : np.ndarray
        ``(N, F)`` embeddings (``forward_features`` in eval mode) of the training images.
    encoded : list
        Their labels, as :func:`encode_label` gives them.
    weight_decay : float
        L2 penalty on the head's weights (not its bias).
    max_iter : int
        L-BFGS iterations.
    seed : int
        Seeds torch for reproducible results.
    """
    import torch

    if not has_linear_head(model):
        raise MedClassError(f"{type(model).__name__} has no linear head on an embedding to refit",
                            "train with mode=full")
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few thousand weights: extra threads only wait on each other
    try:
        return _fit_head(model, task, features, encoded, weight_decay, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit_head(model: Any, task: Task, features: np.ndarray, encoded: list, weight_decay: float,
              max_iter: int) -> Any:
    import copy

    import torch

    new = copy.deepcopy(model).cpu().eval()
    head = new.head.float()
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = targets(task, encoded)
    criterion = task.loss(task.class_weights(y.numpy()))
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = criterion(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    for p in new.parameters():
        p.requires_grad_(False)
    return new


def head_probabilities(model: Any, task: Task, features: np.ndarray) -> np.ndarray:
    """``(N, K)`` class probabilities of ``model``'s head on embeddings ``features``."""
    import copy

    import torch

    head = copy.deepcopy(model.head).float().cpu()  # the model itself stays where it is
    with torch.inference_mode():
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        return task.probabilities(head(x)).numpy().astype(np.float64)


def scores_from_embeddings(model: Any, task: Task, features: np.ndarray, methods: Iterable[str] | None = None,
                           mc_samples: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Uncertainty scores from stored embeddings and the model's head, without reading an image.

    The same quantities :func:`medclass.active.score_pool` computes, for a model
    whose only change is its head: probabilities from ``head(embedding)``; BALD
    samples the dropout that precedes the head (the model's own ``dropout``
    layer, else :data:`medclass.active.FALLBACK_DROPOUT`), as
    :func:`~medclass.active.mc_dropout_probabilities` does for the zoo's models.
    """
    import copy

    import torch

    from medclass.active import FALLBACK_DROPOUT, SCORE_METHODS, bald, uncertainty

    methods = list(methods or SCORE_METHODS)
    probs = head_probabilities(model, task, features)
    out: dict[str, np.ndarray] = {}
    for m in methods:
        if m != "bald":
            out[m] = uncertainty(probs, m, task.type)
    if "bald" in methods:
        drop = getattr(model, "dropout", None)
        p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.p > 0 else FALLBACK_DROPOUT
        gen = torch.Generator().manual_seed(seed)
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        head = copy.deepcopy(model.head).float().cpu()
        rows = []
        with torch.inference_mode():
            for _ in range(mc_samples):
                mask = (torch.rand(x.shape, generator=gen) >= p).float() / (1 - p)
                rows.append(task.probabilities(head(x * mask)).numpy())
        out["bald"] = bald(np.stack(rows).astype(np.float64), task.type)
    return out
