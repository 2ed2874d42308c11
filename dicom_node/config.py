"""Node configuration: embedded defaults, then ``node.toml``, then command-line flags.

A ``node.toml`` (every key optional)::

    ae_title = "MEDCLASS"
    port = 11112
    bind = "0.0.0.0"
    data_dir = "/var/lib/medclass-node"
    checkpoint = "/models/chest.pt"          # default model for every image series
    return_to = "ORTHANC@pacs.example.org:4242"  # or a DICOMweb root URL, or a [[dicomweb]] name
    stable_seconds = 10
    metrics_port = 9110                        # 0: no /metrics endpoint
    classify_any_modality = false              # true: no [[routes]] means every series, whatever the model's card says
    web_port = 8090                            # the triage desk (dicom_node.desk); 0: off
    web_bind = "127.0.0.1"                     # where the desk listens
    scp_processes = 0                          # processes accepting associations; 0: one per core, at most 4
    fast_path = true                           # the C-STORE fast path (needs the pinned pynetdicom); false: pynetdicom's own
    coverage = 0.95                            # of the conformal prediction sets ("uncertain"); 0: none
    preprocess_on_arrival = true               # decode and preprocess instances as they arrive (dicom_node.prepare)
    preprocess_workers = 0                     # processes doing it; 0: half the cores, at most 4
    inference = "triton://gpu-box:8001/chest"  # where models run: "local" (default) or a Triton server
                                               # serving 'medclass export --format triton' of the checkpoint
    dicom_decoder = "pydicom"                  # who decodes compressed pixel data: "pydicom" (pylibjpeg, GDCM),
                                               # "nvimgcodec" (NVIDIA GPU; pip install -e '.[gpu-decode]') or "auto"

    [[allow]]                                  # no [[allow]]: any calling AE is accepted
    ae_title = "ORTHANC"
    host = "10.0.0.5"                          # optional

    [[routes]]                                 # series selection; first match wins
    modality = "MG"
    checkpoint = "/models/breast.pt"
    [[routes]]
    series_description = "(?i)chest"
    checkpoint = "/models/chest.pt"
    inference = "local"                        # optional: this route's model runs here (default: inference)
    priority = "urgent"                        # optional: Triton serves this route's series first

    [[forward]]                                # triage: forward the study by result
    when = "malignant >= 0.8"                  # or "malignant at sensitivity >= 0.95", or "uncertain"
    to = "URGENT@10.0.0.9:104"
    priority = "high"

    [[dicomweb]]                               # a DICOMweb (STOW-RS) destination (dicom_node.destination)
    name = "pacs-web"                          # return_to / [[forward]] to may say "pacs-web"
    url = "https://pacs.example.org/dicom-web"
    username = "medclass"                      # basic authentication ...
    password_env = "PACS_WEB_PASSWORD"         # ... the password in this environment variable, never here
    # token_env = "PACS_WEB_TOKEN"             # or a bearer token
    ca = "pacs-ca.crt"                         # optional: CA bundle of the server's certificate
    timeout_seconds = 30

    [[users]]                                  # who may log in to the desk (viewer or admin)
    name = "admin"
    role = "admin"
    password_hash = "$2b$12$..."               # from 'medclass node hash-password'

    [tls]                                      # optional (dicom_node.tls)
    cert = "node.crt"                          # the node accepts TLS only, and shows this to peers
    key = "node.key"
    ca = "ca.crt"                              # optional: require client certificates signed by it
    peer_ca = "peers.crt"                      # optional: trust for the peers it sends to (default: ca)
    send = true                                # SR and forwards over TLS: true, false or ["AET", ...]
    check_hostname = true                      # the peer's certificate must name its host
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dicom_node.destination import (
    Destination,
    DicomWebEndpoint,
    DicomWebTarget,
    check_url,
    is_url,
    parse_destination,
)
from medclass.errors import MedClassError
from medclass.paths import default_checkpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NUMBER = (int, float)
_TYPES: dict[str, type | tuple[type, ...]] = {
    "ae_title": str, "port": int, "bind": str, "data_dir": str, "checkpoint": str, "return_to": str,
    "stable_seconds": _NUMBER, "metrics_port": int, "scp_processes": int, "device": str, "batch_size": int, "max_send_attempts": int,
    "give_up_after_hours": _NUMBER,
    "retry_base_seconds": _NUMBER, "retry_max_seconds": _NUMBER, "allow": list, "routes": list, "forward": list,
    "tls": dict, "classify_any_modality": bool, "fast_path": bool, "coverage": _NUMBER, "web_port": int,
    "web_bind": str, "users": list, "dicomweb": list, "preprocess_on_arrival": bool, "preprocess_workers": int,
    "inference": str, "dicom_decoder": str,
}
_TYPE_WORDS = {k: {str: "a string", int: "an integer", _NUMBER: "a number", list: "a list of [[tables]]",
                   dict: "a [table]", bool: "true or false"}[v] for k, v in _TYPES.items()}

@dataclass
class NodeConfig:
    """Everything the node needs; see the module docstring for ``node.toml``."""

    ae_title: str = "MEDCLASS"
    port: int = 11112
    bind: str = "0.0.0.0"
    data_dir: str = "medclass-node"
    checkpoint: str | None = None
    return_to: str | None = None
    stable_seconds: float = 10.0
    metrics_port: int = 0
    scp_processes: int = 0  # 0: default_processes()
    device: str = "auto"
    batch_size: int = 32
    max_send_attempts: int = 0  # 0: no limit on attempts (give_up_after_hours still bounds them)
    give_up_after_hours: float = 24.0  # a send failing this long goes to the dead letter; 0: never
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    allow: list[dict[str, str]] = field(default_factory=list)
    routes: list[dict[str, str]] = field(default_factory=list)
    forward: list[dict[str, str]] = field(default_factory=list)
    tls: dict[str, Any] | None = None
    # Without [[routes]]: classify every series, not only the modality/body part the model was trained on.
    classify_any_modality: bool = False
    # The C-STORE fast path (dicom_node.fastpath), tied to the pinned pynetdicom; false: pynetdicom's own.
    fast_path: bool = True
    #: Coverage of the conformal prediction sets (medclass.calibration); 0: no sets, no "uncertain".
    coverage: float = 0.95
    web_port: int = 0  # the triage desk; 0: off
    web_bind: str = "127.0.0.1"  # loopback unless said otherwise: the desk shows patient data
    users: list[dict[str, str]] = field(default_factory=list)
    #: Decode and preprocess instances as they arrive, in a pool of processes (dicom_node.prepare), so a
    #: stable study is a forward pass away; the worker prepares whatever the pool did not reach.
    preprocess_on_arrival: bool = True
    preprocess_workers: int = 0  # 0: dicom_node.prepare.default_workers()
    #: DICOMweb endpoints with their authentication ([[dicomweb]], dicom_node.destination.DicomWebEndpoint).
    dicomweb: list[dict[str, Any]] = field(default_factory=list)
    #: Where the models run: "local", or "triton://HOST[:PORT]/MODEL" (a route may say otherwise).
    inference: str = "local"
    #: Who decodes compressed pixel data (medclass.io.use_dicom_decoder): "pydicom", "nvimgcodec" or "auto".
    dicom_decoder: str = "pydicom"

    def __post_init__(self) -> None:
        from dicom_node.selector import check_inference
        from medclass.io import DICOM_DECODERS

        check_inference(self.inference, "inference")
        if self.dicom_decoder not in DICOM_DECODERS:
            raise MedClassError(f"dicom_decoder = {self.dicom_decoder!r} is not a decoder",
                                f"write dicom_decoder = one of {', '.join(repr(d) for d in DICOM_DECODERS)}")
        if not 1 <= len(self.ae_title.strip()) <= 16:
            raise MedClassError(f"AE title {self.ae_title!r} must have 1 to 16 characters", "pass --ae-title MEDCLASS")
        if int(self.preprocess_workers) < 0:
            raise MedClassError(f"preprocess_workers = {self.preprocess_workers} is negative",
                                "set preprocess_workers = 0 (half the cores) or a number of processes")
        if not 0 < int(self.port) < 65536:
            raise MedClassError(f"port {self.port} is out of range", "pass --port 11112")
        if not 0 <= int(self.scp_processes) <= 64:
            raise MedClassError(f"scp_processes {self.scp_processes} is out of range",
                                "pass --scp-processes 0 (one per core) or a number from 1 to 64")
        if self.coverage and not 0 < self.coverage < 1:
            raise MedClassError(f"coverage {self.coverage} is outside (0, 1)",
                                "write e.g. coverage = 0.95 (or 0 for no conformal sets)")
        if self.stable_seconds < 0:
            raise MedClassError("stable_seconds must be >= 0", "pass --stable-seconds 10")
        self._resolve_destinations()
        _check_ports(self)
        # Every rule is checked here, at start, so that a mistake in node.toml is one line
        # at the command line rather than a failure at the first study.
        from dicom_node.router import ForwardRule
        from dicom_node.selector import ROUTE_KEYS, Route

        for r in self.forward:
            if "when" not in r or "to" not in r or set(r) - {"when", "to", "priority"}:
                raise MedClassError(f"[[forward]] rule {r} needs 'when' and 'to' (and optionally 'priority')",
                                    'write e.g. when = "malignant >= 0.8", to = "URGENT@10.0.0.9:104", '
                                    'priority = "high"')
            rule = ForwardRule(**r)
            if rule.name == "uncertain" and not self.coverage:
                raise MedClassError(f"[[forward]] when = {rule.when!r} needs conformal sets, but coverage = 0",
                                    "set coverage = 0.95 (or another value in (0, 1)) in node.toml")
        for r in self.routes:
            unknown = set(r) - ROUTE_KEYS
            if unknown:
                raise MedClassError(f"[[routes]] rule {r} has unknown keys {sorted(unknown)}",
                                    f"use only {sorted(ROUTE_KEYS)}")
            if "checkpoint" not in r and not self.checkpoint:
                raise MedClassError(f"[[routes]] rule {r} names no checkpoint and there is no default checkpoint",
                                    "add checkpoint = \"model.pt\" to the rule")
            Route(**{"checkpoint": self.checkpoint, **r})
        for a in self.allow:
            if not a.get("ae_title") or set(a) - {"ae_title", "host"}:
                raise MedClassError(f"[[allow]] entry {a} needs 'ae_title' (and optionally 'host')",
                                    'write e.g. ae_title = "ORTHANC", host = "10.0.0.5"')
        if self.tls is not None:
            _check_tls(self.tls)
        if not 0 <= int(self.web_port) < 65536:
            raise MedClassError(f"web_port {self.web_port} is out of range", "pass --web-port 8090 (0: no desk)")
        if self.web_port and self.web_port in (self.port, self.metrics_port):
            which = "DICOM port" if self.web_port == self.port else "metrics port"
            raise MedClassError(f"web_port {self.web_port} is the node's {which} too",
                                "give the desk a port of its own, e.g. --web-port 8090")
        from dicom_node.desk.auth import check_users

        check_users(self.users)

    def _resolve_destinations(self) -> None:
        """Check the [[dicomweb]] tables, and write a destination that names one as its URL.

        After this, ``return_to`` and every ``[[forward]] to`` is ``AET@HOST:PORT`` or a
        DICOMweb root URL: what the outbox records and the desk shows.
        """
        self.endpoints: dict[str, DicomWebEndpoint] = {}
        for table in self.dicomweb:
            if not isinstance(table, dict):
                raise MedClassError("[[dicomweb]] should be a list of tables", "write each as a [[dicomweb]] table")
            ep = DicomWebEndpoint.from_table(table)
            if ep.name in self.endpoints:
                raise MedClassError(f"[[dicomweb]] name {ep.name!r} is given twice", "give each endpoint its own name")
            if any(e.url == ep.url for e in self.endpoints.values()):
                raise MedClassError(f"[[dicomweb]] url {ep.url} is given twice (names {ep.name!r} and another)",
                                    "keep one [[dicomweb]] table per endpoint")
            self.endpoints[ep.name] = ep
        if self.return_to:
            self.return_to = self._resolve(self.return_to, "return_to")
        self.forward = [{**r, "to": self._resolve(r["to"], "[[forward]] to")}
                        if isinstance(r, dict) and isinstance(r.get("to"), str) else r for r in self.forward]

    def _resolve(self, text: str, what: str) -> str:
        """``AET@HOST:PORT``, a checked URL, or the URL of the [[dicomweb]] table named ``text``."""
        if is_url(text):
            return check_url(text, what)
        if text.strip() in self.endpoints:
            return self.endpoints[text.strip()].url
        if "@" not in text and ":" not in text:  # neither an AE address nor a URL: meant as a [[dicomweb]] name
            known = f"the [[dicomweb]] names are {sorted(self.endpoints)}" if self.endpoints else \
                "there is no [[dicomweb]] table"
            raise MedClassError(f"{what} {text!r} is not AET@HOST:PORT, an http(s):// URL, nor the name of a "
                                f"[[dicomweb]] table ({known})",
                                "fix the name, or add a [[dicomweb]] table with that name and its url")
        Destination.parse(text, what)
        return text

    def dicomweb_endpoint(self, url: str) -> DicomWebEndpoint:
        """The ``[[dicomweb]]`` table of a DICOMweb destination, or one without authentication."""
        url = check_url(url)
        for ep in self.endpoints.values():
            if ep.url == url:
                return ep
        return DicomWebEndpoint(name=url, url=url)

    @property
    def return_destination(self) -> Destination | DicomWebTarget | None:
        return parse_destination(self.return_to, "return_to") if self.return_to else None

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def ingest_processes(self) -> int:
        """How many processes accept associations (``scp_processes``, 0 resolved)."""
        return int(self.scp_processes) or default_processes()


def default_processes() -> int:
    """How many processes accept associations by default: one per CPU core, at most four.

    More than the cores only adds switching; beyond four the SQLite commits, one
    writer at a time, are the limit.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")


