"""Privacy of the log (no patient identifiers at the default level) and several models for one study."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.cli import main as node_main
from dicom_node.config import load_config
from medclass.sr import read_classification_sr

from .conftest import HOST, free_port, needs_dcmtk, storescu, study_state, wait_until

IDENTIFIERS = {
    "PatientName": "Zyxwvut^Quillibert",
    "PatientID": "PID-8675309-QX",
    "PatientBirthDate": "19230817",
    "AccessionNumber": "ACC-5551234-ZQ",
}


def _study(out: Path, descriptions: list[str], per_series: int = 1, **attrs) -> list[Path]:
    """A study from CT_small.dcm: one series per description, new UIDs, ``attrs`` set on every instance."""
    out.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study = pydicom.uid.generate_uid()
    paths = []
    for s, desc in enumerate(descriptions):
        series = pydicom.uid.generate_uid()
        for i in range(per_series):
            ds = copy.deepcopy(src)
            for k, v in attrs.items():
                setattr(ds, k, v)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = desc
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.InstanceNumber = i + 1
            p = out / f"s{s}i{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
    return paths


@needs_dcmtk
def test_no_patient_identifiers_in_the_log_at_the_default_level(tmp_path, node_factory, storescp_factory, caplog):
    # The node's default level, as `medclass node` sets it: INFO, pynetdicom at WARNING.
    # pynetdicom first: each caplog.set_level also sets caplog's handler level, and the last call wins.
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    caplog.set_level(logging.INFO)
    pacs = storescp_factory("PACS", accept_all=True)
    paths = _study(tmp_path / "study", ["AXIAL", "SCOUT"], per_series=2, **IDENTIFIERS)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    node = node_factory(return_to=f"PACS@{HOST}:{pacs.port}")

    r = storescu(node.port, paths)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: study_state(node, study_uid) == "classified", 60, what="the study to be classified")
    wait_until(lambda: [o["state"] for o in node.db.query("SELECT state FROM outbox WHERE kind='sr'")] == ["sent"],
               60, what="the SR to be sent")
    srs = wait_until(pacs.received, 30, 0.2, "the SR at the PACS")
    sr = pydicom.dcmread(srs[0])
    assert sr.PatientID == IDENTIFIERS["PatientID"]  # the identifiers did travel through the node

    log_text = caplog.text + "\n".join(rec.getMessage() for rec in caplog.records)
    assert study_uid in log_text  # the log names the study by UID ("study ... classified", "SR ... delivered")
    for key, value in IDENTIFIERS.items():
        for form in {value, value.replace("^", " ")}:
            assert form not in log_text, f"{key} appears in the node's log"


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    """Another tiny model (cnn-gru) on the same data: a different model name in its card."""
    from medclass.training import TrainConfig, train

    out = tmp_path_factory.mktemp("node-model-gru")
    res = train(TrainConfig(data="chest-pneumonia", model="cnn-gru", image_size=32, epochs=1, device="cpu",
                            progress=False, out=str(out)))
    return Path(res.checkpoint)


ROUTES_TOML = """\
ae_title = "MEDCLASS"
port = {port}
bind = "{host}"
data_dir = "data"
stable_seconds = 1
device = "cpu"
return_to = "PACS@{host}:{pacs}"
retry_base_seconds = 0.5
retry_max_seconds = 2.0

[[routes]]                       # the scout series, by its description, to the GRU model
series_description = "(?i)^scout"
checkpoint = "{gru}"

[[routes]]                       # every other CT series to the ResNet
modality = "CT"
checkpoint = "{resnet}"
"""


@needs_dcmtk
def test_one_study_two_series_two_models(tmp_path, checkpoint, second_checkpoint, node_factory, storescp_factory,
                                         capsys):
    pacs = storescp_factory("PACS", accept_all=True)
    toml = tmp_path / "node.toml"
    toml.write_text(ROUTES_TOML.format(port=free_port(), host=HOST, pacs=pacs.port, gru=second_checkpoint,
                                       resnet=checkpoint))
    cfg = load_config(toml)
    assert [r["checkpoint"] for r in cfg.routes] == [str(second_checkpoint), str(checkpoint)]
    node = node_factory(**dataclasses.asdict(cfg))

    paths = _study(tmp_path / "study", ["AXIAL 5mm", "Scout"], per_series=2)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    study_uid = str(headers[0].StudyInstanceUID)
    axial, scout = str(headers[0].SeriesInstanceUID), str(headers[-1].SeriesInstanceUID)
    assert axial != scout

    r = storescu(node.port, paths)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: study_state(node, study_uid) == "classified", 120, what="the study to be classified")
    results = json.loads(node.db.query("SELECT result FROM studies WHERE study_uid=?", (study_uid,))[0]["result"])
    by_model = {res["model"]: res for res in results}
    assert set(by_model) == {"resnet18", "cnn-gru"}
    assert by_model["resnet18"]["series"] == [axial] and by_model["resnet18"]["images"] == 2
    assert by_model["cnn-gru"]["series"] == [scout] and by_model["cnn-gru"]["images"] == 2

    # One SR per model arrives at the PACS, each naming its own model (TID 4019) with its own probabilities.
    wait_until(lambda: [o["state"] for o in node.db.query("SELECT state FROM outbox WHERE kind='sr'")]
               == ["sent", "sent"], 60, what="both SRs sent")
    srs = [pydicom.dcmread(p) for p in wait_until(lambda: len(pacs.received()) == 2 and pacs.received(), 30, 0.2,
                                                  "both SRs at the PACS")]
    parsed = {v["algorithm"][0]: v for v in map(read_classification_sr, srs)}
    assert set(parsed) == {"resnet18", "cnn-gru"}
    for model, values in parsed.items():
        assert values["study_uid"] == study_uid
        assert values["probabilities"] == pytest.approx(by_model[model]["probabilities"])
    for sr in srs:  # each SR references only the images of the series its model classified
        model = read_classification_sr(sr)["algorithm"][0]
        referenced = {str(s.SeriesInstanceUID) for st in sr.CurrentRequestedProcedureEvidenceSequence
                      for s in st.ReferencedSeriesSequence}
        assert referenced == {axial if model == "resnet18" else scout}

    capsys.readouterr()
    assert node_main(["status", "--config", str(toml)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if study_uid[-20:] in line)
    assert "classified" in line and "resnet18: " in line and "cnn-gru: " in line and "yes, yes" in line
