"""The node's batched inference path against the model alone, in images/s.

A study of ``--images`` CT instances (pydicom's CT_small.dcm with its own UIDs, one
series) is spooled as the node spools it, then classified by the node's own
:class:`dicom_node.worker.InferenceWorker` — read every spooled file, decode and
preprocess it, batched forward passes (``batch_size`` of the node), aggregation, the
TID 1500 SR built and written durably, the outbox committed. That is the batched
path's rate. The model-only rate is the same model's forward passes over the same
images already preprocessed, in the same batch size, on the same device.

The path is measured twice: with the images prepared when the study is stable (read and
preprocess every file then), and with them prepared as they arrived (``preprocess_on_arrival``,
dicom_node.prepare: the cache filled before the study is stable, as the node's pool does while
the instances arrive, so classification reads tensors). On a GPU (``--device cuda``) these are
the figures the node's issue asks for; on a CPU they show how much of the path is the model.

Usage::

    python bench/bench_node_batch.py [--images 512] [--repeats 3] [--device auto|cpu|cuda]
    python bench/bench_node_batch.py --smoke --images 16 --repeats 1

Result: ``bench/results/node-batch.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import pydicom
import torch
from pydicom.data import get_testdata_file

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobDatabase
from dicom_node.metrics import NodeMetrics
from dicom_node.prepare import prepare_instances
from dicom_node.spool import Spool
from dicom_node.worker import InferenceWorker
from medclass.inference import forward_probabilities
from medclass.io import read_dicom_dataset

sys.path.insert(0, str(Path(__file__).parent))
from bench_node_ingest import load_average, small_checkpoint  # noqa: E402
from common import write_result  # noqa: E402


def spool_study(spool: Spool, n: int) -> tuple[str, list[Path]]:
    """``n`` CT instances of one new study and series, stored as the SCP stores them."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        paths.append(spool.store(buf.getvalue(), study_uid=study, series_uid=series, sop_uid=ds.SOPInstanceUID,
                                 sop_class=ds.SOPClassUID, modality="CT", calling_ae="BENCH"))
    return study, paths


def batched_path(worker: InferenceWorker, db: JobDatabase, study: str) -> float:
    """Seconds for the worker to classify the study (it must end ``classified``)."""
    assert study in db.mark_stable(cutoff=time.time(), now=time.time())
    if worker.config.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    assert worker.run_once()
    seconds = time.perf_counter() - t0
    state = db.query("SELECT state, error FROM studies WHERE study_uid=?", (study,))[0]
    if state["state"] != "classified":
        raise RuntimeError(f"the study was not classified: {state['state']} {state['error']}")
    return seconds


def model_only(worker: InferenceWorker, checkpoint: str, paths: list[Path]) -> float:
    """Seconds for the forward passes alone over the preprocessed images (batch size of the node)."""
    clf = worker.model(checkpoint)
    voi = not clf.loaded.preprocess_spec.get("window")
    images = [read_dicom_dataset(pydicom.dcmread(p), apply_voi=voi) for p in paths]
    x = torch.stack([clf.preprocess(im) for im in images])
    extra = clf.extra_inputs([im.meta for im in images])
    forward_probabilities(clf.loaded, x[: worker.config.batch_size], None, batch_size=worker.config.batch_size)
    if clf.loaded.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward_probabilities(clf.loaded, x, extra, batch_size=worker.config.batch_size)
    if clf.loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=NodeConfig.batch_size)
    ap.add_argument("--checkpoint", help="default: the quickstart model (resnet18, 64 px), or a small one trained here")
    ap.add_argument("--smoke", action="store_true", help="check the script: no result file")
    a = ap.parse_args(argv)
    load_before = load_average()  # other work on the machine slows the forward passes most (2 torch threads)
    with tempfile.TemporaryDirectory(prefix="bench-node-batch-") as tmp:
        work = Path(tmp)
        checkpoint = a.checkpoint or small_checkpoint(work)
        # A return_to, so that the path includes queueing the SR in the outbox (nothing sends it here).
        cfg = NodeConfig(data_dir=str(work / "node"), checkpoint=checkpoint, device=a.device,
                         return_to="PACS@127.0.0.1:104",
                         batch_size=a.batch_size, classify_any_modality=True)  # CT with any model
        db = JobDatabase(work / "node" / "node.db")
        spool = Spool(work / "node", db)
        worker = InferenceWorker(cfg, db, spool, NodeMetrics())
        warm, _ = spool_study(spool, min(8, a.images))  # loads the model, warms the device
        batched_path(worker, db, warm)
        path_s, cached_s, model_s = [], [], []
        for _ in range(a.repeats):
            study, paths = spool_study(spool, a.images)
            path_s.append(batched_path(worker, db, study))
            study, paths = spool_study(spool, a.images)
            spool.close()  # commits the instance rows, as the SCP's batches do
            spool = worker.spool = Spool(work / "node", db)
            items = [(i["study_uid"], i["sop_uid"], i["path"]) for i in db.instances(study)]
            prepare_instances(checkpoint, str(worker.cache.root), items)  # what the pool does on arrival
            cached_s.append(batched_path(worker, db, study))
            model_s.append(model_only(worker, checkpoint, paths))
        clf = worker.model(checkpoint)
        spool.close()
    path_rate = a.images / statistics.median(path_s)
    cached_rate = a.images / statistics.median(cached_s)
    model_rate = a.images / statistics.median(model_s)
    device = clf.loaded.device
    payload = {
        "benchmark": "node-batch",
        "what": "a spooled study of CT_small.dcm instances classified by the node's InferenceWorker (read, decode, "
                "preprocess, batched forward, aggregate, SR written, outbox committed) against the forward passes "
                "alone over the same preprocessed images; median of repeats",
        "model": f"{clf.loaded.name} at {clf.card.get('preprocess', {}).get('image_size', '?')} px",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "images": a.images, "batch_size": a.batch_size, "repeats": a.repeats,
        "batched_path_seconds": [round(s, 3) for s in path_s],
        "model_only_seconds": [round(s, 3) for s in model_s],
        "batched_path_images_per_second": round(path_rate, 1),
        "prepared_on_arrival_seconds": [round(s, 3) for s in cached_s],
        "prepared_on_arrival_images_per_second": round(cached_rate, 1),
        "prepared_on_arrival_over_model": round(cached_rate / model_rate, 3),
        "model_only_images_per_second": round(model_rate, 1),
        "path_over_model": round(path_rate / model_rate, 3),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    print(f"{payload['device']}: batched path {path_rate:.1f} images/s ({payload['path_over_model']:.2f} of the "
          f"model's rate), prepared on arrival {cached_rate:.1f} images/s "
          f"({payload['prepared_on_arrival_over_model']:.2f}), model only {model_rate:.1f} images/s", flush=True)
    if not a.smoke:
        write_result("node-batch", payload)
    return payload


if __name__ == "__main__":
    main()
