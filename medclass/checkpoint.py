"""One checkpoint file: weights plus the model card.

Every front door loads a model the same way, with :func:`load_checkpoint`. The
card says what the model is (registry name and arguments), what it predicts
(task, class names and their SNOMED CT codes), how to feed it (the
preprocessing spec), what it was trained on (dataset fingerprint, split seed,
held-out keys) and how well it did (metrics).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medclass import __version__
from medclass.errors import MedClassError
from medclass.models import create_model, model_info
from medclass.tasks import Task

FORMAT = "medclass-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A model ready for inference, with its card."""

    model: Any  # torch.nn.Module in eval mode, or a classic classifier
    card: dict[str, Any]
    task: Task
    device: torch.device

    @property
    def name(self) -> str:
        return self.card["model"]["name"]

    @property
    def is_torch(self) -> bool:
        return isinstance(self.model, torch.nn.Module)

    @property
    def preprocess_spec(self) -> dict[str, Any]:
        return self.card["preprocess"]

    @property
    def family(self) -> str:
        return self.card["model"]["family"]


def make_card(
    model_name: str,
    model_args: dict[str, Any],
    task: Task,
    preprocess: dict[str, Any],
    class_codes: dict[str, tuple[str, str, str]] | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    aggregation: str = "mean",
) -> dict[str, Any]:
    """Assemble a model card (plain JSON types only)."""
    info = model_info(model_name)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medclass_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, "family": info.family, "args": model_args},
        "task": task.as_dict(),
        "class_codes": {c: list(v) for c, v in (class_codes or {}).items()},
        "preprocess": preprocess,
        # How a study-level result combines image-level probabilities.
        "aggregation": aggregation,
        "data": data or {},
        "metrics": metrics or {},
        "training": training or {},
    }


def save_checkpoint(path: str | Path, model: Any, card: dict[str, Any]) -> Path:
    """Write weights and card to one file (a zip: ``card.json`` + weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        z.writestr("card.json", json.dumps(card, indent=2))
        if isinstance(model, torch.nn.Module):
            buf = io.BytesIO()
            state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
            torch.save(state, buf)
            z.writestr("weights.pt", buf.getvalue())
        else:
            z.writestr("classic.pkl", model.state())
    tmp.replace(path)  # atomic: a reader never sees half a checkpoint
    return path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of a checkpoint, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise MedClassError(f"no such checkpoint: {path}", "pass the model.pt written by 'medclass train'")
    try:
        with zipfile.ZipFile(path) as z:
            card = json.loads(z.read("card.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError):
        raise MedClassError(f"{path} is not a medclass checkpoint",
                            "pass the model.pt written by 'medclass train'") from None
    if card.get("format") != FORMAT:
        raise MedClassError(f"{path} is not a medclass checkpoint (format {card.get('format')!r})",
                            "pass the model.pt written by 'medclass train'")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise MedClassError(f"{path} was written by a newer medclass (format {card['format_version']})",
                            "upgrade medclass")
    return card


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedClassError("--device cuda was asked for but no CUDA GPU is visible",
                            "use --device cpu, or install a CUDA build of torch (see README)")
    return torch.device(device)


def load_checkpoint(path: str | Path, device: str = "auto") -> LoadedModel:
    """Load a checkpoint for inference (eval mode, on ``device``)."""
    card = read_card(path)
    if card.get("kind") == "encoder":
        raise MedClassError(f"{path} is an encoder from 'medclass pretrain' (no trained classifier head): it "
                            "cannot classify", f"train a classifier from it: medclass train --init {path} ...")
    task = Task(**card["task"])
    args = dict(card["model"]["args"])
    name = card["model"]["name"]
    dev = resolve_device(device)
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        if "weights.pt" in names:
            model = create_model(name, **args)
            # weights_only: a checkpoint holds tensors, never code to run.
            state = torch.load(io.BytesIO(z.read("weights.pt")), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            model.to(dev).eval()
            if int(args.get("spatial_dims", 2)) == 2:
                # NHWC convolutions: the forward pass of a 2D CNN is about a quarter faster, on CPU too
                # (inputs follow in medclass.inference.forward_logits); the outputs are the same.
                model.to(memory_format=torch.channels_last)
        elif "classic.pkl" in names:
            from medclass.models.classic import ClassicClassifier

            model = ClassicClassifier.from_state(z.read("classic.pkl"))
        else:
            raise MedClassError(f"{path} holds no weights", "re-run 'medclass train'")
    return LoadedModel(model, card, task, dev)
