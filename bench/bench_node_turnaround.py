"""Turnaround of the medclass DICOM node: from a study becoming stable to its SR stored in Orthanc.

A real Orthanc (Debian's ``Orthanc``, its own config on free loopback ports) is the PACS. The
node runs in this process exactly as ``medclass node`` runs it (same class, same threads:
the worker is woken when a study becomes stable and the sender when a report is queued, with
0.2 s polling only as a fallback), on CPU. One-image studies are sent one at a time; for each, the node's own
clock gives

- ``stable``: when the assembler declared the study complete (``stable_seconds`` after the
  last instance);
- ``classified``: when the worker committed the result and queued the SR;
- ``sent``: when Orthanc answered the SR's C-STORE with success, i.e. the SR is stored.

Turnaround is ``sent - stable``; p50 and p95 over ``--studies`` studies per image kind, after
one warm-up study (the model load). Every SR is looked up in Orthanc through its REST API.

Images: pydicom's CT_small.dcm (128x128) and the pydicom-data CR chest PA RG1_UNCI.dcm
(1955x1841, MONOCHROME1), each study with its own UIDs.

Usage::

    python bench/bench_node_turnaround.py [--studies 20] [--checkpoint model.pt]

Result: ``bench/results/node-turnaround.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).parent))
# The real peers (Orthanc, dcmtk, the node in a subprocess) are the tests' harness, kept out of the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_node_ingest import load_average, wait_for_quiet_machine  # noqa: E402
from common import write_result  # noqa: E402
from peers import HOST, Orthanc, free_port, orthanc_executable  # noqa: E402

IMAGES = {"CT 128x128 (CT_small.dcm)": "CT_small.dcm", "CR chest 1955x1841 (RG1_UNCI.dcm)": "RG1_UNCI.dcm"}


def checkpoint_for_bench(folder: Path, given: str | None) -> tuple[str, str]:
    """The model: ``--checkpoint``, else the quickstart model, else resnet18 at 64 px on the chest X-rays."""
    from medclass.paths import quickstart_dir

    if given:
        return given, "given"
    if (quickstart_dir() / "model.pt").is_file():
        return str(quickstart_dir() / "model.pt"), "quickstart model"
    from medclass.training import TrainConfig, train

    res = train(TrainConfig(data="chest-pneumonia", model="resnet18", image_size=64, epochs=1, device="cpu",
                            progress=False, out=str(folder / "model")))
    return res.checkpoint, "resnet18 at 64 px (the quickstart's architecture and size), 1 epoch on chest-pneumonia"


def send_study(port: int, ds: pydicom.Dataset) -> None:
    from pynetdicom import AE

    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title="MEDCLASS")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    try:
        status = assoc.send_c_store(ds)
        if getattr(status, "Status", None) != 0:
            raise RuntimeError(f"C-STORE failed: {status}")
    finally:
        assoc.release()


def wait_sent(node, study_uid: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = node.db.query("SELECT o.sent, o.path, s.stable, s.classified, s.last_received FROM outbox o "
                             "JOIN studies s USING (study_uid) WHERE o.study_uid=? AND o.kind='sr' "
                             "AND o.state='sent'", (study_uid,))
        if rows:
            return dict(rows[0])
        time.sleep(0.02)
    raise RuntimeError(f"no SR delivered for {study_uid} after {timeout} s")


def percentiles(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "min": round(float(a.min()), 3), "max": round(float(a.max()), 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=20, help="one-image studies per image kind")
    ap.add_argument("--checkpoint")
    ap.add_argument("--stable-seconds", type=float, default=1.0)
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

    with tempfile.TemporaryDirectory(prefix="bench-node-turnaround-") as tmp:
        work = Path(tmp)
        ckpt, model_note = checkpoint_for_bench(work, a.checkpoint)
        model_name = read_card(ckpt)["model"]["name"]
        node_port = free_port()
        pacs = Orthanc(work / "orthanc", {"medclass": ["MEDCLASS", HOST, node_port]}).start()
        node = DicomNode(NodeConfig(port=node_port, bind=HOST, data_dir=str(work / "node"), checkpoint=ckpt,
                                    return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}", stable_seconds=a.stable_seconds,
                                    device="cpu", classify_any_modality=True)).start()  # CT with any model
        results = {}
        try:
            for kind, name in IMAGES.items():
                ds = pydicom.dcmread(get_testdata_file(name))
                runs = []
                for i in range(a.studies + 1):
                    send_study(node.port, ds)
                    row = wait_sent(node, str(ds.StudyInstanceUID))
                    sr_uid = Path(row["path"]).stem
                    if not pacs.lookup(sr_uid):
                        raise RuntimeError(f"SR {sr_uid} is not in Orthanc")
                    if i:  # the first study loads the model
                        runs.append(row)
                turnaround = [r["sent"] - r["stable"] for r in runs]
                results[kind] = {
                    "studies": len(runs),
                    "turnaround_seconds": percentiles(turnaround),
                    "stable_to_classified_seconds": percentiles([r["classified"] - r["stable"] for r in runs]),
                    "classified_to_sr_stored_seconds": percentiles([r["sent"] - r["classified"] for r in runs]),
                    "last_instance_to_sr_stored_seconds": percentiles([r["sent"] - r["last_received"]
                                                                       for r in runs]),
                }
                t = results[kind]["turnaround_seconds"]
                print(f"{kind:<36} turnaround p50 {t['p50']:.3f} s  p95 {t['p95']:.3f} s  (max {t['max']:.3f})",
                      flush=True)
        finally:
            node.stop()
            pacs.stop()
    payload = {
        "benchmark": "node-turnaround",
        "what": "one-image studies sent one at a time; from the study becoming stable to Orthanc's success "
                "status for the SR's C-STORE (the SR stored), by the node's own clock",
        "model": model_note,
        "model_name": model_name,
        "device": "cpu",
        "stable_seconds": a.stable_seconds,
        "node_poll_seconds": 0.2,
        "node_wakeups": "assembler at the next study's stable time, worker when a study is stable, sender when "
                        "a report or forward is queued; poll_seconds is the fallback",
        "orthanc": pacs.version,
        "results": results,
        "goal": "p95 <= 1 s on CPU for a one-image study",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "conditions": note or "no other benchmark of bench/ running",
    }
    if not a.smoke:
        write_result("node-turnaround", payload)
    return payload


if __name__ == "__main__":
    main()
