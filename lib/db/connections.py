"""Connections and their transactions: the per-process pools, a connection borrowed for an
action or a block, the transaction step that alone commits an action's work, and
`transactional()` for a block of an action's own.

Connections an action takes itself during a request (`get_conn_from_dbname`) are given back when
the request ends (`lending`), whatever the action did, so a forgetful action cannot drain the pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import psycopg2
from flask import current_app, has_app_context
from psycopg2.extensions import TRANSACTION_STATUS_IDLE, TRANSACTION_STATUS_INERROR
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as PlainCursor
from psycopg2.extras import RealDictCursor

from lib.core import process
from lib.core.config import APP_ID, Config, Pgbouncer
from lib.db import pgbouncer
from lib.db.pool import ConnectionPool, PoolClosed
from lib.db.sql import Db

POOLS_KEY = 'dbapi.pools'  # in app.extensions: the app's `Pools`


@dataclass(frozen=True, slots=True)
class ConnSpec:
    """What an action's connection is (`inject_conn`): its database, rows as dicts, autocommit."""

    database: str
    named: bool
    autocommit: bool


class HeldTransaction(RuntimeError):
    """An action tried to end the transaction the request holds (a 500: a bug in the action)."""

    def __init__(self, verb: str) -> None:
        super().__init__(
            f"an action cannot {verb} the request's transaction: dbapi commits it when the action"
            ' returns and rolls it back when it raises (a batch and an Idempotency-Key rely on it); use'
            ' transactional(conn) for a block of its own, or inject_conn(autocommit=True)'
        )


class PooledConnection(Connection):
    """A psycopg2 connection that remembers whether its rows should be dicts, and refuses to be
    committed or rolled back by an action while its transaction is the request's (`held`);
    psycopg2's `with conn:` ends a transaction through these same methods. The events emitted in
    its transaction (`pending_events`) are written by its commit, just before the COMMIT, and
    forgotten by its rollback.

    The transaction of an action's request (`run`) is begun by lib, not psycopg2 (`lib_begins`):
    psycopg2 runs in autocommit and the first statement goes out as `BEGIN; <statement>`, one
    message (`begin_next`, `BeginningCursor`), where psycopg2 would send BEGIN alone first; the
    COMMIT goes out with the statement writing the events, if any (`end_transaction`). A round
    trip fewer for every transactional action, two for one that emits."""

    named: bool = True
    session_state = True  # lib.db.sql may keep prepared statements on it (not so behind pgbouncer)
    held: bool = False  # its transaction belongs to dbapi (the transaction step): `transactional` nests in it
    pending_events: list[Any] | None = None  # emitted in its transaction, not yet written (lib.events.outbox)
    lib_begins: bool = False  # lib sends this borrower's BEGIN and COMMIT itself (psycopg2 is in autocommit)
    begin_next: bool = False  # lib_begins, and nothing has gone out yet: the next statement carries BEGIN
    # What `cursor(cursor_factory=PlainCursor)` makes for this borrower: lib's Db helpers make it
    # directly (`Db.cursor`), without this class's `cursor` in Python on every statement.
    tuple_cursor: type[PlainCursor] = PlainCursor

    def cursor(
        self, name: Any = None, cursor_factory: Any = None, withhold: bool = False, scrollable: Any = None
    ) -> Any:
        if self.lib_begins:
            if name is not None and self.autocommit:
                hand_over(self)  # psycopg2 refuses a named cursor in autocommit
            # outermost, so that it begins before a pgbouncer cursor looks at the transaction
            default: Any = self.cursor_factory  # None unless set on the connection
            cursor_factory = beginning(cursor_factory or default or PlainCursor)
        return super().cursor(name, cursor_factory, withhold, scrollable)

    def cursor_class(self, factory: Any) -> Any:
        """The class `cursor(cursor_factory=factory)` makes, for lib to make its own directly."""
        return beginning(factory) if self.lib_begins else factory

    def lobject(self, *args: Any, **kwargs: Any) -> Any:
        if self.lib_begins and self.autocommit:
            hand_over(self)  # psycopg2 refuses a large object in autocommit
        return super().lobject(*args, **kwargs)

    def write_events(self, after: str = '') -> None:
        """Write `pending_events` in the transaction, the SQL `after` in the same message (`; COMMIT`).
        lib.events.outbox installs the writer (the db layer cannot import the events layer above
        it); until then none can have been emitted."""
        raise RuntimeError('events were emitted but lib.events.outbox is not loaded to write them')

    def commit(self) -> None:
        if self.held:
            raise HeldTransaction('commit')
        if self.pending_events:
            self.write_events()
        super().commit()

    def rollback(self) -> None:
        if self.held:
            raise HeldTransaction('roll back')
        self.pending_events = None
        super().rollback()


