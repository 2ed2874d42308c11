"""Decode and preprocess instances as they arrive, so that a stable study is only a forward pass away.

Reading and preprocessing every spooled file when a study becomes stable is most of the
node's time on a CPU (BENCHMARKS.md, "node-batch"), and on a GPU it would be almost all of
it. The :class:`ArrivalPreparer` follows the job database's instances as the SCP records
them, asks the node's :class:`~dicom_node.selector.SeriesSelector` which model(s) each new
series goes to, and has a bounded pool of processes prepare each instance for each model
(:meth:`medclass.inference.Classifier.prepare`, the same code the worker would run) into
the :class:`PreparedCache`.

The cache is an optimisation, never the record: the spooled files and the job database
are. A cache entry is written to a temporary name and renamed, so it is whole or absent; the
worker recomputes whatever is missing or unreadable (a crash between arrival and
classification, a full pool, a corrupt file), and removes a study's entries once it is done.
Entries are keyed by the model's preprocessing fingerprint, so a model never gets another's
preprocessing.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.jobs import JobDatabase
from dicom_node.selector import SeriesInfo, SeriesSelector
from dicom_node.spool import safe_name

log = logging.getLogger("dicom_node.prepare")


class PreparedCache:
    """Prepared images on disk: ``ROOT/<fingerprint>/<study>/<sop>.prepared``.

    One file per image: a first line naming the format, a JSON line (``dtype``, ``shape`` and
    the image's ``meta``), then the tensor's bytes as they are in memory. A stable 500-image
    series reads 500 of them: as NumPy ``.npz`` archives (a zip of two ``.npy`` files each) that
    was 0.2 s, a tenth of the series' time; these are an open and one read each.

    Parameters
    ----------
    root : str or Path
        The cache folder (the node uses ``DATA_DIR/prepared``).
    """

    #: The file name's ending, and the first line of every file (a format change changes both).
    suffix = ".prepared"
    magic = b"medclass prepared image 1\n"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, fingerprint: str, study_uid: str, sop_uid: str) -> Path:
        return self.root / fingerprint / safe_name(study_uid) / f"{safe_name(sop_uid)}{self.suffix}"

    def has(self, fingerprint: str, study_uid: str, sop_uid: str) -> bool:
        return self.path(fingerprint, study_uid, sop_uid).is_file()

    def store(self, fingerprint: str, study_uid: str, sop_uid: str, tensor: torch.Tensor, meta: dict[str, Any]) -> None:
        """Write one prepared image: whole or not at all (temporary name, then rename)."""
        path = self.path(fingerprint, study_uid, sop_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        array = np.ascontiguousarray(tensor.numpy())
        head = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape), "meta": meta}, default=str)
        with open(tmp, "wb") as f:
            f.write(self.magic + head.encode() + b"\n")
            f.write(array.tobytes())
        os.replace(tmp, path)  # no fsync: after a power cut the worker recomputes what is missing

    def load(self, fingerprint: str, study_uid: str, sop_uid: str) -> tuple[torch.Tensor, dict[str, Any]] | None:
        """The prepared image and its metadata, or ``None`` when absent or unreadable (then recompute it)."""
        path = self.path(fingerprint, study_uid, sop_uid)
        try:
            with open(path, "rb") as f:
                data = bytearray(f.read())  # writable: torch takes the buffer as it is
            if not data.startswith(self.magic):
                raise ValueError("not a prepared image of this version")
            end = data.index(b"\n", len(self.magic))
            head = json.loads(data[len(self.magic):end])
            dtype, shape = np.dtype(head["dtype"]), tuple(head["shape"])
            if len(data) - end - 1 != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"{len(data) - end - 1} bytes of image where {shape} {dtype} needs "
                                 f"{dtype.itemsize * int(np.prod(shape))}")
            array = np.frombuffer(data, dtype, offset=end + 1).reshape(shape)
            return torch.from_numpy(array), head["meta"]
        except FileNotFoundError:
            return None
        except Exception as e:  # a torn or foreign file: the spooled instance is the record, recompute
            log.warning("prepared image %s is unreadable (%s); preparing it again", path, e)
            return None

    def discard_study(self, study_uid: str) -> None:
        """Remove a study's prepared images for every model (after the worker is done with them)."""
        if not self.root.is_dir():
            return
        for fp in self.root.iterdir():
            shutil.rmtree(fp / safe_name(study_uid), ignore_errors=True)

    def discard_except(self, keep: set[str]) -> int:
        """Remove the prepared images of every study not in ``keep`` (safe names); how many studies went.

        At start: what a study left behind when the node stopped between its classification
        and the clean-up.
        """
        removed = 0
        if not self.root.is_dir():
            return 0
        for fp in self.root.iterdir():
            for study in fp.iterdir() if fp.is_dir() else ():
                if study.name not in keep:
                    shutil.rmtree(study, ignore_errors=True)
                    removed += 1
        return removed


# ---------------------------------------------------------------------- the pool's side

_MODELS: dict[str, Any] = {}


def _init_process(node_pid: int, decoder: str = "pydicom") -> None:
    from dicom_node.ingest import die_with_parent

    # A kill -9 of the node takes its pool processes with it, as it takes the ingest processes; a node
    # killed while this process was still starting (before the kernel was told) is noticed here.
    die_with_parent()
    if os.getppid() != node_pid:
        os._exit(0)
    # One thread per pool process: the pool is sized in processes, and the worker's forward
    # passes need the cores too.
    torch.set_num_threads(1)
    # A spawned process starts with pydicom's own decoders: the node's choice is made again here.
    from medclass.io import use_dicom_decoder

    use_dicom_decoder(decoder)


def _model(checkpoint: str):
    from medclass.inference import Classifier

    if checkpoint not in _MODELS:
        _MODELS[checkpoint] = Classifier(checkpoint, device="cpu")
    return _MODELS[checkpoint]


def warm_up(checkpoints: list[str]) -> None:
    """In a pool process: import torch and load the models now, not when the first instance arrives."""
    for ck in checkpoints:
        _model(ck)


def prepare_instances(checkpoint: str, cache_root: str, items: list[tuple[str, str, str]]) -> int:
    """In a pool process: prepare ``(study_uid, sop_uid, path)`` items for one model; how many were stored.

    A file that cannot be prepared is left out.
    """
    clf = _model(checkpoint)
    cache, fp, done = PreparedCache(cache_root), clf.preprocess_fingerprint, 0
    for study_uid, sop_uid, path in items:
        if cache.has(fp, study_uid, sop_uid):
            continue
        item = clf.try_prepare(path)
        if isinstance(item, str):  # the worker meets it again and quarantines it with this reason
            continue
        cache.store(fp, study_uid, sop_uid, *item)
        done += 1
    return done


# ---------------------------------------------------------------------- the node's side


def default_workers() -> int:
    """Pool processes by default: half the cores (at least one), at most four; the other half classifies."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


class ArrivalPreparer:
    """Follow arriving instances and prepare each for the model(s) its series goes to.

    Parameters
    ----------
    db : JobDatabase
    selector : SeriesSelector
        The node's routing of series to models (a copy: its ``skipped`` is not shared).
    cache : PreparedCache
    workers : int
        Pool processes; 0: :func:`default_workers`.
    chunk : int
        Instances per task sent to the pool.
    """

    def __init__(self, db: JobDatabase, selector: SeriesSelector, cache: PreparedCache, workers: int = 0,
                 chunk: int = 16, decoder: str = "pydicom") -> None:
        self.db, self.selector, self.cache = db, selector, cache
        self.decoder = decoder
        self.workers = workers or default_workers()
        self.chunk = chunk
        self.row = db.unfinished_instances_row()  # after a restart: what is still waiting, again
        self._series: OrderedDict[str, list[str]] = OrderedDict()  # series UID -> checkpoints (bounded)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: list[Future] = []
        self._warming: list[Future] = []

    def _checkpoints(self, series_uid: str, path: str) -> list[str]:
        """The model(s) for a series, from its first instance's header (read once per series)."""
        if series_uid not in self._series:
            import pydicom

            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                self._series[series_uid] = list(self.selector.plan([SeriesInfo.from_dataset(ds)]))
            except Exception:  # noqa: BLE001 - the worker decides and reports; the cache only helps
                self._series[series_uid] = []
            while len(self._series) > 4096:
                self._series.popitem(last=False)
        return self._series[series_uid]

    def poll(self) -> int:
        """Send what arrived since the last call to the pool; how many instances were sent.

        At most ``4 × workers`` tasks are queued: a burst of arrivals waits in the database,
        not in memory, and the worker prepares inline whatever the pool did not reach.
        """
        self._pending = [f for f in self._pending if not f.done()]
        room = 4 * self.workers - len(self._pending)
        if room <= 0:
            return 0
        rows = self.db.instances_since(self.row, limit=room * self.chunk)
        if not rows:
            return 0
        by_model: dict[str, list[tuple[str, str, str]]] = {}
        for r in rows:
            for ck in self._checkpoints(r["series_uid"], r["path"]):
                by_model.setdefault(ck, []).append((r["study_uid"], r["sop_uid"], r["path"]))
        self.start()
        for ck, items in by_model.items():
            for i in range(0, len(items), self.chunk):
                self._pending.append(self._pool.submit(prepare_instances, ck, str(self.cache.root),
                                                       items[i:i + self.chunk]))
        self.row = rows[-1]["row"]
        return len(rows)

    def start(self, checkpoints: list[str] | None = None) -> None:
        """Start the pool; with ``checkpoints``, have every process load them now (a warm pool).

        A process starts in seconds (it imports torch and loads the model): started with the
        node, the pool is ready before the first study arrives.
        """
        if self._pool is None:
            # spawn, not fork: the node holds threads, SQLite connections and sockets a fork would copy.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_process, initargs=(os.getpid(), self.decoder))
            if checkpoints:
                self._warming = [self._pool.submit(warm_up, list(checkpoints)) for _ in range(self.workers)]

    def warm(self) -> bool:
        """Whether the warm-up asked by :meth:`start` has ended (``True`` when none was asked)."""
        return all(f.done() for f in self._warming)

    def idle(self) -> bool:
        """Whether every task sent to the pool has ended."""
        return all(f.done() for f in self._pending)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
