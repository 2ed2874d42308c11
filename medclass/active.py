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
k-center among them, so that one batch does not spend its labels on near-duplicates);
``typiclust`` (Hacohen et al. 2022, "Active learning on a budget"): k-means of the pool
into (labelled + k) clusters, then, one pick per cluster with the fewest labelled images
(largest first), the cluster's most typical image, i.e. of highest density (inverse mean
distance to its nearest neighbours). With nothing labelled yet, and on embeddings from a
pretrained encoder (``medclass pretrain``, ImageNet), it picks typical and diverse first
images where uncertainty has no model to ask.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

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
#: Every selection strategy and what it picks: the one table the CLI, the MONAI Label app and
#: the Slicer module read (the Slicer client keeps a copy only for when it runs without medclass).
STRATEGY_DESCRIPTIONS = {
    "random": "a random unlabelled image",
    "entropy": "the unlabelled image whose predicted probabilities have the highest entropy",
    "margin": "the unlabelled image with the smallest margin between its two most likely classes",
    "least-confidence": "the unlabelled image whose most likely class is least probable",
    "bald": "the image the model's Monte-Carlo dropout samples disagree on most (BALD)",
    "coreset": "the image farthest from every labelled one in the model's embedding space (diversity)",
    "hybrid": "among the most uncertain images, the one farthest from the labelled ones",
    "typiclust": "the most typical image of the largest cluster no labelled image covers (cold start)",
}
STRATEGIES = tuple(STRATEGY_DESCRIPTIONS)
# Strategies that need no model, only embeddings: they can pick the very first images.
COLD_START = ("random", "coreset", "typiclust")
# TypiClust: typicality is the inverse mean distance to this many nearest neighbours in the
# cluster; at most this many clusters (Hacohen et al. 2022 use 20 and 500).
TYPICLUST_KNN = 20
TYPICLUST_MAX_CLUSTERS = 500

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

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return loaded.task.probabilities(logits).float().cpu()

    with _modes_restored(model), _seeded(seed, dev):
        model.eval()
        with torch.inference_mode(), autocast(dev):
            head_only: bool | None = None
            for xb, eb in _batches(x, extra, batch_size, dev):
                if head_only is None:
                    head_only = not dropouts or _dropout_ends_features(model, dropouts, xb, eb)
                if head_only:
                    # The deterministic body once, the sampled dropout and the head per sample:
                    # the same distribution (and, seeded, the same draws) as full passes.
                    feats = model.forward_features(xb, **eb)
                    if dropouts:
                        dropouts[0].train()
                        rows = [probabilities(model.head(dropouts[0](feats))) for _ in range(samples)]
                        dropouts[0].eval()
                    else:
                        rows = [probabilities(model.head(nn.functional.dropout(feats, FALLBACK_DROPOUT, True)))
                                for _ in range(samples)]
                else:
                    for m in dropouts:
                        m.train()
                    rows = [probabilities(model(xb, **eb)) for _ in range(samples)]
                    for m in dropouts:
                        m.eval()
                chunks.append(torch.stack(rows))
    if chunks:
        out = torch.cat(chunks, dim=1)
    return out.numpy().astype(np.float64)


def _dropout_ends_features(model: nn.Module, dropouts: list[nn.Module], xb: torch.Tensor, eb: dict) -> bool:
    """Whether the model's only sampled dropout is the last step of ``forward_features``
    and ``forward`` is ``head(forward_features)``: checked on a batch, not assumed.

    The zoo's models put their dropout there; when this holds, MC dropout needs one
    pass through the body and ``samples`` passes through the head only.
    """
    if len(dropouts) != 1 or not _has_features_head(model):
        return False
    seen: dict[str, torch.Tensor] = {}
    handle = dropouts[0].register_forward_hook(lambda _m, _i, o: seen.__setitem__("out", o))
    try:
        feats = model.forward_features(xb, **eb)
    finally:
        handle.remove()
    out = seen.get("out")
    if not (isinstance(out, torch.Tensor) and isinstance(feats, torch.Tensor) and out.shape == feats.shape
            and out.data_ptr() == feats.data_ptr()):
        return False
    return bool(torch.allclose(model.head(feats).float(), model(xb, **eb).float(), rtol=1e-3, atol=1e-4))


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
    methods = [methods] if isinstance(methods, str) else list(dict.fromkeys(methods))
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


