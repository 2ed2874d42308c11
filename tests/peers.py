"""Real DICOM peers in subprocesses, for the node's tests and benchmarks.

Each peer runs with its own configuration and folders, on free loopback ports
(``127.0.0.1``), is started with :meth:`PeerProcess.start` (which returns once the
peer answers) and stopped with :meth:`PeerProcess.stop` (SIGTERM to its process
group, then SIGKILL if it does not exit). Every peer is also a context manager.

- :class:`Orthanc` — Debian's Orthanc PACS, with a generated ``orthanc.json`` and a
  small REST client (upload, lookup, read back instances); optionally DICOM TLS.
- :class:`DcmtkStoreSCP` — dcmtk's ``storescp`` writing to a folder, optionally
  ``--fork`` (one process per association) and TLS.
- :class:`PynetdicomStoreSCP` — pynetdicom's ``storescp`` application.
- :class:`NodeProcess` — ``medclass node`` itself in a subprocess (for ``kill -9``).
- :class:`TritonServer` — NVIDIA's ``tritonserver`` (from the ``nvidia-pytriton`` wheel)
  serving an exported model repository, with its HTTP health, gRPC and metrics ports.

Every dcmtk process gets ``TCP_NODELAY=1`` in its environment (:func:`dcmtk_env`):
without it Debian's dcmtk waits on Nagle's algorithm and moves about 11 instances/s.
"""

from __future__ import annotations

import base64
import io
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
from typing import Any, Callable, TypeVar

HOST = "127.0.0.1"
#: Debian's orthanc-dicomweb package installs the plugin here.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

T = TypeVar("T")
P = TypeVar("P", bound="PeerProcess")

__all__ = ["HOST", "DcmtkStoreSCP", "NodeProcess", "Orthanc", "PeerError", "PeerProcess", "PynetdicomStoreSCP",
           "TritonServer", "dcmtk_env", "free_port", "have_dcmtk", "orthanc_executable", "port_open", "tritonserver_dist", "wait_for"]


class PeerError(RuntimeError):
    """A peer did not start, exited, or a condition was not reached in time."""


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on at the moment (the OS picks it).

    Parameters
    ----------
    host : str
        The address to bind to while picking.

    Returns
    -------
    int
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> T:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    Parameters
    ----------
    predicate : callable
        Called without arguments; exceptions propagate.
    timeout : float
        Seconds before giving up.
    interval : float
        Seconds between calls.
    what : str
        Named in the error.

    Raises
    ------
    PeerError
        ``predicate`` stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise PeerError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def dcmtk_env() -> dict[str, str]:
    """This process's environment with ``TCP_NODELAY=1`` (Debian's dcmtk waits on Nagle without it)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def have_dcmtk() -> bool:
    """Whether dcmtk's ``storescu`` and ``storescp`` are on PATH."""
    return shutil.which("storescu") is not None and shutil.which("storescp") is not None


