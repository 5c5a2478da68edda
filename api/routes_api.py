"""The JSON API, versioned under ``/api/v1/``: worklist, studies, previews, verdicts,
results and the audit trail. Every route needs a bearer token or a browser session.

Patient identifiers (name, id, birth date, accession number) are returned only when asked for
(``include_patient=true``) and every such answer is recorded in the audit trail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from api.deps import ApiAdmin, ApiPrincipal, AppSettings, DbSession, check_csrf, client_address
from api.preview import PreprocessError, render_evidence, render_preview
from db import audit, performance, reviews
from db.accounts import Principal
from db.evidence import produced_evidence_of_instance
from db.models import AuditEvent, Instance, InstanceStatus, RadiologistVerdict, Study
from db.repository import as_utc
from db.triage import Priority
from db.worklist import WorklistFilter, verdict_dict, worklist_page
from fracture_triage.results import collect_results

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1")

#: A UID (PS3.5 9.1): digits and dots, at most 64 characters. Checked by the path itself so
#: a malformed one is a 422 before any query.
UID_PATTERN = r"^[0-9][0-9.]{0,63}$"
StudyUid = Annotated[str, PathParam(pattern=UID_PATTERN)]
DicomDate = Annotated[str | None, Query(pattern=r"^\d{8}$", description="DICOM DA, YYYYMMDD")]


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


async def worklist_filter(
    status: InstanceStatus | None = None,
    flag: Literal["fracture", "doubt", "no_fracture", "unclassified", "out_of_scope"] | None = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    body_part: Annotated[str | None, Query(max_length=64)] = None,
    received_from: datetime | None = None,
    received_to: datetime | None = None,
    study_date_from: DicomDate = None,
    study_date_to: DicomDate = None,
    reviewed: bool | None = None,
) -> WorklistFilter:
    """The worklist's query parameters (shared by the API and the page); ``async`` only to
    run without a thread-pool hop (it does no I/O)."""
    return WorklistFilter(
        status=status,
        priority=None if flag is None else Priority[flag],
        modality=modality or None,
        body_part=body_part or None,
        received_from=_utc(received_from),
        received_to=_utc(received_to),
        study_date_from=study_date_from,
        study_date_to=study_date_to,
        reviewed=reviewed,
    )


def audit_patient_view(
    session: DbSession,
    principal: Principal,
    request: Request,
    action: str,
    study_uids: list[str],
    what: str,
) -> None:
    """Record that patient identifiers of these studies were shown: one row per study page,
    one row per worklist page (its study UIDs in ``detail``; a refreshing worklist would
    otherwise add a row per study every refresh)."""
    single = len(study_uids) == 1 and action == audit.STUDY_VIEW
    audit.record(
        session,
        principal.actor,
        action,
        study_instance_uid=study_uids[0] if single else None,
        detail=what if single else f"{what}: {len(study_uids)} studies {' '.join(study_uids)}",
        client_address=client_address(request),
    )


@router.get("/worklist")
def get_worklist(
    request: Request,
    session: DbSession,
    principal: ApiPrincipal,
    criteria: Annotated[WorklistFilter, Depends(worklist_filter)],
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=200)] = 50,
    include_patient: bool = False,
) -> JSONResponse:
    """One entry per study, likely fractures first (see ``db.worklist.priority_order``).

    Answered as a ready ``JSONResponse``: the entries are JSON values already, and FastAPI's
    validation and encoding of a returned ``dict`` took several times as long as
    ``json.dumps`` (measured on 50 entries)."""
    found = worklist_page(
        session, criteria, page=page, page_size=page_size, include_patient=include_patient
    )
    if include_patient:
        uids = [e["study_instance_uid"] for e in found.entries]
        audit_patient_view(
            session, principal, request, audit.WORKLIST_VIEW, uids, f"API worklist page {page}"
        )
        session.commit()
    return JSONResponse(
        {
            "page": found.page,
            "page_size": found.page_size,
            "total": found.total,
            "studies": found.entries,
        }
    )


def _study_or_404(session: DbSession, study_uid: str) -> Study:
    study = reviews.find_study(session, study_uid)
    if study is None:
        raise HTTPException(404, f"no study {study_uid}")
    return study


@router.get("/studies/{study_uid}")
def get_study(
    request: Request,
    session: DbSession,
    principal: ApiPrincipal,
    study_uid: StudyUid,
    include_patient: bool = False,
) -> dict[str, Any]:
    study = _study_or_404(session, study_uid)
    detail = reviews.study_detail(session, study, include_patient=include_patient)
    if include_patient:
        audit_patient_view(session, principal, request, audit.STUDY_VIEW, [study_uid], "API study")
        session.commit()
    return detail


def _instance_or_404(session: DbSession, study_uid: str, sop_uid: str) -> Instance:
    study = _study_or_404(session, study_uid)
    instance = reviews.find_instance(session, study, sop_uid)
    if instance is None:
        raise HTTPException(404, f"no image {sop_uid} in study {study_uid}")
    return instance


def _png(path: Path) -> FileResponse:
    """A cached rendering (patient data: private to the browser, never a shared cache)."""
    return FileResponse(
        path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


@router.get("/studies/{study_uid}/images/{sop_uid}/preview.png", response_class=FileResponse)
def get_preview(
    session: DbSession,
    settings: AppSettings,
    principal: ApiPrincipal,
    study_uid: StudyUid,
    sop_uid: StudyUid,
) -> FileResponse:
    """The image rendered for a screen (``Settings.preview_size``), PNG, cached on disk."""
    instance = _instance_or_404(session, study_uid, sop_uid)
    return _rendered_png(
        "the image",
        lambda: render_preview(
            instance, settings.preview_dir, settings.preview_size, settings.max_pixels
        ),
    )


@router.get("/studies/{study_uid}/images/{sop_uid}/evidence.png", response_class=FileResponse)
def get_evidence(
    session: DbSession,
    settings: AppSettings,
    principal: ApiPrincipal,
    study_uid: StudyUid,
    sop_uid: StudyUid,
) -> FileResponse:
    """The image's evidence (the worker's Secondary Capture: the class activation map over
    the rendered radiograph), PNG sized and cached as the preview; 404 when the image's
    latest result has no produced evidence."""
    instance = _instance_or_404(session, study_uid, sop_uid)
    evidence = produced_evidence_of_instance(session, instance.id)
    if evidence is None:
        raise HTTPException(404, f"no evidence for image {sop_uid}")
    return _rendered_png(
        "the evidence",
        lambda: render_evidence(
            evidence, settings.preview_dir, settings.preview_size, settings.max_pixels
        ),
    )


def _rendered_png(what: str, render: Callable[[], Path]) -> FileResponse:
    """``render()``'s cached PNG; 404 when its stored object is gone (purged), 422 when it
    cannot be rendered."""
    try:
        path = render()
    except FileNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    except PreprocessError as exc:
        raise HTTPException(422, f"{what} cannot be rendered: {exc}") from None
    return _png(path)


class VerdictIn(BaseModel):
    """A radiologist's reading: fracture present (true) or absent (false), or only read."""

    fracture: bool | None = None
    comment: str | None = Field(default=None, max_length=reviews.MAX_COMMENT)
    read: bool = True


