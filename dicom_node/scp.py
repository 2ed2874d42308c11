"""The node's DICOM service class provider: C-ECHO and C-STORE (pynetdicom).

Handlers are small and return statuses; they never raise (pynetdicom would answer
0xC001 and log a traceback). The received bytes are written as they came, behind a
Part 10 header, without decoding the pixel data: decoding is the worker's job, off
the association threads.
"""

from __future__ import annotations

import copy
import functools
import logging
import socket
import ssl
import threading
import time
from io import BytesIO
from typing import Any, Callable

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import NodeConfig
from dicom_node.fastpath import check_fast_path
from dicom_node.fastpath.header import header_asks_urgent, part10_header, scan_header
from dicom_node.fastpath.reactor import EventRequestHandler, unbind_logging_handlers
from dicom_node.spool import Spool
from dicom_node.tls import server_context
from medclass.errors import MedClassError

log = logging.getLogger("dicom_node.scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210

# Storage SOP classes whose instances carry pixel data to classify. Everything
# else (SR, KOS, PR, RT, encapsulated PDF, ...) is accepted and set aside, so that
# a PACS pushing a whole study does not see the push fail.
_NON_IMAGE_WORDS = ("SR Storage", "Structured Report", "Presentation State", "Key Object", "Encapsulated",
                    "RT Structure", "RT Plan", "RT Dose", "RT Beams", "Waveform", "Raw Data", "Segmentation",
                    "Surface", "Spectroscopy", "Registration", "Fiducials", "Measurement", "Hanging Protocol",
                    "Color Palette", "Implant", "Radiation Dose", "Procedure Log")


@functools.lru_cache(maxsize=1024)
def is_image_sop_class(uid: str) -> bool:
    """Whether a storage SOP class carries images (judged by its registered name)."""
    name = UID(uid).name
    if "Image Storage" in name or "Photograph" in name or "Video" in name:
        return True
    return not any(w in name for w in _NON_IMAGE_WORDS) and name != uid


_HEADER_TAGS = [Tag(t) for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
                                    "RequestedProcedurePriority", "RequestAttributesSequence",
                                    "PixelData", "FloatPixelData", "DoubleFloatPixelData")]


def read_header(raw: bytes, is_implicit_vr: bool, is_little_endian: bool) -> Dataset:
    """The few elements the SCP needs (UIDs, modality, priority, whether there is pixel data), pixel data not read.

    About half the cost of decoding every element (``event.dataset``).
    """
    return read_dataset(BytesIO(raw), is_implicit_vr, is_little_endian, defer_size=1024, specific_tags=_HEADER_TAGS)


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str | None = None) -> bytes:
    """Preamble, ``DICM`` and File Meta Information written by pydicom (the path without ``fast_path``).

    :func:`dicom_node.fastpath.header.part10_header` gives the same bytes, directly encoded.
    """
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buf = DicomBytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


