"""node.toml and triage: series selection by modality, the allow list with its host, and
``[[forward]]`` rules sending the study to real dcmtk storescp peers with HIGH priority."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.cli import main as node_main
from dicom_node.config import load_config

from .conftest import HOST, dcmtk_env, free_port, needs_dcmtk, storescu, study_state, wait_until

NODE_TOML = """\
ae_title = "MEDCLASS"
port = {port}
bind = "{host}"
data_dir = "data"
stable_seconds = 1
device = "cpu"
retry_base_seconds = 0.5
retry_max_seconds = 2.0

[[allow]]
ae_title = "STORESCU"
host = "{host}"

[[routes]]                       # CT goes to the chest model; nothing else is classified
modality = "CT"
checkpoint = "models/chest.pt"

[[forward]]                      # surely fires: a probability is >= 0
when = "pneumonia >= 0.0"
to = "URGENT@{host}:{urgent}"
priority = "high"

[[forward]]                      # surely fires too, to an archive that accepts every transfer syntax
when = "normal >= 0.0"
to = "ARCHIVE@{host}:{archive}"

[[forward]]                      # never fires: no probability exceeds 1 (a threshold above 1 is refused at start)
when = "pneumonia > 1.0"
to = "NEVER@{host}:{never}"
priority = "high"
"""


def _sop_uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


@needs_dcmtk
def test_node_toml_routes_by_modality_and_forwards_by_result_with_high_priority(
        tmp_path, checkpoint, ct_study, storescp_factory, node_factory, capsys):
    urgent = storescp_factory("URGENT")  # uncompressed only: the node decompresses JPEG-LS and RLE for it
    archive = storescp_factory("ARCHIVE", accept_all=True)  # gets every instance as received
    never = storescp_factory("NEVER", accept_all=True)
    (tmp_path / "models").mkdir()
    shutil.copy(checkpoint, tmp_path / "models" / "chest.pt")
    toml = tmp_path / "node.toml"
    toml.write_text(NODE_TOML.format(port=free_port(), host=HOST, urgent=urgent.port, archive=archive.port,
                                     never=never.port))

    cfg = load_config(toml)
    assert cfg.data_dir == str(tmp_path / "data")  # relative to the file
    assert cfg.routes == [{"modality": "CT", "checkpoint": str(tmp_path / "models" / "chest.pt")}]
    assert cfg.checkpoint is None  # rules given: no default model, an MR study is not classified
    assert cfg.allow == [{"ae_title": "STORESCU", "host": HOST}]
    assert [r["to"].split("@")[0] for r in cfg.forward] == ["URGENT", "ARCHIVE", "NEVER"]
    node = node_factory(**dataclasses.asdict(cfg))

    # The allow list: the right AE title from the right host only.
    def echo(aet):
        return subprocess.run(["echoscu", "-aet", aet, "-aec", "MEDCLASS", HOST, str(node.port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())

    assert echo("INTRUDER").returncode != 0
    assert echo("STORESCU").returncode == 0
    # The right AE title from another host (127.0.0.2 is loopback too on Linux) is refused.
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(HOST, node.port, ae_title="MEDCLASS", bind_address=("127.0.0.2", 0))
    assert not assoc.is_established
    # Counted wherever the kernel sent the connection (an ingest helper reports within a quarter second).
    wait_until(lambda: node.metrics.rejected.labels("host")._value.get() == 1, 10, 0.05, "the refusal counted")

    ct_uid = str(pydicom.dcmread(ct_study[0], stop_before_pixels=True).StudyInstanceUID)
    mr = get_testdata_file("MR_small.dcm")
    mr_uid = str(pydicom.dcmread(mr, stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, ct_study).returncode == 0
    assert storescu(node.port, [mr]).returncode == 0

    wait_until(lambda: study_state(node, ct_uid) == "classified", 60, what="the CT study to be classified")
    wait_until(lambda: study_state(node, mr_uid) == "skipped", 60, what="the MR study to be skipped")
    assert "no model matches series" in node.db.query("SELECT error FROM studies WHERE study_uid=?",
                                                      (mr_uid,))[0]["error"]
    wait_until(lambda: [r["state"] for r in node.db.query("SELECT state FROM outbox WHERE kind='forward'")]
               == ["sent", "sent"], 60, what="both forwards delivered")
    rows = node.db.outbox(ct_uid)
    assert [(r["destination"].split("@")[0], r["urgency"]) for r in rows] == [
        ("URGENT", "urgent"), ("ARCHIVE", "routine")]  # sent with DIMSE priority HIGH and MEDIUM (below)

    # Every instance of the study arrived, with HIGH priority at URGENT.
    sent = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in ct_study}
    assert _sop_uids(urgent.received()) == set(sent) == _sop_uids(archive.received())
    assert len(urgent.received()) == len(archive.received()) == len(ct_study)
    assert len(re.findall(r"Priority\s*:\s*high", urgent.log_path.read_text())) == len(ct_study)
    assert len(re.findall(r"Priority\s*:\s*medium", archive.log_path.read_text())) == len(ct_study)
    for p in archive.received():  # as received: the compressed transfer syntaxes are kept
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == sent[str(ds.SOPInstanceUID)].file_meta.TransferSyntaxUID
    for p in urgent.received():  # decompressed for a peer that accepts only uncompressed, losslessly
        ds = pydicom.dcmread(p)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(ds.pixel_array, sent[str(ds.SOPInstanceUID)].pixel_array)
    assert never.received() == []

    result = json.loads(node.db.query("SELECT result FROM studies WHERE study_uid=?", (ct_uid,))[0]["result"])[0]
    assert result["routed"] == [f"URGENT@{HOST}:{urgent.port}", f"ARCHIVE@{HOST}:{archive.port}"]

    capsys.readouterr()
    assert node_main(["status", "--config", str(toml)]) == 0
    table = capsys.readouterr().out
    ct_line = next(line for line in table.splitlines() if ct_uid[-20:] in line)
    assert "classified" in ct_line and "URGENT yes, ARCHIVE yes" in ct_line and "NEVER" not in table
    mr_line = next(line for line in table.splitlines() if mr_uid[-20:] in line)
    assert "skipped" in mr_line and "no model matches series" in mr_line


_BAD = {
    "not TOML": ("port = \n", "is not valid TOML"),
    "misspelt key": ("stable_second = 5\n", "did you mean 'stable_seconds'"),
    "wrong type": ('port = "eleven"\n', "port = 'eleven' should be an integer"),
    "bad destination": ('[[forward]]\nwhen = "pneumonia >= 0.8"\nto = "URGENT"\n', "is not AET@HOST:PORT"),
    "bad condition": ('[[forward]]\nwhen = "pneumonia is high"\nto = "URGENT@127.0.0.1:104"\n',
                      "is not '<class> >= <number>'"),
    "bad priority": ('[[forward]]\nwhen = "pneumonia >= 0.8"\nto = "URGENT@127.0.0.1:104"\npriority = "stat"\n',
                     "priority 'stat' is unknown"),
    "misspelt rule key": ('[[routes]]\nmodalty = "CT"\ncheckpoint = "chest.pt"\n', "unknown keys ['modalty']"),
    "bad regex": ('[[routes]]\nseries_description = "(chest"\ncheckpoint = "chest.pt"\n',
                  "is not a valid regular expression"),
    "missing model": ('[[routes]]\nmodality = "CT"\ncheckpoint = "missing.pt"\n', "no such checkpoint"),
    "allow without AE title": ('[[allow]]\nhost = "10.0.0.5"\n', "needs 'ae_title'"),
    "tls without key": ('[tls]\ncert = "node.crt"\n', "needs 'cert' and 'key'"),
    "tls send not a list": ('[tls]\ncert = "node.crt"\nkey = "node.key"\nsend = "ORTHANC"\n',
                            "should be true, false or a list of AE titles"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_a_bad_node_toml_is_one_line_with_a_remedy(case, tmp_path, capsys):
    text, expected = _BAD[case]
    toml = tmp_path / "node.toml"
    toml.write_text(f'data_dir = "data"\nport = {free_port()}\n' + text if case not in ("not TOML", "wrong type")
                    else text)
    assert node_main(["--config", str(toml)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("medclass node: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "; " in err  # the remedy follows the problem
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_missing_node_toml_is_one_line(tmp_path, capsys):
    assert node_main(["--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such config file" in err and "; " in err
