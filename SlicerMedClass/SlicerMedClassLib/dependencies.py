"""Which Python packages the module still needs inside Slicer, and how they are installed.

Standard library only: this runs before anything is installed. The widget shows
:func:`install_plan` and asks before :meth:`SlicerMedClassLogic.installDependencies`
installs anything (torch through the PyTorch extension, which picks the build that
matches the GPU driver; then medclass with ``slicer.util.pip_install``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass

#: torch as medclass needs it; PyTorchUtils installs the build matching the driver.
TORCH_REQUIREMENT = ">=2.13"
#: The pip requirement for the shared core. A Slicer setting
#: ``SlicerMedClass/MedClassRequirement`` may replace it (a wheel file, a source
#: checkout, a version pin).
MEDCLASS_REQUIREMENT = "slicer-medclass"


@dataclass(frozen=True)
class Missing:
    """One package to install."""

    module: str  # import name
    requirement: str  # what is installed
    how: str  # "PyTorch extension" or "pip"
    why: str


def missing_packages(medclass_requirement: str = MEDCLASS_REQUIREMENT) -> list[Missing]:
    """The packages that cannot be imported yet, in install order (torch first)."""
    out = []
    if importlib.util.find_spec("torch") is None:
        out.append(Missing("torch", f"torch{TORCH_REQUIREMENT}", "PyTorch extension",
                           "runs the models (the PyTorch extension picks the CPU or CUDA build for this computer)"))
    if importlib.util.find_spec("medclass") is None:
        out.append(Missing("medclass", medclass_requirement, "pip",
                           "the shared classification core: models, preprocessing, Grad-CAM "
                           "(pulls MONAI, pydicom 3, SimpleITK, scikit-image, scikit-learn)"))
    return out


def install_plan(missing: list[Missing]) -> str:
    """The text the user confirms before anything is installed."""
    if not missing:
        return "All Python packages SlicerMedClass needs are installed."
    lines = ["SlicerMedClass needs these Python packages, which are not installed in Slicer yet:", ""]
    for m in missing:
        lines.append(f"  - {m.requirement}, through {m.how}: {m.why}")
    lines += ["", "Installation downloads several hundred MB (more for a CUDA build of torch) and may take "
              "minutes; Slicer may need a restart afterwards. A MONAI Label server can be used without them.",
              "", "Install now?"]
    return "\n".join(lines)


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or ``None``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
