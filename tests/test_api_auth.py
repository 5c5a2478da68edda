"""Accounts, sessions, tokens and the hardening of the web application, over real HTTP to
uvicorn on loopback (SQLite here; the PostgreSQL runs are in test_api_worklist.py)."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import select

from db import accounts
from db.models import AuditEvent
from db.session import make_engine, make_session_factory
from tests.webapp import PASSWORD, WebApp, cookie_header, form_token, login, serve


@pytest.fixture
def app(tmp_path: Path) -> Iterator[WebApp]:
    with serve(f"sqlite:///{tmp_path / 'triage.db'}", tmp_path) as served:
        yield served


def audit_rows(app: WebApp) -> list[AuditEvent]:
    engine = make_engine(app.settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as s:
            return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    finally:
        engine.dispose()


def test_everything_but_health_and_login_needs_credentials(app: WebApp) -> None:
    with app.client() as c:
        health = c.get("/health").json()
        assert (health["status"], health["storage"]["status"]) == ("ok", "ok")
        assert c.get("/login").status_code == 200
        for path in ("/api/v1/worklist", "/api/v1/results", "/api/v1/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.json() == {"error": "authentication required"}
            assert r.headers["www-authenticate"] == "Bearer"
        # Pages send the browser to the login, remembering where it was going.
        r = c.get("/worklist?flag=fracture")
        assert r.status_code == 303
        assert r.headers["location"] == "/login?next=/worklist%3Fflag%3Dfracture"
        assert c.get("/admin").status_code == 303
        # A bearer header naming no token is refused, not treated as anonymous.
        r = c.get("/api/v1/worklist", headers={"Authorization": "Bearer ftt_forged"})
        assert r.status_code == 401


def test_login_sets_a_hardened_cookie_and_logout_ends_the_session(app: WebApp) -> None:
    with app.client() as c:
        page = c.get("/login")
        csrf = cookie_header(page, "ft_login_csrf")
        r = c.post(
            "/login",
            data={"name": "rad", "password": PASSWORD, "csrf_token": form_token(page.text)},
            headers={"Cookie": f"ft_login_csrf={csrf}"},
        )
        assert r.status_code == 303 and r.headers["location"] == "/worklist"
        set_cookie = next(
            h for h in r.headers.get_list("set-cookie") if h.startswith("ft_session=")
        )
        flags = {f.strip().lower() for f in set_cookie.split(";")[1:]}
        assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
    client, csrf_token = login(app)
    with closing(client):
        assert client.get("/api/v1/worklist").status_code == 200  # the session works there too
        r = client.post("/logout", data={"csrf_token": csrf_token})
        assert r.status_code == 303
        assert client.get("/worklist").status_code == 303  # the same cookie is dead now
    actions = [e.action for e in audit_rows(app)]
    assert actions.count("login") == 2 and actions[-1] == "logout"


def test_login_form_without_its_csrf_token_is_refused(app: WebApp) -> None:
    with app.client() as c:
        page = c.get("/login")
        r = c.post(
            "/login",
            data={"name": "rad", "password": PASSWORD, "csrf_token": form_token(page.text)},
        )  # no ft_login_csrf cookie: a post from another site looks like this
        assert r.status_code == 403 and "ft_session" not in r.headers.get("set-cookie", "")


@pytest.mark.slow  # waits 3.5 s by design (the slow-down it checks)
def test_failed_logins_are_slowed_down_recorded_and_logged(
    app: WebApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="api.auth_routes")
    timings = []
    with app.client() as c:
        for _ in range(4):
            page = c.get("/login")
            csrf = cookie_header(page, "ft_login_csrf")
            started = time.monotonic()
            r = c.post(
                "/login",
                data={
                    "name": "rad",
                    "password": "wrong guess",
                    "csrf_token": form_token(page.text),
                },
                headers={"Cookie": f"ft_login_csrf={csrf}"},
            )
            timings.append(time.monotonic() - started)
            assert r.status_code == 401 and "Wrong name or password" in r.text
    # 0, 0.5, 1, 2 s of waiting before the password is checked (plus Argon2's own time).
    assert timings[3] >= 2.0 and timings[2] >= 1.0 and timings[0] < 1.0, timings
    failed = [e for e in audit_rows(app) if e.action == "login_failed"]
    assert len(failed) == 4 and failed[0].actor == "rad" and failed[0].client_address == "127.0.0.1"
    assert sum("failed login for 'rad'" in r.getMessage() for r in caplog.records) == 4
    assert "wrong guess" not in caplog.text


def test_tokens_roles_and_revocation(app: WebApp) -> None:
    with app.api("ris") as ris, app.api("ops") as ops:
        assert ris.get("/api/v1/worklist").status_code == 200
        r = ris.get("/api/v1/audit")
        assert r.status_code == 403 and r.json() == {"error": "this needs the admin role"}
        assert ops.get("/api/v1/audit").status_code == 200
        assert ris.get("/api/v1/openapi.json").json()["info"]["title"] == "fracture-triage"
        engine = make_engine(app.settings.resolved_database_url)
        with make_session_factory(engine)() as s:
            accounts.revoke_token(s, "ris")
            s.commit()
        engine.dispose()
        assert ris.get("/api/v1/worklist").status_code == 401


def test_disabled_user_cannot_log_in_and_loses_its_session(app: WebApp) -> None:
    client, _ = login(app)
    engine = make_engine(app.settings.resolved_database_url)
    with make_session_factory(engine)() as s:
        accounts.disable_user(s, "rad")
        s.commit()
    engine.dispose()
    with closing(client):
        assert client.get("/worklist").status_code == 303
    with pytest.raises(AssertionError):
        login(app)


def test_csrf_is_required_for_cookie_posts(app: WebApp) -> None:
    client, csrf_token = login(app)
    with closing(client):
        r = client.post("/logout", data={"csrf_token": "forged"})
        assert r.status_code == 403
        assert client.get("/worklist").status_code == 200  # still logged in


def test_host_header_security_headers_and_body_limit(app: WebApp) -> None:
    with app.client() as c:
        r = c.get("/health", headers={"Host": "attacker.example:8080"})
        assert r.status_code == 400 and r.json() == {"error": "invalid Host header"}
        assert c.get("/health", headers={"Host": "localhost"}).status_code == 200
        page = c.get("/login")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        big = c.post(
            "/login",
            content=b"name=" + b"a" * 200_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert big.status_code == 413 and "request body over" in big.json()["error"]


def test_idle_connection_is_closed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    with serve(url, tmp_path, http_idle_timeout_seconds=1) as app:
        port = app.settings.http_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            # head and body may come apart; the body ends with the storage figures' "}}"
            while not (b'{"status":"ok"' in answer and answer.endswith(b"}}")):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert b"200 OK" in answer
            started = time.monotonic()
            rest = sock.recv(65536)  # keep-alive: waits until the server closes
            assert rest == b"" and time.monotonic() - started < 5


def test_metrics_need_a_token_or_loopback(app: WebApp) -> None:
    with app.client() as c:
        r = c.get("/metrics")  # the test client is on loopback
        assert r.status_code == 200 and 'fracture_triage_instances{status="done"} 0.0' in r.text
    with app.api("ris") as ris:
        assert "fracture_triage_data_dir_free_bytes" in ris.get("/metrics").text


def test_login_page_refuses_open_redirects(app: WebApp) -> None:
    with app.client() as c:
        page = c.get("/login?next=//evil.example/")
        assert 'name="next" value="/worklist"' in page.text
        assert json.dumps("//evil.example/") not in page.text


def test_an_expired_session_goes_back_to_the_login(app: WebApp) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from db.models import WebSession
    from db.repository import utcnow

    client, _ = login(app)
    engine = make_engine(app.settings.resolved_database_url)
    with make_session_factory(engine)() as s:
        s.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    engine.dispose()
    with closing(client):
        assert client.get("/worklist").headers["location"] == "/login?next=/worklist"
        assert client.get("/api/v1/worklist").status_code == 401


def test_metrics_count_the_broker_queue(tmp_path: Path, redis: object) -> None:
    import redis as redis_client

    from fracture_triage.messages import QUEUE

    url = getattr(redis, "url")  # noqa: B009 - the fixture's RedisServer
    with serve(f"sqlite:///{tmp_path / 'triage.db'}", tmp_path, broker_url=url) as app:
        r = redis_client.Redis.from_url(url)
        r.delete(QUEUE)
        r.rpush(QUEUE, b"a", b"b", b"c")
        with app.client() as c:
            text = c.get("/metrics").text
        r.delete(QUEUE)
        r.close()
    assert "fracture_triage_broker_up 1.0" in text
    assert "fracture_triage_queue_depth 3.0" in text


def test_metrics_without_a_broker_say_so(tmp_path: Path) -> None:
    from tests.servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    db = f"sqlite:///{tmp_path / 'triage.db'}"
    with serve(db, tmp_path, broker_url=url) as app, app.client() as c:
        text = c.get("/metrics").text
    assert "fracture_triage_broker_up 0.0" in text and "queue_depth" not in text
