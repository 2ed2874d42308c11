"""Active learning: the scores' maths on tiny synthetic arrays, MC dropout on a small
network with BatchNorm, k-center and the strategies, and the whole scoring pass on
real Br35H images with the session's trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medclass.active import (
    SCORE_METHODS,
    STRATEGIES,
    bald,
    embeddings,
    k_center_greedy,
    mc_dropout_probabilities,
    score_pool,
    select,
    uncertainty,
)
from medclass.checkpoint import LoadedModel, load_checkpoint
from medclass.errors import MedClassError
from medclass.models.registry import ClassifierModule
from medclass.tasks import Task

ENTROPY_LIKE = ("entropy", "margin", "least-confidence")


# --------------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("method", ENTROPY_LIKE)
def test_uniform_is_most_and_one_hot_least_uncertain(method):
    k = 4
    probs = np.array([[0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [1.0, 0, 0, 0]])
    s = uncertainty(probs, method, "multiclass")
    assert s.shape == (k,)
    assert s[0] == pytest.approx(1.0) and s[3] == pytest.approx(0.0)
    assert s[0] >= s[1] and s[1] > s[3] and s[2] > s[1]
    assert ((s >= 0) & (s <= 1)).all()


def test_binary_scores_peak_at_one_half():
    p = np.linspace(0, 1, 11)
    probs = np.stack([1 - p, p], axis=1)
    for method in ENTROPY_LIKE:
        s = uncertainty(probs, method, "binary")
        assert np.argmax(s) == 5 and s[5] == pytest.approx(1.0)
        # Symmetric and decreasing away from 0.5.
        assert np.allclose(s, s[::-1]) and (np.diff(s[:6]) > 0).all()


def test_multilabel_scores_average_the_labels_as_binary():
    probs = np.array([[0.5, 0.5], [0.5, 1.0], [0.0, 1.0]])
    for method in ENTROPY_LIKE:
        s = uncertainty(probs, method, "multilabel")
        assert s == pytest.approx([1.0, 0.5, 0.0])


def test_ordinal_is_scored_on_grade_probabilities():
    probs = np.array([[0.2] * 5, [0.0, 0.0, 1.0, 0.0, 0.0]])
    assert uncertainty(probs, "entropy", "ordinal") == pytest.approx([1.0, 0.0])


def test_uncertainty_rejects_unknown_method_bald_and_nan():
    probs = np.array([[0.5, 0.5]])
    with pytest.raises(MedClassError, match="unknown uncertainty method 'variance'; use one of entropy"):
        uncertainty(probs, "variance", "binary")
    with pytest.raises(MedClassError, match="MC"):
        uncertainty(probs, "bald", "binary")
    with pytest.raises(MedClassError, match="unknown task type"):
        uncertainty(probs, "entropy", "regression")
    with pytest.raises(MedClassError, match="1 image"):
        uncertainty(np.array([[0.5, 0.5], [np.nan, np.nan]]), "entropy", "binary")


# --------------------------------------------------------------------------- BALD


def test_bald_is_zero_when_samples_agree_and_log2_when_confident_ones_disagree():
    agree = np.tile(np.array([[0.5, 0.5], [0.9, 0.1]]), (6, 1, 1))  # (S, N, K)
    assert bald(agree, "binary") == pytest.approx([0.0, 0.0], abs=1e-9)
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]] * 3)
    assert bald(disagree, "binary") == pytest.approx([np.log(2)], abs=1e-6)
    # Same mean prediction, different spread: the one whose samples disagree scores higher.
    mild = np.array([[[0.6, 0.4]], [[0.4, 0.6]]])
    assert 0 < bald(mild, "multiclass")[0] < np.log(2)


def test_bald_multilabel_sums_the_labels():
    one = np.array([[[1.0, 0.2]], [[0.0, 0.2]]])  # label 0 disagrees, label 1 agrees
    two = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # both disagree
    assert bald(one, "multilabel") == pytest.approx([np.log(2)], abs=1e-6)
    assert bald(two, "multilabel") == pytest.approx([2 * np.log(2)], abs=1e-6)


def test_bald_rejects_nan():
    mc = np.full((3, 2, 2), 0.5)
    mc[1, 1, 0] = np.nan
    with pytest.raises(MedClassError, match="1 image"):
        bald(mc, "binary")


# --------------------------------------------------------------------------- MC dropout


class TinyNet(ClassifierModule):
    """Conv + BatchNorm + pooled embedding + (optional) dropout + head."""

    def __init__(self, dropout: float | None = 0.5, fail_after: int | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout) if dropout is not None else nn.Identity()
        self.head = nn.Linear(8, 2)
        self.calls = 0
        self.fail_after = fail_after

    def forward_features(self, x, **extra):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("out of memory")
        return self.dropout(self.body(x))


def _loaded(model, task_type="binary") -> LoadedModel:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 3 + 1)
    model.eval()
    return LoadedModel(model, {"model": {"name": "tiny"}}, Task(task_type, ["a", "b"]), torch.device("cpu"))


def _bn_state(model):
    bn = model.body[1]
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def test_mc_dropout_samples_only_dropout_and_leaves_batchnorm_and_modes_alone():
    loaded = _loaded(TinyNet())
    model = loaded.model
    x = torch.randn(10, 1, 8, 8)
    before = _bn_state(model)
    rng_before = torch.random.get_rng_state()
    mc = mc_dropout_probabilities(loaded, x, samples=6, seed=3, batch_size=4)
    assert mc.shape == (6, 10, 2)
    assert np.allclose(mc.sum(axis=2), 1, atol=1e-5)
    assert mc.std(axis=0).max() > 1e-3  # the dropout masks differ between samples
    mean, var, n = _bn_state(model)
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1]) and n == before[2]
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    # Seeded: the same masks again; another seed, other masks.
    assert np.array_equal(mc, mc_dropout_probabilities(loaded, x, samples=6, seed=3, batch_size=4))
    assert not np.array_equal(mc, mc_dropout_probabilities(loaded, x, samples=6, seed=4, batch_size=4))
    # BatchNorm in eval mode: a sample's probabilities do not depend on the batch they came in.
    assert bald(mc, "binary").min() >= 0 and bald(mc, "binary").max() > 0


class PaddedNet(TinyNet):
    """TinyNet whose embedding is not the dropout's own output: MC dropout must run full passes."""

    def forward_features(self, x, **extra):
        return super().forward_features(x, **extra) + 0.0


