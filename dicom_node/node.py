"""The running node: SCP, assembler, worker and sender wired together."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from dicom_node.assembler import StudyAssembler
from dicom_node.config import NodeConfig
from dicom_node.ingest import IngestHelpers
from dicom_node.jobs import JobDatabase
from dicom_node.metrics import NodeMetrics
from dicom_node.prepare import ArrivalPreparer
from dicom_node.scp import StorageSCP
from dicom_node.selector import SeriesSelector
from dicom_node.sender import OutboxSender
from dicom_node.spool import Spool, safe_name
from dicom_node.tls import client_context
from dicom_node.worker import InferenceWorker
from medclass.checkpoint import read_card
from medclass.errors import MedClassError
from medclass.io import use_dicom_decoder

log = logging.getLogger("dicom_node")


class DicomNode:
    """A complete node. ``start()`` returns at once; ``stop()`` ends every thread.

    Parameters
    ----------
    config : NodeConfig
    poll_seconds : float
        The longest the background threads sleep between looks for work. They are woken
        sooner when there is some: the worker when a study becomes stable, the sender when
        the worker has queued a report or a forward, the assembler when the next study is
        due to become stable.
    """

    def __init__(self, config: NodeConfig, poll_seconds: float = 0.2) -> None:
        self.config = config
        self.poll = poll_seconds
        # Fail at start, not at the first study, when a model is missing or the decoder asked for cannot run.
        self.decoder = use_dicom_decoder(config.dicom_decoder)
        for ck in {config.checkpoint, *(r.get("checkpoint") for r in config.routes)} - {None}:
            read_card(ck)
        data = config.data_path
        self.db = JobDatabase(data / "node.db")
        self.spool = Spool(data, self.db)
        self.metrics = NodeMetrics()
        self.processes = config.ingest_processes
        self.scp = StorageSCP(config, self.spool, on_stored=self._stored, on_rejected=self._rejected,
                              reuse_port=self.processes > 1)
        self.helpers: IngestHelpers | None = None
        self.assembler = StudyAssembler(self.db, config.stable_seconds)
        self.worker = InferenceWorker(config, self.db, self.spool, self.metrics)
        self.preparer: ArrivalPreparer | None = None
        if config.preprocess_on_arrival:
            self.preparer = ArrivalPreparer(self.db, SeriesSelector(config.routes, config.checkpoint,
                                                                    config.classify_any_modality),
                                            self.worker.cache, config.preprocess_workers,
                                            decoder=self.decoder)
        # The node's own sends go over TLS as [tls] says (fails here, at start, when a file is unreadable).
        self.sender = OutboxSender(config, self.db, self.spool, self.metrics, ssl_context=client_context(config.tls))
        self._stop = threading.Event()
        # Work queued by one thread wakes the next at once: assembler -> worker -> sender.
        self._wake_worker = threading.Event()
        self._wake_sender = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics_port: int | None = None
        self.desk = None  # dicom_node.desk.DeskServer when web_port is set

    def _stored(self, modality: str, seconds: float, size: int) -> None:
        self.metrics.instances.labels(modality or "?").inc()
        self.metrics.bytes.inc(size)
        self.metrics.store_seconds.observe(seconds)

    def _rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    @property
    def port(self) -> int:
        return self.scp.port

    def start(self) -> DicomNode:
        self.assembler.recover()
        self.scp.start()
        if self.processes > 1:
            # The other processes join the port once the node's own SCP holds it: a port taken by another
            # program fails here, with the node's own one-line error.
            self.helpers = IngestHelpers(self.config, self.scp.port, self.processes - 1, self._stored,
                                         self._rejected)
            try:
                self.helpers.start()
            except Exception:
                self.scp.stop()
                self.helpers.stop()
                raise
        if self.config.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(self.config.metrics_port if self.config.metrics_port > 0
                                                       else 0, addr=self.config.bind)
            except OSError as e:  # the port is taken: one line, and nothing left listening
                self.scp.stop()
                if self.helpers is not None:
                    self.helpers.stop()
                raise MedClassError(f"cannot serve /metrics on {self.config.bind}:{self.config.metrics_port} "
                                    f"({e.strerror or e})", "pass another --metrics-port, or 0 for none") from None
            log.info("metrics on http://%s:%d/metrics", self.config.bind, self.metrics_port)
        if self.config.web_port:
            from dicom_node.desk import DeskServer

            try:
                self.desk = DeskServer(self.config, self.db, on_change=self._desk_changed).start()
            except Exception:
                self.stop()
                raise
            log.info("triage desk on %s", self.desk.url)
        loops = [("assembler", self._assemble, self._stop), ("worker", self._work, self._wake_worker),
                 ("sender", self._send, self._wake_sender)]
        if self.preparer is not None:
            gone = self.worker.cache.discard_except({safe_name(s) for s in self.db.unfinished_studies()})
            if gone:
                log.info("removed the prepared images of %d finished studies", gone)
            self.preparer.start(sorted({self.config.checkpoint, *(r.get("checkpoint") for r in self.config.routes)}
                                       - {None}))
            loops.append(("preparer", self._prepare, self._stop))
        for name, fn, wake in loops:
            t = threading.Thread(target=self._loop, args=(name, fn, wake), name=f"medclass-node-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _desk_changed(self) -> None:
        """An action on the desk queued work: the worker and the sender look now, not at their next poll."""
        self._wake_worker.set()
        self._wake_sender.set()

    def _assemble(self) -> float:
        if self.assembler.poll():
            self._wake_worker.set()
        # Sleep until the next study is due to become stable, checking at least every poll seconds.
        return min(self.poll, self.assembler.seconds_until_next_stable())

    def _work(self) -> float:
        self._wake_worker.clear()  # before looking, so that a study marked ready meanwhile wakes the next wait
        while not self._stop.is_set() and self.worker.run_once():
            self._wake_sender.set()  # a report or forward may be queued: send it now, not at the next poll
        return self.worker.backoff_seconds() or self.poll  # an inference server down: look again after the backoff

    def _prepare(self) -> float:
        # At once again while arrivals keep the pool busy; otherwise at the next poll.
        return 0.01 if self.preparer.poll() else min(self.poll, 0.1)

    def _send(self) -> float:
        self._wake_sender.clear()
        self.sender.run_once()
        return self.poll

    def _loop(self, name: str, fn: Callable[[], float], wake: threading.Event) -> None:
        """Run ``fn`` until the node stops; between runs wait for ``wake`` or for the seconds ``fn`` returned."""
        while not self._stop.is_set():
            try:
                timeout = fn()
            except Exception:  # a background thread must survive (e.g. the database busy for a moment)
                log.exception("%s: unexpected error; continuing", name)
                timeout = self.poll
            wake.wait(max(timeout, 0.001))

    def stop(self) -> None:
        if self.desk is not None:
            self.desk.stop()
        self._stop.set()
        self._wake_worker.set()
        self._wake_sender.set()
        self.scp.stop()
        if self.helpers is not None:
            self.helpers.stop()
        self.spool.close()
        for t in self._threads:
            t.join(timeout=30)
        if self.preparer is not None:
            self.preparer.close()
        self.metrics.stop()

    def wait(self, stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Serve until ``stop_requested()`` is true (looked at every 0.2 s) or the node is stopped; then stop.

        ``stop_requested`` is how a signal handler asks the node to stop: it sets a flag and
        takes no lock, so it cannot deadlock with the thread it interrupts.
        """
        try:
            while not (stop_requested() or self._stop.is_set()):
                time.sleep(0.2)
        finally:
            log.info("stopping")
            self.stop()
            log.info("stopped")
