"""Evaluation metrics, bootstrap confidence intervals and evaluation plots.

Every metric is computed from per-sample *weights*: the point estimate uses a weight of
one per sample and a bootstrap resample uses how often each sample was drawn. One code
path therefore serves both, so an interval can never disagree with its point estimate
about what a metric means, and 1000 resamples cost a few matrix products instead of
1000 calls into scikit-learn.

Undefined values (the AUC of a class with only one value in ``y_true``, the recall of a
class with no support) are ``None`` in the returned dicts and are left out of macro
averages and of bootstrap intervals. matplotlib and scikit-learn are imported lazily so
that ``import medclass.metrics`` stays cheap for the DICOM node and the Slicer module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from medclass.errors import MedClassError
from medclass.tasks import TASK_TYPES

N_ECE_BINS = 15
DEFAULT_CI_KEYS = ("auc", "accuracy", "sensitivity", "specificity", "f1")
# Bound the (resamples x samples) work arrays to roughly this many elements per chunk.
_CHUNK_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------- helpers
def _check(
    task_type: str, y_true: np.ndarray, probs: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the inputs and return ``(y, probs)`` as int / float64 arrays."""
    if task_type not in TASK_TYPES:
        raise MedClassError(f"unknown task type {task_type!r}", f"use one of {', '.join(TASK_TYPES)}")
    p = np.asarray(probs, dtype=np.float64)
    if task_type == "binary" and p.ndim == 1:
        # A column of positive-class probabilities is common enough to accept.
        p = np.column_stack([1.0 - p, p])
    y = np.asarray(y_true)
    k = len(class_names)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != k:
        raise MedClassError(
            f"probabilities have shape {p.shape}, expected (N, {k}) for {k} class names",
            "pass one probability column per class name",
        )
    if task_type == "binary" and k != 2:
        raise MedClassError(f"a binary task needs 2 class names, got {k}", "use task type 'multiclass'")
    if not np.all(np.isfinite(p)):
        raise MedClassError("probabilities contain NaN or infinity", "check the model outputs")
    want = p.shape if task_type == "multilabel" else p.shape[:1]
    if y.shape != want:
        raise MedClassError(f"labels have shape {y.shape}, expected {want}", "check the label encoding")
    hi = 1 if task_type == "multilabel" else k - 1
    if y.size and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() > hi):
        raise MedClassError(f"labels must be integers in [0, {hi}]", "check the label encoding")
    return y.astype(np.int64), p