def test_mc_dropout_runs_the_body_once_when_dropout_ends_the_features():
    fast = _loaded(TinyNet())
    slow = _loaded(PaddedNet())
    slow.model.load_state_dict(fast.model.state_dict())
    x = torch.randn(10, 1, 8, 8)
    fast.model.calls = slow.model.calls = 0
    a = mc_dropout_probabilities(fast, x, samples=6, seed=5, batch_size=4)
    b = mc_dropout_probabilities(slow, x, samples=6, seed=5, batch_size=4)
    # Same weights, same seed: the same dropout masks whichever way it is computed.
    assert np.allclose(a, b, atol=1e-6)
    assert fast.model.calls == 2 + 3  # the check on the first batch, then once per batch
    assert slow.model.calls == 1 + 3 * 6  # the check, then every sample of every batch


def test_mc_dropout_restores_train_mode_too_and_on_error():
    loaded = _loaded(TinyNet())
    model = loaded.model
    model.calls, model.fail_after = 0, 2  # fail on the third batch of samples
    model.train()
    model.body[1].eval()  # a mixed state must come back exactly as it was
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="out of memory"):
        mc_dropout_probabilities(loaded, torch.randn(4, 1, 8, 8), samples=5)
    assert [m.training for m in model.modules()] == modes


def test_mc_dropout_adds_dropout_on_the_embedding_of_a_model_without_any():
    loaded = _loaded(TinyNet(dropout=None))
    x = torch.randn(8, 1, 8, 8)
    mc = mc_dropout_probabilities(loaded, x, samples=8, seed=0)
    assert mc.shape == (8, 8, 2) and mc.std(axis=0).max() > 1e-3
    assert not any(m.training for m in loaded.model.modules())


