"""Reading images of every kind into channel-first float32 arrays.

:func:`read_image` is the one entry point: DICOM (every transfer syntax pydicom's
plugins decode, with the Modality LUT, the VOI LUT or window, MONOCHROME1
inversion and colour conversion applied), PNG/JPEG/BMP/TIFF through Pillow, and
NIfTI/NRRD/MetaImage through SimpleITK. Whatever the source, the result is an
:class:`ImageData` whose array is ``(C, H, W)`` for a 2D image and ``(C, D, H, W)``
for a volume or a multi-frame image, with ``C`` 1 (grey) or 3 (RGB).

A file that cannot be read raises :class:`~medclass.errors.MedClassError` naming
the file and what to do; exceptions of the back-ends never escape for bad input.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_windowing
from pydicom.pixels import apply_voi as _apply_voi_lut  # pydicom's VOI LUT Sequence step; ours is apply_voi

from medclass.errors import MedClassError

log = logging.getLogger(__name__)

DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")  # .ima: Siemens exports
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ITK_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Extensions :func:`read_image` understands. DICOM files may also have no
#: extension at all (or a UID-like name such as ``1.2.840.5``).
SUPPORTED_EXTENSIONS = DICOM_EXTENSIONS + PIL_EXTENSIONS + ITK_EXTENSIONS

_ITK_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
                ".mha": "metaimage", ".mhd": "metaimage"}

#: The header fields the cross-modal models take besides the image (medclass.multimodal encodes them),
#: and the manifest columns that carry them.
TABULAR_FIELDS = ("age", "sex", "laterality", "view")

META_KEYS = ("modality", "photometric", "patient_id", "study_uid", "series_uid", "sop_uid",
             "sop_class_uid", "body_part", "series_description", "age", "sex", "laterality",
             "view", "spacing", "format", "path")

# What decodes each compressed transfer syntax, for the error message of a file
# that cannot be decoded: the user needs a package name, not a plugin traceback.
_JPEG = "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm)"
_J2K = "pylibjpeg + pylibjpeg-openjpeg (or python-gdcm)"
_DECODER_PACKAGES = {
    dcm_uid.JPEGBaseline8Bit: _JPEG,
    dcm_uid.JPEGExtended12Bit: _JPEG,
    dcm_uid.JPEGLossless: _JPEG,
    dcm_uid.JPEGLosslessSV1: _JPEG,
    dcm_uid.JPEGLSLossless: "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm, pyjpegls)",
    dcm_uid.JPEGLSNearLossless: "pylibjpeg + pylibjpeg-libjpeg (or python-gdcm, pyjpegls)",
    dcm_uid.JPEG2000Lossless: _J2K,
    dcm_uid.JPEG2000: _J2K,
    dcm_uid.HTJ2KLossless: "pylibjpeg + pylibjpeg-openjpeg >= 2.0",
    dcm_uid.HTJ2KLosslessRPCL: "pylibjpeg + pylibjpeg-openjpeg >= 2.0",
    dcm_uid.HTJ2K: "pylibjpeg + pylibjpeg-openjpeg >= 2.0",
    dcm_uid.RLELossless: "pydicom alone (pylibjpeg-rle is faster)",
}

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class ImageData:
    """An image as a channel-first float32 array plus what is known about it.

    Attributes
    ----------
    array : numpy.ndarray
        float32, ``(C, H, W)`` for 2D images, ``(C, D, H, W)`` for volumes and
        multi-frame images (frames along ``D``).
    meta : dict
        The keys of :data:`META_KEYS` (``None`` where unknown), plus
        ``voi_applied`` (``"lut"``, ``"window"`` or ``None``) for DICOM.
    """

    array: np.ndarray
    meta: dict = field(default_factory=dict)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an image :func:`read_image` can read.

    Judged by the extension, except for files without a known extension, which
    count when they carry the DICOM preamble (128 bytes, then ``DICM``): PACS
    exports are often named by UID or not named at all.

    Parameters
    ----------
    path : str or os.PathLike
        A file.

    Returns
    -------
    bool
    """
    p = Path(path)
    if _extension(p) in SUPPORTED_EXTENSIONS:
        return True
    return _has_dicom_preamble(p)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a DICOM extension, or the preamble (128 bytes, then ``DICM``).

    Parameters
    ----------
    path : str or os.PathLike
        A file.

    Returns
    -------
    bool
    """
    p = Path(path)
    return _extension(p) in DICOM_EXTENSIONS or _has_dicom_preamble(p)


def read_image(path: str | os.PathLike, *, apply_voi: bool = True) -> ImageData:
    """Read any supported image file into an :class:`ImageData`.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM, PNG, JPEG, BMP, TIFF, NIfTI, NRRD or MetaImage file.
    apply_voi : bool, default True
        DICOM only: apply the header's VOI LUT or window. Pass ``False`` when a
        window of your own will be applied to the modality values (e.g. HU).

    Returns
    -------
    ImageData

    Raises
    ------
    MedClassError
        The file is missing, empty, of an unsupported kind, corrupt, or holds
        no pixels.
    """
    p = Path(path)
    if not p.exists():
        raise MedClassError(f"no such file: {p}", "check the path")
    if p.is_dir():
        return read_series(p, apply_voi=apply_voi)
    if p.stat().st_size == 0:
        raise MedClassError(f"{p} is empty (0 bytes)", "copy or export the file again")
    ext = _extension(p)
    if ext in DICOM_EXTENSIONS or ext == "" or _has_dicom_preamble(p):
        return read_dicom_dataset(_dcmread(p), apply_voi=apply_voi, name=str(p))
    if ext in PIL_EXTENSIONS:
        return _read_pil(p)
    if ext in ITK_EXTENSIONS:
        return _read_itk(p, ext)
    raise MedClassError(f"{p}: unsupported file type {ext!r}",
                        f"use one of {', '.join(SUPPORTED_EXTENSIONS)} (DICOM may have no extension)")


def read_dicom_dataset(ds: pydicom.Dataset, *, apply_voi: bool = True, name: str | None = None) -> ImageData:
    """Decode the pixels of a DICOM dataset already in memory.

    Applies the Modality LUT (rescale slope/intercept), then, with
    ``apply_voi``, the VOI LUT or the first window of the header; inverts
    MONOCHROME1 so that high values are bright; turns palette colour and YBR
    into RGB. Frames of a multi-frame image become the ``D`` axis.

    Parameters
    ----------
    ds : pydicom.Dataset
        A dataset with Pixel Data (e.g. received by C-STORE).
    apply_voi : bool, default True
        Apply the header's VOI LUT or window.
    name : str, optional
        How to name the image in errors; defaults to the dataset's file name,
        else its SOP Instance UID.

    Returns
    -------
    ImageData

    Raises
    ------
    MedClassError
        No pixel data, or pixel data that cannot be decoded.
    """
    name = name or getattr(ds, "filename", None) or f"SOP instance {ds.get('SOPInstanceUID', '?')}"
    name = str(name)
    if not any(t in ds for t in _PIXEL_TAGS):
        sop = ds.get("SOPClassUID")
        sop_name = str(getattr(sop, "name", None) or sop or "")
        if sop is None or "Rows" in ds or "Image Storage" in sop_name:
            # pydicom drops an element cut off by the end of the file, so a
            # truncated image looks like an image without pixels.
            if sop is None:
                raise MedClassError(f"{name} has neither Pixel Data nor a SOP Class UID: it is truncated, damaged "
                                    "or not an image", "export or send it again")
            raise MedClassError(f"{name} has no (complete) Pixel Data although it is a {sop_name}: the file is "
                                "truncated or damaged", "export or send it again")
        raise MedClassError(f"{name} has no Pixel Data (SOP class {sop_name}); only images can be classified",
                            "select image instances (CT, MR, CR, DX, MG, US, ...), not SR, RT or other objects")
    ts = _transfer_syntax(ds)
    header_pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        decoder = pydicom.pixels.get_decoder(ts)
        arr, info = decoder.as_array(ds, as_rgb=True)
    except Exception as e:  # every decoder plugin raises its own kinds
        raise _decode_error(name, ts, e) from e
    photometric = str(info.get("photometric_interpretation", header_pi)).upper()
    frames = int(info.get("number_of_frames", 1) or 1)

    voi = None
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif arr.ndim == (3 if frames > 1 else 2):  # one sample per pixel
        try:
            arr = apply_modality_lut(arr, ds)
            lo, hi = _value_range(ds)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise MedClassError(f"{name}: invalid Modality LUT or rescale in the header ({e})",
                                "fix the header (Modality LUT Sequence, Rescale Slope/Intercept)") from e
        if apply_voi:
            arr, voi, out_range = _apply_voi(arr, ds, name)
            lo, hi = out_range or (lo, hi)
        if photometric == "MONOCHROME1":
            # Reflect within the value range the header defines (not the image's
            # own min/max), so that equal stored values stay equal across images.
            arr = (lo + hi) - arr.astype(np.float64)
    elif photometric.startswith("YBR"):
        arr = pydicom.pixels.convert_color_space(arr, photometric, "RGB")

    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == (4 if frames > 1 else 3):  # colour: samples last
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    arr = np.ascontiguousarray(arr)
    meta = dicom_meta(ds, header_pi, frames)
    meta.update(format="dicom", path=getattr(ds, "filename", None) or name, voi_applied=voi)
    return ImageData(arr, meta)


#: VOI LUT Function values (PS3.3 C.11.2.1.3); any other is read as LINEAR, as viewers do.
VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def apply_voi(arr: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, str | None]:
    """Apply the header's VOI to modality values, falling back as viewers do.

    The order is: the first VOI LUT Sequence item the header fully describes
    (LUT Descriptor of three values, 8 or 10-16 bits per entry, LUT Data with
    as many entries as the descriptor says), else the first window whose centre
    and width are numbers and whose width the VOI LUT Function allows (>= 1 for
    LINEAR, > 0 for LINEAR_EXACT and SIGMOID), else nothing: the pixel range,
    which the intensity normalisation maps as a viewer's "full dynamic" window
    would. A window of ``0`` (often written for "no window"), a missing centre
    or width, centres and widths of different counts, an unknown VOI LUT
    Function (read as LINEAR) and a truncated VOI LUT therefore never make an
    image unreadable.

    Parameters
    ----------
    arr : numpy.ndarray
        Modality values (after :func:`pydicom.pixels.apply_modality_lut`) of a
        MONOCHROME image, any shape (one frame, frames, or a volume).
    ds : pydicom.Dataset
        The image's header; it is not changed.

    Returns
    -------
    (numpy.ndarray, str or None)
        The values and how: ``"lut"``, ``"window"``, or ``None`` (no usable
        VOI: the values unchanged, i.e. the pixel range).
    """
    out, how, _ = _apply_voi(arr, ds, None)
    return out, how


def _apply_voi(arr: np.ndarray, ds: pydicom.Dataset,
               name: str | None) -> tuple[np.ndarray, str | None, tuple[float, float] | None]:
    """:func:`apply_voi`, plus the output range (for MONOCHROME1 inversion)."""
    name = name or f"SOP instance {ds.get('SOPInstanceUID', '?')}"
    problems = []
    for index, item in _voi_lut_items(ds, problems):
        lut = pydicom.Dataset()  # only what pydicom's apply_voi reads, so ds stays untouched
        lut.VOILUTSequence = [item]
        if getattr(ds, "file_meta", None) is not None:
            lut.file_meta = ds.file_meta  # OW LUT Data is read in the file's byte order
        implicit, little = getattr(ds, "original_encoding", (None, None))
        lut.set_original_encoding(implicit, True if little is None else little)
        values = arr
        if not np.issubdtype(np.asarray(arr).dtype, np.integer):
            values = np.rint(arr).astype(np.int64)  # a LUT is indexed by integers
        try:
            out = _apply_voi_lut(values, lut)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, struct.error) as e:
            problems.append(f"VOI LUT item {index + 1}: {e}")
            continue
        return out, "lut", (0.0, float(2 ** int(item.LUTDescriptor[2]) - 1))
    for index, (center, width) in enumerate(_windows(ds, problems)):
        win = _window_dataset(ds, center, width)
        try:
            out = apply_windowing(arr, win)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            problems.append(f"window {index + 1} (centre {center:g}, width {width:g}): {e}")
            continue
        return out, "window", None
    if problems:
        # debug, not warning: a series repeats its header on every slice, and
        # "no window" is a normal thing for a header to say.
        log.debug("%s: no usable VOI LUT or window (%s); using the pixel range", name, "; ".join(problems))
    return arr, None, None


def _voi_lut_items(ds: pydicom.Dataset, problems: list[str]):
    """(index, item) of the VOI LUT Sequence items the header fully describes."""
    try:
        items = list(ds.get("VOILUTSequence") or [])
    except Exception as e:  # a damaged sequence is one more thing to fall back from
        problems.append(f"VOI LUT Sequence: {e}")
        return
    for index, item in enumerate(items):
        try:
            desc = [int(v) for v in item.LUTDescriptor]
            data = item.get("LUTData")
            if len(desc) != 3 or data is None:
                raise ValueError("LUT Descriptor or LUT Data missing")
            entries = desc[0] or 2**16
            if not (desc[2] == 8 or 10 <= desc[2] <= 16):
                raise ValueError(f"{desc[2]} bits per entry")
            n = len(data) // 2 if isinstance(data, bytes) else len(data) if hasattr(data, "__len__") else 1
            if n < entries:
                raise ValueError(f"{n} LUT Data entries, the descriptor says {entries}")
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            problems.append(f"VOI LUT item {index + 1}: {e}")
            continue
        yield index, item


def _windows(ds: pydicom.Dataset, problems: list[str]):
    """(centre, width) pairs of the header's windows, in order, numbers only."""

    def values(keyword: str) -> list[float]:
        try:
            v = ds.get(keyword)
        except Exception as e:  # an unparsable DS value
            problems.append(f"{keyword}: {e}")
            return []
        if v is None or v == "":
            return []
        out = []
        for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]):
            try:
                out.append(float(x))
            except (TypeError, ValueError):
                out.append(float("nan"))
        return out

    centers, widths = values("WindowCenter"), values("WindowWidth")
    if not centers or not widths:
        if centers or widths:
            problems.append("Window Center without Window Width, or the reverse")
        return
    if len(centers) != len(widths) and 1 not in (len(centers), len(widths)):
        problems.append(f"{len(centers)} window centres but {len(widths)} widths; pairing them in order")
    n = max(len(centers), len(widths)) if 1 in (len(centers), len(widths)) else min(len(centers), len(widths))
    for i in range(n):
        c, w = centers[min(i, len(centers) - 1)], widths[min(i, len(widths) - 1)]
        if np.isfinite(c) and np.isfinite(w):
            yield c, w
        else:
            problems.append(f"window {i + 1} is not a number")


