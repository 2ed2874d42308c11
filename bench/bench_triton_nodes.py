"""Two DICOM nodes sharing one Triton server under load: is the urgent study served first?

Issue 12's deployment on loopback: two nodes (two sites, each with its own AE title and spool)
send their models' forward passes to one real ``tritonserver`` (the nvidia-pytriton wheel's,
serving ``medclass export --format triton --backend python``; tests/peers.py
:class:`TritonServer`). While ``--load-threads`` other clients keep Triton's queue full of
routine requests (other sites), site 1 receives routine studies and site 2 receives studies
alternately marked STAT (Requested Procedure Priority, which the node sends at Triton's high
priority) and routine. For each of site 2's studies the node's own clock gives the time from
the study becoming stable to its result committed (``classified - stable``): the urgent studies
should wait less for the same work. Then, in backlog rounds, site 2 receives a burst of
routine studies and one STAT study pushed at once (the STAT one started last): the node takes ready STAT studies before routine
ones (``studies.asks_urgent``), so the STAT study should be classified first or second (after the
study already being classified), not last. Triton's own counters over the run show the batching
(requests against model executions).

Usage::

    python bench/bench_triton_nodes.py [--studies 6] [--instances 16] [--load-threads 4]

Result: ``bench/results/triton-nodes.json``. CPU figures: client, nodes and server share the cores.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import torch
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_node_ingest import load_average, wait_for_quiet_machine  # noqa: E402
from bench_node_series import send_series  # noqa: E402
from bench_node_turnaround import checkpoint_for_bench, percentiles  # noqa: E402
from common import write_result  # noqa: E402
from peers import HOST, TritonServer, free_port  # noqa: E402

MODEL = "chest"


def wait_classified(node, study_uid: str, timeout: float = 600) -> dict:
    from dicom_node.jobs import StudyState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.db.state(study_uid) == StudyState.CLASSIFIED:
            return node.db.study(study_uid)
        time.sleep(0.02)
    raise RuntimeError(f"study {study_uid} not classified after {timeout} s: {node.db.study(study_uid)}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=6, help="site 2's studies (half STAT, half routine)")
    ap.add_argument("--instances", type=int, default=16, help="CT instances per study")
    ap.add_argument("--load-threads", type=int, default=6, help="other clients sending routine requests")
    ap.add_argument("--load-batch", type=int, default=32,
                    help="images per load request (32 = the exported max_batch_size: requests queue, not merge)")
    ap.add_argument("--rounds", type=int, default=3, help="backlog rounds: a burst of routine studies, then STAT")
    ap.add_argument("--burst", type=int, default=4, help="routine studies before the STAT one in each round")
    ap.add_argument("--checkpoint")
    ap.add_argument("--smoke", action="store_true", help="check the script: no waiting, no result file")
    ap.add_argument("--max-wait-minutes", type=float, default=15)
    a = ap.parse_args(argv)
    note = None if a.smoke else wait_for_quiet_machine(a.max_wait_minutes)
    load_before = load_average()

    from dicom_node.config import NodeConfig
    from dicom_node.node import DicomNode
    from medclass.export import export_triton
    from medclass.inference import Classifier

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    # A deep copy: pydicom's Dataset.copy() shares the element dict, so the routine template would say STAT
    # too (the runs before this fix sent every study as STAT).
    stat_template = copy.deepcopy(template)
    stat_template.RequestedProcedurePriority = "STAT"
    with tempfile.TemporaryDirectory(prefix="bench-triton-nodes-") as tmp:
        work = Path(tmp)
        ckpt, model_note = checkpoint_for_bench(work, a.checkpoint)
        export_triton(ckpt, work / "repo", MODEL, backend="python", max_batch_size=32)
        with TritonServer(work / "triton", work / "repo") as server:
            url = server.url(MODEL)
            nodes = [DicomNode(NodeConfig(ae_title=f"SITE{i}", port=free_port(), bind=HOST,
                                          data_dir=str(work / f"site{i}"), checkpoint=ckpt, stable_seconds=0.5,
                                          device="cpu", classify_any_modality=True, inference=url,
                                          preprocess_on_arrival=False), poll_seconds=0.05).start()
                     for i in (1, 2)]
            stop = threading.Event()
            load_requests = [0]

            def load() -> None:  # another site's routine traffic, straight to Triton
                clf = Classifier(ckpt, "cpu", inference=url)
                x = torch.rand(a.load_batch, *clf.preprocess(clf.read(get_testdata_file("CT_small.dcm"))).shape)
                while not stop.is_set():
                    clf.forward(x, priority="routine")
                    load_requests[0] += 1

            def site1() -> None:  # site 1's routine studies, one after another
                while not stop.is_set():
                    study, _ = send_series(nodes[0].port, template, a.instances, called="SITE1")
                    wait_classified(nodes[0], study)

            threads = [threading.Thread(target=load, daemon=True) for _ in range(a.load_threads)]
            threads.append(threading.Thread(target=site1, daemon=True))
            rows = {"urgent": [], "routine": []}
            backlog: dict[str, list] = {"stat_position": [], "stat_stable_rank": [], "stat_seconds": [],
                                        "routine_seconds": []}
            try:
                before = server.metrics()
                for t in threads:
                    t.start()
                time.sleep(3)  # the queue fills
                for i in range(a.studies + 1):
                    kind = "urgent" if i % 2 else "routine"
                    study, _ = send_series(nodes[1].port, stat_template if kind == "urgent" else template,
                                           a.instances, called="SITE2")
                    row = wait_classified(nodes[1], study)
                    if i:  # the first loads the model's card and warms the path
                        rows[kind].append(row["classified"] - row["stable"])
                        print(f"site 2, {kind} study: stable -> classified {rows[kind][-1]:.2f} s", flush=True)
                # A backlog at site 2: a burst of routine studies pushed at once (one association each, as a
                # PACS pushes a worklist), the STAT study started last. Taken in stable order the STAT study
                # would be classified last or nearly; the node takes it as soon as it is stable.
                for r in range(a.rounds):
                    sent = [""] * (a.burst + 1)

                    def push(k: int, sent: list[str] = sent) -> None:
                        tpl = stat_template if k == a.burst else template
                        sent[k] = send_series(nodes[1].port, tpl, a.instances, called="SITE2")[0]

                    pushers = [threading.Thread(target=push, args=(k,)) for k in range(a.burst + 1)]
                    for t in pushers:
                        t.start()
                        time.sleep(0.05)  # the STAT study starts last
                    for t in pushers:
                        t.join()
                    done = [wait_classified(nodes[1], u) for u in sent]
                    order = sorted(range(len(done)), key=lambda k: done[k]["classified"])
                    position = order.index(len(done) - 1) + 1
                    backlog["stat_position"].append(position)
                    backlog["stat_seconds"].append(done[-1]["classified"] - done[-1]["stable"])
                    backlog["routine_seconds"] += [d["classified"] - d["stable"] for d in done[:-1]]
                    backlog["stat_stable_rank"].append(
                        sorted(range(len(done)), key=lambda k: done[k]["stable"]).index(len(done) - 1) + 1)
                    print(f"backlog round {r + 1}: the STAT study became stable {backlog['stat_stable_rank'][-1]} "
                          f"of {len(done)} and was classified {position} of {len(done)}, "
                          f"{backlog['stat_seconds'][-1]:.2f} s after stable", flush=True)
                after = server.metrics()
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=120)
                for n in nodes:
                    n.stop()
            import tritonclient.http as httpclient

            meta = httpclient.InferenceServerClient(f"{HOST}:{server.http_port}").get_server_metadata()
    requests = after.get("nv_inference_request_success", 0) - before.get("nv_inference_request_success", 0)
    executions = after.get("nv_inference_exec_count", 0) - before.get("nv_inference_exec_count", 0)
    inferences = after.get("nv_inference_count", 0) - before.get("nv_inference_count", 0)
    urgent, routine = percentiles(rows["urgent"]), percentiles(rows["routine"])
    payload = {
        "benchmark": "triton-nodes",
        "what": f"two nodes (SITE1, SITE2, own spools) and {a.load_threads} other clients on one tritonserver; "
                f"site 2's {a.instances}-instance CT studies alternately STAT and routine while site 1 and the "
                "other clients keep Triton busy; stable -> classified by site 2's clock. Then "
                f"{a.rounds} backlog rounds at site 2: {a.burst} routine studies and one STAT study pushed at once, "
                "the STAT one started last",
        "model": model_note,
        "tritonserver": meta.get("version"),
        "instances_per_study": a.instances,
        "load_threads": a.load_threads,
        "load_batch": a.load_batch,
        "urgent_studies": len(rows["urgent"]),
        "routine_studies": len(rows["routine"]),
        "urgent_seconds": urgent,
        "routine_seconds": routine,
        "urgent_over_routine_p50": round(urgent["p50"] / routine["p50"], 3) if routine["p50"] else None,
        "backlog_rounds": a.rounds,
        "backlog_burst": a.burst,
        "backlog_stat_position": backlog["stat_position"],
        "backlog_stat_stable_rank": backlog["stat_stable_rank"],
        "backlog_stat_seconds": percentiles(backlog["stat_seconds"]),
        "backlog_routine_seconds": percentiles(backlog["routine_seconds"]),
        "triton_requests": requests,
        "triton_executions": executions,
        "triton_inferences": inferences,
        "mean_batch": round(inferences / executions, 2) if executions else None,
        "load_requests": load_requests[0],
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "conditions": note or "no other benchmark of bench/ running",
        "gpu": False,
    }
    print(f"urgent p50 {urgent['p50']:.2f} s, routine p50 {routine['p50']:.2f} s; Triton {requests:.0f} requests "
          f"in {executions:.0f} executions (mean batch {payload['mean_batch']})")
    if not a.smoke:
        write_result("triton-nodes", payload)
    return payload


if __name__ == "__main__":
    main()
