"""The desk's HTTP(S) server: uvicorn in a thread of the node, on a socket bound at start."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from dicom_node.config import NodeConfig
from dicom_node.desk.app import HeatMaps, create_app
from dicom_node.desk.auth import Authenticator
from dicom_node.jobs import JobDatabase
from medclass.errors import MedClassError

log = logging.getLogger("dicom_node.desk")


class DeskServer:
    """Serve the desk on ``config.web_bind:config.web_port`` until :meth:`stop`.

    The socket is bound in :meth:`start`, so a port in use fails the node's start with one
    line. HTTPS with ``[tls]``'s ``cert`` and ``key`` when the node has them. uvicorn's access
    log is off: a URL is no place for patient data, and the desk keeps none there, but a log of
    who opened which study belongs in the audit log, not in a file anyone can read.

    Parameters
    ----------
    config : NodeConfig
    db : JobDatabase
        The node's job database.
    on_change : callable
        Called after an action changed the queue.
    """

    def __init__(self, config: NodeConfig, db: JobDatabase, on_change: Callable[[], None] = lambda: None) -> None:
        if not config.users:
            log.warning("the desk has no [[users]] in node.toml: nobody can log in; add one with "
                        "'medclass node hash-password'")
        self.config = config
        self.https = bool(config.tls)
        self.auth = Authenticator(config.users)
        checkpoints = [config.checkpoint, *(r.get("checkpoint") for r in config.routes)]
        # Heat maps on the CPU: the GPU, when there is one, is the worker's.
        heat = HeatMaps(config.data_path / "desk-heatmaps", [c for c in checkpoints if c], device="cpu")
        self.app = create_app(db, self.auth, https=self.https, on_change=on_change, heatmaps=heat)
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.config.web_bind
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.https else 'http'}://{host}:{self.port}/"

    def start(self) -> DeskServer:
        import uvicorn

        bind, port = self.config.web_bind, int(self.config.web_port)
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only when the listening
        # socket says so; without it every keep-alive response waited ~40 ms (Nagle against delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((bind, port))
        except OSError as e:
            sock.close()
            raise MedClassError(f"the desk cannot listen on {bind}:{port} ({e.strerror})",
                                "choose another --web-port, or stop the program that holds it") from None
        sock.listen(128)
        self.port = sock.getsockname()[1]
        tls = self.config.tls or {}
        # proxy_headers=False: uvicorn would believe X-Forwarded-For from whatever FORWARDED_ALLOW_IPS says;
        # the desk reads it itself, from 127.0.0.1 only (dicom_node.desk.app.client_address).
        cfg = uvicorn.Config(self.app, access_log=False, log_config=None, log_level="warning", proxy_headers=False,
                             ssl_certfile=tls.get("cert"), ssl_keyfile=tls.get("key"), lifespan="off",
                             server_header=False, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="medclass-node-desk", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise MedClassError(f"the desk did not start on {bind}:{port}",
                                "check [tls] cert and key (the log says more)")
        self._sock = sock
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if getattr(self, "_sock", None) is not None:
            self._sock.close()
