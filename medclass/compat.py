"""Compatibility shims installed into the environment by ``make install``.

MONAI Label 0.8.5 imports ``pydicom-seg`` 0.4.1 when its server starts, and
``pydicom-seg`` does ``from pydicom._storage_sopclass_uids import ...``: a
private module that pydicom 3 removed (the UIDs now live in ``pydicom.uid``).
The server also runs training and scoring in fresh subprocesses, so patching
one interpreter is not enough. :func:`install_pth` writes a ``.pth`` file into
the environment's ``site-packages``; Python runs it at every start-up and it
registers :class:`PydicomStorageAlias`, a lazy import hook that builds the old
module from ``pydicom.uid`` only when something imports it. Nothing is
imported at start-up, so interpreters that never touch pydicom pay nothing.

Run ``python -m medclass.compat`` to (re)install the hook; ``make install`` does.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
import types
from pathlib import Path

ALIAS = "pydicom._storage_sopclass_uids"
PTH_NAME = "medclass-pydicom3-compat.pth"
# One line: .pth files execute lines that start with "import".
PTH_LINE = "import medclass.compat as _m; _m.install_pydicom_alias()\n"


class PydicomStorageAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve ``pydicom._storage_sopclass_uids`` from ``pydicom.uid`` (pydicom >= 3)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        if fullname != ALIAS:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):  # noqa: D102
        return None  # default module creation

    def exec_module(self, module: types.ModuleType) -> None:  # noqa: D102
        import pydicom.uid as uid

        names = {k: v for k, v in vars(uid).items() if k.endswith("Storage") and isinstance(v, str)}
        module.__dict__.update(names)
        module.__all__ = sorted(names)


def install_pydicom_alias() -> None:
    """Register the alias in this interpreter (idempotent).

    Does nothing when pydicom still ships the module itself (pydicom < 3).
    """
    if any(isinstance(f, PydicomStorageAlias) for f in sys.meta_path):
        return
    # Appended, not prepended: pydicom 2's real module, when present, wins.
    sys.meta_path.append(PydicomStorageAlias())


def install_pth(site_packages: str | Path | None = None) -> Path:
    """Write the ``.pth`` start-up hook into ``site_packages`` (default: this environment's).

    Returns
    -------
    Path
        The file written.
    """
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(PTH_LINE)
    return target


if __name__ == "__main__":  # pragma: no cover - exercised by make install
    print(f"installed {install_pth()}")