class BeginningCursor(PlainCursor):
    """A cursor of a connection whose transaction lib begins: the statement that begins it goes
    out as `BEGIN; <statement>`, one message. executemany, callproc and COPY send BEGIN alone
    first. Mixed into whatever cursor class is asked for (`beginning`)."""

    __slots__ = ()
    connection: PooledConnection

    def execute(self, query: Any, vars: Any = None) -> None:
        conn = self.connection
        if not conn.begin_next:
            super().execute(query, vars)
            return
        conn.begin_next = False
        try:
            super().execute(pgbouncer.prefixed(query, 'BEGIN; '), vars)
        except BaseException:
            not_begun(conn)
            raise

    def begin(self) -> None:
        """BEGIN alone, for the statements that cannot carry it."""
        conn = self.connection
        if conn.begin_next:
            conn.begin_next = False
            try:
                super().execute('BEGIN')
            except BaseException:
                not_begun(conn)
                raise

    def executemany(self, query: Any, vars_list: Any) -> None:
        self.begin()
        super().executemany(query, vars_list)

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        self.begin()
        return super().callproc(procname, parameters)

    def copy_expert(self, *args: Any, **kwargs: Any) -> None:
        self.begin()
        super().copy_expert(*args, **kwargs)

    def copy_from(self, *args: Any, **kwargs: Any) -> None:
        self.begin()
        super().copy_from(*args, **kwargs)

    def copy_to(self, *args: Any, **kwargs: Any) -> None:
        self.begin()
        super().copy_to(*args, **kwargs)


def not_begun(conn: PooledConnection) -> None:
    """The statement that was to begin the transaction failed: if it was refused before it went
    out (nothing began), the next statement begins instead."""
    if conn.get_transaction_status() == TRANSACTION_STATUS_IDLE:
        conn.begin_next = True


@lru_cache(maxsize=64)
def beginning(factory: type[PlainCursor]) -> type[BeginningCursor]:
    """`factory` with lib's BEGIN mixed in (itself when it has it already)."""
    if issubclass(factory, BeginningCursor):
        return factory
    return type(f'Beginning{factory.__name__}', (BeginningCursor, factory), {'__slots__': ()})


def hand_over(conn: PooledConnection) -> None:
    """psycopg2 takes over the transaction lib begins (for what it refuses in autocommit): it
    sends BEGIN itself at the next statement, or, when lib's has gone out, again (PostgreSQL
    warns and goes on in the same transaction); `end_transaction` then commits through it."""
    conn.begin_next = False
    conn.autocommit = False


class TransactionFailed(RuntimeError):
    """The request's transaction failed (a statement's error was caught and the action went
    on): its COMMIT would be a rollback PostgreSQL reports as success. A 500, a bug in the
    action; nothing is committed."""


def end_transaction(conn: Connection) -> None:
    """Commit the request's transaction (after `release`): the events' statement carries the
    COMMIT; without events, COMMIT alone, or nothing when no statement went out."""
    pooled = cast(PooledConnection, conn)
    if not conn.autocommit:  # handed over to psycopg2
        pooled.commit()
        return
    status = conn.get_transaction_status()
    if status == TRANSACTION_STATUS_INERROR:
        raise TransactionFailed(
            "the request's transaction had failed: a statement's error was caught and the action went on;"
            ' nothing is committed'
        )
    if pooled.pending_events:
        pooled.write_events('; COMMIT')  # with BEGIN in front when nothing went out yet (begin_next)
    elif status != TRANSACTION_STATUS_IDLE:
        own_cursor(pooled).execute('COMMIT')


def own_cursor(conn: PooledConnection) -> PlainCursor:
    """lib's own plain cursor of `conn`, made once, for statements with no rows to read (no
    prefix of lib's BEGIN or pgbouncer's timeout: for statements inside a transaction)."""
    cursor: PlainCursor | None = conn.__dict__.get(OWN_CURSOR)
    if cursor is None:
        cursor = conn.__dict__[OWN_CURSOR] = PlainCursor(conn)
    return cursor


OWN_CURSOR = 'dbapi_own_cursor'


def release(conn: Connection) -> Connection:
    """The connection's transaction is dbapi's to end now (before the transaction step commits or
    rolls back; before the pool resets it)."""
    if isinstance(conn, PooledConnection):
        conn.held = False
    return conn


class Pools:
    """Every database's pool for one app in one process, created lazily after the fork."""

    def __init__(self, config: Config) -> None:
        self.databases: dict[str, dict[str, Any]] = {name: dict(db.params) for name, db in config.databases.items()}
        self.size = config.pool_size
        self.timeout = config.pool_timeout
        self.max_lifetime = config.pool_max_lifetime
        self.max_idle = config.pool_max_idle
        self.connect_timeout = config.connect_timeout
        self.statement_timeout = config.statement_timeout
        self.pgbouncer: Mapping[str, Pgbouncer] = config.pgbouncer
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
            # pgbouncer refuses `options`; the timeout goes into each transaction (lib.db.pgbouncer).
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


