"""Typed tables: studies, series, instances, results, their evidence Secondary Captures and
produced SR documents.

Patient and study attributes are stored for the worklist; they must never be logged.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from fracture_triage.verdict import Decision


class Base(DeclarativeBase):
    pass


class InstanceStatus(enum.StrEnum):
    """Life of a received instance.

    pending: stored and recorded, not yet on the queue (e.g. broker down); the sweeper queues it.
    queued: a classify message is on the broker.
    done: a result exists for the current model.
    failed: decoding or preprocessing failed; ``failure_reason`` says why. Not retried.
    out_of_scope: not assessed, its Body Part Examined is not in ``Settings.body_parts``
    (``fracture_triage.scope``); ``failure_reason`` holds "not assessed: out of scope
    (PART)". Stored, never classified; settled like ``done`` for the study's report.
    """

    pending = "pending"
    queued = "queued"
    done = "done"
    failed = "failed"
    # The member name is stored (12 characters in the VARCHAR(16) of revision 0001, no CHECK
    # constraint): a new state changes no schema.
    out_of_scope = "out_of_scope"


class SendStatus(enum.StrEnum):
    """Sending of a produced SR to the configured destination (C-STORE, PS3.4 B.2).

    none: no destination configured. pending: to send (or retry). sent: stored there.
    failed: retries exhausted; ``send_error`` says why.
    """

    none = "none"
    pending = "pending"
    sent = "sent"
    failed = "failed"


class DeliveryState(enum.StrEnum):
    """One produced SR's delivery to one destination (``deliveries``, revision 0009).

    pending: to send, at ``next_attempt_at`` (the first attempt at once, retries by
    ``fracture_triage.backoff``). sent: the destination accepted it (C-STORE Success or
    warning for the SR and every evidence capture; an HL7 ACK of AA or CA). gave up: the
    backoff's limit was reached; ``last_error`` says why; ``fracture-triage resend`` puts it
    back to pending.
    """

    pending = "pending"
    sent = "sent"
    gave_up = "gave up"


class EvidenceState(enum.StrEnum):
    """Whether the evidence Secondary Capture of a result was made.

    produced: written at ``path``. not produced: ``reason`` says why (an image too small or
    uniform to show a map on, an export without maps, ...); the result itself stands.
    """

    produced = "produced"
    not_produced = "not produced"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    #: Receive time of the newest instance: the study is reported once this is old enough.
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: Bumped whenever an instance is added or finishes; a report covers one revision.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    #: The last revision the report task settled: its SR was recorded, or it failed.
    reported_revision: Mapped[int | None] = mapped_column(Integer)
    #: Why the report of ``reported_revision`` could not be built (None when it was). Such a
    #: study is not queued again until a new image makes a new revision.
    report_failure: Mapped[str | None] = mapped_column(Text)

    series: Mapped[list[Series]] = relationship(back_populates="study")
    reports: Mapped[list[SRDocument]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[str | None] = mapped_column(String(12))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[str | None] = mapped_column(String(12))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    storage_path: Mapped[str] = mapped_column(Text)
    status: Mapped[InstanceStatus] = mapped_column(
        Enum(InstanceStatus, name="instance_status", native_enum=False, length=16), index=True
    )
    failure_reason: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The classification attempt under way (``repository.claim_attempt``): who runs it
    #: (``worker.claims.OWNER`` format) and since when; cleared when the attempt ends. A
    #: duplicate message finding a live claim does no work, so an instance is classified once
    #: even when the broker holds two messages for it.
    attempt_owner: Mapped[str | None] = mapped_column(String(64))
    attempt_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: SHA-256 (hex) of the data set as received and stored (not the File Meta Information,
    #: which names the sender): tells a re-send of the same object from a conflicting one.
    #: None for instances stored before revision 0003.
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    #: Re-sends of this SOP Instance UID whose content differed from the stored object's
    #: (PS3.3 C.12.1.1.1: a SOP Instance UID names one object), with the newest one's time and
    #: digest. ``Settings.duplicate_policy`` says which copy was kept.
    conflicting_resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_conflict_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_conflict_sha256: Mapped[str | None] = mapped_column(String(64))
    #: When retention deleted the stored file (``fracture-triage purge``); the row and its
    #: results stay.
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: How long the SCP took to handle the C-STORE that stored this object, in ms: from the
    #: whole data set received to the instance recorded (and queued, when it was). None
    #: before revision 0010. ``/metrics`` makes its histogram of it.
    store_ms: Mapped[float | None] = mapped_column(Float)

    series: Mapped[Series] = relationship(back_populates="instances")
    results: Mapped[list[Result]] = relationship(back_populates="instance")


class Result(Base):
    """One classification: exactly one per (instance, model version).

    ``threshold`` and ``upper_threshold`` are the model card's two thresholds when it was
    classified, ``decision`` the level they gave (:func:`fracture_triage.verdict.decide`)
    and ``fracture`` the flag ``probability >= threshold``. Results of revisions before 0004
    were given upper = lower and the decision that makes (fracture or no fracture).
    """

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("instance_id", "model_version", name="uq_result_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    model_uid: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    fracture: Mapped[bool] = mapped_column(Boolean)
    upper_threshold: Mapped[float] = mapped_column(Float)
    # The value ("no fracture"), not the member name, in a VARCHAR(16) without CHECK
    # constraint, like ``instances.status``.
    decision: Mapped[Decision] = mapped_column(
        Enum(
            Decision,
            name="decision",
            native_enum=False,
            length=16,
            values_callable=lambda members: [m.value for m in members],
        )
    )
    preprocess_ms: Mapped[float] = mapped_column(Float)
    inference_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    instance: Mapped[Instance] = relationship(back_populates="results")
    evidence: Mapped[Evidence | None] = relationship(back_populates="result")


class Evidence(Base):
    """The evidence Secondary Capture of one result (the radiograph with the network's class
    activation map and the result burned in), or why there is none; at most one per result.

    Sent to the SR destination with the study's SR (``send_*`` as on ``sr_documents``).
    """

    __tablename__ = "evidence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), unique=True)
    # the enum's values in a VARCHAR (no CHECK constraint), like ``instances.status``
    state: Mapped[EvidenceState] = mapped_column(
        Enum(
            EvidenceState,
            name="evidence_state",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    reason: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    send_status: Mapped[SendStatus] = mapped_column(
        Enum(SendStatus, name="send_status", native_enum=False, length=16),
        default=SendStatus.none,
    )
    send_attempts: Mapped[int] = mapped_column(Integer, default=0)
    send_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    result: Mapped[Result] = relationship(back_populates="evidence")


class SRDocument(Base):
    """A Structured Report the node produced for one revision of a study."""

    __tablename__ = "sr_documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_revision: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    fracture: Mapped[bool] = mapped_column(Boolean)
    probability: Mapped[float | None] = mapped_column(Float)
    instance_count: Mapped[int] = mapped_column(Integer)
    #: The newer SR that replaces this one when more images arrived later.
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("sr_documents.id"))
    # Stored as the value in the VARCHAR(16) of revision 0001 (no CHECK constraint), like
    # ``instances.status``: the enum changes no schema.
    send_status: Mapped[SendStatus] = mapped_column(
        Enum(SendStatus, name="send_status", native_enum=False, length=16),
        default=SendStatus.none,
    )
    send_attempts: Mapped[int] = mapped_column(Integer, default=0)
    send_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: When retention deleted the SR file; the row stays.
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The study decision the SR reports (``Decision`` value; None: nothing assessed, or
    #: recorded before revision 0009): what the HL7 result carries.
    decision: Mapped[str | None] = mapped_column(String(16))

    study: Mapped[Study] = relationship(back_populates="reports")
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="sr_document", order_by="Delivery.id"
    )


class Delivery(Base):
    """One SR document's delivery to one configured destination (``Settings.destinations``):
    a dicom destination gets the SR and the study's evidence captures in one association, an
    hl7 one the ORU^R01 of the report (``message_control_id`` is its MSH-10, the same on
    every retry so a RIS can tell a repeat). The SR's own ``send_*`` columns are this
    table's summary (``db.deliveries.settle``)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("sr_document_id", "destination", name="uq_delivery_destination"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sr_document_id: Mapped[int] = mapped_column(ForeignKey("sr_documents.id"), index=True)
    #: ``Destination.name``; a name no longer configured is left as it is (not retried).
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(
            DeliveryState,
            name="delivery_state",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    #: Failed attempts since ``pending_since`` (what the backoff counts).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: When it was last put pending (created, or resent): the backoff's age counts from here.
    pending_since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: When the next attempt is due (pending), or until when an attempt under way holds it.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    message_control_id: Mapped[str | None] = mapped_column(String(20))

    sr_document: Mapped[SRDocument] = relationship(back_populates="deliveries")


Index("ix_deliveries_state_due", Delivery.state, Delivery.next_attempt_at)


# --------------------------------------------------------------------------- the web application
# Accounts, sessions, the radiologists' verdicts and the audit trail (revision 0007). Secrets
# are stored as hashes only: Argon2 for passwords, SHA-256 for random tokens (256 bits of
# entropy need no slow hash, and every request checks one).


class Role(enum.StrEnum):
    """What an account or API token may do: radiologists read and give verdicts; admins also
    read the audit trail and the node's state."""

    radiologist = "radiologist"
    admin = "admin"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, name="role", native_enum=False, length=16))
    #: Argon2id, in the PHC string format argon2-cffi writes (parameters and salt included).
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: Set by ``fracture-triage user disable``: no login, and its sessions are ended.
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, name="role", native_enum=False, length=16))
    #: SHA-256 (hex) of the token; the token itself is printed once and never stored.
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A browser session: the cookie carries a random id, the row its SHA-256."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    #: The synchronizer token every form of this session must send back (CSRF).
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship()


