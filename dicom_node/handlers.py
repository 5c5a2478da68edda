"""Event handlers of the storage SCP (pynetdicom ``evt_handlers``).

Dependencies arrive as handler arguments, pynetdicom style::

    evt_handlers=[(evt.EVT_C_STORE, handle_store, [context])]

The C-STORE handler does no inference. In order it: checks the object (``validate``), writes
it as received, durably (``storage``), records it in the database, hands a message to the
queue, and only then answers Success. Every failure answers a named status with an Error
Comment and leaves a reason in the log (and, where the UIDs allow, in the database). Logs
carry UIDs and AE titles, never patient identifiers. An object whose series or study
contradicts what is stored (``db.identity``) is refused and nothing of it is kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import identity, node_state, repository
from db.identity import IdentityConflict
from db.models import Instance, InstanceStatus, Series, Study
from db.repository import ReceivedInstance
from db.session import in_transaction
from dicom_node import storage
from dicom_node.validate import (
    CANNOT_UNDERSTAND,
    IDENTITY_CONFLICT,
    INVALID_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    SUCCESS,
    CheckedObject,
    Rejection,
    check_dataset,
    usable_uids,
)
from fracture_triage.attributes import STUDY_ATTRIBUTES
from fracture_triage.disk import Watermark
from fracture_triage.messages import ClassifyInstance
from fracture_triage.settings import Settings
from fracture_triage.uids import is_valid_uid

logger = logging.getLogger(__name__)

Enqueue = Callable[[ClassifyInstance], None]

_LOCK_STRIPES = 64

#: The Error Comment of a 0xA700 answered because the database is down: such a refusal is
#: not written to the database too (the attempt would wait on the same failure).
DATABASE_UNAVAILABLE = "database unavailable; retry later"


class InFlight:
    """Counts C-STORE requests being handled, so a shutdown can let them finish."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._cond:
            self._count += 1
        try:
            yield
        finally:
            with self._cond:
                self._count -= 1
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout=timeout)


@dataclass
class StoreContext:
    """What the handlers need: passed to them by pynetdicom as a handler argument."""

    settings: Settings
    session_factory: sessionmaker[Session]
    #: Hands a message to the broker; raises when it cannot (the instance then stays pending).
    enqueue: Enqueue
    in_flight: InFlight = field(default_factory=InFlight)
    #: The free-space reserve (``fracture_triage.disk``), checked before anything is written.
    watermark: Watermark = field(init=False)
    #: Serialise "already stored?" + write + record per SOP Instance UID within this process,
    #: so two associations sending the same instance at once store and queue it once.
    _locks: tuple[threading.Lock, ...] = field(
        default_factory=lambda: tuple(threading.Lock() for _ in range(_LOCK_STRIPES))
    )

    def __post_init__(self) -> None:
        self.watermark = Watermark(self.settings)

    def lock_for(self, sop_instance_uid: str) -> threading.Lock:
        return self._locks[hash(sop_instance_uid) % _LOCK_STRIPES]


def _status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE response status; Error Comment (0000,0902) is LO: at most 64 characters."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title.strip()}@{requestor.address}:{requestor.port}"


def handle_echo(event: Event, ctx: StoreContext) -> int:
    """C-ECHO (Verification, PS3.7 9.1.5)."""
    logger.info("C-ECHO from %s", _peer(event))
    return SUCCESS  # 0x0000 Success


def handle_accepted(event: Event, ctx: StoreContext) -> None:
    assoc = event.assoc
    refused = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
    logger.info(
        "association from %s accepted: %d presentation contexts, %d refused%s",
        _peer(event),
        len(assoc.accepted_contexts),
        len(assoc.rejected_contexts),
        f" (abstract syntaxes {', '.join(refused)})" if refused else "",
    )


def handle_rejected(event: Event, ctx: StoreContext) -> None:
    logger.warning("association from %s rejected", _peer(event))


def handle_aborted(event: Event, ctx: StoreContext) -> None:
    logger.warning("association with %s aborted", _peer(event))