def _min_sq_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each point to its nearest center (scikit-learn's chunked search)."""
    from sklearn.metrics import pairwise_distances_argmin_min

    if len(centers) == 0:
        return np.full(len(points), np.inf)
    _, dist = pairwise_distances_argmin_min(points, centers, metric="sqeuclidean")
    return np.maximum(dist, 0.0)


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


def typiclust(pool: np.ndarray, labelled: np.ndarray | None, k: int, seed: int = 0,
              knn: int = TYPICLUST_KNN, max_clusters: int = TYPICLUST_MAX_CLUSTERS) -> list[int]:
    """TypiClust selection (Hacohen et al. 2022): typical images of uncovered clusters.

    Parameters
    ----------
    pool : np.ndarray
        ``(N, F)`` embeddings of the unlabelled images.
    labelled : np.ndarray or None
        ``(M, F)`` embeddings of the labelled images (None or empty: a cold start).
    k : int
        Number of picks; fewer when the pool is smaller.
    seed : int
        Seeds k-means; the picks are a deterministic function of the inputs and the seed.
    knn, max_clusters : int
        Neighbours for typicality; the cap on the number of clusters.

    Returns
    -------
    list of int
        Distinct indices into ``pool``, each from another cluster while uncovered ones remain.
    """
    from sklearn.cluster import KMeans

    pool = _as_matrix(pool, "pool embeddings")
    n = len(pool)
    k = min(int(k), n)
    if k <= 0:
        return []
    lab = np.zeros((0, pool.shape[1])) if labelled is None or not np.size(labelled) else \
        _as_matrix(labelled, "labelled embeddings")
    if lab.shape[1] != pool.shape[1]:
        raise MedClassError(f"labelled embeddings have {lab.shape[1]} features, the pool's {pool.shape[1]}",
                            "score both with the same model")
    # Unit length: a pretrained encoder's embedding differs by direction more than by norm.
    both = np.vstack([pool, lab])
    both = both / np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)
    n_clusters = int(min(len(lab) + k, max_clusters, n))
    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(both)
    cl_pool, cl_lab = km.labels_[:n], km.labels_[n:]
    size = np.bincount(km.labels_, minlength=n_clusters)
    covered = np.bincount(cl_lab, minlength=n_clusters).astype(float)
    members = {c: np.flatnonzero(cl_pool == c) for c in range(n_clusters)}
    taken = np.zeros(n, bool)
    picks: list[int] = []
    x = both[:n]
    while len(picks) < k:
        avail = np.array([c for c in range(n_clusters) if (~taken[members[c]]).any()])
        # Fewest labelled first, then the largest cluster; the cluster index breaks ties.
        c = int(avail[np.lexsort((avail, -size[avail], covered[avail]))[0]])
        idx = members[c][~taken[members[c]]]
        ref = x[members[c]]
        d = np.sqrt(np.maximum(_pairwise_sq(x[idx], ref), 0.0))
        kk = min(knn, len(ref) - 1)
        if kk >= 1:
            d.sort(axis=1)
            typicality = 1.0 / (d[:, 1:kk + 1].mean(axis=1) + 1e-12)  # column 0: the point itself
        else:
            typicality = np.ones(len(idx))
        best = int(idx[np.lexsort((idx, -typicality))[0]])
        picks.append(best)
        taken[best] = True
        covered[c] += 1
    return picks


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)


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
        ``scores``, then k-center among them), ``typiclust`` (:func:`typiclust` on
        ``pool_embeddings``: needs no scores, the cold-start choice).
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
    if strategy == "typiclust":
        if pool_embeddings is None:
            raise MedClassError("strategy 'typiclust' needs pool_embeddings",
                                "pass embeddings of the pool from a pretrained encoder or the served model")
        return typiclust(pool_embeddings, labelled_embeddings, k, seed)
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


# --------------------------------------------------------------------------- simulation


