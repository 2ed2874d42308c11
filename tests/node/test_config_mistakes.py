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


_DICOMWEB = '[[dicomweb]]\nname = "pacs-web"\nurl = "https://pacs.example.org/dicom-web"\nusername = "medclass"\n' \
    'password_env = "MEDCLASS_TEST_PACS_PASSWORD"\n'


@pytest.mark.parametrize("toml, fragments", [
    # a name that no [[dicomweb]] table has (a typo)
    ('return_to = "pacs-wbe"\n' + _DICOMWEB,
     ["return_to 'pacs-wbe' is not AET@HOST:PORT, an http(s):// URL, nor the name of a [[dicomweb]] table",
      "['pacs-web']"]),
    ('[[forward]]\nwhen = "uncertain"\nto = "review"\n',
     ["[[forward]] to 'review'", "there is no [[dicomweb]] table"]),
    # the password's environment variable is not set where the node runs
    ('return_to = "pacs-web"\n' + _DICOMWEB,
     ["password_env = 'MEDCLASS_TEST_PACS_PASSWORD'", "is unset or empty", "export MEDCLASS_TEST_PACS_PASSWORD="]),
    # URLs that are not DICOMweb roots
    ('return_to = "htp://pacs.example.org/dicom-web"\n', ["is not an http:// or https:// URL with a host"]),
    ('return_to = "https://user:pw@pacs.example.org/dicom-web"\n', ["carries credentials in the URL", "password_env"]),
    ('return_to = "https://pacs.example.org:99999/dicom-web"\n', ["is not a valid URL"]),
    ('[[dicomweb]]\nname = "pacs-web"\nurl = "pacs.example.org/dicom-web"\n', ["[[dicomweb]] 'pacs-web' url"]),
    # half or two authentications
    ('[[dicomweb]]\nname = "w"\nurl = "https://p/dicom-web"\nusername = "u"\n', ["needs both username and password_env"]),
    ('[[dicomweb]]\nname = "w"\nurl = "https://p/dicom-web"\nusername = "u"\npassword_env = "HOME"\n'
     'token_env = "HOME"\n', ["both basic", "keep one"]),
    ('[[dicomweb]]\nname = "w"\nurl = "https://p/dicom-web"\npassword = "secret"\n', ["unknown keys ['password']"]),
])
def test_dicomweb_mistakes(toml, fragments, tmp_path, capsys, monkeypatch):
    if "is unset or empty" in fragments:
        monkeypatch.delenv("MEDCLASS_TEST_PACS_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("MEDCLASS_TEST_PACS_PASSWORD", "secret")
    path = tmp_path / "node.toml"
    path.write_text(f'checkpoint = "model.pt"\ndata_dir = "data"\n{toml}')
    assert node_main(["--config", str(path)]) == 2
    assert_one_line(capsys, *fragments)
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_dicom_decoder_that_cannot_run_here_stops_the_node_at_start(checkpoint, tmp_path, capsys):
    """dicom_decoder = "nvimgcodec" on a machine without a usable GPU: one line with the reason and the
    remedy at start (not a slow fallback found at the first study); an unknown name likewise."""
    from medclass.io import nvimgcodec_unavailable

    toml = tmp_path / "node.toml"
    toml.write_text(f'dicom_decoder = "gpu"\ncheckpoint = "{checkpoint}"\n')
    assert node_main(["--config", str(toml), "--port", str(free_port())]) == 2
    assert_one_line(capsys, "dicom_decoder = 'gpu' is not a decoder", "'nvimgcodec'")
    why = nvimgcodec_unavailable()
    if why is None:
        pytest.skip("nvImageCodec can run on this machine: there is no mistake to make")
    assert node_main(["--dicom-decoder", "nvimgcodec", "--checkpoint", str(checkpoint), "--port", str(free_port()),
                      "--bind", HOST, "--data-dir", str(tmp_path / "data")]) == 2
    assert_one_line(capsys, "nvImageCodec DICOM decoder cannot run here", why, "gpu-decode")
