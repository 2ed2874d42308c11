"""Features before the first label: self-supervised and ImageNet initialisation on Br35H.

Usage::

    python bench/bench_ssl.py pretrain   # SimCLR on the pool's images (labels unused); resumable
    python bench/bench_ssl.py features   # frozen embeddings of pool and test for each initialisation
    python bench/bench_ssl.py probe      # linear probes and cold-start active learning on them

The pool is Br35H's training split (2,100 images), the held-out set its test split
(450), split by medclass with seed 0, as in ``bench_al.py``. Pretraining sees only the
pool's pixels. Every figure is a frozen-embedding probe (logistic regression on the
standardised embedding), the cheap path that ``medclass al-sim --init`` simulates and
that makes an annotation app's retraining fast. Writes ``bench/results/ssl-*.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench-ssl"
ENCODER_DIR = WORK / "simclr"
FEATURES = WORK / "features.npz"
# Small enough for 2 shared CPU cores: the SSL encoder is cbam-resnet18 at width 16
# (0.7 M parameters) on 32 px images, as bench_al.py's from-scratch simulation uses.
SSL_MODEL, SSL_ARGS, SSL_SIZE = "cbam-resnet18", {"width": 16}, 32
IMAGENET_SIZE = 64
SEEDS = (0, 1, 2, 3, 4)


def pool_manifest() -> Path:
    """A CSV of the pool's images: pretraining reads it as an unlabelled --data form."""
    from medclass.data import load_dataset, split_samples

    ds = load_dataset("br35h")
    splits = split_samples(ds, 0)
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "pool.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i in splits["train"]:
            s = ds.samples[i]
            w.writerow([s.path, ds.task.classes[s.label]])
    return path


def run_pretrain(a) -> None:
    import os

    from medclass.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(a.threads)
    cfg = PretrainConfig(data=str(pool_manifest()), model=SSL_MODEL, model_args=dict(SSL_ARGS), out=str(ENCODER_DIR),
                         image_size=SSL_SIZE, epochs=a.epochs, batch_size=128, max_minutes=a.max_minutes,
                         progress=False)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    res = pretrain(cfg)
    write_result("ssl-pretrain", {"model": SSL_MODEL, "model_args": SSL_ARGS, "image_size": SSL_SIZE,
                                  "images": res.images, "epochs": res.epochs, "epochs_asked": a.epochs,
                                  "images_per_second": res.images_per_second, "threads": a.threads,
                                  "temperature": cfg.temperature, "batch_size": cfg.batch_size,
                                  "wall_seconds_this_call": time.perf_counter() - t0,
                                  "load_average_before": [round(x, 2) for x in load_before],
                                  "load_average_after": [round(x, 2) for x in os.getloadavg()],
                                  "conditions": a.conditions, "history": res.history})


def _embed(model: torch.nn.Module, x: torch.Tensor, batch: int = 128) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model.forward_features(x[i:i + batch]).float().numpy())
    return np.concatenate(out)


def run_features(a) -> None:
    from medclass.data import load_dataset, materialize, split_samples
    from medclass.models import create_model
    from medclass.training import TrainConfig
    from medclass.transfer import load_init

    torch.set_num_threads(a.threads)
    ds = load_dataset("br35h")
    splits = split_samples(ds, 0)
    out: dict[str, np.ndarray] = dict(np.load(FEATURES)) if FEATURES.is_file() else {}
    timing = {}
    prev = RESULTS / "ssl-features.json"
    if prev.is_file():
        timing = json.loads(prev.read_text()).get("timing", {})
    for size in sorted({SSL_SIZE, IMAGENET_SIZE}):
        spec = TrainConfig(data="br35h", image_size=size).preprocess_spec()
        pool, test = materialize(ds, splits["train"], spec), materialize(ds, splits["test"], spec)
        out["pool_y"], out["test_y"] = pool.y.numpy(), test.y.numpy()
        inits = []
        if size == SSL_SIZE:
            inits += [("scratch", SSL_MODEL, SSL_ARGS, None), ("simclr", SSL_MODEL, SSL_ARGS,
                                                               ENCODER_DIR / "encoder.pt")]
        if size == IMAGENET_SIZE:
            inits += [("imagenet", "efficientnet-lite0", {}, "imagenet")]
        for name, model_name, args, init in inits:
            if name not in a.inits:
                continue
            if init is not None and name == "simclr" and not Path(init).is_file():
                print(f"no encoder at {init}: run 'pretrain' first; skipping simclr")
                continue
            torch.manual_seed(0)
            m = create_model(model_name, image_size=size, **args)
            if init is not None:
                load_init(m, init)
            t0 = time.perf_counter()
            out[f"{name}_pool"] = _embed(m, pool.x)
            out[f"{name}_test"] = _embed(m, test.x)
            n = len(pool) + len(test)
            timing[name] = {"images": n, "seconds": time.perf_counter() - t0, "image_size": size,
                            "model": model_name}
            print(name, timing[name], flush=True)
    np.savez(FEATURES, **out)
    write_result("ssl-features", {"timing": timing, "threads": a.threads})


