"""A MONAI Label REST client for image-level classification, standard library only.

Slicer's Python has no ``requests`` guarantee and the module must work before any
dependency is installed, so this client speaks HTTP through :mod:`urllib` alone.
The request shapes follow MONAI Label's own client (``monailabel.client``) and its
FastAPI endpoints (``monailabel/endpoints``):

=====================  ==================================================================
``info()``             ``GET /info/``
``infer()``            ``POST /infer/{model}?image=ID&output=json`` (form field ``params``)
``infer_file()``       the same with the image uploaded as the form file ``file``
``infer_heatmap()``    ``output=all`` with ``{"heatmap": true}``: JSON plus the heat-map file
``save_label()``       ``PUT /datastore/label?image=ID&tag=final`` (file ``label``: JSON)
``next_sample()``      ``POST /activelearning/{strategy}`` (JSON body)
``score()``            ``POST /scoring/{method}?run_sync=true`` (uncertainty scores for strategies)
``datastore()``        ``GET /datastore/?output=stats``
``train()``            ``POST /train/{model}`` (JSON body: the train request's params)
``train_status()``     ``GET /train/`` (``?check_if_running=true`` for the fast check)
``stop_train()``       ``DELETE /train/``
``download_image()``   ``GET /datastore/image?image=ID``
=====================  ==================================================================

Every failure (server unreachable, an HTTP error, a body that is not JSON) raises
:class:`MonaiLabelError`, a ``ValueError`` whose message names the URL, the HTTP
status and the server's own ``detail``, and says what to do.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 60.0
#: Active-learning strategies a classification app is expected to offer; the widget
#: shows the ones the server's ``/info/`` lists, these only when it lists none. This
#: module imports without medclass (it talks HTTP only), so it keeps a copy of the names
#: of :data:`medclass.active.STRATEGY_DESCRIPTIONS`; a test checks that the two agree.
DEFAULT_STRATEGIES = ("random", "entropy", "margin", "least-confidence", "bald", "coreset", "hybrid", "typiclust")


class MonaiLabelError(ValueError):
    """A request to the MONAI Label server failed; the message says why and what to do.

    Attributes
    ----------
    url : str
        The URL requested.
    status : int or None
        The HTTP status, ``None`` when no answer came (unreachable, timeout).
    detail : str or None
        The server's ``detail`` message, when it sent one.
    """

    def __init__(self, message: str, url: str, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.detail = detail


def _remedy(status: int, path: str) -> str:
    if status in (401, 403):
        return "the server requires authentication; log in or ask its administrator for access"
    if status == 404:
        if path.startswith("/infer") or (path.startswith("/train/") and path != "/train/"):
            return "check the model name against the server's /info/ (reconnect to refresh the model list)"
        if path.startswith("/activelearning"):
            return "choose a strategy the server lists in /info/"
        return "check the image id; refresh the datastore (Next sample) and try again"
    if status == 422:
        return "the request was malformed; check the parameters"
    if status == 429:
        if path.startswith("/scoring"):
            return "scoring is already running on the server; wait for it to finish"
        return "a training task is already running; wait for it or stop it first"
    if 400 <= status < 500:
        return "correct the request as the server's message says"
    return "the server failed; read the MONAI Label server log for the traceback"


def _detail(body: bytes) -> str | None:
    """The ``detail`` of a FastAPI error body, flattened to one line."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:500]
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": ...}, ...]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []))
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        detail = "; ".join(parts)
    return " ".join(str(detail).split())[:500]


def encode_multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[str, bytes]:
    """Encode form fields and files as ``multipart/form-data``.

    Parameters
    ----------
    fields : dict
        Field name to text value.
    files : dict
        Field name to ``(filename, content, content_type)``.

    Returns
    -------
    tuple of (str, bytes)
        The ``Content-Type`` header (with the boundary) and the body.
    """
    boundary = f"----SlicerMedClass{uuid.uuid4().hex}"
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += str(value).encode("utf-8") + b"\r\n"
    for name, (filename, content, ctype) in files.items():
        safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{safe}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n").encode()
        out += content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


