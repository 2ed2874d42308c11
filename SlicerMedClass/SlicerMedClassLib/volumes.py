"""Volume nodes to and from the arrays medclass works on.

Slicer holds every image, 2D or 3D, as a volume node: a voxel array in KJI order
(``slicer.util.arrayFromVolume``) plus an IJK-to-RAS matrix. A 2D picture is a
volume with one slice (K = 1); an RGB picture is a vector volume with three
components. medclass's :class:`~medclass.io.ImageData` is channel-first,
``(C, H, W)`` for 2D and ``(C, D, H, W)`` for volumes. The mapping is::

    scalar volume (K, J, I)        -> (1, J, I)   if K == 1 else (1, K, J, I)
    vector volume (K, J, I, C)     -> (C, J, I)   if K == 1 else (C, K, J, I)

so the model's rows are Slicer's J axis and its columns the I axis, and a heat map
computed on the image maps back onto the same voxels without resampling in
physical space.

DICOM intensities: Slicer's DICOM reader (ITK/GDCM) keeps *modality* values
(rescale slope and intercept applied, e.g. Hounsfield units) and no VOI. medclass
reads DICOM with the header's VOI LUT or window applied unless the model has a
window of its own. When the volume's DICOM header can be found (the file the
volume was read from, or the DICOM database through the ``DICOM.instanceUIDs``
attribute Slicer's DICOM module sets), the same VOI is applied here, with the same
pydicom functions, so that Slicer and ``medclass predict`` agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import vtk

log = logging.getLogger(__name__)

#: Components a vector volume may have: grey, RGB, RGBA (alpha is dropped by medclass).
SUPPORTED_COMPONENTS = (1, 3, 4)


def require_volume(volume_node) -> None:
    """Raise ``ValueError`` unless ``volume_node`` is a scalar or vector volume with voxels."""
    if volume_node is None:
        raise ValueError("no volume selected; load an image (DICOM or any file Slicer reads) and select it")
    if not hasattr(volume_node, "IsA") or not volume_node.IsA("vtkMRMLVolumeNode"):
        kind = volume_node.GetClassName() if hasattr(volume_node, "GetClassName") else type(volume_node).__name__
        raise ValueError(f"{kind} is not a volume; select an image volume")
    name = volume_node.GetName()
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"volume {name!r} is a label map (a segmentation), not an image; select the image itself")
    if not (volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLVectorVolumeNode")):
        raise ValueError(f"volume {name!r} is a {volume_node.GetClassName()}; only scalar (grey) and vector "
                         "(colour) volumes can be classified")
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume {name!r} has no voxels (it was created but nothing was loaded into it); "
                         "load an image into it or select another volume")
    dims = image.GetDimensions()
    if min(dims) < 1 or int(np.prod(dims)) == 0 or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume {name!r} is empty (dimensions {tuple(dims)}); load an image or select another volume")


def voxel_array(volume_node) -> np.ndarray:
    """A copy of the voxels in KJI order: ``(K, J, I)`` for one component, else ``(K, J, I, C)``.

    The same layout as ``slicer.util.arrayFromVolume``, read from the image data
    directly so that a scalar volume node holding several components (which
    ``arrayFromVolume`` cannot reshape) is handled too.
    """
    from vtk.util.numpy_support import vtk_to_numpy

    require_volume(volume_node)
    image = volume_node.GetImageData()
    components = image.GetNumberOfScalarComponents()
    shape = tuple(reversed(image.GetDimensions()))
    arr = vtk_to_numpy(image.GetPointData().GetScalars())
    arr = arr.reshape(shape + ((components,) if components > 1 else ()))
    return np.array(arr, copy=True)


def channels_first(arr: np.ndarray, name: str = "volume") -> np.ndarray:
    """KJI voxels to medclass's channel-first layout (see the module docstring)."""
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 4:
        c = arr.shape[-1]
        if c not in SUPPORTED_COMPONENTS:
            raise ValueError(f"volume {name!r} has {c} components per voxel; only grey (1), RGB (3) and RGBA (4) "
                             "images can be classified (a vector field, DWI or multi-echo volume cannot)")
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise ValueError(f"volume {name!r} has voxel array shape {arr.shape}; expected (K, J, I) or (K, J, I, C)")
    if arr.shape[1] == 1:  # one slice: a 2D image
        arr = arr[:, 0]
    return np.ascontiguousarray(arr, dtype=np.float32)


