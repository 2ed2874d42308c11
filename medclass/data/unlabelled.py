"""Unlabelled images: what self-supervised pretraining and semi-supervised training read.

Any ``--data`` specification works (its labels are ignored), and so does a plain
folder of images or DICOM files, nested to any depth and of mixed formats. Files
that cannot serve are skipped, never a crash: each kind of problem is counted
and logged once with an example (:attr:`UnlabelledImages.skipped`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medclass.data.sources import BUILTIN, Sample, load_dataset
from medclass.errors import MedClassError

log = logging.getLogger(__name__)

# The kinds of skipped file, in the order they are reported.
SKIP_KINDS = {
    "not-an-image": "not an image file (by extension and content)",
    "no-pixels": "DICOM objects without pixel data (SR, RT, presentation states, ...)",
    "unreadable": "corrupt, truncated or undecodable image files",
}


@dataclass
class UnlabelledImages:
    """Preprocessed unlabelled images.

    Attributes
    ----------
    x : torch.Tensor
        ``(N, C, H, W)`` (or ``(N, C, D, H, W)``) images, preprocessed with the spec.
    keys : list of str
        Where each image came from (a path relative to the folder, or the dataset key).
    name : str
        The source's name.
    fingerprint : str
        A digest of the keys, recorded in an encoder's model card.
    skipped : dict
        ``{kind: [example messages]}`` for the files left out (see :data:`SKIP_KINDS`).
    """

    x: torch.Tensor
    keys: list[str]
    name: str
    fingerprint: str
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def skipped_counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.skipped.items() if v}


def _folder_samples(root: Path) -> tuple[list[Sample], list[str]]:
    from medclass.io import is_image_file

    samples, not_images = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        key = str(p.relative_to(root))
        if p.suffix.lower() == ".csv" or not is_image_file(p):
            not_images.append(key)
            continue
        samples.append(Sample(key, None, str(p)))
    return samples, not_images


def _skip_kind(message: str) -> str:
    # read_image's messages: a DICOM object of a non-image SOP class has "no Pixel Data
    # (SOP class ...)"; everything else it rejects is damaged or undecodable.
    return "no-pixels" if "has no Pixel Data (SOP class" in message else "unreadable"


def load_unlabelled(spec: str, preprocess_spec: dict, *, progress: bool = False,
                    workers: int | None = None) -> UnlabelledImages:
    """Read and preprocess the unlabelled images of ``spec``.

    Parameters
    ----------
    spec : str
        A ``--data`` specification (built-in name, class folder, CSV manifest, ``.npz``,
        DICOM folder with ``labels.csv``: labels are ignored) or any folder of images.
    preprocess_spec : dict
        The preprocessing (:meth:`medclass.training.TrainConfig.preprocess_spec`).
    progress : bool
        Show a progress bar while reading.

    Raises
    ------
    MedClassError
        When ``spec`` does not exist or none of its files is a readable image.
    """
    from medclass.data.loading import sample_image
    from medclass.transforms import preprocess

    skipped: dict[str, list[str]] = defaultdict(list)
    p = Path(spec).expanduser()
    if spec not in BUILTIN and p.is_dir() and not (p / "labels.csv").is_file():
        samples, not_images = _folder_samples(p)
        skipped["not-an-image"] += not_images
        name = p.name
    elif spec in BUILTIN or p.is_file() or p.is_dir():
        ds = load_dataset(spec)
        samples, name = ds.samples, ds.name
    else:
        raise MedClassError(f"--data {spec}: no such file, folder or built-in dataset",
                            "pass a folder of images (nested folders and DICOM are fine) or a --data form")

    def load(s: Sample):
        try:
            return preprocess(sample_image(s, preprocess_spec), preprocess_spec), None
        except MedClassError as e:
            return None, str(e)

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        it = pool.map(load, samples)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(samples), desc=f"reading {name}", unit="img", leave=False)
        results = list(it)
    xs, keys = [], []
    for s, (x, err) in zip(samples, results):
        if x is None:
            skipped[_skip_kind(err)].append(f"{s.key}: {err}")
        else:
            xs.append(x)
            keys.append(s.key)
    for kind, what in SKIP_KINDS.items():
        if skipped.get(kind):
            log.warning("skipped %d %s, e.g. %s", len(skipped[kind]), what, skipped[kind][0])
    if not xs:
        counts = ", ".join(f"{len(v)} {k}" for k, v in skipped.items() if v) or "no files"
        raise MedClassError(f"{spec} holds no readable image ({counts})",
                            "point --data at DICOM, PNG, JPEG, NIfTI or NRRD images")
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(f"{k}\n".encode())
    if len({tuple(x.shape) for x in xs}) > 1:  # preprocess resizes, so this is a bug, not a user error
        raise RuntimeError("preprocessed images differ in shape")
    x = torch.stack(xs) if xs else torch.empty(0)
    return UnlabelledImages(x, keys, name, h.hexdigest()[:16], dict(skipped))


__all__ = ["SKIP_KINDS", "UnlabelledImages", "load_unlabelled"]
