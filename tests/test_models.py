"""The model zoo: every registered model, in every spatial_dims it supports.

Parametrised over ``list_models()`` so a model is tested the day it is registered.
Tiny synthetic inputs are enough here: the behaviour (shapes, gradients, attention
maps, missing modalities) is under test, not accuracy; the text branch's real-data
check is at the end.
"""

from __future__ import annotations

import importlib.util
import zlib

import numpy as np
import pytest
import torch

from medclass.errors import MedClassError
from medclass.models import create_model, list_models, model_info
from medclass.models.classic import ClassicClassifier
from medclass.multimodal import TABULAR_FIELDS, encode_tabular, tokenize

torch.set_num_threads(2)

# 3D inputs are cubic: DenseNet-121 pools depth five times and needs 32 slices.
SIZE, DEPTH, OUTPUTS = 32, 32, 3
TORCH_CASES = [
    pytest.param(name, dims, id=f"{name}-{dims}d")
    for name in list_models()
    if model_info(name).family != "classic"
    for dims in model_info(name).spatial_dims
]


def _input(dims: int, batch: int = 2) -> torch.Tensor:
    shape = (batch, 1, SIZE, SIZE) if dims == 2 else (batch, 1, DEPTH, SIZE, SIZE)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _build(name: str, dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, spatial_dims=dims, in_channels=1, num_outputs=OUTPUTS, image_size=SIZE)


@pytest.mark.parametrize("name,dims", TORCH_CASES)
def test_torch_model_contract(name, dims):
    model = _build(name, dims).train()
    x = _input(dims)
    logits = model(x)
    assert logits.shape == (2, OUTPUTS)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
    assert feats.dim() == 2 and feats.shape[0] == 2 and feats.shape[1] == model.head.in_features
    if model.cam_layer is not None:
        assert model.cam_layer in dict(model.named_modules())
    if hasattr(model, "attention_map"):
        amap = model.attention_map(x)
        assert amap.shape == (2, *x.shape[2:])
        assert float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0 + 1e-6
        assert torch.isfinite(amap).all()


@pytest.mark.parametrize("name", [n for n in list_models() if model_info(n).family != "classic"])
def test_grad_cam_2d(name):
    from monai.visualize import GradCAM

    model = _build(name, 2).eval()
    if model.cam_layer is None:
        pytest.skip(f"{name} explains itself with attention_map")
    cam = GradCAM(model, target_layers=model.cam_layer)(_input(2))
    assert cam.shape == (2, 1, SIZE, SIZE) and torch.isfinite(cam).all()


def test_vit_thin_volume():
    # A volume of few slices (here 8) is not a cube: the ViT takes its depth as ``slices``.
    model = create_model("vit", spatial_dims=3, image_size=SIZE, slices=8).eval()
    x = torch.randn(2, 1, 8, SIZE, SIZE)
    assert model(x).shape == (2, 2)
    assert model.attention_map(x).shape == (2, 8, SIZE, SIZE)


def test_mil_attention_follows_slices():
    model = _build("attention-mil", 3).eval()
    x = _input(3)
    amap = model.attention_map(x)
    weights = model.last_attention
    assert weights.shape == (2, DEPTH) and torch.allclose(weights.sum(1), torch.ones(2))
    # One value per slice, and the most attended slice is painted 1.
    assert torch.allclose(amap.amax(dim=(2, 3)), amap.amin(dim=(2, 3)))
    assert torch.allclose(amap.flatten(1).amax(1), torch.ones(2))


def test_unknown_model_names_the_remedy():
    with pytest.raises(MedClassError, match="medclass models"):
        create_model("nope")


def test_classic_only_2d():
    with pytest.raises(MedClassError):
        create_model("hog-svm", spatial_dims=3)


# --------------------------------------------------------------------------- classic


def _squares(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; class 1 has a bright square (a tiny synthetic array, as allowed)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.3, 0.1, size=(n, 1, 40, 40)).astype(np.float32)
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(4, 20, size=2)
        X[i, 0, r : r + 14, c : c + 14] += 0.6
    return X, y


@pytest.mark.parametrize("name", list_models("classic"))
def test_classic_fit_predict_state(name):
    X, y = _squares()
    model = create_model(name, num_outputs=2, image_size=SIZE)
    assert isinstance(model, ClassicClassifier)
    assert model.features(X[:3]).shape[0] == 3
    model.fit(X, y)
    Xt, yt = _squares(20, seed=1)
    p = model.predict_proba(Xt)
    assert p.shape == (20, 2) and np.allclose(p.sum(1), 1.0)
    assert (p.argmax(1) == yt).mean() >= 0.8
    restored = ClassicClassifier.from_state(model.state())
    np.testing.assert_array_equal(restored.predict_proba(Xt), p)


def test_classic_rejects_multilabel():
    X, y = _squares(10)
    with pytest.raises(MedClassError, match="torch model"):
        create_model("hog-rf").fit(X, np.stack([y, 1 - y], axis=1))


# --------------------------------------------------------------------------- cross-modal


def test_tokenize_is_stable_and_padded():
    a = tokenize(["Left lower-lobe OPACITY.", None, ""], max_len=8)
    assert a.dtype == torch.long and a.shape == (3, 8)
    # CRC-32, not the per-process salted hash(): the same ids in training and at the PACS.
    expected = [1 + zlib.crc32(t.encode()) % (2**15 - 1) for t in ("left", "lower", "lobe", "opacity")]
    assert a[0, :4].tolist() == expected and a[0, 4:].eq(0).all()
    assert a[1:].eq(0).all()
    assert torch.equal(a, tokenize(["left lower lobe opacity", None, ""], max_len=8))
    assert int(tokenize(["word"], buckets=16).max()) < 16