def handle_conn_open(event: Event, ctx: StoreContext) -> None:
    """A connection's association is set up, not started: put :func:`handle_dimse_recv` ahead
    of pynetdicom's own EVT_DIMSE_RECV handlers (the first exception in a handler skips every
    handler after it)."""
    assoc = event.assoc
    bound = cast(list[tuple[Any, Any]], assoc.get_handlers(evt.EVT_DIMSE_RECV))
    others = [h for h in bound if h[0] is not handle_dimse_recv]
    for func, _args in others:
        assoc.unbind(evt.EVT_DIMSE_RECV, func)
    for func, args in others:
        assoc.bind(evt.EVT_DIMSE_RECV, func, args)


def handle_dimse_recv(event: Event, ctx: StoreContext) -> None:
    """Answer the C-STORE requests pynetdicom would drop unanswered (EVT_DIMSE_RECV).

    pynetdicom ignores a request lacking a required command element (``is_valid_request``):
    a C-STORE-RQ with an empty or absent Affected SOP Instance UID (0000,1000), mandatory in
    PS3.7 Table 9.3-1, gets no response and the peer waits out its own timeout. It is
    answered here, on the DUL's thread, before pynetdicom discards it. Bound ahead of
    pynetdicom's own EVT_DIMSE_RECV logging handler, which raises on such a request and so
    stops the handlers after it (see :func:`handle_conn_open`).
    """
    message = event.message
    if not isinstance(message, C_STORE_RQ) or message.context_id is None:
        return
    command = message.command_set
    if command.get("AffectedSOPInstanceUID") or command.get("MessageID") is None:
        return  # a request pynetdicom handles, or one that cannot be answered at all
    logger.warning("C-STORE-RQ from %s without an Affected SOP Instance UID: refused", _peer(event))
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = int(command.MessageID)
    if command.get("AffectedSOPClassUID"):
        rsp.AffectedSOPClassUID = command.AffectedSOPClassUID
    rsp.Status = INVALID_SOP_INSTANCE  # 0x0117 Invalid SOP Instance (PS3.7 C.5.6)
    # pynetdicom initialises ErrorComment to None without an annotation: mypy infers None.
    rsp.ErrorComment = "Affected SOP Instance UID (0000,1000) is missing"  # type: ignore[assignment]
    event.assoc.dimse.send_msg(rsp, message.context_id)


# --- received attributes ---------------------------------------------------------------------

#: ReceivedInstance field -> (DICOM keyword, column whose length bounds the value): the
#: study's patient and study attributes, then the series' and instance's own.
_ATTRIBUTES: dict[str, tuple[str, Any]] = {
    **{a.name: (a.keyword, getattr(Study, a.name)) for a in STUDY_ATTRIBUTES},
    "modality": ("Modality", Series.modality),
    "body_part_examined": ("BodyPartExamined", Series.body_part_examined),
    "series_number": ("SeriesNumber", Series.series_number),
    "instance_number": ("InstanceNumber", Instance.instance_number),
}
_DATES = {"patient_birth_date", "study_date"}


def _attribute(ds: Dataset, name: str) -> str | None:
    """One worklist attribute as text that fits its column, or ``None``.

    Real objects carry over-long or malformed values; a value that does not fit must not make
    the database refuse the instance (PostgreSQL enforces VARCHAR lengths, SQLite does not).
    """
    keyword, column = _ATTRIBUTES[name]
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        text = "\\".join(str(v) for v in value) if isinstance(value, list) else str(value)
    except Exception:  # noqa: BLE001 - an undecodable value is left out, not fatal
        return None
    text = text.replace("\x00", "").strip()
    if name in _DATES:
        text = "".join(ch for ch in text if ch.isdigit())
        return text if len(text) == 8 else None
    length = getattr(column.type, "length", None)
    return (text[:length] if length else text) or None


def received_instance(
    ds: Dataset,
    checked: CheckedObject,
    *,
    path: Path,
    calling_ae: str,
    transfer_syntax: UID,
    failure_reason: str | None,
    content_sha256: str | None = None,
) -> ReceivedInstance:
    attrs = {name: _attribute(ds, name) for name in _ATTRIBUTES}
    return ReceivedInstance(
        sop_instance_uid=checked.uids.sop_instance_uid,
        sop_class_uid=checked.uids.sop_class_uid,
        study_instance_uid=checked.uids.study_instance_uid,
        series_instance_uid=checked.uids.series_instance_uid,
        storage_path=str(path),
        calling_ae_title=calling_ae[:16] or None,
        transfer_syntax_uid=str(transfer_syntax),
        failure_reason=failure_reason,
        content_sha256=content_sha256,
        **attrs,
    )


