"""Preprocessing (read, denoise, enhance, resize, normalise) as MONAI transforms, each with a dictionary twin.

Array transforms take channel-first numpy arrays or torch tensors, ``(C, H, W)``
or ``(C, D, H, W)``, and return the same kind; each ``...d`` twin only iterates
its keys and calls the array transform, the MONAI way.

:func:`build_preprocess` composes them from a *spec*, the small dict stored in
every checkpoint's model card, so that training, inference, the DICOM node and
Slicer preprocess identically. The order is fixed::

    select dims -> window -> ROI crop -> resize -> channels -> denoise -> enhance -> normalise

Channel conversion, denoising and enhancement run *after* resizing: their cost
then no longer depends on the source size (a mammogram has 13 Mpx, a Br35H JPEG
up to 1920 px), and a kernel means the same thing whatever the resolution the
image came in. Luminance is linear, so it commutes with resizing exactly.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForeground,
    EnsureType,
    EnsureTyped,
    HistogramNormalize,
    MapTransform,
    MedianSmooth,
    NormalizeIntensity,
    NormalizeIntensityd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Transform,
)
from monai.utils import convert_to_dst_type, convert_to_numpy

from medclass.errors import MedClassError
from medclass.io import ImageData

Array = np.ndarray | torch.Tensor

#: The preprocessing spec's keys and their defaults.
DEFAULT_SPEC: dict[str, Any] = {
    "spatial_dims": 2,
    "image_size": 64,
    "depth": 16,
    "channels": 1,
    "window": None,
    "denoise": None,
    "enhance": None,
    "crop_foreground": False,
    "normalize": "minmax",
}
_CHOICES = {
    "spatial_dims": (2, 3),
    "channels": (1, 3),
    "denoise": (None, "median", "gaussian"),
    "enhance": (None, "histeq", "clahe"),
    "normalize": ("minmax", "zscore"),
}
#: Robust intensity range: the 0.5th and 99.5th percentiles map to 0 and 1.
PERCENTILES = (0.5, 99.5)
_LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")


class SpecError(MedClassError, ValueError):
    """A preprocessing spec, or an image, that does not fit; a ``ValueError`` too."""


def _numpy(img: Array) -> np.ndarray:
    return convert_to_numpy(img, dtype=np.float32)


def _like(out: np.ndarray, img: Array) -> Array:
    return convert_to_dst_type(out, img, dtype=out.dtype)[0]


def _as_input(out: Array, img: Array) -> Array:
    """MONAI's result in the input's own type: numpy for numpy, a plain tensor for a tensor.

    MONAI's array transforms return a MetaTensor whatever they are given; the medclass
    pipeline keeps numpy in, numpy out (and plain tensors, which pickle and stack as such).
    """
    if isinstance(out, torch.Tensor):
        out = out.as_subclass(torch.Tensor) if not isinstance(img, np.ndarray) else out.detach().cpu().numpy()
    return convert_to_dst_type(out, img, dtype=out.dtype)[0]


def _constant(img: Array) -> bool:
    return not bool(img.max() > img.min())


def _scale01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


# --------------------------------------------------------------------------- array transforms


class SelectSpatialDims(Transform):
    """Make an image fit a 2D or a 3D model.

    A 2D model given a volume or a multi-frame image gets its middle slice or
    frame (``D // 2``): the one most likely to show the organ, and the one a
    viewer opens on. A 3D model given a 2D image is an error.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    """

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims

    def __call__(self, img: Array) -> Array:
        have = img.ndim - 1
        if have == self.spatial_dims:
            return img
        if have == 3 and self.spatial_dims == 2:
            return img[:, img.shape[1] // 2]
        raise SpecError(f"a {self.spatial_dims}D model cannot take a {have}D image of shape {tuple(img.shape)}",
                        "use a 2D model (spec spatial_dims=2) for single images, a 3D one for volumes")


class EnsureChannels(Transform):
    """Give an image ``n`` channels: 1 -> 3 repeats, 3 -> 1 by luminance, 4 -> 3 drops alpha.

    Parameters
    ----------
    n : int
        1 or 3.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, img: Array) -> Array:
        c = img.shape[0]
        if c == 4 and self.n in (1, 3):
            img, c = img[:3], 3
        if c == self.n:
            return img
        if c == 1 and self.n == 3:
            reps = (3,) + (1,) * (img.ndim - 1)
            return img.repeat(*reps) if isinstance(img, torch.Tensor) else np.tile(img, reps)
        if c == 3 and self.n == 1:
            grey = _LUMINANCE[0] * img[0] + _LUMINANCE[1] * img[1] + _LUMINANCE[2] * img[2]
            return grey[None]
        raise SpecError(f"cannot turn an image with {c} channels (shape {tuple(img.shape)}) into {self.n}",
                        "give grey (1), RGB (3) or RGBA (4) channel-first images")


