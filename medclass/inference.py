"""Inference shared by every front door: checkpoint in, probabilities out.

``Classifier`` wraps a loaded checkpoint. The CLI's ``predict``, the DICOM node,
the MONAI Label infer task and the Slicer logic all call it, so preprocessing
and post-processing are written once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from medclass.checkpoint import LoadedModel, load_checkpoint, read_card
from medclass.errors import MedClassError
from medclass.tasks import Task


@dataclass
class Prediction:
    """The result for one image."""

    path: str | None
    label: str | list[str]
    probabilities: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "probabilities": self.probabilities}


@dataclass
class StudyResult:
    """What :meth:`Classifier.classify_study` found for one study's images."""

    probabilities: dict[str, float]  # study level, after the model's aggregation; empty when nothing was read
    label: str | list[str]
    used: list[int]  # indices of the images classified
    skipped: dict[int, str]  # index -> why that image was not
    image_probabilities: np.ndarray  # (len(used), K)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on GPU; a no-op on CPU, where it does not pay."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's first 4D weight is stored channels-last (NHWC), as
    :func:`medclass.checkpoint.load_checkpoint` stores 2D models; its inputs should match."""
    # A weight with one input channel or a 1x1 kernel is both layouts at once: look at one that is not.
    w = next((p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1),
             None)
    return w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


def forward_logits(
    loaded: LoadedModel, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None, batch_size: int = 64
) -> torch.Tensor:
    """Model outputs ``(N, num_outputs)`` before the task's link, as float32 on the CPU.

    A classic (scikit-learn) model has no logits: its log-probabilities stand in.
    """
    if not loaded.is_torch:
        p = np.asarray(loaded.model.predict_proba(x.numpy()), dtype=np.float64)
        return torch.from_numpy(np.log(np.clip(p, 1e-12, 1.0)))
    out = []
    model, dev = loaded.model, loaded.device
    nhwc = x.dim() == 4 and channels_last(model)
    with torch.inference_mode(), autocast(dev):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(dev, non_blocking=True)
            if nhwc:
                xb = xb.contiguous(memory_format=torch.channels_last)
            eb = {k: v[i : i + batch_size].to(dev) for k, v in (extra or {}).items()}
            out.append(model(xb, **eb).float().cpu())
    return torch.cat(out)


def forward_probabilities(
    loaded: LoadedModel, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None, batch_size: int = 64,
    calibrated: bool = True,
) -> np.ndarray:
    """Class probabilities ``(N, K)`` of preprocessed images ``x``.

    With ``calibrated`` (the default) the card's temperature (and bias; :mod:`medclass.calibration`)
    rescales the logits first; a card without one (an older checkpoint) changes nothing.
    """
    if not loaded.is_torch:
        return np.asarray(loaded.model.predict_proba(x.numpy()), dtype=np.float64)
    logits = forward_logits(loaded, x, extra, batch_size)
    probs = calibrated_probabilities(loaded, logits) if calibrated else loaded.task.probabilities(logits)
    return probs.numpy().astype(np.float64)


def calibrated_probabilities(loaded: LoadedModel, logits: torch.Tensor) -> torch.Tensor:
    """The task's probabilities of ``logits`` after the card's temperature (and bias), if it has one.

    Every probability a front door shows or ranks by goes through here, so that active
    learning scores what the served model says, not its uncalibrated logits.
    """
    from medclass.calibration import card_scaling, scale_logits

    t, bias = card_scaling(loaded.card)
    return loaded.task.probabilities(scale_logits(logits, t, bias))


class Classifier:
    """A checkpoint ready to classify images, run here or on a remote inference server.

    Parameters
    ----------
    checkpoint : str or Path or LoadedModel, optional
        A ``model.pt`` written by ``medclass train``, or an already loaded model. Optional
        with a remote ``inference``: the card then comes from the server.
    device : str
        ``auto`` (GPU when present), ``cpu`` or ``cuda`` (local inference).
    inference : str, optional
        ``local`` (the default) or ``triton://HOST[:PORT]/MODEL[/VERSION]``: a model exported
        with ``medclass export --format triton`` on NVIDIA Triton Inference Server.
        Preprocessing and aggregation stay here; only :meth:`forward` goes to the server.
        With a checkpoint, the server's card is checked against it on the first remote
        forward (or by :meth:`check_remote`); without one, the card is fetched now.
    timeout : float
        Seconds a remote request may take before the server counts as unavailable.

    Raises
    ------
    InferenceUnavailable
        No checkpoint was given and the server cannot be reached (retry later).
    """

    def __init__(self, checkpoint: str | Path | LoadedModel | None = None, device: str = "auto", *,
                 inference: str | None = None, timeout: float = 60.0) -> None:
        from medclass.remote import TritonModel, is_remote

        self.inference = inference or "local"
        self.remote: TritonModel | None = None
        self._remote_checked = False
        if self.inference != "local":
            self.remote = TritonModel(self.inference, timeout)  # refuses anything but triton://...
        if isinstance(checkpoint, LoadedModel):
            self.loaded = checkpoint
        elif checkpoint is None:
            if self.remote is None:
                raise MedClassError("no checkpoint given for local inference",
                                    "pass --checkpoint model.pt, or --inference triton://HOST:PORT/MODEL")
            card = self.remote.card()
            self.loaded = LoadedModel(None, card, Task(**card["task"]), torch.device("cpu"))
            self._remote_checked = True  # the card is the server's own
        elif self.remote is not None:
            # The model runs on the server: its card is all this process needs (no weights loaded).
            card = read_card(checkpoint)
            self.loaded = LoadedModel(None, card, Task(**card["task"]), torch.device("cpu"))
        else:
            self.loaded = load_checkpoint(checkpoint, device)
        if self.remote is not None and self.loaded.family == "crossmodal":
            raise MedClassError(f"{self.loaded.name} takes text and header inputs, which remote inference does not send",
                                "use local inference for a cross-modal model")
        assert self.remote is None or is_remote(self.inference)
        self.task = self.loaded.task
        self.classes = self.task.classes

    @property
    def remote_checked(self) -> bool:
        """Whether the remote server's model card was checked against this classifier's (or is its own)."""
        return self._remote_checked

    def check_remote(self) -> dict[str, Any]:
        """Check the served model's card against this classifier's; returns the server's card.

        Raises
        ------
        InferenceUnavailable
            The server cannot be reached (retry later).
        MedClassError
            The served model differs from the checkpoint (name, classes, input, calibration).
        """
        from medclass.remote import card_differences

        if self.remote is None:
            raise MedClassError("this classifier runs locally", "pass inference='triton://HOST:PORT/MODEL'")
        remote_card = self.remote.card()
        diff = card_differences(self.card, remote_card)
        if diff:
            raise MedClassError(f"the model served at {self.inference} is not this checkpoint: " + "; ".join(diff),
                                "export this checkpoint with 'medclass export --format triton' and serve that "
                                "repository, or point --inference at the model exported from it")
        self._remote_checked = True
        return remote_card

    @property
    def card(self) -> dict[str, Any]:
        return self.loaded.card

    def preprocess(self, image) -> torch.Tensor:
        """The checkpoint's own preprocessing of one :class:`~medclass.io.ImageData`."""
        from medclass.transforms import preprocess

        return preprocess(image, self.loaded.preprocess_spec)

    def extra_inputs(self, metas: list[dict[str, Any]], texts: list[str | None] | None = None):
        """Tabular (from the DICOM header) and text inputs for a cross-modal model."""
        if self.loaded.family != "crossmodal":
            return None
        from medclass.multimodal import encode_tabular, tokenize

        return {"text": tokenize(texts or [None] * len(metas)), "tabular": encode_tabular(metas)}

    def probabilities(self, images: list, texts: list[str | None] | None = None,
                      priority: str = "routine") -> np.ndarray:
        """Probabilities ``(N, K)`` for :class:`~medclass.io.ImageData` objects."""
        x = torch.stack([self.preprocess(im) for im in images])
        return self.forward(x, self.extra_inputs([im.meta for im in images], texts), priority=priority)

    def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor] | None = None, batch_size: int = 64,
                priority: str = "routine") -> np.ndarray:
        """Calibrated probabilities ``(N, K)`` of preprocessed images: the model's forward pass only.

        Every path of this class that runs the model comes through here, so where the model
        runs (this process, or a remote inference server) is decided in one place.
        ``priority`` (``urgent`` or ``routine``) matters only to a server that queues requests.
        """
        if self.remote is None:
            return forward_probabilities(self.loaded, x, extra, batch_size)
        if extra:
            raise MedClassError("remote inference sends images only", "use local inference for this model")
        if not self._remote_checked:
            self.check_remote()
        return self.remote.probabilities(x.numpy(), priority, batch_size).astype(np.float64)

    def predict(self, images: list, texts: list[str | None] | None = None,
                priority: str = "routine") -> list[Prediction]:
        """One :class:`Prediction` per image."""
        probs = self.probabilities(images, texts, priority)
        return [self._prediction(im.meta.get("path"), p, im.meta) for im, p in zip(images, probs)]

    def read(self, path: str | Path):
        """Read an image the way this model expects it (see :func:`medclass.io.read_image`).

        A model with its own window reads DICOM without the header's VOI LUT.
        """
        from medclass.io import read_image

        return read_image(path, apply_voi=not self.loaded.preprocess_spec.get("window"))

    def predict_paths(self, paths: Iterable[str | Path]) -> list[Prediction]:
        """Read and classify files (any format :func:`medclass.io.read_image` reads)."""
        return self.predict([self.read(p) for p in paths])

    @property
    def preprocess_fingerprint(self) -> str:
        """A short digest of everything :meth:`prepare` depends on.

        Two checkpoints with the same fingerprint turn a file into the same tensor, so a cache
        of prepared images (the DICOM node's, filled as instances arrive) is keyed by it and
        never hands one model another model's preprocessing.
        """
        import hashlib
        import json

        from medclass import __version__

        what = {"spec": self.loaded.preprocess_spec, "voi": not self.loaded.preprocess_spec.get("window"),
                "medclass": __version__}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def prepare(self, path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
        """Read one file and preprocess it for this model: the tensor and the image's metadata.

        Everything :meth:`classify_study` does to a file before the forward pass; raises
        when the file cannot be read or preprocessed.
        """
        image = self.read(path)
        return self.preprocess(image), image.meta

    def classify_study(self, paths: Iterable[str | Path], batch_size: int = 64,
                       priority: str = "routine") -> StudyResult:
        """Classify the images of one study (or series) together: one study-level result.

        Each file is read and preprocessed as :meth:`prepare` does; a file that cannot be is
        skipped with its reason (the others still count), the rest go through the model in
        batches, and :meth:`aggregate` combines them. The DICOM node calls
        :meth:`classify_prepared` for every series a model classifies, with the images it
        prepared as they arrived.
        """
        return self.classify_prepared([self.try_prepare(p) for p in paths], batch_size, priority)

    def try_prepare(self, path: str | Path) -> tuple[torch.Tensor, dict[str, Any]] | str:
        """:meth:`prepare`, or the one-line reason the file cannot be prepared (skip the image, not the study)."""
        try:
            return self.prepare(path)
        except MedClassError as e:
            return str(e)
        except Exception as e:  # a decoder or transform failing on odd data
            return f"cannot read or preprocess {path} ({type(e).__name__}: {e})"

    def classify_prepared(self, prepared: list[tuple[torch.Tensor, dict[str, Any]] | str], batch_size: int = 64,
                          priority: str = "routine") -> StudyResult:
        """Classify already prepared images of one study: the forward pass and the aggregation only.

        Parameters
        ----------
        prepared : list
            Per image, in order, what :meth:`prepare` returned, or a string: why that image
            could not be prepared (it is reported in ``skipped`` under its index).
        batch_size : int
        priority : str
            ``urgent`` or ``routine``, for a remote inference server's queue.
        """
        tensors, metas, used, skipped = [], [], [], {}
        for i, item in enumerate(prepared):
            if isinstance(item, str):
                skipped[i] = item
                continue
            tensors.append(item[0])
            metas.append(item[1])
            used.append(i)
        if not used:
            return StudyResult({}, [], [], skipped, np.zeros((0, len(self.classes))))
        rows = self.forward(torch.stack(tensors), self.extra_inputs(metas), batch_size, priority)
        row = self.aggregate(rows)
        return StudyResult({c: round(float(p), 6) for c, p in zip(self.classes, row)}, self.task.label_names(row),
                           used, skipped, rows)

    def aggregate(self, probs: np.ndarray) -> np.ndarray:
        """Combine image probabilities ``(N, K)`` into one study-level row.

        ``mean`` averages; ``max`` takes, per class, the most suspicious image
        (e.g. one view of four showing a lesion), then renormalises for
        single-label tasks.
        """
        how = self.card.get("aggregation", "mean")
        row = probs.max(axis=0) if how == "max" else probs.mean(axis=0)
        if how == "max" and self.task.type != "multilabel":
            row = row / row.sum()
        return row

    def prediction_set(self, probs_row: np.ndarray | dict[str, float], coverage: float,
                       method: str = "lac") -> list[str] | None:
        """The classes of the split-conformal prediction set of one (calibrated) probability row.

        ``None`` when the card stores no conformal scores (an older checkpoint, or a
        multilabel model). More than one class means the model cannot tell them
        apart at this coverage: an "uncertain" result.
        """
        from medclass.calibration import card_qhat, prediction_set

        qhat = card_qhat(self.card, coverage, method)
        if qhat is None:
            return None
        if isinstance(probs_row, dict):
            probs_row = np.array([probs_row[c] for c in self.classes])
        return [self.classes[i] for i in prediction_set(probs_row, qhat, method)]

    def _prediction(self, path, probs_row: np.ndarray, meta=None) -> Prediction:
        return Prediction(
            None if path is None else str(path),
            self.task.label_names(probs_row),
            {c: round(float(p), 6) for c, p in zip(self.classes, probs_row)},
            meta or {},
        )


@dataclass
class PublishedModel:
    """The checkpoint an annotation server serves for one model name.

    Training writes a new ``model.pt`` elsewhere and :meth:`publish` moves it
    in place atomically; :meth:`classifier` notices the new file (its size and
    modification time) and reloads it, so the next request uses the new model
    without a restart.
    """

    path: Path
    device: str = "auto"
    inference: str | None = None  # "local" or "triton://...": where the classifier runs its model

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._lock = threading.Lock()
        self._cached: tuple[str, Any] | None = None

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    @property
    def version(self) -> str | None:
        """Changes whenever a new checkpoint is published; ``None`` before the first."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return f"{st.st_mtime_ns}-{st.st_size}"

    def card(self) -> dict[str, Any] | None:
        from medclass.checkpoint import read_card

        return read_card(self.path) if self.exists else None

    def classifier(self):
        """The current :class:`~medclass.inference.Classifier` (reloaded after a publication)."""
        with self._lock:
            version = self.version
            if version is None:
                raise MedClassError(f"no trained model at {self.path}",
                                    "label images of every class and start a training run")
            if self._cached is None or self._cached[0] != version:
                self._cached = (version, Classifier(self.path, self.device, inference=self.inference))
            return self._cached[1]

    def publish(self, checkpoint: str | Path) -> str:
        """Copy ``checkpoint`` into place atomically; returns the new version."""
        import shutil

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return self.version or ""
