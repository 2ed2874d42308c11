"""The command line end to end on real images: train, evaluate, predict, explain, export,
and the one-line errors a user gets for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medclass.checkpoint import load_checkpoint, read_card
from medclass.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medclass", *args], capture_output=True, text=True, timeout=600)


def test_models_json_lists_every_family(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    fams = {r["family"] for r in rows}
    assert fams == {"cnn", "rnn", "attention", "crossmodal", "classic"}
    names = {r["name"] for r in rows}
    assert {"densenet121", "resnet18", "resnet50", "efficientnet-b0"} <= names
    assert all(r["parameters"] > 0 for r in rows if r["family"] != "classic")


def test_datasets_lists_the_real_sets(capsys):
    assert main(["datasets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["br35h"]["n"] == 3000 and rows["chest-pneumonia"]["n"] == 16 and rows["cbis-mammo"]["n"] == 8


def test_training_learns_and_writes_checkpoint_and_metrics(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("auc", "accuracy", "sensitivity", "specificity", "f1", "ece", "n", "ci"):
        assert key in metrics
    assert metrics["n"] == 450  # the held-out split of Br35H
    # 600 images, 32 px, 4 epochs: far from the benchmark model, far above chance.
    assert metrics["auc"] > 0.8, metrics["auc"]
    card = read_card(trained / "model.pt")
    assert card["model"]["name"] == "resnet18" and card["task"]["classes"] == ["no tumour", "tumour"]
    assert card["data"]["fingerprint"] and len(card["data"]["test_keys"]) == 450
    assert card["class_codes"]["tumour"] == ["SCT", "126952004", "Neoplasm of brain"]
    for png in ("roc.png", "confusion_matrix.png", "reliability.png"):
        assert (trained / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reproduces_the_recorded_test_split(trained, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(trained / "model.pt"), "--data", "br35h", "--out", str(out),
                 "--bootstrap", "200"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    train_m = json.loads((trained / "metrics.json").read_text())
    assert m["n"] == 450 and m["auc"] == pytest.approx(train_m["auc"], abs=1e-6)
    lo, hi = m["ci"]["auc"]
    assert lo <= m["auc"] <= hi
    assert (out / "roc.png").exists() and (out / "reliability.png").exists()


def test_predict_prints_json_lines_for_jpeg_and_dicom(trained, br35h_dir, mammogram_paths, capsys):
    from pydicom.data import get_testdata_file

    paths = [str(sorted((br35h_dir / "yes").glob("*.jpg"))[0]), str(mammogram_paths[0]),
             get_testdata_file("CT_small.dcm")]
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), *paths]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["path"] for x in lines] == paths
    for x in lines:
        assert set(x["probabilities"]) == {"no tumour", "tumour"}
        assert sum(x["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert x["label"] == max(x["probabilities"], key=x["probabilities"].get)


# One real file per transfer syntax / pixel format the README promises.
DICOM_ZOO = {
    "JPEG 2000": "JPEG2000.dcm",
    "JPEG baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG extended 12-bit": "JPGExtended.dcm",
    "JPEG lossless": "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "JPEG-LS": "MR_small_jpeg_ls_lossless.dcm",
    "RLE": "MR_small_RLE.dcm",
    "deflate": "image_dfl.dcm",
    "MONOCHROME1 CR chest": "RG1_UNCR.dcm",
    "palette colour": "OBXXXX1A.dcm",
    "multi-frame": "emri_small.dcm",
    "16-bit with window": "CT_small.dcm",
    "VOI LUT": "vlut_04.dcm",
}


def test_predict_reads_every_promised_dicom_kind(trained, capsys):
    from pydicom.data import get_testdata_file

    paths = [get_testdata_file(n) for n in DICOM_ZOO.values()]
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), *paths]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(paths) and all("probabilities" in x for x in lines)


def test_one_bad_file_does_not_stop_the_others(trained, tmp_path, br35h_dir, capsys):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 200)
    good = str(sorted((br35h_dir / "no").glob("*.jpg"))[0])
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), str(bad), good]) == 2
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "error" in out[0] and out[1]["path"] == good and "probabilities" in out[1]


def test_explain_writes_an_overlay(trained, br35h_dir, tmp_path):
    out = tmp_path / "cam.png"
    img = sorted((br35h_dir / "yes").glob("*.jpg"))[3]
    assert main(["explain", "--checkpoint", str(trained / "model.pt"), str(img), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5000


def test_gradcam_heatmap_maps_back_to_image_space(trained, br35h_dir):
    from medclass.explain import explain, to_image_space
    from medclass.inference import Classifier
    from medclass.io import read_image

    clf = Classifier(trained / "model.pt", "cpu")
    img = read_image(sorted((br35h_dir / "yes").glob("*.jpg"))[0])
    ex = explain(clf, img)
    assert ex.method == "gradcam" and ex.heatmap.shape == (32, 32)
    assert 0 <= ex.heatmap.min() and ex.heatmap.max() == pytest.approx(1)
    full = to_image_space(ex.heatmap, img.array.shape[1:])
    assert full.shape == img.array.shape[1:]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_the_checkpoint(trained, tmp_path, fmt):
    from medclass.export import example_input

    out = tmp_path / f"model.{'ts' if fmt == 'torchscript' else 'onnx'}"
    assert main(["export", "--checkpoint", str(trained / "model.pt"), "--format", fmt, "--out", str(out)]) == 0
    loaded = load_checkpoint(trained / "model.pt", "cpu")
    x = example_input(loaded, batch=3)
    from medclass.inference import forward_probabilities

    ref = forward_probabilities(loaded, x)  # the checkpoint's (calibrated) probabilities
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(out))(x).numpy()
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert json.loads(Path(str(out) + ".json").read_text())["task"]["type"] == "binary"


@pytest.mark.parametrize("case", ["missing", "random", "truncated", "not-a-checkpoint", "unknown-model", "empty",
                                  "manifest"])
def test_bad_input_gets_one_line_and_nonzero_exit(case, trained, tmp_path, mammogram_paths):
    ckpt = str(trained / "model.pt")
    if case == "missing":
        args = ["predict", "--checkpoint", ckpt, str(tmp_path / "nope.dcm")]
    elif case == "random":
        (tmp_path / "r.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
        args = ["predict", "--checkpoint", ckpt, str(tmp_path / "r.dcm")]
    elif case == "truncated":
        data = mammogram_paths[0].read_bytes()
        (tmp_path / "t.dcm").write_bytes(data[: len(data) // 3])
        args = ["predict", "--checkpoint", ckpt, str(tmp_path / "t.dcm")]
    elif case == "not-a-checkpoint":
        (tmp_path / "m.pt").write_bytes(b"hello")
        args = ["predict", "--checkpoint", str(tmp_path / "m.pt"), str(mammogram_paths[0])]
    elif case == "unknown-model":
        args = ["train", "--data", "chest-pneumonia", "--model", "resnet19", "--out", str(tmp_path / "o")]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args = ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    else:
        (tmp_path / "m.csv").write_text("path,label\nscans/a.dcm,benign\nscans/b.dcm,malignant\n")
        args = ["train", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]
    r = run_cli(*args)
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if line.startswith("medclass: error")]
    assert len(err) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_version_and_the_node_through_its_entry_point(capsys, tmp_path):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"medclass {version('slicer-medclass')}"
    # medclass node is the node's own main, found through the medclass.commands entry point
    # (the core never imports dicom_node): its errors are the node's.
    from medclass.cli import plugin_command

    assert plugin_command("node").__module__ == "dicom_node.cli"
    assert plugin_command("no-such-command") is None
    assert main(["node", "status", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "no node database" in capsys.readouterr().err


def test_paths_follow_medclass_home(monkeypatch, tmp_path):
    from medclass import paths

    monkeypatch.setenv("MEDCLASS_HOME", str(tmp_path))
    assert paths.quickstart_dir() == tmp_path / "quickstart" and paths.default_checkpoint() is None
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "model.pt").write_bytes(b"")
    assert paths.default_checkpoint() == tmp_path / "quickstart" / "model.pt"
    monkeypatch.delenv("MEDCLASS_HOME")
    assert paths.quickstart_dir() == Path("runs") / "quickstart"