class Lending:
    """What one request borrows: its app's pools, and the connections an action took itself
    (`get_conn_from_dbname`), given back by `give_back` when the request ends."""

    __slots__ = ('borrowed', 'pools')

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.borrowed: list[tuple[ConnectionPool, Connection]] = []

    def give_back(self) -> None:
        borrowed, self.borrowed = self.borrowed, []
        for pool, conn in borrowed:
            with suppress(PoolClosed):
                pool.putconn(conn)


_lending: ContextVar[Lending | None] = ContextVar('dbapi_lending', default=None)


def lend(lent: Lending) -> Token[Lending | None]:
    """A request begins: `pools()` answers its pools, and `get_conn_from_dbname` borrows for it.
    Pair with `end_lending` in a `finally`."""
    return _lending.set(lent)


def end_lending(token: Token[Lending | None], lent: Lending) -> None:
    """The request has ended: what its actions borrowed goes back to the pools."""
    _lending.reset(token)
    if lent.borrowed:
        lent.give_back()


def pools() -> Pools:
    """The pools of the request being served, or of the current Flask app context (the CLI, tests)."""
    lent = _lending.get()
    if lent is not None:
        return lent.pools
    if not has_app_context():
        raise RuntimeError('the database needs a request or an app context: the pools belong to an app')
    found: Pools = current_app.extensions[POOLS_KEY]
    return found


def prepare(conn: Connection, named: bool, autocommit: bool, held: bool = False) -> Connection:
    """Set up a borrowed connection for its user; `held`: dbapi owns its transaction (commits it),
    and without `autocommit` lib begins it (`PooledConnection`)."""
    pooled = cast(PooledConnection, conn)  # the pools open only PooledConnections
    lib_begins = held and not autocommit
    conn.autocommit = autocommit or lib_begins  # client-side in psycopg2: no round trip
    pooled.held = held
    pooled.lib_begins = pooled.begin_next = lib_begins
    pooled.tuple_cursor = pooled.cursor_class(PlainCursor)
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

    def __init__(self, pool: ConnectionPool, named: bool, autocommit: bool, held: bool = False) -> None:
        self.pool = pool
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
        conn: PooledConnection = self.conn  # type: ignore[assignment]  # the pools open only these
        # Nothing of the borrow stays for the next user, who may take it without `prepare` (the
        # pool's own sweep): no transaction of lib's to begin, no events held (a transaction that
        # committed wrote them already). What `release` does, and more; every borrow passes here.
        conn.held = conn.lib_begins = conn.begin_next = False
        conn.pending_events = None
        self.pool.putconn(conn)  # rolled back first if the block left a transaction


def connection(name: str, named: bool = True, autocommit: bool = True) -> BorrowedConnection:
    """A connection from `name`'s pool for the length of the block, then back to the pool clean."""
    return BorrowedConnection(pools().get(name), named, autocommit)


def get_conn_from_dbname(name: str, named: bool = True, autocommit: bool = True) -> Connection:
    """A connection that goes back to its pool when the current request ends.

    Outside a request use `connection(name)` instead, which gives it back at the end of a block.
    """
    lent = _lending.get()
    if lent is None:
        raise RuntimeError('get_conn_from_dbname() needs a request; use lib.connection() elsewhere')
    pool = lent.pools.get(name)
    conn = pool.getconn()
    lent.borrowed.append((pool, conn))
    return prepare(conn, named, autocommit)


Work = Callable[[Connection], Any]


def run(pool: ConnectionPool, spec: ConnSpec, work: Work) -> Any:
    """The transaction step without an Idempotency-Key: `work` on a connection from `pool`, and
    its result once committed (unless autocommit). Raises what the work raised, after the
    rollback; the connection is back in its pool, clean, either way.

    Without autocommit dbapi holds the transaction: an action's `transactional()` nests in it,
    and its commit() or rollback() is refused (HeldTransaction)."""
    with BorrowedConnection(pool, spec.named, spec.autocommit, held=not spec.autocommit) as conn:
        result = work(conn)
        if not spec.autocommit:
            end_transaction(release(conn))
        return result


@contextmanager
def transactional(conn: Connection) -> Iterator[Db]:
    """A `Db` over `conn` inside one transaction: committed at the end, rolled back on error.

    On a connection whose transaction dbapi holds (an injected, non-autocommit one: its action's,
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
    emitted = len(getattr(conn, 'pending_events', None) or ())
    try:
        yield Db(conn)
    except BaseException:
        held = getattr(conn, 'pending_events', None)
        if held:
            del held[emitted:]  # the block's events go with its writes
        # On a broken connection this fails too; the error the block raised is the one to tell.
        with suppress(psycopg2.Error), conn.cursor() as cursor:
            cursor.execute('ROLLBACK TO SAVEPOINT dbapi_transactional; RELEASE SAVEPOINT dbapi_transactional')
        raise
    with conn.cursor() as cursor:
        cursor.execute('RELEASE SAVEPOINT dbapi_transactional')
