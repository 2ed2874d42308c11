"""Ingest rate of the medclass DICOM node against dcmtk's storescp and pynetdicom's storescp app.

The same files (``--instances`` copies of pydicom's CT_small.dcm, 39 kB, each with its own
SOP Instance UID, over five studies) are sent by dcmtk ``storescu`` with 1 and 8 concurrent
associations to

- the medclass node (``medclass node``, a subprocess): each instance written, fsync'd,
  renamed, its folder fsync'd and its row committed to SQLite (``synchronous=FULL``) before
  the success status; concurrent associations share folder fsyncs and commits (group commit);
  with its default number of ingest processes (one per core, at most 4) and with one;
- dcmtk ``storescp --fork`` (one process per association), writing to a folder, no fsync;
- pynetdicom's ``storescp`` app (``python -m pynetdicom storescp``), writing to a folder, no fsync.

``TCP_NODELAY=1`` is in the environment of every dcmtk process: without it Debian's dcmtk
waits on Nagle's algorithm and the comparison is meaningless. The servers are the peers of
:mod:`peers` (tests/peers.py), each started fresh for each run; the runs are interleaved (node,
dcmtk, pynetdicom, node, ...) so that a change in the machine's load touches every server
alike. The rate is instances acknowledged per wall-clock second, from starting the
``storescu`` processes to the last one's exit; the median of ``--repeats`` runs is reported.
Every run is checked: every instance must be on the server's disk afterwards.

The node's ``stable_seconds`` is an hour, so that no classification runs during the
measurement (ingest only).

Usage::

    python bench/bench_node_ingest.py [--instances 500] [--repeats 3]
    python bench/bench_node_ingest.py --smoke --instances 40 --repeats 1   # does it run?

Result: ``bench/results/node-ingest.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from dicom_node.config import default_processes

sys.path.insert(0, str(Path(__file__).parent))
# The real peers (Orthanc, dcmtk, the node in a subprocess) are the tests' harness, kept out of the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import write_result  # noqa: E402
from peers import HOST, DcmtkStoreSCP, NodeProcess, PeerProcess, PynetdicomStoreSCP, dcmtk_env  # noqa: E402

SERVERS = ("medclass-node", "medclass-node-noprep", "medclass-node-1proc", "dcmtk-storescp", "pynetdicom-storescp")
OTHER_BENCHMARKS = r"bench_[A-Za-z0-9_]+\.py"  # any other benchmark script of bench/ (not these two)


def other_benchmarks() -> list[str]:
    """``pid command`` of every other benchmark running on the machine (``pgrep -af``)."""
    out = subprocess.run(["pgrep", "-af", OTHER_BENCHMARKS], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if line.split()[0] != str(os.getpid()) and "bench_node_" not in line]


def wait_for_quiet_machine(max_minutes: float = 15, every: float = 30) -> str | None:
    """Wait until no other benchmark runs; return a note when one never stopped."""
    deadline = time.monotonic() + max_minutes * 60
    while True:
        busy = other_benchmarks()
        if not busy:
            return None
        names = sorted({w for line in busy for w in line.split() if w.endswith(".py") and "bench_" in w})
        if time.monotonic() >= deadline:
            note = (f"machine shared with another benchmark ({', '.join(names)} still running after waiting "
                    f"{max_minutes:g} min)")
            print(note, flush=True)
            return note
        print(f"another benchmark is running ({', '.join(names)}); waiting", flush=True)
        time.sleep(every)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_instances(folder: Path, n: int, studies: int = 5) -> list[Path]:
    """``n`` copies of CT_small.dcm with their own UIDs, over ``studies`` studies."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uids = [(pydicom.uid.generate_uid(), pydicom.uid.generate_uid()) for _ in range(studies)]
    out = []
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids[i * studies // n]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        p = folder / f"ct{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def small_checkpoint(folder: Path) -> str:
    """The node needs a model to start; it is never used here (stable_seconds is an hour)."""
    from medclass.paths import quickstart_dir

    if (quickstart_dir() / "model.pt").is_file():
        return str(quickstart_dir() / "model.pt")
    from medclass.training import TrainConfig, train

    return train(TrainConfig(data="chest-pneumonia", model="resnet18", image_size=32, epochs=1, device="cpu",
                             progress=False, out=str(folder / "model"))).checkpoint


class Server:
    """One receiver (a :mod:`peers` (tests/peers.py) peer), started fresh in its own folder."""

    def __init__(self, kind: str, root: Path, checkpoint: str) -> None:
        self.kind = kind
        if kind.startswith("medclass-node"):
            self.data = root / "data"
            # medclass-node: the default number of ingest processes; medclass-node-1proc: one process.
            extra = ["--scp-processes", "1"] if kind == "medclass-node-1proc" else []
            if kind == "medclass-node-noprep":  # without the pool preparing every instance as it arrives
                root.mkdir(parents=True, exist_ok=True)
                (root / "node.toml").write_text("preprocess_on_arrival = false\n")
                extra = ["--config", str(root / "node.toml")]
            self.peer: PeerProcess = NodeProcess(root, ["--checkpoint", checkpoint, "--data-dir", str(self.data),
                                                        "--stable-seconds", "3600", "--device", "cpu",
                                                        "--ae-title", "STORESCP", "--classify-any-modality", *extra])
        elif kind == "dcmtk-storescp":
            self.peer = DcmtkStoreSCP(root, "STORESCP", fork=True)
        elif kind == "pynetdicom-storescp":
            self.peer = PynetdicomStoreSCP(root, "STORESCP")
        else:
            raise ValueError(kind)
        self.peer.start()
        self.port = self.peer.port

    def stored(self) -> int:
        """How many instances reached the receiver's disk (the node: its database)."""
        if isinstance(self.peer, NodeProcess):
            import sqlite3

            with sqlite3.connect(self.data / "node.db") as c:
                return c.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        return len(self.peer.received())

    def stop(self) -> None:
        self.peer.stop(timeout=30)


def send(port: int, files: list[Path], associations: int) -> float:
    """Wall seconds for ``associations`` concurrent storescu processes to send ``files``."""
    batches = [files[k::associations] for k in range(associations)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"BENCH{k}", "-aec", "STORESCP", HOST, str(port),
                               *map(str, batch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env())
             for k, batch in enumerate(batches)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    wall = time.perf_counter() - t0
    for p, out in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {out.decode(errors='replace')[-1000:]}")
    return wall


def run_once(kind: str, files: list[Path], associations: int, root: Path, checkpoint: str) -> float:
    """One fresh server, one send; returns the wall seconds after checking every instance reached its disk."""
    server = Server(kind, root, checkpoint)
    try:
        wall = send(server.port, files, associations)
        stored = server.stored()
        if stored != len(files):
            raise RuntimeError(f"{kind}: {stored} of {len(files)} instances on disk after the run")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return wall


def summarise(kind: str, files: list[Path], associations: int, walls: list[float]) -> dict:
    size = sum(p.stat().st_size for p in files)
    wall = statistics.median(walls)
    row = {"server": kind, "associations": associations, "instances": len(files), "bytes": size,
           "wall_seconds_runs": [round(w, 3) for w in walls], "wall_seconds_median": round(wall, 3),
           "instances_per_second": round(len(files) / wall, 1), "mb_per_second": round(size / wall / 1e6, 2)}
    print(f"{kind:<20} {associations} assoc: {row['instances_per_second']:>7.1f} instances/s  "
          f"{row['mb_per_second']:>6.2f} MB/s  (runs {row['wall_seconds_runs']} s)", flush=True)
    return row


def measure(files: list[Path], associations: int, repeats: int, work: Path, checkpoint: str) -> list[dict]:
    """Every server ``repeats`` times, interleaved (node, dcmtk, pynetdicom, node, ...), so that a change in
    the machine's load during the measurement touches every server alike."""
    walls: dict[str, list[float]] = {kind: [] for kind in SERVERS}
    for r in range(repeats):
        for kind in SERVERS:
            walls[kind].append(run_once(kind, files, associations, work / f"{kind}-{associations}-{r}", checkpoint))
    return [summarise(kind, files, associations, walls[kind]) for kind in SERVERS]


def versions() -> dict:
    import pynetdicom

    dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True).stdout.splitlines()
    import sqlite3

    return {"dcmtk": dcmtk[0].strip("$ ") if dcmtk else None, "pynetdicom": pynetdicom.__version__,
            "pydicom": pydicom.__version__, "sqlite": sqlite3.sqlite_version}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--smoke", action="store_true", help="check the script: no waiting, no result file")
    ap.add_argument("--max-wait-minutes", type=float, default=15,
                    help="wait at most this long for other benchmarks of bench/ to end")
    a = ap.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install dcmtk)")
    note = None if a.smoke else wait_for_quiet_machine(a.max_wait_minutes)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-node-ingest-") as tmp:
        work = Path(tmp)
        checkpoint = small_checkpoint(work)
        files = write_instances(work / "in", a.instances)
        rows = []
        for associations in a.associations:
            rows += measure(files, associations, a.repeats, work, checkpoint)
    rate = {(r["server"], r["associations"]): r["instances_per_second"] for r in rows}
    ratios = {f"node_vs_dcmtk_{k}_associations": round(rate[("medclass-node", k)] / rate[("dcmtk-storescp", k)], 3)
              for k in a.associations}
    payload = {
        "benchmark": "node-ingest",
        "what": "storescu -> receiver on loopback; instances acknowledged per second (median of runs)",
        "file": "pydicom CT_small.dcm (128x128, 16-bit, Explicit VR Little Endian) with new UIDs",
        "servers": {
            "medclass-node": f"medclass node (subprocess) with its default {default_processes()} ingest processes "
                             "sharing the port: write, fsync, rename, fsync dir, SQLite synchronous=FULL "
                             "before success, folder fsyncs and commits shared by concurrent associations (group "
                             "commit); stable_seconds 3600 (no classification during the run); its pool "
                             "(preprocess_on_arrival, dicom_node.prepare) decodes and preprocesses every instance "
                             "as it arrives",
            "medclass-node-noprep": "the same with preprocess_on_arrival = false (no pool)",
            "medclass-node-1proc": "the same with --scp-processes 1 (one process)",
            "dcmtk-storescp": "storescp --fork -od DIR (no fsync)",
            "pynetdicom-storescp": "python -m pynetdicom storescp -od DIR (no fsync)",
        },
        "tcp_nodelay": "TCP_NODELAY=1 in the environment of every process",
        "results": rows,
        **ratios,
        "goal": "node >= 0.5 x dcmtk storescp with 8 associations",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "conditions": note or "no other benchmark of bench/ running",
        "versions": versions(),
    }
    if not a.smoke:
        write_result("node-ingest", payload)
    print({k: v for k, v in payload.items() if k.startswith("node_vs")})
    return payload


if __name__ == "__main__":
    main()
