"""Splitting a dataset and turning its samples into model-ready tensors.

The split is deterministic (a seed), stratified by label and grouped by patient
where the source knows the patient, so that no patient is in two splits. The
tensors are built once per run with the shared preprocessing
(:func:`medclass.transforms.build_preprocess`), the same one inference uses.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from medclass.data.sources import LabelledSet, Sample
from medclass.errors import MedClassError

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def split_samples(
    ds: LabelledSet, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, list[int]]:
    """Indices of the train, val and test splits.

    A split fixed by the source (MedMNIST) is kept. Otherwise patients (or
    images, when the patient is unknown) are shuffled with ``seed`` within each
    class and dealt out by ``fractions``; every class keeps at least one group
    in train.
    """
    if all(s.split for s in ds.samples):
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, s in enumerate(ds.samples):
            out[s.split].append(i)
        return out
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(ds.samples):
        groups[s.patient_id or s.key].append(i)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, idx in groups.items():
        by_class[_stratum(ds.samples[idx[0]])].append(g)
    rng = np.random.default_rng(seed)
    out = {"train": [], "val": [], "test": []}
    for stratum in sorted(by_class):
        gs = sorted(by_class[stratum])
        rng.shuffle(gs)
        n = len(gs)
        n_test = int(round(fractions[2] * n)) if n >= 3 else 0
        n_val = int(round(fractions[1] * n)) if n >= 3 else 0
        for j, g in enumerate(gs):
            part = "test" if j < n_test else "val" if j < n_test + n_val else "train"
            out[part].extend(groups[g])
    return {k: sorted(v) for k, v in out.items()}


def _stratum(s: Sample) -> str:
    if isinstance(s.label, list):  # multilabel: stratify by the first finding present
        return str(next((i for i, v in enumerate(s.label) if v), -1))
    return str(s.label)


@dataclass
class TensorSet:
    """Model-ready tensors of some samples of a dataset."""

    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]
    text: torch.Tensor | None = None
    tabular: torch.Tensor | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    def extra(self, idx: torch.Tensor | slice | None = None) -> dict[str, torch.Tensor]:
        """The non-image inputs of a batch, for a cross-modal model."""
        out = {}
        for name in ("text", "tabular"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t if idx is None else t[idx]
        return out


def sample_image(s: Sample, spec: dict | None = None):
    """The :class:`~medclass.io.ImageData` of a sample (read from disk or memory).

    A spec with its own window reads DICOM without the header's VOI LUT, which
    cannot be undone once applied.
    """
    from medclass.io import ImageData, read_image

    if s.array is None:
        return read_image(s.path, apply_voi=not (spec or {}).get("window"))
    a = np.asarray(s.array, dtype=np.float32)
    # MedMNIST: (H, W) grey, (H, W, 3) colour, (D, H, W) volumes.
    if a.ndim == 3 and a.shape[-1] == 3:
        a = np.moveaxis(a, -1, 0)
    else:
        a = a[None]
    return ImageData(a, {"path": s.key, "format": "npz"})


def materialize(
    ds: LabelledSet,
    indices: list[int],
    spec: dict,
    multimodal: bool = False,
    workers: int | None = None,
    progress: bool = False,
) -> TensorSet:
    """Read and preprocess ``ds.samples[indices]`` into one :class:`TensorSet`.

    Unreadable images are skipped with a warning and listed in ``skipped``, so
    that one corrupt file among thousands does not stop a training run; an
    all-unreadable selection raises :class:`MedClassError`.
    """
    from medclass.transforms import preprocess

    samples = [ds.samples[i] for i in indices]

    def load(s: Sample):
        try:
            img = sample_image(s, spec)
            return preprocess(img, spec), img.meta
        except MedClassError as e:
            return None, str(e)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(load, samples)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(samples), desc=f"reading {ds.name}", unit="img", leave=False)
        results = list(it)
    xs, keep, skipped, metas = [], [], [], []
    for s, (x, meta) in zip(samples, results):
        if x is None:
            skipped.append(f"{s.key}: {meta}")
            continue
        xs.append(x)
        keep.append(s)
        metas.append(meta)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    if not xs:
        raise MedClassError(f"none of the {len(samples)} images of {ds.name} could be read ({skipped[0]})",
                            "check the files")
    ts = TensorSet(
        torch.stack(xs),
        torch.tensor(np.array([s.label for s in keep])),
        [s.key for s in keep],
        skipped=skipped,
    )
    if ds.task.type == "multilabel":
        ts.y = ts.y.float()
    if multimodal:
        from medclass.multimodal import encode_tabular, tokenize

        ts.text = tokenize([s.text for s in keep])
        # Tabular values from the manifest, else from the DICOM header.
        ts.tabular = encode_tabular([s.tabular or meta for s, meta in zip(keep, metas)])
    return ts