def _window_dataset(ds: pydicom.Dataset, center: float, width: float) -> pydicom.Dataset:
    """A dataset holding one window and what pydicom's apply_windowing reads, so ds stays untouched."""
    win = pydicom.Dataset()
    for keyword in ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
                    "RescaleIntercept", "ModalityLUTSequence"):
        if keyword in ds:
            win[keyword] = ds[keyword]
    if "BitsStored" not in win:
        win.BitsStored = int(ds.get("BitsAllocated", 16))
    win.PixelRepresentation = int(ds.get("PixelRepresentation", 0))
    if str(win.get("PhotometricInterpretation", "")).strip().upper() not in ("MONOCHROME1", "MONOCHROME2"):
        win.PhotometricInterpretation = "MONOCHROME2"
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    win.VOILUTFunction = function if function in VOI_LUT_FUNCTIONS else "LINEAR"  # as viewers read it
    # FD, not DS: a computed float need not fit DS's 16 characters
    win.add_new("WindowCenter", "FD", center)
    win.add_new("WindowWidth", "FD", width)
    return win


def read_series(folder: str | os.PathLike, *, apply_voi: bool = True) -> ImageData:
    """Read a folder holding one DICOM series (e.g. a series fetched from a PACS).

    One instance gives that image (2D, or a multi-frame volume); several
    single-frame slices are sorted along the slice normal (Image Position
    Patient), else by Instance Number, and stacked into a volume ``(C, D, H, W)``.

    Raises
    ------
    MedClassError
        The folder has no DICOM files, holds more than one series, or slices of
        different sizes.
    """
    root = Path(folder)
    files = sorted(f for f in root.rglob("*")
                   if f.is_file() and (_extension(f) in DICOM_EXTENSIONS or _has_dicom_preamble(f)))
    if not files:
        raise MedClassError(f"{root} is a folder without DICOM files",
                            "pass one image file, or a folder holding one DICOM series")
    if len(files) == 1:
        return read_dicom_dataset(_dcmread(files[0]), apply_voi=apply_voi, name=str(files[0]))
    dsets = [_dcmread(f) for f in files]
    series = {str(d.get("SeriesInstanceUID", "")) for d in dsets}
    if len(series) > 1:
        raise MedClassError(f"{root} holds {len(series)} series", "put one series per folder")

    def position(d: pydicom.Dataset) -> float:
        try:
            o = np.asarray(d.ImageOrientationPatient, dtype=float)
            return float(np.dot(np.cross(o[:3], o[3:]), np.asarray(d.ImagePositionPatient, dtype=float)))
        except (AttributeError, ValueError, TypeError):
            return float(d.get("InstanceNumber", 0) or 0)

    dsets.sort(key=position)
    images = [read_dicom_dataset(d, apply_voi=apply_voi, name=str(d.filename)) for d in dsets]
    shapes = {im.array.shape for im in images}
    if len(shapes) > 1 or images[0].array.ndim != 3:
        raise MedClassError(f"{root}: the instances are not slices of one volume (shapes {sorted(shapes)})",
                            "pass the instances one by one, or one series of equal-sized slices")
    volume = np.stack([im.array for im in images], axis=1)  # (C, D, H, W)
    meta = dict(images[0].meta)
    meta.update(path=str(root), frames=len(images))
    if meta.get("spacing") and len(dsets) > 1:
        gap = abs(position(dsets[1]) - position(dsets[0])) or None
        meta["spacing"] = (gap, *meta["spacing"][-2:])
    return ImageData(np.ascontiguousarray(volume), meta)


