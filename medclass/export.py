"""Export a checkpoint to TorchScript or ONNX for deployment without medclass.

The exported graph takes the *preprocessed* image tensor and returns class
probabilities (softmax, sigmoid or ordinal), so a consumer needs only the
card's preprocessing spec, written beside the file as ``<out>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from medclass.checkpoint import LoadedModel, load_checkpoint
from medclass.errors import MedClassError
from medclass.tasks import Task

FORMATS = ("torchscript", "onnx")


class ProbabilityModel(nn.Module):
    """A zoo model followed by its calibration (if the card has one) and its task's probability
    function (image input only), so that an exported model gives the checkpoint's probabilities."""

    def __init__(self, model: nn.Module, task: Task, card: dict | None = None):
        super().__init__()
        from medclass.calibration import card_scaling

        self.model = model
        self.task = task
        t, bias = card_scaling(card)
        self.register_buffer("temperature", torch.as_tensor(1.0 if t is None else t, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(0.0 if bias is None else bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task.probabilities(self.model(x) / self.temperature + self.bias)


def example_input(loaded: LoadedModel, batch: int = 2) -> torch.Tensor:
    spec = loaded.preprocess_spec
    side = spec["image_size"]
    spatial = (side, side) if spec["spatial_dims"] == 2 else (spec["depth"], side, side)
    return torch.rand(batch, loaded.card["model"]["args"]["in_channels"], *spatial)


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """Write ``checkpoint`` as ``fmt`` to ``out`` plus ``out.json`` (the card)."""
    if fmt not in FORMATS:
        raise MedClassError(f"unknown export format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    loaded = load_checkpoint(checkpoint, "cpu")
    if not loaded.is_torch:
        raise MedClassError(f"{loaded.name} is a classic (scikit-learn) model", "only torch models export")
    wrapped = ProbabilityModel(loaded.model, loaded.task, loaded.card).eval()
    x = example_input(loaded)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(wrapped, x, check_trace=False).save(str(out))
        else:
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise MedClassError("ONNX export needs the onnx package",
                                    "pip install 'slicer-medclass[export]'") from None
            torch.onnx.export(wrapped, (x,), str(out), input_names=["image"], output_names=["probabilities"],
                              dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                              opset_version=17, dynamo=False)
    Path(str(out) + ".json").write_text(json.dumps(loaded.card, indent=2))
    return out