class SharedUIDContext(PresentationContext):
    """A presentation context whose deep copy shares its (immutable) UIDs.

    pynetdicom deep-copies the acceptor's supported contexts for every association.
    With every storage SOP class in every transfer syntax (170 x 45 UIDs) that copy
    re-validates each UID and takes about 0.13 s of CPU while holding the GIL, which
    stalls every other association. UIDs are immutable strings, so a copy with a new
    transfer syntax list is equivalent.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedUIDContext:
        new = copy.copy(self)
        new._transfer_syntax = list(self._transfer_syntax)
        return new

    @classmethod
    def of(cls, context: PresentationContext) -> SharedUIDContext:
        """The same context, with the cheap deep copy."""
        new = copy.copy(context)
        new.__class__ = cls
        new._transfer_syntax = list(context._transfer_syntax)
        return new


def set_tcp_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: send each PDU at once (no Nagle delay before small responses)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the connection is already gone: pynetdicom handles that
            pass


class SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with ``SO_REUSEPORT``: several processes listen on one port.

    The kernel gives each new connection to one of them (:mod:`dicom_node.ingest`).
    Only processes of the same user can join the port.
    """

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class StorageSCP:
    """C-ECHO and C-STORE SCP that persists every instance before acknowledging it.

    Parameters
    ----------
    config : NodeConfig
    spool : Spool
    on_stored : callable, optional
        Called with ``(study_uid, seconds)`` after each stored instance (metrics).
    on_rejected : callable, optional
        Called with a reason keyword after each failure status or quarantine.
    reuse_port : bool
        Listen with ``SO_REUSEPORT``, so that other ingest processes can share the port.
    announce : bool
        Log the listening address and a missing allow list (the node's own SCP does;
        its helper processes stay quiet).
    """

    def __init__(self, config: NodeConfig, spool: Spool, on_stored: Callable[[str, float, int], None] | None = None,
                 on_rejected: Callable[[str], None] | None = None, reuse_port: bool = False,
                 announce: bool = True) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.announce = announce
        self.spool = spool
        self.on_stored = on_stored or (lambda *a: None)
        self.on_rejected = on_rejected or (lambda *a: None)
        self.ae = AE(ae_title=config.ae_title)
        # Every storage SOP class in every transfer syntax pydicom knows: the bytes are
        # stored as received, so compressed syntaxes cost nothing here.
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self.ae.maximum_associations = 16
        # Largest PDU the node accepts (dcmtk's maximum): a 39 kB CT arrives in one P-DATA PDU, not three,
        # and pynetdicom's per-PDU work (state machine, queues, events) is a good part of its per-instance cost.
        self.ae.maximum_pdu_size = 131072
        self.ae.require_calling_aet = [a["ae_title"] for a in config.allow] if config.allow else []
        self.server = None
        # The fast path (dicom_node.fastpath) or pynetdicom's own loops and pydicom: one switch, and
        # a loud stop at start when the fast path is asked for on a pynetdicom it was not written for.
        self.fast = bool(getattr(config, "fast_path", True))
        check_fast_path(self.fast)

    # ---------------------------------------------------------------- lifecycle

    def start(self, port: int | None = None) -> None:
        """Start listening (non-blocking) on ``port`` (default: the configured one)."""
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_CONN_OPEN, self.handle_open),
        ]
        contexts = [SharedUIDContext.of(cx) for cx in self.ae.supported_contexts]
        if not self.config.allow and self.announce:
            log.warning("no [[allow]] list in the config: any calling AE may send to %s", self.config.ae_title)
        port = self.config.port if port is None else port
        try:
            # What AE.start_server does, with the node's server class (shared port) and request handler
            # (event-driven association reactors).
            kwargs = {"request_handler": EventRequestHandler} if self.fast else {}
            self.server = self.ae.make_server((self.config.bind, port), evt_handlers=handlers,
                                              ssl_context=self.ssl_context(), contexts=contexts,
                                              server_class=SharedPortServer if self.reuse_port
                                              else ThreadedAssociationServer, **kwargs)
            threading.Thread(target=self.server.serve_forever, name="medclass-node-acceptor", daemon=True).start()
            self.ae._servers.append(self.server)  # AssociationServer.shutdown removes it from there
        except OSError as e:
            raise MedClassError(f"cannot listen on {self.config.bind}:{port} ({e.strerror or e})",
                                "pass another --port, or stop the program that uses this one") from None
        self.port = self.server.server_address[1]
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            unbind_logging_handlers(self.server)
        if self.announce:
            log.info("%s listening on %s:%d%s", self.config.ae_title, self.config.bind, self.port,
                     " (TLS)" if self.config.tls else "")

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context from ``[tls]`` (cert, key, optional ca to require client certificates)."""
        return server_context(self.config.tls)

    # ---------------------------------------------------------------- handlers

    def handle_open(self, event: Any) -> None:
        """Reject hosts not on the allow list (the AE title is checked by pynetdicom itself)."""
        set_tcp_nodelay(event)
        if not self.config.allow:
            return
        host = event.address[0]
        hosts = {a.get("host") for a in self.config.allow}
        if None not in hosts and host not in hosts:
            log.warning("connection from %s refused: host not in [[allow]]", host)
            self.on_rejected("host")
            # Close the connection before any PDU: an A-ABORT is not valid before the
            # A-ASSOCIATE-RQ arrives, and pynetdicom's state machine raises on it.
            event.assoc.dul.socket.close()

    def _allowed(self, event: Any) -> bool:
        calling = event.assoc.requestor.ae_title.strip()
        host = event.assoc.requestor.address
        return any(a["ae_title"] == calling and a.get("host") in (None, host) for a in self.config.allow)

    def handle_echo(self, event: Any) -> int:
        return SUCCESS

    def handle_store(self, event: Any) -> int:
        """Persist one instance; 0x0000 only once it is durable."""
        t0 = time.perf_counter()
        calling = event.assoc.requestor.ae_title.strip()
        if self.config.allow and not self._allowed(event):
            # AE title allowed from another host: refuse per instance (0xC210 is the nearest status).
            log.warning("C-STORE from %s at %s refused: AE title and host are not allowed together", calling,
                        event.assoc.requestor.address)
            self.on_rejected("not_allowed")
            return CANNOT_UNDERSTAND
        try:
            raw = event.request.DataSet.getvalue()  # the data set as the peer encoded it
            ts = event.context.transfer_syntax
            sop_class = str(event.request.AffectedSOPClassUID)
            # The file as received: Part 10 header, then the data set's bytes, never decoded and re-encoded.
            meta = part10_header if self.fast else file_meta_bytes
            data = [meta(sop_class, str(event.request.AffectedSOPInstanceUID), str(ts), calling), raw]
        except Exception as e:  # a malformed request; pynetdicom would otherwise answer 0xC001
            log.warning("C-STORE from %s: cannot read the request (%s)", calling, e)
            self.on_rejected("unreadable")
            return CANNOT_UNDERSTAND
        try:
            scanned = (scan_header(raw, ts.is_implicit_VR, ts.is_little_endian)
                       if self.fast and not ts.is_deflated else None)
            if scanned is not None:
                study_uid, series_uid, own_sop_uid, modality, has_pixels, urgent = scanned
            else:  # deflated, big endian, unusual or an empty UID: pydicom, which also says what is wrong
                ds = event.dataset if ts.is_deflated else read_header(raw, ts.is_implicit_VR, ts.is_little_endian)
                study_uid = str(ds.StudyInstanceUID or "").strip()
                series_uid = str(ds.SeriesInstanceUID or "").strip()
                own_sop_uid = str(ds.SOPInstanceUID or "").strip()
                modality = str(ds.get("Modality", "") or "")
                has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
                urgent = header_asks_urgent(ds)
            # A C-STORE sent at HIGH priority counts too: another node forwards its urgent studies so.
            urgent = urgent or event.request.Priority == 1
            sop_uid = str(event.request.AffectedSOPInstanceUID or own_sop_uid)
        except Exception as e:  # random bytes or a header without the UIDs a study needs
            reason = f"cannot parse the dataset or it lacks Study/Series/SOP Instance UID ({type(e).__name__}: {e})"
            return self._reject(data, reason, calling, "undecodable")
        empty = [name for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP", own_sop_uid))
                 if not uid]
        if empty:
            # Accepted, such an instance would be classified into a study no PACS can file, and its
            # report refused for ever: refuse it here, where the sender sees it.
            return self._reject(data, f"empty {' and '.join(empty)} Instance UID in the data set; the sender must "
                                "give every instance its UIDs", calling, "empty_uid", sop_uid or None, study_uid or None)
        if not is_image_sop_class(sop_class):
            # Logged skip: the PACS's push stays successful, the object is kept for inspection.
            self._quarantine(data, f"not an image (SOP class {UID(sop_class).name}); not classified", calling,
                             sop_uid, study_uid)
            log.info("skipped a %s instance from %s (not an image)", UID(sop_class).name, calling)
            self.on_rejected("non_image")
            return SUCCESS
        if not has_pixels:
            return self._reject(data, f"a {UID(sop_class).name} without Pixel Data (truncated or damaged)",
                                calling, "no_pixel_data", sop_uid, study_uid)
        try:
            self.spool.store(data, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class=sop_class,
                             modality=modality, calling_ae=calling, urgent=urgent)
        except OSError as e:
            log.error("cannot store an instance from %s: %s; free disk space or fix permissions of %s", calling, e,
                      self.spool.spool_dir)
            self.on_rejected("disk")
            return OUT_OF_RESOURCES
        except Exception as e:  # the database: busy beyond its timeout, or full
            log.error("cannot record an instance from %s: %s", calling, e)
            self.on_rejected("database")
            return OUT_OF_RESOURCES
        self.on_stored(modality, time.perf_counter() - t0, len(data[0]) + len(data[1]))
        return SUCCESS

    def _quarantine(self, data: list[bytes], reason: str, calling: str, sop_uid: str | None = None,
                    study_uid: str | None = None) -> None:
        try:
            self.spool.quarantine(data, reason, calling_ae=calling, sop_uid=sop_uid, study_uid=study_uid)
        except Exception as e:  # quarantine is best effort; the status already tells the sender
            log.error("cannot quarantine an object from %s: %s", calling, e)

    def _reject(self, data: list[bytes], reason: str, calling: str, kind: str, sop_uid: str | None = None,
                study_uid: str | None = None) -> int:
        log.warning("C-STORE from %s refused (0xC210): %s; the object is in %s", calling, reason,
                    self.spool.quarantine_dir)
        self._quarantine(data, reason, calling, sop_uid, study_uid)
        self.on_rejected(kind)
        return CANNOT_UNDERSTAND
