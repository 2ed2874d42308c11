"""The --data specification on the real sets that install offline."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from medclass.data import load_dataset, materialize, split_samples
from medclass.errors import MedClassError
from medclass.transforms import DEFAULT_SPEC

SPEC = {**DEFAULT_SPEC, "image_size": 32}


def test_builtin_br35h_is_balanced_binary():
    ds = load_dataset("br35h")
    assert len(ds) == 3000
    assert ds.task.type == "binary" and ds.task.classes == ["no tumour", "tumour"]
    assert np.bincount(ds.labels()).tolist() == [1500, 1500]
    assert ds.class_codes["tumour"][1] == "126952004"


def test_split_is_deterministic_stratified_and_disjoint():
    ds = load_dataset("br35h")
    a, b = split_samples(ds, seed=0), split_samples(ds, seed=0)
    assert a == b
    assert split_samples(ds, seed=1)["test"] != a["test"]
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert sum(map(len, sets)) == 3000 and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(a["test"]) == 450
    assert np.bincount(ds.labels()[a["test"]]).tolist() == [225, 225]


def test_split_groups_by_patient():
    ds = load_dataset("cbis-mammo")  # 2 patients x 4 views
    sp = split_samples(ds)
    for part in sp.values():
        patients = {ds.samples[i].patient_id for i in part}
        others = {ds.samples[i].patient_id for p2 in sp.values() if p2 is not part for i in p2}
        assert not patients & others


def test_chest_pneumonia_labels_from_file_names():
    ds = load_dataset("chest-pneumonia")
    assert len(ds) == 16 and np.bincount(ds.labels()).tolist() == [8, 8]
    assert all((s.label == 0) == s.key.upper().startswith("NORMAL") for s in ds.samples)


def test_folder_csv_and_npz_sources_agree(tmp_path, br35h_dir):
    files = sorted((br35h_dir / "no").glob("*.jpg"))[:6] + sorted((br35h_dir / "yes").glob("*.jpg"))[:6]
    root = tmp_path / "folder"
    for f in files:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / f.parent.name / f.name)
    by_folder = load_dataset(str(root))
    assert by_folder.task.classes == ["no", "yes"] and len(by_folder) == 12

    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "text", "age", "sex"])
        for i, f in enumerate(files):
            w.writerow([str(f), f.parent.name, f"p{i // 2}", "mass effect" if f.parent.name == "yes" else "", 50, "F"])
    by_csv = load_dataset(str(manifest))
    assert [s.label for s in by_csv.samples] == [s.label for s in by_folder.samples]
    assert by_csv.samples[0].patient_id == "p0" and by_csv.samples[0].tabular == {"age": "50", "sex": "F"}

    # The same images as a MedMNIST-style .npz, in its own train/val/test split.
    ts = materialize(by_folder, list(range(12)), SPEC)
    imgs = (ts.x[:, 0].numpy() * 255).astype(np.uint8)
    labels = ts.y.numpy()[:, None]
    npz = tmp_path / "brainmnist.npz"
    np.savez(npz, train_images=imgs[:8], train_labels=labels[:8], val_images=imgs[8:10], val_labels=labels[8:10],
             test_images=imgs[10:], test_labels=labels[10:])
    by_npz = load_dataset(str(npz))
    assert len(by_npz) == 12 and by_npz.task.type == "binary"
    sp = split_samples(by_npz)
    assert (len(sp["train"]), len(sp["val"]), len(sp["test"])) == (8, 2, 2)
    x = materialize(by_npz, sp["test"], SPEC).x
    assert x.shape == (2, 1, 32, 32)


def test_multilabel_and_ordinal_manifests(tmp_path, br35h_dir):
    files = sorted((br35h_dir / "yes").glob("*.jpg"))[:6]
    manifest = tmp_path / "ml.csv"
    manifest.write_text("path,label\n" + "".join(
        f"{f},{['mass', 'mass|oedema', 'oedema'][i % 3]}\n" for i, f in enumerate(files)))
    ds = load_dataset(str(manifest))
    assert ds.task.type == "multilabel" and ds.task.classes == ["mass", "oedema"]
    assert ds.samples[1].label == [1, 1]
    ordinal = tmp_path / "grades.csv"
    ordinal.write_text("path,label\n" + "".join(f"{f},{i % 3}\n" for i, f in enumerate(files)))
    ds = load_dataset(str(ordinal), "ordinal")
    assert ds.task.type == "ordinal" and ds.task.classes == ["0", "1", "2"] and ds.task.num_outputs == 2


def test_dicom_folder_with_labels_by_study(tmp_path, mammogram_paths):
    import pydicom

    root = tmp_path / "dicom"
    root.mkdir()
    rows = {}
    for i, p in enumerate(mammogram_paths):
        shutil.copy(p, root / f"im{i}")  # DICOM files often have no extension
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        rows[ds.StudyInstanceUID] = "malignant" if "malign" in str(p) else "benign"
    (root / "labels.csv").write_text("study_uid,label\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    ds = load_dataset(str(root))
    assert len(ds) == len(mammogram_paths) and ds.task.classes == ["benign", "malignant"]
    assert sum(s.label for s in ds.samples) == sum("malign" in str(p) for p in mammogram_paths)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: str(d / "nope"), "no such file, folder or built-in dataset"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "is empty"),
        (lambda d: (d / "m.csv").write_text("path,label\nmissing.jpg,a\nmissing2.jpg,b\n") and str(d / "m.csv"),
         "do not exist"),
        (lambda d: (d / "n.csv").write_text("file,label\nx,a\n") and str(d / "n.csv"), "no 'path' column"),
        (lambda d: (d / "x.npz").write_bytes(b"not a zip") and str(d / "x.npz"), "cannot read"),
        (lambda d: (d / "x.txt").write_text("x") and str(d / "x.txt"), "unsupported file type"),
    ],
)
def test_bad_data_specs_say_what_to_do(tmp_path, make, match):
    with pytest.raises(MedClassError, match=match):
        load_dataset(make(tmp_path))


def test_unreadable_images_are_skipped_and_reported(tmp_path, br35h_dir):
    root = tmp_path / "d"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for f in sorted((br35h_dir / ("no" if cls == "a" else "yes")).glob("*.jpg"))[:3]:
            shutil.copy(f, root / cls / f.name)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = load_dataset(str(root))
    ts = materialize(ds, list(range(len(ds))), SPEC)
    assert len(ts) == 6 and len(ts.skipped) == 1 and "broken.jpg" in ts.skipped[0]