class Window(Transform):
    """Clip to ``center +- width / 2`` and scale that range to [0, 1].

    Parameters
    ----------
    center, width : float
        In the image's units (e.g. HU for CT: a brain window is 40, 80).
    """

    def __init__(self, center: float, width: float) -> None:
        if not width > 0:
            raise SpecError(f"window width must be > 0, not {width}", "give [center, width] with width > 0")
        self.center, self.width = float(center), float(width)
        lo = self.center - self.width / 2
        self.scale = ScaleIntensityRange(a_min=lo, a_max=lo + self.width, b_min=0.0, b_max=1.0, clip=True)

    def __call__(self, img: Array) -> Array:
        return _as_input(self.scale(img), img)


class ScaleIntensityPercentiles(Transform):
    """Map the ``lower`` and ``upper`` percentiles of the whole image to 0 and 1.

    Robust to a few hot pixels or burnt-in text, unlike min-max scaling; a
    constant image becomes zeros.

    Parameters
    ----------
    lower, upper : float, default 0.5, 99.5
        Percentiles, in [0, 100].
    clip : bool, default True
        Clip the result to [0, 1].
    """

    def __init__(self, lower: float = PERCENTILES[0], upper: float = PERCENTILES[1], clip: bool = True) -> None:
        self.lower, self.upper, self.clip = lower, upper, clip
        # MONAI's percentile() takes numpy's path for tensors over 1 M elements (torch.quantile's limit).
        self.scale = ScaleIntensityRangePercentiles(lower, upper, b_min=0.0, b_max=1.0, clip=clip)

    def __call__(self, img: Array) -> Array:
        if _constant(img):  # MONAI would warn of a division by zero; a flat image carries no contrast
            return img * 0
        return _as_input(self.scale(img), img)


