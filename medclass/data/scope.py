"""What images a model was trained on: DICOM modality and body part.

A checkpoint's card records them (``card["data"]["modality"]`` and
``card["data"]["body_part"]``, each a list of DICOM codes such as ``["MR"]`` and
``["BRAIN"]``, or ``None`` when the training data did not say), so that a front
door can refuse to apply a brain-MRI model to a mammogram. They come from the
training data's DICOM headers (Modality, Body Part Examined), from the built-in
datasets' definitions, or from ``medclass train --modality --body-part``; a folder
of JPEGs says nothing, and then nothing is restricted.

Matching is by family, as sites code the same examination differently: CR and DX
are both projection radiography, and Body Part Examined says HEAD for many brain
MRIs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

#: Modalities that are the same kind of image for a model (projection radiography).
MODALITY_FAMILIES = ({"CR", "DX"},)
#: Body Part Examined values sites use for the same region.
BODY_PART_FAMILIES = ({"BRAIN", "HEAD", "SKULL"}, {"CHEST", "THORAX", "LUNG"}, {"BREAST"})


def codes(values: str | Iterable[str] | None) -> list[str] | None:
    """DICOM codes as a sorted, upper-case list without blanks; ``None`` when there are none.

    Accepts ``"CR,DX"``, ``"MR"``, ``["mr"]`` or ``None``.
    """
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    out = sorted({str(v).strip().upper() for v in values if str(v).strip()})
    return out or None


def _family(value: str, families: Sequence[set[str]]) -> set[str]:
    return next((f for f in families if value in f), {value})


def _matches(value: str, trained: list[str], families: Sequence[set[str]]) -> bool:
    return any(value in _family(t, families) for t in trained)


def describe(values: list[str] | None) -> str:
    """``["CR", "DX"]`` -> ``"CR or DX"``."""
    return " or ".join(values) if values else "unknown"


def scope_mismatch(data: dict[str, Any] | None, modality: str | None, body_part: str | None) -> str | None:
    """Why an image of this modality and body part is outside what the model was trained on, or ``None``.

    Parameters
    ----------
    data : dict or None
        ``card["data"]`` of the checkpoint.
    modality, body_part : str or None
        The series' Modality and Body Part Examined.

    Returns
    -------
    str or None
        E.g. ``"is CT; the model was trained on MR"``; ``None`` when it matches, or
        when either side does not say (the body part is compared only when both
        are known).
    """
    data = data or {}
    trained_modality, trained_body = codes(data.get("modality")), codes(data.get("body_part"))
    modality = (modality or "").strip().upper()
    body_part = (body_part or "").strip().upper()
    if trained_modality and modality and not _matches(modality, trained_modality, MODALITY_FAMILIES):
        return f"is {modality}; the model was trained on {describe(trained_modality)}"
    if trained_body and body_part and not _matches(body_part, trained_body, BODY_PART_FAMILIES):
        return f"is of body part {body_part}; the model was trained on {describe(trained_body)}"
    return None


def scope_from_dicom(paths: Iterable[str | Path]) -> tuple[list[str] | None, list[str] | None]:
    """Modality and body part of a training set from its files' DICOM headers.

    Unknown (``None``) unless every file is DICOM: a set that mixes in JPEGs may hold
    anything. The body part is likewise known only if every header gives one.
    """
    import pydicom

    from medclass.io import is_dicom_file

    modalities: set[str] = set()
    bodies: set[str] = set()
    body_known = True
    n = 0
    for p in paths:
        if p is None or not is_dicom_file(p):
            return None, None
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["Modality", "BodyPartExamined"])
        except Exception:  # unreadable here is reported when the pixels are read
            return None, None
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if not modality:
            return None, None
        modalities.add(modality)
        body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
        body_known = body_known and bool(body)
        bodies.add(body)
        n += 1
    if n == 0:
        return None, None
    return sorted(modalities), (sorted(bodies) if body_known else None)
