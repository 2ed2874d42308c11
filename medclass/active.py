"""Active learning for image-level classifiers: which unlabelled image to label next.

Written for classifiers, not taken from MONAI Label's segmentation scoring (whose
``EpistemicScoring`` puts BatchNorm in training mode and breaks on 2D
classification). Every front door calls these functions: the MONAI Label app's
scoring and strategies, the Slicer module's "next case", and ``medclass al-sim``,
which measures whether they pay.

Scores, higher = more informative:

=====================  ================================================================
``entropy``            predictive entropy, divided by its maximum (``log K``; per label for
                       multi-label), so it lies in [0, 1]
``margin``             ``1 - (p_top1 - p_top2)`` (multi-label: ``1 - |2p - 1|`` per label)
``least-confidence``   ``(1 - p_top1) * K / (K - 1)`` (multi-label: per label, as binary)
``bald``               mutual information between the prediction and the weights (Houlsby
                       et al. 2011), estimated with MC dropout: only the dropout layers are
                       sampled, BatchNorm keeps its running statistics
=====================  ================================================================

Multi-label scores average the per-label binary quantities (BALD sums them: the
labels are independent Bernoullis, so their informations add). Ordinal tasks are
scored on their grade probabilities, like multi-class ones.

Strategies: ``random``; the four scores (top-k); ``coreset`` (k-center greedy on the
model's embeddings, Sener & Savarese 2018: the diversity strategy for a cold start,
which needs no trustworthy probabilities); ``hybrid`` (the ``4k`` most uncertain, then
k-center among them, so that one batch does not spend its labels on near-duplicates).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Iterator

import numpy as np
import torch
from scipy.special import entr
from torch import nn

from medclass.checkpoint import LoadedModel
from medclass.errors import MedClassError
from medclass.inference import autocast
from medclass.tasks import TASK_TYPES

log = logging.getLogger(__name__)

SCORE_METHODS = ("entropy", "margin", "least-confidence", "bald")
STRATEGIES = ("random", "entropy", "margin", "least-confidence", "bald", "coreset", "hybrid")

# Dropout on the embedding for models built without any (see mc_dropout_probabilities).
FALLBACK_DROPOUT = 0.2
# Hybrid: candidates per image to label (the k most diverse of the 4k most uncertain).
HYBRID_FACTOR = 4


# --------------------------------------------------------------------------- scores


def _check_task(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise MedClassError(f"unknown task type {task_type!r}", f"use one of {', '.join(TASK_TYPES)}")


def _check_probs(probs: np.ndarray, ndim: int, what: str) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != ndim:
        raise MedClassError(f"{what} must have {ndim} dimensions, got shape {probs.shape}",
                            "pass the model's probabilities (N, K)" if ndim == 2
                            else "pass MC-dropout probabilities (samples, N, K)")
    bad = ~np.isfinite(probs)
    if bad.any():
        rows = int(bad.any(axis=1).sum()) if ndim == 2 else int(bad.any(axis=(0, 2)).sum())
        raise MedClassError(f"{what} of {rows} image(s) are NaN or infinite: the model failed on them",
                            "check those images and the checkpoint; a failed prediction is never scored")
    return probs


# entr(x) = -x log x with entr(0) = 0 exactly; probabilities are clipped to [0, 1]
# because float32 softmax and the ordinal differences can stray by an ulp.
def _binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    return entr(p) + entr(1.0 - p)


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    return entr(np.clip(p, 0.0, 1.0)).sum(axis=axis)


def uncertainty(probs: np.ndarray, method: str, task_type: str) -> np.ndarray:
    """Per-image uncertainty from predicted probabilities; higher = more informative.

    Parameters
    ----------
    probs : np.ndarray
        ``(N, K)`` probabilities as :meth:`medclass.tasks.Task.probabilities` gives them:
        class probabilities (binary, multiclass, ordinal grades) or one independent
        probability per label (multilabel).
    method : {"entropy", "margin", "least-confidence"}
        The score (see the module docstring). ``bald`` needs MC-dropout samples: use
        :func:`bald` or :func:`score_pool`.
    task_type : str
        ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.

    Returns
    -------
    np.ndarray
        ``(N,)`` float64 scores in [0, 1].

    Raises
    ------
    MedClassError
        For an unknown method or task type, or probabilities that are NaN.
    """
    if method == "bald":
        raise MedClassError("bald needs MC-dropout samples, not one set of probabilities",
                            "use bald(mc_dropout_probabilities(...)) or score_pool(..., methods=['bald'])")
    if method not in SCORE_METHODS:
        raise MedClassError(f"unknown uncertainty method {method!r}",
                            f"use one of {', '.join(m for m in SCORE_METHODS if m != 'bald')}")
    _check_task(task_type)
    p = _check_probs(probs, 2, "probabilities")
    n, k = p.shape
    if n == 0:
        return np.zeros(0)
    if task_type == "multilabel":
        if method == "entropy":
            per_label = _binary_entropy(p) / math.log(2)
        else:
            # For two outcomes margin and least confidence are the same quantity.
            per_label = 1 - np.abs(2 * p - 1)
        return per_label.mean(axis=1)
    if k < 2:
        raise MedClassError(f"probabilities have {k} column(s); a single-label task has at least 2 classes",
                            "pass the class probabilities (N, K)")
    if method == "entropy":
        return np.clip(_entropy(p) / math.log(k), 0.0, 1.0)
    top2 = -np.sort(-p, axis=1)[:, :2]
    if method == "margin":
        return np.clip(1 - (top2[:, 0] - top2[:, 1]), 0.0, 1.0)
    return np.clip((1 - top2[:, 0]) * k / (k - 1), 0.0, 1.0)


def bald(mc_probs: np.ndarray, task_type: str) -> np.ndarray:
    """BALD: mutual information between an image's label and the model's weights.

    ``H[E_s p_s] - E_s H[p_s]`` over MC-dropout samples ``s``, in nats: 0 when every
    sample agrees, large when samples are individually confident but disagree.

    Parameters
    ----------
    mc_probs : np.ndarray
        ``(S, N, K)`` probabilities from :func:`mc_dropout_probabilities`.
    task_type : str
        Multilabel: each label is a Bernoulli and the informations are summed over labels.

    Returns
    -------
    np.ndarray
        ``(N,)`` float64, non-negative.
    """
    _check_task(task_type)
    p = _check_probs(mc_probs, 3, "MC-dropout probabilities")
    if p.shape[1] == 0:
        return np.zeros(0)
    if task_type == "multilabel":
        mi = _binary_entropy(p.mean(axis=0)) - _binary_entropy(p).mean(axis=0)  # (N, K)
        mi = mi.sum(axis=1)
    else:
        mi = _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)
    # Jensen makes it >= 0; rounding can leave -1e-16.
    return np.clip(mi, 0.0, None)


# --------------------------------------------------------------------------- model passes


def _require_torch(loaded: LoadedModel, what: str) -> nn.Module:
    if not loaded.is_torch:
        raise MedClassError(f"{what} needs a torch model; {loaded.card.get('model', {}).get('name', 'this model')} "
                            "is a scikit-learn model",
                            "use entropy, margin, least-confidence or coreset with classic models, "
                            "or train a torch model (medclass models)")
    return loaded.model


def _batches(x: torch.Tensor, extra: dict | None, batch_size: int, device: torch.device) -> Iterator:
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device, non_blocking=True)
        eb = {k: v[i : i + batch_size].to(device) for k, v in (extra or {}).items()}
        yield xb, eb


@contextlib.contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """Put every module back in the train/eval mode it had, whatever happens inside."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """A private RNG stream: MC sampling is reproducible and leaves the caller's RNG alone."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _has_features_head(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and isinstance(getattr(model, "head", None),
                                                                           nn.Module)


