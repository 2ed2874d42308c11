"""3D volumes through the MONAI Label app: a NIfTI volume made from a real MR series.

The served model is a 3D ResNet-18 checkpoint built without training: what is
under test is the volume path (reading, 3D preprocessing, heat map on the
volume's voxel grid), not accuracy.
"""

from __future__ import annotations

import pytest
import requests
import SimpleITK as sitk
from pydicom.data import get_testdata_file


@pytest.fixture(scope="module")
def volume_server(tmp_path_factory, label_server_launcher):
    from medclass.checkpoint import make_card, save_checkpoint
    from medclass.models import create_model
    from medclass.tasks import Task
    from medclass.training import TrainConfig

    start, stop = label_server_launcher
    base = tmp_path_factory.mktemp("label-volume")
    studies = base / "studies"
    studies.mkdir()
    # emri_small.dcm: a real multi-frame MR (10 frames of 64 x 64) -> NIfTI and NRRD volumes.
    vol = sitk.ReadImage(get_testdata_file("emri_small.dcm"))
    sitk.WriteImage(vol, str(studies / "mr_volume.nii.gz"))
    sitk.WriteImage(vol, str(studies / "mr_volume_2.nrrd"))
    cfg = TrainConfig(data="-", spatial_dims=3, image_size=32, depth=16)
    task = Task("binary", ["normal", "abnormal"])
    args = {"spatial_dims": 3, "in_channels": 1, "num_outputs": 2, "image_size": 32}
    model = create_model("resnet18", **args).eval()
    ckpt = save_checkpoint(base / "models" / "resnet18" / "model.pt", model,
                           make_card("resnet18", args, task, cfg.preprocess_spec()))
    assert ckpt.exists()
    proc, url = start(studies, base / "models", base / "server.log", {"models": "resnet18"})
    try:
        yield url, vol
    finally:
        stop(proc)


@pytest.mark.parametrize("image_id", ["mr_volume", "mr_volume_2"])
def test_a_volume_gets_a_probability_per_class_and_a_volume_heatmap(volume_server, image_id, tmp_path):
    from monailabel.client import MONAILabelClient

    url, vol = volume_server
    info = requests.get(f"{url}/info/", timeout=60).json()["models"]["resnet18"]
    assert info["dimension"] == 3 and info["type"] == "classification"
    out, params = MONAILabelClient(url, tmpdir=str(tmp_path)).infer("resnet18", image_id, {"heatmap": True})
    assert set(params["probabilities"]) == {"normal", "abnormal"}
    assert sum(params["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    heat = sitk.ReadImage(out)
    assert heat.GetSize() == vol.GetSize()  # the volume's voxel grid, so Slicer overlays it
    assert heat.GetOrigin() == pytest.approx(vol.GetOrigin())
    assert heat.GetDirection() == pytest.approx(vol.GetDirection())
    a = sitk.GetArrayFromImage(heat)
    assert a.min() >= 0 and a.max() <= 1