def orthanc_executable() -> str | None:
    """Orthanc's executable (Debian installs it in ``/usr/sbin``), or ``None``."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None


class PeerProcess:
    """A server in a subprocess of its own session, its output in ``root/<name>.log``.

    Subclasses give :meth:`command` and may override :meth:`ready` (default: the
    DICOM port accepts connections).

    Parameters
    ----------
    root : Path
        The peer's folder (created); its log and data live there.
    port : int, optional
        The DICOM port (default: a free one).
    """

    name = "peer"
    #: Whether children of the peer may outlive it (their group is killed after the leader exits).
    group_outlives_leader = False

    def __init__(self, root: str | Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.root / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self._log: Any = None

    def command(self) -> list[str]:
        """The command line that runs the peer."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The peer's environment (default: :func:`dcmtk_env`)."""
        return dcmtk_env()

    def prepare(self) -> None:
        """Write what the peer needs before it starts (configuration files)."""

    def ready(self) -> bool:
        """Whether the peer serves (default: its DICOM port accepts connections)."""
        return port_open(self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, tail: int = 3000) -> str:
        """The end of the peer's log."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def start(self: P, timeout: float = 60.0) -> P:
        """Start the peer and wait until it serves.

        Raises
        ------
        PeerError
            The peer exited, or did not serve within ``timeout`` seconds (it is stopped then).
        """
        if self.running:
            return self
        self.prepare()
        self._log = open(self.log_path, "ab")
        # A session of its own: stop() signals the whole group (storescp --fork children too).
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.environment(), start_new_session=True)

        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise PeerError(f"{self.name} exited ({code}) before serving: {self.log_text()}")
            return self.ready()

        try:
            wait_for(up, timeout, 0.1, f"{self.name} to serve on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def kill9(self) -> None:
        """SIGKILL the peer's main process (no clean-up), as a crash would."""
        if self.running:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the peer's process group, SIGKILL it if it has not exited after ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(10)
            if self.group_outlives_leader:
                # Children of the group (storescp --fork) that outlived the leader.
                self._signal(proc, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self: P) -> P:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Orthanc(PeerProcess):
    """Debian's Orthanc with its own ``orthanc.json``, storage and index under ``root``.

    HTTP (the REST API) and DICOM on free loopback ports; HTTP answers loopback only.

    Parameters
    ----------
    root : Path
    modalities : dict, optional
        Orthanc's ``DicomModalities``: ``{"name": [AET, host, port]}``.
    aet : str
        Orthanc's own AE title.
    dicom_port, http_port : int, optional
        Default: free ports.
    tls : dict, optional
        DICOM TLS: ``{"cert": PEM, "key": PEM, "trusted": PEM of the peers' certificates}``, and
        optionally ``"require_client_cert"`` (default ``True``). Orthanc then speaks TLS only,
        both when it receives and when it sends.
    dicomweb : bool
        Load Debian's DICOMweb plugin (``orthanc-dicomweb``): STOW-RS, QIDO-RS and WADO-RS under
        :attr:`dicomweb_url`.
    users : dict, optional
        ``{"name": "password"}``: Orthanc's ``RegisteredUsers`` with ``AuthenticationEnabled``, so
        every HTTP request (REST and DICOMweb) needs basic authentication; the REST helpers
        here log in as the first user.
    **settings
        Any other Orthanc setting, added to (or replacing) the generated configuration.
    """

    name = "orthanc"

    def __init__(self, root: str | Path, modalities: dict[str, list] | None = None, aet: str = "ORTHANC",
                 dicom_port: int | None = None, http_port: int | None = None, tls: dict[str, Any] | None = None,
                 dicomweb: bool = False, users: dict[str, str] | None = None, **settings: Any) -> None:
        super().__init__(root, dicom_port)
        self.aet = aet
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})
        self.tls = tls
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.settings = settings
        self.config_path = self.root / "orthanc.json"
        self.version: str | None = None

    @property
    def dicom_port(self) -> int:
        return self.port

    def configuration(self) -> dict[str, Any]:
        """The generated ``orthanc.json``."""
        cfg: dict[str, Any] = {
            "Name": "medclass-peer", "DicomAet": self.aet, "DicomPort": self.port, "HttpPort": self.http_port,
            "StorageDirectory": str(self.root / "storage"), "IndexDirectory": str(self.root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomModalities": self.modalities, "Plugins": [], "SaveJobs": False, "HttpsCACertificates": "",
            "StableAge": 1, "DicomScuTimeout": 60, "ConcurrentJobs": 1,
        }
        if self.tls:
            cfg.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(self.tls["cert"]),
                        "DicomTlsPrivateKey": str(self.tls["key"]),
                        "DicomTlsTrustedCertificates": str(self.tls["trusted"]),
                        "DicomTlsRemoteCertificateRequired": bool(self.tls.get("require_client_cert", True))})
        if self.dicomweb:
            plugin = Path(DICOMWEB_PLUGIN)
            if not plugin.is_file():
                raise PeerError(f"Orthanc's DICOMweb plugin is not installed ({plugin}; Debian: apt-get install "
                                "orthanc-dicomweb)")
            cfg["Plugins"] = [str(plugin)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.users:
            cfg.update({"AuthenticationEnabled": True, "RegisteredUsers": self.users})
        cfg.update(self.settings)
        return cfg

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS posts to ``{dicomweb_url}/studies``)."""
        return self.url("/dicom-web")

    def command(self) -> list[str]:
        exe = orthanc_executable()
        if exe is None:
            raise PeerError("Orthanc is not installed (Debian: apt-get install orthanc)")
        return [exe, str(self.config_path)]

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self) -> None:
        self.config_path.write_text(json.dumps(self.configuration(), indent=1))

    def ready(self) -> bool:
        try:
            self.version = self.get("/system")["Version"]
            return True
        except OSError:
            return False

    # ------------------------------------------------------------------ REST

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.http_port}{path}"

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> urllib.request.Request:
        req = urllib.request.Request(self.url(path), data=data, method=method)
        if self.users:  # log in as the first registered user
            name, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode())
        return req

    def get(self, path: str, raw: bool = False) -> Any:
        """GET a REST resource: parsed JSON, or bytes with ``raw``."""
        with urllib.request.urlopen(self._request(path), timeout=30) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path: str, body: Any, timeout: float = 120) -> Any:
        """POST JSON (or bytes, or text, sent as they are); returns the parsed answer."""
        data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        with urllib.request.urlopen(self._request(path, data, "POST"), timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def upload(self, path: str | Path) -> dict:
        """Store a DICOM file through the REST API (``POST /instances``)."""
        return self.post("/instances", Path(path).read_bytes(), timeout=60)

    def lookup(self, uid: str) -> list:
        """Orthanc's resources with this DICOM UID (``/tools/lookup``)."""
        return self.post("/tools/lookup", uid, timeout=30)

    def datasets(self, modality: str | None = None) -> list:
        """Every instance Orthanc holds (of ``modality`` when given), read back as pydicom datasets."""
        import pydicom

        out = []
        for iid in self.get("/instances"):
            if modality is not None and self.get(f"/instances/{iid}/simplified-tags").get("Modality") != modality:
                continue
            out.append(pydicom.dcmread(io.BytesIO(self.get(f"/instances/{iid}/file", raw=True))))
        return out