class RadiologistVerdict(Base):
    """A radiologist's reading of a study; rows are appended, never changed (the history)."""

    __tablename__ = "radiologist_verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    #: None: only the read state was recorded.
    fracture: Mapped[bool | None] = mapped_column(Boolean)
    comment: Mapped[str | None] = mapped_column(Text)
    read: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Account or token name, and which of the two (``user`` or ``token``).
    author: Mapped[str] = mapped_column(String(64))
    author_kind: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who did what, when, from where: views of patient data, verdicts, logins, accounts."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    #: Account or token name (``token:NAME``); for a failed login, the name that was tried.
    actor: Mapped[str] = mapped_column(String(80), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    #: Free text without patient identifiers (UIDs, counts, the verdict given).
    detail: Mapped[str | None] = mapped_column(Text)
    client_address: Mapped[str | None] = mapped_column(String(64))


class StoreRefusal(Base):
    """One C-STORE the SCP answered with a failure status (PS3.4 Table B.2-1: 0xA700 out of
    resources, 0xA900 data set does not match SOP Class, 0xC000 cannot understand, ...),
    whether or not the object could be recorded as an instance. Appended, never changed;
    deleted ``Settings.refusal_retention_days`` after ``at`` (``fracture_triage.retention``),
    each deleted row counted on in :class:`StoreRefusalTotal`. No patient data: the reason
    is the status comment."""

    __tablename__ = "store_refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Indexed (revision 0011): the pruning reads the oldest rows.
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    status: Mapped[int] = mapped_column(Integer, index=True)
    #: The Affected SOP Instance UID when it is a valid UID (PS3.5 9.1), else None.
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)


