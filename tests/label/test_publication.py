"""The annotation loop's core rules, without a server: held-out split, publication,
hand-outs to anonymous clients, and the head-only retraining on stored embeddings.

Tiny synthetic arrays are used where the rule, not the data, is under test; the
real-server tests are in ``test_app.py`` and ``test_retrain.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medclass.errors import MedClassError
from medclass.labeling import (
    MIN_LABELS_PER_CLASS,
    RESERVED_KEY,
    candidate_pools,
    decide_publication,
    fit_head,
    head_probabilities,
    heldout_split,
    scores_from_embeddings,
)
from medclass.tasks import Task

TASK = Task("binary", ["no tumour", "tumour"])


def _items(n_per_class: int, prefix: str = "img") -> list[tuple[str, str, list[str]]]:
    return [(f"{prefix}_{c}_{k}", f"/x/{prefix}_{c}_{k}.jpg", [c]) for c in TASK.classes for k in range(n_per_class)]


def test_heldout_split_keeps_an_image_of_every_class_on_both_sides():
    for n in (MIN_LABELS_PER_CLASS, 3, 10, 50):
        split = heldout_split(_items(n), TASK)
        for c in TASK.classes:
            sides = {split[i] for i, _p, names in _items(n) if names == [c]}
            assert sides == {"train", "test"}, (n, c, sides)


def test_heldout_split_is_stable_as_labels_grow():
    small, large = heldout_split(_items(40), TASK), heldout_split(_items(80), TASK)
    # An image held out once stays held out: the served model never trained on it.
    assert {i for i, s in small.items() if s == "test"} <= {i for i, s in large.items() if s == "test"}
    assert 0.1 < sum(s == "test" for s in large.values()) / len(large) < 0.3


def test_too_few_labels_of_a_class_is_a_message_naming_it():
    items = _items(5)[:5] + _items(5)[5:6]  # 5 "no tumour", 1 "tumour"
    with pytest.raises(MedClassError) as e:
        heldout_split(items, TASK)
    assert "tumour: 1" in e.value.message and str(MIN_LABELS_PER_CLASS) in e.value.remedy


def test_a_worse_model_is_not_published_unless_forced():
    y = np.array([0, 0, 1, 1])
    good = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    bad = good[::-1]
    kept = decide_publication(TASK, y, bad, good)
    assert not kept.publish and kept.new_score < kept.served_score and "kept the served model" in kept.reason
    assert decide_publication(TASK, y, bad, good, force=True).publish
    assert decide_publication(TASK, y, good, good).publish  # as good is good enough
    first = decide_publication(TASK, y, bad, None)
    assert first.publish and first.served_score is None


def _info(client, ts):
    return {RESERVED_KEY: {"client": client, "ts": ts}}


def test_an_anonymous_client_is_not_starved_by_anonymous_hand_outs():
    now = 1000.0
    infos = {"a": _info(None, now - 10), "b": _info(None, now - 20), "c": _info("alice", now - 5), "d": {}}
    free, fallback = candidate_pools(["a", "b", "c", "d"], infos, None, 600, now)
    assert free == ["d"]
    assert fallback == ["b", "a"]  # oldest hand-out first; alice's image stays hers
    free, fallback = candidate_pools(["a", "b", "c"], infos, None, 600, now)
    assert free == [] and fallback == ["b", "a"]


def test_a_named_client_gets_its_own_hand_out_back_and_never_anothers():
    now = 1000.0
    infos = {"a": _info(None, now - 10), "c": _info("alice", now - 5), "e": _info("bob", now - 700),
             "f": _info("bob", now - 5)}
    free, fallback = candidate_pools(["a", "c", "e", "f"], infos, "alice", 600, now)
    assert free == ["c", "e"]  # bob's first hand-out expired
    assert fallback == ["a"]  # an anonymous hand-out is a weak reservation; bob's live one is not


def _model():
    from medclass.models import create_model

    torch.manual_seed(0)
    return create_model("resnet18", spatial_dims=2, in_channels=1, num_outputs=2, image_size=32).eval()


def test_fit_head_changes_only_the_head_and_separates_separable_embeddings():
    model = _model()
    rng = np.random.default_rng(0)
    y = np.array([0] * 20 + [1] * 20)
    feats = rng.normal(size=(40, 512)).astype(np.float32)
    feats[:, 0] += np.where(y == 1, 4.0, -4.0)  # one informative direction
    new = fit_head(model, TASK, feats, list(y))
    old_state, new_state = model.state_dict(), new.state_dict()
    changed = {k for k in old_state if not torch.equal(old_state[k], new_state[k])}
    assert changed == {"head.weight", "head.bias"}
    pred = head_probabilities(new, TASK, feats).argmax(1)
    assert (pred == y).all()


def test_scores_from_embeddings_equal_the_pool_scores_of_the_same_model():
    from medclass.active import score_pool
    from medclass.checkpoint import LoadedModel

    model = _model()
    x = torch.rand(6, 1, 32, 32)
    loaded = LoadedModel(model, {}, TASK, torch.device("cpu"))
    pool = score_pool(loaded, x, methods=["entropy", "margin", "least-confidence", "bald"], mc_samples=20)
    mine = scores_from_embeddings(model, TASK, pool["embedding"], mc_samples=20)
    for m in ("entropy", "margin", "least-confidence"):
        np.testing.assert_allclose(mine[m], pool[m], rtol=1e-4, atol=1e-5)
    assert mine["bald"].shape == (6,) and (mine["bald"] >= -1e-9).all()


def _load_config(tmp_path, conf):
    import sys
    from pathlib import Path

    app = str(Path(__file__).resolve().parents[2] / "monailabel_app")
    if app not in sys.path:
        sys.path.insert(0, app)
    from lib.configs.classification import load_config

    return load_config(str(tmp_path), {"classes": "no tumour,tumour", "model_dir": str(tmp_path / "m"), **conf})


def test_the_app_config_reads_the_training_settings(tmp_path):
    cfg = _load_config(tmp_path, {})
    assert cfg.train_mode == "head" and cfg.init is None and cfg.retrain_on_label and cfg.score_on_start
    cfg = _load_config(tmp_path, {"train_mode": "full", "init": "imagenet", "retrain_on_label": "false"})
    assert cfg.train_mode == "full" and str(cfg.init) == "imagenet" and not cfg.retrain_on_label
    with pytest.raises(MedClassError, match="no such file"):
        _load_config(tmp_path, {"init": str(tmp_path / "missing.pt")})
    with pytest.raises(MedClassError, match="not a training mode"):
        _load_config(tmp_path, {"train_mode": "fast"})