class _AboveFraction:
    """Foreground test: above ``fraction`` of the way from the image's min to its max.

    A class, not a lambda, so that a pipeline pickles into DataLoader workers.
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def __call__(self, img: Array) -> Array:
        lo, hi = img.min(), img.max()
        return img > lo + self.fraction * (hi - lo)


class CropForegroundROI(Transform):
    """Crop to the bounding box of the non-background region (plus ``margin``).

    Background is what lies within ``threshold`` of the darkest value, which
    removes the black borders of MRI slices, fundus photographs and scanned
    films. An image without foreground is returned unchanged.

    Parameters
    ----------
    margin : int, default 0
        Pixels kept around the box.
    threshold : float, default 0.05
        Fraction of the intensity range that still counts as background.
    """

    def __init__(self, margin: int = 0, threshold: float = 0.05) -> None:
        self.select = _AboveFraction(threshold)
        self.crop = CropForeground(select_fn=self.select, margin=margin, allow_smaller=True)

    def __call__(self, img: Array) -> Array:
        if not bool(self.select(img).any()):
            return img
        return self.crop(img)


class ResizeTo(Transform):
    """Resize every spatial dimension to ``spatial_size``.

    Shrinking uses box-filter averaging (no aliasing, and fast for a 1920 px JPEG),
    growing uses (bi/tri)linear interpolation; a dimension that shrinks while
    another grows gets each in its own pass.

    Why not MONAI's ``Resize``: its output is not this one, and every checkpoint was
    trained on this one. Measured on Br35H's largest JPEG (1080 x 1920 RGB), one
    thread: ``Resize(mode="area")`` differs by 1.6 % (to 64 px) and 1.2 % (to 224 px)
    of the image's range on average (the box filter drops the edge rows it cannot fill
    whole), so switching is a change of the models' input, to make with retraining.
    Speed is no longer the reason: 3.7 ms here against 4.3-5.1 ms for
    ``Resize(mode="area")`` to 64 px, 7.2-8.5 against 4.7-5.4 ms to 224 px; MONAI's
    anti-aliased ``Resize(mode="bilinear", anti_aliasing=True)`` takes 330-520 ms.

    Parameters
    ----------
    spatial_size : sequence of int
        ``(H, W)`` or ``(D, H, W)``.
    """

    def __init__(self, spatial_size: Sequence[int]) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)

    def __call__(self, img: Array) -> Array:
        t = torch.as_tensor(img, dtype=torch.float32)
        if tuple(t.shape[1:]) == self.spatial_size:
            return img
        if t.ndim - 1 != len(self.spatial_size):
            raise SpecError(f"cannot resize an image of shape {tuple(t.shape)} to {self.spatial_size}",
                            "pass a channel-first image with as many spatial dims as the size")
        x = t.as_subclass(torch.Tensor)[None]
        shrink = tuple(min(a, b) for a, b in zip(x.shape[2:], self.spatial_size))
        k = tuple(max(1, a // b) for a, b in zip(x.shape[2:], shrink))
        if max(k) > 1:
            # A whole-factor box filter first, then area averaging to the size; it drops
            # under one output pixel at the edge (see the class docstring).
            x = (F.avg_pool2d if len(k) == 2 else F.avg_pool3d)(x, k)
        if shrink != tuple(x.shape[2:]):
            x = F.interpolate(x, size=shrink, mode="area")
        if shrink != self.spatial_size:
            mode = "bilinear" if len(shrink) == 2 else "trilinear"
            x = F.interpolate(x, size=self.spatial_size, mode=mode, align_corners=False)
        return x[0] if isinstance(img, torch.Tensor) else x[0].numpy()


class Denoise(Transform):
    """Median or Gaussian filtering of each channel (MONAI's ``MedianSmooth``; scipy's Gaussian).

    Each was checked against the filter medclass used before (``scipy.ndimage``, mirrored
    edges) on pydicom's ``CT_small`` scaled to [0, 1] and ``emri_small``:

    - median: MONAI's ``MedianSmooth`` gives the same values for the pipeline's 3-pixel window;
      for 5 and more it repeats the edge pixel where scipy mirrors the edge, so up to
      ``size // 2`` pixels along the border may differ (319 of 16384 pixels on CT_small
      at size 5, by at most 0.07), the inside is identical;
    - Gaussian: MONAI's ``GaussianSmooth`` pads with zeros, which darkens the border (up to
      0.21 darker within ``4 sigma`` of the edge on CT_small) and its default ``erf`` kernel
      is 0.005 off inside. A denoiser must not dim the edge of the image, so this one
      stays scipy's ``gaussian_filter``, the filter medclass used before.

    Parameters
    ----------
    method : {"median", "gaussian"}
    size : int, default 3
        Median window, in pixels along every spatial axis (odd: ``MedianSmooth`` takes a radius).
    sigma : float, default 1.0
        Gaussian standard deviation, in pixels.
    """

    def __init__(self, method: str = "median", size: int = 3, sigma: float = 1.0) -> None:
        if method not in ("median", "gaussian"):
            raise SpecError(f"unknown denoise method {method!r}", "use 'median' or 'gaussian'")
        if method == "median" and (size < 1 or size % 2 == 0):
            raise SpecError(f"median window {size} must be odd", "use 3, 5, 7, ...")
        self.method, self.size, self.sigma = method, size, sigma
        self.smooth = MedianSmooth(radius=size // 2) if method == "median" else None

    def __call__(self, img: Array) -> Array:
        if self.smooth is not None:
            # MONAI filters the spatial axes channel by channel.
            return _as_input(self.smooth(img), img)
        from scipy import ndimage

        a = _numpy(img)
        # A zero sigma along the channel axis filters each channel alone.
        return _like(ndimage.gaussian_filter(a, sigma=(0,) + (self.sigma,) * (a.ndim - 1)), img)


class HistogramEqualize(Transform):
    """Global histogram equalisation of each channel, to [0, 1] (MONAI's ``HistogramNormalize``).

    Its output is skimage's ``equalize_hist`` (what medclass used before) stretched so that
    the darkest value maps to 0 rather than to the darkest bin's share of the pixels (0.36
    on a Br35H JPEG with a black background): an exact affine map, checked to 1e-6 on
    CT_small and Br35H, so after the pipeline's percentile scaling (every spec without a
    ``window``) the model sees the same input as before.
    """

    def __init__(self, nbins: int = 256) -> None:
        self.nbins = nbins
        self.equalize = HistogramNormalize(num_bins=nbins, min=0, max=1)

    def __call__(self, img: Array) -> Array:
        out = [self.equalize(c[None])[0] if not _constant(c) else c * 0 for c in img]
        return _as_input(torch.stack([torch.as_tensor(o) for o in out]), img)


class CLAHE(Transform):
    """Contrast-limited adaptive histogram equalisation of each channel, to [0, 1].

    skimage's, since MONAI has no CLAHE.

    Parameters
    ----------
    clip_limit : float, default 0.01
        skimage's clipping limit, in (0, 1]; higher gives more contrast.
    """

    def __init__(self, clip_limit: float = 0.01) -> None:
        self.clip_limit = clip_limit

    def __call__(self, img: Array) -> Array:
        from skimage import exposure

        a = _numpy(img)
        out = np.stack([exposure.equalize_adapthist(_scale01(c), clip_limit=self.clip_limit) for c in a])
        return _like(out.astype(np.float32), img)


# --------------------------------------------------------------------------- dictionary twins


class _Twin(MapTransform):
    """Applies ``self.transform`` (an array transform built by the subclass) to each key."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class SelectSpatialDimsd(_Twin):
    """Dictionary twin of :class:`SelectSpatialDims`."""

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = SelectSpatialDims(spatial_dims)


