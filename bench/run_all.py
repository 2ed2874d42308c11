"""Run every benchmark in ``bench/`` one after another, then write BENCHMARKS.md.

``make bench`` calls this. Each script runs in its own process with its default
settings (the settings BENCHMARKS.md describes), one at a time: two benchmarks
sharing the cores would skew each other's figures. ``--only NAME ...`` runs a
subset (names without ``bench_`` and ``.py``), ``--list`` shows them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts() -> dict[str, Path]:
    """``name -> path`` of every ``bench_*.py`` beside this file."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def main(argv: list[str] | None = None) -> int:
    found = scripts()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(found), help="run only these benchmarks")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(found))
        return 0
    failed = []
    for name in a.only or found:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, str(found[name])], cwd=HERE.parent)
        print(f"== {name}: exit {rc} after {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        if rc:
            failed.append(name)
    subprocess.check_call([sys.executable, str(HERE / "report.py")], cwd=HERE.parent)
    if failed:
        print(f"failed: {', '.join(failed)} (their previous results, if any, are still in the report)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