@dataclass
class SimulationConfig:
    """Settings of an active-learning simulation (``medclass al-sim``); flags map one to one.

    The pool is the training split of ``data`` (split with ``split_seed``), the held-out
    set its test split; both are preprocessed once at ``image_size``. Each seed starts
    every strategy from the same stratified set of ``initial`` labelled images; each
    round labels ``per_round`` more, chosen by the strategy, retrains from scratch and
    records the held-out AUC, until ``budget`` labels are used. The full-data AUC (the
    whole pool labelled) is measured per seed with the same model and recipe.
    """

    data: str = "br35h"
    model: str = "cbam-resnet18"
    model_args: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    image_size: int = 32
    initial: int = 40
    per_round: int = 80
    budget: int = 520
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = ("random", "entropy", "margin", "bald", "coreset", "hybrid")
    hybrid_score: str = "entropy"
    epochs: int = 15
    min_steps: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    mc_samples: int = 10
    split_seed: int = 0
    target: float = 0.95
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; 1 beats 2 on a CPU others are using too
    # An encoder (medclass pretrain), model.pt or named initialisation: simulate on its frozen
    # embeddings with a logistic-regression head per round (simulate_embeddings).
    init: str | None = None
    probe_c: float = 1.0  # inverse L2 strength of that head

    def check(self) -> None:
        """Raise :class:`MedClassError` for settings that cannot run."""
        unknown = [s for s in self.strategies if not _known_strategy(s, cold_start_combos=self.init is not None)]
        if unknown:
            extra = "; with --init also COLD+SCORE, e.g. typiclust+margin" if self.init else ""
            raise MedClassError(f"unknown strategy {', '.join(map(repr, unknown))}",
                                f"use some of {', '.join(STRATEGIES)}{extra}")
        if self.hybrid_score not in SCORE_METHODS:
            raise MedClassError(f"unknown hybrid score {self.hybrid_score!r}", f"use one of {', '.join(SCORE_METHODS)}")
        if not (0 < self.initial < self.budget) or self.per_round <= 0:
            raise MedClassError(f"initial {self.initial}, per round {self.per_round}, budget {self.budget} do not "
                                "make rounds", "use 0 < initial < budget and per_round > 0")
        if not 0 < self.target <= 1:
            raise MedClassError(f"target {self.target} is not a fraction of the full-data AUC", "use e.g. 0.95")


