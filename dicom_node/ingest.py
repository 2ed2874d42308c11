"""More processes accepting associations on the node's port (``scp_processes``).

One Python process runs pynetdicom's association threads under one GIL: on the
benchmark machine it tops out near 240 instances/s with a handler that stores
nothing, however many associations arrive at once. The node therefore runs its
storage SCP in ``scp_processes`` processes: the node's own, plus helpers started
here. All of them listen on the same port (``SO_REUSEPORT``: the kernel hands each
new connection to one of them) and write to the same spool and SQLite database
(WAL), each acknowledging an instance only once it is durable, exactly as the node
does. Assembly, inference and sending stay in the node's process: they read the
database, which every ingest process writes.

A helper reports what it stored and refused to the node (for ``/metrics``) over a
pipe. It ends when the node asks, when the pipe closes, or with the node's process
(``PR_SET_PDEATHSIG``), so that a ``kill -9`` of the node leaves no helper holding the
port. A helper that dies is started again.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Callable

from dicom_node.config import NodeConfig
from medclass.errors import MedClassError

log = logging.getLogger("dicom_node.ingest")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when the node's process ends (even by ``kill -9``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl: the closed pipe still ends the helper
        pass


class _Report:
    """What a helper stored and refused since its last report (sent to the node every ``every`` seconds)."""

    def __init__(self, conn: Connection, every: float = 0.25) -> None:
        self.conn = conn
        self.every = every
        self.lock = threading.Lock()
        self.stored: list[tuple[str, float, int]] = []
        self.rejected: Counter[str] = Counter()

    def on_stored(self, modality: str, seconds: float, size: int) -> None:
        with self.lock:
            self.stored.append((modality, seconds, size))

    def on_rejected(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def flush(self) -> None:
        with self.lock:
            stored, self.stored = self.stored, []
            rejected, self.rejected = dict(self.rejected), Counter()
        if stored or rejected:
            self.conn.send(("metrics", stored, rejected))


def _helper_main(config: NodeConfig, port: int, conn: Connection, log_level: int) -> None:
    """A helper process: the node's storage SCP on the shared port until told to stop."""
    die_with_parent()
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the node stops its helpers in order
    # (they finish the instances in hand), and the kernel ends them if the node itself dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s")
    if log_level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from dicom_node.jobs import JobDatabase
    from dicom_node.scp import StorageSCP
    from dicom_node.spool import Spool

    try:
        db = JobDatabase(config.data_path / "node.db")
        spool = Spool(config.data_path, db, recover=False)  # the node cleaned up at its start; others are writing
        report = _Report(conn)
        scp = StorageSCP(config, spool, on_stored=report.on_stored, on_rejected=report.on_rejected,
                         reuse_port=True, announce=False)
        scp.start(port)
    except Exception as e:  # noqa: BLE001 - reported to the node, which raises it with context
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            if conn.poll(report.every):
                msg = conn.recv()
                if msg == "stop":
                    break
            report.flush()
    except (EOFError, OSError):  # the node is gone
        os._exit(0)
    scp.stop()
    spool.close()  # commit what is waiting
    report.flush()
    conn.send(("stopped", os.getpid()))


def main(argv: list[str] | None = None) -> int:
    """Entry of a helper process: ``python -m dicom_node.ingest FD`` (FD: its end of a socket pair).

    The node sends the configuration, the port and its log level as the first message.
    A subprocess rather than ``multiprocessing``: it never re-imports the program that
    started the node (whatever its ``__main__`` does) and never forks a process running threads.
    """
    fd = int((sys.argv[1:] if argv is None else argv)[0])
    conn = Connection(fd)
    try:
        config, port, level = conn.recv()
    except EOFError:
        return 1
    _helper_main(config, port, conn, level)
    return 0