# --- C-STORE ---------------------------------------------------------------------------------


def _encoded_chunks(event: Event, calling_ae: str) -> list[bytes]:
    """The object in the DICOM File Format (PS3.10 7.1), data set bytes exactly as received.

    The File Meta Information is built from the C-STORE command and the presentation context
    (Media Storage SOP Class/Instance UID, Transfer Syntax UID), plus the sender's AE title in
    Source Application Entity Title (0002,0016).
    """
    meta = event.file_meta
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    return [b"\x00" * 128, b"DICM", encode_file_meta(meta), event.encoded_dataset(False)]


def _record_refusal(
    ctx: StoreContext, ds: Dataset | None, event: Event, rejection: Rejection, calling_ae: str
) -> None:
    """Keep a refused object for the administrator and record it when its UIDs allow."""
    try:
        content = b"".join(_encoded_chunks(event, calling_ae))
        path = storage.rejected_path(ctx.settings.storage_dir, content)
        storage.write_atomic(path, [content])
    except Exception as exc:  # noqa: BLE001 - keeping the copy is best effort
        logger.warning("could not keep the refused object: %s", type(exc).__name__)
        return
    uids = usable_uids(ds) if ds is not None else None
    if uids is None:
        logger.info("refused object kept as %s (no usable UIDs to record)", path.name)
        return
    reason = f"{repository.REFUSED_PREFIX} (0x{rejection.status:04X}): {rejection.reason}"
    checked = CheckedObject(uids=uids, unclassifiable=None)
    assert ds is not None
    rec = received_instance(
        ds,
        checked,
        path=path,
        calling_ae=calling_ae,
        transfer_syntax=event.context.transfer_syntax,
        failure_reason=reason,
    )
    try:
        in_transaction(ctx.session_factory, lambda s: repository.record_received(s, rec))
    except IdentityConflict as conflict:  # not recorded under a study that is not its own
        logger.warning(
            "refused instance %s not recorded: %s", uids.sop_instance_uid, conflict.detail
        )
    except Exception as exc:  # noqa: BLE001 - the failure status is answered anyway
        logger.warning(
            "could not record refused instance %s: %s", uids.sop_instance_uid, type(exc).__name__
        )


def handle_store(event: Event, ctx: StoreContext) -> Dataset:
    """C-STORE (Storage Service Class, PS3.4 Annex B): validate, store, record, queue.
    Every failure status answered is also recorded (``db.node_state.record_refusal``)."""
    with ctx.in_flight.track():
        start = time.monotonic()
        answer = _answer_store(event, ctx, start)
        if is_failure(int(answer.Status)):
            _note_refusal(ctx, event, answer)
        return answer


def is_failure(status: int) -> bool:
    """A failure status of a C-STORE response: neither Success (0x0000) nor a Warning
    (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF; PS3.4 Table B.2-1, PS3.7 C.4)."""
    return status not in (SUCCESS, 0x0001, 0x0107, 0x0116) and not 0xB000 <= status <= 0xBFFF


def _note_refusal(ctx: StoreContext, event: Event, answer: Dataset) -> None:
    """Record a refused C-STORE for ``/metrics``, best effort (the answer goes out anyway)."""
    comment = str(answer.get("ErrorComment", "") or "")
    if comment == DATABASE_UNAVAILABLE:
        return
    affected = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    try:
        calling_ae = event.assoc.requestor.ae_title.strip()
    except AttributeError:
        calling_ae = ""

    def note(session: Session) -> None:
        node_state.record_refusal(
            session,
            int(answer.Status),
            comment or None,
            sop_instance_uid=affected if is_valid_uid(affected) else None,
            calling_ae_title=calling_ae or None,
        )

    try:
        in_transaction(ctx.session_factory, note)
    except Exception as exc:  # noqa: BLE001 - a metric lost is no reason to fail the answer
        logger.warning("could not record a refused C-STORE: %s", type(exc).__name__)


