"""Request dependencies: the settings, a database session per request, and who is asking.

Credentials: ``Authorization: Bearer TOKEN`` (API tokens, for machines) or the session cookie
a login sets (browsers). A request carrying the cookie that changes something must also carry
the session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``); a bearer
token cannot be sent by another site's page, so it needs none.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session, sessionmaker

from db.accounts import Principal, session_principal, token_principal
from fracture_triage.settings import Settings

SESSION_COOKIE = "ft_session"
LOGIN_CSRF_COOKIE = "ft_login_csrf"
CSRF_HEADER = "x-csrf-token"


# Dependencies that only look at the request are ``async def``: FastAPI runs a plain ``def``
# in its thread pool, a hop per dependency per request (measured: most of a worklist
# request's time outside SQL on a loaded machine). Those that query the database stay ``def``.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. A route that writes commits itself before it answers:
    FastAPI finishes a ``yield`` dependency after the response is sent, so a commit here
    could fail after a success was answered, or land after the client's next request."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]
AppSettings = Annotated[Settings, Depends(get_settings)]


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def current_principal(request: Request, session: DbSession) -> Principal | None:
    """Who the request acts for, or None. A bearer header that names no live token is not
    silently replaced by the cookie: the caller asked to be that token."""
    token = bearer_token(request)
    if token is not None:
        principal = token_principal(session, token)
        if session.dirty:
            session.commit()  # its last use (written at most once a minute)
        return principal
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return session_principal(session, cookie)
    return None


MaybePrincipal = Annotated[Principal | None, Depends(current_principal)]


async def require_principal(principal: MaybePrincipal) -> Principal:
    """For the JSON API: 401 without valid credentials."""
    if principal is None:
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
    return principal


ApiPrincipal = Annotated[Principal, Depends(require_principal)]


async def require_admin(principal: ApiPrincipal) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this needs the admin role")
    return principal


ApiAdmin = Annotated[Principal, Depends(require_admin)]


class LoginRequired(Exception):  # noqa: N818 - answered with a redirect, not an error page
    """A page was asked for without a live session: the handler redirects to the login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def login_url(next_path: str) -> str:
    return f"/login?next={quote(next_path, safe='/')}"


async def require_page_user(request: Request, principal: MaybePrincipal) -> Principal:
    """For pages: a browser session (tokens are for the API), else a redirect to the login."""
    if principal is None or principal.kind != "user":
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(path)
    return principal


PageUser = Annotated[Principal, Depends(require_page_user)]


def check_csrf(principal: Principal, sent: str | None) -> None:
    """403 unless a cookie-authenticated change carries its session's CSRF token."""
    if principal.kind != "user":
        return
    if not sent or principal.csrf_token is None:
        raise HTTPException(403, "missing CSRF token")
    if not secrets.compare_digest(sent.encode(), principal.csrf_token.encode()):
        raise HTTPException(403, "invalid CSRF token")


def safe_next(path: str | None) -> str:
    """Where to go after login: a path on this site only (no open redirect)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/worklist"
    return path
