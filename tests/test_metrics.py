"""Tests of medclass.metrics on small synthetic arrays."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from medclass.errors import MedClassError
from medclass.metrics import (
    bootstrap_ci,
    compute_metrics,
    evaluation_report,
    format_metrics,
    plot_confusion,
    plot_reliability,
    plot_roc,
    reliability_bins,
    roc_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _binary(y: np.ndarray, p1: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - p1, p1])


def _softmaxish(rng: np.random.Generator, y: np.ndarray, k: int, signal: float = 1.0) -> np.ndarray:
    """Noisy probabilities that favour the true class, rows summing to one."""
    p = rng.random((len(y), k)) + signal * np.eye(k)[y]
    return p / p.sum(axis=1, keepdims=True)


def _cases(rng: np.random.Generator) -> dict:
    """One (y, probs, class_names) example per task type."""
    yb = rng.integers(0, 2, 60)
    yc = rng.integers(0, 3, 60)
    yo = rng.integers(0, 5, 60)
    ym = rng.integers(0, 2, (60, 3))
    return {
        "binary": (yb, _binary(yb, np.clip(0.4 * yb + 0.6 * rng.random(60), 0, 1)), ["normal", "tumour"]),
        "multiclass": (yc, _softmaxish(rng, yc, 3), ["normal", "benign", "malignant"]),
        "ordinal": (yo, _softmaxish(rng, yo, 5), [f"grade{i}" for i in range(5)]),
        "multilabel": (
            ym,
            np.clip(0.4 * ym + 0.6 * rng.random((60, 3)), 0, 1),
            ["effusion", "nodule", "edema"],
        ),
    }


def test_perfect_binary() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    m = compute_metrics("binary", y, _binary(y, y.astype(float)), ["neg", "pos"])
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["f1"] == 1.0
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    assert m["ece"] < 1e-9
    assert m["confusion_matrix"] == [[3, 0], [0, 3]]
    assert m["n"] == 6


def test_inverted_binary_auc_zero() -> None:
    y = np.array([0, 0, 1, 1])
    m = compute_metrics("binary", y, _binary(y, np.array([0.9, 0.8, 0.2, 0.1])), ["neg", "pos"])
    assert m["auc"] == 0.0 and m["accuracy"] == 0.0


def test_binary_hand_computed() -> None:
    # Threshold 0.5 -> predictions 1,1,0,0,1,0,0: TP=2, FN=1, FP=1, TN=3.
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p1 = np.array([0.9, 0.6, 0.4, 0.3, 0.7, 0.2, 0.1])
    m = compute_metrics("binary", y, _binary(y, p1), ["neg", "pos"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["confusion_matrix"] == [[3, 1], [1, 2]]
    # Pairs: pos 0.9 beats all 4 neg, 0.6 beats 3, 0.4 beats 3 -> 10 / 12.
    assert m["auc"] == pytest.approx(10 / 12)
    # A higher threshold moves 0.6 to negative.
    m2 = compute_metrics("binary", y, _binary(y, p1), ["neg", "pos"], threshold=0.65)
    assert m2["sensitivity"] == pytest.approx(1 / 3)


def test_binary_ece_hand_computed() -> None:
    # All four predictions confident 0.8 (one bin), three correct: ECE = |0.75 - 0.8|.
    y = np.array([1, 1, 1, 0])
    m = compute_metrics("binary", y, _binary(y, np.full(4, 0.8)), ["neg", "pos"])
    assert m["ece"] == pytest.approx(0.05)


def test_fast_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 80)
        if y.min() == y.max():
            continue
        # Rounding to one decimal creates many ties across the classes.
        p1 = np.round(np.clip(0.3 * y + 0.7 * rng.random(80), 0, 1), 1)
        m = compute_metrics("binary", y, _binary(y, p1), ["neg", "pos"])
        assert m["auc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)


def test_multiclass_macro_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = _softmaxish(rng, y, 4, signal=0.5)
    names = ["a", "b", "c", "d"]
    m = compute_metrics("multiclass", y, p, names)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    for c, name in enumerate(names):
        assert m["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert m["per_class"][name]["support"] == int(np.sum(y == c))
    assert np.array(m["confusion_matrix"]).sum() == 200


def test_ordinal_qwk_and_mae() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 150)
    p = _softmaxish(rng, y, 5, signal=0.4)
    m = compute_metrics("ordinal", y, p, [str(i) for i in range(5)])
    pred = p.argmax(1)
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - y)))
    assert set(m["per_class"]) == {str(i) for i in range(5)}


def test_multilabel_per_label() -> None:
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    p = np.array([[0.9, 0.2], [0.8, 0.4], [0.3, 0.7], [0.6, 0.1]])
    m = compute_metrics("multilabel", y, p, ["effusion", "nodule"])
    eff, nod = m["per_label"]["effusion"], m["per_label"]["nodule"]
    assert eff["auc"] == 1.0 and nod["auc"] == 1.0
    # effusion predictions 1,1,0,1: one false positive; nodule 0,0,1,0: one false negative.
    assert eff["confusion_matrix"] == [[1, 1], [0, 2]]
    assert nod["confusion_matrix"] == [[2, 0], [1, 1]]
    assert eff["specificity"] == 0.5 and nod["sensitivity"] == 0.5
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["subset_accuracy"] == pytest.approx(0.5)
    assert m["sensitivity"] == pytest.approx((1.0 + 0.5) / 2)


def test_absent_class_auc_none() -> None:
    y = np.array([0, 1, 0, 1, 0, 1])  # class 2 never occurs
    p = np.array([[0.7, 0.2, 0.1]] * 3 + [[0.2, 0.7, 0.1]] * 3)[[0, 3, 1, 4, 2, 5]]
    m = compute_metrics("multiclass", y, p, ["a", "b", "c"])
    assert m["per_class"]["c"]["auc"] is None
    assert m["per_class"]["c"]["sensitivity"] is None
    assert m["auc"] == 1.0  # mean of the defined classes only
    json.dumps(m)
    # All-negative binary: AUC undefined, sensitivity undefined, no crash.
    yb = np.zeros(4, dtype=int)
    mb = compute_metrics("binary", yb, _binary(yb, np.array([0.1, 0.2, 0.6, 0.3])), ["neg", "pos"])
    assert mb["auc"] is None and mb["sensitivity"] is None and mb["specificity"] == 0.75
    ci = bootstrap_ci("binary", yb, _binary(yb, np.array([0.1, 0.2, 0.6, 0.3])), ["neg", "pos"], n_boot=50)
    assert ci["auc"] == [None, None]


@pytest.mark.parametrize("task", ["binary", "multiclass", "ordinal", "multilabel"])
def test_bootstrap_contains_point_estimate(task: str) -> None:
    y, p, names = _cases(np.random.default_rng(5))[task]
    m = compute_metrics(task, y, p, names)
    ci = bootstrap_ci(task, y, p, names, n_boot=300, seed=1)
    assert set(ci) == {"auc", "accuracy", "sensitivity", "specificity", "f1"}
    for key, (low, high) in ci.items():
        assert low <= m[key] <= high, key
    assert ci == bootstrap_ci(task, y, p, names, n_boot=300, seed=1)  # seeded


def test_bootstrap_extra_keys_and_bad_key() -> None:
    y, p, names = _cases(np.random.default_rng(2))["ordinal"]
    ci = bootstrap_ci("ordinal", y, p, names, n_boot=100, keys=("qwk", "mae", "ece"))
    m = compute_metrics("ordinal", y, p, names)
    assert ci["qwk"][0] <= m["qwk"] <= ci["qwk"][1]
    with pytest.raises(MedClassError):
        bootstrap_ci("binary", *_cases(np.random.default_rng(2))["binary"], n_boot=10, keys=("qwk",))


def test_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 450)
    p = _binary(y, np.clip(0.3 * y + 0.7 * rng.random(450), 0, 1))
    start = time.perf_counter()
    bootstrap_ci("binary", y, p, ["neg", "pos"], n_boot=1000)
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("task", ["binary", "multiclass", "ordinal", "multilabel"])
def test_json_serialisable(task: str) -> None:
    y, p, names = _cases(np.random.default_rng(7))[task]
    m = compute_metrics(task, y, p, names)
    for key in ("auc", "accuracy", "sensitivity", "specificity", "f1", "ece", "n"):
        assert key in m
    json.loads(json.dumps(m, allow_nan=False))


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_plots_are_png(task: str, tmp_path) -> None:
    y, p, names = _cases(np.random.default_rng(9))[task]
    for fn, name in ((plot_roc, "roc.png"), (plot_confusion, "cm.png"), (plot_reliability, "rel.png")):
        out = fn(task, y, p, names, tmp_path / name)
        data = out.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name


def _noisy_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, _binary(y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1))


def test_roc_band_holds_the_curve_and_narrows_with_more_images() -> None:
    y, p = _noisy_binary(200, 3)
    (curve,) = roc_curves("binary", y, p, ["normal", "tumour"], n_boot=200, seed=0)
    assert curve["name"] == "tumour" and curve["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    band = curve["band"]
    assert band["grid"][0] == 0 and band["grid"][-1] == 1 and np.all(np.diff(band["grid"]) > 0)
    assert np.all(band["low"] <= band["high"])
    on_grid = np.interp(band["grid"], curve["fpr"], curve["tpr"])
    assert np.mean((band["low"] - 1e-9 <= on_grid) & (on_grid <= band["high"] + 1e-9)) >= 0.95
    width = {}
    for n in (50, 800):
        b = roc_curves("binary", *_noisy_binary(n, 5), ["a", "b"])[0]["band"]
        width[n] = np.mean(b["high"] - b["low"])
    assert 0 < width[800] < width[50] < 0.5  # a band, not a line nor the whole square
    # Seeded: the same band twice; no resamples, no band.
    again = roc_curves("binary", y, p, ["normal", "tumour"], n_boot=200, seed=0)[0]["band"]
    assert np.array_equal(again["low"], band["low"]) and np.array_equal(again["high"], band["high"])
    assert roc_curves("binary", y, p, ["normal", "tumour"], n_boot=0)[0]["band"] is None


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_roc_operating_point_is_the_thresholds_sensitivity_and_specificity(threshold: float) -> None:
    y, p = _noisy_binary(120, 8)
    op = roc_curves("binary", y, p, ["normal", "tumour"], threshold=threshold, n_boot=0)[0]["operating_point"]
    m = compute_metrics("binary", y, p, ["normal", "tumour"], threshold=threshold)
    assert op["sensitivity"] == pytest.approx(m["sensitivity"])
    assert op["specificity"] == pytest.approx(m["specificity"])
    assert op["fpr"] == pytest.approx(1 - m["specificity"])


def test_roc_curves_per_label_and_per_class() -> None:
    cases = _cases(np.random.default_rng(11))
    y, p, names = cases["multilabel"]
    m = compute_metrics("multilabel", y, p, names)
    curves = roc_curves("multilabel", y, p, names, n_boot=50)
    assert [c["name"] for c in curves] == names
    for c in curves:
        assert c["operating_point"]["sensitivity"] == pytest.approx(m["per_label"][c["name"]]["sensitivity"])
    y, p, names = cases["multiclass"]
    curves = roc_curves("multiclass", y, p, names, n_boot=50)
    assert [c["name"] for c in curves] == names
    assert all(c["operating_point"] is None and c["band"] is not None for c in curves)  # no single threshold
    one_class = np.zeros(20, dtype=int)
    (undefined,) = roc_curves("binary", one_class, _binary(one_class, np.linspace(0, 1, 20)), ["a", "b"])
    assert undefined["auc"] is None and undefined["band"] is None and undefined["fpr"] is None


@pytest.mark.parametrize("task", ["binary", "multiclass", "ordinal", "multilabel"])
def test_reliability_bins_count_every_decision(task: str) -> None:
    y, p, names = _cases(np.random.default_rng(12))[task]
    rel = reliability_bins(task, y, p, names)
    count, acc, conf = rel["count"], rel["accuracy"], rel["confidence"]
    assert len(rel["edges"]) == len(count) + 1
    assert count.sum() == y.size  # multilabel: every (case, label) decision
    # Confidence: the probability of what was decided (binary/multilabel: >= 0.5), binned (lo, hi].
    if task in ("binary", "multilabel"):
        q = p[:, 1] if task == "binary" else p.ravel()
        c = np.maximum(q, 1 - q)
    else:
        c = p.max(axis=1)
    lo, hi = rel["edges"][:-1], rel["edges"][1:]
    expected = [np.sum((c > a) & (c <= b)) + (np.sum(c == 0) if i == 0 else 0) for i, (a, b) in enumerate(zip(lo, hi))]
    assert count.tolist() == expected
    filled = count > 0
    assert np.all(np.isnan(acc[~filled])) and np.all((acc[filled] >= 0) & (acc[filled] <= 1))
    assert np.all((conf[filled] > lo[filled] - 1e-12) & (conf[filled] <= hi[filled] + 1e-12))
    ece = np.sum(count[filled] / count.sum() * np.abs(acc[filled] - conf[filled]))
    assert rel["ece"] == pytest.approx(ece) == pytest.approx(compute_metrics(task, y, p, names)["ece"])


def test_evaluation_report(tmp_path) -> None:
    y, p, names = _cases(np.random.default_rng(4))["ordinal"]
    report = evaluation_report("ordinal", y, p, names, tmp_path / "eval", n_boot=100)
    assert set(report["plots"]) == {"roc", "confusion_matrix", "reliability"}
    for fname in report["plots"].values():
        assert (tmp_path / "eval" / fname).read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "eval" / "metrics.json").exists()
    json.dumps(report, allow_nan=False)
    text = format_metrics(report)
    assert "AUC" in text and "95% CI" in text and "QWK" in text and "n=60" in text


def test_bad_inputs() -> None:
    y = np.array([0, 1])
    with pytest.raises(MedClassError):
        compute_metrics("regression", y, _binary(y, np.array([0.2, 0.8])), ["a", "b"])
    with pytest.raises(MedClassError):
        compute_metrics("binary", y, np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(MedClassError):
        compute_metrics("multiclass", np.array([0, 5]), np.ones((2, 3)) / 3, ["a", "b", "c"])


def test_import_is_light() -> None:
    code = "import sys, medclass.metrics; print('matplotlib' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