class EnsureChannelsd(_Twin):
    """Dictionary twin of :class:`EnsureChannels`."""

    def __init__(self, keys: KeysCollection, n: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = EnsureChannels(n)


class Windowd(_Twin):
    """Dictionary twin of :class:`Window`."""

    def __init__(self, keys: KeysCollection, center: float, width: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Window(center, width)


class CropForegroundROId(_Twin):
    """Dictionary twin of :class:`CropForegroundROI`."""

    def __init__(self, keys: KeysCollection, margin: int = 0, threshold: float = 0.05,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CropForegroundROI(margin, threshold)


class ResizeTod(_Twin):
    """Dictionary twin of :class:`ResizeTo`."""

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ResizeTo(spatial_size)


class Denoised(_Twin):
    """Dictionary twin of :class:`Denoise`."""

    def __init__(self, keys: KeysCollection, method: str = "median", size: int = 3, sigma: float = 1.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Denoise(method, size, sigma)


class ScaleIntensityPercentilesd(_Twin):
    """Dictionary twin of :class:`ScaleIntensityPercentiles`."""

    def __init__(self, keys: KeysCollection, lower: float = PERCENTILES[0], upper: float = PERCENTILES[1],
                 clip: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ScaleIntensityPercentiles(lower, upper, clip)


class HistogramEqualized(_Twin):
    """Dictionary twin of :class:`HistogramEqualize`."""

    def __init__(self, keys: KeysCollection, nbins: int = 256, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = HistogramEqualize(nbins)


class CLAHEd(_Twin):
    """Dictionary twin of :class:`CLAHE`."""

    def __init__(self, keys: KeysCollection, clip_limit: float = 0.01, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CLAHE(clip_limit)


# --------------------------------------------------------------------------- the pipeline


def validate_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a preprocessing spec and fill missing keys from :data:`DEFAULT_SPEC`.

    Parameters
    ----------
    spec : mapping or None
        Any subset of :data:`DEFAULT_SPEC`'s keys.

    Returns
    -------
    dict
        A complete spec.

    Raises
    ------
    SpecError
        (a ``ValueError``) for an unknown key or a bad value, listing valid ones.
    """
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(DEFAULT_SPEC))
    if unknown:
        raise SpecError(f"unknown preprocessing spec key(s) {unknown}", f"valid keys are {sorted(DEFAULT_SPEC)}")
    out = {**copy.deepcopy(DEFAULT_SPEC), **spec}
    for key, choices in _CHOICES.items():
        if out[key] not in choices or isinstance(out[key], bool):
            raise SpecError(f"invalid spec {key}={out[key]!r}", f"valid values are {list(choices)}")
    for key in ("image_size", "depth"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise SpecError(f"invalid spec {key}={out[key]!r}", "give a positive integer")
    w = out["window"]
    if w is not None:
        ok = (isinstance(w, (list, tuple)) and len(w) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w) and w[1] > 0)
        if not ok:
            raise SpecError(f"invalid spec window={w!r}", "give None or [center, width] with width > 0")
        out["window"] = [float(w[0]), float(w[1])]
    if not isinstance(out["crop_foreground"], bool):
        raise SpecError(f"invalid spec crop_foreground={out['crop_foreground']!r}", "valid values are [False, True]")
    return out


def build_preprocess(spec: Mapping[str, Any] | None = None, keys: KeysCollection | None = None) -> Compose:
    """Compose the preprocessing a spec describes.

    Parameters
    ----------
    spec : mapping, optional
        See :data:`DEFAULT_SPEC`; missing keys take their defaults.
    keys : str or sequence of str, optional
        Build the dictionary twins acting on these keys instead of array
        transforms.

    Returns
    -------
    monai.transforms.Compose
        Maps a channel-first image to a float32 tensor of shape
        ``(channels, s, s)`` (2D) or ``(channels, depth, s, s)`` (3D), with
        ``s = image_size``. A 2D spec takes the middle slice of a volume.

    Raises
    ------
    SpecError
        (a ``ValueError``) for an invalid spec.
    """
    spec = validate_spec(spec)
    s = spec["image_size"]
    size = (s, s) if spec["spatial_dims"] == 2 else (spec["depth"], s, s)
    steps: list[tuple[type, type, tuple, dict]] = [
        (EnsureType, EnsureTyped, (), {"data_type": "tensor", "dtype": torch.float32, "track_meta": False}),
        (SelectSpatialDims, SelectSpatialDimsd, (spec["spatial_dims"],), {}),
    ]
    if spec["window"] is not None:
        steps.append((Window, Windowd, tuple(spec["window"]), {}))
    if spec["crop_foreground"]:
        steps.append((CropForegroundROI, CropForegroundROId, (), {}))
    steps.append((ResizeTo, ResizeTod, (size,), {}))
    steps.append((EnsureChannels, EnsureChannelsd, (spec["channels"],), {}))
    if spec["denoise"]:
        steps.append((Denoise, Denoised, (spec["denoise"],), {}))
    if spec["enhance"] == "histeq":
        steps.append((HistogramEqualize, HistogramEqualized, (), {}))
    elif spec["enhance"] == "clahe":
        steps.append((CLAHE, CLAHEd, (), {}))
    if spec["window"] is None:
        # A given window already maps a fixed intensity range (e.g. HU) to
        # [0, 1]; rescaling by this image's percentiles would undo that.
        steps.append((ScaleIntensityPercentiles, ScaleIntensityPercentilesd, PERCENTILES, {}))
    if spec["normalize"] == "zscore":
        steps.append((NormalizeIntensity, NormalizeIntensityd, (), {}))
    steps.append((EnsureType, EnsureTyped, (), {"data_type": "tensor", "dtype": torch.float32, "track_meta": False}))
    if keys is None:
        return Compose([array(*args, **kw) for array, _, args, kw in steps])
    return Compose([twin(keys, *args, **kw) for _, twin, args, kw in steps])


@functools.lru_cache(maxsize=32)
def _pipeline(spec_json: str) -> Compose:
    return build_preprocess(json.loads(spec_json))


def preprocess(image: ImageData | Array, spec: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Preprocess one image into a model-ready tensor.

    Parameters
    ----------
    image : ImageData or numpy.ndarray or torch.Tensor
        A channel-first image; a ``(H, W)`` array is taken as one grey channel.
    spec : mapping, optional
        See :func:`build_preprocess`.

    Returns
    -------
    torch.Tensor
        float32, ``(channels, s, s)`` or ``(channels, depth, s, s)``.

    Raises
    ------
    SpecError
        (a ``ValueError`` and a :class:`MedClassError`) for an invalid spec or
        an image the spec cannot take, naming the image's file.
    """
    spec = validate_spec(spec)
    name = "image"
    if isinstance(image, ImageData):
        name = str(image.meta.get("path") or name)
        if spec["window"] is not None and image.meta.get("voi_applied"):
            raise SpecError(f"{name}: the spec's window cannot apply, the DICOM header's VOI was already applied",
                            "read it with read_image(path, apply_voi=False)")
        image = image.array
    if image.ndim == 2:
        image = image[None]
    try:
        return _pipeline(json.dumps(spec, sort_keys=True))(image)
    except Exception as e:
        # MONAI's Compose wraps failures in RuntimeError; surface ours by name.
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, MedClassError):
            cause = cause.__cause__
        if isinstance(cause, MedClassError):
            raise SpecError(f"{name}: {cause.message}", cause.remedy) from e
        raise