class DcmtkStoreSCP(PeerProcess):
    """dcmtk's ``storescp``, writing what it receives to ``root/received``.

    Parameters
    ----------
    root : Path
    aet : str
        Its AE title.
    port : int, optional
    accept_all : bool
        ``+xa``: accept every transfer syntax (default: uncompressed only).
    fork : bool
        ``--fork``: one process per association.
    debug : bool
        ``-d``: log every message (priorities, transfer syntaxes) to the log file.
    tls : dict, optional
        ``{"cert": PEM, "key": PEM, "trusted": [PEM, ...]}``: accept TLS associations only,
        from peers whose certificate is among ``trusted`` (dcmtk requires a client certificate).
    """

    name = "storescp"

    def __init__(self, root: str | Path, aet: str = "STORESCP", port: int | None = None, accept_all: bool = False,
                 fork: bool = False, debug: bool = False, tls: dict[str, Any] | None = None) -> None:
        super().__init__(root, port)
        self.aet, self.accept_all, self.fork, self.debug, self.tls = aet, accept_all, fork, debug, tls
        self.group_outlives_leader = fork
        self.out = self.root / "received"
        self.out.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        args = ["storescp", "-aet", self.aet, "-od", str(self.out)]
        args += ["-d"] if self.debug else []
        args += ["+xa"] if self.accept_all else []
        args += ["--fork"] if self.fork else []
        if self.tls:
            args += ["+tls", str(self.tls["key"]), str(self.tls["cert"])]
            for trusted in self.tls.get("trusted", []):
                args += ["+cf", str(trusted)]
        return [*args, str(self.port)]

    def received(self) -> list[Path]:
        """The files stored so far (sorted)."""
        return sorted(p for p in self.out.rglob("*") if p.is_file() and not p.name.startswith("."))


class PynetdicomStoreSCP(PeerProcess):
    """pynetdicom's ``storescp`` application (``python -m pynetdicom storescp``), writing to ``root/received``.

    Parameters
    ----------
    root : Path
    aet : str
    port : int, optional
    python : str, optional
        The interpreter (default: this one).
    """

    name = "pynetdicom-storescp"

    def __init__(self, root: str | Path, aet: str = "STORESCP", port: int | None = None,
                 python: str | None = None) -> None:
        super().__init__(root, port)
        self.aet, self.python = aet, python or sys.executable
        self.out = self.root / "received"
        self.out.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [self.python, "-m", "pynetdicom", "storescp", "-ba", HOST, "-od", str(self.out), "-aet", self.aet,
                str(self.port)]

    def received(self) -> list[Path]:
        """The files stored so far (sorted)."""
        return sorted(p for p in self.out.rglob("*") if p.is_file() and not p.name.startswith("."))


