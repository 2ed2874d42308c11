"""The durable instance store: the spool and quarantine folders, written with fsync.

An instance is acknowledged (C-STORE status 0x0000) only after its bytes are on
disk and its row is committed in SQLite: the bytes go to a temporary file, which
is fsync'd and renamed into place (atomic on POSIX); then the folder is fsync'd
and the row committed with ``synchronous=FULL``. A ``kill -9`` or power cut after
the acknowledgement loses nothing; one before it leaves at most a ``.part`` file
(removed at the next start) or a file without its row (overwritten when the
sender retries).

Group commit: the association threads write and fsync their files concurrently
(the kernel folds concurrent fsyncs into one journal commit), then hand the rest
to one committer thread (:class:`GroupCommitter`), which fsyncs each folder of
the waiting instances once, commits all their rows in one SQLite transaction
(one WAL fsync) and only then releases every waiting association thread. Under
load, one folder fsync and one database commit serve a whole batch instead of
one instance; alone, an instance costs what it did before.

This module keeps the files (spool and quarantine folders); the rows are the job
database's (:mod:`dicom_node.jobs`). The group committer stays here because it is
part of making a *file* durable (the folder fsyncs and the row commit are one step
for the association threads), but it writes the rows through
:meth:`dicom_node.jobs.JobDatabase.record_instances`, the only place that knows the
tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dicom_node.jobs import JobDatabase

log = logging.getLogger("dicom_node.spool")

_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")

def safe_name(uid: str) -> str:
    """A file-name-safe form of a UID (a hash when the UID is malformed)."""
    uid = str(uid).strip().rstrip("\0")
    return uid if _UID_RE.match(uid) else "x" + hashlib.sha1(uid.encode()).hexdigest()


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that the entries created or renamed in it survive a power cut."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_dirs(folder: Path) -> set[Path]:
    """Create ``folder`` and its missing parents; return the folders whose entries changed.

    Those folders (the parents of every folder created) need an fsync before a file
    inside the new folders counts as durable.
    """
    created: list[Path] = []
    d = folder
    while not d.is_dir():
        created.append(d)
        d = d.parent
    for c in reversed(created):
        try:
            c.mkdir()
        except FileExistsError:  # another association thread made it first; it fsyncs the parent too
            pass
    return {c.parent for c in created}


def write_file(path: Path, data: bytes | Sequence[bytes], root: Path | None = None,
               durable: set[str] | frozenset[str] = frozenset()) -> set[Path]:
    """Write ``data`` (bytes, or pieces written in order) to ``path``: temporary file, fsync, atomic rename.

    The file's bytes are durable when this returns; its name is once the returned
    folders are fsync'd: its own folder, and the parent of every folder above it that
    is not known to be durable, up to ``root`` (a folder is durable once its parent has
    been fsync'd since it was created; ``durable`` holds those known, as strings). Without ``root``,
    the parents of the folders created here. Walking up to ``root`` matters when threads
    write side by side: a folder another thread has just created may not be durable yet.
    """
    dirty = make_dirs(path.parent) | {path.parent}
    if root is not None:
        d = path.parent
        while d != root and str(d) not in durable and root in d.parents:
            dirty.add(d.parent)
            d = d.parent
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        views = [memoryview(b) for b in pieces if len(b)]
        while views:
            n = os.writev(fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dirty


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it survives a crash once this returns.

    Temporary file in the same folder, fsync, atomic rename, fsync of the folder
    (without the last step the rename itself may be lost on power failure).
    """
    for d in write_file(path, data):
        fsync_dir(d)


@dataclass
class PendingInstance:
    """One instance whose file is written and fsync'd, waiting for its folder fsync and its row."""

    row: tuple[Any, ...]  # the instances row without ``received``
    study_uid: str
    dirs: set[Path]  # to fsync before the row is committed
    folders: tuple[str, ...] = ()  # durable once this instance is (its series and study folders)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class GroupCommitter:
    """Makes the instances of concurrent associations durable together, in one committer thread.

    :meth:`submit` blocks until the instance's folder is fsync'd and its row committed
    (or raises what prevented it). The committer thread takes every instance waiting at
    that moment, fsyncs their folders once each, inserts their rows and updates their
    studies in one transaction, and wakes their submitters. An instance that arrives
    while nothing is being committed or waiting (one association alone) is committed
    by its own thread, which saves two thread switches; whatever arrives meanwhile
    queues for the committer thread. One commit runs at a time.

    Parameters
    ----------
    db : JobDatabase
    max_batch : int
        At most this many instances per transaction.
    """

    def __init__(self, db: JobDatabase, max_batch: int = 512) -> None:
        self.db = db
        self.max_batch = max_batch
        #: Folders whose entries are known to be on disk (their parent fsync'd since they were made).
        self.durable_dirs: set[str] = set()
        self._cond = threading.Condition()
        self._queue: list[PendingInstance] = []
        self._busy = False  # a commit is running (in the committer thread or inline)
        self._closing = False
        self.batches = 0
        self.committed = 0
        self._thread = threading.Thread(target=self._run, name="medclass-node-committer", daemon=True)
        self._thread.start()

    def submit(self, item: PendingInstance) -> None:
        """Commit one instance, with whatever else is waiting; return once it is durable.

        Raises
        ------
        OSError
            A folder fsync failed (disk full, I/O error).
        sqlite3.Error
            The database refused the row.
        """
        with self._cond:
            # Alone, closed (the node is stopping) or without a committer thread: commit here.
            inline = not self._busy and not self._queue or self._closing or not self._thread.is_alive()
            if inline:
                while self._busy:
                    self._cond.wait()
                self._busy = True
            else:
                self._queue.append(item)
                self._cond.notify_all()
        if inline:
            try:
                self._commit([item])
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error

    def close(self) -> None:
        """Commit what is queued, then end the committer thread (later submits commit inline)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._busy or not (self._queue or self._closing):
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self._busy = True
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _commit(self, batch: list[PendingInstance]) -> None:
        try:
            try:
                for d in set().union(*(item.dirs for item in batch)):
                    fsync_dir(d)
            except OSError as e:  # none of them is durable
                for item in batch:
                    item.error = e
                return
            if len(self.durable_dirs) > 100_000:  # forget old studies' folders (they are only fsync'd again)
                self.durable_dirs.clear()
            for item in batch:
                self.durable_dirs.update(item.folders)
            try:
                self._insert(batch)
            except Exception as e:
                if len(batch) == 1:
                    batch[0].error = e
                    return
                for item in batch:  # find the culprit: one at a time, each with its own outcome
                    try:
                        self._insert([item])
                    except Exception as e1:
                        item.error = e1
        except BaseException as e:  # never leave a submitter waiting
            for item in batch:
                item.error = item.error or e
            raise
        finally:
            self.batches += 1
            self.committed += sum(1 for item in batch if item.error is None)
            for item in batch:
                item.done.set()

    def _insert(self, batch: list[PendingInstance]) -> None:
        self.db.record_instances([item.row for item in batch], time.time())


class Spool:
    """Instances on disk under ``data_dir/spool/<study>/<series>/<sop>.dcm``, rows in the database.

    Parameters
    ----------
    data_dir : str or Path
        The node's data directory.
    db : JobDatabase
    recover : bool
        Remove the ``.part`` files of instances never acknowledged (at the node's start;
        not in an ingest helper process, which starts while others are writing).
    """

    def __init__(self, data_dir: str | Path, db: JobDatabase, recover: bool = True) -> None:
        self.root = Path(data_dir)
        self.spool_dir = self.root / "spool"
        self.quarantine_dir = self.root / "quarantine"
        self.db = db
        for d in (self.spool_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.root.parent, self.root):  # the data folder and its spool, durable from here on
            try:
                fsync_dir(d)
            except PermissionError:  # a parent the node may not read: it existed before the node anyway
                pass
        if recover:
            self._remove_partials()
        # The only writer of instance rows: SQLite takes one writer at a time, and its busy
        # handler sleeps up to 100 ms between tries, which would stall concurrent associations.
        self.committer = GroupCommitter(db)
        self.committer.durable_dirs.add(str(self.spool_dir))

    def _remove_partials(self) -> None:
        # A .part file is an instance that was never acknowledged: the sender retries it.
        for p in list(self.spool_dir.rglob(".*.part")) + list(self.quarantine_dir.glob(".*.part")):
            p.unlink(missing_ok=True)

    def store(self, data: bytes | Sequence[bytes], *, study_uid: str, series_uid: str, sop_uid: str, sop_class: str | None,
              modality: str | None, calling_ae: str | None, urgent: bool = False) -> Path:
        """Persist one instance and record it; returns once both are durable.

        Safe to call from many threads at once: their folder fsyncs and database
        commits are done together (:class:`GroupCommitter`). A second copy of the
        same SOP Instance UID replaces the first (a PACS resending a study), and
        counts as new activity for the study. ``urgent`` (the request asked for STAT or HIGH
        priority) makes the study one the worker takes before routine ones.

        Raises
        ------
        OSError
            The file or its folder could not be written (disk full, permissions).
        sqlite3.Error
            The row could not be committed.
        """
        path = self.spool_dir / safe_name(study_uid) / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"
        dirs = write_file(path, data, root=self.root, durable=self.committer.durable_dirs)
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else sum(len(b) for b in data)
        self.committer.submit(PendingInstance(
            (sop_uid, study_uid, series_uid, sop_class, modality, str(path), size, calling_ae, int(urgent)), study_uid,
            dirs,
            (str(path.parent), str(path.parent.parent))))
        return path

    def close(self) -> None:
        """Commit what is waiting and stop the committer thread (later stores commit inline)."""
        self.committer.close()

    def quarantine(self, data: bytes | Sequence[bytes] | None, reason: str, *, calling_ae: str | None = None,
                   sop_uid: str | None = None, study_uid: str | None = None, source: Path | None = None) -> Path:
        """Keep a rejected object with the reason, for the administrator to inspect.

        Either ``data`` (received bytes) or ``source`` (a spooled file, moved) is kept.
        """
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.dcm"
        path = self.quarantine_dir / name
        if source is not None:
            os.replace(source, path)
        else:
            write_durably(path, data or b"")
        write_durably(path.with_suffix(".json"), json.dumps(
            {"reason": reason, "calling_ae": calling_ae, "sop_uid": sop_uid, "study_uid": study_uid}).encode())
        self.db.add_quarantine(str(path), reason, calling_ae, sop_uid, study_uid)
        return path

    def instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's instances that were not skipped, in series then arrival order."""
        return self.db.instances(study_uid)
