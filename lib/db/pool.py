"""A bounded, thread-safe pool of psycopg2 connections for one database in one process.

Modelled on psycopg_pool: a paired `getconn()`/`putconn()` under a `connection()` context
manager, one deadline for the wait, every returned connection checked (rolled back if it is
in a transaction, dropped if broken), connections retired after `max_lifetime` (jittered) or
`max_idle` seconds, and errors that subclass psycopg2's OperationalError so callers that
handle database outages handle the pool's too.
"""

from __future__ import annotations

import random
import select
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, ClassVar, Protocol

import psycopg2
from psycopg2.extensions import (
    STATUS_READY,
    TRANSACTION_STATUS_IDLE,
    TRANSACTION_STATUS_UNKNOWN,
)
from psycopg2.extensions import (
    connection as Connection,
)


class PoolError(psycopg2.OperationalError):
    """The pool could not hand out a connection."""


class PoolTimeout(PoolError):
    """No connection became free before the deadline."""


class PoolClosed(PoolError):
    """The pool was closed (the process is shutting down)."""


class PoolObserver(Protocol):
    """What the pools of a process report as it happens (lib.observability.metrics keeps the counts)."""

    def waited(self, pool: str, seconds: float) -> None:
        """A checkout found every connection in use and waited `seconds` (then got one, or timed out)."""

    def timed_out(self, pool: str) -> None:
        """A checkout gave up: no connection became free before its deadline."""


# A connection lives between 90% and 100% of max_lifetime, so connections opened together
# (every worker at start) are not all retired, and reopened, at the same moment.
LIFETIME_JITTER = 0.1


def is_broken(conn: Connection) -> bool:
    """True when an idle connection can no longer be used.

    An idle connection's socket has nothing to read unless the server sent something on its
    own: a termination notice (restart, pg_terminate_backend) or EOF. A zero-timeout poll
    costs one system call, far less than a `SELECT 1` round trip on every checkout.
    `poll`, not `select`: select() cannot watch a descriptor >= FD_SETSIZE (1024), so in a
    process with many open files every connection would look broken and be reopened.
    """
    if conn.closed:
        return True
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)  # POLLERR, POLLHUP, POLLNVAL come anyway
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg2.Error):
        return True


def jittered(lifetime: float) -> float:
    """`lifetime` shortened by a random 0 to LIFETIME_JITTER of itself."""
    # Not a secret: the jitter only spreads reconnects over time.
    return lifetime * (1.0 - LIFETIME_JITTER * random.random())  # noqa: S311  # nosec B311


