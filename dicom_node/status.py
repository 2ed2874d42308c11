"""``medclass node status``: recent studies as a table, from the node's job database.

Every problem of a study is one line in its ``errors`` column, saying what and what to
do: a failed or skipped study's reason, a send that is being retried, a report in the
dead letter (given up) with the ``medclass node resend`` command that queues it again.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from dicom_node.jobs import JobDatabase, OutboxState, StudyState
from dicom_node.sender import DEAD_REMEDY
from medclass.errors import MedClassError


def open_database(data_dir: str | Path) -> JobDatabase:
    """The job database of a node's data folder (which must hold one)."""
    path = Path(data_dir) / "node.db"
    if not path.is_file():
        raise MedClassError(f"no node database in {data_dir}", "pass the node's --data-dir (or --config)")
    return JobDatabase(path)


def study_rows(data_dir: str | Path, limit: int = 20) -> list[dict]:
    """The most recent studies: received, state, result, SR sent, routed, errors."""
    db = open_database(data_dir)
    out = []
    for s in db.recent_studies(limit):
        uid = s["study_uid"]
        sends = db.outbox(uid)
        results = json.loads(s["result"]) if s["result"] else []
        errors = [s["error"]] if s["error"] else []
        for o in sends:
            what = f"{'SR' if o['kind'] == 'sr' else 'forward'}→{o['destination']}"
            if o["state"] == OutboxState.DEAD.value:
                errors.append(f"{what} dead: {o['last_error']}; {DEAD_REMEDY.format(study=uid)}")
            elif o["state"] == OutboxState.PENDING.value and o["last_error"]:
                errors.append(f"{what} retrying: {o['last_error']}")
        n_q = db.quarantined(uid)
        if n_q:
            errors.append(f"{n_q} quarantined")
        out.append({
            "study_uid": uid,
            "received": dt.datetime.fromtimestamp(s["last_received"]).strftime("%Y-%m-%d %H:%M:%S"),
            "instances": s["n_instances"],
            "state": s["state"],
            "result": "; ".join(f"{r['model']}: {r['label']} ({max(r['probabilities'].values()):.2f})"
                                + ("" if r.get("complete", True) else " PARTIAL") for r in results),
            "sr_sent": _summary([o for o in sends if o["kind"] == "sr"]),
            "routed": _summary([o for o in sends if o["kind"] == "forward"], show_dest=True),
            "errors": "; ".join(errors),
        })
    db.close()
    return out


def _summary(sends, show_dest: bool = False) -> str:
    if not sends:
        return "-"
    parts = []
    for o in sends:
        word = "yes" if o["state"] == OutboxState.SENT.value else f"{o['state']} ({o['attempts']} tries)"
        parts.append(f"{o['destination'].split('@')[0]} {word}" if show_dest else word)
    return ", ".join(parts)


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of :func:`study_rows`."""
    if not rows:
        return "no studies received yet"
    cols = ["study_uid", "received", "instances", "state", "result", "sr_sent", "routed", "errors"]
    # Nothing is cut: a study UID cut short looks like a valid but different one.
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(width[c]) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip())
    return "\n".join(lines)


def resend(data_dir: str | Path, study_uid: str | None) -> tuple[int, int]:
    """Queue a study's dead items again and classify it again if it failed or was skipped.

    ``study_uid=None``: every dead item of every study. Works whether the node runs or not
    (a running node picks the items up at its next poll). Returns (items queued again,
    studies queued for classification again).
    """
    db = open_database(data_dir)
    try:
        items = db.resend_dead(study_uid)
        studies = 0
        if study_uid is not None:
            if db.study(study_uid) is None:
                raise MedClassError(f"the node has no study {study_uid}",
                                    "copy the UID from 'medclass node status' (it shows it whole)")
            if db.state(study_uid) in (StudyState.FAILED, StudyState.SKIPPED):
                studies = int(db.requeue(study_uid))
        return items, studies
    finally:
        db.close()
