"""Build the storage SCP's Application Entity from ``Settings`` and run it.

Conformance in short (PS3.2 style):

- Verification SCP (C-ECHO).
- Storage SCP (C-STORE) for Computed Radiography Image Storage, Digital X-Ray Image Storage
  For Presentation and For Processing, Secondary Capture Image Storage
  (:data:`dicom_node.contexts.STORAGE_SOP_CLASSES`), in every transfer syntax pydicom can
  decode here (:func:`dicom_node.contexts.supported_transfer_syntaxes`). Other abstract
  syntaxes are refused per presentation context (PS3.8 9.3.3.2 result 3).
- Maximum PDU received: ``Settings.max_pdu`` (128 KiB by default).
- PDUs received are bounded before they are read (:mod:`dicom_node.guard`, PS3.8 9.3):
  P-DATA-TF by the maximum PDU above, association PDUs by 128 KiB; a larger declared
  length, or a PDU not received whole within ``Settings.dicom_read_timeout_seconds``, gets
  A-ABORT. No association exists before a whole, decodable A-ASSOCIATE-RQ has arrived, so
  connections that end before one hold no association slot. One peer address holds at most
  ``Settings.max_associations_per_peer`` live connections (plain and TLS together);
  timeouts: ``Settings.dicom_acse_timeout_seconds`` (association request, release),
  ``Settings.dicom_network_timeout_seconds`` (idle association).
- Called AE title: the node's own, unless ``Settings.accept_any_called_aet``; otherwise
  A-ASSOCIATE-RJ rejected-permanent, service-user, reason 7 "called-AE-title-not-recognized".
  Calling AE titles: any when neither ``Settings.allowed_peers`` (AE title and address
  pairs) nor ``Settings.allowed_calling_aets`` is set, otherwise those only; others get
  reason 3 "calling-AE-title-not-recognized" (PS3.8 9.3.4; :mod:`dicom_node.peers`).
- A data set larger than ``Settings.max_object_bytes`` (256 MiB) aborts its association
  while it arrives (:mod:`dicom_node.object_size`).
- DICOM over TLS on ``Settings.tls_port`` when a certificate is configured
  (:mod:`dicom_node.tls`, PS3.15 Annex B).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import guard, object_size, peers, storage, tls
from dicom_node.contexts import STORAGE_SOP_CLASSES, VERIFICATION, supported_transfer_syntaxes
from dicom_node.handlers import (
    Enqueue,
    StoreContext,
    handle_aborted,
    handle_accepted,
    handle_conn_open,
    handle_dimse_recv,
    handle_echo,
    handle_rejected,
    handle_store,
)
from fracture_triage import tls_context
from fracture_triage.settings import Settings

logger = logging.getLogger(__name__)

#: Associations handled at once; a modality and a PACS or two need far fewer.
MAX_ASSOCIATIONS = 16
#: Seconds a shutdown waits for C-STORE requests being handled before aborting associations.
SHUTDOWN_GRACE_S = 10.0


def build_ae(settings: Settings) -> AE:
    """The Application Entity: AE title, PDU size, calling AE filter, presentation contexts."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.acse_timeout = settings.dicom_acse_timeout_seconds
    ae.network_timeout = settings.dicom_network_timeout_seconds
    # Calling and called AE titles are checked by dicom_node.peers (EVT_REQUESTED).
    ae.add_supported_context(VERIFICATION)
    syntaxes = supported_transfer_syntaxes()
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    return ae