def test_bald_and_embeddings_of_a_classic_model():
    from medclass.models import create_model

    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 16, 16)).astype(np.float32)
    x[15:, :, 4:12, 4:12] += 1.0  # a bright square: an easy class
    y = np.array([0] * 15 + [1] * 15)
    clf = create_model("hog-svm", image_size=16).fit(x, y)
    loaded = LoadedModel(clf, {"model": {"name": "hog-svm"}}, Task("binary", ["a", "b"]), torch.device("cpu"))
    with pytest.raises(MedClassError, match="BALD .*needs a torch model; hog-svm is a scikit-learn model"):
        mc_dropout_probabilities(loaded, torch.from_numpy(x))
    with pytest.raises(MedClassError, match="torch model"):
        score_pool(loaded, torch.from_numpy(x), methods=["bald"])
    emb = embeddings(loaded, torch.from_numpy(x))
    assert emb.shape == (30, clf.features(x[:1]).shape[1])
    scores = score_pool(loaded, torch.from_numpy(x), methods=["entropy", "margin"])
    assert set(scores) == {"entropy", "margin", "embedding"} and scores["entropy"].shape == (30,)
    assert set(score_pool(loaded, torch.from_numpy(x), methods="entropy")) == {"entropy", "embedding"}


def test_embeddings_are_the_eval_mode_features():
    loaded = _loaded(TinyNet())
    x = torch.randn(5, 1, 8, 8)
    emb = embeddings(loaded, x, batch_size=2)
    with torch.no_grad():
        expected = loaded.model.body(x).numpy()
    assert emb.shape == (5, 8) and emb.dtype == np.float32
    assert np.allclose(emb, expected, atol=1e-6)


# --------------------------------------------------------------------------- k-center and select


def _two_clusters(n=20, dim=5):
    rng = np.random.default_rng(0)
    near = rng.normal(0, 0.1, (n, dim))
    far = rng.normal(10, 0.1, (n, dim))
    return near, far


def test_k_center_picks_the_far_cluster_first():
    near, far = _two_clusters()
    pool = np.concatenate([near, far])
    labelled = near[:3] + 0.01
    first = k_center_greedy(pool, labelled, 1)
    assert first[0] >= len(near)
    picks = k_center_greedy(pool, labelled, 6)
    assert len(set(picks)) == 6 and picks[0] == first[0]


def test_k_center_cold_start_is_seeded_and_spreads_out():
    near, far = _two_clusters()
    pool = np.concatenate([near, far])
    a = k_center_greedy(pool, None, 2, seed=1)
    assert a == k_center_greedy(pool, np.zeros((0, 5)), 2, seed=1)
    assert (a[0] < 20) != (a[1] < 20)  # one from each cluster
    assert len(set(k_center_greedy(pool, None, 100))) == 40  # never more than the pool, never a duplicate


def test_k_center_never_repeats_duplicates_and_scales():
    pool = np.zeros((10, 3))  # every distance is 0
    picks = k_center_greedy(pool, np.zeros((2, 3)), 10)
    assert sorted(picks) == list(range(10))
    rng = np.random.default_rng(0)
    big = rng.normal(size=(3000, 512)).astype(np.float32)
    picks = k_center_greedy(big, big[:100] + 0.0, 50)
    assert len(set(picks)) == 50 and all(0 <= i < 3000 for i in picks)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_k_distinct_pool_indices(strategy):
    near, far = _two_clusters(30, 4)
    pool = np.concatenate([near, far])
    scores = np.random.default_rng(1).random(len(pool))
    picks = select(strategy, 10, scores=scores, pool_embeddings=pool, labelled_embeddings=near[:2], seed=0)
    assert len(picks) == 10 and len(set(picks)) == 10
    assert all(isinstance(i, int) and 0 <= i < len(pool) for i in picks)
    assert picks == select(strategy, 10, scores=scores, pool_embeddings=pool, labelled_embeddings=near[:2], seed=0)
    # A pool smaller than k gives all of it once.
    assert sorted(select(strategy, 99, scores=scores[:5], pool_embeddings=pool[:5], seed=0)) == [0, 1, 2, 3, 4]


def test_score_strategies_take_the_top_and_break_ties_by_seed():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.9, 0.2])
    assert set(select("entropy", 3, scores=scores)) == {1, 3, 4}
    assert select("margin", 4, scores=scores)[3] == 2
    orders = {tuple(select("bald", 3, scores=scores, seed=s)) for s in range(20)}
    assert len(orders) > 1  # ties are not always broken the same way


