"""The node's command line: Ctrl-C and SIGTERM stop it cleanly (even while it starts), a busy port is one line, and
``medclass quickstart`` ends by starting it (``--no-node`` skips that)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from dicom_node.cli import main as node_main
from medclass.cli import main as medclass_main

from .conftest import HOST, child_processes, free_port, ingest_helpers, pool_processes, wait_until


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_node_cleanly(sig, node_process, checkpoint, tmp_path):
    port = free_port()
    node = node_process(["--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                         "--scp-processes", "2"], port).start()
    assert len(ingest_helpers(node.proc.pid)) == 1
    # The preparing pool (preprocess_on_arrival, on by default) is started with the node.
    wait_until(lambda: pool_processes(node.proc.pid), 60, what="the node's preparing pool")
    helpers = list(child_processes(node.proc.pid))
    os.kill(node.proc.pid, sig)
    assert node.proc.wait(30) == 0
    log = node.log_path.read_text()
    assert "Traceback" not in log
    assert f"medclass node MEDCLASS on port {port}" in log and "stopped" in log
    # Stopped with the node, not orphaned. multiprocessing's resource tracker (of the preparing pool) ends
    # when it sees the node's end of its pipe close, just after the node; a zombie holds nothing (in a
    # container nobody may reap it).
    wait_until(lambda: all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
                           for pid in helpers), 30, what="the node's processes to end")
    with socket.socket() as s:  # the port is free again
        s.bind((HOST, port))


def test_ctrl_c_while_the_node_is_starting_stops_it_cleanly(checkpoint, tmp_path):
    """The signal lands while the ingest processes start: the node still stops in order."""
    port = free_port()
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "medclass", "node", "--port", str(port), "--bind", HOST,
                                 "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "data"),
                                 "--device", "cpu", "--scp-processes", "3"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "listening on" in log_path.read_text(), 60, 0.01, "the node's first listener")
            os.kill(proc.pid, signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
    text = log_path.read_text()
    assert "Traceback" not in text and "stopped" in text
    with socket.socket() as s:  # no helper was left holding the port
        s.bind((HOST, port))


def test_a_busy_port_is_one_line(checkpoint, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert node_main(["--port", str(port), "--bind", HOST, "--checkpoint", str(checkpoint),
                          "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on {HOST}:{port}" in err and "--port" in err


@pytest.mark.parametrize("no_node", [False, True])
def test_quickstart_ends_by_starting_the_node(no_node, checkpoint, tmp_path, monkeypatch, capsys):
    # The model exists, so quickstart only evaluates it; evaluation is not under test here
    # (tests/test_tasks.py runs the real quickstart with --no-node).
    out = tmp_path / "qs"
    out.mkdir()
    shutil.copy(checkpoint, out / "model.pt")
    monkeypatch.setattr("medclass.evaluation.evaluate_checkpoint", lambda *a, **k: {})
    monkeypatch.setattr("medclass.metrics.format_metrics", lambda m: "AUC 0.99")
    started = []
    monkeypatch.setattr("dicom_node.cli.main", lambda argv: started.append(argv) or 0)

    args = ["quickstart", "--out", str(out), "--device", "cpu", "-q", "--node-port", "11999"]
    assert medclass_main(args + (["--no-node"] if no_node else [])) == 0
    text = capsys.readouterr().out
    if no_node:
        assert started == [] and "DicomModalities" not in text
        return
    assert started == [["--checkpoint", str(out / "model.pt"), "--port", "11999"]]
    # How to point a PACS at it comes before the node starts serving.
    assert '"DicomModalities" : { "medclass" : [ "MEDCLASS"' in text and "11999" in text
    assert "/modalities/medclass/store" in text and "Ctrl-C stops it" in text