class StoreRefusalTotal(Base):
    """Per failure status, the :class:`StoreRefusal` rows pruned so far: ``/metrics``'
    ``fracture_triage_instances_refused_total`` is these plus the rows still kept, so it
    never decreases (a Prometheus counter; a decrease would read as a restart and
    ``rate()`` would jump)."""

    __tablename__ = "store_refusal_totals"

    status: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    pruned: Mapped[int] = mapped_column(Integer)


# Worklist filters and ordering run in SQL (db/worklist.py); these keep them off full scans.
# Declared here rather than on the columns above so the tables of revision 0001 read unchanged.
Index("ix_studies_last_received_at", Study.last_received_at)
Index("ix_studies_study_date", Study.study_date)
# With the study id (revision 0010): the worklist's modality and body part filters are
# EXISTS over series by study, answered from the index alone.
Index("ix_series_modality_study", Series.modality, Series.study_id)
Index("ix_series_body_part_study", Series.body_part_examined, Series.study_id)
Index("ix_instances_series_status", Instance.series_id, Instance.status)


class StudyTriage(Base):
    """Per study, what the worklist sorts and filters by, kept up to date by the repository
    writes that change it (``db.triage.refresh_study``), so that the worklist's first page is
    an index scan rather than an aggregate over every instance."""

    __tablename__ = "study_triage"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    #: ``db.triage.Priority``: higher is read first.
    priority: Mapped[int] = mapped_column(Integer)
    #: Highest probability of the classified images; None when none is classified.
    max_probability: Mapped[float | None] = mapped_column(Float)
    #: Copy of ``studies.last_received_at`` (the tie-break of the order, in the same index).
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    instances: Mapped[int] = mapped_column(Integer)
    classified: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    first_received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_result_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))


# The worklist order (db.triage.priority_order) walks this index backwards.
Index(
    "ix_study_triage_order",
    StudyTriage.priority,
    StudyTriage.max_probability,
    StudyTriage.last_received_at,
    StudyTriage.study_id,
)