# --------------------------------------------------------------------------- DICOM


def _dcmread(p: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(p)
    except InvalidDicomError:
        pass
    except Exception as e:
        raise MedClassError(f"cannot read {p}: the DICOM header is corrupt or truncated ({type(e).__name__}: {e})",
                            "export or send the file again") from e
    # No preamble: old ACR-NEMA style files still parse when forced; accept the
    # result only if it holds the elements of an image, since random bytes
    # "parse" too when forced.
    try:
        ds = pydicom.dcmread(p, force=True)
        ok = any(t in ds for t in _PIXEL_TAGS + ("SOPClassUID", "Rows"))
    except Exception:
        ok = False
    if not ok:
        raise MedClassError(f"{p} is not a DICOM file (no 'DICM' marker, no readable DICOM elements)",
                            "check the file; if it is another format, give it that format's extension")
    return ds


def _transfer_syntax(ds: pydicom.Dataset) -> dcm_uid.UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return dcm_uid.UID(ts)
    # Files without file meta (read with force) or built in memory: the encoding
    # they were read with is the transfer syntax of their pixel data.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = True, True
    ts = (dcm_uid.ImplicitVRLittleEndian if implicit
          else dcm_uid.ExplicitVRLittleEndian if little else dcm_uid.ExplicitVRBigEndian)
    ds.file_meta = meta if meta is not None else pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ts


#: Who may decode compressed pixel data (:func:`use_dicom_decoder`).
DICOM_DECODERS = ("pydicom", "nvimgcodec", "auto")


def nvimgcodec_unavailable() -> str | None:
    """Why nvImageCodec cannot decode DICOM pixel data in this process, or ``None`` when it can."""
    from monai.data import nvimgcodec_pydicom_plugin as nv

    if not nv.has_pydicom_plugin or getattr(nv.pydicom_plugin, "nvimgcodec", None) is None:
        return "the nvidia-nvimgcodec-cu12 package is not installed"
    if not nv.has_cp:
        return "CuPy (cupy-cuda12x) is not installed"
    return None if nv.is_nvimgcodec_available() else "no CUDA device is visible to this process"


def use_dicom_decoder(name: str = "pydicom") -> str:
    """Choose who decodes compressed DICOM pixel data in this process; returns the one in use.

    Parameters
    ----------
    name : {"pydicom", "nvimgcodec", "auto"}
        ``pydicom``: pydicom's own plugins (pylibjpeg, GDCM), the default. ``nvimgcodec``: NVIDIA
        nvImageCodec on the GPU (JPEG 2000, HTJ2K, JPEG), registered as a pydicom decoder plugin
        with MONAI's helper for nvImageCodec's own plugin, so every reader here (:func:`read_image`,
        the node, the app) uses it without another code path; pydicom still decodes what it does
        not take. ``auto``: nvImageCodec where it can run, else pydicom.

    Raises
    ------
    MedClassError
        An unknown name, or ``nvimgcodec`` asked for where it cannot run (with the reason).
    """
    import sys

    if name not in DICOM_DECODERS:
        raise MedClassError(f"unknown DICOM decoder {name!r}", f"use one of {', '.join(DICOM_DECODERS)}")
    if name == "pydicom":
        # Only a process that registered the plugin has MONAI's helper loaded: the default costs no import.
        loaded = sys.modules.get("monai.data.nvimgcodec_pydicom_plugin")
        if loaded is not None:
            loaded.unregister_as_decoder_plugin()
        return "pydicom"
    from monai.data import nvimgcodec_pydicom_plugin as nv

    why = nvimgcodec_unavailable()
    if why is None and nv.register_as_decoder_plugin():
        log.info("DICOM pixel data: nvImageCodec on the GPU first, then pydicom's plugins")
        return "nvimgcodec"
    if name == "nvimgcodec":
        raise MedClassError(f"the nvImageCodec DICOM decoder cannot run here: {why or 'its plugin did not register'}",
                            "on a machine with an NVIDIA GPU run pip install -e '.[gpu-decode]', or use the "
                            "default decoder (pydicom)")
    log.info("DICOM pixel data: pydicom's plugins (nvImageCodec unavailable: %s)", why)
    return "pydicom"


def _decode_error(name: str, ts: dcm_uid.UID, e: Exception) -> MedClassError:
    # Plugin errors span lines (one per plugin tried); the message must be one line.
    e = " ".join(str(e).split())[:400]
    syntax = f"transfer syntax {ts.name} ({ts})"
    if not ts.is_compressed:
        return MedClassError(f"cannot decode the pixel data of {name} ({syntax}): {e}",
                             "the file is truncated or corrupt; export or send it again")
    packages = _DECODER_PACKAGES.get(ts)
    if packages is None:
        return MedClassError(f"cannot decode the pixel data of {name}: {syntax} is not supported",
                             "convert it to an uncompressed or JPEG/JPEG 2000 syntax (e.g. dcmtk dcmdjpeg, gdcmconv)")
    return MedClassError(f"cannot decode the pixel data of {name} ({syntax}): {e}",
                         f"decoding it needs {packages}; if they are installed, the file is truncated or corrupt")


def _value_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range of values after the Modality LUT, as the header defines it."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def parse_age(value: str | None) -> float | None:
    """Years from a DICOM Age String (``'045Y'``, ``'006M'``, ``'003W'``, ``'010D'``).

    Parameters
    ----------
    value : str or None
        The PatientAge value.

    Returns
    -------
    float or None
        The age in years, or ``None`` when absent or malformed.
    """
    if not value:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([DWMY]?)\s*", str(value).upper())
    if not m:
        return None
    per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0, "": 1.0}[m.group(2)]
    return float(m.group(1)) / per_year


