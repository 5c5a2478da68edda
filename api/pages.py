"""The radiologists' pages: worklist, study (images, probabilities, verdict form), admin.

Pages need a browser session (a request without one is redirected to the login); every
form carries the session's CSRF token. Patient identifiers are shown here, so each worklist
page and each study page shown is recorded in the audit trail.
"""

from __future__ import annotations

import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response

from api.deps import AppSettings, DbSession, PageUser, check_csrf
from api.routes_api import (
    StudyUid,
    VerdictIn,
    audit_patient_view,
    event_dict,
    give_verdict,
    worklist_filter,
)
from api.templating import render
from db import accounts, audit, deliveries, node_state, performance, reviews
from db.worklist import WorklistFilter, worklist_page

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50


@router.get("/")
def home() -> Response:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/worklist")
def worklist(
    request: Request,
    session: DbSession,
    user: PageUser,
    criteria: Annotated[WorklistFilter, Depends(worklist_filter)],
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> Response:
    found = worklist_page(session, criteria, page=page, page_size=PAGE_SIZE, include_patient=True)
    uids = [e["study_instance_uid"] for e in found.entries]
    audit_patient_view(session, user, request, audit.WORKLIST_VIEW, uids, f"worklist page {page}")
    session.commit()
    pages = max(1, -(-found.total // PAGE_SIZE))
    query = {k: v for k, v in request.query_params.items() if k != "page" and v}
    return render(
        request,
        "worklist.html",
        {
            "user": user,
            "studies": found.entries,
            "total": found.total,
            "page": page,
            "pages": pages,
            "query": query,
            "criteria": criteria,
        },
    )


@router.get("/studies/{study_uid}")
def study_page(
    request: Request, session: DbSession, user: PageUser, study_uid: StudyUid
) -> Response:
    study = reviews.find_study(session, study_uid)
    if study is None:
        raise HTTPException(404, f"no study {study_uid}")
    detail = reviews.study_detail(session, study, include_patient=True)
    audit_patient_view(session, user, request, audit.STUDY_VIEW, [study_uid], "study page")
    session.commit()
    return render(request, "study.html", {"user": user, "study": detail})


@router.post("/studies/{study_uid}/verdict")
def verdict_form(
    request: Request,
    session: DbSession,
    user: PageUser,
    study_uid: StudyUid,
    csrf_token: Annotated[str, Form(max_length=128)] = "",
    fracture: Annotated[str, Form(pattern="^(yes|no|none)$")] = "none",
    comment: Annotated[str, Form(max_length=reviews.MAX_COMMENT)] = "",
) -> Response:
    check_csrf(user, csrf_token)
    study = reviews.find_study(session, study_uid)
    if study is None:
        raise HTTPException(404, f"no study {study_uid}")
    said = {"yes": True, "no": False, "none": None}[fracture]
    give_verdict(
        session, user, request, study, VerdictIn(fracture=said, comment=comment or None, read=True)
    )
    session.commit()
    return RedirectResponse(f"/studies/{study_uid}#verdicts", status_code=303)


@router.get("/performance")
def performance_page(request: Request, session: DbSession, user: PageUser) -> Response:
    return render(
        request, "performance.html", {"user": user, "report": performance.report(session)}
    )


@router.get("/admin")
def admin_page(
    request: Request,
    session: DbSession,
    settings: AppSettings,
    user: PageUser,
    action: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    if not user.is_admin:
        raise HTTPException(403, "this page needs the admin role")
    disk = shutil.disk_usage(settings.data_dir) if settings.data_dir.exists() else None
    state: dict[str, Any] = {
        "studies": node_state.study_count(session),
        "instances": node_state.instance_counts(session),
        "reports": node_state.sr_counts(session),
        "report_failures": node_state.report_failures(session),
        "disk_free_gib": None if disk is None else round(disk.free / 2**30, 1),
        "deliveries": deliveries.delivery_counts(session),
        "gave_up": deliveries.gave_up_deliveries(session),
    }
    return render(
        request,
        "admin.html",
        {
            "user": user,
            "users": accounts.list_users(session),
            "tokens": accounts.list_tokens(session),
            "events": [event_dict(e) for e in audit.events(session, limit=200, action=action)],
            "state": state,
        },
    )
