"""Calibration (temperature scaling), operating points and split-conformal sets.

Unit tests on synthetic scores (the behaviour, not the data, is under test), then one
short seeded training on real Br35H: the card holds the calibration and the ROC, and
every front door's probabilities use the temperature.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medclass import calibration as cal
from medclass.errors import MedClassError
from medclass.metrics import compute_metrics


def _overconfident(n: int, seed: int, scale: float = 4.0):
    """Binary logits whose true log-odds are ``d`` but which the 'model' reports as ``scale * d``."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-d))).astype(int)
    logits = np.stack([np.zeros(n), scale * d], axis=1)
    return logits, y


def _softmax(z):
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), dim=1).numpy()


def test_temperature_undoes_overconfidence_and_lowers_nll_and_ece():
    z, y = _overconfident(4000, 0, scale=4.0)
    t = cal.fit_temperature("binary", z, y)
    assert 3.0 < t < 5.0  # the over-confidence factor, recovered
    assert cal.nll("binary", z, y, t) < cal.nll("binary", z, y)
    before = compute_metrics("binary", y, _softmax(z), ["a", "b"])["ece"]
    after = compute_metrics("binary", y, _softmax(z / t), ["a", "b"])["ece"]
    assert after < before / 2


def test_bias_corrected_temperature_fixes_a_shifted_model_and_is_chosen_only_when_it_pays():
    z, y = _overconfident(2000, 5, scale=2.0)
    shifted = z + np.array([0.0, 3.0])  # every score pushed towards the positive class
    t, b = cal.fit_bias_corrected_temperature("binary", shifted, y)
    assert b[0] == 0 and -4 < b[1] * t < -2  # the shift (3 logits, before the temperature), undone
    assert cal.nll("binary", shifted, y, t, b) < cal.nll("binary", shifted, y, cal.fit_temperature("binary", shifted, y))
    section = cal.calibrate("binary", ["no", "yes"], shifted[:1000], y[:1000], shifted[1000:], y[1000:])
    assert section["method"] == "bcts" and section["test_ece_after"] < section["test_ece_before"] / 2
    # A model that is only over-confident keeps plain temperature scaling.
    plain = cal.calibrate("binary", ["no", "yes"], z[:1000], y[:1000])
    assert plain["method"] == "temperature" and "bias" not in plain


def test_temperature_keeps_the_ranking_and_fits_each_task_type():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    z = rng.normal(size=(600, 3)) + 6 * np.eye(3)[y] * (rng.random((600, 1)) < 0.7)
    t = cal.fit_temperature("multiclass", z, y)
    assert t > 1 and np.array_equal(np.argsort(z, axis=1), np.argsort(z / t, axis=1))
    multi_y = (rng.random((600, 2)) < 0.5).astype(int)
    multi_z = np.where(multi_y == 1, 1.0, -1.0) * np.array([8.0, 0.3]) + rng.normal(size=(600, 2))
    tl = cal.fit_temperature("multilabel", multi_z, multi_y)
    assert isinstance(tl, list) and len(tl) == 2 and tl[0] != tl[1]  # one temperature per label
    ordinal_z = np.stack([4 * (y > 0) - 2, 4 * (y > 1) - 2], axis=1).astype(float) * 3
    to = cal.fit_temperature("ordinal", ordinal_z, y)
    assert cal.nll("ordinal", ordinal_z, y, to) <= cal.nll("ordinal", ordinal_z, y) + 1e-9


def test_roc_and_threshold_selection():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    positive = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0], bool)
    curve = cal.roc(scores, positive)
    assert curve["thresholds"][0] > 1 and curve["tpr"][0] == 0 and curve["fpr"][-1] == 1
    # Sensitivity >= 0.8 needs 4 of the 5 positives: the highest such threshold is 0.5.
    t = cal.operating_threshold(curve, "sensitivity", 0.8)
    assert t == 0.5
    assert cal.rates_at(curve, t) == (0.8, 0.8)
    # Check against the definition: p >= t on the raw scores.
    assert (scores[positive] >= t).mean() >= 0.8 and (scores[positive] >= np.nextafter(t, 1)).mean() < 0.8
    # Specificity >= 0.8: at most 1 of 5 negatives above; the lowest such threshold is 0.5 too.
    ts = cal.operating_threshold(curve, "specificity", 0.8)
    assert (scores[~positive] >= ts).mean() <= 0.2 and (scores[~positive] >= np.nextafter(ts, 0)).mean() <= 0.2
    assert cal.operating_threshold(curve, "sensitivity", 1.0) == 0.3
    with pytest.raises(MedClassError):
        cal.operating_threshold(curve, "sensitivity", 1.5)


def test_conformal_quantile_matches_the_finite_sample_definition():
    rng = np.random.default_rng(2)
    scores = rng.random(99)
    for coverage in (0.8, 0.9, 0.95):
        # Independent reference: the empirical quantile (smallest score whose empirical CDF reaches the
        # level) at the corrected level ceil((n + 1) * coverage) / n. (numpy's "higher" method at that
        # level, as often quoted, is one rank more conservative.)
        level = math.ceil((len(scores) + 1) * coverage) / len(scores)
        assert cal.conformal_quantile(scores, coverage) == np.quantile(scores, level, method="inverted_cdf")
    assert cal.conformal_quantile(scores[:5], 0.95) == math.inf  # too few examples for a finite guarantee


