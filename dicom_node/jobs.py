"""The node's job database: one SQLite file, one owner.

Every table and every change of a study's or an outbox item's state is here, as a named
method; the assembler, the worker, the sender, ``node status`` and ``node resend`` call
these methods and never write SQL of their own. :mod:`dicom_node.spool` keeps the files
(its :class:`~dicom_node.spool.GroupCommitter` commits instance rows through
:meth:`JobDatabase.record_instances`).

Tables
------
``instances``   every acknowledged instance (path of its file in the spool).
``studies``     one row per study: its :class:`StudyState`, result, revision, the digest of the
                SOP Instance UIDs its current report covers, and whether the node knows the
                study was interrupted (found receiving at a restart).
``reports``     every SR the node built, so that the next one of the same study and model
                names it in its Predecessor Documents Sequence.
``quarantine``  objects set aside, with the reason.
``outbox``      the sender's queue (SRs and forwards) with a named :class:`Priority` and an
                :class:`OutboxState`; ``dead`` is the dead letter.
``audit``       who did what and when through the triage desk (:mod:`dicom_node.desk`): resend,
                reclassify, discard. Created by :data:`SCHEMA` at every open (``IF NOT
                EXISTS``), so an older file gains it with no migration step and keeps it.

Durability: WAL journal, ``synchronous=FULL`` on every connection (a commit survives a
power cut), one connection per thread.

Study life cycle (:data:`TRANSITIONS`)::

    receiving --mark_stable--> ready --claim_ready--> classifying --finish_classified--> classified
        ^                        ^                        |  \\--finish_skipped--> skipped
        |                        |                        |   \\-finish_failed---> failed
        |                        +--requeue_interrupted---+    \\-finish_unchanged-> classified (no new SR)
        |                        +--wait_for_inference----+  (the inference server is down: retried later)
        +------ a new instance (reopen), from any state ------+
    skipped / failed --requeue (medclass node resend)--> ready
    classified / skipped / failed --reclassify (the desk)--> ready (a new, superseding report)

A transition asked from a state that does not allow it raises :class:`IllegalTransition`,
except when the study was reopened meanwhile by a new instance (the association threads
may reopen a study at any moment): then the transition is dropped and the method returns
``False``; the study is classified again once it is stable.

Schema versions (``PRAGMA user_version``): 0 is the layout before this module (no
``interrupted``/``digest`` columns, no ``reports`` table, outbox ordered by a DIMSE
priority number, ``failed`` for an outbox item that gave up); 1 had no ``studies.asks_urgent``
(the worker took studies strictly in stable order). :meth:`JobDatabase.migrate`
brings an existing ``node.db`` to :data:`SCHEMA_VERSION` at open, in one transaction, so a
node upgraded in place starts with its queue intact.
"""

from __future__ import annotations

import enum
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

