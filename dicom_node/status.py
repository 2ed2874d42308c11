"""``medclass node status``: recent studies as a table, from the node's database."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from dicom_node.spool import JobDatabase
from medclass.errors import MedClassError


def study_rows(data_dir: str | Path, limit: int = 20) -> list[dict]:
    """The most recent studies: received, state, result, SR sent, routed, errors."""
    path = Path(data_dir) / "node.db"
    if not path.is_file():
        raise MedClassError(f"no node database in {data_dir}", "pass the node's --data-dir (or --config)")
    db = JobDatabase(path)
    out = []
    for s in db.query("SELECT * FROM studies ORDER BY last_received DESC LIMIT ?", (limit,)):
        sends = db.query("SELECT kind, destination, state, attempts, last_error FROM outbox WHERE study_uid=?",
                         (s["study_uid"],))
        results = json.loads(s["result"]) if s["result"] else []
        errors = [s["error"]] if s["error"] else []
        errors += [f"{o['kind']}→{o['destination']}: {o['last_error']}" for o in sends
                   if o["state"] != "sent" and o["last_error"]]
        n_q = db.query("SELECT COUNT(*) AS n FROM quarantine WHERE study_uid=?", (s["study_uid"],))[0]["n"]
        if n_q:
            errors.append(f"{n_q} quarantined")
        out.append({
            "study_uid": s["study_uid"],
            "received": dt.datetime.fromtimestamp(s["last_received"]).strftime("%Y-%m-%d %H:%M:%S"),
            "instances": s["n_instances"],
            "state": s["state"],
            "result": "; ".join(f"{r['model']}: {r['label']} "
                                f"({max(r['probabilities'].values()):.2f})" for r in results),
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
        word = "yes" if o["state"] == "sent" else f"{o['state']} ({o['attempts']} tries)"
        parts.append(f"{o['destination'].split('@')[0]} {word}" if show_dest else word)
    return ", ".join(parts)


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of :func:`study_rows`."""
    if not rows:
        return "no studies received yet"
    cols = ["study_uid", "received", "instances", "state", "result", "sr_sent", "routed", "errors"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    width["study_uid"] = min(width["study_uid"], 40)
    lines = ["  ".join(c.upper().ljust(width[c]) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r[c])[-width[c]:].ljust(width[c]) for c in cols).rstrip())
    return "\n".join(lines)