def spacing_in_array_order(volume_node, two_d: bool) -> tuple[float, ...]:
    sx, sy, sz = volume_node.GetSpacing()
    return (float(sy), float(sx)) if two_d else (float(sz), float(sy), float(sx))


# --------------------------------------------------------------------------- DICOM header


def dicom_source_files(volume_node, file_for_instance: Callable[[str], str] | None = None) -> list[Path]:
    """The DICOM files a volume was read from, when they can be found.

    Parameters
    ----------
    volume_node : vtkMRMLVolumeNode
    file_for_instance : callable, optional
        SOP Instance UID to file path (in Slicer: ``slicer.dicomDatabase.fileForInstance``),
        used for volumes loaded through the DICOM module, which records the
        instance UIDs in the ``DICOM.instanceUIDs`` attribute.
    """
    from medclass.io import is_dicom_file  # the reader's own rule: extension or DICM preamble

    out: list[Path] = []
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if uids and file_for_instance is not None:
        for uid in uids[:1]:  # the first instance's header stands for the series
            try:
                path = file_for_instance(uid)
            except Exception as e:  # a database lookup must not stop classification
                log.warning("DICOM database lookup of %s failed: %s", uid, e)
                path = None
            if path:
                out.append(Path(path))
    storage = volume_node.GetStorageNode()
    if not out and storage is not None:
        name = storage.GetFileName()
        if name and Path(name).is_file() and is_dicom_file(name):
            out.append(Path(name))
    return [p for p in out if p.is_file()]


def read_dicom_header(volume_node, file_for_instance: Callable[[str], str] | None = None):
    """The DICOM header (no pixels) of the volume's first source file, or ``None``."""
    files = dicom_source_files(volume_node, file_for_instance)
    if not files:
        return None
    import pydicom

    try:
        return pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception as e:  # an unreadable header means: classify the voxels as they are
        log.warning("cannot read the DICOM header of %s: %s", files[0], e)
        return None


def apply_dicom_voi(arr: np.ndarray, ds) -> tuple[np.ndarray, str | None]:
    """Apply the header's VOI to modality values with :func:`medclass.io.apply_voi`.

    The same rule as every other front door: a VOI LUT the header fully
    describes, else the first valid window, else the pixel range (a window
    width of 0, a missing or broken window or LUT never fails).

    Only for MONOCHROME2: Slicer's reader has already inverted MONOCHROME1
    images, whose header window no longer applies to the inverted values; they
    are classified as Slicer shows them. Colour images have no VOI.

    Returns
    -------
    (numpy.ndarray, str or None)
        The values and ``"lut"``, ``"window"`` or ``None`` (nothing applied).
    """
    from medclass.io import apply_voi

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric != "MONOCHROME2":
        return arr, None
    out, how = apply_voi(arr, ds)
    return (np.asarray(out, dtype=np.float32), how) if how else (arr, None)


def dicom_meta(ds, frames: int) -> dict[str, Any]:
    """medclass's metadata (modality, age, sex, view, laterality, UIDs) from a header."""
    from medclass.io import dicom_meta as header_meta  # the same fields the CLI and the DICOM node use

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    return header_meta(ds, photometric, frames)


# --------------------------------------------------------------------------- back to MRML


def copy_geometry(source_node, target_node) -> None:
    """Give ``target_node`` the IJK-to-RAS matrix and parent transform of ``source_node``."""
    m = vtk.vtkMatrix4x4()
    source_node.GetIJKToRASMatrix(m)
    target_node.SetIJKToRASMatrix(m)
    target_node.SetAndObserveTransformNodeID(source_node.GetTransformNodeID())


def slice_center_ras(volume_node, k: int) -> tuple[float, float, float]:
    """RAS coordinates of the centre of slice ``k`` (the K index) of a volume."""
    dims = volume_node.GetImageData().GetDimensions()
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk = [(dims[0] - 1) / 2.0, (dims[1] - 1) / 2.0, float(k), 1.0]
    ras = m.MultiplyPoint(ijk)
    return float(ras[0]), float(ras[1]), float(ras[2])
