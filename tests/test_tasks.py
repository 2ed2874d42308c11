"""Every task type and family through ``medclass train`` on real images: multi-class,
multi-label with report text and header values, ordinal, the classic baseline, a 3D
model on real MR volumes, DDP under torchrun, and the quickstart."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medclass.checkpoint import read_card
from medclass.cli import main
from medclass.inference import Classifier


def _br35h_files(br35h_dir, n):
    return sorted((br35h_dir / "no").glob("*.jpg"))[:n] + sorted((br35h_dir / "yes").glob("*.jpg"))[:n]


def _train(tmp_path, *args):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--image-size", "32", "--epochs", "2", "--batch-size", "16",
                 "--device", "cpu", "-q", *args]) == 0
    return out


def test_multiclass_manifest(tmp_path, br35h_dir):
    files = _br35h_files(br35h_dir, 15)
    rows = [f"{f},{'none' if f.parent.name == 'no' else ('small' if i % 2 else 'large')}" for i, f in enumerate(files)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = _train(tmp_path, "--data", str(tmp_path / "m.csv"), "--model", "resnet18")
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_class"]) == {"large", "none", "small"}
    probs = Classifier(out / "model.pt", "cpu").predict_paths(files[:2])[0].probabilities
    assert sum(probs.values()) == pytest.approx(1, abs=1e-4) and len(probs) == 3


def test_multilabel_crossmodal_with_text_and_header_values(tmp_path, br35h_dir):
    files = _br35h_files(br35h_dir, 12)
    lines = []
    for i, f in enumerate(files):
        labels = "mass|oedema" if (f.parent.name == "yes" and i % 2) else ("mass" if f.parent.name == "yes" else "")
        text = "enhancing mass with surrounding oedema" if f.parent.name == "yes" else "no abnormality"
        lines.append(f"{f},{labels or 'clear'},{text},{30 + i},{'MF'[i % 2]}")
    (tmp_path / "ml.csv").write_text("path,label,text,age,sex\n" + "\n".join(lines) + "\n")
    out = _train(tmp_path, "--data", str(tmp_path / "ml.csv"), "--model", "fusion-resnet18", "--task", "multilabel")
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_label"]) == {"clear", "mass", "oedema"}
    clf = Classifier(out / "model.pt", "cpu")
    # At the PACS there is no report: the image alone (plus header values) must work.
    pred = clf.predict_paths(files[-1:])[0]
    assert isinstance(pred.label, list) and set(pred.probabilities) == {"clear", "mass", "oedema"}


def test_ordinal_grades(tmp_path, br35h_dir):
    files = _br35h_files(br35h_dir, 15)
    rows = [f"{f},{0 if f.parent.name == 'no' else 1 + i % 2}" for i, f in enumerate(files)]
    (tmp_path / "g.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = _train(tmp_path, "--data", str(tmp_path / "g.csv"), "--model", "resnet18", "--task", "ordinal")
    m = json.loads((out / "metrics.json").read_text())
    assert "qwk" in m and m["task_type"] == "ordinal"
    card = read_card(out / "model.pt")
    assert card["task"] == {"type": "ordinal", "classes": ["0", "1", "2"]}
    assert card["model"]["args"]["num_outputs"] == 2  # cumulative logits


def test_classic_baseline_on_real_xrays(tmp_path):
    out = _train(tmp_path, "--data", "chest-pneumonia", "--model", "hog-svm")
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["accuracy"] <= 1
    from medclass.errors import MedClassError
    from medclass.explain import explain

    clf = Classifier(out / "model.pt", "cpu")
    assert set(clf.predict_paths([_pneumonia_file()])[0].probabilities) == {"normal", "pneumonia"}
    with pytest.raises(MedClassError, match="no heat map"):
        explain(clf, clf.read(_pneumonia_file()))


def _pneumonia_file():
    from medclass.data import load_dataset

    return load_dataset("chest-pneumonia").samples[0].path


@pytest.mark.parametrize("model, method", [("resnet18", "gradcam"), ("cnn-gru", "attention")])
def test_3d_model_on_real_mr_volumes(tmp_path, model, method):
    """3D models on multi-frame MR (real pixels; the labels exercise the mechanics)."""
    import shutil

    from pydicom.data import get_testdata_file

    names = ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
             "emri_small_jpeg_2k_lossless.dcm"]
    for i, n in enumerate(names):
        d = tmp_path / "vols" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(n), d / n)
    out = _train(tmp_path, "--data", str(tmp_path / "vols"), "--model", model, "--spatial-dims", "3",
                 "--depth", "8", "--image-size", "32")
    clf = Classifier(out / "model.pt", "cpu")
    img = clf.read(get_testdata_file("emri_small.dcm"))
    assert img.array.shape == (1, 10, 64, 64)
    from medclass.explain import explain, to_image_space

    ex = explain(clf, img)
    assert ex.method == method and ex.heatmap.shape == (8, 32, 32)
    assert to_image_space(ex.heatmap, img.array.shape[1:]).shape == (10, 64, 64)


def test_attention_model_explains_with_its_attention(tmp_path):
    out = _train(tmp_path, "--data", "chest-pneumonia", "--model", "attention-mil")
    from medclass.explain import explain

    clf = Classifier(out / "model.pt", "cpu")
    ex = explain(clf, clf.read(_pneumonia_file()))
    assert ex.method == "attention" and ex.heatmap.shape == (32, 32)
    assert np.isclose(ex.heatmap.max(), 1)


def test_ddp_under_torchrun(tmp_path):
    """Two processes with the gloo backend: the same script scales to several GPUs."""
    out = tmp_path / "ddp"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medclass",
         "train", "--data", "chest-pneumonia", "--model", "resnet18", "--image-size", "32", "--epochs", "2",
         "--device", "cpu", "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    card = read_card(out / "model.pt")
    assert card["training"]["world_size"] == 2


def test_quickstart_trains_once_then_reuses(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--epochs", "1", "--device", "cpu", "-q", "--no-node"]) == 0
    first = capsys.readouterr().out
    assert "AUC" in first and "medclass predict" in first and (out / "model.pt").exists()
    mtime = (out / "model.pt").stat().st_mtime
    assert main(["quickstart", "--out", str(out), "--device", "cpu", "-q", "--no-node"]) == 0
    assert "using the existing model" in capsys.readouterr().out
    assert (out / "model.pt").stat().st_mtime == mtime
