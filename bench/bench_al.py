"""Does active learning pay? Simulated annotation on Br35H with every strategy.

Usage::

    python bench/bench_al.py                        # the recorded settings (see SimulationConfig)
    python bench/bench_al.py --seeds 0 --budget 200 # any 'medclass al-sim' flag passes through
    python bench/bench_al.py --plot-only            # redraw the plot from bench/results/al-sim.json

Runs ``medclass al-sim`` (pool = Br35H's training split, held-out = its test split,
all strategies and seeds in one run, the full-data AUC with the same recipe), writes
``bench/results/al-sim.json`` with the machine record and draws
``docs/images/al_curve.png``; ``bench/report.py`` puts both into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "images" / "al_curve.png"
# One torch thread: on the shared 2-core machine, 2 threads contending with other
# processes trained ~5x slower than 1 (measured: 46 vs 223 images/s, load average 6).
DEFAULT_FLAGS = ["--threads", "1"]

STYLE = {"random": ("black", "--"), "entropy": ("tab:blue", "-"), "margin": ("tab:cyan", ":"),
         "least-confidence": ("tab:olive", ":"), "bald": ("tab:red", "-"), "coreset": ("tab:green", "-"),
         "hybrid": ("tab:purple", "-")}


def plot(result: dict, path: Path = PLOT) -> Path:
    """Held-out AUC against labels used: the mean over seeds and the seeds' range per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    summary = result["summary"]
    for strategy, per_seed in result["curves"].items():
        curves = list(per_seed.values())
        n = min(len(c) for c in curves)
        labels = np.array([curves[0][i]["labels"] for i in range(n)])
        auc = np.array([[c[i]["auc"] for i in range(n)] for c in curves])
        color, ls = STYLE.get(strategy, (None, "-"))
        ax.plot(labels, auc.mean(axis=0), ls, color=color, lw=1.8, label=f"{strategy} (mean of {len(curves)})")
        ax.fill_between(labels, auc.min(axis=0), auc.max(axis=0), color=color, alpha=0.12, lw=0)
    ax.axhline(summary["full_auc_mean"], color="grey", lw=1, ls="-.")
    ax.axhline(summary["target_auc"], color="grey", lw=1, ls=":")
    x0 = ax.get_xlim()[0]
    ax.text(x0, summary["full_auc_mean"], f" all {result['pool']:,} labelled: {summary['full_auc_mean']:.3f}",
            va="bottom", fontsize=8, color="dimgrey")
    target = result["config"]["target"]
    ax.text(x0, summary["target_auc"], f" {target:.0%} of it: {summary['target_auc']:.3f}", va="top", fontsize=8,
            color="dimgrey")
    cfg = result["config"]
    ax.set_xlabel("labelled images")
    ax.set_ylabel(f"held-out AUC ({result['test']} test images)")
    ax.set_title(f"Active learning on Br35H: {cfg['model']} at {cfg['image_size']} px, retrained from scratch "
                 f"each round\nlines: mean over seeds; bands: range over seeds", fontsize=9)
    ax.set_ylim(max(0.5, ax.get_ylim()[0]), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")
    return path


def main(argv: list[str]) -> int:
    if argv == ["--plot-only"]:
        plot(json.loads((RESULTS / "al-sim.json").read_text()))
        return 0
    from medclass.cli import main as medclass

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "al-sim.json"
        t0 = time.perf_counter()
        rc = medclass(["al-sim", *DEFAULT_FLAGS, *argv, "--out", str(out)])
        if rc:
            return rc
        result = json.loads(out.read_text())
    result["bench_wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = " ".join(["medclass al-sim", *DEFAULT_FLAGS, *argv])
    result["conditions"] = (f"load average {load_before[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
                            f"(1 min) on {os.cpu_count()} cores shared with other work")
    write_result("al-sim", result)
    plot(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
