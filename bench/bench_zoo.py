"""Br35H held-out AUC of every family, training time and images/s.

Usage::

    python bench/bench_zoo.py                       # the default line-up
    python bench/bench_zoo.py resnet18:64:4 hog-svm:64:0

Each entry is ``model:image_size:epochs``. Results go to
``bench/results/zoo-<model>-<size>.json``; ``bench/report.py`` turns them into
BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from medclass.training import TrainConfig, train

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import write_result  # noqa: E402

DEFAULT = [
    "resnet18:64:4",  # the quickstart model
    "hog-svm:64:0",
    "resnet18:128:10",  # the candidate for the best AUC
    "hog-rf:64:0",
    "cnn-gru:64:6",
    "attention-mil:64:6",
    "cbam-resnet18:64:6",
    "vit:64:10",
    "fusion-resnet18:64:4",
    "efficientnet-b0:64:5",
    "densenet121:64:4",
]


def run(entry: str) -> dict:
    name, size, epochs = entry.split(":")
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data="br35h", model=name, out=out, image_size=int(size), epochs=max(1, int(epochs)),
                          batch_size=64, device="auto", seed=0, progress=False, patience=4)
        t0 = time.perf_counter()
        res = train(cfg)
        wall = time.perf_counter() - t0
        m = res.metrics
        tr = m["training"]
        payload = {
            "model": name, "image_size": int(size), "epochs_max": int(epochs), "epochs_run": tr["epochs_run"],
            "auc": m["auc"], "auc_ci": m["ci"]["auc"], "accuracy": m["accuracy"],
            "sensitivity": m["sensitivity"], "specificity": m["specificity"], "f1": m["f1"], "ece": m["ece"],
            "n_test": m["n"], "wall_seconds": round(wall, 1), "train_seconds": tr["train_seconds"],
            "load_seconds": tr["load_seconds"], "train_images_per_second": tr["train_images_per_second"],
            "parameters": tr["parameters"],
        }
        payload.update(_inference_rates(out + "/model.pt"))
    write_result(f"zoo-{name}-{size}", payload)
    print(payload)
    return payload


def _inference_rates(ckpt: str) -> dict:
    """Model-only images/s (preprocessed tensors) and file-to-probability images/s."""
    from medclass.data import load_dataset
    from medclass.inference import Classifier, forward_probabilities

    clf = Classifier(ckpt)
    ds = load_dataset("br35h")
    paths = [s.path for s in ds.samples[::12]][:250]
    clf.predict_paths(paths[:8])  # warm-up
    t0 = time.perf_counter()
    clf.predict_paths(paths)
    file_rate = len(paths) / (time.perf_counter() - t0)
    spec = clf.loaded.preprocess_spec
    x = torch.rand(256, clf.card["model"]["args"]["in_channels"], spec["image_size"], spec["image_size"])
    extra = clf.extra_inputs([{}] * len(x))
    forward_probabilities(clf.loaded, x[:64], extra and {k: v[:64] for k, v in extra.items()})
    t0 = time.perf_counter()
    forward_probabilities(clf.loaded, x, extra)
    model_rate = len(x) / (time.perf_counter() - t0)
    return {"file_to_probability_images_per_second": round(file_rate, 1),
            "model_only_images_per_second": round(model_rate, 1)}


if __name__ == "__main__":
    for e in sys.argv[1:] or DEFAULT:
        run(e)
