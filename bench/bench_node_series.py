"""A 500-instance CT series through the medclass DICOM node: study stable -> SR stored in Orthanc.

Issue 12's goal for the node's batched path: a 500-instance CT series classified and its SR stored
within 2 s (p95) of the study becoming stable, on 2 CPU cores. One real Orthanc (Debian's) is the
PACS; the node runs in this process as ``medclass node`` runs it, on CPU. Each study is one series of
``--instances`` copies of pydicom's CT_small.dcm (128x128), each with its own SOP Instance UID, sent in
one association. By the node's own clock:

- ``stable``: the assembler declared the study complete (``stable_seconds`` after its last instance);
- ``classified``: the worker committed the study's result (every instance read, preprocessed and
  classified in batches, aggregated) and queued the SR;
- ``sent``: Orthanc answered the SR's C-STORE with success.

The first study loads the model and is not counted.

Usage::

    python bench/bench_node_series.py [--studies 5] [--instances 500] [--checkpoint model.pt]

Result: ``bench/results/node-series.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_node_ingest import load_average, wait_for_quiet_machine  # noqa: E402
from bench_node_turnaround import checkpoint_for_bench, percentiles, wait_sent  # noqa: E402
from common import write_result  # noqa: E402
from peers import HOST, Orthanc, free_port, orthanc_executable  # noqa: E402


def send_series(port: int, template: pydicom.Dataset, n: int, called: str = "MEDCLASS") -> tuple[str, float]:
    """One study, one series of ``n`` instances in one association; its Study UID and the send time."""
    from pynetdicom import AE

    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(template.SOPClassUID, template.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    t0 = time.monotonic()
    try:
        for i in range(n):
            ds = template.copy()
            ds.file_meta = template.file_meta.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.InstanceNumber = i + 1
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                raise RuntimeError(f"C-STORE of instance {i + 1} failed: {status}")
    finally:
        assoc.release()
    return study, time.monotonic() - t0


def model_only_seconds(checkpoint: str, template: pydicom.Dataset, n: int, repeats: int = 3) -> list[float]:
    """Seconds of the forward passes alone over ``n`` prepared images, as the node's worker runs them
    (its batch size, on the CPU): the part of "stable -> classified" that is the model's."""
    import torch

    from dicom_node.config import NodeConfig
    from medclass.inference import Classifier

    clf = Classifier(checkpoint, "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-node-series-model-") as tmp:
        path = Path(tmp) / "ct.dcm"
        template.save_as(path, enforce_file_format=True)
        tensor, _ = clf.prepare(path)
    x = torch.stack([tensor] * n)  # the series' instances are copies of one image
    clf.forward(x[:NodeConfig.batch_size], None, NodeConfig.batch_size)  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf.forward(x, None, NodeConfig.batch_size)
        out.append(round(time.perf_counter() - t0, 3))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=5, help="series to time (after one warm-up series)")
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--checkpoint")
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    ap.add_argument("--only-cache", action="store_true", help="only the node preparing instances on arrival")
    ap.add_argument("--smoke", action="store_true", help="check the script: no waiting, no result file")
    ap.add_argument("--max-wait-minutes", type=float, default=15,
                    help="wait at most this long for other benchmarks of bench/ to end")
    a = ap.parse_args(argv)
    if orthanc_executable() is None:
        sys.exit("Orthanc is not installed (Debian: apt-get install orthanc)")
    note = None if a.smoke else wait_for_quiet_machine(a.max_wait_minutes)
    load_before = load_average()

    from dicom_node.config import NodeConfig
    from dicom_node.node import DicomNode
    from medclass.checkpoint import read_card

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    modes = {"prepared on arrival": True} if a.only_cache else {"prepared on arrival": True,
                                                                 "prepared when stable": False}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-node-series-") as tmp:
        work = Path(tmp)
        ckpt, model_note = checkpoint_for_bench(work, a.checkpoint)
        card = read_card(ckpt)
        ports = {mode: free_port() for mode in modes}
        pacs = Orthanc(work / "orthanc", {f"medclass{i}": ["MEDCLASS", HOST, p]
                                          for i, p in enumerate(ports.values())}).start()
        try:
            for mode, on_arrival in modes.items():
                node_port = ports[mode]
                node = DicomNode(NodeConfig(port=node_port, bind=HOST, data_dir=str(work / mode.replace(" ", "-")),
                                            checkpoint=ckpt, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}",
                                            stable_seconds=a.stable_seconds, device="cpu",
                                            classify_any_modality=True, preprocess_on_arrival=on_arrival)).start()
                runs, send_seconds = [], []
                try:
                    for i in range(a.studies + 1):
                        study, took = send_series(node.port, template, a.instances)
                        row = wait_sent(node, study, timeout=600)
                        sr_uid = Path(row["path"]).stem
                        if not pacs.lookup(sr_uid):
                            raise RuntimeError(f"SR {sr_uid} is not in Orthanc")
                        if i:
                            runs.append(row)
                            send_seconds.append(took)
                            print(f"{mode}, series {i}: stable -> SR stored {row['sent'] - row['stable']:.2f} s "
                                  f"(classified after {row['classified'] - row['stable']:.2f} s)", flush=True)
                    prepared = {w: node.metrics.images_prepared.labels(w)._value.get() for w in ("arrival", "inline")}
                finally:
                    node.stop()
                turnaround = percentiles([r["sent"] - r["stable"] for r in runs])
                results[mode] = {
                    "studies": len(runs),
                    "turnaround_seconds": turnaround,
                    "stable_to_classified_seconds": percentiles([r["classified"] - r["stable"] for r in runs]),
                    "classified_to_sr_stored_seconds": percentiles([r["sent"] - r["classified"] for r in runs]),
                    "send_seconds": percentiles(send_seconds),
                    "images_prepared": prepared,
                    "met": turnaround["p95"] <= 2.0,
                }
                print(f"{mode}: stable -> SR stored p50 {turnaround['p50']:.2f} s, p95 {turnaround['p95']:.2f} s "
                      f"(goal 2 s: {'met' if turnaround['p95'] <= 2 else 'not met'}); images prepared {prepared}",
                      flush=True)
        finally:
            pacs.stop()
        model_only = model_only_seconds(ckpt, template, a.instances)
    print(f"model only: the forward passes over {a.instances} prepared images take "
          f"{statistics.median(model_only):.2f} s (median of {model_only})", flush=True)
    payload = {
        "benchmark": "node-series",
        "what": f"one study of one {a.instances}-instance CT series (CT_small.dcm 128x128, own UIDs) sent in one "
                "association; from the study becoming stable to Orthanc's success for the SR's C-STORE, "
                "by the node's own clock; the node with and without preparing instances as they arrive",
        "model": model_note,
        "model_name": card["model"]["name"],
        "device": "cpu",
        "instances": a.instances,
        "stable_seconds": a.stable_seconds,
        "results": results,
        "model_only_seconds": model_only,
        "orthanc": pacs.version,
        "goal": "p95 <= 2 s from stable to SR stored for a 500-instance CT series on 2 CPU cores",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "conditions": note or "no other benchmark of bench/ running",
    }
    if not a.smoke:
        write_result("node-series", payload)
    return payload


if __name__ == "__main__":
    main()