def dicom_meta(ds: pydicom.Dataset, photometric: str | None = None, frames: int = 1) -> dict[str, Any]:
    """The :data:`META_KEYS` a DICOM header gives (modality, UIDs, age, sex, view, laterality, spacing).

    For front doors that hold the pixels themselves: the Slicer module reads the
    voxels from MRML and only the header from the file.
    """
    photometric = photometric or str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    sex = (_text(ds, "PatientSex") or "").upper()
    spacing = None
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps is None:
        try:  # enhanced multi-frame objects keep it in the functional groups
            ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError, KeyError):
            ps = None
    if ps is not None and len(ps) >= 2 and float(ps[0]) > 0 and float(ps[1]) > 0:  # some CRs write 0\\0
        spacing = (float(ps[0]), float(ps[1]))
        if frames > 1:
            between = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
            spacing = (float(between) if between else None, *spacing)
    return {
        "modality": _text(ds, "Modality"),
        "photometric": photometric,
        "patient_id": _text(ds, "PatientID"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "sop_uid": _text(ds, "SOPInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "body_part": _text(ds, "BodyPartExamined"),
        "series_description": _text(ds, "SeriesDescription"),
        "age": parse_age(_text(ds, "PatientAge")),
        "sex": sex if sex in ("M", "F") else None,
        "laterality": _text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        "view": _text(ds, "ViewPosition"),
        "spacing": spacing,
    }


# --------------------------------------------------------------------------- other formats


def _empty_meta() -> dict[str, Any]:
    return dict.fromkeys(META_KEYS)


def _read_pil(p: Path) -> ImageData:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            fmt = (img.format or p.suffix.lstrip(".")).lower()
            n_frames = getattr(img, "n_frames", 1)
            # Phone and camera JPEGs may be stored rotated, with an EXIF tag to undo it.
            ImageOps.exif_transpose(img, in_place=True)
            planes = []
            for i in range(n_frames):
                img.seek(i)
                planes.append(_pil_to_array(img))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MedClassError(f"cannot read {p} as an image ({type(e).__name__}: {e})",
                            "the file is corrupt or not what its extension says; export it again") from e
    # A multi-page TIFF is a stack of frames (D), as a multi-frame DICOM is.
    if len(planes) > 1 and len({a.shape for a in planes}) == 1:
        arr = np.stack(planes, axis=1)
    else:
        arr = planes[0]
    meta = _empty_meta()
    meta.update(format=fmt, path=str(p), photometric="RGB" if arr.shape[0] == 3 else "MONOCHROME2")
    return ImageData(arr, meta)


def _pil_to_array(img) -> np.ndarray:
    mode = img.mode
    if mode in ("1", "L", "LA", "F") or mode.startswith("I"):
        if mode in ("1", "LA"):
            img = img.convert("L")  # alpha dropped; a bilevel image becomes 0/255
        a = np.asarray(img)
        return np.ascontiguousarray(a[None], dtype=np.float32)
    if mode != "RGB":
        img = img.convert("RGB")  # RGBA (alpha dropped), P, CMYK, YCbCr
    a = np.asarray(img)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


def _read_itk(p: Path, ext: str) -> ImageData:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(p))
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise MedClassError(f"cannot read {p} with SimpleITK ({first})",
                            "the file or its data file is missing, truncated or corrupt") from e
    spacing = tuple(float(s) for s in reversed(img.GetSpacing()))  # array axis order
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)  # vector pixels are channels
    elif arr.ndim == 4:
        pass  # (T, D, H, W): a 4D series; its time points are the channels
    else:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[1] == 1:
        # A single-slice "volume" is a 2D image stored in a 3D format.
        arr, spacing = arr[:, 0], spacing[1:]
    meta = _empty_meta()
    meta.update(format=_ITK_FORMATS[ext], path=str(p), spacing=spacing,
                photometric="RGB" if arr.shape[0] == 3 else "MONOCHROME2")
    return ImageData(np.ascontiguousarray(arr, dtype=np.float32), meta)


# --------------------------------------------------------------------------- helpers


def _extension(p: Path) -> str:
    name = p.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = p.suffix.lower()
    # PACS exports are often named by UID ("1.2.840.113619.2.55.3"): not an extension.
    return "" if suffix[1:].isdigit() else suffix


def _has_dicom_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"
