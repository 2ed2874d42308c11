"""Grad-CAM must point at the evidence. A hand-built model whose 'positive' logit
is the mean brightness makes the right answer known: the bright square."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medclass.checkpoint import LoadedModel
from medclass.explain import Explanation, explain, overlay_titles, save_overlay
from medclass.inference import Classifier
from medclass.io import ImageData
from medclass.models import ClassifierModule
from medclass.tasks import Task
from medclass.transforms import DEFAULT_SPEC


class Brightness(ClassifierModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head.bias.zero_()
        self.cam_layer = "conv"

    def forward_features(self, x, **extra):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_gradcam_peaks_on_the_evidence_not_away_from_it():
    card = {"model": {"name": "brightness", "family": "cnn"}, "preprocess": {**DEFAULT_SPEC, "image_size": 32},
            "task": {"type": "binary", "classes": ["dark", "bright"]}}
    clf = Classifier(LoadedModel(Brightness().eval(), card, Task("binary", ["dark", "bright"]), torch.device("cpu")))
    img = np.full((1, 64, 64), 0.1, dtype=np.float32)
    img[0, 40:56, 8:24] = 1.0  # a bright square, bottom left
    ex = explain(clf, ImageData(img, {"path": None}))
    assert ex.class_name == "bright" and ex.method == "gradcam"
    peak = np.unravel_index(np.argmax(ex.heatmap), ex.heatmap.shape)
    assert 20 <= peak[0] < 28 and 4 <= peak[1] < 12, peak  # inside the square (at 32 px)
    assert ex.heatmap[:10, 20:].max() < 0.5  # far from it: cold


class BrightSpots(ClassifierModule):
    """'bright' = mean of the pixels above 0.5; the 'dark' logit is its negative.

    Grad-CAM on the ReLU for 'dark' is all zero (every channel weight is negative and the
    activations are not): the explainer must fall back, not return a blank map.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.act = nn.ReLU()
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(-0.5)
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head.bias.zero_()
        self.cam_layer = "act"

    def forward_features(self, x, **extra):
        return self.act(self.conv(x)).mean(dim=(2, 3))


def test_an_all_zero_gradcam_falls_back_to_saliency_and_says_so():
    card = {"model": {"name": "bright-spots", "family": "cnn"}, "preprocess": {**DEFAULT_SPEC, "image_size": 32},
            "task": {"type": "binary", "classes": ["dark", "bright"]}}
    clf = Classifier(LoadedModel(BrightSpots().eval(), card, Task("binary", ["dark", "bright"]), torch.device("cpu")))
    img = np.full((1, 64, 64), 0.1, dtype=np.float32)
    img[0, 40:56, 8:24] = 1.0

    bright = explain(clf, ImageData(img, {"path": None}), "bright")
    assert bright.method == "gradcam" and bright.note is None

    dark = explain(clf, ImageData(img, {"path": None}), "dark")
    assert dark.method == "saliency"
    assert "no positive evidence" in dark.note and "'dark'" in dark.note
    assert dark.heatmap.max() == 1.0 and dark.heatmap.min() == 0.0  # not blank
    peak = np.unravel_index(np.argmax(dark.heatmap), dark.heatmap.shape)
    assert 20 <= peak[0] < 28 and 4 <= peak[1] < 12, peak  # the only pixels the model depends on
    assert dark.probability == pytest.approx(1 - bright.probability, abs=1e-6)


def test_overlay_titles_say_the_probability_and_the_slice_used(tmp_path):
    card = {"model": {"name": "brightness", "family": "cnn"}, "preprocess": {**DEFAULT_SPEC, "image_size": 32},
            "task": {"type": "binary", "classes": ["dark", "bright"]}}
    clf = Classifier(LoadedModel(Brightness().eval(), card, Task("binary", ["dark", "bright"]), torch.device("cpu")))
    volume = np.full((1, 7, 64, 64), 0.1, dtype=np.float32)  # a volume given to a 2D model
    volume[0, 3, 40:56, 8:24] = 1.0

    ex = explain(clf, ImageData(volume, {"path": None}))
    assert (ex.slice_index, ex.slices) == (3, 7)  # the middle slice, the one the model classified
    assert ex.probability == pytest.approx(clf.probabilities([ImageData(volume, {"path": None})])[0][1], abs=1e-6)
    assert overlay_titles(ex) == ("input, slice 4 of 7", f"gradcam: bright (p = {ex.probability:.2f})")
    assert save_overlay(ex, tmp_path / "overlay.png").read_bytes()[:4] == b"\x89PNG"

    image = ImageData(volume[:, 3], {"path": None})  # the same slice as a 2D image: no slice to name
    assert overlay_titles(explain(clf, image))[0] == "input"

    # A 3D map is shown by its middle slice; an attention map without a probability says none.
    flat = Explanation(np.zeros((5, 8, 8), np.float32), np.zeros((1, 5, 8, 8), np.float32), "tumour", "attention")
    assert overlay_titles(flat) == ("input, slice 3 of 5", "attention: tumour")
