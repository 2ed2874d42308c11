"""Where the node sends: a DICOM application entity (``AET@HOST:PORT``, C-STORE) or a
DICOMweb endpoint (an ``http(s)://`` URL, STOW-RS).

Its own module, so that the router, the sender and the configuration all use it
without importing one another. The STOW-RS client is here too (:func:`stow`), beside
:class:`SendError`, the one failure both senders raise.

A DICOMweb endpoint that needs credentials is a ``[[dicomweb]]`` table of ``node.toml``
(:class:`DicomWebEndpoint`): its ``url`` is the service root (``.../dicom-web``), its
secrets are read from environment variables, never from the file::

    [[dicomweb]]
    name = "pacs-web"
    url = "https://pacs.example.org/dicom-web"
    username = "medclass"
    password_env = "PACS_WEB_PASSWORD"      # basic authentication
    # token_env = "PACS_WEB_TOKEN"          # or: bearer token
    ca = "pacs-ca.crt"                      # optional: CA bundle of the server's certificate
    timeout_seconds = 30                    # optional
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medclass.errors import MedClassError

_AE_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


class SendError(Exception):
    """A delivery attempt failed; the message says why (and what to do, when it is permanent).

    Parameters
    ----------
    message : str
    transient : bool
        Whether trying again later may succeed (see :mod:`dicom_node.sender`); a permanent
        failure puts the item in the dead letter at once.
    """

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Destination:
    """A DICOM application entity to send to: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "destination") -> Destination:
        """Parse ``AET@HOST:PORT``.

        Raises
        ------
        MedClassError
            The text is not of that form.
        """
        m = _AE_RE.match(str(text).strip())
        if not m or not 0 < int(m["port"]) < 65536:
            raise MedClassError(f"{what} {text!r} is not AET@HOST:PORT", "write it like ORTHANC@127.0.0.1:4242")
        return cls(m["aet"].strip(), m["host"], int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def is_url(text: str | None) -> bool:
    """Whether a destination is written as a URL (``scheme://...``): DICOMweb, not an AE."""
    return bool(text) and "://" in str(text)


def check_url(text: str, what: str = "destination") -> str:
    """A DICOMweb service root, checked and normalised (no trailing ``/`` nor ``/studies``).

    Raises
    ------
    MedClassError
        Not ``http(s)://HOST[:PORT]/PATH``, or credentials, a query or a fragment in it.
    """
    example = "write the DICOMweb root, e.g. https://pacs.example.org/dicom-web"
    try:
        u = urlsplit(str(text).strip())
        u.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError as e:
        raise MedClassError(f"{what} {text!r} is not a valid URL ({e})", example) from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise MedClassError(f"{what} {text!r} is not an http:// or https:// URL with a host", example)
    if u.username is not None or u.password is not None:
        raise MedClassError(f"{what} {text!r} carries credentials in the URL (they would show in logs and on the "
                            "desk)", "name a [[dicomweb]] table with username and password_env instead")
    if u.query or u.fragment:
        raise MedClassError(f"{what} {text!r} has a query or fragment", example)
    url = str(text).strip().rstrip("/")
    return url[: -len("/studies")] if url.endswith("/studies") else url


@dataclass(frozen=True)
class DicomWebTarget:
    """A DICOMweb destination: the service root URL STOW-RS posts to (``URL/studies``)."""

    url: str

    def __str__(self) -> str:
        return self.url


def parse_destination(text: str, what: str = "destination") -> Destination | DicomWebTarget:
    """``AET@HOST:PORT`` (C-STORE) or an ``http(s)://`` DICOMweb root (STOW-RS).

    A ``[[dicomweb]]`` name is resolved to its URL by the configuration before this.

    Raises
    ------
    MedClassError
        Neither form.
    """
    if is_url(text):
        return DicomWebTarget(check_url(text, what))
    return Destination.parse(text, what)


_ENDPOINT_KEYS = {"name", "url", "username", "password_env", "token_env", "ca", "timeout_seconds"}
_ENDPOINT_EXAMPLE = ('write e.g. name = "pacs-web", url = "https://pacs/dicom-web", username = "medclass", '
                     'password_env = "PACS_WEB_PASSWORD" (or token_env = "PACS_WEB_TOKEN")')


@dataclass(frozen=True)
class DicomWebEndpoint:
    """A ``[[dicomweb]]`` table: a DICOMweb endpoint and how to authenticate to it.

    Parameters
    ----------
    name : str
        What ``return_to`` and ``[[forward]] to`` may say instead of the URL.
    url : str
        The service root (``https://pacs/dicom-web``).
    username, password_env : str, optional
        Basic authentication: the password is the value of the environment variable ``password_env``.
    token_env : str, optional
        Bearer authentication: the token is the value of this environment variable.
    ca : str, optional
        A PEM bundle of the CAs that sign the server's certificate (default: the system's).
    timeout_seconds : float
        Of each HTTP request (connect and read).
    """

    name: str
    url: str
    username: str | None = None
    password_env: str | None = None
    token_env: str | None = None
    ca: str | None = None
    timeout_seconds: float = 30.0

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> DicomWebEndpoint:
        """Check one ``[[dicomweb]]`` table, and that its secrets are in the environment.

        Raises
        ------
        MedClassError
            A key is missing, unknown or of the wrong type, the URL is not one, both or half
            of an authentication are given, or an environment variable it names is unset.
        """
        unknown = set(table) - _ENDPOINT_KEYS
        if unknown or not table.get("name") or not table.get("url"):
            what = f"has unknown keys {sorted(unknown)}" if unknown else "needs 'name' and 'url'"
            raise MedClassError(f"[[dicomweb]] {_shown(table)} {what}", _ENDPOINT_EXAMPLE)
        for k in _ENDPOINT_KEYS - {"timeout_seconds"}:
            if k in table and not isinstance(table[k], str):
                raise MedClassError(f"[[dicomweb]] {table['name']!r}: {k} = {table[k]!r} should be a string",
                                    _ENDPOINT_EXAMPLE)
        timeout = table.get("timeout_seconds", 30.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise MedClassError(f"[[dicomweb]] {table['name']!r}: timeout_seconds = {timeout!r} should be a number "
                                "of seconds in (0, 3600]", "write e.g. timeout_seconds = 30")
        name = table["name"]
        if is_url(name) or _AE_RE.match(name):
            raise MedClassError(f"[[dicomweb]] name {name!r} looks like a URL or an AE address",
                                'give it a plain name, e.g. name = "pacs-web"')
        url = check_url(table["url"], f"[[dicomweb]] {name!r} url")
        basic = "username" in table or "password_env" in table
        if basic and "token_env" in table:
            raise MedClassError(f"[[dicomweb]] {name!r} has both basic (username, password_env) and bearer "
                                "(token_env) authentication", "keep one of them")
        if basic and not (table.get("username") and table.get("password_env")):
            raise MedClassError(f"[[dicomweb]] {name!r}: basic authentication needs both username and password_env",
                                'write e.g. username = "medclass", password_env = "PACS_WEB_PASSWORD"')
        for key in ("password_env", "token_env"):
            var = table.get(key)
            if var is not None and not os.environ.get(var):
                secret = "password" if key == "password_env" else "token"
                raise MedClassError(f"[[dicomweb]] {name!r}: {key} = {var!r}, but the environment variable {var} "
                                    "is unset or empty",
                                    f"export {var}=... (the {secret}) in the node's environment (its service "
                                    "file or shell); the file never holds it")
        if table.get("ca") and not Path(table["ca"]).is_file():
            raise MedClassError(f"[[dicomweb]] {name!r}: ca {table['ca']} is not a file",
                                "point ca at a PEM file of the CA certificates that sign the server's certificate")
        return cls(name=name, url=url, username=table.get("username"), password_env=table.get("password_env"),
                   token_env=table.get("token_env"), ca=table.get("ca"), timeout_seconds=float(timeout))

    @property
    def auth(self) -> str:
        """``basic``, ``bearer`` or ``none``."""
        return "basic" if self.username else "bearer" if self.token_env else "none"

    def session(self):
        """A ``requests`` session carrying the authentication and the CA bundle.

        The secret is read from the environment now, so a changed password needs a restart
        of the node, like any other setting.
        """
        import requests

        s = requests.Session()
        s.verify = self.ca or True
        if self.username:
            s.auth = (self.username, os.environ.get(self.password_env or "", ""))
        elif self.token_env:
            s.headers["Authorization"] = f"Bearer {os.environ.get(self.token_env, '')}"
        return s


def _shown(table: dict[str, Any]) -> str:
    return repr(table.get("name")) if table.get("name") else str(table)


#: Instances per STOW-RS request: a study is posted in parts, so its memory stays bounded.
STOW_BATCH = 64


def stow(endpoint: DicomWebEndpoint, paths: list[str], session: Any = None) -> None:
    """STOW-RS the files to the endpoint; every one must be stored.

    The failure rules are C-STORE's (:mod:`dicom_node.sender`): no answer, a connection
    error, HTTP 5xx, 408 and 429 are transient; any other 4xx is permanent (the same
    request gets the same answer), with a remedy; an instance in the response's Failed
    SOP Sequence, or missing from its Referenced SOP Sequence, is permanent too.

    Parameters
    ----------
    endpoint : DicomWebEndpoint
    paths : list of str
        DICOM files (Part 10).
    session : requests.Session, optional
        Default: :meth:`DicomWebEndpoint.session`.

    Raises
    ------
    SendError
    """
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    if not paths:
        return
    client = DICOMwebClient(url=endpoint.url, session=session or endpoint.session(),
                            timeout=endpoint.timeout_seconds)
    client.set_http_retry_params(retry=False)  # the sender's backoff and dead letter decide, as for C-STORE
    where = f"{endpoint.url} (STOW-RS)"
    for start in range(0, len(paths), STOW_BATCH):
        datasets = [pydicom.dcmread(p) for p in paths[start:start + STOW_BATCH]]
        try:
            answer = client.store_instances(datasets)
        except requests.HTTPError as e:
            raise _http_failure(endpoint, where, e.response) from None
        except requests.exceptions.SSLError as e:
            raise SendError(f"{where}: TLS failed ({_short(e)}); is the server's certificate signed by the "
                            f"[[dicomweb]] ca{' ' + endpoint.ca if endpoint.ca else ' (or a system CA)'}, and does "
                            "it name the host of the url?") from None
        except (requests.ConnectionError, requests.Timeout) as e:
            raise SendError(f"{where} did not answer ({type(e).__name__}: {_short(e)}); is it running and "
                            "reachable?") from None
        except ValueError as e:  # an answer that is neither DICOM JSON nor XML
            raise SendError(f"{where} answered the STOW-RS with an unreadable body ({e}); is url the DICOMweb root "
                            "(e.g. https://pacs/dicom-web)?", transient=False) from None
        _check_stored(where, datasets, answer)


def _check_stored(where: str, datasets: list, answer: Any) -> None:
    """Every instance sent is in the Referenced SOP Sequence and none in the Failed SOP Sequence."""
    failed = {str(getattr(i, "ReferencedSOPInstanceUID", "")): i for i in getattr(answer, "FailedSOPSequence", [])}
    stored = {str(getattr(i, "ReferencedSOPInstanceUID", "")) for i in getattr(answer, "ReferencedSOPSequence", [])}
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            reason = getattr(failed[uid], "FailureReason", None)
            code = f" 0x{int(reason):04X}" if reason is not None else ""
            raise SendError(f"{where} refused instance {uid} (Failed SOP Sequence, reason{code or ' not given'}); "
                            "the server's log says why", transient=False)
        if uid not in stored:
            raise SendError(f"{where} answered but did not list instance {uid} as stored (not in its Referenced SOP "
                            "Sequence): it dropped or refused it (a filter or rule of the server?); its log says why",
                            transient=False)


def _http_failure(endpoint: DicomWebEndpoint, where: str, response: Any) -> SendError:
    """The SendError of an HTTP error status: transient for 5xx, 408, 429; permanent otherwise."""
    code = response.status_code if response is not None else 0
    text = f"{where} answered HTTP {code}" + (f" {response.reason}" if response is not None and response.reason else "")
    if code >= 500 or code in (408, 429):
        return SendError(f"{text}; retried with backoff")
    if code == 401:
        how = {"basic": f"check username {endpoint.username!r} and the password in ${endpoint.password_env}",
               "bearer": f"check the token in ${endpoint.token_env} (expired?)",
               "none": f"add a [[dicomweb]] table for {endpoint.url} with username and password_env (or token_env)"}
        remedy = how[endpoint.auth]
    elif code == 403:
        remedy = "the credentials are valid but may not store: give that user STOW-RS (write) rights on the server"
    elif code == 404:
        remedy = "check url: it should be the DICOMweb root the server serves, e.g. https://pacs/dicom-web"
    elif code == 409:
        remedy = "the server refused the instances (e.g. a conflict with what it holds); its log says why"
    elif code == 413:
        remedy = "the server refuses requests this large: raise its upload limit (e.g. client_max_body_size)"
    elif code == 415:
        remedy = "the server does not take multipart/related application/dicom: is url a STOW-RS endpoint?"
    else:
        remedy = "the server's log says why"
    return SendError(f"{text}; {remedy}", transient=False)


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:200] + "..."