class NodeProcess(PeerProcess):
    """``medclass node ARGS`` in a subprocess (``--port`` and ``--bind`` are added).

    Parameters
    ----------
    root : Path
        Holds the log (``node.log``); pass ``--data-dir`` in ``args`` for the data.
    args : list of str
        Arguments of ``medclass node``.
    port : int, optional
    python : str, optional
        The interpreter (default: this one).
    """

    name = "node"

    def __init__(self, root: str | Path, args: list[str], port: int | None = None,
                 python: str | None = None) -> None:
        super().__init__(root, port)
        self.args, self.python = list(args), python or sys.executable

    def command(self) -> list[str]:
        return [self.python, "-m", "medclass", "node", "--port", str(self.port), "--bind", HOST, *self.args]

    def ready(self) -> bool:
        """The node has printed its start line: every ingest process listens (not only the first)."""
        try:
            return f"on port {self.port}," in self.log_path.read_text(errors="replace")
        except OSError:
            return False


# --------------------------------------------------------------------------- Triton Inference Server


def tritonserver_dist() -> Path | None:
    """The folder of the ``tritonserver`` build shipped inside the ``nvidia-pytriton`` wheel (None without it)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").is_file() else None


class TritonServer(PeerProcess):
    """NVIDIA's ``tritonserver`` (2.51, from the ``nvidia-pytriton`` wheel) serving a model repository.

    The real server binary with its Python backend: a repository exported with
    ``medclass export --format triton --backend python`` runs its ONNX file with onnxruntime
    inside the backend's stub process. Clients drive it only through ``tritonclient``, as
    they would drive NVIDIA's container.

    Parameters
    ----------
    root : Path
        The peer's folder: its log, and the server's backend folder (the wheel's backends
        plus the stub for this interpreter's Python version).
    repository : Path
        The model repository (``--model-repository``).
    grpc_port, http_port, metrics_port : int, optional
        Loopback ports (default: free ones). :attr:`port` is the gRPC port.

    Notes
    -----
    Two things the stub needs from its environment:

    - ``LD_LIBRARY_PATH`` starting with this interpreter's ``LIBDIR``: the stub links
      ``libpython3.X``, and the system's copy next to another build's standard library fails
      with ``'_thread.RLock' object has no attribute '_recursion_count'``;
    - ``PYTHONPATH`` with this environment's ``site-packages`` (numpy, onnxruntime), because
      the embedded interpreter starts from the base installation, not from the virtual
      environment.
    """

    name = "tritonserver"

    def __init__(self, root: str | Path, repository: str | Path, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None) -> None:
        super().__init__(root, grpc_port)
        self.repository = Path(repository)
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        dist = tritonserver_dist()
        if dist is None:
            raise PeerError("tritonserver is not installed (pip install -e '.[triton]' from the clone, or make install)")
        self.dist = dist

    @property
    def grpc_address(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, model: str) -> str:
        """The ``--inference`` URL of ``model`` on this server."""
        return f"triton://{HOST}:{self.port}/{model}"

    def prepare(self) -> None:
        # pytriton's own layout: the wheel's backends, and the stub built for this Python version
        # copied into the python backend's folder (the wheel ships one stub per Python version).
        backends = self.root / "backends"
        if not backends.exists():
            shutil.copytree(self.dist / "backends", backends)
            version = f"{sys.version_info[0]}.{sys.version_info[1]}"
            stub = self.dist / "python_backend_stubs" / version / "triton_python_backend_stub"
            shutil.copy(stub, backends / "python" / "triton_python_backend_stub")

    def command(self) -> list[str]:
        return [str(self.dist / "bin" / "tritonserver"), "--model-repository", str(self.repository),
                "--backend-directory", str(self.root / "backends"), "--cache-directory",
                str(self.dist / "caches"), "--grpc-address", HOST, "--grpc-port", str(self.port),
                "--http-address", HOST, "--http-port", str(self.http_port), "--metrics-port",
                str(self.metrics_port), "--allow-metrics", "true", "--allow-gpu-metrics", "false",
                "--log-verbose", "0", "--exit-timeout-secs", "5"]

    def environment(self) -> dict[str, str]:
        import site
        import sysconfig

        env = dict(os.environ)
        # The interpreter's own libpython first; then the wheel's bundled libraries, which the copied
        # backends no longer find through their relative RPATH.
        libs = [sysconfig.get_config_var("LIBDIR"), str(self.dist.parent.parent / "nvidia_pytriton.libs"),
                env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        paths = [*site.getsitepackages(), str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def ready(self) -> bool:
        """Triton's HTTP health endpoint: the server and every model in the repository are ready."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 120.0) -> TritonServer:
        return super().start(timeout)

    def metrics(self) -> dict[str, float]:
        """Triton's Prometheus metrics, summed over labels: ``{name: value}``."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out