@router.post("/studies/{study_uid}/verdict", status_code=201)
def post_verdict(
    request: Request,
    session: DbSession,
    principal: ApiPrincipal,
    body: VerdictIn,
    study_uid: StudyUid,
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    check_csrf(principal, x_csrf_token)
    study = _study_or_404(session, study_uid)
    verdict = give_verdict(session, principal, request, study, body)
    session.commit()
    return {
        "verdict": verdict_dict(verdict),
        "history": [verdict_dict(v) for v in reviews.verdict_history(session, study)],
    }


def give_verdict(
    session: DbSession, principal: Principal, request: Request, study: Study, body: VerdictIn
) -> RadiologistVerdict:
    """Record a verdict and its audit row (the API and the verdict form both come here)."""
    verdict = reviews.record_verdict(
        session,
        study,
        fracture=body.fracture,
        comment=body.comment,
        read=body.read,
        author=principal.name,
        author_kind=principal.kind,
    )
    said = {True: "fracture", False: "no fracture", None: "no finding given"}[body.fracture]
    audit.record(
        session,
        principal.actor,
        audit.VERDICT,
        study_instance_uid=study.study_instance_uid,
        detail=f"{said}; read={'yes' if body.read else 'no'}"
        + ("; with comment" if body.comment else ""),
        client_address=client_address(request),
    )
    log.info("verdict on %s by %s: %s", study.study_instance_uid, principal.actor, said)
    return verdict


@router.get("/results")
def get_results(
    session: DbSession,
    principal: ApiPrincipal,
    study: Annotated[str | None, Query(pattern=UID_PATTERN)] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """What ``fracture-triage results --json`` prints (without patient identifiers), paged."""
    rows = collect_results(session, study, limit=page_size, offset=(page - 1) * page_size)
    return {"page": page, "page_size": page_size, "results": rows}


@router.get("/performance")
def get_performance(session: DbSession, principal: ApiPrincipal) -> dict[str, Any]:
    """The model's flags against the radiologists' verdicts at this site (``db.performance``):
    sensitivity, specificity and PPV with 95 % intervals, overall, by week and by body part."""
    return performance.report(session)


@router.get("/audit")
def get_audit(
    session: DbSession,
    admin: ApiAdmin,
    action: Annotated[str | None, Query(max_length=32)] = None,
    study: Annotated[str | None, Query(pattern=UID_PATTERN)] = None,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The audit trail, newest first (admins)."""
    found = audit.events(
        session,
        limit=page_size,
        offset=(page - 1) * page_size,
        action=action,
        study_instance_uid=study,
    )
    return {"page": page, "page_size": page_size, "events": [event_dict(e) for e in found]}


def event_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "at": as_utc(event.at).isoformat(),
        "actor": event.actor,
        "action": event.action,
        "study_instance_uid": event.study_instance_uid,
        "detail": event.detail,
        "client_address": event.client_address,
    }
