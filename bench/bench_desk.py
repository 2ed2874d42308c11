"""The triage desk's response time while the node ingests a load.

``medclass node --web-port`` (a subprocess, its default ingest processes, ``stable_seconds`` 2 so
that the worker classifies and the sender queues while the load goes on) receives 8 concurrent
``storescu`` associations of 100 CT instances each (pydicom's CT_small.dcm with new UIDs, over
8 studies). A logged-in client asks, one request after another, for the worklist page, its JSON
rows (what the page polls) and a study page, from the start of the load until the last study is
classified; the same requests on the idle node first give the baseline. Each request's wall time
is measured at the client (loopback, keep-alive).

Goal (issue 14): page p95 <= 300 ms during the load.

Result: ``bench/results/desk.json``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_node_ingest import (  # noqa: E402
    load_average,
    other_benchmarks,
    send,
    small_checkpoint,
    versions,
    wait_for_quiet_machine,
    write_instances,
)
from common import write_result  # noqa: E402
from peers import NodeProcess, free_port  # noqa: E402  (tests/peers.py, put on the path by bench_node_ingest)

from dicom_node.desk.auth import hash_password  # noqa: E402

PAGES = {"worklist": "/", "worklist-json": "/api/studies", "study": "/studies/1"}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summary(times: dict[str, list[float]]) -> dict:
    return {page: {"requests": len(t), "p50_ms": round(1000 * statistics.median(t), 1),
                   "p95_ms": round(1000 * percentile(t, 0.95), 1), "max_ms": round(1000 * max(t), 1)}
            for page, t in times.items() if t}


def hammer(client: httpx.Client, until: threading.Event | float) -> dict[str, list[float]]:
    """Ask for each page in turn until ``until`` is set (or that many seconds have passed)."""
    times: dict[str, list[float]] = {p: [] for p in PAGES}
    deadline = time.monotonic() + until if isinstance(until, float) else None
    while not (until.is_set() if isinstance(until, threading.Event) else time.monotonic() >= deadline):
        for page, path in PAGES.items():
            t0 = time.perf_counter()
            r = client.get(path)
            times[page].append(time.perf_counter() - t0)
            if r.status_code not in (200, 404):  # 404: study 1 not there yet
                raise RuntimeError(f"{path}: HTTP {r.status_code}")
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=800)
    ap.add_argument("--associations", type=int, default=8)
    ap.add_argument("--baseline-seconds", type=float, default=10.0)
    ap.add_argument("--smoke", action="store_true", help="check the script: no waiting, no result file")
    ap.add_argument("--max-wait-minutes", type=float, default=15,
                    help="wait at most this long for other benchmarks of bench/ to end")
    a = ap.parse_args(argv)
    if shutil.which("storescu") is None:
        sys.exit("storescu is not installed (Debian: apt-get install dcmtk)")
    note = None
    if not a.smoke:
        wait_for_quiet_machine(a.max_wait_minutes, every=10)
        # Named again here, leaving this script's own processes (its timeout/nice wrappers) out.
        busy = sorted({w for line in other_benchmarks() if "bench_desk" not in line
                       for w in line.split() if w.endswith(".py") and "bench_" in w})
        note = f"machine shared with other benchmarks running meanwhile ({', '.join(busy)})" if busy else None
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-desk-") as tmp:
        work = Path(tmp)
        checkpoint = small_checkpoint(work)
        files = write_instances(work / "in", a.instances, studies=a.associations)
        web = free_port()
        toml = work / "node.toml"
        toml.write_text(f'[[users]]\nname = "bench"\nrole = "admin"\npassword_hash = "{hash_password("bench pw")}"\n')
        node = NodeProcess(work / "node", ["--config", str(toml), "--checkpoint", checkpoint, "--data-dir",
                                           str(work / "data"), "--stable-seconds", "2", "--device", "cpu",
                                           "--ae-title", "STORESCP", "--web-port", str(web)]).start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{web}", timeout=60) as client:
                token = re.search(r'name="login_token" value="([^"]+)"', client.get("/login").text)[1]
                r = client.post("/login", data={"username": "bench", "password": "bench pw", "login_token": token})
                assert r.status_code == 303, r.text
                idle = hammer(client, a.baseline_seconds)
                done = threading.Event()
                result: dict[str, dict[str, list[float]]] = {}
                t = threading.Thread(target=lambda: result.update(load=hammer(client, done)))
                t.start()
                t0 = time.perf_counter()
                wall = send(node.port, files, a.associations)
                # Until every study is classified: the worker and the sender are part of the load.
                while True:
                    rows = client.get("/api/studies").json()["studies"]
                    if len(rows) == a.associations and all(s["state"] == "classified" for s in rows):
                        break
                    time.sleep(0.5)
                loaded_seconds = time.perf_counter() - t0
                done.set()
                t.join()
        finally:
            node.stop(timeout=30)
    load = summary(result["load"])
    worst_p95 = max(v["p95_ms"] for v in load.values())
    payload = {
        "benchmark": "desk",
        "what": "desk pages' client-side wall time (loopback, keep-alive, one request at a time) while the node "
                f"ingests {a.associations} x {a.instances // a.associations} CT instances and classifies them",
        "pages": PAGES,
        "idle": summary(idle),
        "under_load": load,
        "load_seconds": round(loaded_seconds, 1),
        "ingest_seconds": round(wall, 1),
        "worst_p95_ms": worst_p95,
        "goal": "page p95 <= 300 ms during the load",
        "goal_met": worst_p95 <= 300,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "conditions": note or "no other benchmark of bench/ running",
        "versions": versions(),
    }
    if not a.smoke:
        write_result("desk", payload)
    print({"idle": payload["idle"], "under_load": load, "goal_met": payload["goal_met"]})
    return payload


if __name__ == "__main__":
    main()
