"""Group commit: the units of work of many threads committed together, one fsync for all.

The storage SCP answers Success only once an object's row is committed, and with SQLite
(``synchronous=FULL``) every commit is an fsync of the write-ahead log. Four associations
each committing on their own thread queue behind SQLite's write lock, whose busy handler
waits by sleeping (1, 2, 5, 10 ... ms), and pay one fsync each. Here one thread commits for
all of them: it takes every unit of work waiting, runs them in one transaction and commits
once; each caller is released only after that commit, so "committed before answered" holds
exactly as with :func:`db.session.in_transaction`. Batches form by themselves, without an
added delay: work arriving while a commit is in progress waits for the next one. (The same
technique databases use for their own log, e.g. PostgreSQL's ``commit_delay``.)

A unit of work that raises (an identity conflict, a unique row another process inserted
first) must not undo the others: the batch is rolled back and each of its units is run
again alone (:func:`in_transaction`, with its retries), so each caller gets the result or
the exception it would have had alone. A database that fails itself (down, locked past its
timeout, full: ``OperationalError``) is not tried again unit by unit: each caller gets
that error at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.session import in_transaction

T = TypeVar("T")

log = logging.getLogger(__name__)

#: At most this many units of work in one transaction (a bound on the work one failure
#: makes run again alone).
MAX_BATCH = 32


@dataclass
class _Unit:
    work: Callable[[Session], Any]
    done: Future[Any] = field(default_factory=Future)


class GroupCommit:
    """Runs units of work for any thread on one committing thread, several per transaction.

    Units must be re-runnable from the database's state (they read what they change), as
    :func:`in_transaction` requires already; rows they return stay readable after the
    commit (``expire_on_commit=False``). The thread starts on first use and is a daemon;
    :meth:`close` lets the units already handed over finish.
    """

    def __init__(self, sessions: sessionmaker[Session], max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self._sessions = sessions
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Unit | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: Transactions committed and units in them, for the log at close and for tests.
        self.batches = 0
        self.units = 0

    def run(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a transaction shared with other callers'; return its result once
        that transaction is committed, or raise what ``work`` or the commit raised."""
        with self._lock:
            if self._closed or threading.current_thread() is self._thread:
                thread = None
            else:
                thread = self._start()
        if thread is None:  # closed, or called from a unit of work: no one else to wait for
            return in_transaction(self._sessions, work)
        unit = _Unit(work)
        self._queue.put(unit)
        return cast(T, unit.done.result())

    def submit(self, work: Callable[[Session], None]) -> Future[Any]:
        """Hand ``work`` over to be committed with the next transaction, without waiting;
        its future holds the outcome (for work whose loss a later step repairs)."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._start()
        unit = _Unit(work)
        if closed:
            try:
                unit.done.set_result(in_transaction(self._sessions, work))
            except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
                unit.done.set_exception(exc)
        else:
            self._queue.put(unit)
        return unit.done

    def close(self, timeout: float = 30.0) -> None:
        """Commit what was handed over, then stop the thread (later :meth:`run` calls commit
        on the caller's thread)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        if self.units:
            log.info("group commit: %d units of work in %d transactions", self.units, self.batches)

    def _start(self) -> threading.Thread:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
            self._thread.start()
        return self._thread

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    unit = self._queue.get_nowait()
                except queue.Empty:
                    break
                if unit is None:
                    stopping = True
                    break
                batch.append(unit)
            self._commit(batch)

    def _commit(self, batch: list[_Unit]) -> None:
        if len(batch) == 1:
            self._each_alone(batch)
            return
        try:
            with self._sessions() as session:
                results = [unit.work(session) for unit in batch]
                session.commit()
        except (OperationalError, InterfaceError) as exc:
            # The database itself failed (down, locked past its timeout, disk full): alone,
            # each unit would wait for the same failure.
            for unit in batch:
                unit.done.set_exception(exc)
            return
        except BaseException:  # noqa: BLE001 - one unit's refusal, or another writer's row
            self._each_alone(batch)
            return
        self.batches += 1
        self.units += len(batch)
        for unit, result in zip(batch, results, strict=True):
            unit.done.set_result(result)

    def _each_alone(self, batch: list[_Unit]) -> None:
        for unit in batch:
            try:
                result = in_transaction(self._sessions, unit.work)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who handles it
                unit.done.set_exception(exc)
            else:
                self.batches += 1
                self.units += 1
                unit.done.set_result(result)
