"""Datastores that keep image-level (JSON) labels, locally or beside a DICOMweb PACS.

MONAI Label's datastores expect segmentation masks; here a label is the JSON
object of :func:`medclass.labeling.parse_label`, validated against the app's
classes before it is stored (a bad one gets an HTTP 422 with the reason).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from medclass.errors import MedClassError
from medclass.labeling import parse_label
from medclass.tasks import Task

log = logging.getLogger(__name__)

# MONAI Label's defaults, plus the other formats medclass reads (DICOM files, JPEG
# spelled .jpeg, MetaImage, BMP, TIFF).
IMAGE_PATTERNS = sorted({*settings.MONAI_LABEL_DATASTORE_FILE_EXT, "*.jpeg", "*.dcm", "*.mha", "*.mhd",
                         "*.bmp", "*.tiff"} - {"*.svs", "*.xml"})


class ClassificationLabels:
    """Mixin: JSON image-level labels, validated, plus bulk image-info updates."""

    task: Task
    _info_lock = threading.Lock()

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            raw = Path(label_filename).read_bytes()
            names = parse_label(raw, self.task, label_info)
        except MedClassError as e:
            # A 4xx, never a 500: the annotator can fix this.
            raise HTTPException(status_code=422, detail=f"{e.message}. {e.remedy}") from None
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        payload = {"labels": names} if self.task.type == "multilabel" else {"label": names[0]}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "label.json")
            Path(path).write_text(json.dumps(payload))
            info = {k: v for k, v in (label_info or {}).items() if k not in ("label", "labels")}
            info.update(payload)
            return LocalDatastore.save_label(self, image_id, path, label_tag or DefaultLabelTag.FINAL, info)

    def remove_label(self, label_id: str, label_tag: str) -> None:  # noqa: D102
        LocalDatastore.remove_label(self, label_id, label_tag)
        # MONAI Label leaves this to its file watcher, which only watches image and mask
        # extensions: a removed JSON label would stay "labelled". Reconcile now.
        self.refresh()

    def read_label(self, image_id: str) -> list[str]:
        """The class names stored for ``image_id`` (final tag)."""
        uri = LocalDatastore.get_label_uri(self, image_id, DefaultLabelTag.FINAL)
        return parse_label(Path(uri).read_bytes(), self.task)

    def update_image_infos(self, infos: dict[str, dict[str, Any]]) -> None:
        """Merge ``infos`` into many images' info with one write of the datastore file.

        The read, the merge and the write happen under the datastore's file lock:
        the training and scoring subprocesses write scores while the server records
        hand-outs, and neither may lose the other's update.
        """
        from filelock import FileLock
        from monailabel.datastore.local import LocalDatastoreModel

        with self._info_lock, FileLock(self._lock_file):
            path = self._datastore_config_path
            if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
                with open(path) as fp:
                    self._datastore = LocalDatastoreModel.model_validate_json(fp.read())
                self._datastore.base_path = self._datastore_path
                self._config_ts = os.stat(path).st_mtime
            for image_id, info in infos.items():
                obj = self._datastore.objects.get(image_id)
                if obj is not None:
                    obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    def image_infos(self) -> dict[str, dict[str, Any]]:
        """Every image's info (scores, reservations)."""
        self._init_from_datastore_file()
        return {k: dict(v.image.info) for k, v in self._datastore.objects.items()}


class LocalClassificationDatastore(ClassificationLabels, LocalDatastore):
    """A folder of images (PNG, JPEG, DICOM files, NIfTI, NRRD, ...) with JSON labels."""

    def __init__(self, studies: str, task: Task) -> None:
        self.task = task
        LocalDatastore.__init__(self, studies, extensions=IMAGE_PATTERNS,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def save_label(self, image_id, label_filename, label_tag, label_info):  # noqa: D102
        return self._store_label(image_id, label_filename, label_tag, label_info)


class DICOMwebClassificationDatastore(ClassificationLabels, DICOMWebDatastore):
    """Series from a DICOMweb PACS (e.g. Orthanc), any modality; labels kept in the app's cache.

    MONAI Label's DICOMweb datastore turns labels into DICOM SEG objects on the
    PACS; an image-level class is not a segmentation, so the JSON labels stay in
    the local cache datastore (``datastore_v2.json`` under the cache path), keyed
    by Series Instance UID. Series are read as DICOM (no NIfTI conversion), so
    2D modalities (CR, DX, MG, US) work as well as volumes.
    """

    def __init__(self, client, task: Task, search_filter: dict, cache_path: str | None) -> None:
        self.task = task
        DICOMWebDatastore.__init__(self, client=client, search_filter=search_filter, cache_path=cache_path,
                                   fetch_by_frame=False, convert_to_nifti=False)

    # Series that are not images (the node's SRs, segmentations, presentation states...).
    NOT_IMAGES = frozenset({"SR", "SEG", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "DOC",
                            "OT-SR"})

    def list_images(self) -> list[str]:  # noqa: D102
        now = time.monotonic()
        cached = getattr(self, "_series_cache", None)
        if cached and now - cached[0] < 10:
            return cached[1]
        from pydicom import Dataset

        series = []
        for js in self._client.search_for_series(search_filters=self._search_filter):
            d = Dataset.from_json(js)
            if str(d.get("Modality", "")).upper() not in self.NOT_IMAGES:
                series.append(str(d.SeriesInstanceUID))
        self._series_cache = (now, series)
        return series

    def get_image_uri(self, image_id: str) -> str:  # noqa: D102
        try:
            uri = DICOMWebDatastore.get_image_uri(self, image_id)
        except OSError as e:  # requests' HTTP and connection errors
            # A 502 naming the series, not a bare 500: the PACS, not the app, refused.
            raise HTTPException(status_code=502, detail=f"the PACS could not send series {image_id}: {e}. "
                                                        "check that the PACS can serve it over WADO-RS") from None
        self._register(image_id)  # record the series so labels and scores can refer to it
        return uri

    def _register(self, image_id: str) -> None:
        from monailabel.datastore.local import DataModel, ImageLabelModel

        if image_id in self._datastore.objects:  # the usual case: no lock, no file read
            return
        with self._info_lock:
            self._init_from_datastore_file()
            if image_id not in self._datastore.objects:
                self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info={"name": image_id}, ext=""))
                self._update_datastore_file()

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):  # noqa: D102
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"no series {image_id!r} on the PACS")
        self._register(image_id)
        return self._store_label(image_id, label_filename, label_tag, label_info)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:  # noqa: D102
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def get_labeled_images(self, label_tag=None, labels=None):  # noqa: D102
        on_pacs = set(self.list_images())
        return [i for i in LocalDatastore.get_labeled_images(self) if i in on_pacs]

    def get_unlabeled_images(self, label_tag=None, labels=None):  # noqa: D102
        done = set(LocalDatastore.get_labeled_images(self))
        return [i for i in self.list_images() if i not in done]

    def datalist(self, full_path=True):  # noqa: D102
        return [{"image": self.get_image_uri(i), "label": self.get_label_uri(i, DefaultLabelTag.FINAL)}
                for i in self.get_labeled_images()]
