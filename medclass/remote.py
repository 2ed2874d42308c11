"""Remote inference on NVIDIA Triton Inference Server.

A model exported with ``medclass export --format triton`` is served by Triton; a
:class:`~medclass.inference.Classifier` built with ``inference="triton://HOST:PORT/MODEL"``
sends its preprocessed batches there through :class:`TritonModel` (gRPC, ``tritonclient``)
instead of running the model itself. Preprocessing and aggregation stay in medclass on
the client side, so there is one implementation of both.

The exported ``config.pbtxt`` carries the model card as the parameter ``medclass_card``:
a client checks it against its own checkpoint (:func:`card_differences`) or, without one,
takes it as the model's card.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from medclass.errors import InferenceUnavailable, MedClassError

SCHEME = "triton://"
DEFAULT_PORT = 8001  # Triton's gRPC port
#: Triton priority of each request class: with ``priority_levels: 2`` level 1 is served first.
PRIORITIES = {"urgent": 1, "routine": 2}
#: The name of the config.pbtxt parameter that holds the model card (JSON).
CARD_PARAMETER = "medclass_card"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
#: gRPC status codes that are a refusal to fix (a wrong request), not a server to wait for.
REFUSALS = {"INVALID_ARGUMENT", "UNIMPLEMENTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION",
            "OUT_OF_RANGE"}


@dataclass(frozen=True)
class TritonURL:
    """A parsed ``triton://HOST[:PORT]/MODEL[/VERSION]``."""

    host: str
    port: int
    model: str
    version: str = ""  # "" = the server's latest ready version

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.address}/{self.model}" + (f"/{self.version}" if self.version else "")


def is_remote(inference: str | None) -> bool:
    """Whether ``inference`` names a remote server (``triton://...``) rather than local inference."""
    return bool(inference) and str(inference).startswith(SCHEME)


def parse_url(url: str) -> TritonURL:
    """Parse ``triton://HOST[:PORT]/MODEL[/VERSION]`` (the port defaults to Triton's gRPC 8001).

    Raises
    ------
    MedClassError
        The URL is not of that form.
    """
    form = "use triton://HOST[:PORT]/MODEL[/VERSION], e.g. triton://127.0.0.1:8001/medclass"
    if not is_remote(url):
        raise MedClassError(f"unknown inference {url!r}", f"use 'local' or {form}")
    rest = url[len(SCHEME):]
    hostport, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hostport or not parts or len(parts) > 2:
        raise MedClassError(f"malformed inference URL {url!r}", form)
    if hostport.startswith("["):  # [IPv6]:PORT
        host, _, port = hostport[1:].partition("]")
        port = port.lstrip(":") or str(DEFAULT_PORT)
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            host, port = hostport, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MedClassError(f"malformed inference URL {url!r} (host or port)", form)
    version = parts[1] if len(parts) == 2 else ""
    if version and not version.isdigit():
        raise MedClassError(f"malformed inference URL {url!r}: the model version must be a number", form)
    return TritonURL(host, int(port), parts[0], version)


def _identity(card: dict[str, Any]) -> dict[str, Any]:
    """What must agree between a checkpoint and a served model for their outputs to be the same."""
    from medclass.calibration import card_scaling

    t, bias = card_scaling(card)
    model = card.get("model", {})
    task = card.get("task", {})
    return {
        "model name": model.get("name"),
        "model arguments": model.get("args"),
        "task type": task.get("type"),
        "classes": task.get("classes"),
        "preprocessing (input size, channels, window)": card.get("preprocess"),
        "calibration": None if t is None else [round(float(t), 6), None if bias is None else bias],
        # Another training run of the same model is another model: its weights differ.
        "training run (card created)": card.get("created"),
    }


def card_differences(local_card: dict[str, Any], remote_card: dict[str, Any]) -> list[str]:
    """Human-readable differences between a local model card and a served model's.

    Empty when the served model computes the same probabilities from the same
    preprocessed input: same model and arguments, task, classes, preprocessing,
    calibration and training run (the card's creation time: weights are not compared).
    """
    a, b = _identity(local_card), _identity(remote_card)
    return [f"{k}: local {a[k]!r}, server {b[k]!r}" for k in a if a[k] != b[k]]


