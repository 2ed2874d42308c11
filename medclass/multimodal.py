"""Inputs of the cross-modal models besides the image: report text and DICOM header fields.

:func:`tokenize` turns report / indication text into hashed token ids (no vocabulary
file to ship: the same text gives the same ids in every process and on every
machine); :func:`encode_tabular` turns header fields into a float row with NaN for
what is missing. The models live in :mod:`medclass.models.crossmodal`.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Iterable

import torch

from medclass.io import TABULAR_FIELDS, parse_age

__all__ = ["TABULAR_FIELDS", "encode_tabular", "tokenize"]

_TOKEN = re.compile(r"[a-z0-9]+")
_SEX = {"M": 1.0, "F": 0.0}
_LATERALITY = {"L": 0.0, "R": 1.0}
# Frontal-ish views (mammography CC, radiography AP) vs oblique/posterior ones (MLO, PA).
_VIEW = {"CC": 0.0, "AP": 0.0, "MLO": 1.0, "PA": 1.0}


def tokenize(texts: Iterable[str | None], max_len: int = 128, buckets: int = 2**15) -> torch.Tensor:
    """Hashed token ids of each text, padded with 0.

    Lowercases, splits on non-alphanumerics and hashes each token with CRC-32 into
    ``[1, buckets)``; Python's ``hash()`` is salted per process, so it would give a
    different model input in the node than in training.

    Parameters
    ----------
    texts : iterable of str or None
        One text per sample; ``None`` or empty gives an all-padding row (text missing).
    max_len : int
        Tokens kept per text (the first ones).
    buckets : int
        Size of the hash space, the text encoder's embedding rows.

    Returns
    -------
    torch.Tensor
        ``LongTensor (B, max_len)``.
    """
    texts = list(texts)
    out = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = _TOKEN.findall((text or "").lower())[:max_len]
        ids = [1 + zlib.crc32(t.encode("utf-8")) % (buckets - 1) for t in tokens]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _age_years(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    years = parse_age(str(value))  # a DICOM Age String ("045Y"), or years as text
    return math.nan if years is None else years


def _code(value: Any, table: dict[str, float]) -> float:
    if value is None:
        return math.nan
    return table.get(str(value).strip().upper(), math.nan)


def encode_tabular(records: Iterable[dict[str, Any]]) -> torch.Tensor:
    """Header fields of each record as a float row, NaN where missing or unknown.

    Columns follow :data:`TABULAR_FIELDS`: ``age / 100`` (a number of years or a DICOM
    age string like ``"045Y"``), ``sex`` M=1 F=0, ``laterality`` L=0 R=1, ``view``
    CC/AP=0, MLO/PA=1. Any other value (``"O"``, ``"B"``, ``"LAT"``...) is NaN: the
    model sees it as missing rather than as a wrong code.

    Returns
    -------
    torch.Tensor
        ``FloatTensor (B, 4)``.
    """
    rows = []
    for r in records:
        age = _age_years(r.get("age"))
        rows.append([
            age / 100.0 if math.isfinite(age) else math.nan,
            _code(r.get("sex"), _SEX),
            _code(r.get("laterality"), _LATERALITY),
            _code(r.get("view"), _VIEW),
        ])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(TABULAR_FIELDS))
