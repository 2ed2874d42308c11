"""The MONAI Label app over a DICOMweb datastore: a real Orthanc with its DICOMweb plugin.

Series of several modalities (CT, MR, CR, US) are the images; an SR series on
the same PACS is not offered for labelling. Labels stay in the app's cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from peers import Orthanc, orthanc_executable
from pydicom.data import get_testdata_file

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb
# Uncompressed US: Debian's Orthanc 1.10 answers WADO-RS for a JPEG 2000 series with HTTP 500.
FILES = ["CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "emri_small.dcm"]

pytestmark = pytest.mark.skipif(orthanc_executable() is None or not PLUGIN.exists(),
                                reason="needs Debian's orthanc and orthanc-dicomweb (make debian-tools)")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc-dicomweb")
    orthanc = Orthanc(root, Plugins=[str(PLUGIN)], DicomWeb={"Enable": True, "Root": "/dicom-web/"})
    with orthanc.start():
        series = {}
        for name in FILES:
            r = orthanc.upload(get_testdata_file(name))
            series[name] = orthanc.get(f"/series/{r['ParentSeries']}")["MainDicomTags"]["SeriesInstanceUID"]
        yield orthanc, series


@pytest.fixture(scope="module")
def server(pacs, trained, tmp_path_factory, label_server_launcher):
    start_label_server, stop_label_server = label_server_launcher
    orthanc, _ = pacs
    base = tmp_path_factory.mktemp("label-dicomweb")
    (base / "work").mkdir()
    proc, url = start_label_server(base / "work", base / "models", base / "server.log",
                                   {"models": "resnet18", "checkpoint": str(trained / "model.pt")},
                                   env={"MONAI_LABEL_DATASTORE_CACHE_PATH": str(base / "cache"),
                                        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(base / "cache")},
                                   studies_url=orthanc.url("/dicom-web"))
    try:
        yield url
    finally:
        stop_label_server(proc)


def test_every_image_series_of_every_modality_is_listed(pacs, server):
    _, series = pacs
    ds = requests.get(f"{server}/datastore/?output=stats", timeout=60).json()
    assert ds["total"] == len(FILES), (ds, pacs[0].get("/series"))


def test_infer_and_label_a_series(pacs, server):
    _, series = pacs
    uid = series["MR_small.dcm"]
    r = requests.post(f"{server}/infer/resnet18", params={"image": uid, "output": "json"}, timeout=120)
    assert r.status_code == 200, r.text
    probs = r.json()["probabilities"]
    assert sum(probs.values()) == pytest.approx(1, abs=1e-4)
    classes = sorted(probs)
    put = requests.put(f"{server}/datastore/label", params={"image": uid, "tag": "final"},
                       files={"label": ("label.json", json.dumps({"label": classes[0]}), "application/json")},
                       timeout=60)
    assert put.status_code == 200, put.text
    bad = requests.put(f"{server}/datastore/label", params={"image": uid, "tag": "final"},
                       files={"label": ("label.json", json.dumps({"label": "nodule"}), "application/json")},
                       timeout=60)
    assert bad.status_code == 422 and "unknown class" in bad.json()["detail"]
    stats = requests.get(f"{server}/datastore/?output=stats", timeout=60).json()
    assert stats["completed"] == 1
    nxt = requests.post(f"{server}/activelearning/random", json={"client_id": "a"}, timeout=60).json()
    assert nxt["id"] in set(series.values()) - {uid}