class TritonModel:
    """One model on a Triton server, reached over gRPC.

    The gRPC channel is created lazily, in the process that uses it, and again after a
    fork (a channel does not survive ``fork``): a parent can build a Classifier and a
    worker process use it.

    Parameters
    ----------
    url : str
        ``triton://HOST[:PORT]/MODEL[/VERSION]``.
    timeout : float
        Seconds a request may take (queueing included) before it counts as unavailable.
    """

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = parse_url(url)
        self.timeout = float(timeout)
        self._client: Any = None
        self._pid: int | None = None
        self._config: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable for a worker process: no channel
        state = dict(self.__dict__)
        state.update(_client=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def _module():
        try:
            import tritonclient.grpc as grpcclient
        except ImportError:
            raise MedClassError("remote inference needs the Triton client",
                                "from a clone of SlicerMedClass: pip install -e '.[triton]' (or make install)") from None
        return grpcclient

    def _unavailable(self, e: Exception) -> InferenceUnavailable:
        msg = getattr(e, "message", None)
        text = (msg() if callable(msg) else None) or str(e)
        return InferenceUnavailable(str(self.url), " ".join(text.split())[:300])

    @property
    def client(self):
        """The gRPC client of this process (created on first use, and anew after a fork)."""
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = self._module().InferenceServerClient(self.url.address)
                self._pid = os.getpid()
            return self._client

    def _call(self, fn, *args, **kwargs):
        """Run a client call; a server that is down or answers with an error is unavailable."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            if str(e.status() or "").rpartition(".")[2] in REFUSALS:
                raise MedClassError(f"{self.url} refused the request ({' '.join(str(e.message()).split())[:300]})",
                                    "check that the served model is the one exported for this checkpoint") from None
            raise self._unavailable(e) from None
        except OSError as e:
            raise self._unavailable(e) from None

    @property
    def ready(self) -> bool:
        """Whether the server is up and the model loaded (never raises)."""
        try:
            return bool(self.client.is_model_ready(self.url.model, self.url.version, client_timeout=5))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    def config(self, refresh: bool = False) -> dict[str, Any]:
        """The model's configuration as the server reports it (JSON form)."""
        if self._config is None or refresh:
            if not self.ready:
                self._call(self.client.is_server_live, client_timeout=5)  # the reason, if the server is down
                raise InferenceUnavailable(str(self.url), f"the server does not serve model {self.url.model!r}"
                                           + (f" version {self.url.version}" if self.url.version else "")
                                           + " (not loaded, or not ready)")
            res = self._call(self.client.get_model_config, self.url.model, self.url.version, as_json=True,
                             client_timeout=self.timeout)
            self._config = res.get("config", res)
        return self._config

    def card(self) -> dict[str, Any]:
        """The model card the served model carries (``medclass_card`` in its config.pbtxt).

        Raises
        ------
        MedClassError
            The served model was not exported by medclass (no card).
        """
        params = self.config().get("parameters", {})
        text = params.get(CARD_PARAMETER, {}).get("string_value")
        if not text:
            raise MedClassError(f"the model {self.url.model!r} on {self.url.address} carries no medclass card",
                                "serve a repository written by 'medclass export --format triton'")
        return json.loads(text)

    @property
    def max_batch_size(self) -> int:
        """The largest batch one request may carry (the server rejects larger ones)."""
        return int(self.config().get("max_batch_size", 0)) or 1

    def probabilities(self, batch: np.ndarray, priority: str = "routine", batch_size: int | None = None) -> np.ndarray:
        """Class probabilities ``(N, K)`` of a preprocessed batch ``(N, C, ...)``.

        Sent in requests of at most :attr:`max_batch_size` images (or ``batch_size``),
        each at ``priority`` (``urgent`` or ``routine``).

        Raises
        ------
        InferenceUnavailable
            The server is down, unreachable, or did not answer within the timeout.
        """
        if priority not in PRIORITIES:
            raise MedClassError(f"unknown priority {priority!r}", f"use one of {', '.join(PRIORITIES)}")
        grpcclient = self._module()
        x = np.ascontiguousarray(batch, dtype=np.float32)
        step = min(self.max_batch_size, batch_size or self.max_batch_size)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i: i + step]
            inp = grpcclient.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
            inp.set_data_from_numpy(chunk)
            res = self._call(self.client.infer, self.url.model, [inp], model_version=self.url.version,
                             outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                             priority=PRIORITIES[priority], client_timeout=self.timeout)
            out.append(res.as_numpy(OUTPUT_NAME))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