def _check_ports(cfg: NodeConfig) -> None:
    """Port clashes that would fail at start with a traceback, or loop studies back to the node."""
    if not int(cfg.metrics_port) <= 65535:
        raise MedClassError(f"metrics_port {cfg.metrics_port} is out of range",
                            "pass --metrics-port 9110 (0: no /metrics endpoint)")
    if int(cfg.metrics_port) == int(cfg.port):
        raise MedClassError(f"metrics_port {cfg.metrics_port} is the DICOM port: both cannot listen on it",
                            "pass another --metrics-port (e.g. 9110), or 0 for no /metrics endpoint")
    own = {cfg.bind.strip().lower(), *_LOOPBACK}
    for what, text in [("return_to", cfg.return_to), *(("[[forward]] to", r.get("to")) for r in cfg.forward)]:
        if not text:
            continue
        try:
            dest = parse_destination(text, what)
        except MedClassError:
            continue  # reported by the check of that setting
        if isinstance(dest, DicomWebTarget):
            continue  # HTTP: not the node's DICOM port
        if dest.port == int(cfg.port) and dest.host.strip().lower() in own:  # any called AE title is accepted
            raise MedClassError(f"{what} {text} is this node itself: what it sends would come back to it",
                                "give the PACS's or workstation's AE title, host and port")


