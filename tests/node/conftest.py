"""Fixtures of the DICOM node tests: a small checkpoint, real DICOM files, and real peers
(Orthanc, dcmtk, the node in a subprocess; :mod:`peers` (tests/peers.py)) on free loopback ports,
each stopped by its fixture."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from peers import (
    HOST,
    DcmtkStoreSCP,
    NodeProcess,
    Orthanc,
    dcmtk_env,
    free_port,
    orthanc_executable,
)
from peers import wait_for as wait_until
from pydicom.data import get_testdata_file

__all__ = ["HOST", "child_processes", "copy_study", "dcmtk_env", "free_port", "ingest_helpers", "needs_dcmtk",
           "needs_orthanc", "pool_processes", "storescu", "study_state", "wait_until"]

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
needs_orthanc = pytest.mark.skipif(orthanc_executable() is None, reason="Orthanc is not installed")


_PROPOSE = {"1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.70": "-xs"}


def storescu(port: int, paths, aet: str = "STORESCU", called: str = "MEDCLASS") -> subprocess.CompletedProcess:
    """dcmtk storescu, one association per transfer syntax, proposing each file's own (compressed) syntax."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        ts = str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_PROPOSE.get(ts, "-x="), []).append(str(p))
    result = None
    for flag, files in groups.items():
        result = subprocess.run(["storescu", "-R", flag, "-aet", aet, "-aec", called, HOST, str(port), *files],
                                capture_output=True, text=True, timeout=120, env=dcmtk_env())
        if result.returncode != 0:
            return result
    return result


def child_processes(pid: int) -> dict[int, str]:
    """The processes ``pid`` started, with their command lines."""
    out = subprocess.run(["pgrep", "-a", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(line.split(" ", 1)[0]): line.split(" ", 1)[1] for line in out.splitlines() if " " in line}


def ingest_helpers(pid: int) -> list[int]:
    """The node's ingest processes (``python -m dicom_node.ingest``), not its preparing pool."""
    return [p for p, cmd in child_processes(pid).items() if "dicom_node.ingest" in cmd]


def pool_processes(pid: int) -> list[int]:
    """The node's preparing pool (dicom_node.prepare: multiprocessing's spawned processes)."""
    return [p for p, cmd in child_processes(pid).items() if "multiprocessing" in cmd]


def study_state(node, study_uid: str) -> str | None:
    rows = node.db.query("SELECT state FROM studies WHERE study_uid=?", (study_uid,))
    return rows[0]["state"] if rows else None


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny resnet18 on the 16 paediatric chest X-rays (normal / pneumonia, SNOMED CT codes)."""
    from medclass.training import TrainConfig, train

    out = tmp_path_factory.mktemp("node-model")
    res = train(TrainConfig(data="chest-pneumonia", model="resnet18", image_size=32, epochs=1, device="cpu",
                            progress=False, out=str(out)))
    return Path(res.checkpoint)


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory) -> list[Path]:
    """A 4-instance CT study from CT_small.dcm: two series, one instance JPEG-LS (dcmcjpls) and one RLE (dcmcrle)."""
    d = tmp_path_factory.mktemp("ct-study")
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study = pydicom.uid.generate_uid()
    series = [pydicom.uid.generate_uid(), pydicom.uid.generate_uid()]
    paths = []
    for i in range(4):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series[i // 2]
        ds.SeriesNumber = i // 2 + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        p = d / f"ct{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    if shutil.which("dcmcjpls"):
        subprocess.run(["dcmcjpls", str(paths[1]), str(d / "ct1_jls.dcm")], check=True, env=dcmtk_env())
        paths[1] = d / "ct1_jls.dcm"
    if shutil.which("dcmcrle"):
        subprocess.run(["dcmcrle", str(paths[3]), str(d / "ct3_rle.dcm")], check=True, env=dcmtk_env())
        paths[3] = d / "ct3_rle.dcm"
    return paths


def copy_study(paths: list[Path], out: Path) -> list[Path]:
    """The same images as a new study (new study/series/instance UIDs), keeping the transfer syntax."""
    out.mkdir(parents=True, exist_ok=True)
    study = pydicom.uid.generate_uid()
    series: dict[str, str] = {}
    res = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), pydicom.uid.generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        q = out / p.name
        ds.save_as(q)
        res.append(q)
    return res


@pytest.fixture
def orthanc_factory(tmp_path):
    """Build Orthancs (:class:`peers.Orthanc`); every one is stopped at the end of the test."""
    made: list[Orthanc] = []

    def make(modalities: dict[str, list], start: bool = True, **kw) -> Orthanc:
        o = Orthanc(tmp_path / f"orthanc{len(made)}", modalities, **kw)
        made.append(o)
        return o.start() if start else o

    yield make
    for o in made:
        o.stop()


def pytest_generate_tests(metafunc):
    # A test marked both_paths runs on the C-STORE fast path and on pynetdicom's own (fast_path = false).
    if "node_factory" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_paths"):
        metafunc.parametrize("c_store_path", ["fast-path", "pynetdicom-path"], indirect=True)


@pytest.fixture
def c_store_path(request) -> str:
    """``fast-path`` (the default) or ``pynetdicom-path``: which C-STORE path ``node_factory`` nodes run."""
    return getattr(request, "param", "fast-path")


@pytest.fixture
def node_factory(tmp_path, checkpoint, c_store_path):
    """Start in-process nodes on free loopback ports; every one is stopped at the end of the test.

    Nodes run the C-STORE path of ``c_store_path`` (tests marked ``both_paths`` run on each).
    """
    from dicom_node.config import NodeConfig
    from dicom_node.node import DicomNode

    made: list[DicomNode] = []

    def make(**kw) -> DicomNode:
        values = dict(ae_title="MEDCLASS", port=free_port(), bind=HOST, data_dir=str(tmp_path / f"node{len(made)}"),
                      checkpoint=str(checkpoint), stable_seconds=1.0, device="cpu", retry_base_seconds=0.5,
                      retry_max_seconds=2.0,
                      # The test model is a chest X-ray model and the test files are CT, MR and MG: these tests
                      # are about the node's plumbing. The modality check has its own tests (test_modality_scope.py).
                      classify_any_modality=True, fast_path=c_store_path == "fast-path",
                      # Preparing on arrival starts a pool of processes (each loads torch); its own tests are
                      # tests/node/test_prepare.py, the other tests run the worker's inline path.
                      preprocess_on_arrival=False)
        values.update(kw)
        node = DicomNode(NodeConfig(**values), poll_seconds=0.1)
        made.append(node)
        return node.start()

    yield make
    for n in made:
        n.stop()


@pytest.fixture
def node_process(tmp_path):
    """``medclass node`` in subprocesses (:class:`peers.NodeProcess`), stopped at the end."""
    made: list[NodeProcess] = []

    def make(args: list[str], port: int) -> NodeProcess:
        p = NodeProcess(tmp_path / f"node-process{len(made)}", args, port=port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def storescp_factory(tmp_path):
    """Start dcmtk storescp peers (debug log kept for inspection); every one is stopped at the end."""
    made: list[DcmtkStoreSCP] = []

    def make(aet: str, accept_all: bool = False, **kw) -> DcmtkStoreSCP:
        scp = DcmtkStoreSCP(tmp_path / f"storescp-{aet.lower()}", aet, accept_all=accept_all, debug=True, **kw)
        made.append(scp)
        return scp.start()

    yield make
    for scp in made:
        scp.stop()
