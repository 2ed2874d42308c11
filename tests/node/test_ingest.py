"""Several ingest processes on one port (``scp_processes``) and the event-driven association reactors.

The node's own process and its helpers all listen on the port (``SO_REUSEPORT``); the
kernel spreads associations over them. These tests check that the helpers really take
associations and store durably, that their counts reach ``/metrics``, that a helper
that dies is replaced while the node keeps serving, and that a ``kill -9`` of the node
takes its helpers with it (none is left holding the port).
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import NodeConfig, default_processes
from dicom_node.fastpath import AVAILABLE
from dicom_node.fastpath.reactor import EventAssociation
from medclass.errors import MedClassError

from .conftest import (
    HOST,
    child_processes,
    free_port,
    ingest_helpers,
    needs_dcmtk,
    pool_processes,
    storescu,
    wait_until,
)
from .test_load import write_ct_instances


def echo(port: int) -> int:
    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="MEDCLASS")
    assert assoc.is_established
    status = assoc.send_c_echo().Status
    assoc.release()
    return status


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_default_processes_follow_the_cores_up_to_four():
    n = default_processes()
    assert 1 <= n <= 4
    assert n == min(4, len(os.sched_getaffinity(0)))
    assert NodeConfig(scp_processes=0).ingest_processes == n
    assert NodeConfig(scp_processes=3).ingest_processes == 3
    with pytest.raises(MedClassError, match="scp_processes"):
        NodeConfig(scp_processes=-1)


@needs_dcmtk
def test_helpers_take_associations_and_store_durably(node_factory, tmp_path):
    node = node_factory(stable_seconds=3600, scp_processes=3, metrics_port=-1)
    assert len(node.helpers.pids) == 2
    by_study = write_ct_instances(tmp_path / "in", 48, 2)
    files = sorted(p for ps in by_study.values() for p in ps)
    # 16 associations of 3 instances: the chance that the kernel gives none to a helper is (1/3)^16.
    procs = [subprocess.Popen(["storescu", "-aet", f"MP{k}", "-aec", "MEDCLASS", HOST, str(node.port),
                               *map(str, files[k::16])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for k in range(16)]
    for p in procs:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out[-2000:]
    rows = node.db.query("SELECT path, size FROM instances")
    assert len(rows) == len(files)
    assert all(os.path.getsize(r["path"]) == r["size"] for r in rows)
    assert {r["study_uid"]: r["n_instances"] for r in node.db.query("SELECT * FROM studies")} == \
        {uid: len(ps) for uid, ps in by_study.items()}
    # Every instance is counted once in /metrics, whichever process stored it (helpers report within 0.25 s) ...
    wait_until(lambda: metric(node.metrics_port, "medclass_node_instances_received_total") == len(files), 10, 0.1,
               "every instance in /metrics")
    # ... and the helpers did store some of them.
    assert node.helpers.reported > 0


@needs_dcmtk
def test_a_helper_that_dies_is_replaced_and_the_node_keeps_serving(node_factory, ct_study):
    node = node_factory(stable_seconds=3600, scp_processes=2)
    (old,) = node.helpers.pids
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: node.helpers.restarts == 1 and len(node.helpers.pids) == 1, 60, 0.1, "a new helper")
    assert node.helpers.pids != [old]
    for _ in range(6):  # whichever process the kernel picks, each answers
        assert echo(node.port) == 0
    assert storescu(node.port, ct_study).returncode == 0
    assert len(node.db.query("SELECT * FROM instances")) == len(ct_study)


def test_kill_9_of_the_node_takes_its_helpers_and_frees_the_port(node_process, checkpoint, tmp_path):
    port = free_port()
    args = ["--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "data"), "--stable-seconds", "3600",
            "--device", "cpu", "--scp-processes", "3"]
    node = node_process(args, port).start()
    assert len(ingest_helpers(node.proc.pid)) == 2
    # The preparing pool (preprocess_on_arrival, on by default) must end with the node too.
    wait_until(lambda: pool_processes(node.proc.pid), 60, what="the node's preparing pool")
    children = list(child_processes(node.proc.pid))
    node.kill9()

    def gone() -> bool:
        return all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
                   for pid in children)

    wait_until(gone, 30, 0.1, "the helpers and the pool to end with the node")
    # Nothing listens any more, so a new node (any number of processes) gets every association.
    node = node_process([*args[:-1], "1"], port).start()
    assert echo(port) == 0


def test_a_port_taken_by_another_program_is_an_error_at_start(checkpoint, tmp_path):
    import socket

    from dicom_node.node import DicomNode

    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        cfg = NodeConfig(port=s.getsockname()[1], bind=HOST, data_dir=str(tmp_path / "d"),
                         checkpoint=str(checkpoint), scp_processes=2)
        with pytest.raises(MedClassError, match="cannot listen"):
            DicomNode(cfg).start()


@pytest.mark.skipif(not AVAILABLE, reason="event-driven reactors need pynetdicom 3.0.4")
def test_incoming_associations_use_the_event_driven_reactor(node_factory):
    node = node_factory(scp_processes=1)
    seen = []
    node.scp.server.bind(__import__("pynetdicom").evt.EVT_C_ECHO,
                         lambda event: seen.append(type(event.assoc)) or 0)
    assert echo(node.port) == 0
    assert seen == [EventAssociation]
    # An association released and one aborted both end their threads (the reactors do not wait forever).
    ae = AE(ae_title="ABORT")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS")
    assert assoc.is_established
    assoc.abort()
    wait_until(lambda: not node.scp.server.active_associations, 10, 0.05, "the acceptor threads to end")
