"""``POST /infer/<model>``: class probabilities (and optionally a heat map) for one image."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.configs.classification import ModelSlot
from medclass.errors import InferenceUnavailable, MedClassError

log = logging.getLogger(__name__)


class ClassifyInfer(InferTask):
    """Classify the image ``request["image"]`` (a file or a DICOM series folder).

    The JSON result has ``label`` (class name, or names for multi-label),
    ``probabilities`` (class → probability), ``classes``, ``model`` and
    ``model_version``, and MONAI Label's classification format,
    ``prediction``: ``[{"idx", "label", "score"}, ...]``, one entry per class.
    With ``--conf inference triton://...`` the forward pass runs on that Triton server
    (503 with a one-line reason while it is unreachable; 409 when its model's card
    differs from the served checkpoint's); the heat map is still computed here. With ``{"heatmap": true}`` in the request parameters the
    result file is the Grad-CAM / attention heat map, in [0, 1], on the input's
    voxel grid (NRRD); without it there is no result file.
    """

    def __init__(self, slot: ModelSlot) -> None:
        super().__init__(type=InferType.CLASSIFICATION, labels=list(slot.task.classes), dimension=slot.dimension,
                         description=f"{slot.name}: {slot.task.type} classification ({', '.join(slot.task.classes)})",
                         config={"heatmap": False})
        self.slot = slot

    def info(self) -> dict[str, Any]:
        d = super().info()
        card = self.slot.published.card() or {}
        d.update(task=self.slot.task.type, classes=list(self.slot.task.classes),
                 trained=self.slot.published.exists, metrics=card.get("metrics", {}))
        return d

    def is_valid(self) -> bool:
        return True  # listed before its first training, so that annotators see the classes

    def __call__(self, request) -> tuple[str | None, dict[str, Any]]:
        try:
            clf = self.slot.served.classifier()  # local, or the card of a model Triton runs (--conf inference)
            if clf.remote is not None and not clf.remote_checked:
                clf.check_remote()  # a served model that is not this checkpoint: 409, before any image is read
        except InferenceUnavailable as e:
            # The server is down or unreachable: retry later (one line, no traceback).
            raise HTTPException(status_code=503, detail=f"{self.slot.name}: {e}") from None
        except MedClassError as e:
            raise HTTPException(status_code=409, detail=f"{self.slot.name}: {e.message}. {e.remedy}") from None
        path = request["image"]
        try:
            image = clf.read(path)
            pred = clf.predict([image])[0]
        except InferenceUnavailable as e:
            raise HTTPException(status_code=503, detail=f"{self.slot.name}: {e}") from None
        except MedClassError as e:
            raise HTTPException(status_code=422, detail=f"{e.message}. {e.remedy}") from None
        result = {"label": pred.label, "probabilities": pred.probabilities, "classes": list(clf.classes),
                  "model": self.slot.name, "model_version": self.slot.published.version,
                  "task": clf.task.type,
                  # MONAI Label's own classification result (its ClassificationWriter), so clients
                  # written for MONAI Label's classifiers read it.
                  "prediction": [{"idx": k, "label": c, "score": float(pred.probabilities[c])}
                                 for k, c in enumerate(clf.classes)]}
        if not _truthy(request.get("heatmap")):
            return None, result
        from medclass.explain import explain, to_image_space

        try:
            # The heat map needs the model's gradients: always the local checkpoint.
            ex = explain(self.slot.published.classifier(), image, request.get("class_name"))
        except MedClassError as e:
            raise HTTPException(status_code=422, detail=f"{e.message}. {e.remedy}") from None
        heat = to_image_space(ex.heatmap, image.array.shape[1:])
        out = tempfile.NamedTemporaryFile(suffix=".nrrd", delete=False).name
        _write_like(heat, image, out, path)
        result.update(heatmap_class=ex.class_name, heatmap_method=ex.method)
        if ex.note:
            result["heatmap_note"] = ex.note
        return out, result


def _truthy(v) -> bool:
    return str(v).lower() in ("1", "true", "yes", "on")


def _write_like(heat, image, path: str, source: str) -> None:
    """Write ``heat`` (NRRD) on the input's voxel grid: its spacing, origin and direction.

    The geometry is copied from the input file when ITK reads it (NIfTI, NRRD,
    MetaImage, DICOM), else only the pixel spacing medclass found is set.
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(heat.astype("float32"))
    try:
        ref = sitk.ReadImage(str(source))
        if ref.GetSize() == img.GetSize():
            img.CopyInformation(ref)
            sitk.WriteImage(img, path)
            return
    except RuntimeError:  # a format ITK does not read, or a DICOM series folder
        pass
    spacing = image.meta.get("spacing")
    if spacing and all(spacing):
        img.SetSpacing(tuple(float(s) for s in reversed(spacing[-heat.ndim:])))
    sitk.WriteImage(img, path)
