"""Delivery: C-STORE the reports back to the PACS and forward studies, with retries.

The queue is the ``outbox`` table, so it survives restarts. A failed attempt is
retried with exponential backoff (``retry_base_seconds`` doubling up to
``retry_max_seconds``) until it succeeds; nothing is dropped unless
``max_send_attempts`` is set. Delivery is at-least-once on the wire and exactly
once at the PACS: a row is marked ``sent`` after the peer's success status, and a
resend after a crash in between carries the same SOP Instance UID, which a PACS
stores once.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from dicom_node.config import NodeConfig
from dicom_node.destination import Destination
from dicom_node.metrics import NodeMetrics
from dicom_node.scp import set_tcp_nodelay
from dicom_node.spool import JobDatabase, Spool
from dicom_node.tls import sends_tls

log = logging.getLogger("dicom_node.sender")


class SendError(Exception):
    """A delivery attempt failed; the message says why (retried later)."""


class OutboxSender:
    """Send what the worker queued.

    Parameters
    ----------
    config : NodeConfig
    db : JobDatabase
    spool : Spool
    metrics : NodeMetrics
    ssl_context : ssl.SSLContext, optional
        The client context for peers reached over TLS (:func:`dicom_node.tls.client_context`);
        used for the destinations ``[tls] send`` names (all of them by default).
    """

    def __init__(self, config: NodeConfig, db: JobDatabase, spool: Spool, metrics: NodeMetrics,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.metrics = metrics
        self.ssl_context = ssl_context

    def due(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        rows = self.db.query("SELECT * FROM outbox WHERE state='pending' AND next_attempt <= ? "
                             "ORDER BY CASE priority WHEN 1 THEN 0 WHEN 0 THEN 1 ELSE 2 END, id LIMIT 20", (now,))
        pending = self.db.query("SELECT COUNT(*) AS n FROM outbox WHERE state='pending'")[0]["n"]
        self.metrics.outbox_pending.set(pending)
        return [dict(r) for r in rows]

    def run_once(self) -> int:
        """Attempt every due item once; return how many were delivered."""
        delivered = 0
        for item in self.due():
            try:
                self.deliver(item)
            except SendError as e:
                self._failed(item, str(e))
                continue
            except Exception as e:  # anything else (a file gone, a pynetdicom error): retried, logged
                self._failed(item, f"{type(e).__name__}: {e}")
                continue
            now = time.time()
            # Counted first: a row marked sent is always in the metrics already (it was delivered either way).
            self.metrics.sent.labels(item["kind"]).inc()
            self.db.execute("UPDATE outbox SET state='sent', sent=?, last_error=NULL, attempts=attempts+1 "
                            "WHERE id=?", (now, item["id"]))
            if item["kind"] == "sr":
                stable = self.db.query("SELECT stable FROM studies WHERE study_uid=?", (item["study_uid"],))
                if stable and stable[0]["stable"]:
                    self.metrics.turnaround_seconds.observe(max(0.0, now - stable[0]["stable"]))
            log.info("%s of study %s delivered to %s", "SR" if item["kind"] == "sr" else "study",
                     item["study_uid"], item["destination"])
            delivered += 1
        return delivered

    def _failed(self, item: dict[str, Any], error: str) -> None:
        attempts = item["attempts"] + 1
        delay = min(self.config.retry_max_seconds, self.config.retry_base_seconds * 2 ** (attempts - 1))
        give_up = self.config.max_send_attempts and attempts >= self.config.max_send_attempts
        self.db.execute("UPDATE outbox SET attempts=?, next_attempt=?, last_error=?, state=? WHERE id=?",
                        (attempts, time.time() + delay, error, "failed" if give_up else "pending", item["id"]))
        self.metrics.send_failures.labels(item["kind"]).inc()
        log.warning("sending %s of study %s to %s failed (attempt %d): %s; %s", item["kind"], item["study_uid"],
                    item["destination"], attempts, error,
                    "giving up (max_send_attempts)" if give_up else f"retrying in {delay:.0f} s")

    def deliver(self, item: dict[str, Any]) -> None:
        """C-STORE one outbox item; raises :class:`SendError` on any failure."""
        if item["kind"] == "sr":
            paths = [item["path"]]
        else:
            paths = [i["path"] for i in self.spool.instances(item["study_uid"])]
        self.store(Destination.parse(item["destination"]), paths, priority=item["priority"])

    def store(self, dest: Destination, paths: list[str], priority: int = 0) -> None:
        """Send files in one association; every one must get a success or warning status.

        Each (SOP class, transfer syntax) of the files is proposed in its own presentation
        context, beside an uncompressed one per SOP class, so that a study received in
        several syntaxes (JPEG-LS and RLE and uncompressed, say) goes out as received. A
        peer that refuses a compressed syntax gets those files decompressed.
        """
        if not paths:
            return
        metas = {}
        for p in paths:
            meta = pydicom.filereader.read_file_meta_info(p)
            metas[p] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        syntaxes: dict[str, set[str]] = {}
        for sop_class, ts in metas.values():
            syntaxes.setdefault(sop_class, set()).add(ts)
        requested = []
        for sop_class, tss in syntaxes.items():
            requested.append(build_context(sop_class, _UNCOMPRESSED))
            requested += [build_context(sop_class, ts) for ts in sorted(tss - set(_UNCOMPRESSED))]
        if len(requested) > 128:
            raise SendError(f"{len(requested)} SOP class and transfer syntax pairs in one study exceed DICOM's 128 "
                            "presentation contexts")
        ae = AE(ae_title=self.config.ae_title)
        ae.requested_contexts = requested
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        use_tls = self.ssl_context is not None and sends_tls(self.config.tls, dest.ae_title)
        tls = (self.ssl_context, dest.host) if use_tls else None
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
        if not assoc.is_established:
            hint = (" over TLS (does it speak TLS, is its certificate signed by [tls] peer_ca and does it name "
                    f"{dest.host}, and does it trust the node's certificate?)" if use_tls else
                    f" (is it running, and does it know AE {self.config.ae_title}?)")
            raise SendError(f"{dest} refused or did not answer the association{hint}")
        try:
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            for p in paths:
                sop_class, ts = metas[p]
                if (sop_class, ts) in accepted or ts in _UNCOMPRESSED:
                    status = assoc.send_c_store(p, priority=priority)
                else:
                    status = assoc.send_c_store(_decompressed(p, dest, ts), priority=priority)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError(f"{dest} did not answer the C-STORE (connection lost or timed out)")
                if code != 0 and not 0xB000 <= code <= 0xBFFF:
                    raise SendError(f"{dest} answered C-STORE with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()


_UNCOMPRESSED = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]


def _decompressed(path: str, dest: Destination, ts: str) -> pydicom.Dataset:
    """The file with its pixel data decoded, for a peer that does not accept its transfer syntax."""
    try:
        ds = pydicom.dcmread(path)
        # Same instance, same UID: pydicom would otherwise mint a new SOP Instance UID, and the
        # peer would hold two copies of one image (lossy sources stay marked lossy in their header).
        ds.decompress(generate_instance_uid=False)
    except Exception as e:
        raise SendError(f"{dest} does not accept {UID(ts).name} and the image cannot be decompressed "
                        f"({type(e).__name__}: {e}); let the peer accept {UID(ts).name}") from None
    return ds