class MonaiLabelClient:
    """Talks to a MONAI Label server serving classification models.

    Parameters
    ----------
    server_url : str
        E.g. ``http://127.0.0.1:8000``; a path prefix (behind a proxy) is kept.
    timeout : float, default 60
        Seconds to wait for one answer. Inference on a large volume on CPU may
        need more; status calls are quick.
    client_id : str, optional
        Sent with active-learning and label requests, so that two annotators
        asking at once are told apart (MONAI Label's ``client_id``).
    """

    def __init__(self, server_url: str, timeout: float = DEFAULT_TIMEOUT, client_id: str | None = None) -> None:
        url = (server_url or "").strip()
        if not url:
            raise ValueError("no MONAI Label server URL given; enter one such as http://127.0.0.1:8000")
        if "://" not in url:
            url = "http://" + url
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{server_url!r} is not an http(s) URL; enter one such as http://127.0.0.1:8000")
        self.server_url = url.rstrip("/")
        self.timeout = float(timeout)
        self.client_id = client_id

    def __repr__(self) -> str:
        return f"MonaiLabelClient({self.server_url!r})"

    # ------------------------------------------------------------------ transport

    def _url(self, path: str, query: dict[str, Any] | None = None) -> str:
        url = self.server_url + path
        q = {k: v for k, v in (query or {}).items() if v is not None}
        if q:
            url += "?" + urllib.parse.urlencode(q)
        return url

    def _send(self, method: str, path: str, query: dict[str, Any] | None = None, body: bytes | None = None,
              content_type: str | None = None, timeout: float | None = None):
        """Send one request; return ``(status, headers, body bytes)`` or raise MonaiLabelError."""
        url = self._url(path, query)
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            body_bytes = e.read() if e.fp is not None else b""
            detail = _detail(body_bytes)
            msg = f"MONAI Label server: {method} {url} failed with HTTP {e.code} {e.reason}"
            if detail:
                msg += f": {detail}"
            raise MonaiLabelError(f"{msg}; {_remedy(e.code, path)}", url, e.code, detail) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (socket.timeout, TimeoutError)) or isinstance(e, (socket.timeout, TimeoutError)):
                raise MonaiLabelError(
                    f"MONAI Label server at {self.server_url} did not answer {method} {url} within "
                    f"{timeout or self.timeout:g} s; the server may be busy (inference on a large volume on CPU) "
                    "or hung: try again, or raise the timeout", url) from None
            raise MonaiLabelError(
                f"cannot reach the MONAI Label server at {self.server_url} ({reason}); check that it is "
                "running ('monailabel start_server --app ... --studies ...') and that the URL and port are right",
                url) from None

    def _json(self, method: str, path: str, query: dict[str, Any] | None = None, body: bytes | None = None,
              content_type: str | None = None, timeout: float | None = None) -> Any:
        status, _, data = self._send(method, path, query, body, content_type, timeout)
        url = self._url(path, query)
        if not data.strip():
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            snippet = " ".join(data[:200].decode("utf-8", "replace").split())
            raise MonaiLabelError(
                f"{method} {url} answered HTTP {status} but not with JSON ({snippet!r}); is {self.server_url} a "
                "MONAI Label server? Check the URL and port", url, status) from None

    def _json_body(self, method: str, path: str, payload: Any, query: dict[str, Any] | None = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        return self._json(method, path, query, body, "application/json" if body is not None else None)

    @staticmethod
    def _quote(segment: str) -> str:
        if not segment or not str(segment).strip():
            raise ValueError("an empty name cannot be sent to the server; choose a model or strategy first")
        return urllib.parse.quote(str(segment), safe="")

    def _with_client_id(self, params: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(params or {})
        if self.client_id and "client_id" not in out:
            out["client_id"] = self.client_id
        return out

    # ------------------------------------------------------------------ app

    def info(self) -> dict[str, Any]:
        """The app's ``/info/``: name, models (with ``type`` and ``labels``), strategies, trainers."""
        info = self._json("GET", "/info/")
        if not isinstance(info, dict):
            raise MonaiLabelError(f"{self.server_url}/info/ did not return an object; is this a MONAI Label server?",
                                  self._url("/info/"))
        return info

    def classification_models(self, info: dict[str, Any] | None = None) -> dict[str, list[str]]:
        """Model name to class names, for the models ``/info/`` lists as ``type: classification``."""
        info = self.info() if info is None else info
        out = {}
        for name, model in (info.get("models") or {}).items():
            if isinstance(model, dict) and str(model.get("type", "")).lower() == "classification":
                out[name] = class_names(model)
        return out

    def strategies(self, info: dict[str, Any] | None = None) -> list[str]:
        """Active-learning strategy names the server offers."""
        info = self.info() if info is None else info
        return list((info.get("strategies") or {}).keys())

    # ------------------------------------------------------------------ inference

    def infer(self, model: str, image_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Classify an image of the server's datastore.

        Returns
        -------
        dict
            The infer task's JSON result (label and per-class scores).
        """
        if not image_id:
            raise ValueError("no image id given; fetch an image with Next sample or classify a local volume")
        ctype, body = encode_multipart({"params": json.dumps(self._with_client_id(params))}, {})
        return self._json("POST", f"/infer/{self._quote(model)}", {"image": image_id, "output": "json"}, body, ctype)

    def infer_file(self, model: str, path: str | os.PathLike, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Classify a local image file (e.g. a volume saved from Slicer as NRRD) by uploading it."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"no such file to upload: {p}")
        ctype, body = encode_multipart({"params": json.dumps(self._with_client_id(params))},
                                       {"file": (p.name, p.read_bytes(), "application/octet-stream")})
        return self._json("POST", f"/infer/{self._quote(model)}", {"output": "json"}, body, ctype)

    def infer_heatmap(self, model: str, dest: str | os.PathLike, image_id: str | None = None,
                      file: str | os.PathLike | None = None,
                      params: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path | None]:
        """Classify a datastore image (``image_id``) or an uploaded ``file`` and fetch the heat map too.

        Asks with ``{"heatmap": true}`` and ``output=all``: MONAI Label then answers
        ``multipart/form-data`` with the JSON result (``params``) and the heat-map
        file (NRRD, on the image's voxel grid), or plain JSON when there is none.

        Returns
        -------
        (dict, Path or None)
            The JSON result, and the heat-map file written into the folder ``dest``.
        """
        if not image_id and file is None:
            raise ValueError("give a datastore image id or a file to classify")
        files = {}
        if file is not None:
            p = Path(file)
            if not p.is_file():
                raise ValueError(f"no such file to upload: {p}")
            files["file"] = (p.name, p.read_bytes(), "application/octet-stream")
        fields = {"params": json.dumps(self._with_client_id({**(params or {}), "heatmap": True}))}
        ctype, body = encode_multipart(fields, files)
        path = f"/infer/{self._quote(model)}"
        query = {"image": image_id or None, "output": "all"}
        status, headers, data = self._send("POST", path, query, body, ctype)
        url = self._url(path, query)
        answer_type = headers.get("content-type", "")
        if "multipart" not in answer_type:
            try:
                return json.loads(data.decode("utf-8")), None
            except (UnicodeDecodeError, ValueError):
                raise MonaiLabelError(f"{url} answered HTTP {status} with neither JSON nor multipart data; "
                                      "is this a MONAI Label server?", url, status) from None
        fields_in, files_in = parse_multipart(answer_type, data)
        try:
            answer = json.loads(fields_in.get("params") or "{}")
        except ValueError:
            raise MonaiLabelError(f"{url}: the result part of the answer is not JSON", url, status) from None
        heat = None
        if files_in:
            name, content = next(iter(files_in.items()))
            folder = Path(dest)
            folder.mkdir(parents=True, exist_ok=True)
            stem = _safe_name(image_id or Path(file).name.split(".")[0])
            heat = folder / f"{stem}_heatmap{_suffixes(name) or '.nrrd'}"
            heat.write_bytes(content)
        return answer, heat

    # ------------------------------------------------------------------ datastore and labels

    def save_label(self, image_id: str, label: str | None = None, labels: list[str] | None = None,
                   tag: str = "final", params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store the image-level class of ``image_id`` in the datastore.

        Parameters
        ----------
        image_id : str
            The datastore's image id.
        label : str, optional
            The class (single-label tasks).
        labels : list of str, optional
            The classes present (multi-label tasks); give ``label`` or ``labels``.
        tag : str, default "final"
            MONAI Label's label tag.
        params : dict, optional
            Extra fields for the request's ``params`` (e.g. ``{"user": ...}``).
        """
        if not image_id:
            raise ValueError("no image id: submit labels for images fetched from the server (Next sample)")
        if (label is None) == (labels is None):
            raise ValueError("give either label (one class) or labels (a list, for multi-label tasks)")
        if label is not None and not str(label).strip():
            raise ValueError("the label is empty; choose a class first")
        payload = {"label": str(label)} if label is not None else {"labels": [str(x) for x in labels]}
        content = json.dumps(payload).encode("utf-8")
        ctype, body = encode_multipart(
            {"params": json.dumps({**self._with_client_id(params), **payload})},
            {"label": (f"{_safe_name(image_id)}.json", content, "application/json")})
        return self._json("PUT", "/datastore/label", {"image": image_id, "tag": tag}, body, ctype)

    def datastore(self, output: str = "stats") -> dict[str, Any]:
        """``GET /datastore/?output=stats`` (counts of images and labels), or ``all`` / ``train``."""
        return self._json("GET", "/datastore/", {"output": output})

    def download_image(self, image_id: str, dest: str | os.PathLike) -> Path:
        """Download a datastore image to ``dest`` (a folder: the server's file name is kept)."""
        if not image_id:
            raise ValueError("no image id given")
        _, headers, data = self._send("GET", "/datastore/image", {"image": image_id})
        dest = Path(dest)
        if dest.is_dir():
            name = _filename(headers.get("content-disposition", "")) or _safe_name(image_id)
            dest = dest / Path(name).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest

    # ------------------------------------------------------------------ active learning

    def next_sample(self, strategy: str, client_id: str | None = None,
                    params: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The next image to annotate by ``strategy``; ``None`` when none is left."""
        body = dict(params or {})
        cid = client_id or self.client_id
        if cid:
            body["client_id"] = cid
        result = self._json_body("POST", f"/activelearning/{self._quote(strategy)}", body)
        if not result or not result.get("id"):
            return None
        return result

    def scoring_methods(self, info: dict[str, Any] | None = None) -> list[str]:
        """Scoring methods the server offers (they compute what uncertainty strategies rank by)."""
        info = self.info() if info is None else info
        return list((info.get("scoring") or {}).keys())

    def score(self, method: str, run_sync: bool = True, params: dict[str, Any] | None = None) -> Any:
        """Run a scoring method over the datastore (``run_sync``: wait for it; it can take minutes)."""
        query = {"run_sync": "true" if run_sync else "false"}
        return self._json_body("POST", f"/scoring/{self._quote(method)}", params or None, query)

    def scoring_running(self) -> bool:
        """Whether a scoring task runs on the server now."""
        try:
            return bool(self._json("GET", "/scoring/", {"check_if_running": "true"}, timeout=min(self.timeout, 15.0)))
        except MonaiLabelError as e:
            if e.status == 404:  # MONAI Label's answer for "no scoring task running"
                return False
            raise

    def next_sample_scored(self, strategy: str, client_id: str | None = None, info: dict[str, Any] | None = None,
                           max_wait: float = 1800.0, poll: float = 1.0) -> dict[str, Any] | None:
        """:meth:`next_sample`, scoring the datastore first when the strategy has no scores yet.

        Uncertainty strategies rank images by the scores the scoring task stores;
        until it has run (it also runs after each training) the app answers HTTP
        409. Then this waits for a scoring task already running, or runs every
        scoring method the server lists, and asks again. Meant for a worker
        thread: it blocks for as long as scoring takes (at most ``max_wait`` s).
        """
        try:
            return self.next_sample(strategy, client_id)
        except MonaiLabelError as e:
            if e.status != 409:
                raise
            methods = self.scoring_methods(info)
            if not methods:
                raise
        deadline = time.monotonic() + max_wait
        for method in methods:
            while True:
                self._wait_for_scoring(deadline, poll)
                try:
                    self.score(method, run_sync=True)
                    break
                except MonaiLabelError as e:
                    if e.status != 429:  # 429: another scoring started meanwhile; wait for it
                        raise
        self._wait_for_scoring(deadline, poll)
        return self.next_sample(strategy, client_id)

    def _wait_for_scoring(self, deadline: float, poll: float) -> None:
        while self.scoring_running():
            if time.monotonic() > deadline:
                raise MonaiLabelError(f"scoring on {self.server_url} is still running; ask for the next sample "
                                      "again later", self._url("/scoring/"))
            time.sleep(poll)

    # ------------------------------------------------------------------ training

    def train(self, model: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start training ``model`` in the background; returns the task (``id``, ``status``)."""
        return self._json_body("POST", f"/train/{self._quote(model)}", self._with_client_id(params) or None)

    def train_status(self, check_if_running: bool = False) -> dict[str, Any] | bool | None:
        """The latest training task, or with ``check_if_running`` whether one is running.

        Returns
        -------
        dict or bool or None
            The task (``status`` is ``SUBMITTED``, ``RUNNING``, ``DONE``, ``ERROR``
            or ``STOPPED``; ``details`` its last output lines), ``None`` when no
            task was ever started; ``True``/``False`` with ``check_if_running``.
        """
        query = {"check_if_running": "true"} if check_if_running else None
        try:
            task = self._json("GET", "/train/", query, timeout=min(self.timeout, 15.0))
        except MonaiLabelError as e:
            if e.status == 404:  # MONAI Label's answer for "no (running) training task"
                return False if check_if_running else None
            raise
        return bool(task) if check_if_running else task

    def stop_train(self) -> dict[str, Any] | None:
        """Stop the running training task; returns it, or ``None`` when none ran."""
        return self._json("DELETE", "/train/")


def class_names(model_info: dict[str, Any]) -> list[str]:
    """Class names of one ``/info/`` model entry, in class-index order.

    MONAI Label apps list ``labels`` either as a list or as ``{name: index}``.
    """
    labels = model_info.get("labels") or model_info.get("classes") or []
    if isinstance(labels, dict):
        return [str(k) for k, _ in sorted(labels.items(), key=lambda kv: (kv[1], str(kv[0])))]
    return [str(x) for x in labels]


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """Split a ``multipart/form-data`` answer into form fields and files (filename -> bytes)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename:
            files[filename] = payload
        else:
            name = part.get_param("name", header="content-disposition") or ""
            fields[str(name)] = payload.decode(part.get_content_charset() or "utf-8", "replace")
    return fields, files


def _suffixes(name: str) -> str:
    return "".join(Path(name).suffixes[-2:])


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)) or "image"


def _filename(content_disposition: str) -> str | None:
    m = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", content_disposition, flags=re.I)
    if m:
        return urllib.parse.unquote(m.group(1).strip().strip('"'))
    m = re.search(r'filename="?([^";]+)"?', content_disposition, flags=re.I)
    return m.group(1) if m else None
