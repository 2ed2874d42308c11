"""Study assembly: a study is complete when nothing has arrived for ``stable_seconds``.

DICOM has no "end of study" message, so the node waits, like Orthanc's
``StableAge``. The state lives in the job database (:mod:`dicom_node.jobs`, which
owns the :class:`~dicom_node.jobs.StudyState` transitions), so a restart picks up
where the node stopped: ``receiving`` → ``ready`` (stable) → ``classifying`` →
``classified`` (or ``skipped`` / ``failed``). A new instance for a study in any
state sends it back to ``receiving``; its next result is a new revision.

A study found still receiving at a restart is marked *interrupted*: its report is
flagged PARTIAL, unless more of it arrives after the restart.

Quiet time counts only while the node listens: after a (re)start, a study that was
still receiving gets ``stable_seconds`` again, because the rest of it could not arrive
while the node was down (the sending PACS is retrying).
"""

from __future__ import annotations

import logging
import time

from dicom_node.jobs import JobDatabase

log = logging.getLogger("dicom_node.assembler")


class StudyAssembler:
    """Mark studies stable.

    Parameters
    ----------
    db : JobDatabase
    stable_seconds : float
        Quiet time after the last instance before a study counts as complete.
    """

    def __init__(self, db: JobDatabase, stable_seconds: float) -> None:
        self.db = db
        self.stable_seconds = float(stable_seconds)
        self.started = time.time()

    def recover(self) -> int:
        """After a restart: studies caught mid-classification are classified again, and studies
        caught receiving are marked interrupted. Returns the number classified again."""
        self.started = time.time()
        n, interrupted = self.db.recover_after_restart()
        if n:
            log.info("%d studies were being classified when the node stopped; classifying them again", n)
        if interrupted:
            log.warning("%d studies were still arriving when the node stopped; their reports will be flagged "
                        "PARTIAL unless the rest arrives", interrupted)
        return n

    def seconds_until_next_stable(self, now: float | None = None) -> float:
        """Seconds until the next study still receiving becomes stable (``inf`` when none is)."""
        now = time.time() if now is None else now
        last = self.db.receiving_since()
        if last is None:
            return float("inf")
        return max(0.0, max(last, self.started) + self.stable_seconds - now)

    def poll(self, now: float | None = None) -> list[str]:
        """Mark every study quiet for ``stable_seconds`` as ready; return their UIDs."""
        now = time.time() if now is None else now
        cutoff = now - self.stable_seconds
        if self.started > cutoff:
            # Within stable_seconds of the start: a study from before it may still be arriving, and one
            # that began since cannot be quiet for long enough yet.
            return []
        ready = self.db.mark_stable(cutoff, now)
        for uid in ready:
            log.debug("study %s is stable", uid)
        return ready
