"""Fixtures of the DICOM node tests: a small checkpoint, real DICOM files, and real peers
(Orthanc, dcmtk) on free loopback ports, each stopped by its fixture."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

HOST = "127.0.0.1"

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
needs_orthanc = pytest.mark.skipif(shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists(),
                                   reason="Orthanc is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY Debian's dcmtk waits on Nagle (~70x slower).
    return {**os.environ, "TCP_NODELAY": "1"}


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


class Orthanc:
    """A real Orthanc PACS in a subprocess, with its own config on free loopback ports."""

    def __init__(self, root: Path, modalities: dict[str, list], aet: str = "ORTHANC",
                 dicom_port: int | None = None, http_port: int | None = None) -> None:
        self.root, self.aet = root, aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "medclass-test", "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomModalities": modalities, "Plugins": [], "SaveJobs": False, "HttpsCACertificates": "",
            "StableAge": 1, "DicomScuTimeout": 60, "ConcurrentJobs": 1,
        }))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self.log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._up, 30, 0.2, "Orthanc to start")
        return self

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.http_port}{path}"

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path: str, body) -> object:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def upload(self, path: Path) -> dict:
        req = urllib.request.Request(self.url("/instances"), data=Path(path).read_bytes(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def sr_instances(self) -> list[pydicom.Dataset]:
        """Every SR instance Orthanc holds, read back through its REST API."""
        out = []
        for iid in self.get("/instances"):
            tags = self.get(f"/instances/{iid}/simplified-tags")
            if tags.get("Modality") == "SR":
                import io

                out.append(pydicom.dcmread(io.BytesIO(self.get(f"/instances/{iid}/file", raw=True))))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def orthanc_factory(tmp_path):
    """Build Orthancs; every one is stopped at the end of the test."""
    made: list[Orthanc] = []

    def make(modalities: dict[str, list], start: bool = True, **kw) -> Orthanc:
        o = Orthanc(tmp_path / f"orthanc{len(made)}", modalities, **kw)
        made.append(o)
        return o.start() if start else o

    yield make
    for o in made:
        o.stop()


@pytest.fixture
def node_factory(tmp_path, checkpoint):
    """Start in-process nodes on free loopback ports; every one is stopped at the end of the test."""
    from dicom_node.config import NodeConfig
    from dicom_node.node import DicomNode

    made: list[DicomNode] = []

    def make(**kw) -> DicomNode:
        values = dict(ae_title="MEDCLASS", port=free_port(), bind=HOST, data_dir=str(tmp_path / f"node{len(made)}"),
                      checkpoint=str(checkpoint), stable_seconds=1.0, device="cpu", retry_base_seconds=0.5,
                      retry_max_seconds=2.0)
        values.update(kw)
        node = DicomNode(NodeConfig(**values), poll_seconds=0.1)
        made.append(node)
        return node.start()

    yield make
    for n in made:
        n.stop()


class NodeProcess:
    """``medclass node`` in a subprocess (for kill -9)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log_path = args, log
        self.proc: subprocess.Popen | None = None

    def start(self, port: int) -> NodeProcess:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "medclass", "node", *self.args], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self._listening(port), 60, 0.2, "the node to listen")
        return self

    def _listening(self, port: int) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited: {self.log_path.read_text()[-3000:]}")
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((HOST, port)) == 0

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def node_process(tmp_path):
    made: list[NodeProcess] = []

    def make(args: list[str]) -> NodeProcess:
        p = NodeProcess(args, tmp_path / f"node-process{len(made)}.log")
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


class StoreSCP:
    """dcmtk's storescp (a workstation or archive the node forwards to), debug log kept for inspection."""

    def __init__(self, root: Path, aet: str, accept_all: bool) -> None:
        self.root, self.aet, self.port = root, aet, free_port()
        self.out = root / "received"
        self.out.mkdir(parents=True)
        self.log_path = root / "storescp.log"
        args = ["storescp", "-d", "-aet", aet, "-od", str(self.out), *(["+xa"] if accept_all else []), str(self.port)]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=dcmtk_env())
        wait_until(self._listening, 30, 0.1, f"storescp {aet} to listen")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"storescp exited: {self.log_path.read_text()[-2000:]}")
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((HOST, self.port)) == 0

    def received(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def storescp_factory(tmp_path):
    """Start dcmtk storescp peers on free loopback ports; every one is stopped at the end of the test."""
    made: list[StoreSCP] = []

    def make(aet: str, accept_all: bool = False) -> StoreSCP:
        scp = StoreSCP(tmp_path / f"storescp-{aet.lower()}", aet, accept_all)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.stop()