def _num(x: Any) -> float | None:
    """A JSON-safe float: ``None`` for NaN/inf so ``json.dumps`` never writes ``NaN``."""
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` with NaN (undefined) where ``b`` is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _nanmean(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over the defined entries, NaN where none is defined (no RuntimeWarning)."""
    ok = np.isfinite(a)
    return _ratio(np.where(ok, a, 0.0).sum(axis), ok.sum(axis).astype(np.float64))


def _weighted_auc(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC for every row of weights ``w`` (B, N), Mann-Whitney style.

    AUC = P(score_pos > score_neg) + 0.5 P(tie), summed over pairs with the product of
    their weights. Sorting once and taking cumulative negative weight makes it O(B N);
    ties get half credit through the cumulative weight at each tie group's boundaries.
    """
    n = score.shape[0]
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    new_group = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], n]
    gid = np.cumsum(new_group) - 1
    start_k, end_k = starts[gid], ends[gid]
    ws = w[:, order]
    is_pos = pos[order].astype(bool)
    wpos = ws * is_pos
    wneg = ws * ~is_pos
    cneg = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(wneg, axis=1)], axis=1)
    below = cneg[:, start_k]
    tied = cneg[:, end_k] - below
    num = (wpos * (below + 0.5 * tied)).sum(axis=1)
    return _ratio(num, wpos.sum(axis=1) * wneg.sum(axis=1))


def _counts_stats(truth: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest sensitivity, specificity, F1, accuracy and support for weights ``w``."""
    t, p = truth.astype(bool), pred.astype(bool)
    tp = w @ (t & p)
    fp = w @ (~t & p)
    fn = w @ (t & ~p)
    tn = w @ (~t & ~p)
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        # 2TP / (2TP + FP + FN) is F1 without the 0/0 of precision when nothing is predicted.
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "support": tp + fn,
    }


def _calibration(probs: np.ndarray, y: np.ndarray, task_type: str, threshold: float):
    """Per-item ``(confidence, correct)`` that the ECE and the reliability plot bin."""
    if task_type in ("binary", "multilabel"):
        # Each positive-class / label probability is its own binary decision.
        p1 = probs[:, 1] if task_type == "binary" else probs.ravel()
        t = y if task_type == "binary" else y.ravel()
        pred = p1 >= threshold
        return np.where(pred, p1, 1.0 - p1), (pred == t.astype(bool)).astype(np.float64)
    return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)


def _ece_bins(conf: np.ndarray) -> np.ndarray:
    """Bin index of each confidence in ``N_ECE_BINS`` equal-width bins on [0, 1]."""
    return np.clip(np.ceil(conf * N_ECE_BINS).astype(np.int64) - 1, 0, N_ECE_BINS - 1)


def _weighted_ece(conf: np.ndarray, correct: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ECE = sum over bins of |sum correct - sum confidence| / total weight."""
    onehot = np.eye(N_ECE_BINS)[_ece_bins(conf)]
    gap = w @ (onehot * (correct - conf)[:, None])
    return _ratio(np.abs(gap).sum(axis=1), w.sum(axis=1))


def _qwk(y: np.ndarray, pred: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """Quadratic weighted kappa (as sklearn's ``cohen_kappa_score``) for each weight row."""
    conf = (w @ np.eye(k * k)[y * k + pred]).reshape(-1, k, k)
    total = conf.sum(axis=(1, 2))
    expected = (
        np.einsum("bi,bj->bij", conf.sum(axis=2), conf.sum(axis=1))
        / np.where(total > 0, total, 1)[:, None, None]
    )
    grid = np.arange(k)
    penalty = (grid[:, None] - grid[None, :]) ** 2
    return 1.0 - _ratio((penalty * conf).sum(axis=(1, 2)), (penalty * expected).sum(axis=(1, 2)))


def _predict(task_type: str, probs: np.ndarray, threshold: float) -> np.ndarray:
    """Hard predictions: thresholded for binary/multilabel, argmax otherwise."""
    if task_type == "binary":
        return (probs[:, 1] >= threshold).astype(np.int64)
    if task_type == "multilabel":
        return (probs >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def _stats(task_type: str, y: np.ndarray, probs: np.ndarray, w: np.ndarray, threshold: float) -> dict:
    """Every metric for every row of sample weights ``w`` (B, N), as arrays of shape (B,).

    Per-class values come back as ``per_<metric>`` arrays of shape (B, K).
    """
    pred = _predict(task_type, probs, threshold)
    # Multilabel calibration items are (case, label) pairs in row-major order: each case's
    # weight repeats once per label.
    w_items = np.repeat(w, probs.shape[1], axis=1) if task_type == "multilabel" else w
    out: dict[str, np.ndarray] = {
        "ece": _weighted_ece(*_calibration(probs, y, task_type, threshold), w_items)
    }
    if task_type == "binary":
        out.update(_counts_stats(y == 1, pred == 1, w))
        out["auc"] = _weighted_auc(y == 1, probs[:, 1], w)
        return out
    k = probs.shape[1]
    per = []
    for c in range(k):
        truth, hard = (y[:, c], pred[:, c]) if task_type == "multilabel" else (y == c, pred == c)
        st = _counts_stats(truth, hard, w)
        st["auc"] = _weighted_auc(truth, probs[:, c], w)
        per.append(st)
    for key in ("auc", "sensitivity", "specificity", "f1", "accuracy", "support"):
        out["per_" + key] = np.stack([st[key] for st in per], axis=1)
    for key in ("auc", "sensitivity", "specificity", "f1"):
        out[key] = _nanmean(out["per_" + key])
    total = w.sum(axis=1)
    if task_type == "multilabel":
        out["accuracy"] = _nanmean(out["per_accuracy"])
        out["subset_accuracy"] = _ratio(w @ np.all(pred == y, axis=1), total)
    else:
        out["accuracy"] = _ratio(w @ (pred == y), total)
    if task_type == "ordinal":
        out["qwk"] = _qwk(y, pred, k, w)
        out["mae"] = _ratio(w @ np.abs(pred - y), total)
    return out


# --------------------------------------------------------------------------- metrics
def compute_metrics(
    task_type: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    threshold: float = 0.5,
) -> dict:
    """Compute discrimination, classification and calibration metrics.

    Parameters
    ----------
    task_type : str
        ``"binary"``, ``"multiclass"``, ``"multilabel"`` or ``"ordinal"``.
    y_true : np.ndarray
        Integer labels (N,), or multi-hot labels (N, K) for ``"multilabel"``.
    probs : np.ndarray
        Probabilities (N, K); for ``"binary"`` K = 2 and column 1 is the positive class.
    class_names : list of str
        One name per probability column.
    threshold : float, optional
        Decision threshold on the positive-class / per-label probability (binary and
        multilabel only).

    Returns
    -------
    dict
        JSON-serialisable. Top level: ``auc, accuracy, sensitivity, specificity, f1, ece,
        n`` (binary: of the positive class; otherwise macro averages over the classes or
        labels whose value is defined). Multiclass/ordinal add ``per_class`` and
        ``confusion_matrix`` (rows true, columns predicted); ordinal adds ``qwk`` and
        ``mae``; multilabel adds ``per_label`` (each with a 2x2 ``confusion_matrix``
        ``[[TN, FP], [FN, TP]]``) and ``subset_accuracy``. Undefined values are ``None``.

    Raises
    ------
    MedClassError
        On an unknown task type or inconsistent shapes / labels.
    """
    y, p = _check(task_type, y_true, probs, class_names)
    n = p.shape[0]
    st = {key: val[0] for key, val in _stats(task_type, y, p, np.ones((1, n)), threshold).items()}
    out: dict[str, Any] = {"task_type": task_type, "n": int(n)}
    for key in (
        "auc",
        "accuracy",
        "sensitivity",
        "specificity",
        "f1",
        "ece",
        "subset_accuracy",
        "qwk",
        "mae",
    ):
        if key in st:
            out[key] = _num(st[key])
    if task_type in ("binary", "multilabel"):
        out["threshold"] = float(threshold)
    pred = _predict(task_type, p, threshold)
    if task_type == "multilabel":
        out["per_label"] = {
            name: {
                **{
                    key: _num(st["per_" + key][c])
                    for key in ("auc", "sensitivity", "specificity", "f1", "accuracy")
                },
                "support": int(st["per_support"][c]),
                "confusion_matrix": np.bincount(2 * y[:, c] + pred[:, c], minlength=4).reshape(2, 2).tolist(),
            }
            for c, name in enumerate(class_names)
        }
        return out
    k = len(class_names)
    out["confusion_matrix"] = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).tolist()
    if task_type != "binary":
        out["per_class"] = {
            name: {
                **{key: _num(st["per_" + key][c]) for key in ("auc", "sensitivity", "specificity", "f1")},
                "support": int(st["per_support"][c]),
            }
            for c, name in enumerate(class_names)
        }
    return out


def bootstrap_ci(
    task_type: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    keys: tuple[str, ...] = DEFAULT_CI_KEYS,
    threshold: float = 0.5,
) -> dict[str, list[float | None]]:
    """95% percentile bootstrap confidence intervals of the metrics.

    Parameters
    ----------
    task_type, y_true, probs, class_names, threshold
        As for :func:`compute_metrics`.
    n_boot : int, optional
        Number of resamples (with replacement, of the N cases).
    seed : int, optional
        Seed of the resampling; the same seed gives the same intervals.
    keys : tuple of str, optional
        Top-level metrics to bootstrap; any scalar of :func:`compute_metrics` except ``n``.

    Returns
    -------
    dict
        ``{key: [low, high]}``. Resamples where a metric is undefined (e.g. no positive
        case drawn) are skipped for that metric; ``[None, None]`` if none is defined.

    Raises
    ------
    MedClassError
        On bad inputs or a key the task type does not have.
    """
    y, p = _check(task_type, y_true, probs, class_names)
    n = p.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // n))
    samples: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n))
        # How often each case was drawn: weights turn every metric into matrix products.
        w = np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n)
        st = _stats(task_type, y, p, w.astype(np.float64), threshold)
        for key in keys:
            if key not in st or key.startswith("per_") or key == "support":
                raise MedClassError(
                    f"no bootstrap interval for {key!r} on a {task_type} task",
                    f"choose from {', '.join(sorted(k for k in st if not k.startswith('per_') and k != 'support'))}",
                )
            samples[key].append(st[key])
        done += b
    out: dict[str, list[float | None]] = {}
    for key, parts in samples.items():
        vals = np.concatenate(parts)
        vals = vals[np.isfinite(vals)]
        out[key] = [_num(v) for v in np.percentile(vals, [2.5, 97.5])] if vals.size else [None, None]
    return out


# --------------------------------------------------------------------------- plots
def _figure(width: float = 5.0, height: float = 5.0):
    """A figure on matplotlib's Agg canvas.

    Building the figure on the Agg canvas directly (not through pyplot) never touches
    the process-wide backend, which matters inside 3D Slicer's Qt application and in the
    DICOM node's worker threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def roc_curves(
    task_type: str, y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
    threshold: float = 0.5, n_boot: int = 200, seed: int = 0,
) -> list[dict[str, Any]]:
    """What :func:`plot_roc` draws: one ROC curve per class or label (binary: the positive class).

    Parameters
    ----------
    task_type, y_true, probs, class_names, threshold
        As for :func:`compute_metrics`.
    n_boot, seed : int
        Bootstrap resamples of the images for the band (0: no band) and their seed.

    Returns
    -------
    list of dict
        Per curve: ``name``, ``auc`` (``None`` when undefined: then no curve, band or
        point), ``fpr`` and ``tpr`` (the curve), ``band`` (``grid`` of 1 - specificity
        and the 2.5th / 97.5th percentiles ``low`` / ``high`` of the bootstrap curves'
        sensitivity on it; ``None`` without resamples or with fewer than 10 usable ones)
        and ``operating_point`` (``fpr``, ``sensitivity``, ``specificity`` at ``threshold``;
        binary and multi-label tasks only, else ``None``).
    """
    from sklearn.metrics import roc_curve

    y, p = _check(task_type, y_true, probs, class_names)
    cols = [1] if task_type == "binary" else range(p.shape[1])
    grid = np.linspace(0, 1, 101)
    curves = []
    for c in cols:
        truth = (y[:, c] if task_type == "multilabel" else (y == c)).astype(int)
        curve: dict[str, Any] = {"name": class_names[c], "auc": _num(_weighted_auc(truth, p[:, c],
                                                                                   np.ones((1, len(truth))))[0]),
                                 "fpr": None, "tpr": None, "band": None, "operating_point": None}
        curves.append(curve)
        if curve["auc"] is None:
            continue
        curve["fpr"], curve["tpr"], _ = roc_curve(truth, p[:, c])
        band = _roc_band(truth, p[:, c], grid, n_boot, seed)
        if band is not None:
            curve["band"] = {"grid": grid, "low": band[0], "high": band[1]}
        if task_type in ("binary", "multilabel"):
            pos, pred = truth.astype(bool), p[:, c] >= threshold
            sens, spec = float(pred[pos].mean()), float((~pred[~pos]).mean())
            curve["operating_point"] = {"fpr": 1 - spec, "sensitivity": sens, "specificity": spec}
    return curves


def plot_roc(
    task_type: str, y_true: np.ndarray, probs: np.ndarray, class_names: list[str], path: str | Path,
    threshold: float = 0.5, n_boot: int = 200, seed: int = 0,
) -> Path:
    """Plot ROC curves (one per class or label; binary: the positive class) to a PNG.

    Each curve has its 95 % bootstrap band (sensitivity at each 1 - specificity,
    ``n_boot`` resamples of the images) and, for binary and multi-label tasks, a dot
    at the operating point the decision ``threshold`` gives (see :func:`roc_curves`).

    Parameters
    ----------
    task_type, y_true, probs, class_names, threshold
        As for :func:`compute_metrics`.
    path : str or Path
        Output PNG file.
    n_boot, seed : int
        Bootstrap resamples for the band (0: no band) and their seed.

    Returns
    -------
    Path
        The written file. Classes with an undefined AUC are listed without a curve.
    """
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for curve in roc_curves(task_type, y_true, probs, class_names, threshold, n_boot, seed):
        if curve["auc"] is None:
            ax.plot([], [], label=f"{curve['name']} (AUC undefined)")
            continue
        (line,) = ax.plot(curve["fpr"], curve["tpr"], lw=1.5, label=f"{curve['name']} (AUC {curve['auc']:.3f})")
        if curve["band"] is not None:
            b = curve["band"]
            ax.fill_between(b["grid"], b["low"], b["high"], color=line.get_color(), alpha=0.15, lw=0)
        if curve["operating_point"] is not None:
            op = curve["operating_point"]
            ax.plot([op["fpr"]], [op["sensitivity"]], "o", color=line.get_color(), ms=6, mec="black",
                    label=f"threshold {threshold:g}: sens {op['sensitivity']:.2f}, spec {op['specificity']:.2f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    title = "ROC (shaded: 95 % bootstrap band)" if n_boot else "ROC"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _roc_band(truth: np.ndarray, score: np.ndarray, grid: np.ndarray, n_boot: int,
              seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """2.5th and 97.5th percentiles of the bootstrap ROC's sensitivity on ``grid`` (1 - specificity)."""
    from sklearn.metrics import roc_curve

    if n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_boot):
        i = rng.integers(0, len(truth), len(truth))
        if truth[i].min() == truth[i].max():  # a resample with one class has no ROC
            continue
        fpr, tpr, _ = roc_curve(truth[i], score[i])
        curves.append(np.interp(grid, fpr, tpr))
    if len(curves) < 10:
        return None
    return np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0)


def plot_confusion(
    task_type: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    path: str | Path,
    threshold: float = 0.5,
) -> Path:
    """Plot the annotated confusion matrix (multilabel: one 2x2 per label) to a PNG.

    Parameters
    ----------
    task_type, y_true, probs, class_names, threshold
        As for :func:`compute_metrics`.
    path : str or Path
        Output PNG file.

    Returns
    -------
    Path
        The written file.
    """
    m = compute_metrics(task_type, y_true, probs, class_names, threshold)
    if task_type == "multilabel":
        panels = [
            (np.array(v["confusion_matrix"]), ["neg", "pos"], name) for name, v in m["per_label"].items()
        ]
    else:
        panels = [(np.array(m["confusion_matrix"]), list(class_names), "confusion matrix")]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    size = 3.2 if task_type == "multilabel" else max(4.5, 0.6 * len(class_names) + 2.5)
    fig = _figure(size * ncols, size * nrows)
    for i, (cm, names, title) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(cm, cmap="Blues", vmin=0)
        half = cm.max() / 2 if cm.size else 0
        for (r, c), v in np.ndenumerate(cm):
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > half else "black")
        ticks = range(len(names))
        ax.set_xticks(ticks, names, rotation=45, ha="right")
        ax.set_yticks(ticks, names)
        ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def reliability_bins(
    task_type: str, y_true: np.ndarray, probs: np.ndarray, class_names: list[str], threshold: float = 0.5,
) -> dict[str, Any]:
    """What :func:`plot_reliability` draws: the ECE's ``N_ECE_BINS`` confidence bins.

    Parameters
    ----------
    task_type, y_true, probs, class_names, threshold
        As for :func:`compute_metrics` (binary and multi-label: each decision is an item).

    Returns
    -------
    dict
        ``edges`` (``N_ECE_BINS + 1``), ``count`` (items per bin), ``accuracy`` and
        ``confidence`` (their mean per bin, NaN in an empty bin) and ``ece``, the same
        value :func:`compute_metrics` reports.
    """
    y, p = _check(task_type, y_true, probs, class_names)
    conf, correct = _calibration(p, y, task_type, threshold)
    bins = _ece_bins(conf)
    count = np.bincount(bins, minlength=N_ECE_BINS)
    return {
        "edges": np.linspace(0.0, 1.0, N_ECE_BINS + 1),
        "count": count,
        "accuracy": _ratio(np.bincount(bins, weights=correct, minlength=N_ECE_BINS), count.astype(np.float64)),
        "confidence": _ratio(np.bincount(bins, weights=conf, minlength=N_ECE_BINS), count.astype(np.float64)),
        "ece": float(_weighted_ece(conf, correct, np.ones((1, len(conf))))[0]),
    }


def plot_reliability(
    task_type: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    path: str | Path,
    threshold: float = 0.5,
) -> Path:
    """Plot a reliability diagram (accuracy per confidence bin, with its count) and the ECE to a PNG.

    Parameters
    ----------
    task_type, y_true, probs, class_names, threshold
        As for :func:`compute_metrics`.
    path : str or Path
        Output PNG file.

    Returns
    -------
    Path
        The written file (the bins are :func:`reliability_bins`).
    """
    rel = reliability_bins(task_type, y_true, probs, class_names, threshold)
    edges = rel["edges"]
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(centres, np.nan_to_num(rel["accuracy"]), width=width, edgecolor="black", alpha=0.8, label="accuracy")
    # How many predictions each bin holds (at the foot of its bar): a bar of 3 images says little.
    for x, n in zip(centres, rel["count"]):
        if n:
            ax.text(x, 0.02, f"n={n}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(
        xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {rel['ece']:.3f})"
    )
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


# --------------------------------------------------------------------------- report
def evaluation_report(
    task_type: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    out_dir: str | Path,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict:
    """Metrics, bootstrap intervals and the three evaluation plots.

    Parameters
    ----------
    task_type, y_true, probs, class_names, threshold
        As for :func:`compute_metrics`.
    out_dir : str or Path
        Folder for ``roc.png``, ``confusion_matrix.png`` and ``reliability.png``
        (created if missing). ``metrics.json`` is the caller's to write.
    n_boot, seed
        As for :func:`bootstrap_ci`.

    Returns
    -------
    dict
        :func:`compute_metrics`' dict plus ``ci`` (``{key: [low, high]}``) and ``plots``
        (``{"roc"|"confusion_matrix"|"reliability": file name}``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = compute_metrics(task_type, y_true, probs, class_names, threshold)
    report["ci"] = bootstrap_ci(task_type, y_true, probs, class_names, n_boot, seed, threshold=threshold)
    plot_roc(task_type, y_true, probs, class_names, out_dir / "roc.png", threshold, seed=seed)
    plot_confusion(task_type, y_true, probs, class_names, out_dir / "confusion_matrix.png", threshold)
    plot_reliability(task_type, y_true, probs, class_names, out_dir / "reliability.png", threshold)
    report["plots"] = {
        "roc": "roc.png",
        "confusion_matrix": "confusion_matrix.png",
        "reliability": "reliability.png",
    }
    return report


def format_metrics(metrics: dict) -> str:
    """A short human-readable summary of a :func:`compute_metrics` / report dict.

    Parameters
    ----------
    metrics : dict
        As returned by :func:`compute_metrics` or :func:`evaluation_report`.

    Returns
    -------
    str
        One metric per line, with the 95% CI where ``metrics["ci"]`` has one.
    """

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    ci = metrics.get("ci", {})
    head = f"{metrics.get('task_type', 'task')}, n={metrics.get('n', '?')}"
    if metrics.get("threshold") is not None:
        head += f", threshold={metrics['threshold']:g}"
    lines = [head]
    for key, label in (
        ("auc", "AUC"),
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("f1", "F1"),
        ("ece", "ECE"),
        ("qwk", "QWK"),
        ("mae", "MAE"),
        ("subset_accuracy", "subset accuracy"),
    ):
        if key not in metrics:
            continue
        line = f"  {label:<16}{fmt(metrics[key])}"
        if key in ci:
            line += f"  (95% CI {fmt(ci[key][0])}-{fmt(ci[key][1])})"
        lines.append(line)
    cal = metrics.get("calibration")
    if cal:
        # ECE of the model's own probabilities, then of the calibrated ones (medclass.calibration).
        before = cal.get("ece_uncalibrated", cal.get("test_ece_before"))
        after = cal.get("ece_calibrated", cal.get("test_ece_after"))
        t = cal.get("temperature")
        t_txt = f", T={t:.3f}" if isinstance(t, float) else ""
        if before is not None and after is not None:
            lines.append(f"  {'ECE raw':<16}{fmt(before)}  (calibrated: {fmt(after)}, {cal.get('method')}{t_txt})")
        for op in cal.get("operating_points", []):
            lines.append(f"  {op['class']} at {op['metric']} >= {op['target']:g} (threshold {op['threshold']:.4f} from "
                         f"validation): sensitivity {fmt(op.get('sensitivity'))}, "
                         f"specificity {fmt(op.get('specificity'))}")
    return "\n".join(lines)
