"""The Slicer module's GUI-free logic on real MRML scenes and real images.

Volumes come from real files: Br35H JPEGs (brain MRI), DICOM read by Slicer's
own reader (pydicom's CT and MR, an enhanced multi-frame MR, a 13-Mpx RLE
mammogram). Probabilities must equal medclass's own Classifier on the same file,
and the heat map must sit on the input's voxel grid in the same scene.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import slicer
from mrml_volumes import ijk_to_ras, load_with_slicer_reader, make_checkpoint, volume_from_picture
from pydicom.data import get_testdata_file
from SlicerMedClassLib.logic import HEATMAP_REFERENCE_ROLE, ClassificationLogic
from SlicerMedClassLib.results import ClassificationResult

from medclass.explain import explain, to_image_space
from medclass.inference import Classifier


@pytest.fixture(scope="module")
def classifier(checkpoint) -> Classifier:
    return Classifier(checkpoint, device="cpu")


def assert_heatmap_on_input_grid(scene, volume, result: ClassificationResult) -> np.ndarray:
    heat = result.heatmap_node
    assert heat is not None and heat.IsA("vtkMRMLScalarVolumeNode")
    assert scene.GetNodeByID(heat.GetID()) is heat, "the heat map is not in the input's scene"
    assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(ijk_to_ras(heat), ijk_to_ras(volume), atol=1e-9)
    values = slicer.util.arrayFromVolume(heat)
    assert values.dtype == np.float32
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert values.max() - values.min() > 0.5, "the heat map is (nearly) constant"
    assert values.std() > 0.01
    return values


def assert_same_probabilities(result, expected: dict[str, float], atol: float = 1e-6) -> None:
    assert list(result.probabilities) == list(expected)
    for name, p in expected.items():
        assert result.probabilities[name] == pytest.approx(p, abs=atol), name


# --------------------------------------------------------------------------- real images


@pytest.mark.parametrize("scalar", [True, False], ids=["grey-scalar-volume", "rgb-vector-volume"])
def test_br35h_jpeg_volume_matches_medclass_on_the_file(scene, logic, checkpoint, classifier, br35h_dir, scalar):
    path = sorted((br35h_dir / "yes").glob("*.jpg"))[0]
    volume = volume_from_picture(scene, path, scalar=scalar)

    result = logic.classify(volume, checkpoint)

    assert_same_probabilities(result, classifier.predict_paths([path])[0].probabilities, atol=1e-3 if scalar else 1e-6)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.label == max(result.probabilities, key=result.probabilities.get)
    assert result.task == "binary" and result.classes == classifier.classes
    assert result.method == "gradcam" and result.explained_class == classifier.classes[1]  # binary: the positive class
    assert result.slice_index is None  # a 2D image has one slice
    values = assert_heatmap_on_input_grid(scene, volume, result)
    assert values.shape == (1, *slicer.util.arrayFromVolume(volume).shape[1:3])


def test_heatmap_is_medclass_gradcam_mapped_onto_the_voxels_unflipped(scene, logic, checkpoint, classifier, br35h_dir):
    path = sorted((br35h_dir / "yes").glob("*.jpg"))[3]
    volume = volume_from_picture(scene, path, scalar=False)

    values = slicer.util.arrayFromVolume(logic.classify(volume, checkpoint).heatmap_node)[0]

    image = classifier.read(path)
    expected = to_image_space(explain(classifier, image).heatmap, image.array.shape[1:])
    np.testing.assert_allclose(values, expected, atol=1e-5)
    # Orientation: the hottest voxel is where medclass puts it (rows = J, columns = I).
    assert np.unravel_index(values.argmax(), values.shape) == np.unravel_index(expected.argmax(), expected.shape)


def test_several_br35h_images_agree_with_medclass(scene, logic, checkpoint, classifier, br35h_dir):
    paths = sorted((br35h_dir / "no").glob("*.jpg"))[:3] + sorted((br35h_dir / "yes").glob("*.jpg"))[:3]
    for path in paths:
        result = logic.classify(volume_from_picture(scene, path, scalar=False), checkpoint, heatmap=False)
        assert_same_probabilities(result, classifier.predict_paths([path])[0].probabilities)
        assert result.heatmap_node is None


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_read_by_slicer_matches_medclass(scene, logic, checkpoint, classifier, name):
    path = get_testdata_file(name)
    volume = load_with_slicer_reader(scene, path)

    result = logic.classify(volume, checkpoint)

    assert_same_probabilities(result, classifier.predict_paths([path])[0].probabilities)
    assert_heatmap_on_input_grid(scene, volume, result)
    # The DICOM header was found through the volume's storage node.
    image = logic.image_from_volume(volume)
    assert image.meta["format"] == "dicom" and image.meta["modality"] in ("CT", "MR")
    assert image.meta["sop_uid"]


def test_dicom_window_is_applied_as_medclass_applies_it(scene, logic, checkpoint, classifier):
    # MR_small has WindowCenter/Width 600/1600: Slicer holds modality values, medclass
    # classifies the windowed image; the logic must window too, or the two disagree.
    path = get_testdata_file("MR_small.dcm")
    volume = load_with_slicer_reader(scene, path)
    windowed = logic.image_from_volume(volume, apply_voi=True)
    raw = logic.image_from_volume(volume, apply_voi=False)
    assert windowed.meta["voi_applied"] == "window" and raw.meta["voi_applied"] is None
    np.testing.assert_allclose(windowed.array, classifier.read(path).array, atol=1e-3)
    assert not np.allclose(windowed.array, raw.array)
    # Slicer's reader keeps the modality values exactly.
    import pydicom

    np.testing.assert_array_equal(raw.array[0], pydicom.dcmread(path).pixel_array.astype(np.float32))


@pytest.mark.parametrize("width, how", [(0, None), ([0, 1600], "window")], ids=["width-0", "first-width-0"])
def test_dicom_with_an_unusable_window_falls_back_as_medclass_does(scene, logic, checkpoint, classifier, tmp_path,
                                                                  width, how):
    # medclass.io.apply_voi is the one rule: a width of 0 means the pixel range, a
    # second valid window is used; the Slicer volume path must agree with predict.
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = ([600, 600], width) if isinstance(width, list) else (600, width)
    path = tmp_path / "MR_small_window.dcm"
    ds.save_as(path)
    volume = load_with_slicer_reader(scene, path)

    image = logic.image_from_volume(volume)

    assert image.meta["voi_applied"] == how
    np.testing.assert_allclose(image.array, classifier.read(path).array, atol=1e-3)
    result = logic.classify(volume, checkpoint)
    assert_same_probabilities(result, classifier.predict_paths([path])[0].probabilities)


def test_multiframe_mr_volume_with_a_2d_model_explains_the_middle_slice(scene, logic, checkpoint, classifier):
    path = get_testdata_file("emri_small.dcm")  # enhanced MR, 10 frames of 64 x 64
    volume = load_with_slicer_reader(scene, path)
    assert volume.GetImageData().GetDimensions() == (64, 64, 10)

    result = logic.classify(volume, checkpoint)

    assert_same_probabilities(result, classifier.predict_paths([path])[0].probabilities)
    values = assert_heatmap_on_input_grid(scene, volume, result)
    assert result.slice_index == 5  # medclass gives a 2D model the middle slice (D // 2)
    assert values[5].max() > 0.5
    assert np.count_nonzero(np.delete(values, 5, axis=0)) == 0
    assert scene.GetNodeByID(result.heatmap_node.GetID()).GetAttribute("SlicerMedClass.slice") == "5"


def test_multiframe_volume_with_a_3d_model_gets_a_3d_heat_map(scene, tmp_path):
    ckpt = make_checkpoint(tmp_path / "3d.pt", spatial_dims=3, image_size=16, depth=8)
    volume = load_with_slicer_reader(scene, get_testdata_file("emri_small.dcm"))
    result = ClassificationLogic(scene, device="cpu").classify(volume, ckpt)

    values = assert_heatmap_on_input_grid(scene, volume, result)
    assert result.slice_index is None
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert (values.reshape(values.shape[0], -1).max(axis=1) > 0).sum() > 5, "a 3D map should cover most slices"


def test_mammogram_rle_16bit_matches_medclass(scene, logic, checkpoint, classifier, mammogram_paths):
    path = mammogram_paths[0]  # CBIS-DDSM, RLE Lossless, 16 bit, ~4400 x 2900
    volume = load_with_slicer_reader(scene, path)

    result = logic.classify(volume, checkpoint)

    assert_same_probabilities(result, classifier.predict_paths([path])[0].probabilities)
    assert_heatmap_on_input_grid(scene, volume, result)


def test_multilabel_model_returns_independent_probabilities_and_a_list(scene, tmp_path, br35h_dir):
    ckpt = make_checkpoint(tmp_path / "ml.pt", task="multilabel", classes=("mass", "oedema", "haemorrhage"))
    volume = volume_from_picture(scene, sorted((br35h_dir / "yes").glob("*.jpg"))[0])
    result = ClassificationLogic(scene, device="cpu").classify(volume, ckpt, class_name="oedema")
    assert result.task == "multilabel" and isinstance(result.label, list)
    assert set(result.probabilities) == {"mass", "oedema", "haemorrhage"}
    assert all(0.0 <= p <= 1.0 for p in result.probabilities.values())
    assert result.explained_class == "oedema"


# --------------------------------------------------------------------------- the scene


def test_classifying_again_updates_the_same_heat_map_node(scene, logic, checkpoint, br35h_dir):
    volume = volume_from_picture(scene, sorted((br35h_dir / "no").glob("*.jpg"))[0])
    first = logic.classify(volume, checkpoint)
    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    second = logic.classify(volume, checkpoint, class_name=first.classes[0])
    assert second.heatmap_node is first.heatmap_node
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count
    assert volume.GetNodeReference(HEATMAP_REFERENCE_ROLE) is first.heatmap_node
    assert second.explained_class == first.classes[0]
    assert first.heatmap_node.GetAttribute("SlicerMedClass.source") == volume.GetID()


def test_heat_map_follows_a_transformed_input(scene, logic, checkpoint):
    volume = load_with_slicer_reader(scene, get_testdata_file("CT_small.dcm"))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = logic.classify(volume, checkpoint)
    assert result.heatmap_node.GetTransformNodeID() == transform.GetID()


def test_show_heatmap_sets_a_coloured_thresholded_foreground(scene, logic, checkpoint):
    volume = load_with_slicer_reader(scene, get_testdata_file("emri_small.dcm"))
    result = logic.classify(volume, checkpoint)
    # What Slicer's layout puts in the scene for each slice view.
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    slices = []
    for orientation in ("Axial", "Sagittal", "Coronal"):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetOrientation(orientation)
        slices.append(node)

    logic.show_heatmap(result.heatmap_node, volume, opacity=0.4, threshold=0.3, slice_index=result.slice_index)

    for comp in composites:
        assert comp.GetForegroundVolumeID() == result.heatmap_node.GetID()
        assert comp.GetBackgroundVolumeID() == volume.GetID()
        assert comp.GetForegroundOpacity() == pytest.approx(0.4)
    display = result.heatmap_node.GetDisplayNode()
    assert display.IsA("vtkMRMLScalarVolumeDisplayNode")
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.3)
    color = scene.GetNodeByID(display.GetColorNodeID())
    assert color.GetNumberOfColors() == 256
    lo, hi = [0.0] * 4, [0.0] * 4
    color.GetColor(0, lo)
    color.GetColor(255, hi)
    assert lo[2] > lo[0] and hi[0] > hi[2]  # cold is blue, hot is red
    # The axial view is centred on the classified slice.
    from SlicerMedClassLib.volumes import slice_center_ras

    axial = slices[0].GetSliceToRAS()
    assert axial.GetElement(2, 3) == pytest.approx(slice_center_ras(volume, 5)[2], abs=1e-6)

    logic.set_heatmap_opacity(0.8)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.8) for c in composites)
    logic.set_heatmap_threshold(result.heatmap_node, 0.6)
    assert display.GetLowerThreshold() == pytest.approx(0.6)
    # One colour table per scene, however many heat maps.
    logic.show_heatmap(result.heatmap_node, volume)
    assert scene.GetNodeByID(result.heatmap_node.GetDisplayNode().GetColorNodeID()) is color


def test_compute_runs_off_the_main_thread_with_the_same_result(scene, logic, checkpoint, br35h_dir):
    volume = volume_from_picture(scene, sorted((br35h_dir / "yes").glob("*.jpg"))[1], scalar=False)
    job = logic.prepare(volume, checkpoint)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = pool.submit(ClassificationLogic.compute, job).result()
    threaded = logic.publish(done)
    direct = logic.classify(volume, checkpoint)
    assert threaded.probabilities == direct.probabilities
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(threaded.heatmap_node),
                                  slicer.util.arrayFromVolume(direct.heatmap_node))


def test_run_folder_is_accepted_for_its_model_pt(scene, logic, trained, checkpoint):
    volume = load_with_slicer_reader(scene, get_testdata_file("CT_small.dcm"))
    assert logic.classify(volume, trained, heatmap=False).probabilities == \
        logic.classify(volume, checkpoint, heatmap=False).probabilities
    assert logic.class_names(checkpoint) == Classifier(checkpoint, device="cpu").classes


# --------------------------------------------------------------------------- user errors


def test_no_volume(logic, checkpoint):
    with pytest.raises(ValueError, match="no volume selected"):
        logic.classify(None, checkpoint)


def test_volume_without_voxels(scene, logic, checkpoint):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing loaded")
    with pytest.raises(ValueError, match="has no voxels"):
        logic.classify(node, checkpoint)


def test_empty_volume(scene, logic, checkpoint):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    node.SetAndObserveImageData(vtk.vtkImageData())
    with pytest.raises(ValueError, match="empty"):
        logic.classify(node, checkpoint)


def test_label_map_is_not_an_image(scene, logic, checkpoint):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "segmentation")
    slicer.util.updateVolumeFromArray(node, np.ones((1, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="label map"):
        logic.classify(node, checkpoint)


def test_not_a_volume(scene, logic, checkpoint):
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    with pytest.raises(ValueError, match="not a volume"):
        logic.classify(node, checkpoint)


@pytest.mark.parametrize("checkpoint_arg", ["", "does/not/exist/model.pt"])
def test_missing_checkpoint(scene, logic, checkpoint_arg):
    volume = load_with_slicer_reader(scene, get_testdata_file("CT_small.dcm"))
    with pytest.raises(ValueError, match="checkpoint"):
        logic.classify(volume, checkpoint_arg)


def test_unreadable_checkpoint(scene, logic, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a zip file at all")
    volume = load_with_slicer_reader(scene, get_testdata_file("CT_small.dcm"))
    with pytest.raises(ValueError, match="not a medclass checkpoint"):
        logic.classify(volume, bad)


def test_wrong_number_of_components(scene, logic, checkpoint):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "displacement")
    slicer.util.updateVolumeFromArray(node, np.random.default_rng(0).random((1, 16, 16, 2)).astype(np.float32))
    with pytest.raises(ValueError, match="2 components"):
        logic.classify(node, checkpoint)


def test_3d_model_cannot_take_a_2d_image(scene, tmp_path, br35h_dir):
    ckpt = make_checkpoint(tmp_path / "3d.pt", spatial_dims=3, image_size=16, depth=8)
    volume = volume_from_picture(scene, sorted((br35h_dir / "yes").glob("*.jpg"))[0])
    with pytest.raises(ValueError, match="3D model cannot take a 2D image"):
        ClassificationLogic(scene, device="cpu").classify(volume, ckpt)


def test_unknown_class_to_explain(scene, logic, checkpoint):
    volume = load_with_slicer_reader(scene, get_testdata_file("CT_small.dcm"))
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        logic.classify(volume, checkpoint, class_name="cat")


def test_nan_voxels(scene, logic, checkpoint):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nan")
    arr = np.ones((1, 32, 32), dtype=np.float32)
    arr[0, 3, 3] = np.nan
    slicer.util.updateVolumeFromArray(node, arr)
    with pytest.raises(ValueError, match="NaN"):
        logic.classify(node, checkpoint)


def test_volume_removed_while_classifying(scene, logic, checkpoint):
    volume = load_with_slicer_reader(scene, get_testdata_file("CT_small.dcm"))
    job = logic.compute(logic.prepare(volume, checkpoint))
    scene.RemoveNode(volume)
    with pytest.raises(ValueError, match="removed from the scene"):
        logic.publish(job)


def test_show_heatmap_without_a_heat_map(logic):
    with pytest.raises(ValueError, match="no heat map"):
        logic.show_heatmap(None)
