"""``fracture-triage api``: the web application (``api.app``) served by uvicorn.

Bound to ``Settings.http_bind_address`` (not the SCP's ``bind_address``) and
``Settings.http_port``; HTTPS when a certificate and key are configured (its own, else the
node's DICOM TLS certificate: ``Settings.http_tls_files``). Idle keep-alive
connections are closed after ``http_idle_timeout_seconds``, at most ``http_max_connections``
are served at once, and request heads are capped at 16 KiB.
"""

from __future__ import annotations

import logging
import threading

from fracture_triage.settings import Settings

log = logging.getLogger(__name__)

#: Largest request head (request line and headers) h11 buffers before answering 400.
MAX_HEAD_BYTES = 16384


def http_url(settings: Settings) -> str:
    """Where the application answers, for banners and logs."""
    scheme = "https" if settings.http_tls_files else "http"
    host = settings.http_bind_address
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{settings.http_port}/"


def make_server(settings: Settings) -> object:
    import uvicorn

    from api.app import create_app

    tls = settings.http_tls_files
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_bind_address,
        port=settings.http_port,
        http="h11",
        lifespan="on",
        log_config=None,
        access_log=True,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=max(1, round(settings.http_idle_timeout_seconds)),
        limit_concurrency=settings.http_max_connections,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        ssl_certfile=None if tls is None else tls[0],
        ssl_keyfile=None if tls is None else tls[1],
    )
    return uvicorn.Server(config)


def run_api(settings: Settings, stop_event: threading.Event) -> None:
    """Serve until ``stop_event`` is set (the ``fracture-triage api`` role)."""
    import uvicorn

    server = make_server(settings)
    assert isinstance(server, uvicorn.Server)

    def stop_when_told() -> None:
        stop_event.wait()
        server.should_exit = True

    threading.Thread(target=stop_when_told, name="api-stop", daemon=True).start()
    log.info("web application on %s", http_url(settings))
    server.run()
    stop_event.set()
    log.info("web application stopped")