class StorageSCP:
    """The running node: ``start()`` (non-blocking) or ``serve_forever()``, then ``shutdown()``.

    Usable as a context manager (started on enter, shut down on exit). ``port`` is the port
    actually bound (useful when ``Settings.dicom_port`` is 0).
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        enqueue: Enqueue,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.context = StoreContext(settings, session_factory, enqueue)
        self.ae = build_ae(settings)
        self.peers = peers.policy(settings)
        self.object_limit = object_size.ObjectSizeLimit(settings.max_object_bytes)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._handler: type[guard.GuardedRequestHandler] = guard.GuardedRequestHandler
        self._validation_mode = pydicom_config.settings.reading_validation_mode
        #: Set to make :meth:`serve_forever` return (from a signal handler or another thread).
        self.stop_event = stop if stop is not None else threading.Event()

    @property
    def port(self) -> int:
        """The plain DICOM port."""
        if self._server is None:
            raise RuntimeError("the SCP is not started, or serves no plain port")
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int:
        """The DICOM over TLS port."""
        if self._tls_server is None:
            raise RuntimeError("the SCP is not started, or serves no TLS port")
        return int(self._tls_server.server_address[1])

    def start(self) -> StorageSCP:
        """Listen in background threads and return at once."""
        self.settings.storage_dir.mkdir(parents=True, exist_ok=True)
        # Never acknowledged (see storage.remove_stale_temporaries): deleting them loses nothing.
        removed = storage.remove_stale_temporaries(self.settings.storage_dir)
        if removed:
            logger.warning(
                "removed %d temporary file(s) of unacknowledged objects left by an earlier crash",
                removed,
            )
        # pydicom's value validation warnings quote the offending value, which may be a
        # patient identifier (an invalid Patient's Birth Date, say): the node logs none of
        # them. Values are still read as they are; the previous mode returns at shutdown.
        self._validation_mode = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo, [self.context]),
            (evt.EVT_C_STORE, handle_store, [self.context]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.context]),
            (evt.EVT_REJECTED, handle_rejected, [self.context]),
            (evt.EVT_ABORTED, handle_aborted, [self.context]),
            (evt.EVT_DIMSE_RECV, handle_dimse_recv, [self.context]),
            (evt.EVT_CONN_OPEN, handle_conn_open, [self.context]),
            (evt.EVT_REQUESTED, peers.handle_requested, [self.peers]),
            (evt.EVT_DATA_RECV, object_size.handle_data_recv, [self.object_limit]),
        ]
        servers = self._start_servers(handlers)
        self._server = servers[0] if self.settings.dicom_port else None
        self._tls_server = servers[-1] if self.settings.tls_enabled else None
        ports = []
        if self._server is not None:
            ports.append(f"{self.port}")
        if self._tls_server is not None:
            verify = "client certificates required" if self.settings.tls_ca else "no client CA"
            ports.append(f"{self.tls_port} (TLS, {verify})")
        logger.info(
            "storage SCP %s listening on %s port %s (max PDU %d, called AE: %s, peers: %s)",
            self.settings.ae_title,
            self.settings.bind_address,
            " and ".join(ports),
            self.settings.max_pdu,
            "any" if self.settings.accept_any_called_aet else self.settings.ae_title,
            ", ".join(str(p) for p in self.peers.peers) or "any",
        )
        return self

    def _start_servers(self, handlers: list[Any]) -> list[ThreadedAssociationServer]:
        """The plain port and the TLS port (:mod:`dicom_node.tls`), whichever are configured,
        each ``AE.make_server`` with :mod:`dicom_node.guard`'s request handler (on the TLS
        port, behind the TLS relay); one handler class, so its per-peer count spans both."""
        settings = self.settings
        limits = guard.Limits(
            max_pdu=settings.max_pdu,
            read_timeout=settings.dicom_read_timeout_seconds,
            per_peer=settings.max_associations_per_peer,
            associate_timeout=settings.dicom_acse_timeout_seconds,
        )
        plain_handler = guard.handler(limits)
        self._handler = plain_handler
        servers: list[ThreadedAssociationServer] = []
        if settings.dicom_port:
            servers.append(self._serve(settings.dicom_port, handlers, plain_handler))
        if settings.tls_cert is not None and settings.tls_key is not None:
            context = tls_context.server_context(
                settings.tls_cert, settings.tls_key, settings.tls_ca
            )
            tls_limits = tls.TlsLimits(
                handshake_timeout=settings.dicom_acse_timeout_seconds,
                idle_timeout=settings.dicom_network_timeout_seconds
                + settings.dicom_acse_timeout_seconds,
                per_peer=settings.max_associations_per_peer,
            )
            request_handler = tls.handler(context, tls_limits, plain_handler)
            servers.append(self._serve(settings.tls_port, handlers, request_handler))
        return servers

    def _serve(
        self, port: int, handlers: list[Any], request_handler: type[Any]
    ) -> ThreadedAssociationServer:
        """``AE.start_server(block=False)`` with our request handler."""
        server: ThreadedAssociationServer = self.ae.make_server(
            (self.settings.bind_address, port),
            evt_handlers=handlers,
            server_class=ThreadedAssociationServer,
            request_handler=request_handler,
        )
        # A connection's own thread does its TLS handshake (up to the ACSE timeout) and waits
        # for its A-ASSOCIATE-RQ (guard.await_associate_rq): socketserver must not join such
        # threads at shutdown (those still negotiating are closed there instead).
        server.daemon_threads = True
        server.block_on_close = False
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        # What start_server does too: the server's shutdown() removes itself from this list.
        self.ae._servers.append(server)
        return server

    def serve_forever(self) -> None:
        """Start if needed and block until :meth:`shutdown`, Ctrl-C or SIGTERM."""
        if self._server is None and self._tls_server is None:
            self.start()
        try:
            # Short waits keep the main thread responsive to signals (KeyboardInterrupt).
            while not self.stop_event.wait(0.5):
                pass
        except KeyboardInterrupt:
            logger.info("interrupted")
        finally:
            self.shutdown()

    def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting, let C-STORE requests in progress finish, then close everything.

        A request cut short was never acknowledged, so the peer sends it again: nothing is lost.
        """
        self.stop_event.set()
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        self._server = self._tls_server = None
        if not servers:
            return
        for server in servers:
            server.shutdown()  # no new associations
        self._handler.connections.close_negotiating()
        pydicom_config.settings.reading_validation_mode = self._validation_mode
        if not self.context.in_flight.wait_idle(grace):
            logger.warning("C-STORE requests still running after %.0f s: aborting", grace)
        for server in servers:
            for assoc in server.active_associations:
                assoc.abort()
        logger.info("storage SCP stopped")

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def run_scp(
    settings: Settings,
    enqueue: Enqueue,
    *,
    session_factory: sessionmaker[Session] | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run the storage SCP until Ctrl-C, SIGTERM or ``stop`` (the ``fracture-triage scp`` role).

    ``enqueue`` hands a :class:`~fracture_triage.messages.ClassifyInstance` to the broker and
    raises when it cannot (e.g. ``worker.queue.CeleryEnqueuer``). Without ``session_factory``
    the database at ``settings.resolved_database_url`` is used (its schema is the entry
    point's business: ``fracture_triage.cli`` migrates before any role starts). ``ready``
    is set once the port is bound. From the main thread, SIGINT and SIGTERM stop it; from
    another thread (``fracture-triage up``), set ``stop``. Returns after a clean shutdown
    (requests in progress finish first, see :meth:`StorageSCP.shutdown`).
    """
    engine = None
    if session_factory is None:
        from db.session import make_engine, make_session_factory

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url)
        session_factory = make_session_factory(engine)
    scp = StorageSCP(settings, session_factory, enqueue, stop=stop)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %d: stopping", signum)
            scp.stop_event.set()

        # Explicit handlers: SIGINT may be ignored when started in the background by a shell.
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        scp.start()
        if ready is not None:
            ready.set()
        scp.serve_forever()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if engine is not None:
            engine.dispose()
