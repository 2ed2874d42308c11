"""One registry, one factory: every model of the zoo is built by name.

The Slicer module, the MONAI Label app and the DICOM node look models up here;
nothing builds a network by hand.

A builder is a function ``builder(spatial_dims, in_channels, num_outputs,
image_size, **kwargs)`` that returns either a :class:`torch.nn.Module` following
the :class:`ClassifierModule` contract, or (family ``classic``) an object with
scikit-learn's ``fit`` / ``predict_proba``.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from torch import nn

from medclass.errors import MedClassError

FAMILIES = ("cnn", "rnn", "attention", "crossmodal", "classic")


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model before it is built."""

    name: str
    family: str
    spatial_dims: tuple[int, ...]
    description: str
    input_kind: str = "image"  # image | sequence | bag | multimodal
    builder: Callable[..., Any] = field(repr=False, compare=False, default=None)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("builder")
        d["spatial_dims"] = list(self.spatial_dims)
        return d


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    family: str,
    spatial_dims: tuple[int, ...] = (2, 3),
    description: str = "",
    input_kind: str = "image",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model builder under ``name`` (decorator).

    Raises
    ------
    ValueError
        If the family is unknown or the name is taken.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        doc = description or (fn.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = ModelInfo(name, family, tuple(spatial_dims), doc, input_kind, fn)
        return fn

    return wrap


def list_models(family: str | None = None) -> list[str]:
    """Names of the registered models, optionally of one family, sorted."""
    return sorted(n for n, i in _REGISTRY.items() if family is None or i.family == family)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; raises :class:`MedClassError` if unknown."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise MedClassError(
            f"Unknown model ({name})", f"{hint}run 'medclass models' to list the registered models"
        )
    return _REGISTRY[name]


def create_model(
    name: str,
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_outputs: int = 2,
    image_size: int = 64,
    **overrides: Any,
) -> Any:
    """Build model ``name``.

    Parameters
    ----------
    name : str
        A name from :func:`list_models`.
    spatial_dims : int
        2 for images, 3 for volumes.
    in_channels : int
        Image channels (1 grey, 3 colour).
    num_outputs : int
        Number of logits, fixed by the task (see :mod:`medclass.tasks`).
    image_size : int
        Side of the (square or cubic) input; some models (ViT) need it.
    **overrides
        Passed to the builder (e.g. ``dropout=0.2``).

    Raises
    ------
    MedClassError
        Unknown name, unsupported ``spatial_dims``, or an argument the builder does
        not take (a misspelt ``--model-arg`` must not be ignored and still land in
        the model card).
    """
    info = model_info(name)
    accepted = builder_arguments(name)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        raise MedClassError(
            f"model {name} takes no argument {unknown[0]!r}",
            (f"did you mean {close[0]!r}? " if close else "")
            + f"its arguments are {', '.join(accepted) or 'none beyond the input shape'}",
        )
    if spatial_dims not in info.spatial_dims:
        raise MedClassError(
            f"model {name} does not support spatial_dims={spatial_dims}",
            f"it supports {', '.join(map(str, info.spatial_dims))}",
        )
    return info.builder(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_outputs=num_outputs,
        image_size=image_size,
        **overrides,
    )


_SHAPE_ARGS = ("spatial_dims", "in_channels", "num_outputs", "image_size")


def builder_arguments(name: str) -> list[str]:
    """The keyword arguments model ``name`` takes beyond the input shape (e.g. ``dropout``, ``width``)."""
    params = inspect.signature(model_info(name).builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise TypeError(f"the builder of {name} takes **kwargs: name its arguments, so that unknown ones are caught")
    return [p.name for p in params if p.name not in _SHAPE_ARGS and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def count_parameters(model: Any) -> int:
    """Trainable parameters of a torch model; 0 for a classic model."""
    if isinstance(model, nn.Module):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 0


class ClassifierModule(nn.Module):
    """The contract every torch model of the zoo follows.

    ``forward(x, **extra)`` returns logits ``(B, num_outputs)``;
    ``forward_features(x, **extra)`` returns the pooled embedding ``(B, F)`` used
    by active learning (core-set) and ``head`` maps it to logits.
    ``cam_layer`` names the sub-module whose activations Grad-CAM uses, or is
    ``None`` when the model explains itself with attention weights
    (``attention_map(x)``).
    """

    cam_layer: str | None = None

    def forward_features(self, x, **extra):  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x, **extra):
        return self.head(self.forward_features(x, **extra))

    def explanation_method(self, x) -> str:
        """``"gradcam"`` (on ``cam_layer``) or ``"attention"`` (``attention_map``) for input ``x``."""
        return "gradcam" if self.cam_layer else "attention"