#: The layout :data:`SCHEMA` creates; older files are migrated to it at open.
SCHEMA_VERSION = 2

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
    stable REAL,
    interrupted INTEGER NOT NULL DEFAULT 0,
    digest TEXT,
    asks_urgent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reports (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    model_key TEXT NOT NULL,
    revision INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    path TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_study ON reports(study_uid, model_key);
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
    urgency TEXT NOT NULL DEFAULT 'routine',
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    first_failure REAL,
    last_error TEXT,
    created REAL NOT NULL,
    sent REAL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    study_uid TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_study ON audit(study_uid);
"""

#: Columns added since schema version 0: (table, column, declaration).
_ADDED_COLUMNS = [
    ("studies", "interrupted", "INTEGER NOT NULL DEFAULT 0"),
    ("studies", "digest", "TEXT"),
    ("outbox", "urgency", "TEXT NOT NULL DEFAULT 'routine'"),
    ("outbox", "first_failure", "REAL"),
    ("studies", "asks_urgent", "INTEGER NOT NULL DEFAULT 0"),
]


class StudyState(str, enum.Enum):
    """Where a study is in its life (the ``studies.state`` column)."""

    RECEIVING = "receiving"  # instances arriving; not yet quiet for stable_seconds
    READY = "ready"  # stable, waiting for the worker
    CLASSIFYING = "classifying"  # claimed by the worker
    CLASSIFIED = "classified"  # a report covers the study as it is now
    SKIPPED = "skipped"  # nothing to classify (no model matches, no readable image)
    FAILED = "failed"  # classification raised; the error says what and what to do

    def check(self, new: StudyState) -> None:
        """Raise :class:`IllegalTransition` unless ``self`` may become ``new``."""
        if new not in TRANSITIONS[self]:
            raise IllegalTransition(self, new)


#: The allowed moves. RECEIVING is reachable from every state: a new instance reopens a study.
TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.RECEIVING, StudyState.READY}),
    StudyState.READY: frozenset({StudyState.RECEIVING, StudyState.CLASSIFYING}),
    StudyState.CLASSIFYING: frozenset({StudyState.RECEIVING, StudyState.CLASSIFIED, StudyState.SKIPPED,
                                       StudyState.FAILED, StudyState.READY}),
    # classified -> ready only when a person asks for it (the desk's "reclassify", e.g. after a model change).
    StudyState.CLASSIFIED: frozenset({StudyState.RECEIVING, StudyState.READY}),
    StudyState.SKIPPED: frozenset({StudyState.RECEIVING, StudyState.READY}),
    StudyState.FAILED: frozenset({StudyState.RECEIVING, StudyState.READY}),
}


class IllegalTransition(ValueError):
    """A study was asked to move between two states that :data:`TRANSITIONS` does not join."""

    def __init__(self, old: StudyState | str | None, new: StudyState) -> None:
        self.old, self.new = old, new
        old_name = old.value if isinstance(old, StudyState) else old
        super().__init__(f"a study cannot go from {old_name!r} to {new.value!r}")


class OutboxState(str, enum.Enum):
    """Where an outbox item is (the ``outbox.state`` column)."""

    PENDING = "pending"  # queued, or waiting for its next attempt
    SENT = "sent"  # the peer answered success (or warning)
    DEAD = "dead"  # given up (dead letter): a refusal that will not change, or retried too long
    DISCARDED = "discarded"  # a dead item a person decided not to send (the desk's "discard"); kept as history


class Priority(str, enum.Enum):
    """An outbox item's place in the queue; urgent items go first.

    The C-STORE's DIMSE priority follows (:attr:`dimse`): urgent is HIGH, routine is MEDIUM,
    low is LOW.
    """

    URGENT = "urgent"
    ROUTINE = "routine"
    LOW = "low"

    @property
    def dimse(self) -> int:
        """The DIMSE Priority (0000,0700) value: MEDIUM 0, HIGH 1, LOW 2."""
        return {Priority.URGENT: 1, Priority.ROUTINE: 0, Priority.LOW: 2}[self]

    @classmethod
    def of_forward_rule(cls, name: str) -> Priority:
        """The priority of a ``[[forward]]`` rule's ``priority = "high" | "medium" | "low"``."""
        return {"high": cls.URGENT, "medium": cls.ROUTINE, "low": cls.LOW}[name]


# Queue order, from the enum's order (urgent first), so that no number stands for a priority in SQL.
_URGENCY_ORDER = "CASE urgency " + " ".join(f"WHEN '{p.value}' THEN {i}" for i, p in enumerate(Priority)) + \
    f" ELSE {len(Priority)} END"


def sop_digest(sop_uids: Iterable[str]) -> str:
    """A digest of a set of SOP Instance UIDs (order and repeats do not matter)."""
    return hashlib.sha256("\n".join(sorted(set(sop_uids))).encode()).hexdigest()


class JobDatabase:
    """The node's SQLite database; one connection per thread.

    Parameters
    ----------
    path : str or Path
        The database file (created with its tables when missing, migrated when older).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        c = self.connect()
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(SCHEMA)
        self.migrate()

    # ------------------------------------------------------------------ connection

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
        """Read-only inspection (tests, benchmarks); the node itself uses the named methods."""
        return self.connect().execute(sql, args).fetchall()

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def migrate(self) -> int:
        """Bring an older ``node.db`` to :data:`SCHEMA_VERSION`; return the version found.

        One ``BEGIN IMMEDIATE`` transaction: an ingest helper process opening the file at
        the same moment waits, then finds it migrated.
        """
        c = self.connect()
        c.execute("BEGIN IMMEDIATE")
        try:
            found = c.execute("PRAGMA user_version").fetchone()[0]
            if found < SCHEMA_VERSION:
                for table, column, decl in _ADDED_COLUMNS:
                    have = {r["name"] for r in c.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                outbox = {r["name"] for r in c.execute("PRAGMA table_info(outbox)")}
                if "priority" in outbox:  # version 0 kept the DIMSE priority number (HIGH 1, MEDIUM 0, LOW 2)
                    c.execute("UPDATE outbox SET urgency=CASE priority WHEN 1 THEN ? WHEN 2 THEN ? ELSE ? END",
                              (Priority.URGENT.value, Priority.LOW.value, Priority.ROUTINE.value))
                # Version 0 called a given-up item 'failed'; it is the dead letter now.
                c.execute("UPDATE outbox SET state=? WHERE state='failed'", (OutboxState.DEAD.value,))
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return found

    # ------------------------------------------------------------------ instances (the spool's rows)

    def record_instances(self, rows: Sequence[tuple[Any, ...]], now: float) -> None:
        """Commit instance rows and reopen their studies, in one transaction.

        ``rows`` are ``(sop_uid, study_uid, series_uid, sop_class, modality, path, size,
        calling_ae[, urgent])``. A second copy of a SOP Instance UID replaces the first. A study in any
        state goes back to ``receiving`` (new activity); an instance arriving after a restart
        clears the study's ``interrupted`` mark: the study went on after the restart, and the
        quiet-time rule decides when it is complete, as for any study. A study one of whose
        instances came ``urgent`` (STAT/HIGH) stays urgent: :meth:`claim_ready` takes it first.
        """
        studies = list(dict.fromkeys(r[1] for r in rows))
        urgent = {r[1] for r in rows if len(r) > 8 and r[8]}
        with self.connect() as c:
            c.executemany("INSERT OR REPLACE INTO instances (sop_uid, study_uid, series_uid, sop_class, modality, "
                          "path, size, calling_ae, received, skipped) VALUES (?,?,?,?,?,?,?,?,?,NULL)",
                          [(*r[:8], now) for r in rows])
            c.executemany("INSERT INTO studies (study_uid, first_received, last_received, n_instances, asks_urgent) "
                          "VALUES (?,?,?,0,?) ON CONFLICT(study_uid) DO UPDATE SET "
                          "last_received=excluded.last_received, state=?, interrupted=0, "
                          "asks_urgent=MAX(asks_urgent, excluded.asks_urgent)",
                          [(uid, now, now, int(uid in urgent), StudyState.RECEIVING.value) for uid in studies])
            c.executemany("UPDATE studies SET n_instances=(SELECT COUNT(*) FROM instances WHERE study_uid=?) "
                          "WHERE study_uid=?", [(uid, uid) for uid in studies])

    def instances(self, study_uid: str, include_skipped: bool = False) -> list[dict[str, Any]]:
        """The study's instances (by default those not skipped), in series then arrival order."""
        where = "" if include_skipped else " AND skipped IS NULL"
        rows = self.connect().execute(f"SELECT * FROM instances WHERE study_uid=?{where} "
                                      "ORDER BY series_uid, received", (study_uid,)).fetchall()
        return [dict(r) for r in rows]

    def instances_since(self, row: int, limit: int = 256) -> list[dict[str, Any]]:
        """Instances recorded after row number ``row``, oldest first: what arrived since a reader last looked.

        Each has ``row`` (pass the last one back), ``sop_uid``, ``study_uid``, ``series_uid``
        and ``path``. A replaced instance (the same SOP Instance UID sent again) gets a new row.
        """
        rows = self.connect().execute("SELECT rowid AS row, sop_uid, study_uid, series_uid, path FROM instances "
                                      "WHERE rowid > ? AND skipped IS NULL ORDER BY rowid LIMIT ?",
                                      (row, limit)).fetchall()
        return [dict(r) for r in rows]

    def unfinished_studies(self) -> list[str]:
        """Study UIDs not yet classified (receiving, ready, or claimed by a worker)."""
        rows = self.connect().execute("SELECT study_uid FROM studies WHERE state IN (?, ?, ?)",
                                      (StudyState.RECEIVING.value, StudyState.READY.value,
                                       StudyState.CLASSIFYING.value)).fetchall()
        return [r[0] for r in rows]

    def unfinished_instances_row(self) -> int:
        """The row just before the first instance of a study not yet classified (receiving or ready).

        Where a reader of :meth:`instances_since` resumes after a restart: what arrived before
        and is still waiting is looked at again; everything else already ended.
        """
        c = self.connect()
        first = c.execute("SELECT MIN(i.rowid) FROM instances i JOIN studies s USING (study_uid) "
                          "WHERE s.state IN (?, ?)", (StudyState.RECEIVING.value, StudyState.READY.value)).fetchone()[0]
        if first is not None:
            return int(first) - 1
        return int(c.execute("SELECT COALESCE(MAX(rowid), 0) FROM instances").fetchone()[0])

    def mark_instance_skipped(self, sop_uid: str, reason: str) -> None:
        """An instance the worker could not use (its file went to quarantine)."""
        with self.connect() as c:
            c.execute("UPDATE instances SET skipped=? WHERE sop_uid=?", (reason, sop_uid))

    def add_quarantine(self, path: str, reason: str, calling_ae: str | None, sop_uid: str | None,
                       study_uid: str | None) -> None:
        with self.connect() as c:
            c.execute("INSERT INTO quarantine (path, reason, calling_ae, sop_uid, study_uid, at) VALUES (?,?,?,?,?,?)",
                      (path, reason, calling_ae, sop_uid, study_uid, time.time()))

    def quarantined(self, study_uid: str) -> int:
        """How many objects of the study are in quarantine."""
        return self.connect().execute("SELECT COUNT(*) FROM quarantine WHERE study_uid=?", (study_uid,)).fetchone()[0]

    # ------------------------------------------------------------------ studies

    def study(self, study_uid: str) -> dict[str, Any] | None:
        row = self.connect().execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return dict(row) if row else None

    def state(self, study_uid: str) -> StudyState | None:
        s = self.study(study_uid)
        return StudyState(s["state"]) if s else None

    def recent_studies(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.connect().execute("SELECT * FROM studies ORDER BY last_received DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows.fetchall()]

    def _move(self, c: sqlite3.Connection, study_uid: str, frm: Iterable[StudyState], to: StudyState,
              sets: str = "", args: tuple = (), where: str = "", where_args: tuple = ()) -> bool:
        """``UPDATE`` one study from one of ``frm`` to ``to``, inside the caller's transaction.

        Returns False when the study was reopened meanwhile: it is receiving, or, for a move
        out of classifying, it is ready again (more instances came during the classification
        and went quiet before it ended: the worker classifies it again, whole). Raises
        :class:`IllegalTransition` when it is in any other state ``frm`` does not hold.
        """
        frm = list(frm)
        for f in frm:
            f.check(to)
        marks = ",".join("?" * len(frm))
        n = c.execute(f"UPDATE studies SET state=?{', ' + sets if sets else ''} WHERE study_uid=? "
                      f"AND state IN ({marks}){where}",
                      (to.value, *args, study_uid, *(f.value for f in frm), *where_args)).rowcount
        if n:
            return True
        row = c.execute("SELECT state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        current = StudyState(row["state"]) if row else None
        if current is StudyState.RECEIVING or current in frm:  # reopened, or the extra condition failed
            return False
        if current is StudyState.READY and StudyState.CLASSIFYING in frm:  # reopened and stable again
            return False
        raise IllegalTransition(current, to)

    def receiving_since(self) -> float | None:
        """The oldest ``last_received`` of the studies still receiving (``None``: none is)."""
        return self.connect().execute("SELECT MIN(last_received) FROM studies WHERE state=?",
                                      (StudyState.RECEIVING.value,)).fetchone()[0]

    def mark_stable(self, cutoff: float, now: float) -> list[str]:
        """receiving → ready for every study whose last instance is at or before ``cutoff``."""
        ready = []
        with self.connect() as c:
            rows = c.execute("SELECT study_uid FROM studies WHERE state=? AND last_received <= ?",
                             (StudyState.RECEIVING.value, cutoff)).fetchall()
            for r in rows:
                # The condition again, in the same transaction: an instance stored since the SELECT
                # keeps the study open.
                if self._move(c, r["study_uid"], [StudyState.RECEIVING], StudyState.READY, "stable=?", (now,),
                              " AND last_received <= ?", (cutoff,)):
                    ready.append(r["study_uid"])
        return ready

    def recover_after_restart(self) -> tuple[int, int]:
        """At the node's start: classifying → ready (classified again), receiving → marked interrupted.

        A study still receiving when the node stopped may have lost the rest of its instances
        (the sender gave up, or will resend later); its report is PARTIAL until more of it
        arrives. Returns (studies requeued, studies marked interrupted).
        """
        with self.connect() as c:
            requeued = 0
            for r in c.execute("SELECT study_uid FROM studies WHERE state=?",
                               (StudyState.CLASSIFYING.value,)).fetchall():
                requeued += self._move(c, r["study_uid"], [StudyState.CLASSIFYING], StudyState.READY)
            interrupted = c.execute("UPDATE studies SET interrupted=1 WHERE state=?",
                                    (StudyState.RECEIVING.value,)).rowcount
        return requeued, interrupted

    def claim_ready(self) -> str | None:
        """ready → classifying for the next study; its UID, or ``None``.

        Urgent studies (their request asked for STAT or HIGH priority, :meth:`record_instances`)
        first, then the study stable longest: a STAT head CT does not wait behind a backlog of
        routine studies.
        """
        with self.connect() as c:
            for r in c.execute("SELECT study_uid FROM studies WHERE state=? ORDER BY asks_urgent DESC, stable LIMIT 5",
                               (StudyState.READY.value,)).fetchall():
                if self._move(c, r["study_uid"], [StudyState.READY], StudyState.CLASSIFYING):
                    return r["study_uid"]
        return None

    def finish_classified(self, study_uid: str, revision: int, results: list[dict[str, Any]], digest: str,
                          reports: Sequence[dict[str, Any]] = (), outbox: Sequence[dict[str, Any]] = ()) -> bool:
        """classifying → classified: the result, its reports and what to send, in one transaction.

        ``digest`` (:func:`sop_digest`) names the instances the result covers: the same set
        again is an unchanged resend (:meth:`finish_unchanged`). When the study was reopened
        meanwhile the reports and the queue are still recorded (they describe what was
        classified) and the study stays receiving (or ready, when it went quiet again meanwhile); its
        next result is a new revision.
        """
        now = time.time()
        with self.connect() as c:
            for r in reports:
                c.execute("INSERT OR REPLACE INTO reports (sop_uid, study_uid, series_uid, sop_class, model_key, "
                          "revision, complete, path, created) VALUES (?,?,?,?,?,?,?,?,?)",
                          (r["sop_uid"], study_uid, r["series_uid"], r["sop_class"], r["model_key"], revision,
                           int(bool(r["complete"])), r.get("path"), now))
            self._queue(c, study_uid, outbox, now)
            moved = self._move(c, study_uid, [StudyState.CLASSIFYING], StudyState.CLASSIFIED,
                               "result=?, error=NULL, classified=?, revision=?, digest=?",
                               (json.dumps(results), now, revision, digest))
            if not moved:
                c.execute("UPDATE studies SET result=?, error=NULL, classified=?, revision=?, digest=? "
                          "WHERE study_uid=?", (json.dumps(results), now, revision, digest, study_uid))
        return moved

    def wait_for_inference(self, study_uid: str, reason: str) -> bool:
        """classifying → ready: the remote inference server is unavailable; classify the study again later.

        Nothing of the study is lost or changed (its instances, revision and reports stay as
        they were); ``reason`` (one line, shown by ``medclass node status``) says why it waits.
        Its ``stable`` time is kept, so it is still first in line once the server is back.
        """
        with self.connect() as c:
            return self._move(c, study_uid, [StudyState.CLASSIFYING], StudyState.READY, "error=?", (reason,))

    def finish_unchanged(self, study_uid: str) -> bool:
        """classifying → classified without a new report: the same instances as the current one."""
        with self.connect() as c:
            return self._move(c, study_uid, [StudyState.CLASSIFYING], StudyState.CLASSIFIED, "error=NULL")

    def finish_skipped(self, study_uid: str, reason: str) -> bool:
        """classifying → skipped, with the reason and what to do (one line)."""
        with self.connect() as c:
            return self._move(c, study_uid, [StudyState.CLASSIFYING], StudyState.SKIPPED, "error=?, classified=?",
                              (reason, time.time()))

    def finish_failed(self, study_uid: str, reason: str) -> bool:
        """classifying → failed, with the reason and what to do (one line)."""
        with self.connect() as c:
            return self._move(c, study_uid, [StudyState.CLASSIFYING], StudyState.FAILED, "error=?, classified=?",
                              (reason, time.time()))

    def requeue(self, study_uid: str) -> bool:
        """skipped or failed → ready: classify the study again (``medclass node resend``)."""
        with self.connect() as c:
            return self._move(c, study_uid, [StudyState.SKIPPED, StudyState.FAILED], StudyState.READY,
                              "error=NULL, stable=?", (time.time(),))

    def reclassify(self, study_uid: str) -> bool:
        """classified, skipped or failed → ready, forgetting the digest: the next result is a new report.

        An unchanged study would otherwise give no new report (:meth:`finish_unchanged`); after a
        model change the person asking wants one, and it supersedes the current one (revision + 1).
        Raises :class:`IllegalTransition` while the study waits for or is in the worker.
        """
        with self.connect() as c:
            return self._move(c, study_uid, [StudyState.CLASSIFIED, StudyState.SKIPPED, StudyState.FAILED],
                              StudyState.READY, "error=NULL, digest=NULL, stable=?", (time.time(),))

    def study_by_row(self, row_id: int) -> dict[str, Any] | None:
        """A study by its row id (the desk names studies so: no UID in a URL)."""
        row = self.connect().execute("SELECT rowid AS row_id, * FROM studies WHERE rowid=?", (row_id,)).fetchone()
        return dict(row) if row else None

    def worklist(self, limit: int = 200, states: Sequence[str] = (), since: float | None = None,
                 until: float | None = None, dead_only: bool = False, urgent_only: bool = False,
                 uncertain_only: bool = False, label: str | None = None) -> list[dict[str, Any]]:
        """Studies for the desk: urgent-routed first, then newest first, with their modalities and outbox.

        Each row has the study's columns, ``row_id``, ``modalities`` (comma-separated),
        ``urgent`` (an urgent item is queued or sent for it) and ``outbox`` (its items).

        The result filters read the stored result (a JSON list, one entry per model), in SQL so
        that ``limit`` applies to the matching studies: ``urgent_only`` (an urgent item is
        queued or sent), ``uncertain_only`` (a model's conformal prediction set holds more, or
        fewer, than one class: the router's ``uncertain``), ``label`` (a model predicted that
        class, alone or among a multi-label result's classes).
        """
        where, args = ["1=1"], []
        if states:
            where.append(f"s.state IN ({','.join('?' * len(states))})")
            args += list(states)
        if since is not None:
            where.append("s.last_received >= ?")
            args.append(since)
        if until is not None:
            where.append("s.last_received < ?")
            args.append(until)
        if dead_only:
            where.append("EXISTS (SELECT 1 FROM outbox d WHERE d.study_uid=s.study_uid AND d.state=?)")
            args.append(OutboxState.DEAD.value)
        if urgent_only:
            where.append("EXISTS (SELECT 1 FROM outbox v WHERE v.study_uid=s.study_uid AND v.urgency=?)")
            args.append(Priority.URGENT.value)
        if uncertain_only:
            where.append("EXISTS (SELECT 1 FROM json_each(s.result) r WHERE json_type(r.value, '$.prediction_set') = "
                         "'array' AND json_array_length(r.value, '$.prediction_set') != 1)")
        if label is not None:
            # json_each of a string label is that one value; of a multi-label list, each class.
            where.append("EXISTS (SELECT 1 FROM json_each(s.result) r, json_each(r.value, '$.label') l "
                         "WHERE l.value = ?)")
            args.append(label)
        c = self.connect()
        rows = [dict(r) for r in c.execute(
            "SELECT s.rowid AS row_id, s.*, "
            "(SELECT GROUP_CONCAT(DISTINCT i.modality) FROM instances i WHERE i.study_uid=s.study_uid) AS modalities, "
            "EXISTS (SELECT 1 FROM outbox u WHERE u.study_uid=s.study_uid AND u.urgency=?) AS urgent "
            f"FROM studies s WHERE {' AND '.join(where)} ORDER BY urgent DESC, s.last_received DESC LIMIT ?",
            (Priority.URGENT.value, *args, limit)).fetchall()]
        by_uid = {r["study_uid"]: r for r in rows}
        for r in rows:
            r["outbox"] = []
        uids = list(by_uid)
        for i in range(0, len(uids), 500):  # SQLite's limit on parameters
            chunk = uids[i:i + 500]
            for o in c.execute(f"SELECT * FROM outbox WHERE study_uid IN ({','.join('?' * len(chunk))}) ORDER BY id",
                               chunk).fetchall():
                by_uid[o["study_uid"]]["outbox"].append(dict(o))
        return rows

    def result_classes(self) -> list[str]:
        """Every class a stored result names (its probabilities' keys), sorted: the desk's class filter."""
        rows = self.connect().execute(
            "SELECT DISTINCT p.key FROM studies s, json_each(s.result) r, json_each(r.value, '$.probabilities') p "
            "WHERE s.result IS NOT NULL ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's series: UID, modality, number of instances and of instances skipped."""
        rows = self.connect().execute(
            "SELECT series_uid, MAX(modality) AS modality, COUNT(*) AS instances, COUNT(skipped) AS skipped "
            "FROM instances WHERE study_uid=? GROUP BY series_uid ORDER BY MIN(received)", (study_uid,))
        return [dict(r) for r in rows.fetchall()]

    def previous_report(self, study_uid: str, model_key: str, before_revision: int) -> dict[str, Any] | None:
        """The latest report of ``model_key`` on the study below ``before_revision`` (``None``: none)."""
        row = self.connect().execute("SELECT * FROM reports WHERE study_uid=? AND model_key=? AND revision<? "
                                     "ORDER BY revision DESC LIMIT 1",
                                     (study_uid, model_key, before_revision)).fetchone()
        return dict(row) if row else None

    def reports(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self.connect().execute("SELECT * FROM reports WHERE study_uid=? ORDER BY revision, model_key",
                                      (study_uid,))
        return [dict(r) for r in rows.fetchall()]

    # ------------------------------------------------------------------ outbox

    @staticmethod
    def _queue(c: sqlite3.Connection, study_uid: str, items: Sequence[dict[str, Any]], now: float) -> None:
        for o in items:
            c.execute("INSERT OR IGNORE INTO outbox (key, study_uid, kind, destination, path, urgency, created) "
                      "VALUES (?,?,?,?,?,?,?)",
                      (o["key"], study_uid, o["kind"], o["destination"], o["path"], Priority(o["priority"]).value,
                       now))

    def due(self, now: float, limit: int = 20) -> list[dict[str, Any]]:
        """Pending items whose next attempt is due, urgent first, then in queue order."""
        rows = self.connect().execute(f"SELECT * FROM outbox WHERE state=? AND next_attempt <= ? "
                                      f"ORDER BY {_URGENCY_ORDER}, id LIMIT ?",
                                      (OutboxState.PENDING.value, now, limit)).fetchall()
        return [dict(r) for r in rows]

    def outbox_count(self, state: OutboxState) -> int:
        return self.connect().execute("SELECT COUNT(*) FROM outbox WHERE state=?", (state.value,)).fetchone()[0]

    def outbox(self, study_uid: str) -> list[dict[str, Any]]:
        """Every outbox item of a study, in queue order."""
        rows = self.connect().execute("SELECT * FROM outbox WHERE study_uid=? ORDER BY id", (study_uid,))
        return [dict(r) for r in rows.fetchall()]

    def mark_sent(self, item_id: int, now: float) -> None:
        with self.connect() as c:
            c.execute("UPDATE outbox SET state=?, sent=?, last_error=NULL, attempts=attempts+1 WHERE id=? AND state=?",
                      (OutboxState.SENT.value, now, item_id, OutboxState.PENDING.value))

    def retry_later(self, item_id: int, attempts: int, next_attempt: float, error: str, first_failure: float) -> None:
        """A failed attempt that will be tried again at ``next_attempt``."""
        with self.connect() as c:
            c.execute("UPDATE outbox SET attempts=?, next_attempt=?, last_error=?, first_failure=? "
                      "WHERE id=? AND state=?",
                      (attempts, next_attempt, error, first_failure, item_id, OutboxState.PENDING.value))

    def mark_dead(self, item_id: int, attempts: int, error: str, first_failure: float) -> None:
        """pending → dead (the dead letter): not tried again until ``medclass node resend``."""
        with self.connect() as c:
            c.execute("UPDATE outbox SET state=?, attempts=?, last_error=?, first_failure=? WHERE id=? AND state=?",
                      (OutboxState.DEAD.value, attempts, error, first_failure, item_id, OutboxState.PENDING.value))

    def outbox_item(self, item_id: int) -> dict[str, Any] | None:
        row = self.connect().execute("SELECT * FROM outbox WHERE id=?", (item_id,)).fetchone()
        return dict(row) if row else None

    def resend_item(self, item_id: int) -> bool:
        """One item back to pending, as new: a dead or discarded one, or a sent one the peer lost.

        A sent SR sent again is the same object (same SOP Instance UID); a PACS that still holds
        it keeps one copy. Returns False when the item is pending already (or unknown).
        """
        with self.connect() as c:
            return bool(c.execute("UPDATE outbox SET state=?, attempts=0, next_attempt=0, first_failure=NULL, "
                                  "last_error=NULL WHERE id=? AND state IN (?,?,?)",
                                  (OutboxState.PENDING.value, item_id, OutboxState.DEAD.value,
                                   OutboxState.DISCARDED.value, OutboxState.SENT.value)).rowcount)

    def discard_item(self, item_id: int) -> bool:
        """dead → discarded: the item stays as history and is never sent. False unless it was dead."""
        with self.connect() as c:
            return bool(c.execute("UPDATE outbox SET state=? WHERE id=? AND state=?",
                                  (OutboxState.DISCARDED.value, item_id, OutboxState.DEAD.value)).rowcount)

    # ------------------------------------------------------------------ audit

    def record_audit(self, user: str, action: str, study_uid: str | None, detail: str = "") -> None:
        """One line of the audit log: ``user`` did ``action`` (on ``study_uid``), now."""
        with self.connect() as c:
            c.execute("INSERT INTO audit (at, user, action, study_uid, detail) VALUES (?,?,?,?,?)",
                      (time.time(), user, action, study_uid, detail))

    def audit_log(self, study_uid: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The latest audit lines, newest first (of one study, or all)."""
        where, args = ("", ()) if study_uid is None else (" WHERE study_uid=?", (study_uid,))
        rows = self.connect().execute(f"SELECT * FROM audit{where} ORDER BY id DESC LIMIT ?", (*args, limit))
        return [dict(r) for r in rows.fetchall()]

    def resend_dead(self, study_uid: str | None = None) -> int:
        """dead → pending, as new (no attempts, due now): a study's items, or every one (``None``).

        A running node's sender picks them up at its next poll; a stopped node at its start.
        """
        with self.connect() as c:
            where, args = ("", ()) if study_uid is None else (" AND study_uid=?", (study_uid,))
            return c.execute(f"UPDATE outbox SET state=?, attempts=0, next_attempt=0, first_failure=NULL "
                             f"WHERE state=?{where}",
                             (OutboxState.PENDING.value, OutboxState.DEAD.value, *args)).rowcount
