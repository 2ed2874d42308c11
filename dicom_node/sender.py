"""Delivery: C-STORE (or STOW-RS) the reports back to the PACS and forward studies, with retries.

The queue is the ``outbox`` table of the job database (:mod:`dicom_node.jobs`), so it
survives restarts; urgent items (``[[forward]] priority = "high"``) go first. Delivery is
at-least-once on the wire and exactly once at the PACS: an item is marked ``sent`` after
the peer's success status, and a resend after a crash in between carries the same SOP
Instance UID, which a PACS stores once.

Transient and permanent failures:

- *Transient*, retried with exponential backoff (``retry_base_seconds`` doubling up to
  ``retry_max_seconds``): the peer refuses or does not answer the association (down,
  restarting, TLS handshake), the connection drops or times out before a C-STORE
  response, or any local error other than a missing file.
- *Permanent*, dead at once: the peer accepted the association and answered a C-STORE
  with a failure status (0xA7xx, 0xA9xx, 0xCxxx, 0x01xx, 0x02xx: out of resources, data
  set does not match the SOP class, cannot understand, refused...). The same bytes to the
  same peer get the same answer; retrying only fills its log. Also dead at once: the
  outbox file is gone, or the peer accepts neither the object's SOP class nor an
  uncompressed syntax for it.
- DICOMweb destinations (STOW-RS, :func:`dicom_node.destination.stow`) follow the same
  rules: no answer, a connection error, HTTP 5xx, 408 and 429 are transient; any other
  4xx (401 a wrong password, 403, 404 a wrong URL...) is permanent, with its remedy; so
  is an instance in the answer's Failed SOP Sequence or missing from its Referenced SOP
  Sequence. A STOW-RS of an instance the server holds already stores it once, as C-STORE.
- A transient failure gives up too, after ``give_up_after_hours`` (default 24) of
  failing, or after ``max_send_attempts`` attempts when that is set.

A given-up item is the dead letter: state ``dead`` with its reason, shown by ``medclass
node status``; ``medclass node resend STUDY_UID`` (or ``--all-dead``) queues it again,
whether the node runs (its sender picks it up at the next poll) or not.
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
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_node.config import NodeConfig
from dicom_node.destination import Destination, DicomWebTarget, SendError, parse_destination, stow
from dicom_node.jobs import JobDatabase, OutboxState, Priority
from dicom_node.metrics import NodeMetrics
from dicom_node.scp import set_tcp_nodelay
from dicom_node.spool import Spool
from dicom_node.tls import sends_tls

log = logging.getLogger("dicom_node.sender")


#: What to do about a dead item, in ``node status`` and the log.
DEAD_REMEDY = ("fix the cause (the peer's log says why it refused), then 'medclass node resend {study}' "
               "queues it again")


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
        for ep in getattr(config, "endpoints", {}).values():
            if ep.auth != "none" and ep.url.startswith("http://"):
                log.warning("[[dicomweb]] %s sends its %s credentials over plain HTTP (%s): anyone on the path can "
                            "read them; use an https:// url", ep.name, ep.auth, ep.url)

    def due(self, now: float | None = None) -> list[dict[str, Any]]:
        """The pending items due now, urgent first."""
        now = time.time() if now is None else now
        self.metrics.outbox_pending.set(self.db.outbox_count(OutboxState.PENDING))
        return self.db.due(now)

    def run_once(self) -> int:
        """Attempt every due item once; return how many were delivered."""
        delivered = 0
        for item in self.due():
            try:
                self.deliver(item)
            except SendError as e:
                self._failed(item, str(e), e.transient)
                continue
            except FileNotFoundError as e:  # the outbox file or a spooled instance is gone: it will not return
                self._failed(item, f"a file to send is gone ({e.filename})", transient=False)
                continue
            except Exception as e:  # anything else (a pynetdicom error): retried, logged
                self._failed(item, f"{type(e).__name__}: {e}", transient=True)
                continue
            now = time.time()
            # Counted first: a row marked sent is always in the metrics already (it was delivered either way).
            self.metrics.sent.labels(item["kind"]).inc()
            self.db.mark_sent(item["id"], now)
            if item["kind"] == "sr":
                study = self.db.study(item["study_uid"])
                if study and study["stable"]:
                    self.metrics.turnaround_seconds.observe(max(0.0, now - study["stable"]))
            log.info("%s of study %s delivered to %s", "SR" if item["kind"] == "sr" else "study",
                     item["study_uid"], item["destination"])
            delivered += 1
        return delivered

    def _failed(self, item: dict[str, Any], error: str, transient: bool = True) -> None:
        """Retry later, or give up (the dead letter): permanent refusal, too many attempts, too long."""
        now = time.time()
        attempts = item["attempts"] + 1
        first = item.get("first_failure") or now
        hours = float(getattr(self.config, "give_up_after_hours", 24.0) or 0)
        self.metrics.send_failures.labels(item["kind"]).inc()
        if not transient:
            why = "a refusal that will not change"
        elif self.config.max_send_attempts and attempts >= self.config.max_send_attempts:
            why = f"{attempts} attempts (max_send_attempts)"
        elif hours > 0 and now - first >= hours * 3600:
            why = f"failing for {(now - first) / 3600:.3g} h (give_up_after_hours = {hours:g})"
        else:
            delay = min(self.config.retry_max_seconds, self.config.retry_base_seconds * 2 ** (attempts - 1))
            self.db.retry_later(item["id"], attempts, now + delay, error, first)
            log.warning("sending %s of study %s to %s failed (attempt %d): %s; retrying in %.0f s", item["kind"],
                        item["study_uid"], item["destination"], attempts, error, delay)
            return
        self.db.mark_dead(item["id"], attempts, f"{error} [gave up: {why}]", first)
        log.error("sending %s of study %s to %s failed (attempt %d): %s; gave up (%s): dead letter; %s", item["kind"],
                  item["study_uid"], item["destination"], attempts, error, why,
                  DEAD_REMEDY.format(study=item["study_uid"]))

    def deliver(self, item: dict[str, Any]) -> None:
        """C-STORE (or STOW-RS) one outbox item; raises :class:`SendError` on any failure."""
        if item["kind"] == "sr":
            paths = [item["path"]]
        else:
            paths = [i["path"] for i in self.spool.instances(item["study_uid"])]
        dest = parse_destination(item["destination"])
        if isinstance(dest, DicomWebTarget):
            stow(self.config.dicomweb_endpoint(dest.url), paths)
        else:
            self.store(dest, paths, priority=Priority(item["urgency"]).dimse)

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
                            "presentation contexts", transient=False)
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
                if not any(a == sop_class for a, _ in accepted):
                    raise SendError(f"{dest} accepts no presentation context for {UID(sop_class).name}", transient=False)
                if (sop_class, ts) in accepted or ts in _UNCOMPRESSED:
                    status = assoc.send_c_store(p, priority=priority)
                else:
                    status = assoc.send_c_store(_decompressed(p, dest, ts), priority=priority)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError(f"{dest} did not answer the C-STORE (connection lost or timed out)")
                if code != 0 and not 0xB000 <= code <= 0xBFFF:
                    # The peer took the association and read the object: the same bytes get the same answer.
                    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[1]
                    raise SendError(f"{dest} refused the C-STORE with status 0x{code:04X}"
                                    + (f" ({meaning})" if meaning else ""), transient=False)
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
