"""Operating points and "uncertain" end to end: ``train`` -> checkpoint card -> [[forward]] rule -> SR.

A short seeded resnet18 on real Br35H (brain MRI, "no tumour" / "tumour") is the model; the
studies are pydicom's MR test files; the PACS is a real Orthanc, the triage destinations are
dcmtk storescp, the report is read with dsrdump and validated with dciodvfy. Whatever the
model learned, a rule must fire exactly when the result crosses the threshold the node
printed at start, and the report must carry that operating point.
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.cli import main as node_main
from dicom_node.router import StudyRouter
from medclass.checkpoint import read_card
from medclass.errors import MedClassError
from medclass.sr import build_classification_sr, read_classification_sr

from .conftest import HOST, free_port, needs_dcmtk, needs_orthanc, storescu, study_state, wait_until

MR_FILES = ("MR_small.dcm", "MR_small_RLE.dcm")


@pytest.fixture(scope="module")
def br35h_checkpoint(tmp_path_factory) -> Path:
    """resnet18 on Br35H, 32 px, one epoch on 400 training images (seeded): calibrated at the end of train()."""
    from medclass.training import TrainConfig, train

    out = tmp_path_factory.mktemp("br35h-model")
    res = train(TrainConfig(data="br35h", model="resnet18", image_size=32, epochs=1, limit=400, device="cpu", seed=0,
                            progress=False, out=str(out)))
    return Path(res.checkpoint)


def _mr_studies(out: Path) -> list[list[Path]]:
    """One single-image MR study per pydicom MR test file (new UIDs), each its own study."""
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    for i, name in enumerate(MR_FILES):
        try:
            src = pydicom.dcmread(get_testdata_file(name))
        except Exception:  # a test file this pydicom-data lacks
            continue
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        p = out / f"mr{i}.dcm"
        ds.save_as(p)
        studies.append([p])
    return studies


def _card_without_calibration(card: dict) -> dict:
    return {k: v for k, v in card.items() if k != "calibration"}


# --------------------------------------------------------------------------- rules checked at start
def test_rules_are_checked_against_the_models_at_start(br35h_checkpoint):
    card = read_card(br35h_checkpoint)
    cards = {str(br35h_checkpoint): card}
    to = f"URGENT@{HOST}:104"
    with pytest.raises(MedClassError, match="did you mean 'tumour'"):
        StudyRouter([{"when": "tumor >= 0.8", "to": to}], cards)
    with pytest.raises(MedClassError, match="did you mean 'tumour'"):
        StudyRouter([{"when": "tumor at sensitivity >= 0.9", "to": to}], cards)
    with pytest.raises(MedClassError, match="between 0 and 1"):
        StudyRouter([{"when": "tumour >= 1.5", "to": to}], cards)
    for target in ("0", "1.2", "-0.1"):
        with pytest.raises(MedClassError, match=r"must be in \(0, 1\]"):
            StudyRouter([{"when": f"tumour at specificity >= {target}", "to": to}], cards)
    with pytest.raises(MedClassError, match="no validation ROC"):
        StudyRouter([{"when": "tumour at sensitivity >= 0.9", "to": to}],
                    {"old.pt": _card_without_calibration(card)})
    with pytest.raises(MedClassError, match="conformal"):
        StudyRouter([{"when": "uncertain", "to": to}], {"old.pt": _card_without_calibration(card)})
    # Valid rules: the operating point is the validation threshold reaching the target.
    router = StudyRouter([{"when": "tumour at sensitivity >= 0.9", "to": to}, {"when": "uncertain", "to": to}], cards)
    op = router.operating_points(str(br35h_checkpoint))[0]
    assert op["val_sensitivity"] >= 0.9 and 0 <= op["threshold"] <= 1
    assert op["test_sensitivity"] is not None and op["test_specificity"] is not None


def test_node_with_a_misspelt_class_exits_with_one_line(br35h_checkpoint, tmp_path, capsys):
    toml = tmp_path / "node.toml"
    toml.write_text(f'port = {free_port()}\nbind = "{HOST}"\ndata_dir = "data"\ndevice = "cpu"\n'
                    f'checkpoint = "{br35h_checkpoint}"\n\n'
                    f'[[forward]]\nwhen = "tumor >= 0.8"\nto = "URGENT@{HOST}:104"\n')
    assert node_main(["--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'tumor'" in err and "'tumour'" in err


# --------------------------------------------------------------------------- the report
@pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None,
                    reason="dicom3tools / dcmtk not installed")
def test_sr_codes_an_operating_point_and_an_indeterminate_set(br35h_checkpoint, tmp_path):
    card = read_card(br35h_checkpoint)
    from medclass.calibration import operating_point

    op = operating_point(card, "tumour", "sensitivity", 0.9)
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    probs = {"no tumour": 0.45, "tumour": 0.55}
    sr = build_classification_sr([src], card, probs, "tumour", operating_points=[op],
                                 prediction_set=["no tumour", "tumour"], coverage=0.95)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    assert [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")] == []
    d = subprocess.run(["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stderr
    assert "Operating point threshold for tumour" in d.stdout and "Indeterminate" in d.stdout
    values = read_classification_sr(pydicom.dcmread(path))
    assert values["probabilities"] == pytest.approx(probs)
    assert values["measurements"]["Operating point threshold for tumour"] == pytest.approx(op["threshold"])
    assert values["measurements"]["Operating point target sensitivity for tumour"] == pytest.approx(0.9)
    assert values["conformal"] == ("SCT", "82334004", "Indeterminate")
    # A set of one class is coded as that class, not as indeterminate.
    one = build_classification_sr([src], card, probs, "tumour", prediction_set=["tumour"], coverage=0.95)
    assert read_classification_sr(one)["conformal"][1] == "126952004"


# --------------------------------------------------------------------------- end to end
@needs_dcmtk
@needs_orthanc
def test_operating_point_rule_forwards_exactly_when_the_printed_threshold_is_crossed(
        br35h_checkpoint, node_factory, orthanc_factory, storescp_factory, tmp_path, caplog):
    node_port = free_port()
    pacs = orthanc_factory({"medclass": ["MEDCLASS", HOST, node_port]})
    urgent = storescp_factory("URGENT", accept_all=True)
    review = storescp_factory("REVIEW", accept_all=True)
    ckpt = str(br35h_checkpoint)
    with caplog.at_level(logging.INFO, logger="dicom_node.router"):
        node = node_factory(port=node_port, checkpoint=ckpt, return_to=f"ORTHANC@{HOST}:{pacs.dicom_port}",
                            coverage=0.95,
                            forward=[{"when": "tumour at sensitivity >= 0.9", "to": f"URGENT@{HOST}:{urgent.port}"},
                                     {"when": "uncertain", "to": f"REVIEW@{HOST}:{review.port}"}])
    op = node.worker.router.operating_points(ckpt)[0]
    printed = [r.getMessage() for r in caplog.records if "threshold" in r.getMessage()]
    assert printed and f"threshold {op['threshold']:.6f}" in printed[0] and "held-out sensitivity" in printed[0]

    studies = _mr_studies(tmp_path / "mr")
    assert studies
    for paths in studies:
        r = storescu(node_port, paths)
        assert r.returncode == 0, r.stderr
    uids = [str(pydicom.dcmread(p[0], stop_before_pixels=True).StudyInstanceUID) for p in studies]
    for uid in uids:
        wait_until(lambda uid=uid: study_state(node, uid) == "classified", 120, what=f"study {uid} classified")
    srs = wait_until(lambda: (lambda s: s if len(s) == len(uids) else None)(pacs.datasets("SR")), 120, 0.5,
                     "one SR per study in Orthanc")
    wait_until(lambda: all(o["state"] == "sent" for o in node.db.query("SELECT state FROM outbox")), 60,
               what="every send done")

    import json

    to_urgent = to_review = 0
    for uid in uids:
        result = json.loads(node.db.query("SELECT result FROM studies WHERE study_uid=?", (uid,))[0]["result"])[0]
        fires = result["probabilities"]["tumour"] >= op["threshold"]
        uncertain = len(result["prediction_set"]) != 1
        forwards = {o["destination"].split("@")[0] for o in node.db.query(
            "SELECT destination FROM outbox WHERE study_uid=? AND kind='forward'", (uid,))}
        assert ("URGENT" in forwards) == fires
        assert ("REVIEW" in forwards) == uncertain
        to_urgent += fires
        to_review += uncertain
        sr = next(s for s in srs if str(s.StudyInstanceUID) == uid)
        values = read_classification_sr(sr)
        assert values["measurements"]["Operating point threshold for tumour"] == pytest.approx(op["threshold"])
        assert values["probabilities"]["tumour"] == pytest.approx(result["probabilities"]["tumour"])
        assert (values["conformal"][1] == "82334004") == uncertain
    # What the destinations received matches the decisions (one image per study).
    assert len(urgent.received()) == to_urgent
    assert len(review.received()) == to_review

    # dsrdump shows the operating point of the report the PACS holds.
    path = tmp_path / "from-orthanc.dcm"
    srs[0].save_as(path, enforce_file_format=True)
    d = subprocess.run(["dsrdump", "+Pt", str(path)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stderr
    assert "Operating point threshold for tumour" in d.stdout and "Held-out sensitivity" in d.stdout
    assert "Conformal prediction result" in d.stdout
