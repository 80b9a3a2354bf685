"""The database layer: per-process pools, connections scoped to a request, the Db helper.

Connections taken during a request are given back when the request ends, whatever the
action did, so a forgetful action cannot drain the pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from operator import attrgetter
from typing import Any, cast

import psycopg2
from flask import Flask, current_app, has_app_context
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as PlainCursor
from psycopg2.extras import RealDictCursor

from lib import pgbouncer, process
from lib.config import Pgbouncer
from lib.events import outbox
from lib.pool import ConnectionPool, PoolClosed
from lib.prepared import Prepared, execute_prepared
from lib.scope import RequestScope, current_scope
from settings import APP_ID

Params = Mapping[str, Any] | Sequence[Any] | None
Query = str | sql.Composable | Prepared
POOLS_KEY = 'dbapi.pools'  # in app.extensions
COLUMN_NAME = attrgetter('name')  # of a cursor.description entry
Row = dict[str, Any] | tuple[Any, ...]


class HeldTransaction(RuntimeError):
    """An action tried to end the transaction the request holds (a 500: a bug in the action)."""

    def __init__(self, verb: str) -> None:
        super().__init__(
            f"an action cannot {verb} the request's transaction: lib.transaction commits it when the action"
            ' returns and rolls it back when it raises (a batch and an Idempotency-Key rely on it); use'
            ' transactional(conn) for a block of its own, or inject_conn(autocommit=True)'
        )


class PooledConnection(Connection):
    """A psycopg2 connection that remembers whether its rows should be dicts, and refuses to be
    committed or rolled back by an action while its transaction is the request's (`held`);
    psycopg2's `with conn:` ends a transaction through these same methods. The events emitted in
    its transaction are written by its commit, just before the COMMIT, and forgotten by its
    rollback (lib.events.outbox)."""

    named: bool = True
    session_state = True  # lib/prepared.py may keep statements on it (not so behind pgbouncer)
    held: bool = False  # its transaction belongs to lib (lib.transaction): `transactional` nests in it
    pending_events: list[outbox.Pending] | None = None  # events emitted in its transaction, not yet written

    def commit(self) -> None:
        if self.held:
            raise HeldTransaction('commit')
        if self.pending_events:
            outbox.flush(self)
        super().commit()

    def rollback(self) -> None:
        if self.held:
            raise HeldTransaction('roll back')
        self.pending_events = None
        super().rollback()


def release(conn: Connection) -> Connection:
    """The connection's transaction is lib's to end now (lib.transaction, before it commits or
    rolls back; before the pool resets it)."""
    if isinstance(conn, PooledConnection):
        conn.held = False
    return conn


class Pools:
    """Every database's pool for one app in one process, created lazily after the fork."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.databases: dict[str, dict[str, Any]] = config['DATABASES']
        self.size: int = config['POOL_SIZE']
        self.timeout: float = config['POOL_TIMEOUT']
        self.max_lifetime: float = config['POOL_MAX_LIFETIME']
        self.max_idle: float = config['POOL_MAX_IDLE']
        self.connect_timeout: int = config['CONNECT_TIMEOUT']
        self.statement_timeout: int = config['STATEMENT_TIMEOUT']
        self.pgbouncer: Mapping[str, Pgbouncer] = config.get('PGBOUNCER', {})
        self._pools: dict[str, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._pid = process.pid
        self._inherited: list[ConnectionPool] = []

    def get(self, name: str) -> ConnectionPool:
        pool = self._pools.get(name)
        if pool is not None and self._pid == process.pid:
            return pool
        with self._lock:
            self._forget_inherited()
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = self._create(name)
            return pool

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: pool.stats for name, pool in self._pools.items()}

    def _create(self, name: str) -> ConnectionPool:
        if name not in self.databases:
            raise KeyError(f'no database named {name!r} is configured (known: {", ".join(self.databases)})')
        params = dict(
            self.databases[name],
            connect_timeout=self.connect_timeout,
            application_name=f'{APP_ID}:{process.pid}',
            # A dead peer is noticed within ~30 s instead of the kernel's two hours.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        if name in self.pgbouncer:
            # pgbouncer refuses `options`; the timeout goes into each transaction (lib/pgbouncer.py).
            params['connection_factory'] = pgbouncer.connection_class(PooledConnection, self.statement_timeout)
        else:
            params.update(options=f'-c statement_timeout={self.statement_timeout}', connection_factory=PooledConnection)
        return ConnectionPool(
            name,
            params,
            max_size=self.size,
            timeout=self.timeout,
            max_lifetime=self.max_lifetime,
            max_idle=self.max_idle,
        )

    def _forget_inherited(self) -> None:
        """After a fork, never touch the parent's sockets: closing them would end its sessions."""
        if self._pid == process.pid:
            return
        self._inherited.extend(self._pools.values())
        self._pools = {}
        self._pid = process.pid


def init_app(app: Flask) -> None:
    app.extensions[POOLS_KEY] = Pools(app.config)


def pools() -> Pools:
    """The pools of the app serving the current request, or of the current app context."""
    scope = current_scope()
    if scope is not None:
        return scope.pools
    if not has_app_context():
        raise RuntimeError('lib.db needs a request or an app context: the pools belong to an app')
    found: Pools = current_app.extensions[POOLS_KEY]
    return found


def prepare(conn: Connection, named: bool, autocommit: bool, held: bool = False) -> Connection:
    """Set up a borrowed connection for its user; `held`: lib owns its transaction (commits it)."""
    conn.autocommit = autocommit  # client-side in psycopg2: no round trip
    pooled = cast(PooledConnection, conn)  # the pools open only PooledConnections
    pooled.held = held
    pooled.pending_events = None  # events of an earlier borrower's transaction never reach this one's
    return rows_as(conn, named)


def rows_as(conn: Connection, named: bool) -> Connection:
    """Rows as dicts (`named`) or tuples, for the Db helpers and `conn.cursor()`; can change
    inside a transaction (a batch's steps each get rows as they declared)."""
    cast(PooledConnection, conn).named = named
    conn.cursor_factory = RealDictCursor if named else PlainCursor
    return conn


class BorrowedConnection:
    """`with connection(name) as conn:` a connection from `name`'s pool for the block, given
    back clean (rolled back if the block left a transaction open) however the block ends.
    A plain class rather than a generator: every injected connection passes through it."""

    __slots__ = ('autocommit', 'conn', 'held', 'named', 'pool')

    def __init__(self, name: str, named: bool, autocommit: bool, held: bool = False) -> None:
        self.pool = pools().get(name)
        self.named = named
        self.autocommit = autocommit
        self.held = held

    def __enter__(self) -> Connection:
        self.conn = self.pool.getconn()
        try:
            return prepare(self.conn, self.named, self.autocommit, self.held)
        except BaseException:
            self.pool.putconn(self.conn)
            raise

    def __exit__(self, *_: object) -> None:
        self.pool.putconn(release(self.conn))  # rolled back first if the block left a transaction


def connection(name: str, named: bool = True, autocommit: bool = True) -> BorrowedConnection:
    """A connection from `name`'s pool for the length of the block, then back to the pool clean."""
    return BorrowedConnection(name, named, autocommit)


def get_conn_from_dbname(name: str, named: bool = True, autocommit: bool = True) -> Connection:
    """A connection that goes back to its pool when the current request ends.

    Outside a request use `connection(name)` instead, which gives it back at the end of a block.
    """
    scope = current_scope()
    if scope is None:
        raise RuntimeError('get_conn_from_dbname() needs a request; use lib.db.connection() elsewhere')
    pool = scope.pools.get(name)
    conn = pool.getconn()
    scope.borrowed.append((pool, conn))
    return prepare(conn, named, autocommit)


def give_back_borrowed(scope: RequestScope) -> None:
    """Give back the connections taken with `get_conn_from_dbname` during the request of `scope`."""
    borrowed, scope.borrowed = scope.borrowed, []
    for pool, conn in borrowed:
        with suppress(PoolClosed):
            pool.putconn(conn)


@contextmanager
def transactional(conn: Connection) -> Iterator[Db]:
    """A `Db` over `conn` inside one transaction: committed at the end, rolled back on error.

    On a connection whose transaction lib holds (an injected, non-autocommit one: its action's,
    a batch's, a keyed request's), the block is a savepoint instead: rolled back alone on error,
    and committed only with the whole request, never by the block.
    """
    if getattr(conn, 'held', False):
        with savepoint(conn) as db:
            yield db
        return
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        yield Db(conn)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = autocommit


@contextmanager
def savepoint(conn: Connection) -> Iterator[Db]:
    """The block as a savepoint: released at its end, rolled back to on error. Nested blocks
    reuse one name: SQL's ROLLBACK TO and RELEASE name the newest savepoint of that name."""
    with conn.cursor() as cursor:
        cursor.execute('SAVEPOINT dbapi_transactional')
    emitted = outbox.mark(conn)
    try:
        yield Db(conn)
    except BaseException:
        outbox.truncate(conn, emitted)  # the block's events go with its writes
        # On a broken connection this fails too; the error the block raised is the one to tell.
        with suppress(psycopg2.Error), conn.cursor() as cursor:
            cursor.execute('ROLLBACK TO SAVEPOINT dbapi_transactional; RELEASE SAVEPOINT dbapi_transactional')
        raise
    with conn.cursor() as cursor:
        cursor.execute('RELEASE SAVEPOINT dbapi_transactional')


def get_db_from_conn(conn: Connection) -> Db:
    return Db(conn)


def quote(name: str) -> sql.SQL:
    """One quoted identifier, ready for a query that is executed with parameters.

    `psycopg2.sql.Identifier` leaves `%` alone, so a name holding `%s` would be read as a
    placeholder; doubling it keeps the name a name. The queries built here always pass
    parameters (at least an empty list), which is what makes `%%` mean `%`.
    """
    if not isinstance(name, str) or not name or '\x00' in name:
        raise ValueError(f'identifier {name!r} must be a non-empty string without NUL')
    return sql.SQL('"' + name.replace('"', '""').replace('%', '%%') + '"')


def identifier(name: str) -> sql.Composed:
    """A table or function name; `schema.table` becomes "schema"."table"."""
    if not isinstance(name, str) or not name:
        raise ValueError(f'identifier {name!r} must be a non-empty string')
    return sql.SQL('.').join(quote(part) for part in name.split('.'))


def _columns(names: Iterable[str]) -> sql.Composed:
    return sql.SQL(', ').join(map(quote, names))


def _pairs(values: Mapping[str, Any], prefix: str, params: dict[str, Any], glue: str = ' AND ') -> sql.Composable:
    """`"col" = %(p0)s` joined by `glue`; values go to `params` under generated names.

    Placeholder names never come from column names, so a hostile column name can only ever
    be a (quoted) identifier.
    """
    parts = []
    for index, (column, value) in enumerate(values.items()):
        key = f'{prefix}{index}'
        params[key] = value
        parts.append(sql.SQL('{} = {}').format(quote(column), sql.Placeholder(key)))
    return sql.SQL(glue).join(parts) if parts else sql.SQL('TRUE')


@lru_cache(maxsize=512)
def row_builder(columns: tuple[str, ...]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """A function making one row's dict with a dict display, cheaper than `dict(zip(...))`.

    The compiled text holds only generated names and indexes; the column names stay values in
    its namespace, so no column name can ever become code. A repeated name keeps its last value,
    as `dict(zip(...))` does.
    """
    names = {f'c{index}': name for index, name in enumerate(columns)}
    items = ', '.join(f'c{index}: row[{index}]' for index in range(len(columns)))
    # Safe eval: the text is built just above from indexes only.
    builder: Callable[[Sequence[Any]], dict[str, Any]] = eval(f'lambda row: {{{items}}}', names)  # noqa: S307  # nosec B307
    return builder


def execute_query(cursor: PlainCursor, query: Query, params: Params) -> None:
    """`cursor.execute`, which also runs a `Prepared` statement (lib/prepared.py)."""
    if isinstance(query, Prepared):
        execute_prepared(cursor, query, params)
    else:
        cursor.execute(query, params)


class Db:
    """Small helpers over one connection: identifiers quoted, every value a bound parameter."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.named = getattr(conn, 'named', True)

    def cursor(self) -> PlainCursor:
        # Always tuples underneath: `_rows` builds the dicts itself.
        return self.conn.cursor(cursor_factory=PlainCursor)

    def _rows(self, cursor: Any) -> list[Row]:
        if cursor.description is None:
            return []
        rows: list[Any] = cursor.fetchall()
        if not self.named:
            return rows
        # Plain tuples made into dicts by a compiled builder, cheaper than RealDictCursor.
        return list(map(row_builder(tuple(map(COLUMN_NAME, cursor.description))), rows))

    def fetch_all(self, query: Query, params: Params = None) -> list[Row]:
        with self.cursor() as cursor:
            execute_query(cursor, query, params)
            return self._rows(cursor)

    def fetch_row(self, query: Query, params: Params = None) -> Row | None:
        rows = self.fetch_all(query, params)
        return rows[0] if rows else None

    def fetch_one(self, query: Query, params: Params = None) -> Any:
        """The first column of the first row, or None."""
        with self.cursor() as cursor:
            execute_query(cursor, query, params)
            row = cursor.fetchone() if cursor.description else None
            return row[0] if row else None

    def execute(self, query: Query, params: Params = None) -> int:
        """Run a statement; the number of rows it touched."""
        with self.cursor() as cursor:
            execute_query(cursor, query, params)
            return cursor.rowcount

    def select(self, table: str, where: Mapping[str, Any] | None = None) -> list[Row]:
        params: dict[str, Any] = {}
        query = sql.SQL('SELECT * FROM {} WHERE {}').format(identifier(table), _pairs(where or {}, 'w', params))
        return self.fetch_all(query, params)

    def insert(self, table: str, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Row]:
        """Insert one row (a dict) or several (a list of dicts with the same keys); the rows written."""
        rows = [values] if isinstance(values, Mapping) else list(values)
        if not rows:
            return []
        columns = list(rows[0])
        for row in rows:
            if list(row) != columns:
                raise ValueError(f'insert into {table!r}: every row needs the columns {columns}, got {list(row)}')
        placeholders = sql.SQL('({})').format(sql.SQL(', ').join(sql.Placeholder() * len(columns)))
        query = sql.SQL('INSERT INTO {} ({}) VALUES {} RETURNING *').format(
            identifier(table), _columns(columns), sql.SQL(', ').join([placeholders] * len(rows))
        )
        return self.fetch_all(query, [row[column] for row in rows for column in columns])

    def update(self, table: str, data: Mapping[str, Any], identifier_: Mapping[str, Any]) -> int:
        """Set `data` on the rows matching `identifier_`; how many rows changed."""
        if not data:
            raise ValueError(f'update of {table!r} needs at least one column to set')
        if not identifier_:
            raise ValueError(f'update of {table!r} needs an identifier: refusing to update every row')
        params: dict[str, Any] = {}
        query = sql.SQL('UPDATE {} SET {} WHERE {}').format(
            identifier(table), _pairs(data, 's', params, glue=', '), _pairs(identifier_, 'w', params)
        )
        return self.execute(query, params)

    def upsert(self, table: str, data: Mapping[str, Any], identifier_: Mapping[str, Any]) -> Row | None:
        """Insert, or update on conflict with `identifier_`'s unique key, in one atomic statement."""
        if not identifier_:
            raise ValueError(f'upsert into {table!r} needs an identifier (a unique key)')
        values = {**identifier_, **data}
        # Nothing to update still returns the row: a no-op update of the key locks and returns it.
        updated = list(data) or [next(iter(identifier_))]
        query = sql.SQL('INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {} RETURNING *').format(
            identifier(table),
            _columns(values),
            sql.SQL(', ').join(sql.Placeholder() * len(values)),
            _columns(identifier_),
            sql.SQL(', ').join(sql.SQL('{0} = EXCLUDED.{0}').format(quote(c)) for c in updated),
        )
        return self.fetch_row(query, list(values.values()))

    def delete(self, table: str, where: Mapping[str, Any]) -> int:
        if not where:
            raise ValueError(f'delete needs a condition: refusing to empty {table!r}')
        params: dict[str, Any] = {}
        query = sql.SQL('DELETE FROM {} WHERE {}').format(identifier(table), _pairs(where, 'w', params))
        return self.execute(query, params)

    def _call(self, function: str, params: Sequence[Any] | Mapping[str, Any] | None) -> tuple[sql.Composable, Any]:
        if isinstance(params, Mapping):
            arguments = sql.SQL(', ').join(
                sql.SQL('{} => {}').format(quote(name), sql.Placeholder()) for name in params
            )
            return sql.SQL('SELECT * FROM {}({})').format(identifier(function), arguments), list(params.values())
        params = list(params or ())
        arguments = sql.SQL(', ').join(sql.Placeholder() * len(params))
        return sql.SQL('SELECT * FROM {}({})').format(identifier(function), arguments), params

    def sp_fetch_one(self, function: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
        """Call a stored function; the first column of its first row."""
        return self.fetch_one(*self._call(function, params))

    def sp_fetch_all(self, function: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[Row]:
        """Call a set-returning stored function; all its rows."""
        return self.fetch_all(*self._call(function, params))
