"""Where medclass keeps what it writes by default: one place, one rule.

``MEDCLASS_HOME`` (default ``runs`` in the current folder) holds the quickstart
model and other default outputs. The CLI, the DICOM node and the MONAI Label app
all find the default checkpoint here, so they agree on it.
"""

from __future__ import annotations

import os
from pathlib import Path


def medclass_home() -> Path:
    """``$MEDCLASS_HOME``, else ``runs`` (relative to the current folder); read at each call."""
    return Path(os.environ.get("MEDCLASS_HOME") or "runs")


def quickstart_dir() -> Path:
    """The folder ``medclass quickstart`` writes its model, metrics and plots to."""
    return medclass_home() / "quickstart"


def default_checkpoint() -> Path | None:
    """The quickstart model when ``medclass quickstart`` has written one, else ``None``."""
    p = quickstart_dir() / "model.pt"
    return p if p.is_file() else None


__all__ = ["default_checkpoint", "medclass_home", "quickstart_dir"]