_TLS_PATHS = ("cert", "key", "ca", "peer_ca")
_TLS_KEYS = (*_TLS_PATHS, "send", "check_hostname")


def _check_tls(tls: dict[str, Any]) -> None:
    if not tls.get("cert") or not tls.get("key") or set(tls) - set(_TLS_KEYS):
        raise MedClassError(f"[tls] {tls} needs 'cert' and 'key' (and optionally {', '.join(_TLS_KEYS[2:])})",
                            'write e.g. cert = "node.crt", key = "node.key"')
    for k in _TLS_PATHS:
        if k in tls and not isinstance(tls[k], str):
            raise MedClassError(f"[tls] {k} = {tls[k]!r} should be a file name", f'write e.g. {k} = "node.crt"')
    send = tls.get("send", True)
    if not isinstance(send, bool) and not (isinstance(send, list) and all(isinstance(a, str) for a in send)):
        raise MedClassError(f"[tls] send = {send!r} should be true, false or a list of AE titles",
                            'write e.g. send = ["ORTHANC", "URGENT"] (the AE titles of return_to and [[forward]])')
    if not isinstance(tls.get("check_hostname", True), bool):
        raise MedClassError(f"[tls] check_hostname = {tls['check_hostname']!r} should be true or false",
                            "write check_hostname = false only for peers whose certificates name no host")


