"""Task types: how labels become targets, logits become probabilities, and
probabilities become a predicted label.

================  =============  ==========================================
task              outputs        probabilities
================  =============  ==========================================
``binary``        2 logits       softmax; class 1 is the positive class
``multiclass``    K logits       softmax
``multilabel``    K logits       independent sigmoids, one per finding
``ordinal``       K-1 logits     cumulative link (CORAL-style): logit k is
                                 P(grade > k); class probabilities are the
                                 differences of the cumulative ones
================  =============  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

TASK_TYPES = ("binary", "multiclass", "multilabel", "ordinal")


@dataclass
class Task:
    """A classification task: its type and class (or finding, or grade) names."""

    type: str
    classes: list[str]

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"unknown task type {self.type!r}; expected one of {TASK_TYPES}")
        if self.type == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary task has 2 classes, got {self.classes}")
        if len(self.classes) < 2:
            raise ValueError(f"a task needs at least 2 classes, got {self.classes}")

    @property
    def num_outputs(self) -> int:
        """Number of logits the model must produce."""
        return len(self.classes) - 1 if self.type == "ordinal" else len(self.classes)

    def loss(self, class_weights: torch.Tensor | None = None) -> nn.Module:
        """The training loss, weighted against class imbalance.

        ``class_weights`` is per class for binary/multiclass, the positive
        weight per label for multilabel, and per cumulative threshold for
        ordinal.
        """
        if self.type in ("binary", "multiclass"):
            return nn.CrossEntropyLoss(weight=class_weights)
        if self.type == "multilabel":
            return nn.BCEWithLogitsLoss(pos_weight=class_weights)
        return _OrdinalLoss(len(self.classes), class_weights)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K)`` from logits ``(B, num_outputs)``."""
        logits = logits.float()
        if self.type in ("binary", "multiclass"):
            return torch.softmax(logits, dim=1)
        if self.type == "multilabel":
            return torch.sigmoid(logits)
        return ordinal_probabilities(logits)

    def predict(self, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Predicted class index ``(B,)`` (multilabel: a 0/1 matrix ``(B, K)``)."""
        probs = np.asarray(probs)
        if self.type == "multilabel":
            return (probs >= threshold).astype(int)
        if self.type == "binary":
            return (probs[:, 1] >= threshold).astype(int)
        return probs.argmax(axis=1)

    def label_names(self, probs_row: np.ndarray, threshold: float = 0.5) -> str | list[str]:
        """The predicted label(s) of one probability row, by name."""
        pred = self.predict(np.asarray(probs_row)[None], threshold)[0]
        if self.type == "multilabel":
            return [c for c, on in zip(self.classes, pred) if on]
        return self.classes[int(pred)]

    def class_weights(self, labels: np.ndarray) -> torch.Tensor:
        """Inverse-frequency weights from the training labels (see :meth:`loss`)."""
        labels = np.asarray(labels)
        k = len(self.classes)
        if self.type == "multilabel":
            pos = labels.sum(axis=0).clip(min=1)
            neg = (len(labels) - labels.sum(axis=0)).clip(min=1)
            return torch.tensor(neg / pos, dtype=torch.float32)
        if self.type == "ordinal":
            above = np.array([(labels > t).sum() for t in range(k - 1)]).clip(min=1)
            below = (len(labels) - above).clip(min=1)
            return torch.tensor(below / above, dtype=torch.float32)
        counts = np.bincount(labels.astype(int), minlength=k).clip(min=1)
        w = len(labels) / (k * counts)
        return torch.tensor(w, dtype=torch.float32)

    def as_dict(self) -> dict:
        return {"type": self.type, "classes": list(self.classes)}


def ordinal_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Grade probabilities from cumulative logits P(y > k), k = 0..K-2.

    The cumulative probabilities are made monotone (a running minimum) so that
    every class probability is non-negative.
    """
    cum = torch.sigmoid(logits)
    cum = torch.cummin(cum, dim=1).values
    ones = torch.ones_like(cum[:, :1])
    zeros = torch.zeros_like(cum[:, :1])
    upper = torch.cat([ones, cum], dim=1)
    lower = torch.cat([cum, zeros], dim=1)
    return (upper - lower).clamp(min=0)


class _OrdinalLoss(nn.Module):
    """Binary cross-entropy on the K-1 cumulative targets ``1[y > k]``."""

    def __init__(self, num_classes: int, pos_weight: torch.Tensor | None):
        super().__init__()
        self.register_buffer("thresholds", torch.arange(num_classes - 1))
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cumulative = (target[:, None] > self.thresholds[None]).float()
        return self.bce(logits, cumulative)