def mc_dropout_probabilities(
    loaded: LoadedModel,
    x: torch.Tensor,
    extra: dict | None = None,
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> np.ndarray:
    """Probabilities under MC dropout: ``samples`` stochastic passes of each image.

    The model is in eval mode except its ``nn.Dropout*`` layers, which sample: BatchNorm
    keeps its running statistics (MONAI Label's epistemic scoring puts the whole model in
    training mode, which changes BatchNorm's statistics and the model). A model without
    dropout gets dropout ``p=0.2`` on its embedding, between ``forward_features`` and
    ``head``. Every module's mode is restored afterwards, also on error.

    Parameters
    ----------
    loaded : LoadedModel
        A torch model (a classic scikit-learn model has no dropout to sample).
    x : torch.Tensor
        Preprocessed images ``(N, C, ...)``.
    extra : dict, optional
        Non-image inputs of a cross-modal model (``text``, ``tabular``), ``(N, ...)`` each.
    samples : int
        Number of stochastic passes.
    seed : int
        Seeds the dropout masks (the caller's torch RNG state is left as it was).
    batch_size : int
        Images per forward pass.

    Returns
    -------
    np.ndarray
        ``(samples, N, K)`` float64.
    """
    model = _require_torch(loaded, "BALD (MC dropout)")
    if samples < 2:
        raise MedClassError(f"MC dropout needs at least 2 samples, got {samples}", "pass samples >= 2")
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if not dropouts and not _has_features_head(model):
        raise MedClassError(f"{type(model).__name__} has no dropout layer and no forward_features/head to add one",
                            "register the model as a ClassifierModule (medclass.models.registry)")
    if not dropouts:
        log.info("%s has no dropout layer: sampling dropout p=%.1f on its embedding for BALD",
                 type(model).__name__, FALLBACK_DROPOUT)
    dev = loaded.device
    out = torch.empty(samples, 0, len(loaded.task.classes))
    chunks: list[torch.Tensor] = []
    with _modes_restored(model), _seeded(seed, dev):
        model.eval()
        for m in dropouts:
            m.train()
        with torch.inference_mode(), autocast(dev):
            for xb, eb in _batches(x, extra, batch_size, dev):
                rows = []
                if dropouts:
                    for _ in range(samples):
                        rows.append(loaded.task.probabilities(model(xb, **eb)).float().cpu())
                else:
                    # The deterministic body once, the sampled dropout and head per sample.
                    feats = model.forward_features(xb, **eb)
                    for _ in range(samples):
                        logits = model.head(nn.functional.dropout(feats, FALLBACK_DROPOUT, training=True))
                        rows.append(loaded.task.probabilities(logits).float().cpu())
                chunks.append(torch.stack(rows))
    if chunks:
        out = torch.cat(chunks, dim=1)
    return out.numpy().astype(np.float64)


def embeddings(loaded: LoadedModel, x: torch.Tensor, extra: dict | None = None, batch_size: int = 64) -> np.ndarray:
    """The model's pooled embedding of each image, for core-set selection.

    Parameters
    ----------
    loaded : LoadedModel
        A torch model (``forward_features``, eval mode) or a classic model (its
        hand-crafted input features, e.g. HOG + intensity histogram).
    x : torch.Tensor
        Preprocessed images ``(N, C, ...)``.
    extra : dict, optional
        Non-image inputs of a cross-modal model.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    np.ndarray
        ``(N, F)`` float32.
    """
    return _deterministic_pass(loaded, x, extra, batch_size, want_probs=False)[1]


def _deterministic_pass(loaded: LoadedModel, x: torch.Tensor, extra: dict | None, batch_size: int,
                        want_probs: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Probabilities (if asked) and embeddings from one eval-mode pass."""
    model = loaded.model
    if not loaded.is_torch:
        features = getattr(model, "features", None)
        if features is None:
            raise MedClassError(f"{type(model).__name__} exposes no feature vector for core-set selection",
                                "use an uncertainty strategy, or a model with features() (medclass.models.classic)")
        xs = x.numpy()
        emb = np.asarray(features(xs), dtype=np.float32)
        probs = np.asarray(model.predict_proba(xs), dtype=np.float64) if want_probs else None
        return probs, emb
    if not callable(getattr(model, "forward_features", None)):
        raise MedClassError(f"{type(model).__name__} has no forward_features() embedding",
                            "register the model as a ClassifierModule (medclass.models.registry)")
    use_head = want_probs and _has_features_head(model)
    dev = loaded.device
    embs, probs = [], []
    with _modes_restored(model), torch.inference_mode(), autocast(dev):
        model.eval()
        for xb, eb in _batches(x, extra, batch_size, dev):
            f = model.forward_features(xb, **eb)
            embs.append(f.float().cpu())
            if want_probs:
                # ClassifierModule.forward is head(forward_features): one pass gives both.
                logits = model.head(f) if use_head else model(xb, **eb)
                probs.append(loaded.task.probabilities(logits).float().cpu())
    if not embs:
        return (np.zeros((0, len(loaded.task.classes))) if want_probs else None), np.zeros((0, 0), np.float32)
    emb = torch.cat(embs).numpy().astype(np.float32)
    return (torch.cat(probs).numpy().astype(np.float64) if want_probs else None), emb


def score_pool(
    loaded: LoadedModel,
    x: torch.Tensor,
    extra: dict | None = None,
    methods: Iterable[str] = SCORE_METHODS,
    mc_samples: int = 10,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every requested score of the unlabelled pool, plus its embeddings.

    One deterministic pass gives the probabilities (entropy, margin, least confidence)
    and the embeddings; BALD adds one MC-dropout pass.

    Parameters
    ----------
    loaded : LoadedModel
        The current model.
    x : torch.Tensor
        Preprocessed pool images ``(N, C, ...)``.
    extra : dict, optional
        Non-image inputs of a cross-modal model.
    methods : iterable of str
        A subset of :data:`SCORE_METHODS`.
    mc_samples : int
        MC-dropout passes for BALD.
    seed : int
        Seeds the dropout masks.

    Returns
    -------
    dict
        ``{method: (N,) float64}`` for each method and ``"embedding": (N, F) float32``.

    Raises
    ------
    MedClassError
        For an unknown method, BALD with a classic model, or a model whose output is NaN
        (a failed score is reported, never stored as a number).
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in SCORE_METHODS]
    if unknown:
        raise MedClassError(f"unknown scoring method(s) {', '.join(map(repr, unknown))}",
                            f"use some of {', '.join(SCORE_METHODS)}")
    if "bald" in methods:
        _require_torch(loaded, "BALD (MC dropout)")
    task_type = loaded.task.type
    probs, emb = _deterministic_pass(loaded, x, extra, 64)
    out: dict[str, np.ndarray] = {}
    for m in methods:
        if m == "bald":
            out[m] = bald(mc_dropout_probabilities(loaded, x, extra, mc_samples, seed), task_type)
        else:
            out[m] = uncertainty(probs, m, task_type)
    if not np.isfinite(emb).all():
        raise MedClassError("the model's embeddings are NaN or infinite", "check the checkpoint and the images")
    out["embedding"] = emb
    return out


# --------------------------------------------------------------------------- selection


def _min_sq_distances(points: np.ndarray, centers: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Squared L2 distance of each point to its nearest center, chunked over points."""
    out = np.full(len(points), np.inf)
    if len(centers) == 0:
        return out
    c_sq = (centers * centers).sum(axis=1)
    for i in range(0, len(points), chunk):
        p = points[i : i + chunk]
        for j in range(0, len(centers), chunk):
            c = centers[j : j + chunk]
            d = (p * p).sum(axis=1)[:, None] + c_sq[None, j : j + chunk] - 2.0 * (p @ c.T)
            out[i : i + chunk] = np.minimum(out[i : i + chunk], d.min(axis=1))
    return np.maximum(out, 0.0)


def _as_matrix(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise MedClassError(f"{what} must be a matrix (N, F), got shape {a.shape}",
                            "pass the 'embedding' returned by score_pool()")
    if not np.isfinite(a).all():
        raise MedClassError(f"{what} hold NaN or infinite values", "re-run scoring; check the model")
    return a


def k_center_greedy(pool: np.ndarray, labelled: np.ndarray | None, k: int, seed: int = 0) -> list[int]:
    """Greedy k-center (core-set) selection: each pick is the pool point farthest from
    everything labelled or picked so far.

    Parameters
    ----------
    pool : np.ndarray
        ``(N, F)`` embeddings of the unlabelled images.
    labelled : np.ndarray or None
        ``(M, F)`` embeddings of the labelled images; None or empty: the first pick is a
        seeded random pool point.
    k : int
        Number of picks; fewer when the pool is smaller.
    seed : int
        Seeds the first pick of a cold start.

    Returns
    -------
    list of int
        Distinct indices into ``pool``, in the order picked.
    """
    pool = _as_matrix(pool, "pool embeddings")
    n = len(pool)
    k = min(int(k), n)
    if k <= 0:
        return []
    if labelled is not None and np.size(labelled):
        labelled = _as_matrix(labelled, "labelled embeddings")
        if labelled.shape[1] != pool.shape[1]:
            raise MedClassError(f"labelled embeddings have {labelled.shape[1]} features, the pool's "
                                f"{pool.shape[1]}", "score both with the same model")
        dist = _min_sq_distances(pool, labelled)
        picks: list[int] = []
    else:
        first = int(np.random.default_rng(seed).integers(n))
        dist = _min_sq_distances(pool, pool[first : first + 1])
        picks = [first]
    pool_sq = (pool * pool).sum(axis=1)
    dist[picks] = -np.inf
    while len(picks) < k:
        c = int(np.argmax(dist))
        picks.append(c)
        d = pool_sq + pool_sq[c] - 2.0 * (pool @ pool[c])
        dist = np.minimum(dist, np.maximum(d, 0.0))
        # A picked point never comes back, even when duplicates leave every distance at 0.
        dist[picks] = -np.inf
    return picks


def _check_scores(scores: np.ndarray | None, strategy: str) -> np.ndarray:
    if scores is None:
        method = "an uncertainty method" if strategy == "hybrid" else repr(strategy)
        raise MedClassError(f"strategy {strategy!r} needs scores",
                            f"score the pool with {method} first (score_pool(loaded, x, methods=[...]))")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise MedClassError(f"scores must be one number per pool image, got shape {s.shape}",
                            "pass one of the (N,) arrays score_pool() returns")
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):
        raise MedClassError(f"{len(bad)} of {len(s)} scores are NaN or infinite (e.g. pool index {bad[0]})",
                            "scoring failed for those images: re-score them; a failure is never ranked")
    return s


def _top_k(scores: np.ndarray, k: int, seed: int) -> np.ndarray:
    # lexsort: the last key is primary; a seeded random key breaks ties.
    tiebreak = np.random.default_rng(seed).random(len(scores))
    return np.lexsort((tiebreak, -scores))[:k]


def select(
    strategy: str,
    k: int,
    scores: np.ndarray | None = None,
    pool_embeddings: np.ndarray | None = None,
    labelled_embeddings: np.ndarray | None = None,
    seed: int = 0,
    pool_size: int | None = None,
) -> list[int]:
    """The ``k`` pool images to label next.

    Parameters
    ----------
    strategy : str
        One of :data:`STRATEGIES`: ``random`` (seeded permutation), ``entropy`` /
        ``margin`` / ``least-confidence`` / ``bald`` (top-k of ``scores``), ``coreset``
        (:func:`k_center_greedy` on ``pool_embeddings``), ``hybrid`` (the ``4k`` highest
        ``scores``, then k-center among them).
    k : int
        How many to pick; fewer when the pool is smaller.
    scores : np.ndarray, optional
        ``(N,)`` scores of the pool (the matching method for a score strategy; any
        uncertainty for ``hybrid``).
    pool_embeddings : np.ndarray, optional
        ``(N, F)`` pool embeddings (``coreset``, ``hybrid``).
    labelled_embeddings : np.ndarray, optional
        ``(M, F)`` embeddings of the images already labelled (``coreset``, ``hybrid``).
    seed : int
        Seeds ``random``, tie-breaking and the cold-start pick.
    pool_size : int, optional
        The pool's size, for ``random`` when neither ``scores`` nor ``pool_embeddings``
        is given.

    Returns
    -------
    list of int
        Distinct indices into the pool, most wanted first.

    Raises
    ------
    MedClassError
        For an unknown strategy, a missing input, or NaN scores.
    """
    if strategy not in STRATEGIES:
        raise MedClassError(f"unknown active-learning strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    k = int(k)
    if k < 0:
        raise MedClassError(f"cannot select {k} images", "ask for k >= 0")
    sizes = {}
    for name, a in (("scores", scores), ("pool_embeddings", pool_embeddings)):
        if a is not None:
            shape = np.shape(a)
            if not shape:
                raise MedClassError(f"{name} must hold one entry per pool image, got a scalar",
                                    "pass the arrays score_pool() returns")
            sizes[name] = shape[0]
    if pool_size is not None:
        sizes["pool_size"] = int(pool_size)
    if len(set(sizes.values())) > 1:
        raise MedClassError(f"the pool inputs disagree on its size ({sizes})",
                            "pass scores and embeddings of the same images, in the same order")
    if strategy == "random":
        if not sizes:
            raise MedClassError("random selection needs the pool's size",
                                "pass pool_size, scores or pool_embeddings")
        n = next(iter(sizes.values()))
        return [int(i) for i in np.random.default_rng(seed).permutation(n)[:k]]
    if strategy == "coreset":
        if pool_embeddings is None:
            raise MedClassError("strategy 'coreset' needs pool_embeddings",
                                "pass the 'embedding' returned by score_pool() for the pool")
        return k_center_greedy(pool_embeddings, labelled_embeddings, k, seed)
    s = _check_scores(scores, strategy)
    if strategy != "hybrid":
        return [int(i) for i in _top_k(s, k, seed)]
    if pool_embeddings is None:
        raise MedClassError("strategy 'hybrid' needs pool_embeddings as well as scores",
                            "pass the 'embedding' returned by score_pool() for the pool")
    emb = _as_matrix(pool_embeddings, "pool embeddings")
    candidates = _top_k(s, HYBRID_FACTOR * k, seed)
    picked = k_center_greedy(emb[candidates], labelled_embeddings, k, seed)
    return [int(candidates[i]) for i in picked]


__all__ = [
    "SCORE_METHODS",
    "STRATEGIES",
    "bald",
    "embeddings",
    "k_center_greedy",
    "mc_dropout_probabilities",
    "score_pool",
    "select",
    "uncertainty",
]