def load_config(path: str | Path | None = None, **overrides: Any) -> NodeConfig:
    """Embedded defaults, then ``path`` (TOML), then ``overrides`` (flags; ``None`` means unset).

    Relative paths in the file are taken relative to the file's folder.

    Raises
    ------
    MedClassError
        The file is missing or not valid TOML, or holds unknown keys or bad values.
    """
    values: dict[str, Any] = {}
    known = {f.name for f in fields(NodeConfig)}
    if path is not None:
        p = Path(path)
        try:
            values = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MedClassError(f"no such config file: {p}", "pass --config node.toml or leave it out") from None
        except IsADirectoryError:
            raise MedClassError(f"--config {p} is a folder, not a file",
                                f"pass the TOML file in it, e.g. --config {p / 'node.toml'}") from None
        except UnicodeDecodeError:
            raise MedClassError(f"--config {p} is not a text file (it is binary or not UTF-8)",
                                "pass the node's TOML file (see dicom_node/README.md)") from None
        except OSError as e:
            raise MedClassError(f"cannot read the config file {p} ({e.strerror or e})",
                                "check the path and its permissions") from None
        except tomllib.TOMLDecodeError as e:
            raise MedClassError(f"{p} is not valid TOML: {e}", "fix the file (see dicom_node/README.md)") from None
        unknown = set(values) - known
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, known, n=1)
            raise MedClassError(f"{p}: unknown key {key!r}",
                                f"did you mean {close[0]!r}?" if close else f"use only {sorted(known)}")
        for key, value in values.items():
            want = _TYPES[key]
            if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
                raise MedClassError(f"{p}: {key} = {value!r} should be {_TYPE_WORDS[key]}",
                                    "fix the value (see dicom_node/README.md)")
            if isinstance(value, list) and not all(isinstance(v, dict) for v in value):
                raise MedClassError(f"{p}: {key} should be a list of tables",
                                    f"write each entry as a [[{key}]] table with its keys on the lines below")
        base = p.resolve().parent
        for key in ("data_dir", "checkpoint"):
            if values.get(key):
                values[key] = str(base / values[key])
        for r in values.get("routes", []):
            if r.get("checkpoint"):
                r["checkpoint"] = str(base / r["checkpoint"])
        for d in values.get("dicomweb", []):
            if isinstance(d.get("ca"), str):
                d["ca"] = str(base / d["ca"])
        if values.get("tls"):
            values["tls"] = {k: str(base / v) if k in _TLS_PATHS and isinstance(v, str) else v
                             for k, v in values["tls"].items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not values.get("checkpoint") and not values.get("routes"):
        found = default_checkpoint()  # the quickstart model, when there is one
        values["checkpoint"] = str(found) if found else None
    return NodeConfig(**values)
