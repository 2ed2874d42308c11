"""What a classification returns, shared by the widget, the logic and the tests.

Standard library only: the widget imports this before the module's Python
dependencies (torch, medclass) are installed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClassificationResult:
    """One volume's classification.

    Attributes
    ----------
    probabilities : dict
        Class name to probability, in the model's class order. They sum to 1 for
        binary, multi-class and ordinal tasks; each is independent for multi-label.
    label : str or list of str
        The predicted class (a list of the classes present for multi-label).
    heatmap_node : vtkMRMLScalarVolumeNode or None
        Grad-CAM or attention map in [0, 1] on the input's voxel grid (same
        dimensions and IJK-to-RAS matrix), in the input's scene; ``None`` when the
        model has no heat map (classic models, or a server that sends none).
    classes : list of str
        The model's class names.
    task : str
        ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
    explained_class : str or None
        The class whose evidence the heat map shows.
    method : str or None
        ``gradcam``, ``saliency`` (Grad-CAM held no positive evidence) or ``attention``.
    slice_index : int or None
        For a 2D model given a volume: the slice (K index) it classified; the heat
        map is zero on the other slices.
    source : str
        The checkpoint file or ``<server>/<model>`` that produced the result.
    note : str or None
        Why something is missing (e.g. no heat map), to show the user.
    """

    probabilities: dict[str, float]
    label: str | list[str]
    heatmap_node: Any = None
    classes: list[str] = field(default_factory=list)
    task: str = "multiclass"
    explained_class: str | None = None
    method: str | None = None
    slice_index: int | None = None
    source: str = ""
    note: str | None = None

    def rows(self) -> list[tuple[str, float]]:
        """``(class, probability)`` rows, most probable first, for the probabilities table."""
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])

    def label_text(self) -> str:
        if isinstance(self.label, (list, tuple)):
            return ", ".join(self.label) if self.label else "(no finding above threshold)"
        return str(self.label)


def result_from_server(response: dict[str, Any], classes: list[str] | None = None, source: str = "") -> ClassificationResult:
    """Turn a MONAI Label infer answer (``output=json``) into a :class:`ClassificationResult`.

    Accepts the shapes a classification infer task returns: ``probabilities`` (or
    ``scores``) as ``{class: p}`` or a list in class order, and ``label`` (or
    ``labels`` / ``prediction``).

    Raises
    ------
    ValueError
        The answer holds no per-class probabilities.
    """
    if not isinstance(response, dict):
        raise ValueError(f"the server's infer answer is not a JSON object ({type(response).__name__}); "
                         "is the model a classification model?")
    body = response
    for key in ("result", "prediction"):
        if isinstance(body.get(key), dict) and not _probs_of(body):
            body = {**body, **body[key]}
    raw = _probs_of(body)
    if raw is None:
        keys = ", ".join(sorted(response)) or "nothing"
        raise ValueError(f"the server's infer answer has no class probabilities (it has: {keys}); "
                         "choose a classification model on the server")
    if isinstance(raw, dict):
        probs = {str(k): float(v) for k, v in raw.items()}
    else:
        names = list(body.get("classes") or classes or [])
        if len(names) != len(raw):
            raise ValueError(f"the server sent {len(raw)} probabilities but the model has {len(names)} classes "
                             f"({', '.join(names)}); reconnect to refresh the model list")
        probs = {str(c): float(p) for c, p in zip(names, raw)}
    if any(not math.isfinite(p) for p in probs.values()):
        raise ValueError(f"the server sent non-finite probabilities {probs}; the model is broken, retrain it")
    label = body.get("label", body.get("labels", body.get("prediction")))
    if label is None or isinstance(label, dict):
        label = max(probs, key=probs.get)
    task = str(body.get("task") or body.get("task_type") or ("multilabel" if isinstance(label, list) else "multiclass"))
    return ClassificationResult(probabilities=probs, label=label, classes=list(probs), task=task, source=source,
                                note="heat maps are computed for local checkpoints")


def _probs_of(body: dict[str, Any]):
    for key in ("probabilities", "scores", "probs"):
        value = body.get(key)
        if isinstance(value, (dict, list)) and value:
            return value
    return None


@dataclass
class TrainingProgress:
    """What the widget shows about a MONAI Label training task."""

    state: str  # "none", "SUBMITTED", "RUNNING", "DONE", "ERROR", "STOPPED"
    fraction: float | None  # 0..1 when the output says "epoch i/n", else None (busy indicator)
    message: str

    @property
    def running(self) -> bool:
        return self.state in ("SUBMITTED", "RUNNING")


_EPOCH = re.compile(r"epoch\D{0,3}(\d+)\s*(?:/|of)\s*(\d+)", re.I)


def training_progress(task: dict[str, Any] | None) -> TrainingProgress:
    """Summarise ``GET /train/``'s task for a progress bar.

    The fraction comes from the last ``epoch i/n`` (or ``Epoch i of n``) in the
    task's output lines, which MONAI's trainers and medclass print.
    """
    if not task:
        return TrainingProgress("none", None, "no training task has run on this server")
    state = str(task.get("status", "UNKNOWN")).upper()
    details = [str(x) for x in (task.get("details") or [])]
    fraction = None
    for line in reversed(details):
        m = _EPOCH.search(line)
        if m and int(m.group(2)) > 0:
            fraction = min(1.0, int(m.group(1)) / int(m.group(2)))
            break
    if state == "DONE":
        fraction = 1.0
    last = details[-1].strip() if details else ""
    started = task.get("start_ts", "")
    message = {"SUBMITTED": "training queued", "RUNNING": "training", "DONE": "training finished",
               "ERROR": "training failed (see the server log)", "STOPPED": "training stopped"}.get(state, state.lower())
    if started:
        message += f" (started {started})"
    if last:
        message += f": {last[-160:]}"
    return TrainingProgress(state, fraction, message)