class ConnectionPool:
    """At most `max_size` connections to one database, opened on demand.

    A connection is retired (closed, its slot freed) once it has lived `max_lifetime` seconds
    (less a random 0-10%) or sat idle `max_idle` seconds, checked only when it is returned or
    about to be borrowed: never while a caller holds it.

    Every pool of the process reports waits and timeouts to `observer` when one is set.
    """

    observer: ClassVar[PoolObserver | None] = None

    def __init__(
        self,
        name: str,
        params: dict[str, Any],
        max_size: int,
        timeout: float,
        max_lifetime: float = 1800.0,
        max_idle: float = 600.0,
    ) -> None:
        for label, value in (('max_lifetime', max_lifetime), ('max_idle', max_idle)):
            if not value > 0:
                raise ValueError(f'{label}={value!r} must be more than 0 seconds')
        self.name = name
        self.max_size = max_size
        self.timeout = timeout
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self._params = params
        # Idle connections with the monotonic time they were returned, oldest return first.
        self._idle: deque[tuple[Connection, float]] = deque()
        # id(conn) -> (opened at, retire at), monotonic, for every connection the pool opened
        # and has not closed: the pool's bookkeeping stays out of the psycopg2 objects.
        self._ages: dict[int, tuple[float, float]] = {}
        self._opened = 0
        self._closed = False
        # The plain lock for short critical sections (its `with` is C; a Condition's is Python),
        # the condition on the same lock for waiting, notified only when someone waits.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0

    def __repr__(self) -> str:
        return f'<ConnectionPool {self.name!r} {self._opened}/{self.max_size} open, {len(self._idle)} idle>'

    @property
    def stats(self) -> dict[str, int]:
        return {'open': self._opened, 'idle': len(self._idle), 'max': self.max_size}

    @property
    def waiting(self) -> int:
        """How many checkouts are waiting for a connection now."""
        return self._waiting

    def lifetime(self, conn: Connection) -> float:
        """The seconds `conn` may live in this pool (max_lifetime, jittered)."""
        opened_at, retire_at = self._ages[id(conn)]
        return retire_at - opened_at

    def getconn(self, timeout: float | None = None) -> Connection:
        """A healthy connection, younger than its lifetime and idle less than max_idle, waiting
        at most `timeout` seconds for one to be free.

        `now` is read once: a connection that arrives while this call waits was returned
        after `now` and checked then, so it is at most the wake-up latency older than seen.
        """
        now = time.monotonic()
        deadline = now + (self.timeout if timeout is None else timeout)
        idle_cutoff = now - self.max_idle
        while True:
            entry = self._reserve(deadline, idle_cutoff)
            if entry is None:
                return self._open()
            conn, returned_at = entry
            if returned_at > idle_cutoff and now < self._ages[id(conn)][1] and not is_broken(conn):
                return conn
            self._discard(conn)

    def putconn(self, conn: Connection) -> None:
        """Give a connection back, clean: rolled back if needed, dropped if broken or too old."""
        now = time.monotonic()
        if self._closed or now >= self._retire_at(conn) or not self._reset(conn):
            self._discard(conn)
            return
        with self._lock:
            self._idle.append((conn, now))
            self._wake_one()

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        conn = self.getconn(timeout)
        try:
            yield conn
        finally:
            self.putconn(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._cond.notify_all()
        for conn, _ in idle:
            self._discard(conn)

    def _reserve(self, deadline: float, idle_cutoff: float) -> tuple[Connection, float] | None:
        """An idle connection with its return time, or None when the caller may open a new one
        (a slot is taken).

        LIFO, the warmest connection, so the others age out; but when the oldest return is
        before `idle_cutoff` that one comes first, for the caller to close: with LIFO alone
        the connections at the bottom would never be looked at while load is light.
        The observer hears of a wait or a timeout after the lock is released.
        """
        waiting_since = 0.0
        try:
            with self._lock:
                while True:
                    if self._closed:
                        raise PoolClosed(f'pool {self.name!r} is closed')
                    if self._idle:
                        if self._idle[0][1] <= idle_cutoff:
                            return self._idle.popleft()
                        return self._idle.pop()
                    if self._opened < self.max_size:
                        self._opened += 1
                        return None
                    now = time.monotonic()
                    remaining = deadline - now
                    if remaining <= 0:
                        raise PoolTimeout(
                            f'no free connection in pool {self.name!r} ({self.max_size} in use)'
                            f' within {self.timeout:g} s'
                        )
                    waiting_since = waiting_since or now
                    self._waiting += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._waiting -= 1
        except PoolTimeout:
            if self.observer is not None:
                self.observer.timed_out(self.name)
            raise
        finally:
            if waiting_since and self.observer is not None:
                self.observer.waited(self.name, time.monotonic() - waiting_since)

    def _open(self) -> Connection:
        try:
            conn: Connection = psycopg2.connect(**self._params)
        except BaseException:
            self._release_slot()
            raise
        opened_at = time.monotonic()
        self._ages[id(conn)] = (opened_at, opened_at + jittered(self.max_lifetime))
        return conn

    def _retire_at(self, conn: Connection) -> float:
        """When `conn` must be closed; a connection this pool did not open is refused."""
        ages = self._ages.get(id(conn))
        if ages is None:
            raise ValueError(f'{conn!r} was not opened by pool {self.name!r}: it cannot be returned to it')
        return ages[1]

    def _reset(self, conn: Connection) -> bool:
        """Bring a returned connection back to idle, for the server and for psycopg2 alike; False
        when it must be dropped."""
        status = conn.get_transaction_status()  # not `conn.info`: that makes an object per call
        if status == TRANSACTION_STATUS_IDLE and conn.status == STATUS_READY:
            return True
        if status == TRANSACTION_STATUS_UNKNOWN:
            return False
        try:
            if conn.status != STATUS_READY:
                conn.rollback()  # a transaction psycopg2 began (`with conn:` begins one even in autocommit)
            if conn.get_transaction_status() != TRANSACTION_STATUS_IDLE:
                # One begun by SQL (lib.idempotency sends its own BEGIN), which psycopg2 never knew of.
                with conn.cursor() as cursor:
                    cursor.execute('ROLLBACK')
        except psycopg2.Error:
            return False
        return conn.get_transaction_status() == TRANSACTION_STATUS_IDLE and conn.status == STATUS_READY

    def _discard(self, conn: Connection) -> None:
        with suppress(psycopg2.Error):
            conn.close()
        self._ages.pop(id(conn), None)
        self._release_slot()

    def _release_slot(self) -> None:
        with self._lock:
            self._opened -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        """Wake one waiting caller, if any (the lock is held)."""
        if self._waiting:
            self._cond.notify()