def test_encode_tabular_codes_and_nan():
    t = encode_tabular([
        {"age": "045Y", "sex": "F", "laterality": "R", "view": "MLO"},
        {"age": 70, "sex": "M", "laterality": "L", "view": "CC"},
        {"sex": "O", "view": "LAT"},
    ])
    assert t.shape == (3, len(TABULAR_FIELDS)) and t.dtype == torch.float32
    assert t[0].tolist() == pytest.approx([0.45, 0.0, 1.0, 1.0])
    assert t[1].tolist() == pytest.approx([0.70, 1.0, 0.0, 0.0])
    assert torch.isnan(t[2]).all()


@pytest.mark.parametrize("name", list_models("crossmodal"))
def test_crossmodal_modalities(name):
    model = _build(name, 2).eval()
    x = _input(2)
    text = tokenize(["right upper lobe consolidation", "no acute cardiopulmonary disease"])
    tab = encode_tabular([{"age": 61, "sex": "M", "view": "PA"}, {"age": "007Y", "sex": "F", "view": "AP"}])
    with torch.no_grad():
        out = {
            "image": model(x),
            "text": model(x, text=text),
            "tabular": model(x, tabular=tab),
            "all": model(x, text=text, tabular=tab),
        }
        # A row that is all padding / all NaN is the same as the modality being absent.
        blank = model(x, text=torch.zeros_like(text), tabular=torch.full_like(tab, float("nan")))
    for key, logits in out.items():
        assert logits.shape == (2, OUTPUTS) and torch.isfinite(logits).all(), key
    assert not torch.allclose(out["image"], out["text"])
    assert not torch.allclose(out["image"], out["tabular"])
    assert not torch.allclose(out["text"], out["all"])
    assert torch.allclose(blank, out["image"], atol=1e-6)


@pytest.mark.parametrize("name", list_models("crossmodal"))
def test_crossmodal_image_only_traces_and_exports(name, tmp_path):
    model = _build(name, 2).eval()
    x = _input(2)
    traced = torch.jit.trace(model, x)
    assert torch.allclose(traced(x), model(x), atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path))
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)


# --------------------------------------------------------------------------- IU reports

needs_reports = pytest.mark.skipif(
    importlib.util.find_spec("torchxrayvision") is None,
    reason="IU reports ship in torchxrayvision: pip install --no-deps torchxrayvision==1.5.7",
)


@pytest.fixture(scope="module")
def iu_reports():
    from medclass.reports import load_iu_reports

    return load_iu_reports()


def test_reports_missing_archive_has_remedy(monkeypatch):
    from medclass import reports

    monkeypatch.setattr(reports.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MedClassError, match="torchxrayvision==1.5.7"):
        reports.load_iu_reports()


@needs_reports
def test_iu_reports_load(iu_reports):
    assert len(iu_reports) > 3000
    labels = {r["label"] for r in iu_reports}
    assert {0, 1} <= labels
    first = iu_reports[0]
    assert set(first) >= {"id", "findings", "impression", "indication", "mesh", "label"}
    assert all(r["label"] == 0 for r in iu_reports if r["mesh"] == ["normal"])


@needs_reports
def test_text_branch_on_real_reports(iu_reports):
    # The text branch's real-data check: TextEncoder + linear head, normal vs abnormal on
    # held-out IU chest X-ray reports. Measured AUC 0.990 (seed 0, 2 CPU cores); the
    # threshold leaves room for platform noise but fails if the branch stops learning.
    from medclass.reports import train_text_classifier

    result = train_text_classifier(iu_reports, seed=0)
    assert result["n_train"] > 2000 and result["n_test"] > 900
    assert result["auc"] > 0.9, result


@pytest.mark.parametrize("name", [n for n in list_models() if model_info(n).family != "classic"])
def test_batchnorm_running_stats_keep_up_with_short_training(name):
    """TF-style BatchNorm momentum (0.01, MONAI's EfficientNet default) leaves the
    running statistics at their initial values after a few epochs from scratch."""
    model = create_model(name, spatial_dims=2, in_channels=1, num_outputs=2, image_size=32)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            assert m.momentum is None or m.momentum >= 0.1, (name, m)


def test_eval_mode_output_depends_on_the_input():
    """After BatchNorm has seen the data (as after a short training run), eval-mode
    outputs must differ between images. With MONAI's TF-style momentum, EfficientNet
    gave every image the same probabilities (held-out AUC 0.5 on Br35H)."""
    torch.manual_seed(0)
    model = create_model("efficientnet-b0", spatial_dims=2, in_channels=1, num_outputs=2, image_size=32)
    x = torch.rand(4, 1, 32, 32) * torch.tensor([0.2, 1.0, 3.0, 6.0]).view(4, 1, 1, 1)
    model.train()
    with torch.no_grad():
        for _ in range(150):  # about the optimiser steps of a few epochs on a small set
            model(x)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.std(dim=0).max() > 1e-3, out


@pytest.mark.parametrize("name", list_models())
def test_every_builder_names_its_arguments(name):
    from medclass.models.registry import builder_arguments

    args = builder_arguments(name)  # raises for a builder that swallows **kwargs
    assert not {"spatial_dims", "in_channels", "num_outputs", "image_size"} & set(args)


def test_a_misspelt_model_argument_is_one_line_naming_it():
    with pytest.raises(MedClassError, match=r"resnet18 takes no argument 'dropuot'.*did you mean 'dropout'"):
        create_model("resnet18", dropuot=0.5)
    with pytest.raises(MedClassError, match="takes no argument 'width'"):
        create_model("vit", width=16)  # a cbam-resnet18 argument, not the ViT's
    assert create_model("cbam-resnet18", width=8, image_size=SIZE) is not None