def _known_strategy(name: str, cold_start_combos: bool) -> bool:
    if name in STRATEGIES:
        return True
    first, plus, then = name.partition("+")
    return cold_start_combos and bool(plus) and first in COLD_START and then in STRATEGIES


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` indices whose class proportions follow ``labels``' (at least one per class)."""
    labels = np.asarray(labels)
    key = labels.argmax(axis=1) if labels.ndim == 2 else labels
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(key, return_counts=True)
    want = np.maximum(1, np.round(n * counts / counts.sum()).astype(int))
    while want.sum() > n:  # rounding up may overshoot by a few
        want[np.argmax(want)] -= 1
    picks: list[int] = []
    for c, w in zip(classes, want):
        idx = np.flatnonzero(key == c)
        picks += rng.permutation(idx)[:w].tolist()
    return sorted(int(i) for i in picks)


def fit_labelled(cfg: SimulationConfig, task, x: torch.Tensor, y: torch.Tensor, seed: int,
                 device: torch.device) -> nn.Module:
    """Train ``cfg.model`` from scratch on ``(x, y)`` with a fixed number of steps.

    The recipe and the step of :func:`medclass.training.train`
    (:func:`~medclass.training.optimiser`, :func:`~medclass.training.train_step`:
    AdamW, one-cycle schedule, class-weighted loss, augmentation), without a
    validation split: an annotation team starting out has none to spare, and a
    simulation's model must not be selected on held-out images. Small labelled sets get
    ``min_steps`` steps rather than ``epochs`` passes, which would be a handful of steps.
    """
    from medclass.models import create_model
    from medclass.training import optimiser, train_step

    torch.manual_seed(seed)
    model = create_model(cfg.model, spatial_dims=x.dim() - 2, in_channels=int(x.shape[1]),
                         num_outputs=task.num_outputs, image_size=cfg.image_size, **cfg.model_args)
    if not isinstance(model, nn.Module):
        model.fit(x.numpy(), y.numpy())
        return model
    model.to(device)
    channels_last = x.dim() == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = task.loss(task.class_weights(y.numpy()).to(device)).to(device)
    n = len(y)
    steps = max(cfg.min_steps, math.ceil(cfg.epochs * n / cfg.batch_size))
    opt, sched = optimiser(model, cfg.lr, cfg.weight_decay, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                continue
            train_step(model, x[idx], y[idx], criterion, opt, sched, device, generator=gen,
                       channels_last=channels_last)
            step += 1
            if step >= steps:
                break
    model.eval()
    return model


def labels_to_reach(curve: list[dict[str, float]], target_auc: float) -> int | None:
    """Labels used at the first round whose held-out AUC reaches ``target_auc`` (None: never)."""
    return next((int(p["labels"]) for p in curve if p["auc"] >= target_auc), None)


def simulate(cfg: SimulationConfig, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the active-learning simulation described by ``cfg``.

    Returns
    -------
    dict
        JSON-serialisable: ``config``, ``pool``/``test`` sizes, ``full`` (full-data AUC
        per seed), ``curves`` (``{strategy: {seed: [{labels, auc, ...}]}}``), ``summary``
        (labels each strategy needs to reach ``target`` x the full-data AUC, per seed and
        mean, fraction of the pool, ratio to random) and ``wall_seconds``.
    """
    from dataclasses import asdict

    from medclass.checkpoint import resolve_device
    from medclass.data import load_dataset, materialize, split_samples
    from medclass.inference import forward_probabilities
    from medclass.metrics import compute_metrics
    from medclass.training import TrainConfig

    cfg.check()
    if cfg.init:
        return simulate_with_init(cfg, on_round)
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.data)
    task = ds.task
    splits = split_samples(ds, cfg.split_seed)
    spec = TrainConfig(data=cfg.data, image_size=cfg.image_size).preprocess_spec()
    pool = materialize(ds, splits["train"], spec)
    test = materialize(ds, splits["test"], spec)
    n_pool = len(pool)
    if cfg.budget > n_pool:
        raise MedClassError(f"a budget of {cfg.budget} labels is more than the pool's {n_pool} images",
                            f"use --budget <= {n_pool}")
    y_test = test.y.numpy()

    def auc_of(model: Any) -> float:
        probs = forward_probabilities(LoadedModel(model, {}, task, device), test.x)
        auc = compute_metrics(task.type, y_test, probs, task.classes)["auc"]
        if auc is None:
            raise MedClassError("the held-out split has a single class: no AUC", "use a larger dataset")
        return float(auc)

    trained: dict[tuple[int, ...], tuple[Any, float, float]] = {}

    def train_on(idx: list[int], seed: int) -> tuple[Any, float, float]:
        # Two strategies that picked the same images get the same model: training is
        # seeded by (seed, label count), so it would be retrained identically. On a binary
        # task entropy, margin and least confidence all rank by |p - 0.5|, and this keeps
        # them from costing three times as much.
        key = (seed, *sorted(idx))
        if key not in trained:
            t0 = time.perf_counter()
            sel = torch.as_tensor(idx)
            model = fit_labelled(cfg, task, pool.x[sel], pool.y[sel], seed, device)
            trained[key] = (model, auc_of(model), time.perf_counter() - t0)
        return trained[key]

    def report(rec: dict[str, Any]) -> None:
        log.info("al-sim %s", " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in rec.items()))
        if on_round:
            on_round(rec)

    full: dict[str, float] = {}
    curves: dict[str, dict[str, list[dict[str, float]]]] = {s: {} for s in cfg.strategies}
    for seed in cfg.seeds:
        _, full_auc, secs = train_on(list(range(n_pool)), _train_seed(seed, n_pool))
        full[str(seed)] = full_auc
        report({"seed": seed, "strategy": "full-data", "labels": n_pool, "auc": full_auc, "train_s": secs})
        initial = stratified_subset(pool.y.numpy(), cfg.initial, seed)
        # Every strategy of a seed starts from the same labelled set and first model, and
        # trains with the same seed at the same label count (common random numbers).
        model0, auc0, secs0 = train_on(initial, _train_seed(seed, len(initial)))
        for strategy in cfg.strategies:
            labelled, model, auc = list(initial), model0, auc0
            curve = [{"labels": len(labelled), "auc": auc, "train_s": secs0, "select_s": 0.0}]
            report({"seed": seed, "strategy": strategy, **curve[-1]})
            rnd = 0
            while len(labelled) < cfg.budget:
                rnd += 1
                t0 = time.perf_counter()
                picks = _choose(cfg, strategy, model, task, device, pool, labelled,
                                min(cfg.per_round, cfg.budget - len(labelled)), seed * 1000 + rnd)
                select_s = time.perf_counter() - t0
                if set(picks) & set(labelled) or len(set(picks)) != len(picks):
                    raise RuntimeError(f"{strategy} picked an image twice")  # a bug, not a user error
                labelled += picks
                model, auc, secs = train_on(labelled, _train_seed(seed, len(labelled)))
                curve.append({"labels": len(labelled), "auc": auc, "train_s": secs, "select_s": select_s})
                report({"seed": seed, "strategy": strategy, **curve[-1]})
            curves[strategy][str(seed)] = curve
        trained.clear()
    result = {
        "config": {**asdict(cfg), "seeds": list(cfg.seeds), "strategies": list(cfg.strategies)},
        "task": task.as_dict(), "dataset": ds.name, "pool": n_pool, "test": len(test),
        "device": str(device), "full": full, "curves": curves,
        "retrain": "from scratch every round",
    }
    result["summary"] = summarize(result)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def _train_seed(seed: int, n_labels: int) -> int:
    return seed * 100_003 + n_labels


def _choose(cfg: SimulationConfig, strategy: str, model: Any, task, device: torch.device, pool, labelled: list[int],
            k: int, seed: int) -> list[int]:
    """Pool indices (not yet labelled) that ``strategy`` labels next."""
    taken = set(labelled)
    unlabelled = [i for i in range(len(pool)) if i not in taken]
    if strategy == "random":
        picks = select("random", k, pool_size=len(unlabelled), seed=seed)
        return [unlabelled[i] for i in picks]
    loaded = LoadedModel(model, {"model": {"name": cfg.model}}, task, device)
    x_unl = pool.x[torch.as_tensor(unlabelled)]
    method = cfg.hybrid_score if strategy == "hybrid" else strategy
    methods = [method] if method in SCORE_METHODS else []
    scores = score_pool(loaded, x_unl, methods=methods, mc_samples=cfg.mc_samples, seed=seed)
    lab_emb = embeddings(loaded, pool.x[torch.as_tensor(labelled)]) if strategy in ("coreset", "hybrid", "typiclust") else None
    picks = select(strategy, k, scores=scores.get(method), pool_embeddings=scores["embedding"],
                   labelled_embeddings=lab_emb, seed=seed)
    return [unlabelled[i] for i in picks]


# --------------------------------------------------------------------------- frozen embeddings


def probe_fit(x: np.ndarray, y: np.ndarray, c: float = 1.0, seed: int = 0):
    """A logistic-regression head on (standardised) embeddings: the per-round model of
    :func:`simulate_embeddings` and a fast retrain for an annotation app."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed).fit(x, y)


def probe_probabilities(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """``(N, K)`` probabilities of a :func:`probe_fit` head; a constant when one class was seen."""
    if model is None:
        return np.full((len(x), n_classes), 1.0 / n_classes)
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def probe_auc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              c: float = 1.0) -> float:
    """Held-out AUC of a logistic-regression probe (standardised on the training embeddings)."""
    from sklearn.metrics import roc_auc_score

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    m = probe_fit((x_train - mu) / sd, y_train, c)
    p = m.predict_proba((x_test - mu) / sd)
    return float(roc_auc_score(y_test, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y_test, p, multi_class="ovr"))


def simulate_embeddings(cfg: SimulationConfig, pool_emb: np.ndarray, pool_y: np.ndarray, test_emb: np.ndarray,
                        test_y: np.ndarray, task=None,
                        on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Active learning on frozen embeddings, a logistic-regression head retrained per round.

    The cheap path: embeddings are computed once (by a pretrained encoder), so a round
    costs a fit of a linear head. Strategies are those of :func:`select`, plus
    ``COLD+SCORE`` (e.g. ``typiclust+margin``): the first ``initial`` images by a
    cold-start strategy, the rounds after by a score. A plain strategy picks the initial
    images too (``random``: a seeded random set, not a stratified one, since a real
    annotator has no labels to stratify by; a score strategy starts from random ones).

    Returns
    -------
    dict
        As :func:`simulate`: ``config``, ``full``, ``curves``, ``summary``, ``pool``, ``test``.
    """
    from medclass.metrics import compute_metrics
    from medclass.tasks import Task

    t_start = time.perf_counter()
    pool_y, test_y = np.asarray(pool_y), np.asarray(test_y)
    if task is None:
        task = Task("binary" if len(np.unique(pool_y)) == 2 else "multiclass",
                    [str(c) for c in sorted(np.unique(pool_y))])
    if task.type not in ("binary", "multiclass"):
        raise MedClassError(f"simulation on embeddings supports binary and multi-class tasks, not {task.type}",
                            "run al-sim without --init")
    k_classes = len(task.classes)
    # Standardised with the pool's statistics: the pool is unlabelled, not held out.
    mu, sd = pool_emb.mean(0), pool_emb.std(0) + 1e-6
    P, T = (pool_emb - mu) / sd, (test_emb - mu) / sd
    n_pool = len(P)
    if cfg.budget > n_pool:
        raise MedClassError(f"a budget of {cfg.budget} labels is more than the pool's {n_pool} images",
                            f"use --budget <= {n_pool}")

    def fit_and_auc(idx: list[int]) -> tuple[Any, float]:
        y = pool_y[idx]
        model = probe_fit(P[idx], y, cfg.probe_c) if len(np.unique(y)) > 1 else None
        probs = probe_probabilities(model, T, k_classes)
        auc = compute_metrics(task.type, test_y, probs, task.classes)["auc"]
        return model, float(auc if auc is not None else 0.5)

    def pick(strategy: str, model: Any, labelled: list[int], k: int, seed: int) -> list[int]:
        taken = set(labelled)
        unl = np.array([i for i in range(n_pool) if i not in taken])
        if strategy == "random":
            return [int(unl[i]) for i in select("random", k, pool_size=len(unl), seed=seed)]
        if strategy in SCORE_METHODS and model is None:  # no model yet: nothing to score with
            return [int(unl[i]) for i in select("random", k, pool_size=len(unl), seed=seed)]
        lab_emb = P[labelled] if labelled else None
        scores = None
        method = cfg.hybrid_score if strategy == "hybrid" else strategy
        if method in SCORE_METHODS and method != "bald":
            scores = uncertainty(probe_probabilities(model, P[unl], k_classes), method, task.type)
        elif method == "bald":
            raise MedClassError("bald needs MC dropout; a linear probe has none", "use margin or entropy with --init")
        picks = select(strategy, k, scores=scores, pool_embeddings=P[unl], labelled_embeddings=lab_emb, seed=seed)
        return [int(unl[i]) for i in picks]

    full: dict[str, float] = {}
    curves: dict[str, dict[str, list[dict[str, float]]]] = {s: {} for s in cfg.strategies}
    _, full_auc = fit_and_auc(list(range(n_pool)))
    for seed in cfg.seeds:
        full[str(seed)] = full_auc  # a convex fit: the same for every seed
        for strategy in cfg.strategies:
            first, plus, then = strategy.partition("+")
            t0 = time.perf_counter()
            labelled = pick(first, None, [], cfg.initial, seed * 1000)
            model, auc = fit_and_auc(labelled)
            curve = [{"labels": len(labelled), "auc": auc, "select_s": time.perf_counter() - t0}]
            rnd = 0
            while len(labelled) < cfg.budget:
                rnd += 1
                t0 = time.perf_counter()
                picks = pick(then if plus else strategy, model, labelled,
                             min(cfg.per_round, cfg.budget - len(labelled)), seed * 1000 + rnd)
                select_s = time.perf_counter() - t0
                if set(picks) & set(labelled) or len(set(picks)) != len(picks):
                    raise RuntimeError(f"{strategy} picked an image twice")  # a bug, not a user error
                labelled += picks
                model, auc = fit_and_auc(labelled)
                curve.append({"labels": len(labelled), "auc": auc, "select_s": select_s})
            curves[strategy][str(seed)] = curve
            rec = {"seed": seed, "strategy": strategy, **curve[-1]}
            log.info("al-sim %s", rec)
            if on_round:
                on_round(rec)
    from dataclasses import asdict

    result = {
        "config": {**asdict(cfg), "seeds": list(cfg.seeds), "strategies": list(cfg.strategies)},
        "task": task.as_dict(), "pool": n_pool, "test": len(T), "full": full, "curves": curves,
        "retrain": "logistic regression on frozen embeddings every round",
    }
    result["summary"] = summarize(result)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def encode(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """Pooled embeddings ``(N, F)`` of a torch model in eval mode (no head)."""
    from medclass.checkpoint import LoadedModel as _LM
    from medclass.tasks import Task

    dev = next(model.parameters()).device
    return embeddings(_LM(model, {}, Task("binary", ["-", "+"]), dev), x, batch_size=batch_size)


def simulate_with_init(cfg: SimulationConfig, on_round: Callable[[dict[str, Any]], None] | None = None
                       ) -> dict[str, Any]:
    """``medclass al-sim --init``: embed pool and held-out set with the initialised
    encoder, then :func:`simulate_embeddings`.

    The model and image size come from the init's card (an encoder or model.pt), else
    from ``cfg.model`` / ``cfg.image_size`` (a state dict or ``imagenet``).
    """
    from pathlib import Path

    from medclass.data import load_dataset, materialize, split_samples
    from medclass.models import create_model
    from medclass.training import TrainConfig
    from medclass.transfer import load_init

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_name, args, size = cfg.model, dict(cfg.model_args), cfg.image_size
    p = Path(str(cfg.init))
    if p.is_file():
        import zipfile

        if zipfile.is_zipfile(p):
            from medclass.checkpoint import read_card

            card = read_card(p)
            model_name = card["model"]["name"]
            margs = dict(card["model"]["args"])
            size = int(margs.pop("image_size", size))
            args = {k: v for k, v in margs.items() if k not in ("spatial_dims", "in_channels", "num_outputs")}
    ds = load_dataset(cfg.data)
    splits = split_samples(ds, cfg.split_seed)
    spec = TrainConfig(data=cfg.data, image_size=size).preprocess_spec()
    pool = materialize(ds, splits["train"], spec)
    test = materialize(ds, splits["test"], spec)
    torch.manual_seed(0)
    model = create_model(model_name, spatial_dims=2, in_channels=int(pool.x.shape[1]),
                         num_outputs=ds.task.num_outputs, image_size=size, **args)
    report = load_init(model, cfg.init)
    t0 = time.perf_counter()
    pe, te = encode(model, pool.x), encode(model, test.x)
    embed_s = time.perf_counter() - t0
    result = simulate_embeddings(cfg, pe, pool.y.numpy(), te, test.y.numpy(), ds.task, on_round)
    result.update(dataset=ds.name, init=report.as_card(), model=model_name, image_size=size,
                  embed_seconds=round(embed_s, 1), wall_seconds=round(time.perf_counter() - t_start, 1))
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Labels each strategy needs to reach ``target`` x the mean full-data AUC.

    Per seed: the labels at the first round at or above the target (None: not within the
    budget). ``mean`` averages them when every seed reached it (else None); ``reached``
    counts the seeds that did. The fraction is of the pool; the ratio is to random's mean.
    ``mean_curve_labels`` is where the seeds' mean curve reaches the target and
    ``rounds_auc_mean`` the mean AUC over the rounds after the shared first one.
    """
    cfg = result["config"]
    full_mean = float(np.mean(list(result["full"].values())))
    target_auc = cfg["target"] * full_mean
    out: dict[str, Any] = {"full_auc_mean": full_mean, "target_auc": target_auc, "strategies": {}}
    for strategy, per_seed in result["curves"].items():
        reach = {seed: labels_to_reach(curve, target_auc) for seed, curve in per_seed.items()}
        hit = [v for v in reach.values() if v is not None]
        mean_curve = _mean_curve(list(per_seed.values()))
        out["strategies"][strategy] = {
            "per_seed": reach,
            "reached": len(hit),
            "seeds": len(reach),
            "mean": float(np.mean(hit)) if len(hit) == len(reach) and hit else None,
            # Less sensitive to one lucky round than a first crossing per seed: where the
            # seeds' mean curve crosses, and the mean AUC over the rounds after the shared
            # start (the area under the learning curve, per round).
            "mean_curve_labels": labels_to_reach(mean_curve, target_auc),
            "rounds_auc_mean": float(np.mean([p["auc"] for p in mean_curve[1:]])) if len(mean_curve) > 1 else None,
            "final_auc_mean": mean_curve[-1]["auc"] if mean_curve else None,
        }
    random_mean = out["strategies"].get("random", {}).get("mean")
    for s in out["strategies"].values():
        s["pool_fraction"] = None if s["mean"] is None else s["mean"] / result["pool"]
        s["ratio_to_random"] = None if s["mean"] is None or not random_mean else s["mean"] / random_mean
    return out


def _mean_curve(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [{"labels": curves[0][i]["labels"], "auc": float(np.mean([c[i]["auc"] for c in curves]))}
            for i in range(n)]


__all__ = [
    "SCORE_METHODS",
    "STRATEGIES",
    "SimulationConfig",
    "bald",
    "embeddings",
    "k_center_greedy",
    "mc_dropout_probabilities",
    "score_pool",
    "select",
    "simulate",
    "simulate_embeddings",
    "simulate_with_init",
    "typiclust",
    "uncertainty",
]
