"""Configuration mistakes stop the node at start with one line and a remedy, never a traceback."""

from __future__ import annotations

import socket

import pytest

from dicom_node.cli import main as node_main
from medclass.cli import main as medclass_main

from .conftest import HOST, free_port


def assert_one_line(capsys, *fragments: str) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("medclass node: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "; " in err  # the remedy follows the problem
    for f in fragments:
        assert f in err, err
    return err


def test_config_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "conf").mkdir()
    assert medclass_main(["node", "--config", str(tmp_path / "conf")]) == 2
    assert_one_line(capsys, "is a folder, not a file", str(tmp_path / "conf" / "node.toml"))


def test_config_that_is_a_binary_file(tmp_path, capsys, br35h_dir):
    picture = sorted((br35h_dir / "yes").glob("*.jpg"))[0]  # a JPEG given by mistake
    assert node_main(["--config", str(picture)]) == 2
    assert_one_line(capsys, "is not a text file")


@pytest.mark.parametrize("where", ["flags", "toml"])
def test_metrics_port_equal_to_the_dicom_port(where, tmp_path, capsys):
    port = free_port()
    if where == "flags":
        args = ["--port", str(port), "--metrics-port", str(port), "--checkpoint", "model.pt"]
    else:
        toml = tmp_path / "node.toml"
        toml.write_text(f'port = {port}\nmetrics_port = {port}\ncheckpoint = "model.pt"\ndata_dir = "data"\n')
        args = ["--config", str(toml)]
    assert node_main(args) == 2
    assert_one_line(capsys, f"metrics_port {port} is the DICOM port", "--metrics-port")
    assert not (tmp_path / "data").exists()  # refused before anything was created


@pytest.mark.parametrize("flag, value", [
    ("--return-to", "PACS@127.0.0.1:{port}"),
    ("--return-to", "MEDCLASS@localhost:{port}"),
])
def test_sending_to_the_node_itself(flag, value, capsys):
    port = free_port()
    assert node_main(["--port", str(port), flag, value.format(port=port), "--checkpoint", "model.pt"]) == 2
    assert_one_line(capsys, "is this node itself")


def test_a_forward_rule_to_the_node_itself(tmp_path, capsys):
    port = free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(f'port = {port}\ncheckpoint = "model.pt"\n[[forward]]\nwhen = "pneumonia >= 0.5"\n'
                    f'to = "MEDCLASS@127.0.0.1:{port}"\n')
    assert node_main(["--config", str(toml)]) == 2
    assert_one_line(capsys, "[[forward]] to", "is this node itself")


def test_a_metrics_port_taken_by_another_program(checkpoint, tmp_path, capsys):
    port = free_port()
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert node_main(["--port", str(port), "--bind", HOST, "--metrics-port", str(taken), "--checkpoint",
                          str(checkpoint), "--data-dir", str(tmp_path / "data"), "--scp-processes", "2"]) == 2
    assert_one_line(capsys, f"cannot serve /metrics on {HOST}:{taken}", "--metrics-port")
    with socket.socket() as s:  # the DICOM port was let go again
        s.bind((HOST, port))
