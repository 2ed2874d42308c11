"""The node's C-STORE fast path: one package, one switch (``fast_path`` in ``node.toml``).

It re-implements pieces of pynetdicom 3.0.4 for speed (see ``BENCHMARKS.md``):

- :mod:`dicom_node.fastpath.reactor` — event-driven association loops (pynetdicom's own
  poll every millisecond) and a directly encoded C-STORE response;
- :mod:`dicom_node.fastpath.header` — the received data set's UIDs read by a header
  walk, and the Part 10 File Meta Information encoded directly.

The reactor relies on pynetdicom's private internals, so it is tied to the pinned
version: with ``fast_path = true`` (the default) the node refuses to start on any other
pynetdicom rather than silently running something untested. ``fast_path = false`` uses
pynetdicom's own loops and pydicom for the header and the file meta; the tests run the
node on both paths.
"""

from __future__ import annotations

import pynetdicom

from medclass.errors import MedClassError

#: The pynetdicom whose internals the fast path re-implements (pinned in pyproject.toml).
PINNED_PYNETDICOM = "3.0.4"

#: Whether the installed pynetdicom is the pinned one (the fast path can run).
AVAILABLE = pynetdicom.__version__ == PINNED_PYNETDICOM


def check_fast_path(enabled: bool) -> None:
    """Fail at start when the fast path is on but pynetdicom is not the pinned version.

    Raises
    ------
    MedClassError
        ``enabled`` and ``pynetdicom.__version__ != PINNED_PYNETDICOM``.
    """
    if enabled and pynetdicom.__version__ != PINNED_PYNETDICOM:
        raise MedClassError(
            f"fast_path needs pynetdicom {PINNED_PYNETDICOM}, the version its loops are copied from; "
            f"this is pynetdicom {pynetdicom.__version__}",
            f"set fast_path = false in node.toml (or pass --no-fast-path), or install pynetdicom=={PINNED_PYNETDICOM}",
        )


__all__ = ["AVAILABLE", "PINNED_PYNETDICOM", "check_fast_path"]