def _ci(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "lo": float(v.mean() - half), "hi": float(v.mean() + half), "n": int(len(v)),
            "values": v.tolist()}


def run_probe(a) -> None:
    from medclass.active import SimulationConfig, probe_auc, simulate_embeddings

    f = np.load(FEATURES)
    pool_y, test_y = f["pool_y"], f["test_y"]
    inits = [n for n in ("scratch", "simclr", "imagenet") if f"{n}_pool" in f and n in a.inits]
    name_out = "ssl-probe" if a.per_round == 10 else f"ssl-probe-r{a.per_round}"
    prev = RESULTS / f"{name_out}.json"
    result: dict = {"inits": json.loads(prev.read_text())["inits"] if prev.is_file() else {}, "seeds": list(SEEDS),
                    "initial": 10, "per_round": a.per_round, "budget": a.budget}
    for name in inits:
        P, T = f[f"{name}_pool"], f[f"{name}_test"]
        full = probe_auc(P, pool_y, T, test_y)
        probe100 = []
        for seed in SEEDS:
            idx = np.random.default_rng(seed).permutation(len(P))[:100]
            probe100.append(probe_auc(P[idx], pool_y[idx], T, test_y))
        sim_cfg = SimulationConfig(strategies=tuple(a.strategies), seeds=SEEDS, initial=10, per_round=a.per_round,
                                   budget=a.budget, init=name)
        t0 = time.perf_counter()
        sim = simulate_embeddings(sim_cfg, P, pool_y, T, test_y)
        entry = {"full_auc": full, "probe_100_random": _ci(probe100), "al": sim["summary"],
                 "curves": sim["curves"], "al_seconds": time.perf_counter() - t0}
        for s, r in sim["summary"]["strategies"].items():
            entry.setdefault("labels_ci", {})[s] = _ci(list(r["per_seed"].values()))
        result["inits"][name] = entry
        print(name, json.dumps({"full": full, "probe100": entry["probe_100_random"]["mean"],
                                "labels": {s: r["mean"] for s, r in sim["summary"]["strategies"].items()}}),
              flush=True)
    write_result(name_out, result)


def run_probe_checks(a) -> None:
    """Is the probe itself the limit? C and an L2 normalisation before standardising, 100 random labels.

    The embedding is the encoder's pooled output (``forward_features``), before SimCLR's
    projection head, which is dropped with the pretraining state. Same draws of 100 pool
    images per seed as the probe stage.
    """
    from medclass.active import probe_auc

    f = np.load(FEATURES)
    pool_y, test_y = f["pool_y"], f["test_y"]
    out: dict = {"seeds": list(SEEDS), "labels": 100, "inits": {}}
    for name in [n for n in ("simclr", "imagenet") if f"{n}_pool" in f and n in a.inits]:
        P, T = f[f"{name}_pool"], f[f"{name}_test"]
        rows = {}
        for norm in ("standardise", "l2+standardise"):
            PP, TT = (P, T) if norm == "standardise" else (
                P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12),
                T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12))
            for c in (0.1, 1.0, 10.0):
                vals = []
                for seed in SEEDS:
                    idx = np.random.default_rng(seed).permutation(len(P))[:100]
                    vals.append(probe_auc(PP[idx], pool_y[idx], TT, test_y, c=c))
                rows[f"{norm}, C={c:g}"] = _ci(vals)
                print(name, norm, c, round(float(np.mean(vals)), 4), flush=True)
        out["inits"][name] = rows
    write_result("ssl-probe-checks", out)


