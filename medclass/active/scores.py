"""Uncertainty scores of unlabelled images, and the model passes that give them (MC dropout, embeddings)."""

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
from medclass.inference import autocast, calibrated_probabilities
from medclass.tasks import TASK_TYPES

log = logging.getLogger("medclass.active")

SCORE_METHODS = ("entropy", "margin", "least-confidence", "bald")
# Dropout on the embedding for models built without any (see mc_dropout_probabilities).
FALLBACK_DROPOUT = 0.2


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
        return calibrated_probabilities(loaded, logits.float()).float().cpu()

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
                probs.append(calibrated_probabilities(loaded, logits.float()).float().cpu())
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
