"""GUI-free classification of volume nodes: probabilities and a heat map in the scene.

:class:`ClassificationLogic` works on any MRML scene (Slicer's ``slicer.mrmlScene``
or a bare ``slicer.vtkMRMLScene()``) and imports no Qt, so it runs headless and is
tested with slicer-core. Classification is split in three steps so that the
widget can run the slow middle one on a worker thread::

    job = logic.prepare(volume_node, checkpoint)   # main thread: read the voxels
    logic.compute(job)                             # any thread: model, Grad-CAM
    result = logic.publish(job)                    # main thread: heat-map node

:meth:`ClassificationLogic.classify` does all three. The model, its preprocessing
and the heat map come from medclass (``Classifier``, ``explain``,
``to_image_space``): the same code path as ``medclass predict`` / ``explain``.
medclass and torch are imported on first use, so that this module loads in a
Slicer where they are not installed yet.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer

from SlicerMedClassLib.results import ClassificationResult
from SlicerMedClassLib.volumes import (
    apply_dicom_voi,
    channels_first,
    copy_geometry,
    dicom_meta,
    read_dicom_header,
    require_volume,
    slice_center_ras,
    spacing_in_array_order,
    voxel_array,
)

log = logging.getLogger(__name__)

#: Node reference role from an input volume to its heat map: classifying again
#: updates that node instead of adding another.
HEATMAP_REFERENCE_ROLE = "SlicerMedClassHeatMap"
#: Singleton tag of the heat map's colour table.
HEATMAP_COLOR_TAG = "SlicerMedClassHeatMapColors"
HEATMAP_COLOR_NAME = "SlicerMedClass heat map"


def _user_error(e: Exception) -> ValueError:
    """A medclass error (message + remedy) as the ValueError the widget shows."""
    return e if isinstance(e, ValueError) else ValueError(str(e))


@dataclass
class ClassificationJob:
    """The state of one classification between :meth:`~ClassificationLogic.prepare`,
    :meth:`~ClassificationLogic.compute` and :meth:`~ClassificationLogic.publish`."""

    volume_node_id: str
    checkpoint: str
    classifier: Any  # medclass.inference.Classifier
    image: Any  # medclass.io.ImageData
    grid_shape: tuple[int, int, int]  # (K, J, I) of the input volume
    class_name: str | None = None
    heatmap: bool = True
    # filled by compute()
    prediction: Any = None  # medclass.inference.Prediction
    heat: np.ndarray | None = None  # (K, J, I) float32 in [0, 1]
    explained_class: str | None = None
    method: str | None = None
    slice_index: int | None = None
    notes: list[str] = field(default_factory=list)


class ClassificationLogic:
    """Classify volume nodes of one MRML scene with medclass checkpoints.

    Parameters
    ----------
    scene : vtkMRMLScene
        Where input volumes live and heat maps are added.
    device : str, default "auto"
        ``auto`` (GPU when present), ``cpu`` or ``cuda``.
    file_for_instance : callable, optional
        SOP Instance UID to file path, to find the DICOM header of volumes the
        DICOM module loaded (in Slicer: ``slicer.dicomDatabase.fileForInstance``).
    """

    def __init__(self, scene, device: str = "auto",
                 file_for_instance: Callable[[str], str] | None = None) -> None:
        if scene is None:
            raise ValueError("no MRML scene given")
        self.scene = scene
        self.device = device
        self.file_for_instance = file_for_instance
        self._classifiers: dict[tuple[str, float], Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ checkpoints

    @staticmethod
    def _checkpoint_path(checkpoint_path) -> Path:
        if checkpoint_path is None or not str(checkpoint_path).strip():
            raise ValueError("no checkpoint chosen; select the model.pt written by 'medclass train'")
        p = Path(str(checkpoint_path)).expanduser()
        if p.is_dir() and (p / "model.pt").is_file():
            p = p / "model.pt"  # a training run's folder
        if not p.is_file():
            raise ValueError(f"checkpoint not found: {p}; select the model.pt written by 'medclass train'")
        return p

    def load_classifier(self, checkpoint_path):
        """A :class:`medclass.inference.Classifier`, cached until the file changes.

        Raises
        ------
        ValueError
            The file is missing, not a medclass checkpoint, or cannot be loaded.
        """
        p = self._checkpoint_path(checkpoint_path)
        key = (str(p.resolve()), p.stat().st_mtime)
        with self._lock:
            if key in self._classifiers:
                return self._classifiers[key]
        from medclass.errors import MedClassError
        from medclass.inference import Classifier

        try:
            clf = Classifier(p, device=self.device)
        except MedClassError as e:
            raise _user_error(e) from e
        except (RuntimeError, KeyError, TypeError, OSError) as e:  # weights that do not fit the card, etc.
            raise ValueError(f"cannot load checkpoint {p} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                             "it is damaged or was written by an incompatible medclass; train or export it again") from e
        with self._lock:
            self._classifiers = {k: v for k, v in self._classifiers.items() if k[0] != key[0]}
            self._classifiers[key] = clf
        return clf

    def model_card(self, checkpoint_path) -> dict[str, Any]:
        """The checkpoint's model card (classes, task, preprocessing) without loading weights."""
        p = self._checkpoint_path(checkpoint_path)
        from medclass.checkpoint import read_card
        from medclass.errors import MedClassError

        try:
            return read_card(p)
        except MedClassError as e:
            raise _user_error(e) from e

    def class_names(self, checkpoint_path) -> list[str]:
        """The model's class names, for the widget's class buttons."""
        return list(self.model_card(checkpoint_path)["task"]["classes"])

    # ------------------------------------------------------------------ volume -> ImageData

    def image_from_volume(self, volume_node, apply_voi: bool = True):
        """The volume's voxels as the :class:`medclass.io.ImageData` a Classifier takes.

        Parameters
        ----------
        volume_node : vtkMRMLScalarVolumeNode or vtkMRMLVectorVolumeNode
        apply_voi : bool, default True
            For DICOM volumes whose header is found: apply its VOI LUT or window
            (pass ``False`` for models with a window of their own, as medclass does).

        Raises
        ------
        ValueError
            No volume, an empty one, a label map, or unsupported components.
        """
        require_volume(volume_node)
        name = volume_node.GetName()
        kji = voxel_array(volume_node)
        if not np.issubdtype(kji.dtype, np.number) or kji.dtype == np.bool_:
            raise ValueError(f"volume {name!r} has voxels of type {kji.dtype}; only numeric images can be classified")
        ds = read_dicom_header(volume_node, self.file_for_instance)
        voi = None
        if ds is not None and apply_voi and kji.ndim == 3:
            kji, voi = apply_dicom_voi(kji, ds)
        array = channels_first(kji, name)
        if not np.isfinite(array).all():
            raise ValueError(f"volume {name!r} contains NaN or infinite voxels; fix or resample the volume first")
        two_d = array.ndim == 3
        from medclass.io import META_KEYS

        meta: dict[str, Any] = dict.fromkeys(META_KEYS)
        if ds is not None:
            meta.update(dicom_meta(ds, 1 if two_d else array.shape[1]))
            meta["format"] = "dicom"
        else:
            meta["format"] = "slicer"
        storage = volume_node.GetStorageNode()
        meta.update(
            path=(storage.GetFileName() if storage is not None and storage.GetFileName() else None),
            spacing=spacing_in_array_order(volume_node, two_d),
            photometric=meta.get("photometric") or ("RGB" if array.shape[0] >= 3 else "MONOCHROME2"),
            voi_applied=voi,
            volume_node=volume_node.GetID(),
            volume_name=name,
        )
        from medclass.io import ImageData

        return ImageData(array, meta)

    # ------------------------------------------------------------------ classify

    def prepare(self, volume_node, checkpoint_path, class_name: str | None = None,
                heatmap: bool = True) -> ClassificationJob:
        """Main-thread step: load the model and read the volume's voxels."""
        require_volume(volume_node)
        clf = self.load_classifier(checkpoint_path)
        if class_name is not None and class_name not in clf.classes:
            raise ValueError(f"unknown class {class_name!r}; the model's classes are {', '.join(clf.classes)}")
        image = self.image_from_volume(volume_node, apply_voi=not clf.loaded.preprocess_spec.get("window"))
        dims = volume_node.GetImageData().GetDimensions()
        return ClassificationJob(volume_node.GetID(), str(checkpoint_path), clf, image,
                                 (dims[2], dims[1], dims[0]), class_name, heatmap)

    @staticmethod
    def compute(job: ClassificationJob) -> ClassificationJob:
        """Any-thread step: probabilities and the heat map on the input's voxel grid.

        Touches no MRML node, so the widget may run it on a worker thread.
        """
        from medclass.errors import MedClassError

        clf = job.classifier
        try:
            job.prediction = clf.predict([job.image])[0]
        except MedClassError as e:
            raise _user_error(e) from e
        if not job.heatmap:
            return job
        if not clf.loaded.is_torch:
            job.notes.append(f"{clf.loaded.name} is a classic feature model: it has no heat map")
            return job
        from medclass.explain import explain, to_image_space

        try:
            ex = explain(clf, job.image, job.class_name)
        except MedClassError as e:
            job.notes.append(f"no heat map: {e}")
            return job
        k, j, i = job.grid_shape
        heat = ex.heatmap
        if heat.ndim == 3 and k > 1:
            grid = to_image_space(heat, (k, j, i))
        elif heat.ndim == 2:
            plane = to_image_space(heat, (j, i))
            grid = np.zeros((k, j, i), dtype=np.float32)
            # a 2D model given a volume classifies its middle slice (medclass SelectSpatialDims)
            job.slice_index = k // 2
            grid[job.slice_index] = plane
            if k == 1:
                job.slice_index = None
        else:
            job.notes.append(f"no heat map: a map of shape {heat.shape} does not fit the volume's {k}x{j}x{i} grid")
            return job
        job.heat = np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0).astype(np.float32)
        job.explained_class, job.method = ex.class_name, ex.method
        if ex.note:  # e.g. Grad-CAM held no positive evidence: say which map is shown instead
            job.notes.append(ex.note)
        return job

    def publish(self, job: ClassificationJob) -> ClassificationResult:
        """Main-thread step: put the heat map into the scene and build the result."""
        volume_node = self.scene.GetNodeByID(job.volume_node_id)
        if volume_node is None:
            raise ValueError("the volume was removed from the scene while it was being classified; select it again")
        heat_node = None
        if job.heat is not None:
            heat_node = self._heatmap_node(volume_node, job)
        pred, clf = job.prediction, job.classifier
        return ClassificationResult(
            probabilities=dict(pred.probabilities),
            label=pred.label,
            heatmap_node=heat_node,
            classes=list(clf.classes),
            task=clf.task.type,
            explained_class=job.explained_class,
            method=job.method,
            slice_index=job.slice_index,
            source=job.checkpoint,
            note="; ".join(job.notes) or None,
        )

    def classify(self, volume_node, checkpoint_path, class_name: str | None = None,
                 heatmap: bool = True) -> ClassificationResult:
        """Classify a volume node with a medclass checkpoint.

        Parameters
        ----------
        volume_node : vtkMRMLScalarVolumeNode or vtkMRMLVectorVolumeNode
            A 2D image (one slice) or a volume, grey or colour.
        checkpoint_path : str or Path
            A ``model.pt`` written by ``medclass train`` (or its run folder).
        class_name : str, optional
            The class whose evidence the heat map shows; default: the predicted
            class (binary: the positive one).
        heatmap : bool, default True
            Compute the Grad-CAM / attention map and add it to the scene.

        Returns
        -------
        ClassificationResult
            ``probabilities``, ``label`` and ``heatmap_node``: a scalar volume in
            the same scene with the input's dimensions and IJK-to-RAS matrix and
            values in [0, 1].

        Raises
        ------
        ValueError
            No volume, an empty volume, a missing or unreadable checkpoint, or an
            image the model cannot take (channels, 2D vs 3D), with what to do.
        """
        job = self.prepare(volume_node, checkpoint_path, class_name, heatmap)
        self.compute(job)
        return self.publish(job)

    # ------------------------------------------------------------------ heat-map node

    def _heatmap_node(self, volume_node, job: ClassificationJob):
        return self.store_heatmap(volume_node, job.heat, job.explained_class, job.method, job.checkpoint,
                                  job.slice_index)

    def store_heatmap(self, volume_node, heat: np.ndarray, explained_class: str | None = None,
                      method: str | None = None, source: str = "", slice_index: int | None = None):
        """Put a heat map ``(K, J, I)`` on ``volume_node``'s grid into the scene (reusing its last one)."""
        dims = volume_node.GetImageData().GetDimensions()
        if tuple(heat.shape) != (dims[2], dims[1], dims[0]):
            raise ValueError(f"a heat map of shape {tuple(heat.shape)} does not fit volume "
                             f"{volume_node.GetName()!r} ({dims[2]}x{dims[1]}x{dims[0]} voxels)")
        node = volume_node.GetNodeReference(HEATMAP_REFERENCE_ROLE)
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                self.scene.GenerateUniqueName(f"{volume_node.GetName()} heat map"))
            volume_node.SetNodeReferenceID(HEATMAP_REFERENCE_ROLE, node.GetID())
        slicer.util.updateVolumeFromArray(node, np.clip(np.nan_to_num(heat), 0.0, 1.0).astype(np.float32))
        copy_geometry(volume_node, node)
        node.SetAttribute("SlicerMedClass.source", volume_node.GetID())
        node.SetAttribute("SlicerMedClass.class", explained_class or "")
        node.SetAttribute("SlicerMedClass.method", method or "")
        node.SetAttribute("SlicerMedClass.checkpoint", source)
        node.SetAttribute("SlicerMedClass.slice", "" if slice_index is None else str(slice_index))
        return node

    def server_result(self, volume_node, answer: dict[str, Any], heatmap_file=None, classes=None,
                      source: str = "") -> ClassificationResult:
        """A MONAI Label infer answer (and its heat-map file) as a result on ``volume_node``.

        The server computes the heat map on the image's own voxel grid, which is
        the grid of the volume Slicer loaded from the same file; it is given the
        volume's IJK-to-RAS matrix. A map that does not fit is reported, not shown.
        """
        from SlicerMedClassLib.results import result_from_server

        result = result_from_server(answer, classes, source)
        if heatmap_file is None:
            result.note = "the server sent no heat map"
            return result
        require_volume(volume_node)
        heat = read_heatmap_file(heatmap_file)
        dims = volume_node.GetImageData().GetDimensions()
        if heat.ndim == 2:
            heat = heat[None]
        if tuple(heat.shape) != (dims[2], dims[1], dims[0]):
            result.note = (f"the server's heat map ({'x'.join(map(str, heat.shape))}) does not fit this volume "
                           f"({dims[2]}x{dims[1]}x{dims[0]}); it is not shown")
            return result
        result.heatmap_node = self.store_heatmap(volume_node, heat, answer.get("heatmap_class"),
                                                 answer.get("heatmap_method"), source)
        result.explained_class = answer.get("heatmap_class")
        result.method = answer.get("heatmap_method")
        result.note = None
        return result

    # ------------------------------------------------------------------ display (MRML only)

    def heatmap_color_node(self):
        """A blue-cyan-yellow-red colour table for heat maps (one per scene)."""
        node = self.scene.GetSingletonNode(HEATMAP_COLOR_TAG, "vtkMRMLColorTableNode")
        if node is not None:
            return node
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(HEATMAP_COLOR_NAME)
        node.SetSingletonTag(HEATMAP_COLOR_TAG)
        node.SetTypeToUser()
        node.SetHideFromEditors(False)
        n = 256
        node.SetNumberOfColors(n)
        node.GetLookupTable().SetTableRange(0, n - 1)
        for idx, (r, g, b) in enumerate(jet_colors(n)):
            node.SetColor(idx, f"{idx / (n - 1):.3f}", r, g, b, 1.0)
        self.scene.AddNode(node)
        return node

    def show_heatmap(self, heatmap_node, background_node=None, opacity: float = 0.5, threshold: float = 0.2,
                     slice_index: int | None = None) -> None:
        """Show a heat map as a coloured foreground over its volume in every slice view.

        MRML calls only (display node, colour table, slice composite nodes), so it
        works headless: the slice views follow their composite nodes.

        Parameters
        ----------
        heatmap_node : vtkMRMLScalarVolumeNode
        background_node : vtkMRMLVolumeNode, optional
            The classified volume, shown underneath.
        opacity : float, default 0.5
            Foreground opacity in [0, 1].
        threshold : float, default 0.2
            Heat below this is transparent, so that cold areas do not tint the image.
        slice_index : int, optional
            Centre the slice views on this slice (K index) of the background volume:
            the slice a 2D model classified.
        """
        if heatmap_node is None:
            raise ValueError("no heat map to show; classify a volume with a CNN or attention model first")
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"opacity must be within [0, 1], not {opacity}")
        display = heatmap_node.GetDisplayNode()
        if display is None:
            display = slicer.vtkMRMLScalarVolumeDisplayNode()
            self.scene.AddNode(display)
            heatmap_node.SetAndObserveDisplayNodeID(display.GetID())
        with slicer.util.NodeModify(display):
            display.SetAndObserveColorNodeID(self.heatmap_color_node().GetID())
            display.SetAutoWindowLevel(0)
            display.SetWindowLevelMinMax(0.0, 1.0)
            display.SetAutoThreshold(0)
            display.SetLowerThreshold(float(threshold))
            display.SetUpperThreshold(1.0)
            display.SetApplyThreshold(1)
            display.SetInterpolate(1)
        for comp in self._composite_nodes():
            with slicer.util.NodeModify(comp):
                if background_node is not None:
                    comp.SetBackgroundVolumeID(background_node.GetID())
                comp.SetForegroundVolumeID(heatmap_node.GetID())
                comp.SetForegroundOpacity(float(opacity))
        if slice_index is not None and background_node is not None:
            r, a, s = slice_center_ras(background_node, slice_index)
            for sn in self._nodes("vtkMRMLSliceNode"):
                sn.JumpSliceByCentering(r, a, s)

    def set_heatmap_opacity(self, opacity: float) -> None:
        """Foreground opacity of every slice view (the widget's opacity slider)."""
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"opacity must be within [0, 1], not {opacity}")
        for comp in self._composite_nodes():
            comp.SetForegroundOpacity(float(opacity))

    def set_heatmap_threshold(self, heatmap_node, threshold: float) -> None:
        """Heat below ``threshold`` becomes transparent."""
        display = heatmap_node.GetDisplayNode() if heatmap_node is not None else None
        if display is not None:
            display.SetLowerThreshold(float(threshold))

    def _nodes(self, class_name: str) -> list:
        col = self.scene.GetNodesByClass(class_name)
        return [col.GetItemAsObject(i) for i in range(col.GetNumberOfItems())]

    def _composite_nodes(self) -> list:
        return self._nodes("vtkMRMLSliceCompositeNode")


def read_heatmap_file(path) -> np.ndarray:
    """Voxels of a heat-map file (NRRD, NIfTI, MetaImage) in KJI order, with Slicer's own reader."""
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise ValueError(f"cannot read the heat map {path}; the server sent a file Slicer cannot read")
    return np.array(slicer.util.arrayFromVolume(node), dtype=np.float32, copy=True)


def jet_colors(n: int = 256) -> list[tuple[float, float, float]]:
    """The classic jet map (blue, cyan, yellow, red) as ``n`` RGB triples in [0, 1]."""
    x = np.linspace(0.0, 1.0, n)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return [(float(a), float(c), float(d)) for a, c, d in zip(r, g, b)]
