"""The running node: SCP, assembler, worker and sender wired together."""

from __future__ import annotations

import logging
import threading

from dicom_node.assembler import StudyAssembler
from dicom_node.config import NodeConfig
from dicom_node.metrics import NodeMetrics
from dicom_node.scp import StorageSCP
from dicom_node.sender import OutboxSender
from dicom_node.spool import JobDatabase, Spool
from dicom_node.tls import client_context
from dicom_node.worker import InferenceWorker
from medclass.checkpoint import read_card

log = logging.getLogger("dicom_node")


class DicomNode:
    """A complete node. ``start()`` returns at once; ``stop()`` ends every thread.

    Parameters
    ----------
    config : NodeConfig
    poll_seconds : float
        How often the background threads look for work.
    """

    def __init__(self, config: NodeConfig, poll_seconds: float = 0.2) -> None:
        self.config = config
        self.poll = poll_seconds
        # Fail at start, not at the first study, when a model is missing.
        for ck in {config.checkpoint, *(r.get("checkpoint") for r in config.routes)} - {None}:
            read_card(ck)
        data = config.data_path
        self.db = JobDatabase(data / "node.db")
        self.spool = Spool(data, self.db)
        self.metrics = NodeMetrics()
        self.scp = StorageSCP(config, self.spool, on_stored=self._stored,
                              on_rejected=lambda reason: self.metrics.rejected.labels(reason).inc())
        self.assembler = StudyAssembler(self.db, config.stable_seconds)
        self.worker = InferenceWorker(config, self.db, self.spool, self.metrics)
        # The node's own sends go over TLS as [tls] says (fails here, at start, when a file is unreadable).
        self.sender = OutboxSender(config, self.db, self.spool, self.metrics, ssl_context=client_context(config.tls))
        self._stop = threading.Event()
        self._wake_worker = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics_port: int | None = None

    def _stored(self, modality: str, seconds: float, size: int) -> None:
        self.metrics.instances.labels(modality or "?").inc()
        self.metrics.bytes.inc(size)
        self.metrics.store_seconds.observe(seconds)

    @property
    def port(self) -> int:
        return self.scp.port

    def start(self) -> DicomNode:
        self.assembler.recover()
        self.scp.start()
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_port if self.config.metrics_port > 0 else 0,
                                                   addr=self.config.bind)
            log.info("metrics on http://%s:%d/metrics", self.config.bind, self.metrics_port)
        for name, fn in (("assembler", self._assemble), ("worker", self._work), ("sender", self._send)):
            t = threading.Thread(target=self._loop, args=(name, fn), name=f"medclass-node-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _assemble(self) -> None:
        if self.assembler.poll():
            self._wake_worker.set()

    def _work(self) -> None:
        while not self._stop.is_set() and self.worker.run_once():
            pass
        self._wake_worker.wait(self.poll)
        self._wake_worker.clear()

    def _send(self) -> None:
        self.sender.run_once()

    def _loop(self, name: str, fn) -> None:
        while not self._stop.is_set():
            try:
                fn()
            except Exception:  # a background thread must survive (e.g. the database busy for a moment)
                log.exception("%s: unexpected error; continuing", name)
            if name != "worker":
                self._stop.wait(self.poll)

    def stop(self) -> None:
        self._stop.set()
        self._wake_worker.set()
        self.scp.stop()
        self.spool.close()
        for t in self._threads:
            t.join(timeout=30)
        self.metrics.stop()

    def wait(self) -> None:
        """Block until interrupted."""
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
