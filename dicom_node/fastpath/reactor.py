"""Event-driven reactors for the node's incoming associations (pynetdicom 3.0).

Each pynetdicom association runs two threads that poll: the DUL reactor checks its
socket and queues every millisecond, and the association reactor checks for a
decoded DIMSE message every millisecond. On the benchmark machine eight idle
associations cost about 0.6 of a CPU core in those wake-ups, and under load the
wake-ups compete for the GIL with the threads doing the work; a message also waits
up to a millisecond at each of three hand-offs.

Here the same loops wait for their work instead:

- the DUL thread waits in ``select`` on its socket and on a wake-up socket that is
  written whenever something is queued for it (a PDU to send, an event) or it is
  told to stop;
- the association thread waits on an event set whenever a DIMSE message or an
  A-RELEASE / A-ABORT arrives for it, when it is told to stop, or when its DUL thread ends.

Both still look around every :data:`IDLE_SECONDS` for the timers pynetdicom checks in
its loops (ARTIM, network timeout). The loops are pynetdicom 3.0.4's, with the
sleeps replaced; on another pynetdicom version the node refuses to start with
``fast_path = true`` (:func:`dicom_node.fastpath.check_fast_path`).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import Any, Callable, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger("dicom_node.fastpath.reactor")

#: The longest a reactor waits before it looks at its timers again (seconds).
IDLE_SECONDS = 0.05


def unbind_logging_handlers(obj: Any) -> None:
    """Unbind pynetdicom's standard logging handlers from a server or an association.

    They format every PDU and DIMSE message (copying each data set once more) under
    the association's lock even when the ``pynetdicom`` logger would drop the result.
    Each association binds them again for itself (``Association._bind_defaults``).
    """
    try:
        from pynetdicom import _handlers as h
    except ImportError:  # another pynetdicom layout: keep its handlers
        return
    for event, name in ((evt.EVT_PDU_RECV, "standard_pdu_recv_handler"),
                        (evt.EVT_PDU_SENT, "standard_pdu_sent_handler"),
                        (evt.EVT_DIMSE_RECV, "standard_dimse_recv_handler"),
                        (evt.EVT_DIMSE_SENT, "standard_dimse_sent_handler")):
        handler = getattr(h, name, None)
        if handler is not None:
            obj.unbind(event, handler)


class _WakingQueue(queue.Queue):
    """A queue that calls ``wake`` after each ``put``."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class EventDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, waiting in ``select`` instead of polling."""

    def __init__(self, assoc: EventAssociation) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        super().__init__(assoc)
        self.event_queue = _WakingQueue(self.poke)
        self.to_provider_queue = _WakingQueue(self.poke)
        self.to_user_queue = _WakingQueue(assoc.wake.set)  # A-RELEASE and A-ABORT for the association thread

    # ``_kill_thread`` is set from other threads (release, abort, stop): wake the reactor to see it.
    @property
    def _kill_thread(self) -> bool:
        return self.__dict__.get("_kill_thread_flag", False)

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["_kill_thread_flag"] = value
        if value:
            self.poke()

    def poke(self) -> None:
        """Wake the reactor thread (from any thread)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the wake-up buffer is full (it will wake anyway) or the reactor has ended
            pass

    def _wait(self, timeout: float) -> None:
        """Until the socket is readable, something is queued, or ``timeout`` seconds pass."""
        sock = getattr(self.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes select cannot see
            return
        fds: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() >= 0:
            fds.append(sock)
        try:
            select.select(fds, [], [], timeout)
        except (OSError, ValueError):  # the socket was closed meanwhile: the loop finds out
            time.sleep(0.001)
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError) or closed
            pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``, waiting in :meth:`_wait`."""
        try:
            self._reactor()
        finally:
            cast(EventAssociation, self.assoc).wake.set()  # the association thread checks dul.is_alive()
            self._wake_r.close()
            self._wake_w.close()

    def _reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast("AssociationSocket", self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                # Nothing happened in the last loop: wait for the socket or the queues (pynetdicom sleeps 1 ms).
                self._wait(IDLE_SECONDS)

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                logging.getLogger("pynetdicom.dul").error("Exception in DUL.run(), aborting association")
                logging.getLogger("pynetdicom.dul").exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _ui(uid: str) -> bytes:
    b = str(uid).encode("ascii")
    return b + b"\0" if len(b) % 2 else b


def store_response_pdv(message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    """The presentation data value of a C-STORE-RSP without a data set (PS3.7 9.3.1.2).

    Message control header ``0x03`` (command, last fragment), then the command set in
    implicit VR little endian: the bytes pynetdicom's encoder makes, in a fiftieth of its time.
    """
    us = struct.Struct("<H").pack
    body = b"".join((_command_element(0x0002, _ui(sop_class)), _command_element(0x0100, us(0x8001)),
                     _command_element(0x0120, us(message_id)), _command_element(0x0800, us(0x0101)),
                     _command_element(0x0900, us(status)), _command_element(0x1000, _ui(sop_instance))))
    return b"\x03" + _command_element(0x0000, struct.pack("<I", len(body))) + body


class StoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider; a plain C-STORE status response is encoded by :func:`store_response_pdv`.

    Anything else (a response with an error comment or offending element, a request,
    a peer whose PDUs are too small, a handler bound to ``EVT_DIMSE_SENT``) goes through
    pynetdicom as before.
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and isinstance(primitive.Status, int) and primitive.ErrorComment is None
                and primitive.OffendingElement is None and primitive.AffectedSOPClassUID
                and primitive.AffectedSOPInstanceUID and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            pdv = store_response_pdv(primitive.MessageIDBeingRespondedTo, primitive.AffectedSOPClassUID,
                                     primitive.AffectedSOPInstanceUID, primitive.Status)
            if not self.maximum_pdu_size or len(pdv) <= self.maximum_pdu_size - 6:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, pdv))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class EventAssociation(Association):
    """An acceptor association whose reactor waits for messages instead of polling."""

    def __init__(self, ae: Any, mode: str) -> None:
        self.wake = threading.Event()
        super().__init__(ae, mode)
        self.dul = EventDUL(self)
        # Association.__init__ gave these to the DUL it made; give them to this one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self.dimse = StoreResponseDIMSE(self)
        self.dimse.msg_queue = _WakingQueue(self.wake.set)
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            unbind_logging_handlers(self)

    @property
    def _kill(self) -> bool:
        return self.__dict__.get("_kill_flag", False)

    @_kill.setter
    def _kill(self, value: bool) -> None:
        self.__dict__["_kill_flag"] = value
        if value:
            self.wake.set()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor loop, waiting on :attr:`wake` instead of sleeping 1 ms."""
        self._is_paused = False
        while not self._kill:
            if not self.dimse.msg_queue.qsize():  # never wait while a message is queued
                self.wake.wait(IDLE_SECONDS)
            self.wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logging.getLogger("pynetdicom.assoc").info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                logging.getLogger("pynetdicom.assoc").info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                logging.getLogger("pynetdicom.assoc").error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class EventRequestHandler(RequestHandler):
    """pynetdicom's request handler, making :class:`EventAssociation` acceptors."""

    def _create_association(self) -> Association:
        """pynetdicom 3.0.4's ``RequestHandler._create_association`` with :class:`EventAssociation`."""
        assoc = EventAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.strftime(datetime.now(), '%Y%m%d%H%M%S')}"
        sock = AssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc


__all__ = ["IDLE_SECONDS", "EventAssociation", "EventDUL", "EventRequestHandler",
           "StoreResponseDIMSE", "store_response_pdv", "unbind_logging_handlers"]