def test_coreset_does_not_pick_copies_of_labelled_images():
    near, far = _two_clusters(10, 3)
    labelled = near[:5]
    pool = np.concatenate([labelled, far])  # the first 5 pool items are already labelled images
    picks = select("coreset", 10, pool_embeddings=pool, labelled_embeddings=labelled)
    assert sorted(picks[:10]) == list(range(5, 15))


def test_hybrid_picks_diverse_items_among_the_most_uncertain():
    near, far = _two_clusters(20, 3)
    pool = np.concatenate([near, far])
    scores = np.zeros(40)
    scores[[0, 1, 2, 3, 20, 21, 22, 23]] = 1.0  # uncertain: 4 near, 4 far
    picks = select("hybrid", 2, scores=scores, pool_embeddings=pool, seed=0)
    assert set(picks) <= {0, 1, 2, 3, 20, 21, 22, 23}
    assert (picks[0] < 20) != (picks[1] < 20)  # one from each cluster, not two near-duplicates


def test_select_names_what_is_missing_and_refuses_nan():
    scores = np.array([0.2, np.nan, 0.3])
    with pytest.raises(MedClassError, match="1 of 3 scores are NaN"):
        select("entropy", 1, scores=scores)
    with pytest.raises(MedClassError, match="1 of 3 scores are NaN"):
        select("hybrid", 1, scores=scores, pool_embeddings=np.zeros((3, 2)))
    with pytest.raises(MedClassError, match="'bald' needs scores"):
        select("bald", 1)
    with pytest.raises(MedClassError, match="'coreset' needs pool_embeddings"):
        select("coreset", 1, scores=np.ones(3))
    with pytest.raises(MedClassError, match="'hybrid' needs pool_embeddings"):
        select("hybrid", 1, scores=np.ones(3))
    with pytest.raises(MedClassError, match="pool's size"):
        select("random", 1)
    with pytest.raises(MedClassError, match="unknown active-learning strategy 'greedy'; use one of random"):
        select("greedy", 1, scores=np.ones(3))
    with pytest.raises(MedClassError, match="disagree"):
        select("hybrid", 1, scores=np.ones(3), pool_embeddings=np.zeros((4, 2)))
    assert sorted(select("random", 5, pool_size=5, seed=2)) == [0, 1, 2, 3, 4]
    assert select("random", 0, pool_size=5) == []


