"""The audit trail: who viewed which study's patient data, gave which verdict, logged in or
failed to, from where and when. Rows are only ever added. ``detail`` carries UIDs, counts and
verdicts, never patient identifiers (the study's row holds those).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from db.models import AuditEvent
from db.repository import utcnow

#: Actions recorded (one place, so the admin page and ``fracture-triage audit`` agree).
LOGIN = "login"
LOGIN_FAILED = "login_failed"
LOGOUT = "logout"
WORKLIST_VIEW = "worklist_view"
STUDY_VIEW = "study_view"
VERDICT = "verdict"
ACCOUNT = "account"


def record(
    session: Session,
    actor: str,
    action: str,
    *,
    study_instance_uid: str | None = None,
    detail: str | None = None,
    client_address: str | None = None,
) -> AuditEvent:
    event = AuditEvent(
        at=utcnow(),
        actor=actor[:80],
        action=action,
        study_instance_uid=study_instance_uid,
        detail=detail,
        client_address=client_address,
    )
    session.add(event)
    return event


def events(
    session: Session,
    *,
    limit: int = 100,
    offset: int = 0,
    action: str | None = None,
    actor: str | None = None,
    study_instance_uid: str | None = None,
) -> list[AuditEvent]:
    """Newest first."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    if action:
        query = query.where(AuditEvent.action == action)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if study_instance_uid:
        query = query.where(AuditEvent.study_instance_uid == study_instance_uid)
    return list(session.scalars(query))


def recent_failed_logins(
    session: Session, name: str, client_address: str | None, window: timedelta
) -> int:
    """Failed logins for this name or from this address within ``window`` (throttling)."""
    since: datetime = utcnow() - window
    who = [AuditEvent.actor == name[:80]]
    if client_address:
        who.append(AuditEvent.client_address == client_address)
    return int(
        session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == LOGIN_FAILED, AuditEvent.at >= since, or_(*who))
        )
        or 0
    )