def _answer_store(event: Event, ctx: StoreContext, start: float) -> Dataset:
    full = ctx.watermark.refusal(_received_bytes(event))
    if full is not None:
        # 0xA700 Refused: Out of Resources - below the free-space watermark; nothing of
        # the object is written, the peer keeps it and retries later.
        return _status(OUT_OF_RESOURCES, full)
    try:
        return _store(event, ctx, start)
    except Exception:  # anything unforeseen: nothing was acknowledged, the peer may retry
        logger.exception("C-STORE from %s failed unexpectedly", _peer(event))
        # 0xA700 Refused: Out of Resources - transient from the peer's point of view.
        return _status(OUT_OF_RESOURCES, "internal error; retry later")


def _elapsed_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)


def _received_bytes(event: Event) -> int:
    """Size of the data set received (what storing it will take, give or take the meta)."""
    data = getattr(event.request, "DataSet", None)
    try:
        return len(data.getbuffer()) if data is not None else 0
    except (AttributeError, ValueError):
        return 0


def _store(event: Event, ctx: StoreContext, start: float) -> Dataset:
    request = cast(C_STORE, event.request)
    calling_ae = event.assoc.requestor.ae_title.strip()
    transfer_syntax = UID(event.context.transfer_syntax)
    affected_uid = str(request.AffectedSOPInstanceUID or "")
    # Only a well-formed UID goes into the log (no control characters from a peer).
    shown_uid = affected_uid if is_valid_uid(affected_uid) else "(invalid SOP Instance UID)"

    ds: Dataset | None = None
    try:
        ds = event.dataset
        checked = check_dataset(
            ds,
            affected_sop_class_uid=str(request.AffectedSOPClassUID or ""),
            affected_sop_instance_uid=affected_uid,
            transfer_syntax=transfer_syntax,
            max_pixels=ctx.settings.max_pixels,
        )
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises is a refusal
        rejection = (
            exc
            if isinstance(exc, Rejection)
            # 0xC000 Error: Cannot understand - the data set does not even parse.
            else Rejection(CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(exc).__name__})")
        )
        logger.warning(
            "refused C-STORE of %s from %s: 0x%04X %s",
            shown_uid,
            _peer(event),
            rejection.status,
            rejection.reason,
        )
        _record_refusal(ctx, ds, event, rejection, calling_ae)
        # The status chosen by the check: 0xA900 Data Set does not match SOP Class,
        # 0x0117 Invalid SOP Instance, 0x0122 SOP Class not supported or 0xC000 Cannot understand.
        return _status(rejection.status, rejection.reason)

    uids = checked.uids
    path = storage.instance_path(ctx.settings.storage_dir, uids).resolve()
    rec = received_instance(
        ds,
        checked,
        path=path,
        calling_ae=calling_ae,
        transfer_syntax=transfer_syntax,
        failure_reason=checked.unclassifiable,
        content_sha256=storage.dataset_sha256(event.encoded_dataset(False)),
    )

    with ctx.lock_for(uids.sop_instance_uid):
        conflict: IdentityConflict | None = None
        try:
            with ctx.session_factory() as session:
                existing = repository.find_instance(session, uids.sop_instance_uid)
                if existing is None or repository.is_refused(existing):
                    try:
                        identity.check_stored(
                            session,
                            study_uid=uids.study_instance_uid,
                            series_uid=uids.series_instance_uid,
                            patient_id=rec.patient_id,
                        )
                    except IdentityConflict as exc:
                        conflict = exc
        except SQLAlchemyError as exc:
            logger.error(
                "database unavailable, refusing %s: %s", uids.sop_instance_uid, type(exc).__name__
            )
            # 0xA700 Refused: Out of Resources - the database is down; the peer retries later.
            return _status(OUT_OF_RESOURCES, DATABASE_UNAVAILABLE)
        if existing is not None and not repository.is_refused(existing):
            # Most archives answer Success to a resent instance, which is what modalities
            # and PACS expect (a warning makes some of them flag the transfer as faulty).
            if existing.transfer_syntax_uid not in (None, rec.transfer_syntax_uid):
                # The data set bytes depend on the transfer syntax (VR encoding, byte order,
                # compression), so a copy in another one cannot be compared byte for byte
                # and is taken for the same object (a PACS forwarding it re-encoded): the
                # first copy is kept. Logged, not counted as a conflict.
                logger.warning(
                    "re-send of %s from %s in transfer syntax %s (stored: %s): not compared, "
                    "the first copy is kept",
                    uids.sop_instance_uid,
                    _peer(event),
                    rec.transfer_syntax_uid,
                    existing.transfer_syntax_uid,
                )
                return _status(SUCCESS)  # 0x0000 Success
            stored = existing.content_sha256 or storage.stored_dataset_sha256(
                Path(existing.storage_path)
            )
            if stored != rec.content_sha256:
                return _conflicting_resend(ctx, event, rec, path, stored, calling_ae)
            # The same object again: keep the copy stored, do not queue it again.
            logger.info(
                "duplicate %s from %s: already stored, not queued again",
                uids.sop_instance_uid,
                _peer(event),
            )
            return _status(SUCCESS)  # 0x0000 Success
        if conflict is not None:  # refused before anything is written
            return _refuse_conflict(event, uids.sop_instance_uid, conflict)

        try:
            storage.write_atomic(path, _encoded_chunks(event, calling_ae))
        except OSError as exc:
            logger.error("cannot write %s: %s", uids.sop_instance_uid, exc.strerror or exc)
            # 0xA700 Refused: Out of Resources - disk full or not writable.
            return _status(OUT_OF_RESOURCES, "cannot write to storage; retry later")

        try:
            instance, created = in_transaction(
                ctx.session_factory, lambda s: _record(s, rec, start)
            )
            instance_id = instance.id
            status = instance.status
        except IdentityConflict as exc:
            # Another association stored the contradicting series or Patient ID between the
            # check above and this insert: the file just written is not kept.
            path.unlink(missing_ok=True)
            return _refuse_conflict(event, uids.sop_instance_uid, exc)
        except SQLAlchemyError as exc:
            logger.error("cannot record %s: %s", uids.sop_instance_uid, type(exc).__name__)
            # 0xA700 Refused: Out of Resources - stored but not recorded: not acknowledged,
            # the peer retries and the file is simply written again.
            return _status(OUT_OF_RESOURCES, DATABASE_UNAVAILABLE)

    if not created:  # another process recorded it between our check and our write
        logger.info("duplicate %s recorded concurrently; not queued again", uids.sop_instance_uid)
        return _status(SUCCESS)  # 0x0000 Success

    queued = False
    if status == InstanceStatus.pending:
        queued = _queue(ctx, instance_id, uids.sop_instance_uid, start)
    logger.info(
        "stored %s study=%s series=%s from %s ts=%s %s in %.0f ms",
        uids.sop_instance_uid,
        uids.study_instance_uid,
        uids.series_instance_uid,
        _peer(event),
        transfer_syntax,
        "queued"
        if queued
        else (
            "pending"
            if status == InstanceStatus.pending
            else f"not classifiable: {rec.failure_reason}"
        ),
        (time.monotonic() - start) * 1000,
    )
    # File durable and instance recorded: the object is safe whatever the broker does.
    return _status(SUCCESS)  # 0x0000 Success


