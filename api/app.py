"""The web application: the radiologists' pages and the JSON API, one ASGI app (FastAPI).

:func:`create_app` builds it from the settings: one engine, a database session per request
(``api.deps.get_session``), then the middleware in the order a request meets it: Host check
(DNS rebinding), body-size limit, security headers. Errors are JSON (``{"error": ...}``)
under ``/api/`` and pages elsewhere; a page asked for without a session redirects to the
login. ``api.server.run_api`` serves it with uvicorn.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import auth_routes, monitoring, pages, routes_api
from api.deps import ApiPrincipal, LoginRequired, login_url
from api.security import BodyLimit, HostCheck, SecurityHeaders
from api.templating import STATIC_DIR, render
from db.session import make_engine, make_session_factory
from fracture_triage.settings import Settings

log = logging.getLogger(__name__)


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path in ("/metrics", "/health")


def create_app(settings: Settings) -> FastAPI:
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="fracture-triage",
        version="1",
        lifespan=lifespan,
        # The generated docs pages load scripts from a CDN (offline, and against the CSP);
        # the description itself is served below, to authenticated callers.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.sessions = make_session_factory(engine)
    app.state.metrics = monitoring.make_registry(app.state.sessions, settings)

    app.include_router(monitoring.router)
    app.include_router(auth_routes.router)
    app.include_router(routes_api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/v1/openapi.json", include_in_schema=False)
    def openapi(principal: ApiPrincipal) -> dict[str, Any]:
        return app.openapi()

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(login_url(exc.next_path), status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code >= 500:
            log.error("%s %s: %d %s", request.method, request.url.path, exc.status_code, message)
        if _wants_json(request):
            return JSONResponse(
                {"error": message}, status_code=exc.status_code, headers=exc.headers
            )
        return render(
            request,
            "error.html",
            {"status": exc.status_code, "message": message, "user": None},
            status_code=exc.status_code,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
        log.info("%s %s: 422 %s", request.method, request.url.path, summary[:300])
        if _wants_json(request):
            return JSONResponse(
                {"error": f"invalid request: {summary}", "problems": problems}, status_code=422
            )
        return render(
            request,
            "error.html",
            {"status": 422, "message": f"invalid request: {summary}", "user": None},
            status_code=422,
        )

    # Added innermost first: a request meets HostCheck, then BodyLimit, then the headers.
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, max_bytes=settings.http_max_body_bytes)
    app.add_middleware(HostCheck, allowed_hosts=settings.resolved_allowed_hosts)
    return app
