"""The Indiana University chest X-ray reports, and the text branch's real-data check.

No paired image + report set can be had offline, but the torchxrayvision wheel ships
3,955 real radiology reports (``data/NLMCXR_reports.tgz``) with MeSH major terms. A
normal-vs-abnormal classifier trained on them with the cross-modal
:class:`~medclass.models.crossmodal.TextEncoder` is the honest evidence that the text
branch learns from real report language.
"""

from __future__ import annotations

import importlib.util
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclass.errors import MedClassError

REPORTS_ARCHIVE = "data/NLMCXR_reports.tgz"
_INSTALL = "pip install --no-deps torchxrayvision==1.5.7"


def _archive_path() -> Path:
    # Locate the package without importing it: torchxrayvision imports torchvision,
    # which fails beside this torch build.
    spec = importlib.util.find_spec("torchxrayvision")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / REPORTS_ARCHIVE
        if path.is_file():
            return path
    raise MedClassError("the IU chest X-ray reports (torchxrayvision's NLMCXR_reports.tgz) are not installed",
                        _INSTALL)


def _label(mesh: list[str]) -> int | None:
    if mesh == ["normal"]:
        return 0
    # "No Indexing" means nobody coded the report: neither normal nor abnormal.
    if not mesh or mesh == ["No Indexing"]:
        return None
    return 1


def load_iu_reports() -> list[dict[str, Any]]:
    """Parse every report XML of the archive.

    Returns
    -------
    list of dict
        Sorted by ``id`` (e.g. ``"CXR1"``), each with ``findings``, ``impression``,
        ``indication`` (str, ``""`` when absent), ``mesh`` (list of MeSH major terms) and
        ``label``: 0 (normal) when the MeSH major terms are exactly ``["normal"]``, 1
        (abnormal) for any other term, ``None`` for the reports marked "No Indexing".
    """
    reports = []
    with tarfile.open(_archive_path()) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {
                (e.get("Label") or "").lower(): (e.text or "").strip()
                for e in root.iter("AbstractText")
            }
            uid = root.find("uId")
            mesh = [(e.text or "").strip() for e in root.findall("MeSH/major")]
            reports.append({
                "id": uid.get("id") if uid is not None else Path(member.name).stem,
                "findings": sections.get("findings", ""),
                "impression": sections.get("impression", ""),
                "indication": sections.get("indication", ""),
                "mesh": mesh,
                "label": _label(mesh),
            })
    reports.sort(key=lambda r: r["id"])
    return reports


def train_text_classifier(reports: list[dict[str, Any]], seed: int = 0, epochs: int = 8,
                          batch_size: int = 64) -> dict[str, Any]:
    """Train TextEncoder + a linear head on normal vs abnormal; AUC on held-out reports.

    Reports without a label or without findings/impression text are left out. The split
    is a seeded 70/30 permutation of the reports sorted by id, so it is the same on
    every machine.

    Parameters
    ----------
    reports : list of dict
        From :func:`load_iu_reports`.
    seed : int
        Split and initialisation seed.
    epochs : int
        Passes over the training reports.
    batch_size : int
        Reports per step.

    Returns
    -------
    dict
        ``auc`` (held-out ROC AUC), ``n_train``, ``n_test``, ``seconds``.
    """
    from sklearn.metrics import roc_auc_score

    from medclass.models.crossmodal import TextEncoder
    from medclass.multimodal import tokenize

    start = time.perf_counter()
    usable = sorted(
        (r for r in reports if r.get("label") is not None and (r.get("findings") or r.get("impression"))),
        key=lambda r: r["id"],
    )
    if len(usable) < 10:
        raise MedClassError(f"only {len(usable)} labelled reports with text", "pass the output of load_iu_reports()")
    tokens = tokenize(f"{r['findings']} {r['impression']}" for r in usable)
    labels = torch.tensor([float(r["label"]) for r in usable])
    order = np.random.RandomState(seed).permutation(len(usable))
    n_train = int(round(0.7 * len(usable)))
    train_idx, test_idx = torch.from_numpy(order[:n_train]), torch.from_numpy(order[n_train:])

    torch.manual_seed(seed)
    encoder = TextEncoder()
    model = nn.Sequential(encoder, nn.Linear(encoder.out_features, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(tokens[idx]).squeeze(1), labels[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        scores = model(tokens[test_idx]).squeeze(1).numpy()
    auc = float(roc_auc_score(labels[test_idx].numpy(), scores))
    return {"auc": auc, "n_train": len(train_idx), "n_test": len(test_idx),
            "seconds": time.perf_counter() - start}
