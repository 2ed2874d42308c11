"""``medclass al-sim``: simulated annotation on a labelled set, to measure whether a strategy pays."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medclass.active.scores import SCORE_METHODS, embeddings, score_pool, uncertainty
from medclass.active.selection import COLD_START, STRATEGIES, select
from medclass.checkpoint import LoadedModel
from medclass.errors import MedClassError

log = logging.getLogger("medclass.active")

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
            extra = ("; with --init also COLD+SCORE or COLD@N+SCORE, e.g. typiclust+margin, typiclust@50+hybrid"
                     if self.init else "")
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
    try:
        first, until, then = parse_combo(name)
    except MedClassError:
        return False
    return cold_start_combos and then is not None and first in COLD_START and then in STRATEGIES


def parse_combo(name: str) -> tuple[str, int | None, str | None]:
    """``COLD[@N]+SCORE`` as ``(COLD, N, SCORE)``; a plain strategy as ``(name, None, None)``.

    ``typiclust+margin``: the cold-start strategy picks the first labelled set only.
    ``typiclust@50+margin``: it picks every round until 50 images are labelled, the score
    after that. Low budgets favour typical, diverse picks and higher ones uncertain picks
    (Hacohen et al. 2022, "Active learning on a budget"), so the switch is a label count.
    """
    first, plus, then = name.partition("+")
    if not plus:
        return name, None, None
    cold, at, n = first.partition("@")
    if not at:
        return cold, None, then
    if not n.isdigit() or int(n) <= 0:
        raise MedClassError(f"strategy {name!r}: {n!r} after '@' is not a number of labels",
                            "write COLD@N+SCORE, e.g. typiclust@50+margin")
    return cold, int(n), then


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
    cold-start strategy, the rounds after by a score; ``COLD@N+SCORE`` (e.g.
    ``typiclust@50+margin``): the cold-start strategy every round until ``N`` images are
    labelled, the score after that (:func:`parse_combo`). A plain strategy picks the initial
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
            first, until, then = parse_combo(strategy)
            until = until or cfg.initial
            t0 = time.perf_counter()
            labelled = pick(first, None, [], cfg.initial, seed * 1000)
            model, auc = fit_and_auc(labelled)
            curve = [{"labels": len(labelled), "auc": auc, "select_s": time.perf_counter() - t0}]
            rnd = 0
            while len(labelled) < cfg.budget:
                rnd += 1
                t0 = time.perf_counter()
                now = strategy if then is None else first if len(labelled) < until else then
                picks = pick(now, model, labelled, min(cfg.per_round, cfg.budget - len(labelled)), seed * 1000 + rnd)
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