# --------------------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def br35h_pool(trained):
    """The trained model and 120 of its held-out Br35H test images, preprocessed its way."""
    from medclass.data import load_dataset, materialize

    loaded = load_checkpoint(trained / "model.pt", "cpu")
    ds = load_dataset("br35h")
    index = {s.key: i for i, s in enumerate(ds.samples)}
    keys = loaded.card["data"]["test_keys"]
    picked = [index[k] for k in keys[:: max(1, len(keys) // 120)][:120]]
    return loaded, materialize(ds, picked, loaded.preprocess_spec)


def test_score_pool_on_real_images(br35h_pool):
    from medclass.inference import forward_probabilities

    loaded, pool = br35h_pool
    model = loaded.model
    reference = forward_probabilities(loaded, pool.x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = score_pool(loaded, pool.x, methods=SCORE_METHODS, mc_samples=6, seed=0)
    n = len(pool)
    assert set(out) == {*SCORE_METHODS, "embedding"}
    for m in SCORE_METHODS:
        assert out[m].shape == (n,) and np.isfinite(out[m]).all() and (out[m] >= 0).all()
    assert out["embedding"].shape == (n, 512)  # resnet18's pooled features
    assert out["bald"].max() > 0
    # The model is untouched: same weights, same BatchNorm statistics, eval mode, same outputs.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training
    assert np.allclose(forward_probabilities(loaded, pool.x), reference, atol=1e-6)
    # Images the model is unsure about (p near 0.5) score higher than those it is sure about.
    distance = np.abs(reference[:, 1] - 0.5)
    near, far = distance < np.quantile(distance, 0.25), distance > np.quantile(distance, 0.75)
    for m in ("entropy", "margin", "least-confidence"):
        assert out[m][near].min() > out[m][far].max(), m
        assert np.corrcoef(out[m], distance)[0, 1] < -0.9
    assert out["bald"][near].mean() > out["bald"][far].mean()
    # And the strategies pick from those images.
    picks = select("entropy", 10, scores=out["entropy"])
    assert distance[picks].max() <= np.sort(distance)[9] + 1e-9
    hybrid = select("hybrid", 10, scores=out["bald"], pool_embeddings=out["embedding"], seed=0)
    coreset = select("coreset", 10, pool_embeddings=out["embedding"], seed=0)
    assert len(set(hybrid)) == 10 and len(set(coreset)) == 10


# --------------------------------------------------------------------------- simulation


def test_stratified_subset_keeps_the_class_balance():
    from medclass.active import stratified_subset

    labels = np.array([0] * 300 + [1] * 100)
    idx = stratified_subset(labels, 40, seed=0)
    assert len(idx) == len(set(idx)) == 40
    assert (labels[idx] == 1).sum() == 10
    assert idx == stratified_subset(labels, 40, seed=0) != stratified_subset(labels, 40, seed=1)
    rare = np.array([0] * 99 + [1])
    assert rare[stratified_subset(rare, 5, 0)].sum() == 1  # every class present


def test_summary_counts_labels_to_the_target_and_compares_with_random():
    from medclass.active import summarize

    def curve(aucs):
        return [{"labels": 40 * (i + 1), "auc": a} for i, a in enumerate(aucs)]

    result = {
        "config": {"target": 0.95}, "pool": 400, "full": {"0": 1.0, "1": 1.0},
        "curves": {
            "random": {"0": curve([0.8, 0.9, 0.94, 0.96]), "1": curve([0.8, 0.9, 0.95, 0.97])},
            "bald": {"0": curve([0.8, 0.96, 0.9, 0.97]), "1": curve([0.8, 0.9, 0.95, 0.97])},
            "coreset": {"0": curve([0.8, 0.9, 0.9, 0.9]), "1": curve([0.8, 0.9, 0.95, 0.97])},
        },
    }
    sm = summarize(result)
    assert sm["target_auc"] == pytest.approx(0.95)
    r, b, c = (sm["strategies"][k] for k in ("random", "bald", "coreset"))
    assert r["per_seed"] == {"0": 160, "1": 120} and r["mean"] == 140 and r["ratio_to_random"] == 1
    assert b["per_seed"] == {"0": 80, "1": 120} and b["mean"] == 100
    assert b["ratio_to_random"] == pytest.approx(100 / 140) and b["pool_fraction"] == pytest.approx(0.25)
    # A seed that never reaches the target leaves the mean undefined, not optimistic.
    assert c["per_seed"]["0"] is None and c["reached"] == 1 and c["mean"] is None and c["ratio_to_random"] is None


def test_al_sim_command_runs_every_strategy_on_br35h(tmp_path, capsys):
    from medclass.cli import main

    out = tmp_path / "al.json"
    # Tiny settings: the command's plumbing is under test here, the figures come from bench/bench_al.py.
    assert main(["al-sim", "--image-size", "16", "--model-arg", "width=4", "--epochs", "1", "--min-steps", "3",
                 "--initial", "10", "--per-round", "10", "--budget", "30", "--seeds", "0",
                 "--strategies", "random,entropy,margin,bald,coreset,hybrid", "--mc-samples", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["pool"] == 2100 and result["test"] == 450
    assert result["config"]["model_args"] == {"width": 4}
    for strategy in ("random", "entropy", "margin", "bald", "coreset", "hybrid"):
        curve = result["curves"][strategy]["0"]
        assert [p["labels"] for p in curve] == [10, 20, 30]
        assert all(0 <= p["auc"] <= 1 for p in curve)
        assert curve[0]["auc"] == result["curves"]["random"]["0"][0]["auc"]  # one shared starting model
    assert set(result["summary"]["strategies"]) == set(result["curves"])
    printed = capsys.readouterr().out
    assert "full-data AUC" in printed and "hybrid" in printed


def test_al_sim_command_reports_bad_settings_on_one_line(tmp_path, capsys):
    from medclass.cli import main

    assert main(["al-sim", "--strategies", "random,greedy", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown strategy 'greedy'" in err
    assert main(["al-sim", "--initial", "50", "--budget", "40", "--out", str(tmp_path / "x.json")]) == 2
    assert "do not make rounds" in capsys.readouterr().err


# --------------------------------------------------------------------------- typiclust (cold start)


def _blobs(n_clusters: int, per: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated clusters (a tiny synthetic array: the selection, not data, is under test)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)) * 20
    x = np.concatenate([c + rng.normal(size=(per, dim)) for c in centers])
    return x, np.repeat(np.arange(n_clusters), per)


def test_typiclust_is_deterministic_and_covers_distinct_clusters():
    from medclass.active import typiclust

    x, cluster = _blobs(6, 30)
    picks = typiclust(x, None, 6, seed=3)
    assert picks == typiclust(x, None, 6, seed=3) == select("typiclust", 6, pool_embeddings=x, seed=3)
    assert sorted(cluster[picks]) == list(range(6))  # one per cluster
    # The pick of a cluster is typical: nearer its cluster's mean than the average member.
    for i in picks:
        members = x[cluster == cluster[i]]
        d = np.linalg.norm(members - members.mean(0), axis=1)
        assert np.linalg.norm(x[i] - members.mean(0)) <= np.median(d)


def test_typiclust_goes_to_the_clusters_nothing_labelled_covers():
    from medclass.active import typiclust

    x, cluster = _blobs(5, 30)
    labelled = x[cluster < 2]  # every image of blobs 0 and 1 is labelled already
    picks = typiclust(x, labelled, 3, seed=0)
    assert len(set(picks)) == 3 and set(cluster[picks]) <= {2, 3, 4}


def test_typiclust_needs_embeddings():
    with pytest.raises(MedClassError, match="pool_embeddings"):
        select("typiclust", 3, scores=np.ones(5))


def test_simulation_on_embeddings_with_a_cold_start():
    from medclass.active import SimulationConfig, simulate_embeddings

    x, cluster = _blobs(4, 40)
    y = cluster % 2
    xt, ct = _blobs(4, 10, seed=0)
    cfg = SimulationConfig(strategies=("random", "typiclust+margin"), seeds=(0, 1), initial=4, per_round=4,
                           budget=20, init="embeddings")
    cfg.check()
    r = simulate_embeddings(cfg, x, y, xt, ct % 2)
    for s in cfg.strategies:
        for curve in r["curves"][s].values():
            assert [p["labels"] for p in curve] == [4, 8, 12, 16, 20]
            assert all(0.0 <= p["auc"] <= 1.0 for p in curve)
    # typiclust's first 4 picks are one per cluster, so both classes are labelled from the start.
    assert r["curves"]["typiclust+margin"]["0"][0]["auc"] == pytest.approx(1.0)
    with pytest.raises(MedClassError, match="unknown strategy"):
        SimulationConfig(strategies=("typiclust+margin",)).check()  # combos need --init


# --------------------------------------------------------------------------- COLD@N+SCORE


def test_cold_until_n_then_score_combos_parse_and_switch():
    from medclass.active import SimulationConfig, parse_combo, simulate_embeddings

    assert parse_combo("margin") == ("margin", None, None)
    assert parse_combo("typiclust+margin") == ("typiclust", None, "margin")
    assert parse_combo("typiclust@30+hybrid") == ("typiclust", 30, "hybrid")
    with pytest.raises(MedClassError, match="number of labels"):
        parse_combo("typiclust@x+margin")
    cfg = SimulationConfig(strategies=("typiclust@8+bogus",), init="embeddings")
    with pytest.raises(MedClassError, match="unknown strategy"):
        cfg.check()
    x, cluster = _blobs(8, 20)
    y = cluster % 2
    xt, ct = _blobs(8, 5, seed=0)
    cfg = SimulationConfig(strategies=("typiclust", "typiclust@8+margin", "typiclust+margin"), seeds=(0,),
                           initial=4, per_round=4, budget=16, init="embeddings")
    cfg.check()
    r = simulate_embeddings(cfg, x, y, xt, ct % 2)
    pure, switched, once = (r["curves"][s]["0"] for s in cfg.strategies)
    assert [p["labels"] for p in switched] == [4, 8, 12, 16]
    # Until 8 labels the switched strategy picks as typiclust does (the same 8 images: the same AUC).
    assert [p["auc"] for p in switched[:2]] == [p["auc"] for p in pure[:2]]
    assert switched[0]["auc"] == once[0]["auc"]
