"""TLS contexts of the node, from ``[tls]`` in ``node.toml`` (see :mod:`dicom_node.config`).

One certificate and key serve both directions, as in DICOM's BCP 195 profiles: the
node shows them to callers (it then accepts TLS associations only) and to the peers it
sends to when they ask for a client certificate (dcmtk and Orthanc do by default).

- Incoming: with ``ca``, callers must present a certificate signed by it.
- Outgoing (the SR return and forwards, for the destinations ``send`` names): the
  peer's certificate must be signed by ``peer_ca`` (default: ``ca``, else the system's
  CAs) and, unless ``check_hostname = false``, name the host the node connects to.
"""

from __future__ import annotations

import ssl
from typing import Any

from medclass.errors import MedClassError


def _load(ctx: ssl.SSLContext, tls: dict[str, Any]) -> None:
    try:
        ctx.load_cert_chain(tls["cert"], tls["key"])
    except (OSError, ssl.SSLError) as e:
        raise MedClassError(f"[tls] cannot load cert {tls['cert']} with key {tls['key']} ({e})",
                            "point cert and key at a PEM certificate and its unencrypted private key") from None


def _ca(ctx: ssl.SSLContext, path: str, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as e:
        raise MedClassError(f"[tls] cannot load {key} {path} ({e})",
                            f"point {key} at a PEM file of CA (or peer) certificates") from None


def server_context(tls: dict[str, Any] | None) -> ssl.SSLContext | None:
    """The context the node listens with, or ``None`` without ``[tls]``.

    Raises
    ------
    MedClassError
        A certificate, key or CA file cannot be read.
    """
    if not tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, tls)
    if tls.get("ca"):
        _ca(ctx, tls["ca"], "ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: dict[str, Any] | None) -> ssl.SSLContext | None:
    """The context the node sends with, or ``None`` when ``[tls]`` is absent or ``send = false``.

    Raises
    ------
    MedClassError
        A certificate, key or CA file cannot be read.
    """
    if not tls or tls.get("send", True) is False:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = bool(tls.get("check_hostname", True))
    ctx.verify_mode = ssl.CERT_REQUIRED
    trust = tls.get("peer_ca") or tls.get("ca")
    if trust:
        _ca(ctx, trust, "peer_ca" if tls.get("peer_ca") else "ca")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _load(ctx, tls)
    return ctx


def sends_tls(tls: dict[str, Any] | None, ae_title: str) -> bool:
    """Whether the node sends to a destination with this AE title over TLS."""
    if not tls:
        return False
    send = tls.get("send", True)
    if isinstance(send, bool):
        return send
    return ae_title in send