@pytest.mark.parametrize("method", cal.CONFORMAL_METHODS)
def test_conformal_sets_cover_exchangeable_examples(method):
    """Over many random calibration/test splits, mean coverage is at least the target."""
    rng = np.random.default_rng(3)
    n, k = 4000, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = _softmax(logits)
    covered = []
    for _ in range(50):
        perm = rng.permutation(n)
        calib, test = perm[:500], perm[500:1500]
        q = cal.conformal_quantile(cal.conformal_scores(probs[calib], y[calib], method), 0.9)
        covered.append(np.mean([y[i] in cal.prediction_set(probs[i], q, method) for i in test]))
    assert np.mean(covered) >= 0.9 - 0.005
    # And sets are not trivially every class.
    assert np.mean([len(cal.prediction_set(p, q, method)) for p in probs[:200]]) < k


def test_calibrate_builds_the_card_section():
    z, y = _overconfident(1200, 4)
    section = cal.calibrate("binary", ["no", "yes"], z[:600], y[:600], z[600:], y[600:])
    assert section["method"] in ("temperature", "bcts") and section["temperature"] > 1
    assert section["val_ece_after"] < section["val_ece_before"]
    assert set(section["roc"]) == {"val", "test"} and set(section["roc"]["val"]) == {"no", "yes"}
    card = {"calibration": section}
    op = cal.operating_point(card, "yes", "sensitivity", 0.9)
    assert op["val_sensitivity"] >= 0.9 and op["test_sensitivity"] is not None
    assert cal.card_qhat(card, 0.9) == cal.conformal_quantile(section["conformal"]["lac"]["val_scores"], 0.9)
    with pytest.raises(MedClassError, match="no validation ROC"):
        cal.operating_point({}, "yes", "sensitivity", 0.9)


def test_train_stores_calibration_and_classifier_applies_it(tmp_path):
    """Real Br35H, short and seeded: the card holds calibration, ROC and conformal scores, and the
    Classifier's probabilities are the softmax of logits / T (whatever T the fit found)."""
    from medclass.checkpoint import load_checkpoint, read_card
    from medclass.data import load_dataset, materialize
    from medclass.evaluation import calibrate_checkpoint, select_split
    from medclass.inference import Classifier, forward_logits, forward_probabilities
    from medclass.training import TrainConfig, train

    res = train(TrainConfig(data="br35h", model="resnet18", image_size=32, epochs=1, limit=300, device="cpu",
                            seed=0, progress=False, out=str(tmp_path / "run")))
    card = read_card(res.checkpoint)
    c = card["calibration"]
    assert c["method"] in ("temperature", "bcts") and c["temperature"] > 0
    assert c["n_val"] == card["data"]["n_val"]
    assert set(c["roc"]["val"]) == {"no tumour", "tumour"} and c["roc"]["test"]["tumour"]["thresholds"]
    assert len(c["conformal"]["lac"]["val_scores"]) == card["data"]["n_val"]
    assert res.metrics["calibration"]["val_ece_after"] <= res.metrics["calibration"]["val_ece_before"] + 1e-6

    clf = Classifier(res.checkpoint, device="cpu")
    ds = load_dataset("br35h")
    ts = materialize(ds, select_split(card, ds, "test")[:32], clf.loaded.preprocess_spec)
    logits = forward_logits(clf.loaded, ts.x)
    expected = torch.softmax(logits / c["temperature"] + torch.tensor(c.get("bias", [0.0, 0.0])), dim=1).numpy()
    got = forward_probabilities(clf.loaded, ts.x)
    assert np.allclose(got, expected, atol=1e-6)
    assert np.allclose(forward_probabilities(clf.loaded, ts.x, calibrated=False),
                       torch.softmax(logits, dim=1).numpy(), atol=1e-6)
    pset = clf.prediction_set(got[0], 0.95)
    assert pset and set(pset) <= set(clf.classes)

    # A checkpoint without calibration (as written before it existed) gives the raw probabilities.
    old = load_checkpoint(res.checkpoint, "cpu")
    old.card.pop("calibration")
    assert np.allclose(forward_probabilities(old, ts.x), torch.softmax(logits, dim=1).numpy(), atol=1e-6)
    assert Classifier(old).prediction_set(got[0], 0.95) is None

    # 'medclass calibrate' refits on the recorded validation split: the same fit, written to --out.
    from medclass.cli import main

    out = tmp_path / "recalibrated.pt"
    assert main(["calibrate", "--checkpoint", str(res.checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    again = read_card(out)["calibration"]
    assert again["temperature"] == pytest.approx(c["temperature"], rel=1e-3)
    assert calibrate_checkpoint  # the function behind the command
