"""Calibrated probabilities, operating points and conformal prediction sets.

Fitted once, on the validation split, at the end of training (or later with
``medclass calibrate``) and stored in the model card under ``card["calibration"]``:

``method``, ``temperature``, ``bias``
    Temperature scaling (Guo et al., 2017): logits are divided by ``T`` before the
    task's link. Binary and multiclass: one ``T`` for the softmax. Multilabel: one
    ``T`` per label (each label is its own sigmoid). Ordinal: one ``T`` for every
    cumulative logit, fitted on the NLL of the grade probabilities. ``T`` minimises
    the validation NLL; it never changes the ranking of a class's scores, so the
    AUC is unchanged. For binary and multiclass tasks, bias-corrected temperature
    scaling (``method = "bcts"``: ``z / T + b``, Alexandari et al., 2020) replaces it
    when the validation likelihood gain pays for the extra parameters (AIC): a short
    training often leaves the scores shifted towards one class, which no temperature
    can correct. Classic (scikit-learn) models, and validation splits of fewer than
    ``MIN_EXAMPLES`` images, are not rescaled (``method = "none"``); their operating
    points and sets are still recorded.
``val_ece_before``, ``val_ece_after``, ``test_ece_before``, ``test_ece_after``
    Expected calibration error (:func:`medclass.metrics.compute_metrics`) on the
    validation and held-out splits, before and after.
``roc``
    ``{"val": {class: roc}, "test": {class: roc}}``: the one-vs-rest ROC of every
    class from the calibrated probabilities, each ``{"thresholds", "tpr", "fpr"}``
    with thresholds descending (a result is positive when ``p >= threshold``). An
    operating point ("sensitivity >= 0.95") is chosen on ``val``; ``test`` gives the
    held-out sensitivity and specificity that threshold reaches.
``conformal``
    Split-conformal nonconformity scores of the validation split (the calibration
    set) and of the held-out split, per method: ``lac`` (score ``1 - p_true``; the
    set holds every class with ``p >= 1 - qhat``) and ``aps`` (score: the mass of
    the classes at least as probable as the true one; non-randomised). ``qhat`` at
    any coverage is the ``ceil((n + 1) * coverage) / n`` empirical quantile of the
    validation scores (Angelopoulos & Bates, 2021). Not for multilabel tasks.

The temperature and the conformal scores come from the same validation split: with
one or two fitted parameters the loss of exchangeability is small; the held-out coverage
recorded in the card (and measured in ``bench/bench_calibration.py``) checks it.

Everything is per image. The DICOM node applies thresholds and sets to its study-level
row (the model's aggregation of image rows), which is the image row for a one-image study.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from medclass.errors import MedClassError

#: Coverages whose ``qhat`` the card lists for a reader (any other is computed from the scores).
COVERAGES = (0.8, 0.9, 0.95, 0.99)
CONFORMAL_METHODS = ("lac", "aps")
OPERATING_METRICS = ("sensitivity", "specificity")
MIN_EXAMPLES = 30  # fewest validation examples to fit a temperature on
_DIGITS = 6  # probabilities are reported to 6 decimals everywhere (node, CLI); thresholds too


# --------------------------------------------------------------------------- temperature
def _link(task_type: str, logits: torch.Tensor) -> torch.Tensor:
    from medclass.tasks import ordinal_probabilities

    if task_type in ("binary", "multiclass"):
        return torch.softmax(logits, dim=1)
    if task_type == "multilabel":
        return torch.sigmoid(logits)
    return ordinal_probabilities(logits)


def _nll(task_type: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task_type in ("binary", "multiclass"):
        return torch.nn.functional.cross_entropy(logits, y.long())
    if task_type == "multilabel":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double())
    p = _link(task_type, logits).clamp(min=1e-12)
    return -torch.log(p.gather(1, y.long()[:, None])).mean()


def nll(task_type: str, logits: np.ndarray, y: np.ndarray, temperature: float | list[float] = 1.0,
        bias: list[float] | None = None) -> float:
    """Mean negative log-likelihood of labels ``y`` under ``logits / temperature + bias``."""
    z = scale_logits(torch.as_tensor(np.asarray(logits), dtype=torch.float64), temperature, bias)
    return float(_nll(task_type, z, torch.as_tensor(np.asarray(y))))


def fit_temperature(task_type: str, logits: np.ndarray, y: np.ndarray) -> float | list[float]:
    """The temperature(s) minimising the NLL of ``y`` under ``logits / T``.

    Parameters
    ----------
    task_type : str
        ``binary``, ``multiclass``, ``multilabel`` (one ``T`` per label) or ``ordinal``.
    logits : np.ndarray
        Model outputs ``(N, num_outputs)`` before the task's link.
    y : np.ndarray
        Integer labels ``(N,)``, multi-hot ``(N, K)`` for multilabel.

    Returns
    -------
    float or list of float
        ``T > 0`` (``T > 1`` softens an over-confident model).
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y))
    if len(z) == 0:
        raise MedClassError("cannot fit a temperature on an empty validation split", "train on more images")
    n_t = z.shape[1] if task_type == "multilabel" else 1
    # Optimise log T: T stays positive without constraints; bounded to T in [0.05, 20].
    log_t = torch.zeros(n_t, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(task_type, z / torch.exp(log_t.clamp(-3, 3)), yt)
        loss.backward()
        return loss

    opt.step(closure)
    t = torch.exp(log_t.detach().clamp(-3, 3)).tolist()
    t = [round(v, _DIGITS) for v in t]
    return t if task_type == "multilabel" else t[0]


def fit_bias_corrected_temperature(task_type: str, logits: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    """Bias-corrected temperature scaling (BCTS; Alexandari et al., 2020): ``softmax(z / T + b)``.

    For binary and multiclass tasks. The per-class bias ``b`` (``b[0] = 0``) also corrects a
    model whose scores are shifted towards one class, which a temperature alone cannot: it
    can only soften or sharpen.

    Returns
    -------
    (float, list of float)
        ``T`` and ``b``.
    """
    if task_type not in ("binary", "multiclass"):
        raise ValueError(f"bias-corrected temperature scaling is for softmax tasks, not {task_type}")
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y))
    params = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)  # log T, b[1:]
    opt = torch.optim.LBFGS([params], lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def scaled():
        bias = torch.cat([torch.zeros(1, dtype=torch.float64), params[1:]])
        return z / torch.exp(params[0].clamp(-3, 3)) + bias

    def closure():
        opt.zero_grad()
        loss = _nll(task_type, scaled(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    p = params.detach()
    t = round(float(torch.exp(p[0].clamp(-3, 3))), _DIGITS)
    return t, [0.0, *[round(float(v), _DIGITS) for v in p[1:]]]


def scale_logits(logits: torch.Tensor, temperature: float | list[float] | None,
                 bias: list[float] | None = None) -> torch.Tensor:
    """``logits / T + b`` (``T`` one number, or one per column; ``b`` one per column, optional)."""
    if temperature is not None:
        logits = logits / torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    if bias is not None:
        logits = logits + torch.as_tensor(bias, dtype=logits.dtype, device=logits.device)
    return logits


def card_scaling(card: dict[str, Any] | None) -> tuple[float | list[float] | None, list[float] | None]:
    """The card's fitted ``(temperature, bias)``; ``(None, None)`` for a checkpoint without calibration."""
    cal = (card or {}).get("calibration") or {}
    if cal.get("method") not in ("temperature", "bcts"):
        return None, None
    return cal.get("temperature"), cal.get("bias")


def card_temperature(card: dict[str, Any] | None) -> float | list[float] | None:
    """The card's fitted temperature, ``None`` for a checkpoint without calibration."""
    return card_scaling(card)[0]


# --------------------------------------------------------------------------- ROC, operating points
def roc(scores: np.ndarray, positive: np.ndarray) -> dict[str, list[float]]:
    """One-vs-rest ROC as a step function: ``p >= thresholds[i]`` gives ``tpr[i]``, ``fpr[i]``.

    Thresholds are the distinct scores, descending; a first threshold above every
    score (1.000001) gives (0, 0). Empty lists when a class has no positive or no
    negative example.
    """
    s = np.round(np.asarray(scores, dtype=np.float64), _DIGITS)
    pos = np.asarray(positive).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return {"thresholds": [], "tpr": [], "fpr": []}
    thr = np.unique(s)[::-1]
    # For each threshold, how many positives / negatives score >= it.
    order = np.sort(s[pos])
    tp = len(order) - np.searchsorted(order, thr, side="left")
    neg = np.sort(s[~pos])
    fp = len(neg) - np.searchsorted(neg, thr, side="left")
    return {"thresholds": [1.000001, *np.round(thr, _DIGITS).tolist()],
            "tpr": [0.0, *np.round(tp / n_pos, _DIGITS).tolist()],
            "fpr": [0.0, *np.round(fp / n_neg, _DIGITS).tolist()]}


def class_rocs(task_type: str, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """The ROC of every class (one-vs-rest; per label for multilabel)."""
    y = np.asarray(y)
    return {c: roc(probs[:, k], y[:, k] if task_type == "multilabel" else y == k) for k, c in enumerate(classes)}


def operating_threshold(curve: dict[str, list[float]], metric: str, target: float) -> float:
    """The threshold reaching ``metric >= target`` on ``curve`` with the best other rate.

    ``sensitivity``: the highest threshold whose TPR reaches the target (best
    specificity). ``specificity``: the lowest threshold whose 1 - FPR reaches it
    (best sensitivity).

    Raises
    ------
    MedClassError
        An unknown metric, a target outside (0, 1], or an empty curve.
    """
    if metric not in OPERATING_METRICS:
        raise MedClassError(f"unknown operating point {metric!r}", f"use one of {', '.join(OPERATING_METRICS)}")
    if not 0 < target <= 1:
        raise MedClassError(f"a {metric} target of {target} is outside (0, 1]", f"write e.g. {metric} >= 0.95")
    thr = np.asarray(curve["thresholds"])
    if not len(thr):
        raise MedClassError("the validation split has no positive or no negative example of this class",
                            "re-fit the calibration on a larger validation split")
    if metric == "sensitivity":
        ok = np.flatnonzero(np.asarray(curve["tpr"]) >= target - 1e-12)
        return float(thr[ok[0]])
    ok = np.flatnonzero(1.0 - np.asarray(curve["fpr"]) >= target - 1e-12)
    return float(thr[ok[-1]])


def rates_at(curve: dict[str, list[float]], threshold: float) -> tuple[float | None, float | None]:
    """``(sensitivity, specificity)`` of ``p >= threshold`` on a recorded curve."""
    thr = np.asarray(curve.get("thresholds", []))
    if not len(thr):
        return None, None
    # The last curve point whose threshold is >= the one asked for (thresholds descend).
    i = int(np.searchsorted(-thr, -threshold + 1e-12, side="right")) - 1
    i = max(i, 0)
    return float(curve["tpr"][i]), round(1.0 - float(curve["fpr"][i]), _DIGITS)


def operating_point(card: dict[str, Any], name: str, metric: str, target: float) -> dict[str, Any]:
    """Threshold for class ``name`` at ``metric >= target`` from the card's validation ROC.

    Returns
    -------
    dict
        ``class, metric, target, threshold``, ``val_sensitivity``, ``val_specificity``
        and the held-out ``test_sensitivity``, ``test_specificity`` (``None`` when
        the card holds no held-out ROC).

    Raises
    ------
    MedClassError
        The checkpoint records no ROC for this class (an old checkpoint).
    """
    curves = ((card.get("calibration") or {}).get("roc") or {})
    if name not in curves.get("val", {}):
        raise MedClassError(f"the checkpoint records no validation ROC for {name!r}, so '{name} at {metric}' "
                            "cannot choose a threshold",
                            "run 'medclass calibrate --checkpoint MODEL.pt' (or retrain) to store one")
    val = curves["val"][name]
    t = operating_threshold(val, metric, target)
    vs, vp = rates_at(val, t)
    ts, tp = rates_at(curves.get("test", {}).get(name, {}), t)
    return {"class": name, "metric": metric, "target": float(target), "threshold": t,
            "val_sensitivity": vs, "val_specificity": vp, "test_sensitivity": ts, "test_specificity": tp}


# --------------------------------------------------------------------------- conformal sets
def conformal_scores(probs: np.ndarray, y: np.ndarray, method: str = "lac") -> np.ndarray:
    """Nonconformity score of each labelled example (higher: less conforming)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(int)
    p_true = p[np.arange(len(p)), y]
    if method == "lac":
        return 1.0 - p_true
    if method == "aps":
        return np.where(p >= p_true[:, None] - 1e-12, p, 0.0).sum(axis=1)
    raise MedClassError(f"unknown conformal method {method!r}", f"use one of {', '.join(CONFORMAL_METHODS)}")


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """Split-conformal ``qhat``: the ``ceil((n + 1) * coverage)``-th smallest score.

    With that finite-sample correction a new exchangeable example's score is
    ``<= qhat`` with probability at least ``coverage``. When ``(n + 1) * coverage``
    exceeds ``n`` no finite quantile guarantees it: ``inf`` (every class in the set).
    """
    if not 0 < coverage < 1:
        raise MedClassError(f"coverage {coverage} is outside (0, 1)", "use e.g. coverage = 0.95")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(s) + 1) * coverage)
    return float(s[k - 1]) if k <= len(s) else math.inf


def prediction_set(probs_row: np.ndarray, qhat: float, method: str = "lac") -> np.ndarray:
    """Indices of the classes in the conformal set of one probability row."""
    p = np.asarray(probs_row, dtype=np.float64)
    if method == "lac":
        return np.flatnonzero(1.0 - p <= qhat + 1e-9)
    if method == "aps":
        score = np.array([p[p >= pk - 1e-12].sum() for pk in p])
        return np.flatnonzero(score <= qhat + 1e-9)
    raise MedClassError(f"unknown conformal method {method!r}", f"use one of {', '.join(CONFORMAL_METHODS)}")


def card_qhat(card: dict[str, Any], coverage: float, method: str = "lac") -> float | None:
    """``qhat`` at ``coverage`` from the card's validation scores; ``None`` if it has none."""
    conf = ((card.get("calibration") or {}).get("conformal") or {}).get(method)
    if not conf:
        return None
    return conformal_quantile(conf["val_scores"], coverage)


def held_out_coverage(card: dict[str, Any], coverage: float, method: str = "lac") -> float | None:
    """Fraction of the held-out split whose true class is in its set at ``coverage``."""
    conf = ((card.get("calibration") or {}).get("conformal") or {}).get(method)
    if not conf or not conf.get("test_scores"):
        return None
    q = conformal_quantile(conf["val_scores"], coverage)
    return float(np.mean(np.asarray(conf["test_scores"]) <= q + 1e-9))


# --------------------------------------------------------------------------- fitting everything
def calibrate(task_type: str, classes: list[str], val_logits: np.ndarray, val_y: np.ndarray,
              test_logits: np.ndarray | None = None, test_y: np.ndarray | None = None,
              rescale: bool = True, link=None) -> dict[str, Any]:
    """Fit the card's ``calibration`` section (see the module docstring).

    Parameters
    ----------
    task_type, classes
        The model's task.
    val_logits, val_y
        Outputs and labels of the validation split (the calibration set).
    test_logits, test_y : optional
        Of the held-out split: recorded so that a reader sees what a threshold or a
        coverage gives on images the calibration did not see.
    rescale : bool
        Fit a temperature (``False`` for models without logits).
    link : callable, optional
        Logits to probabilities; defaults to the task's link.

    Returns
    -------
    dict
        JSON types only.
    """
    from medclass.metrics import compute_metrics

    link = link or (lambda z: _link(task_type, z))
    # A temperature fitted on a handful of images is noise (all correct: T -> its lower bound,
    # probabilities pushed to 0 and 1); below MIN_EXAMPLES the model's own probabilities stay.
    rescale = rescale and len(val_y) >= MIN_EXAMPLES
    method = "temperature" if rescale else "none"
    t = fit_temperature(task_type, val_logits, val_y) if rescale else None
    b = None
    if rescale and task_type in ("binary", "multiclass"):
        # BCTS adds K - 1 parameters: it is kept only when it pays for them (AIC: the validation
        # log-likelihood must grow by more than the number of extra parameters).
        t2, b2 = fit_bias_corrected_temperature(task_type, val_logits, val_y)
        gain = len(val_y) * (nll(task_type, val_logits, val_y, t) - nll(task_type, val_logits, val_y, t2, b2))
        if gain > len(b2) - 1:
            method, t, b = "bcts", t2, b2

    def probs(z, temp, bias=None):
        return link(scale_logits(torch.as_tensor(np.asarray(z), dtype=torch.float64), temp, bias)).numpy()

    def ece(z, y, temp, bias=None):
        return round(float(compute_metrics(task_type, y, probs(z, temp, bias), classes)["ece"]), _DIGITS)

    out: dict[str, Any] = {"method": method, "temperature": t, "fitted_on": "val", "n_val": int(len(val_y)),
                           "val_ece_before": ece(val_logits, val_y, None),
                           "val_ece_after": ece(val_logits, val_y, t, b)}
    if b is not None:
        out["bias"] = b
    if rescale:
        out["val_nll_before"] = round(nll(task_type, val_logits, val_y), _DIGITS)
        out["val_nll_after"] = round(nll(task_type, val_logits, val_y, t, b), _DIGITS)
    splits = {"val": (val_logits, val_y)}
    if test_logits is not None and test_y is not None and len(test_y):
        splits["test"] = (test_logits, test_y)
        out["test_ece_before"] = ece(test_logits, test_y, None)
        out["test_ece_after"] = ece(test_logits, test_y, t, b)
    out["roc"] = {s: class_rocs(task_type, y, np.round(probs(z, t, b), _DIGITS), classes)
                  for s, (z, y) in splits.items()}
    if task_type != "multilabel":
        out["conformal"] = {}
        for m in CONFORMAL_METHODS:
            sc = {s: np.sort(np.round(conformal_scores(np.round(probs(z, t, b), _DIGITS), y, m), _DIGITS))
                  for s, (z, y) in splits.items()}
            out["conformal"][m] = {
                "val_scores": sc["val"].tolist(),
                "test_scores": sc["test"].tolist() if "test" in sc else [],
                "qhat": {str(c): _finite(conformal_quantile(sc["val"], c)) for c in COVERAGES},
            }
    return out


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else round(x, _DIGITS)


def calibration_summary(cal: dict[str, Any]) -> str:
    """One line for the CLI: temperature and ECE before/after."""
    t = cal.get("temperature")
    t_txt = "none" if t is None else (f"{t:.3f}" if isinstance(t, float) else "[" + ", ".join(f"{v:.3f}" for v in t) + "]")
    if cal.get("bias"):
        t_txt += ", bias [" + ", ".join(f"{v:.3f}" for v in cal["bias"]) + "]"
    line = f"calibration ({cal['method']}): T = {t_txt}, validation ECE {cal['val_ece_before']:.4f} -> {cal['val_ece_after']:.4f}"
    if "test_ece_after" in cal:
        line += f", held-out ECE {cal['test_ece_before']:.4f} -> {cal['test_ece_after']:.4f}"
    return line


__all__ = ["COVERAGES", "CONFORMAL_METHODS", "OPERATING_METRICS", "calibrate",
           "calibration_summary", "card_qhat", "card_scaling", "card_temperature", "class_rocs", "conformal_quantile",
           "conformal_scores", "fit_bias_corrected_temperature", "fit_temperature", "held_out_coverage", "nll",
           "operating_point", "operating_threshold", "prediction_set", "rates_at", "roc", "scale_logits"]
