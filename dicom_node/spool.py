"""The durable instance store and the node's job database.

An instance is acknowledged (C-STORE status 0x0000) only after its bytes are on
disk and its row is committed in SQLite: the bytes go to a temporary file, which
is fsync'd, renamed into place (atomic on POSIX) and the folder fsync'd; then the
row is committed with ``synchronous=FULL``. A ``kill -9`` or power cut after the
acknowledgement loses nothing; one before it leaves at most a ``.part`` file, which
the next start removes, and the sender retries.

One SQLite file (WAL) holds every piece of state, so that a restart resumes
where the node stopped: ``instances``, ``studies`` (the assembler's and worker's
state), ``quarantine`` and ``outbox`` (the sender's queue).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("dicom_node.spool")

_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class TEXT,
    modality TEXT,
    path TEXT NOT NULL,
    size INTEGER,
    calling_ae TEXT,
    received REAL NOT NULL,
    skipped TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'receiving',
    revision INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    classified REAL,
    stable REAL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    calling_ae TEXT,
    sop_uid TEXT,
    study_uid TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    study_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT,
    priority INTEGER NOT NULL DEFAULT 2,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created REAL NOT NULL,
    sent REAL
);
"""


class JobDatabase:
    """The node's SQLite database; one connection per thread.

    Parameters
    ----------
    path : str or Path
        The database file (created with its tables when missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.connect() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        """This thread's connection (autocommit off; use ``with`` for a transaction)."""
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30, isolation_level="DEFERRED")
            c.row_factory = sqlite3.Row
            # FULL: a commit survives a power cut, not only a killed process.
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA busy_timeout=30000")
            self._local.conn = c
        return c

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self.connect().execute(sql, args).fetchall()

    def execute(self, sql: str, args: tuple = ()) -> int:
        """Run one statement in its own transaction; return the rows changed."""
        with self.connect() as c:
            return c.execute(sql, args).rowcount

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None


def safe_name(uid: str) -> str:
    """A file-name-safe form of a UID (a hash when the UID is malformed)."""
    uid = str(uid).strip().rstrip("\0")
    return uid if _UID_RE.match(uid) else "x" + hashlib.sha1(uid.encode()).hexdigest()


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it survives a crash once this returns.

    Temporary file in the same folder, fsync, atomic rename, fsync of the folder
    (without the last step the rename itself may be lost on power failure).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Spool:
    """Instances on disk under ``data_dir/spool/<study>/<series>/<sop>.dcm``, rows in the database.

    Parameters
    ----------
    data_dir : str or Path
        The node's data directory.
    db : JobDatabase
    """

    def __init__(self, data_dir: str | Path, db: JobDatabase) -> None:
        self.root = Path(data_dir)
        self.spool_dir = self.root / "spool"
        self.quarantine_dir = self.root / "quarantine"
        self.db = db
        # SQLite takes one writer at a time; its busy handler sleeps up to 100 ms between
        # tries, which stalls concurrent associations. Queueing the writers here costs nothing.
        self._commit_lock = threading.Lock()
        for d in (self.spool_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._remove_partials()

    def _remove_partials(self) -> None:
        # A .part file is an instance that was never acknowledged: the sender retries it.
        for p in list(self.spool_dir.rglob(".*.part")) + list(self.quarantine_dir.glob(".*.part")):
            p.unlink(missing_ok=True)

    def store(self, data: bytes, *, study_uid: str, series_uid: str, sop_uid: str, sop_class: str | None,
              modality: str | None, calling_ae: str | None) -> Path:
        """Persist one instance and record it; returns once both are durable.

        A second copy of the same SOP Instance UID replaces the first (a PACS
        resending a study), and counts as new activity for the study.
        """
        path = self.spool_dir / safe_name(study_uid) / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"
        write_durably(path, data)
        now = time.time()
        with self._commit_lock, self.db.connect() as c:
            c.execute("INSERT OR REPLACE INTO instances (sop_uid, study_uid, series_uid, sop_class, modality, path, "
                      "size, calling_ae, received, skipped) VALUES (?,?,?,?,?,?,?,?,?,NULL)",
                      (sop_uid, study_uid, series_uid, sop_class, modality, str(path), len(data), calling_ae, now))
            # New data for a study already classified reopens it: the next result is a new revision.
            c.execute("INSERT INTO studies (study_uid, first_received, last_received, n_instances) VALUES (?,?,?,1) "
                      "ON CONFLICT(study_uid) DO UPDATE SET last_received=excluded.last_received, "
                      "n_instances=(SELECT COUNT(*) FROM instances WHERE study_uid=excluded.study_uid), "
                      "state=CASE WHEN state='receiving' THEN state ELSE 'receiving' END",
                      (study_uid, now, now))
        return path

    def quarantine(self, data: bytes | None, reason: str, *, calling_ae: str | None = None,
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
        self.db.execute("INSERT INTO quarantine (path, reason, calling_ae, sop_uid, study_uid, at) VALUES (?,?,?,?,?,?)",
                        (str(path), reason, calling_ae, sop_uid, study_uid, time.time()))
        return path

    def instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's instances that were not skipped, in series then arrival order."""
        rows = self.db.query("SELECT * FROM instances WHERE study_uid=? AND skipped IS NULL "
                             "ORDER BY series_uid, received", (study_uid,))
        return [dict(r) for r in rows]

    def iter_all(self) -> Iterator[dict[str, Any]]:
        for r in self.db.query("SELECT * FROM instances"):
            yield dict(r)
