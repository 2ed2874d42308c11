"""Group commit in the spool: concurrent stores share one folder fsync and one SQLite commit,
and each returns only once its instance is on disk and committed."""

from __future__ import annotations

import sqlite3
import threading

from dicom_node.jobs import JobDatabase
from dicom_node.spool import Spool

from .conftest import wait_until


def _store(spool: Spool, i: int, study: str, results: dict[int, object]) -> None:
    try:
        results[i] = spool.store(f"instance {i}".encode(), study_uid=study, series_uid="1.2.3.4",
                                 sop_uid=f"1.2.3.5.{i}", sop_class="1.2.840.10008.5.1.4.1.1.2", modality="CT",
                                 calling_ae="LOAD")
    except Exception as e:  # reported by the test
        results[i] = e


def test_concurrent_stores_wait_for_one_shared_commit(tmp_path):
    db = JobDatabase(tmp_path / "node.db")
    spool = Spool(tmp_path, db)
    results: dict[int, object] = {}
    # Another connection holds SQLite's write lock: the first store commits in its own thread
    # and waits for the lock; the seven after it queue for the committer thread meanwhile.
    blocker = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    threads = [threading.Thread(target=_store, args=(spool, 0, "1.2.3.1", results))]
    threads[0].start()
    wait_until(lambda: spool.committer._busy, what="the first store to start its commit")
    for i in range(1, 8):
        threads.append(threading.Thread(target=_store, args=(spool, i, "1.2.3.1" if i < 4 else "1.2.3.2", results)))
        threads[-1].start()
    wait_until(lambda: len(spool.committer._queue) == 7, what="seven stores queued behind the first")
    assert results == {}  # nobody is acknowledged before its commit
    blocker.execute("COMMIT")
    blocker.close()
    for t in threads:
        t.join()

    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert spool.committer.batches == 2 and spool.committer.committed == 8  # 1 alone, then 7 together
    rows = {r["sop_uid"]: dict(r) for r in db.query("SELECT * FROM instances")}
    assert len(rows) == 8
    for i, path in results.items():
        assert path.read_bytes() == f"instance {i}".encode()
        assert rows[f"1.2.3.5.{i}"]["path"] == str(path)
    studies = {r["study_uid"]: r["n_instances"] for r in db.query("SELECT * FROM studies")}
    assert studies == {"1.2.3.1": 4, "1.2.3.2": 4}
    assert not list((tmp_path / "spool").rglob("*.part"))

    spool.close()  # after close, a store commits in its caller's thread
    _store(spool, 8, "1.2.3.2", results)
    assert db.query("SELECT n_instances FROM studies WHERE study_uid='1.2.3.2'")[0]["n_instances"] == 5
    db.close()


def test_a_store_that_cannot_commit_gets_the_error_and_others_are_unaffected(tmp_path):
    db = JobDatabase(tmp_path / "node.db")
    spool = Spool(tmp_path, db)
    results: dict[int, object] = {}
    _store(spool, 0, "1.2.3.1", results)
    # A trigger makes the database refuse one instance (as a full disk or a constraint would).
    with db.connect() as c:
        c.execute("CREATE TRIGGER refuse BEFORE INSERT ON instances WHEN NEW.sop_uid = '1.2.3.5.2' "
                  "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    blocker = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    threads = [threading.Thread(target=_store, args=(spool, 1, "1.2.3.1", results))]
    threads[0].start()
    wait_until(lambda: spool.committer._busy, what="the first store to start its commit")
    for i in (2, 3):
        threads.append(threading.Thread(target=_store, args=(spool, i, "1.2.3.1", results)))
        threads[-1].start()
    wait_until(lambda: len(spool.committer._queue) == 2, what="two stores queued")
    blocker.execute("COMMIT")
    blocker.close()
    for t in threads:
        t.join()

    assert isinstance(results[2], sqlite3.DatabaseError) and "refused" in str(results[2])
    assert not isinstance(results[1], Exception) and not isinstance(results[3], Exception)
    assert {r["sop_uid"] for r in db.query("SELECT sop_uid FROM instances")} == {"1.2.3.5.0", "1.2.3.5.1",
                                                                                   "1.2.3.5.3"}
    assert db.query("SELECT n_instances FROM studies")[0]["n_instances"] == 3
    spool.close()
    db.close()