class IngestHelpers:
    """Start, watch and stop the helper processes of one node.

    Parameters
    ----------
    config : NodeConfig
    port : int
        The port the node's own SCP listens on (with ``SO_REUSEPORT``).
    count : int
        How many helpers (the node's process is one more).
    on_stored, on_rejected : callable
        Called in the node's process with what the helpers report (metrics).
    """

    def __init__(self, config: NodeConfig, port: int, count: int,
                 on_stored: Callable[[str, float, int], None], on_rejected: Callable[[str], None]) -> None:
        self.config = config
        self.port = port
        self.count = count
        self.on_stored = on_stored
        self.on_rejected = on_rejected
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._conns: list[Connection | None] = [None] * count
        self._stopping = threading.Event()
        self._watchers: list[threading.Thread] = []
        self.restarts = 0
        #: Instances the helpers have reported stored (the node's own process counts its own in the metrics).
        self.reported = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def start(self, timeout: float = 60.0) -> IngestHelpers:
        """Start every helper and wait until each listens.

        Raises
        ------
        MedClassError
            A helper could not start (its reason is in the message).
        """
        # Started side by side (each takes about a second to import pynetdicom), then awaited.
        launched = [self._launch() for _ in range(self.count)]
        try:
            for i, (proc, conn) in enumerate(launched):
                self._await_ready(i, proc, conn, timeout)
                self._procs[i], self._conns[i] = proc, conn
        except BaseException:
            for proc, conn in launched:
                self._discard(proc, conn)
            raise
        for i in range(self.count):
            t = threading.Thread(target=self._watch, args=(i,), name=f"medclass-node-ingest{i}", daemon=True)
            t.start()
            self._watchers.append(t)
        log.info("%d ingest processes share port %d (pids %s and the node's)", self.count, self.port,
                 ", ".join(map(str, self.pids)))
        return self

    def _launch(self) -> tuple[subprocess.Popen, Connection]:
        parent, child = multiprocessing.Pipe()  # a socket pair: both ends readable and writable
        proc = subprocess.Popen([sys.executable, "-m", "dicom_node.ingest", str(child.fileno())],
                                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        parent.send((self.config, self.port, logging.getLogger().getEffectiveLevel()))
        return proc, parent

    def _spawn(self, i: int, timeout: float) -> None:
        """Start helper ``i`` (again) and wait until it listens."""
        proc, conn = self._launch()
        try:
            self._await_ready(i, proc, conn, timeout)
        except BaseException:
            self._discard(proc, conn)
            raise
        self._procs[i], self._conns[i] = proc, conn

    @staticmethod
    def _discard(proc: subprocess.Popen, conn: Connection) -> None:
        """End a helper that did not start, and close its pipe."""
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        conn.close()

    @staticmethod
    def _await_ready(i: int, proc: subprocess.Popen, parent: Connection, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not parent.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
                if proc.poll() is not None or time.monotonic() >= deadline:
                    raise MedClassError(f"ingest process {i} did not start (exit code {proc.poll()})",
                                        "run with --scp-processes 1, and report the log above")
                continue
            try:
                kind, *rest = parent.recv()
            except EOFError:
                raise MedClassError(f"ingest process {i} ended at start (exit code {proc.wait(5)})",
                                    "run with --scp-processes 1, and report the log above") from None
            if kind == "ready":
                break
            if kind == "error":
                raise MedClassError(f"ingest process {i} could not start: {rest[0]}",
                                    "run with --scp-processes 1 to see the error in the node itself")

    def _watch(self, i: int) -> None:
        """Apply helper ``i``'s reports; start it again if it dies while the node runs."""
        while True:
            conn = self._conns[i]
            try:
                kind, *rest = conn.recv()
            except (EOFError, OSError):
                if self._stopping.is_set():
                    return
                proc = self._procs[i]
                try:
                    code = proc.wait(5)
                except subprocess.TimeoutExpired:  # its pipe broke but it runs: end it
                    proc.kill()
                    code = proc.wait(5)
                log.error("ingest process %d (pid %s) ended unexpectedly (exit code %s); starting it again", i,
                          proc.pid, code)
                self.restarts += 1
                time.sleep(0.5)
                try:
                    self._spawn(i, 60.0)
                except MedClassError as e:
                    log.error("%s; the node goes on with its other ingest processes", e)
                    return
                continue
            if kind == "metrics":
                stored, rejected = rest
                self.reported += len(stored)
                for modality, seconds, size in stored:
                    self.on_stored(modality, seconds, size)
                for reason, n in rejected.items():
                    for _ in range(n):
                        self.on_rejected(reason)
            elif kind == "stopped":
                return

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every helper to stop (they commit what is waiting), then wait for them.

        A helper still running after ``timeout`` seconds is killed: every instance it
        acknowledged is already durable, and the sender retries what it had not.
        """
        self._stopping.set()
        for conn in self._conns:
            try:
                if conn is not None:
                    conn.send("stop")
            except OSError:  # already gone
                pass
        deadline = time.monotonic() + timeout
        for t in self._watchers:
            t.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("ingest process %d did not stop in %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(5)
        for conn in self._conns:
            if conn is not None:
                conn.close()


if __name__ == "__main__":
    sys.exit(main())
