"""The FixMatch pieces of ``bench/bench_semisup.py`` (the figures come from running the bench)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_semisup.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_semisup", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_strong_augment_keeps_shape_and_range_and_changes_images():
    b = _bench()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 32, 32, generator=g)
    y = b.strong_augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.allclose(x, y)
    # Seeded: the same generator state gives the same strong views (both arms of a seed are reproducible).
    assert torch.equal(y, b.strong_augment(x, torch.Generator().manual_seed(1)))


def test_fixmatch_loss_uses_only_confident_pseudo_labels():
    b = _bench()
    weak = torch.tensor([[10.0, -10.0], [0.1, 0.0]])  # confident class 0; unsure
    strong = torch.tensor([[-2.0, 2.0], [-5.0, 5.0]], requires_grad=True)
    loss, mask = b.fixmatch_loss(weak, strong, threshold=0.95)
    assert mask == 0.5
    expected = torch.nn.functional.cross_entropy(strong[:1].detach(), torch.tensor([0])) / 2
    assert torch.isclose(loss.detach(), expected)
    loss.backward()
    assert strong.grad[1].abs().sum() == 0  # the unsure image contributes nothing
    zero, none = b.fixmatch_loss(torch.zeros(3, 2), torch.randn(3, 2), threshold=0.95)
    assert float(zero) == 0.0 and none == 0.0
