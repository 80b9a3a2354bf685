"""A bounded, thread-safe pool of psycopg2 connections for one database in one process.

Modelled on psycopg_pool: a paired `getconn()`/`putconn()` under a `connection()` context
manager, one deadline for the wait, every returned connection checked (rolled back if it is
in a transaction, dropped if broken), and errors that subclass psycopg2's OperationalError
so callers that handle database outages handle the pool's too.
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg2
from psycopg2.extensions import (
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


def is_broken(conn: Connection) -> bool:
    """True when an idle connection can no longer be used.

    An idle connection's socket has nothing to read unless the server sent something on its
    own: a termination notice (restart, pg_terminate_backend) or EOF. A zero-timeout poll
    costs one system call, far less than a `SELECT 1` round trip on every checkout.
    """
    if conn.closed:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg2.Error):
        return True
    return bool(readable)


class ConnectionPool:
    """At most `max_size` connections to one database, opened on demand."""

    def __init__(self, name: str, params: dict[str, Any], max_size: int, timeout: float) -> None:
        self.name = name
        self.max_size = max_size
        self.timeout = timeout
        self._params = params
        self._idle: deque[Connection] = deque()
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

    def getconn(self, timeout: float | None = None) -> Connection:
        """A healthy connection, waiting at most `timeout` seconds for one to be free."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            conn = self._reserve(deadline)
            if conn is None:
                return self._open()
            if not is_broken(conn):
                return conn
            self._discard(conn)

    def putconn(self, conn: Connection) -> None:
        """Give a connection back, clean: rolled back if needed, dropped if broken."""
        if self._closed or not self._reset(conn):
            self._discard(conn)
            return
        with self._lock:
            self._idle.append(conn)
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
        for conn in idle:
            self._discard(conn)

    def _reserve(self, deadline: float) -> Connection | None:
        """An idle connection, or None when the caller may open a new one (a slot is taken)."""
        with self._lock:
            while True:
                if self._closed:
                    raise PoolClosed(f'pool {self.name!r} is closed')
                if self._idle:
                    return self._idle.pop()  # LIFO: the warmest connection, the others may age out
                if self._opened < self.max_size:
                    self._opened += 1
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolTimeout(
                        f'no free connection in pool {self.name!r} ({self.max_size} in use) within {self.timeout:g} s'
                    )
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1

    def _open(self) -> Connection:
        try:
            return psycopg2.connect(**self._params)
        except BaseException:
            self._release_slot()
            raise

    def _reset(self, conn: Connection) -> bool:
        """Bring a returned connection back to idle; False when it must be dropped."""
        if conn.closed:
            return False
        status = conn.info.transaction_status
        if status == TRANSACTION_STATUS_IDLE:
            return True
        if status == TRANSACTION_STATUS_UNKNOWN:
            return False
        try:
            conn.rollback()
        except psycopg2.Error:
            return False
        return conn.info.transaction_status == TRANSACTION_STATUS_IDLE

    def _discard(self, conn: Connection) -> None:
        with suppress(psycopg2.Error):
            conn.close()
        self._release_slot()

    def _release_slot(self) -> None:
        with self._lock:
            self._opened -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        """Wake one waiting caller, if any (the lock is held)."""
        if self._waiting:
            self._cond.notify()
