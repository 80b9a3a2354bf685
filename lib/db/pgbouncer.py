"""Databases reached through pgbouncer in transaction mode (`<NAME>_DB_PGBOUNCER=transaction`).

pgbouncer lends a PostgreSQL session to a client for one transaction at a time, and refuses
the `options` startup parameter a direct connection sets `statement_timeout` with. So on
such a database nothing relies on a session outliving its transaction:

- The statement timeout is `SET LOCAL`, inside each transaction. A statement that starts one
  (the connection is idle) goes out as `SET LOCAL statement_timeout = N; <statement>`, one
  simple-protocol message. Inside an explicit transaction (psycopg2 sent BEGIN first) the
  setting lasts until COMMIT or ROLLBACK; in autocommit the two statements form PostgreSQL's
  implicit transaction of one message, so it lasts for that statement alone. No round trip
  is added, and nothing stays on the server session pgbouncer lends next to another client,
  which a session-level `SET` would. The cost: in autocommit a statement that refuses to run
  in a transaction block (VACUUM, CREATE INDEX CONCURRENTLY) fails with SQLSTATE 25001.
- `callproc`, COPY and named cursors cannot carry the prefix: they run after a standalone
  `SET LOCAL`, in autocommit inside a short transaction of their own. A WITH HOLD cursor
  outlives its transaction and is refused with an error that says so.
- `lib.prepared.Prepared` statements run as parameterized text (`session_state` is False):
  a statement PREPAREd in one transaction would be missing from the session of the next.

Every cursor of such a connection gets this behaviour, whatever its factory, because the
connection class maps each factory to a subclass with the timeout mixed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

# What an action must not rely on behind a transaction pooler: said once at start (lib/server/startup.py).
SESSION_FEATURES = (
    'session-level SET (use SET LOCAL)',
    'PREPARE/EXECUTE of its own',
    'session advisory locks (pg_advisory_lock; pg_advisory_xact_lock works)',
    'temporary tables kept across transactions',
    'LISTEN',
    'WITH HOLD cursors',
    'VACUUM or CREATE INDEX CONCURRENTLY in autocommit',
)


class TimeoutCursor(Cursor):
    """A cursor whose every transaction has `SET LOCAL statement_timeout` (the module docstring)."""

    connection: PgbouncerConnection

    def execute(self, query: Any, vars: Any = None) -> None:
        conn = self.connection
        if conn.get_transaction_status() == TRANSACTION_STATUS_IDLE:
            if self.name is None:
                query = prefixed(query, conn.timeout_prefix)
            else:
                refuse_withhold(self)
                with_timeout(conn)  # DECLARE ... CURSOR FOR takes one statement: no prefix
        super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        conn = self.connection
        if conn.get_transaction_status() == TRANSACTION_STATUS_IDLE:
            query = prefixed(query, conn.timeout_prefix)  # in autocommit each run is its own transaction
        super().executemany(query, vars_list)

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        with armed(self.connection):
            return super().callproc(procname, parameters)

    def copy_expert(self, *args: Any, **kwargs: Any) -> None:
        with armed(self.connection):
            super().copy_expert(*args, **kwargs)

    def copy_from(self, *args: Any, **kwargs: Any) -> None:
        with armed(self.connection):
            super().copy_from(*args, **kwargs)

    def copy_to(self, *args: Any, **kwargs: Any) -> None:
        with armed(self.connection):
            super().copy_to(*args, **kwargs)


class PgbouncerConnection(Connection):
    """A connection to pgbouncer in transaction mode; subclasses set the timeout (`connection_class`)."""

    session_state = False  # nothing outlives a transaction: lib/prepared.py sends plain text
    timeout_sql = ''
    timeout_prefix = ''

    def cursor(
        self, name: Any = None, cursor_factory: Any = None, withhold: bool = False, scrollable: Any = None
    ) -> Any:
        default: Any = self.cursor_factory  # None unless set on the connection
        factory = timed(cursor_factory or default or Cursor)
        return super().cursor(name, cursor_factory=factory, withhold=withhold, scrollable=scrollable)

    def cursor_class(self, factory: Any) -> Any:
        """The class `cursor(cursor_factory=factory)` makes, for lib to make its own directly."""
        parent = getattr(super(), 'cursor_class', None)
        made = timed(factory)
        return parent(made) if parent is not None else made


@lru_cache(maxsize=64)
def timed(factory: type[Cursor]) -> type[TimeoutCursor]:
    """`factory` with the statement timeout mixed in (itself when it has it already)."""
    if issubclass(factory, TimeoutCursor):
        return factory
    return type(f'Timed{factory.__name__}', (TimeoutCursor, factory), {})


@lru_cache(maxsize=16)
def connection_class(base: type[Connection], statement_timeout: int) -> type[PgbouncerConnection]:
    """A connection class for pgbouncer with `statement_timeout` milliseconds (0: none, as in PostgreSQL)."""
    timeout_sql = f'SET LOCAL statement_timeout = {int(statement_timeout)}'
    attributes = {'timeout_sql': timeout_sql, 'timeout_prefix': f'{timeout_sql}; '}
    return type(f'Pgbouncer{base.__name__}', (PgbouncerConnection, base), attributes)


def prefixed(query: Any, prefix: str) -> Any:
    """`prefix` in front of a query given as text, bytes or a psycopg2 `sql.Composable`."""
    if isinstance(query, str):
        return prefix + query
    if isinstance(query, bytes):
        return prefix.encode() + query
    if isinstance(query, sql.Composable):
        return sql.Composed([sql.SQL(prefix), query])
    return query  # psycopg2 refuses it with its own error


def with_timeout(conn: PgbouncerConnection) -> None:
    """Run the standalone `SET LOCAL` (psycopg2 sends BEGIN first outside autocommit)."""
    with Cursor(conn) as cursor:
        cursor.execute(conn.timeout_sql)


def refuse_withhold(cursor: Cursor) -> None:
    if cursor.withhold:
        raise RuntimeError(
            f'cursor {cursor.name!r} is WITH HOLD: it outlives its transaction, and pgbouncer in transaction mode'
            ' gives the next transaction another server session; fetch inside one transaction instead'
        )


@contextmanager
def armed(conn: PgbouncerConnection) -> Iterator[None]:
    """The block runs in a transaction that has the timeout: the current one, a new one (psycopg2
    begins it), or in autocommit a short one of its own, committed when the block ends."""
    if conn.get_transaction_status() != TRANSACTION_STATUS_IDLE:
        yield  # the statement that began this transaction carried the SET LOCAL
        return
    if not conn.autocommit:
        with_timeout(conn)
        yield
        return
    conn.autocommit = False
    try:
        with_timeout(conn)
        yield
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = True


def limits_line(names: list[str]) -> str:
    """The start-up line for the databases behind pgbouncer: what works differently, what cannot work."""
    return (
        f'database {", ".join(repr(n) for n in names)} through pgbouncer in transaction mode: no startup options,'
        ' statement_timeout set with SET LOCAL in each transaction, prepared statements sent as plain text;'
        f' an action cannot rely on {", ".join(SESSION_FEATURES)}'
    )