def _refuse_conflict(event: Event, sop_instance_uid: str, conflict: IdentityConflict) -> Dataset:
    """Answer an object that contradicts the stored identity: nothing of it is stored.

    0xC001 is in the range PS3.4 Table B.2-1 gives "Error: Cannot understand" (C000-CFFF):
    the object is well formed but cannot be processed as it is, and sending it again unchanged
    will not help (unlike 0xA700). 0xA900 would claim the data set does not match its SOP
    Class, which is not the case. The Error Comment names the conflict, the log its UIDs.
    """
    logger.warning(
        "refused C-STORE of %s from %s: 0x%04X identity conflict: %s",
        sop_instance_uid,
        _peer(event),
        IDENTITY_CONFLICT,
        conflict.detail,
    )
    return _status(IDENTITY_CONFLICT, conflict.comment)


def _conflicting_resend(
    ctx: StoreContext,
    event: Event,
    rec: ReceivedInstance,
    path: Path,
    stored_sha256: str | None,
    calling_ae: str,
) -> Dataset:
    """A SOP Instance UID received again with other content (called under its lock).

    A SOP Instance UID names one object (PS3.3 C.12.1.1.1, PS3.5 9.1), so a sender that
    re-uses one for other content is in error, and which copy is right cannot be known
    here; modalities re-sending a corrected image under the same UID do occur. Success is
    answered either way (as for any duplicate), the conflict is logged (UIDs and digests
    only) and counted on the instance, and ``Settings.duplicate_policy`` decides:
    ``keep-first`` keeps the stored object and its result; ``keep-newest`` replaces the
    stored file atomically, deletes the instance's results and queues it again (a
    classification of the old content already running may still store its result).
    """
    uid = rec.sop_instance_uid
    digest = rec.content_sha256 or ""
    policy = ctx.settings.duplicate_policy
    logger.warning(
        "conflicting re-send of %s from %s: its data set (sha256 %s) differs from the stored "
        "copy's (%s); duplicate policy %s: %s",
        uid,
        _peer(event),
        digest[:16],
        stored_sha256[:16] if stored_sha256 else "unreadable",
        policy,
        "the first copy is kept" if policy == "keep-first" else "replacing it, classifying again",
    )
    if policy == "keep-first":

        def note(session: Session) -> None:
            found = repository.find_instance(session, uid)
            if found is not None:
                repository.note_conflicting_resend(session, found, digest)

        try:
            in_transaction(ctx.session_factory, note)
        except SQLAlchemyError as exc:
            logger.error("cannot record the re-send of %s: %s", uid, type(exc).__name__)
            # 0xA700 Refused: Out of Resources - retried, the conflict is recorded then.
            return _status(OUT_OF_RESOURCES, DATABASE_UNAVAILABLE)
        return _status(SUCCESS)  # 0x0000 Success

    try:
        storage.write_atomic(path, _encoded_chunks(event, calling_ae))
    except OSError as exc:
        logger.error("cannot write %s: %s", uid, exc.strerror or exc)
        return _status(OUT_OF_RESOURCES, "cannot write to storage; retry later")

    def replace(session: Session) -> tuple[int, InstanceStatus, str]:
        found = repository.find_instance(session, uid)
        assert found is not None  # instances are never deleted
        before = found.storage_path
        repository.replace_conflicting(session, found, rec)
        return found.id, found.status, before

    try:
        instance_id, status, before = in_transaction(ctx.session_factory, replace)
    except SQLAlchemyError as exc:
        logger.error("cannot record %s: %s", uid, type(exc).__name__)
        return _status(OUT_OF_RESOURCES, DATABASE_UNAVAILABLE)
    if Path(before) != path:  # the new object names another study or series
        try:
            Path(before).unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove the replaced copy of %s: %s", uid, exc.strerror)
    if status == InstanceStatus.pending:
        _queue(ctx, instance_id, uid)
    return _status(SUCCESS)  # 0x0000 Success


