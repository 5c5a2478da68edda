"""The web application served by a real uvicorn on loopback (a free port per test), with
accounts and tokens made through ``db.accounts``, and a small client that logs in the way a
browser does (the login form's CSRF cookie, then the session cookie)."""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import httpx

from db import accounts
from db.models import Role
from db.session import make_engine, make_session_factory
from fracture_triage.settings import Settings
from tests.databases import migrated
from tests.servers import free_port, wait_for_port

PASSWORD = "correct horse battery"
ADMIN_PASSWORD = "admin horse battery staple"


@dataclass
class WebApp:
    settings: Settings
    url: str
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, follow_redirects=False, **kwargs)

    def api(self, token_name: str = "ris") -> httpx.Client:
        return self.client(headers={"Authorization": f"Bearer {self.tokens[token_name]}"})


#: Argon2id costs ~0.1 s by design: the tests' two passwords are hashed once per process
#: (each a real Argon2id hash, which login verifies), not twice for every served app.
_hash_once = SimpleNamespace(hash=functools.cache(accounts._hasher.hash))


def add_accounts(database_url: str) -> dict[str, str]:
    """Users ``rad`` (radiologist) and ``boss`` (admin); tokens ``ris`` (radiologist) and
    ``ops`` (admin). Returns the tokens' secrets."""
    engine = make_engine(database_url)
    try:
        with (
            make_session_factory(engine)() as s,
            mock.patch.object(accounts, "_hasher", _hash_once),
        ):
            accounts.add_user(s, "rad", Role.radiologist, PASSWORD)
            accounts.add_user(s, "boss", Role.admin, ADMIN_PASSWORD)
            tokens = {
                name: accounts.create_token(s, name, role)[1]
                for name, role in (("ris", Role.radiologist), ("ops", Role.admin))
            }
            s.commit()
    finally:
        engine.dispose()
    return tokens


@contextmanager
def serve(database_url: str, data_dir: Path, **overrides: Any) -> Iterator[WebApp]:
    """Migrate, add the accounts, serve the app on 127.0.0.1:<free port> until the end."""
    import uvicorn

    from api.server import make_server

    migrated(database_url)
    tokens = add_accounts(database_url)
    port = free_port()
    settings = Settings(data_dir=data_dir, database_url=database_url, http_port=port, **overrides)
    server = make_server(settings)
    assert isinstance(server, uvicorn.Server)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for_port(port, timeout=30)
        yield WebApp(settings=settings, url=f"http://127.0.0.1:{port}", tokens=tokens)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def cookie_header(response: httpx.Response, name: str) -> str:
    """The value of a Set-Cookie (httpx keeps Secure cookies off plain http, as it should;
    the tests send them by hand, as a browser on loopback does)."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return header.split(";", 1)[0].split("=", 1)[1]
    raise AssertionError(f"no {name} cookie set: {response.headers.get_list('set-cookie')}")


def login(app: WebApp, name: str = "rad", password: str = PASSWORD) -> tuple[httpx.Client, str]:
    """A client with a live session cookie, and the session's CSRF token."""
    client = app.client()
    page = client.get("/login")
    login_csrf = cookie_header(page, "ft_login_csrf")
    answer = client.post(
        "/login",
        data={"name": name, "password": password, "csrf_token": form_token(page.text)},
        headers={"Cookie": f"ft_login_csrf={login_csrf}"},
    )
    assert answer.status_code == 303, answer.text
    session = cookie_header(answer, "ft_session")
    client.headers["Cookie"] = f"ft_session={session}"
    worklist = client.get("/worklist")
    assert worklist.status_code == 200, worklist.text
    return client, form_token(worklist.text)
