"""Login and logout for browsers.

The login form is protected against cross-site posting by a double-submit token (a cookie
set with the form and the same value in the form: another site can send neither); after
login, every form carries the session's own CSRF token. Failed logins are recorded in the
audit trail and logged (name and address, never the password), and each further attempt
for that name or from that address within :data:`FAILURE_WINDOW` waits longer before its
password is even checked (:func:`login_delay`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    AppSettings,
    MaybePrincipal,
    check_csrf,
    client_address,
    safe_next,
)
from api.templating import render
from db import accounts, audit

log = logging.getLogger(__name__)
router = APIRouter()

FAILURE_WINDOW = timedelta(minutes=15)
MAX_LOGIN_DELAY_S = 8.0


def login_delay(failures: int) -> float:
    """Seconds to wait before checking a password after ``failures`` recent failures:
    0, then 0.5 s doubling to :data:`MAX_LOGIN_DELAY_S`."""
    if failures <= 0:
        return 0.0
    return float(min(0.5 * 2 ** (failures - 1), MAX_LOGIN_DELAY_S))


def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    # Secure: browsers send it over HTTPS only, and to http://localhost / 127.0.0.1, which
    # they count as secure contexts. HttpOnly: no script reads it. SameSite=Strict: never
    # sent on requests another site starts.
    response.set_cookie(
        name, value, max_age=max_age, httponly=True, secure=True, samesite="strict", path="/"
    )


def _login_page(
    request: Request, settings: AppSettings, next_path: str, error: str | None, status: int
) -> Response:
    token = secrets.token_urlsafe(32)
    response = render(
        request,
        "login.html",
        {"csrf_token": token, "next": next_path, "error": error},
        status_code=status,
    )
    set_cookie(response, LOGIN_CSRF_COOKIE, token, 3600)
    return response


@router.get("/login", include_in_schema=False)
def login_form(
    request: Request,
    settings: AppSettings,
    principal: MaybePrincipal,
    next_path: Annotated[str, Query(alias="next", max_length=2000)] = "/worklist",
) -> Response:
    if principal is not None and principal.kind == "user":
        return RedirectResponse(safe_next(next_path), status_code=303)
    return _login_page(request, settings, safe_next(next_path), None, 200)


def _attempt(
    sessions: sessionmaker[Session], name: str, password: str, address: str | None, hours: float
) -> str | None:
    """Check the password, record the outcome; the new session's cookie value, or None."""
    with sessions() as session:
        user = accounts.authenticate(session, name, password)
        if user is None:
            audit.record(session, name or "-", audit.LOGIN_FAILED, client_address=address)
            session.commit()
            return None
        secret = accounts.start_session(session, user, hours)
        audit.record(session, user.name, audit.LOGIN, client_address=address)
        session.commit()
        return secret


def _failures(sessions: sessionmaker[Session], name: str, address: str | None) -> int:
    with sessions() as session:
        return audit.recent_failed_logins(session, name, address, FAILURE_WINDOW)


@router.post("/login", include_in_schema=False)
async def login(request: Request, settings: AppSettings) -> Response:
    form = await request.form()
    name = str(form.get("name") or "").strip()[:64]
    password = str(form.get("password") or "")[:1024]
    next_path = safe_next(str(form.get("next") or ""))
    sent, expected = str(form.get("csrf_token") or ""), request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not secrets.compare_digest(sent.encode(), expected.encode()):
        log.warning("login form without a valid CSRF token from %s", client_address(request))
        return _login_page(
            request, settings, next_path, "The form expired; please log in again.", 403
        )
    sessions: sessionmaker[Session] = request.app.state.sessions
    address = client_address(request)
    failures = await run_in_threadpool(_failures, sessions, name, address)
    # asyncio.sleep, not time.sleep: a guessing client waits without holding a thread.
    await asyncio.sleep(login_delay(failures))
    secret = await run_in_threadpool(
        _attempt, sessions, name, password, address, settings.session_hours
    )
    if secret is None:
        log.warning(
            "failed login for %r from %s (%d earlier failures in %d min)",
            name,
            address,
            failures,
            FAILURE_WINDOW.total_seconds() // 60,
        )
        return _login_page(request, settings, next_path, "Wrong name or password.", 401)
    log.info("login: %s from %s", name, address)
    response = RedirectResponse(next_path, status_code=303)
    set_cookie(response, SESSION_COOKIE, secret, int(settings.session_hours * 3600))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout", include_in_schema=False)
async def logout(request: Request, principal: MaybePrincipal) -> Response:
    form = await request.form()
    cookie = request.cookies.get(SESSION_COOKIE)
    if principal is not None and principal.kind == "user" and cookie:
        check_csrf(principal, str(form.get("csrf_token") or ""))
        sessions: sessionmaker[Session] = request.app.state.sessions
        await run_in_threadpool(_logout, sessions, cookie, principal.name, client_address(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True)
    return response


def _logout(sessions: sessionmaker[Session], cookie: str, name: str, address: str | None) -> None:
    with sessions() as session:
        accounts.end_session(session, cookie)
        audit.record(session, name, audit.LOGOUT, client_address=address)
        session.commit()
