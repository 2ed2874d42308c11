"""Volume nodes made from real files the way Slicer makes them, and model checkpoints for tests.

DICOM goes through Slicer's own archetype reader (ITK/GDCM, the reader behind
"Add data" and the DICOM module). Pictures (slicer-core's ITK has no JPEG reader)
become a one-slice volume with the geometry Slicer's reader gives them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk


def load_with_slicer_reader(scene, path, class_name: str = "vtkMRMLScalarVolumeNode", name: str | None = None):
    """Read a file into a new volume node with Slicer's archetype storage node (ITK/GDCM)."""
    node = scene.AddNewNodeByClass(class_name, name or Path(path).stem)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer's reader could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def volume_from_picture(scene, path, scalar: bool = True, name: str | None = None):
    """A PNG/JPEG as Slicer holds it: one slice, rows along J, spacing 1, LPS identity (RAS diag(-1,-1,1)).

    ``scalar=True`` gives the grey scalar volume (luminance, as a greyscale
    reader would), ``False`` the RGB vector volume Slicer makes of a colour picture.
    """
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L") if scalar else im.convert("RGB"))
    cls = "vtkMRMLScalarVolumeNode" if scalar else "vtkMRMLVectorVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or Path(path).stem)
    slicer.util.updateVolumeFromArray(node, arr[None])
    node.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    node.SetSpacing(1.0, 1.0, 1.0)
    node.SetOrigin(0.0, 0.0, 0.0)
    return node


def ijk_to_ras(node) -> np.ndarray:

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def make_checkpoint(path: Path, *, model: str = "resnet18", task: str = "binary", classes=("normal", "abnormal"),
                    spatial_dims: int = 2, image_size: int = 32, depth: int = 8, channels: int = 1, seed: int = 0,
                    **spec) -> Path:
    """An untrained medclass checkpoint, for tests where the behaviour, not accuracy, is under test."""
    import torch

    from medclass.checkpoint import make_card, save_checkpoint
    from medclass.models import create_model
    from medclass.tasks import Task

    torch.manual_seed(seed)
    t = Task(task, list(classes))
    args = {"spatial_dims": spatial_dims, "in_channels": channels, "num_outputs": t.num_outputs,
            "image_size": image_size}
    preprocess = {"spatial_dims": spatial_dims, "image_size": image_size, "depth": depth, "channels": channels, **spec}
    card = make_card(model, args, t, preprocess)
    return save_checkpoint(path, create_model(model, **args), card)