def _record(session: Session, rec: ReceivedInstance, start: float) -> tuple[Instance, bool]:
    """Record the stored object (one unit of work); whether it is new to the database. A new
    record carries the handling time so far (``Instance.store_ms``)."""
    found = repository.find_instance(session, rec.sop_instance_uid)
    if found is not None and repository.is_refused(found):
        # A corrected resend of an object refused earlier replaces its record.
        instance, created = repository.reopen_refused(session, found, rec), True
    else:
        instance, created = repository.record_received(session, rec)
    if created:
        instance.store_ms = _elapsed_ms(start)
    return instance, created


def _queue(
    ctx: StoreContext, instance_id: int, sop_instance_uid: str, start: float | None = None
) -> bool:
    """Queue the instance; on any failure it stays ``pending`` and the sweeper queues it.
    With ``start`` (the C-STORE's), the handling time up to now replaces the recorded one."""
    msg = ClassifyInstance(instance_id=instance_id, sop_instance_uid=sop_instance_uid)
    try:
        ctx.enqueue(msg)
    except Exception as exc:  # noqa: BLE001 - the broker's errors come in many types
        logger.warning(
            "broker unavailable, %s left pending for the sweeper: %s",
            sop_instance_uid,
            type(exc).__name__,
        )
        return False
    try:
        with ctx.session_factory() as session:
            repository.mark_queued(
                session, instance_id, None if start is None else _elapsed_ms(start)
            )
            session.commit()
    except SQLAlchemyError as exc:
        # The message is on the broker; the record stays pending and the sweeper may send it
        # again, which the idempotent task ignores.
        logger.warning("could not mark %s queued: %s", sop_instance_uid, type(exc).__name__)
    return True
