"""Speed: inference and training images/s per model, file-to-probability versus
model-only, and reading + preprocessing rates, on this machine.

Weights do not change speed, so models are freshly initialised; the
file-to-probability path goes through a real checkpoint and
:class:`medclass.inference.Classifier`, as every front door does.
Run it on an otherwise idle machine. Results: ``bench/results/speed.json``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from medclass.checkpoint import make_card, save_checkpoint  # noqa: E402
from medclass.data import load_dataset, materialize  # noqa: E402
from medclass.inference import Classifier  # noqa: E402
from medclass.models import create_model, list_models, model_info  # noqa: E402
from medclass.tasks import Task  # noqa: E402
from medclass.transforms import DEFAULT_SPEC  # noqa: E402

SIZE = 64
TASK = Task("binary", ["no tumour", "tumour"])


def _rate(fn, n_images: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, n_images / (time.perf_counter() - t0))
    return round(best, 1)


def model_rates(name: str, channels_last: bool) -> dict:
    model = create_model(name, image_size=SIZE).eval()
    x = torch.rand(128, 1, SIZE, SIZE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        infer = _rate(lambda: model(x), len(x))
    model.train()
    opt = torch.optim.AdamW(model.parameters())
    xb, yb = x[:64], torch.randint(0, 2, (64,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train = _rate(step, len(xb), repeats=2)
    return {"model_only_inference": infer, "training": train}


def file_to_probability(name: str, paths: list[str]) -> float:
    spec = {**DEFAULT_SPEC, "image_size": SIZE}
    with tempfile.TemporaryDirectory() as d:
        model = create_model(name, image_size=SIZE)
        args = {"spatial_dims": 2, "in_channels": 1, "num_outputs": 2, "image_size": SIZE}
        ckpt = save_checkpoint(Path(d) / "m.pt", model, make_card(name, args, TASK, spec))
        clf = Classifier(ckpt, "cpu")
        return _rate(lambda: clf.predict_paths(paths), len(paths), repeats=2)


def main() -> None:
    torch.manual_seed(0)
    ds = load_dataset("br35h")
    paths = [s.path for s in ds.samples[::12]][:250]
    rows = []
    for name in list_models():
        info = model_info(name)
        if info.family == "classic" or 2 not in info.spatial_dims:
            continue
        row = {"model": name, "family": info.family, **model_rates(name, False)}
        if info.family == "cnn":
            cl = model_rates(name, True)
            row.update(channels_last_inference=cl["model_only_inference"], channels_last_training=cl["training"])
        row["file_to_probability"] = file_to_probability(name, paths)
        print(row, flush=True)
        rows.append(row)
    spec = {**DEFAULT_SPEC, "image_size": SIZE}
    t0 = time.perf_counter()
    materialize(ds, list(range(len(ds))), spec)
    br35h_rate = len(ds) / (time.perf_counter() - t0)
    mammo = load_dataset("cbis-mammo")
    t0 = time.perf_counter()
    materialize(mammo, list(range(len(mammo))), spec, workers=2)
    mammo_rate = len(mammo) / (time.perf_counter() - t0)
    write_result("speed", {
        "conditions": os.environ.get("BENCH_CONDITIONS", "idle machine"),
        "image_size": SIZE, "batch_inference": 128, "batch_training": 64, "models": rows,
        "preprocess_br35h_images_per_second": round(br35h_rate, 1),
        "preprocess_mammogram_images_per_second": round(mammo_rate, 2),
    })


if __name__ == "__main__":
    main()