def run_temperature(a) -> None:
    """NT-Xent temperature: short SimCLR runs at each ``--temperatures`` value, probed with 100 labels.

    Each run has its own folder; the probe stage's encoder is untouched. Same recipe as
    ``pretrain`` but ``--epochs`` (short, so the comparison fits a session).
    """
    import os

    from medclass.active import probe_auc
    from medclass.data import load_dataset, materialize, split_samples
    from medclass.models import create_model
    from medclass.pretrain import PretrainConfig, pretrain
    from medclass.training import TrainConfig
    from medclass.transfer import load_init

    torch.set_num_threads(a.threads)
    ds = load_dataset("br35h")
    splits = split_samples(ds, 0)
    spec = TrainConfig(data="br35h", image_size=SSL_SIZE).preprocess_spec()
    pool, test = materialize(ds, splits["train"], spec), materialize(ds, splits["test"], spec)
    prev = RESULTS / "ssl-temperature.json"
    runs = json.loads(prev.read_text())["runs"] if prev.is_file() else {}
    for t in a.temperatures:
        load_before = os.getloadavg()
        enc_dir = WORK / f"simclr-t{t:g}-e{a.epochs}"
        t0 = time.perf_counter()
        res = pretrain(PretrainConfig(data=str(pool_manifest()), model=SSL_MODEL, model_args=dict(SSL_ARGS),
                                      out=str(enc_dir), image_size=SSL_SIZE, epochs=a.epochs, batch_size=128,
                                      temperature=t, max_minutes=a.max_minutes, progress=False))
        m = create_model(SSL_MODEL, image_size=SSL_SIZE, **SSL_ARGS)
        load_init(m, res.encoder)
        P, T = _embed(m, pool.x), _embed(m, test.x)
        py, ty = pool.y.numpy(), test.y.numpy()
        vals = [probe_auc(P[idx], py[idx], T, ty) for idx in
                (np.random.default_rng(seed).permutation(len(P))[:100] for seed in SEEDS)]
        runs[f"{t:g}"] = {"temperature": t, "epochs": res.epochs, "loss_last": res.history[-1]["loss"],
                          "images_per_second": res.images_per_second, "probe_100": _ci(vals),
                          "full_auc": probe_auc(P, py, T, ty), "wall_seconds": round(time.perf_counter() - t0, 1),
                          "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]}
        print(t, runs[f"{t:g}"]["probe_100"]["mean"], runs[f"{t:g}"]["full_auc"], flush=True)
        write_result("ssl-temperature", {"model": SSL_MODEL, "model_args": SSL_ARGS, "image_size": SSL_SIZE,
                                         "threads": a.threads, "runs": runs, "conditions": a.conditions})


def run_finetune(a) -> None:
    """Issue 10's quality goal: fine-tune from a self-supervised encoder against the same schedule from scratch.

    A fresh SimCLR encoder (its own folder, so the probe's encoder and figures stay as they are) is
    pretrained on the pool for ``--pretrain-minutes``; then the whole network is trained on the
    labelled pool at ``--size`` px for at most ``--max-minutes`` from that encoder and, as the
    control, from scratch, with the same recipe and seed; both are scored on the held-out split
    that HOG + SVM's 0.9976 was measured on.
    """
    import os

    from medclass.pretrain import PretrainConfig, pretrain
    from medclass.training import TrainConfig, train

    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    enc_dir = WORK / "simclr-finetune"
    t0 = time.perf_counter()
    pre = pretrain(PretrainConfig(data=str(pool_manifest()), model=SSL_MODEL, model_args=dict(SSL_ARGS),
                                  out=str(enc_dir), image_size=SSL_SIZE, epochs=a.epochs, batch_size=128,
                                  max_minutes=a.pretrain_minutes, progress=False))
    pretrain_seconds = time.perf_counter() - t0
    runs = {}
    for init in ("simclr", "scratch"):
        out = WORK / f"finetune-{init}"
        cfg = TrainConfig(data="br35h", model=SSL_MODEL, out=str(out), image_size=a.size, epochs=a.ft_epochs,
                          batch_size=64, device="cpu", seed=0, progress=False, patience=a.ft_epochs,
                          max_minutes=a.max_minutes, init=str(enc_dir / "encoder.pt") if init == "simclr" else None,
                          model_args={} if init == "simclr" else dict(SSL_ARGS))
        t1 = time.perf_counter()
        m = train(cfg).metrics
        runs[init] = {"auc": m["auc"], "auc_ci": m["ci"]["auc"], "accuracy": m["accuracy"], "n_test": m["n"],
                      "epochs_run": m["training"]["epochs_run"], "train_seconds": m["training"]["train_seconds"],
                      "wall_seconds": round(time.perf_counter() - t1, 1)}
        print(f"{init}: held-out AUC {m['auc']:.4f} after {runs[init]['epochs_run']} epochs "
              f"({runs[init]['wall_seconds'] / 60:.1f} min)", flush=True)
    write_result("ssl-finetune", {"model": SSL_MODEL, "model_args": SSL_ARGS, "pretrain_image_size": SSL_SIZE,
                                  "pretrain_epochs": pre.epochs, "pretrain_images_per_second": pre.images_per_second,
                                  "pretrain_seconds": round(pretrain_seconds, 1), "image_size": a.size,
                                  "max_minutes": a.max_minutes, "epochs_asked": a.ft_epochs, "threads": a.threads,
                                  "runs": runs, "baseline": _classic_baseline(),
                                  "load_average_before": [round(x, 2) for x in load_before],
                                  "load_average_after": [round(x, 2) for x in os.getloadavg()],
                                  "conditions": a.conditions})


def _classic_baseline() -> dict | None:
    """The best HOG + SVM of bench_zoo.py's results (the goal's bar), as measured there."""
    best = None
    for f in RESULTS.glob("zoo-hog-svm-*.json"):
        r = json.loads(f.read_text())
        if best is None or r["auc"] > best["auc"]:
            best = {"model": r["model"], "image_size": r["image_size"], "auc": r["auc"]}
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["pretrain", "features", "probe", "probe-checks", "temperature", "finetune"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-minutes", type=float, default=30)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a CPU others are using too")
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.1, 0.2, 0.5],
                   help="temperature: NT-Xent temperatures to compare")
    p.add_argument("--per-round", type=int, default=10,
                   help="probe: labels per round; other than 10 writes ssl-probe-rN.json, a finer-grained check")
    p.add_argument("--inits", nargs="+", default=["scratch", "simclr", "imagenet"])
    # typiclust@50+hybrid: the switch at 50 labels was chosen on a split of the pool (1,600 / 500),
    # never on the held-out test split; the same for every seed and initialisation.
    p.add_argument("--strategies", nargs="+",
                   default=["random", "margin", "typiclust", "typiclust+margin", "typiclust@50+hybrid"])
    p.add_argument("--pretrain-minutes", type=float, default=8, help="finetune: SimCLR pretraining time")
    p.add_argument("--conditions", default="no other benchmark of bench/ running",
                   help="finetune: what else ran on the machine meanwhile (recorded with the figures)")
    p.add_argument("--size", type=int, default=64, help="finetune: image size of the fine-tune (at most 128)")
    p.add_argument("--ft-epochs", type=int, default=20, help="finetune: epochs at most (--max-minutes bounds them)")
    a = p.parse_args()
    {"pretrain": run_pretrain, "features": run_features, "probe": run_probe, "probe-checks": run_probe_checks,
     "temperature": run_temperature, "finetune": run_finetune}[a.stage](a)
    print("python bench/report.py puts the figures into BENCHMARKS.md")
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
