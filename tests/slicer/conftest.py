"""Fixtures for the Slicer module's headless tests (slicer-core's MRML, no Qt).

``SlicerMedClass/`` goes on ``sys.path`` the way Slicer adds a scripted module's
folder, so ``import SlicerMedClassLib`` resolves as it does inside Slicer.
Volume builders are in ``mrml_volumes.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
MODULE_DIR = TESTS_DIR.parent / "SlicerMedClass"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def _import_slicer():
    """Import slicer-core's ``slicer`` package without this folder becoming part of it.

    ``slicer/__init__.py`` extends its ``__path__`` with every ``slicer`` folder on
    ``sys.path`` (pkgutil.extend_path) and imports each module in them; pytest puts
    ``tests/`` on ``sys.path`` for the root conftest, so ``tests/slicer`` would be
    imported as part of the package. Hide ``tests/`` for the one import.
    """
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != TESTS_DIR]
    try:
        import slicer
    finally:
        sys.path[:] = saved
    return slicer


slicer = _import_slicer()


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture
def logic(scene):
    from SlicerMedClassLib.logic import ClassificationLogic

    return ClassificationLogic(scene, device="cpu")


@pytest.fixture(scope="session")
def checkpoint(trained) -> Path:
    """The session's resnet18 trained on real Br35H images."""
    return trained / "model.pt"
