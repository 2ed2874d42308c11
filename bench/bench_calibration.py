"""Calibration, operating points and conformal sets on Br35H, over seeds.

Usage::

    python bench/bench_calibration.py                          # 5 seeds, resnet18 32 px, 2 epochs
    python bench/bench_calibration.py --image-size 64 --epochs 4 --seeds 0 --name calibration-quickstart

For each seed: ``medclass.training.train`` (which fits the temperature, the validation ROC
and the conformal scores at its end), then on the held-out split: ECE before and after
calibration, the sensitivity and specificity of the validation threshold for
"tumour at sensitivity >= 0.95", and the coverage and set sizes of the split-conformal
sets at 0.95 (LAC and APS). Writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

TARGET = 0.95
COVERAGE = 0.95


def run_seed(seed: int, a) -> dict:
    import torch

    from medclass.calibration import card_qhat, operating_point, prediction_set
    from medclass.checkpoint import load_checkpoint
    from medclass.data import load_dataset, materialize
    from medclass.evaluation import select_split
    from medclass.inference import forward_probabilities
    from medclass.metrics import compute_metrics
    from medclass.training import TrainConfig, train

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = train(TrainConfig(data="br35h", model=a.model, image_size=a.image_size, epochs=a.epochs, seed=seed,
                                limit=a.limit, device="cpu", progress=False, out=out))
        train_s = time.perf_counter() - t0
        loaded = load_checkpoint(res.checkpoint, "cpu")
    card = loaded.card
    ds = load_dataset("br35h")
    test = materialize(ds, select_split(card, ds, "test"), loaded.preprocess_spec)
    y = test.y.numpy()
    classes = loaded.task.classes
    raw = forward_probabilities(loaded, test.x, calibrated=False)
    cal = forward_probabilities(loaded, test.x)
    op = operating_point(card, "tumour", "sensitivity", TARGET)
    k = classes.index("tumour")
    fires = cal[:, k] >= op["threshold"]
    pos = y == k
    conformal = {}
    for method in ("lac", "aps"):
        q = card_qhat(card, COVERAGE, method)
        sets = [prediction_set(row, q, method) for row in np.round(cal, 6)]
        sizes = Counter(len(s) for s in sets)
        conformal[method] = {"qhat": q, "coverage": float(np.mean([yi in s for yi, s in zip(y, sets)])),
                             "set_sizes": {str(n): sizes.get(n, 0) for n in range(len(classes) + 1)},
                             "mean_set_size": float(np.mean([len(s) for s in sets]))}
    return {
        "seed": seed, "train_seconds": round(train_s, 1), "n_test": int(len(y)), "n_val": card["data"]["n_val"],
        "method": card["calibration"]["method"], "temperature": card["calibration"]["temperature"],
        "bias": card["calibration"].get("bias"),
        "auc": compute_metrics("binary", y, cal, classes)["auc"],
        "ece_before": compute_metrics("binary", y, raw, classes)["ece"],
        "ece_after": compute_metrics("binary", y, cal, classes)["ece"],
        "val_ece_before": card["calibration"]["val_ece_before"], "val_ece_after": card["calibration"]["val_ece_after"],
        "operating_point": {"target_sensitivity": TARGET, "threshold": op["threshold"],
                            "val_sensitivity": op["val_sensitivity"],
                            "test_sensitivity": float(fires[pos].mean()), "test_specificity": float((~fires[~pos]).mean())},
        "conformal": conformal,
    }


def summarise(runs: list[dict]) -> dict:
    def stat(values):
        v = np.asarray(values, dtype=float)
        return {"mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}

    out = {"ece_before": stat([r["ece_before"] for r in runs]), "ece_after": stat([r["ece_after"] for r in runs]),
           "auc": stat([r["auc"] for r in runs]),
           "test_sensitivity_at_0.95": stat([r["operating_point"]["test_sensitivity"] for r in runs]),
           "test_specificity_at_0.95": stat([r["operating_point"]["test_specificity"] for r in runs]),
           "sensitivity_within_0.03": sum(abs(r["operating_point"]["test_sensitivity"] - TARGET) <= 0.03 for r in runs),
           "ece_after_le_0.02": sum(r["ece_after"] <= 0.02 for r in runs)}
    for m in ("lac", "aps"):
        out[f"{m}_coverage"] = stat([r["conformal"][m]["coverage"] for r in runs])
        out[f"{m}_coverage_ge_target"] = sum(r["conformal"][m]["coverage"] >= COVERAGE for r in runs)
        sizes = Counter()
        for r in runs:
            sizes.update({int(k): v for k, v in r["conformal"][m]["set_sizes"].items()})
        total = sum(sizes.values())
        out[f"{m}_set_size_fraction"] = {str(k): round(sizes[k] / total, 4) for k in sorted(sizes)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, help="train on this many images (the validation and held-out splits stay whole)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="calibration")
    a = p.parse_args(argv)
    runs = []
    for seed in a.seeds:
        r = run_seed(seed, a)
        print(f"seed {seed}: ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f} (T {r['temperature']:.3f}), "
              f"sens@0.95 {r['operating_point']['test_sensitivity']:.3f}, "
              f"LAC coverage {r['conformal']['lac']['coverage']:.3f} sizes {r['conformal']['lac']['set_sizes']}",
              flush=True)
        runs.append(r)
        # Written after every seed: a long run stopped early still leaves its figures.
        summary = summarise(runs)
        write_result(a.name, {"settings": {"data": "br35h", "model": a.model, "image_size": a.image_size,
                                           "epochs": a.epochs, "limit": a.limit, "seeds": [x["seed"] for x in runs],
                                           "target_sensitivity": TARGET, "coverage": COVERAGE},
                              "summary": summary, "runs": runs})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
