"""The idempotency step: a request sent again with the same `Idempotency-Key` answers what the
first one answered, without running its action again (draft-ietf-httpapi-idempotency-key-header-07).

The first request with a key takes a transaction-level advisory lock on (caller, key), never
waiting for it, and finds no stored answer: its action runs, and its answer goes into
`dbapi_idempotency` in the same transaction as the action's writes (lib.transaction), so a crash
keeps both or neither. A repeat finds the stored answer and gets it back, with
`Idempotent-Replayed: true`; one sent while the first still holds the lock gets 409 with
`Retry-After: 1`. The primary key (caller, key) is the last guard: two requests that both found
nothing cannot both commit, and the second one's writes roll back.

Expired keys (IDEMPOTENCY_TTL) count as absent and are deleted by `sweep`, in bounded batches,
from a thread of the worker's own that a keyed request starts at most once a minute.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import psycopg2
import psycopg2.errors
from psycopg2.extensions import connection as Connection

from lib.core.errors import ApiError, bad_request
from lib.core.record import Answer
from lib.db.connections import BorrowedConnection, ConnSpec, PooledConnection
from lib.db.pool import ConnectionPool
from lib.db.sql import Prepared, execute_prepared, tuple_cursor

log = logging.getLogger('dbapi.idempotency')

HEADER = 'HTTP_IDEMPOTENCY_KEY'  # in the WSGI environ
MAX_KEY_LENGTH = 255
REPLAYED_HEADERS = {'Idempotent-Replayed': 'true'}
RETRY_AFTER = {'Retry-After': '1'}
# Answers a retry must not get back: the request may succeed when it runs again.
TRANSIENT_SLUGS = frozenset({'serialization-failure', 'deadlock-detected', 'idempotency-key-in-use'})
SWEEP_BATCH = 1000  # rows deleted per statement: each is short, whatever the backlog
SWEEP_INTERVAL = 60.0  # seconds between a worker's sweeps of one database, plus up to 10%

# Prepared once per connection (lib.db.sql): a keyed request runs two of them.
KEY_TYPES = {'caller': 'text', 'key': 'text', 'ttl': 'double precision'}
# The lock, and the key's row: live (its answer replays), expired (taken over), or none.
LOOKUP = Prepared(
    """
SELECT pg_try_advisory_xact_lock(%(lock)s), stored.action, stored.body_sha256, stored.status,
       stored.content_type, stored.answer, stored.created_at > now() - make_interval(secs => %(ttl)s)
FROM (SELECT 1) AS one
LEFT JOIN dbapi_idempotency AS stored ON stored.caller = %(caller)s AND stored.key = %(key)s
""",
    **KEY_TYPES,
    lock='bigint',
)
STORED = Prepared(
    """
SELECT NULL, action, body_sha256, status, content_type, answer FROM dbapi_idempotency
WHERE caller = %(caller)s AND key = %(key)s AND created_at > now() - make_interval(secs => %(ttl)s)
""",
    **KEY_TYPES,
)
# The answer of a key that had no row: a row stored meanwhile by another request is a unique
# violation, which stops the COMMIT sent with it.
INSERT = Prepared(
    """
INSERT INTO dbapi_idempotency (caller, key, action, body_sha256, status, content_type, answer)
VALUES (%(caller)s, %(key)s, %(action)s, %(digest)s, %(status)s, %(content_type)s, %(answer)s)
""",
    caller='text',
    key='text',
    action='text',
    digest='bytea',
    status='smallint',
    content_type='text',
    answer='bytea',
)
# The answer of a key whose row had expired: taken over; a live one is left alone (no row
# changed: another request stored it meanwhile).
STORE = Prepared(
    """
INSERT INTO dbapi_idempotency AS stored (caller, key, action, body_sha256, status, content_type, answer)
VALUES (%(caller)s, %(key)s, %(action)s, %(digest)s, %(status)s, %(content_type)s, %(answer)s)
ON CONFLICT (caller, key) DO UPDATE SET
    action = EXCLUDED.action, body_sha256 = EXCLUDED.body_sha256, status = EXCLUDED.status,
    content_type = EXCLUDED.content_type, answer = EXCLUDED.answer, created_at = EXCLUDED.created_at
WHERE stored.created_at <= now() - make_interval(secs => %(ttl)s)
""",
    **KEY_TYPES,
    action='text',
    digest='bytea',
    status='smallint',
    content_type='text',
    answer='bytea',
)
SWEEP = """
DELETE FROM dbapi_idempotency WHERE (caller, key) IN (
    SELECT caller, key FROM dbapi_idempotency
    WHERE created_at <= now() - make_interval(secs => %(ttl)s)
    LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
"""


@dataclass(slots=True)
class Claim:
    """A request's claim on its key: whose key, for which action, on which body; `open` while the
    key's lock was taken and the work ran without committing (its failure's answer may be stored)."""

    caller: str
    key: str
    action: str  # `module/route`, or `batch`
    digest: bytes  # SHA-256 of the request body's bytes
    ttl: float  # seconds a stored answer is kept
    open: bool = False

    @property
    def params(self) -> dict[str, Any]:
        return {'caller': self.caller, 'key': self.key, 'ttl': self.ttl}

    @property
    def lock(self) -> int:
        """The advisory lock of (caller, key): a 64-bit hash, as pg_try_advisory_xact_lock takes."""
        digest = hashlib.blake2b(f'{self.caller}\0{self.key}'.encode(), digest_size=8).digest()
        return int.from_bytes(digest, 'big', signed=True)


def requested_key(environ: Mapping[str, Any]) -> str | None:
    """The request's Idempotency-Key, or None; 400 unless it is 1 to 255 printable ASCII
    characters. The draft sends it as a structured-field string (`"abc"`), others bare (`abc`):
    both are the key `abc`."""
    raw: str | None = environ.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1].replace('\\"', '"').replace('\\\\', '\\')
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise bad_request(f'Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters')
    return key


def claim_of(key: str | None, caller: str, action: str, spec: ConnSpec | None, data: bytes, ttl: float) -> Claim | None:
    """The idempotency step of an action request or a batch (`action` is then `batch`): the claim
    on the request's Idempotency-Key (`requested_key`); None without a key, or when `action` has
    nothing to protect (no database). 422 for an action in autocommit: its writes commit one by
    one, so no answer can be stored with them."""
    if key is None or spec is None:
        return None
    if spec.autocommit:
        raise ApiError(
            422,
            'idempotency-key-not-supported',
            f'{action!r} runs in autocommit: its writes cannot be stored with its answer, so it takes'
            ' no Idempotency-Key',
        )
    return Claim(caller, key, action, hashlib.sha256(data).digest(), ttl)


def in_use() -> ApiError:
    return ApiError(
        409,
        'idempotency-key-in-use',
        'a request with this Idempotency-Key is still running; retry after a second',
        headers=RETRY_AFTER,
    )


def replay(claim: Claim, row: tuple[Any, ...]) -> Answer:
    """The stored answer of `row` (as LOOKUP reads it); 422 when it was stored for another
    action or body."""
    _, action, digest, status, content_type, answer = row
    if action != claim.action:
        raise ApiError(
            422,
            'idempotency-key-reused',
            f'this Idempotency-Key was used for {action!r}, not {claim.action!r}: a new request needs a new key',
        )
    if bytes(digest) != claim.digest:
        raise ApiError(
            422,
            'idempotency-key-reused',
            'this Idempotency-Key was used with another body: a new request needs a new key',
        )
    return Answer(status, bytes(answer), content_type, REPLAYED_HEADERS)


def not_set_up(conn: Connection) -> ApiError:
    database = conn.info.dbname
    log.error(
        "Idempotency-Key refused: database %r has no table dbapi_idempotency; apply dbapi's migrations to it:"
        ' flask --app app migrate --database <its name>',
        database,
    )
    return ApiError(500, 'idempotency-not-set-up', 'Idempotency-Key cannot be used yet; the logs say why')


@dataclass(frozen=True, slots=True)
class Begun:
    """What `begin` found: the stored answer to replay, else whether an expired row is there."""

    replay: Answer | None
    expired: bool = False


def begin(conn: Connection, claim: Claim) -> Begun:
    """Begin the claimed transaction on `conn` (autocommit for psycopg2: lib sends BEGIN and
    COMMIT itself, each with a statement of its own, to save their round trips) and look the key
    up: its live answer to replay, or nothing once its lock is taken, for the work to run. 409
    when another request holds the lock; the transaction is then already rolled back."""
    try:
        with tuple_cursor(conn) as cursor:
            execute_prepared(cursor, LOOKUP, {**claim.params, 'lock': claim.lock}, before='BEGIN; ')
            row = cast(tuple[Any, ...], cursor.fetchone())  # LOOKUP always answers one row
    except psycopg2.errors.UndefinedTable:
        rollback_quietly(conn)  # the PREPARE fails before any BEGIN went out: nothing else to end
        raise not_set_up(conn) from None
    locked, live = row[0], row[6]
    if live:
        rollback(conn)
        return Begun(replay(claim, row[:6]))
    if not locked:
        rollback(conn)
        raise in_use()
    return Begun(None, expired=live is not None)


def commit_with_answer(conn: Connection, claim: Claim, served: Answer, begun: Begun) -> bool:
    """Store `served` and commit, the work's writes with it; False (rolled back) when a live
    answer was stored meanwhile by a request that committed after `begin` read."""
    pooled = cast(PooledConnection, conn)  # the pools open only PooledConnections
    if pooled.pending_events:
        pooled.write_events()  # the events the work emitted, in its transaction
    params = {
        'caller': claim.caller,
        'key': claim.key,
        'action': claim.action,
        'digest': claim.digest,
        'status': served.status,
        'content_type': served.content_type,
        'answer': served.body,
    }
    with tuple_cursor(conn) as cursor:
        if not begun.expired:
            try:
                execute_prepared(cursor, INSERT, params, after='; COMMIT')
            except psycopg2.errors.UniqueViolation:
                rollback(conn)
                return False
            return True
        execute_prepared(cursor, STORE, {**params, 'ttl': claim.ttl})
        if not cursor.rowcount:
            rollback(conn)
            return False
        cursor.execute('COMMIT')
        return True


def rollback(conn: Connection) -> None:
    """End the claimed transaction without its writes (lib sent its BEGIN: psycopg2 does not
    know of it). The events the work emitted go with it."""
    cast(PooledConnection, conn).pending_events = None  # the events the work emitted go with it
    with conn.cursor() as cursor:
        cursor.execute('ROLLBACK')


def rollback_quietly(conn: Connection) -> None:
    """Roll back; on a broken connection that fails too, and the pool discards it on return."""
    with suppress(psycopg2.Error):
        rollback(conn)


def stored_answer(conn: Connection, claim: Claim) -> Answer:
    """The key's committed live answer (one statement, no transaction of its own); 409 when
    there is none yet (the request that holds the key has not committed)."""
    with tuple_cursor(conn) as cursor:
        execute_prepared(cursor, STORED, claim.params)
        row = cursor.fetchone()
    if row is None:
        raise in_use()
    return replay(claim, row)


def storable(problem: ApiError) -> bool:
    """Whether a failure's answer is kept for the key: a 4xx, unless running again may succeed."""
    return problem.status < 500 and problem.slug not in TRANSIENT_SLUGS


def store_alone(pool: ConnectionPool, claim: Claim, answer: Answer) -> tuple[Answer, bool]:
    """Store a failure's answer in a transaction of its own (the work's was rolled back): the
    answer to send, and whether it is a replay (another request stored the key's meanwhile)."""
    claim.open = False
    with BorrowedConnection(pool, named=False, autocommit=True, held=True) as conn:
        begun = begin(conn, claim)
        if begun.replay is not None:
            return begun.replay, True
        try:
            stored = commit_with_answer(conn, claim, answer, begun)
        except BaseException:
            rollback_quietly(conn)
            raise
        return (answer, False) if stored else (stored_answer(conn, claim), True)


Work = Callable[[Connection], Answer]


def run_keyed(pool: ConnectionPool, spec: ConnSpec, work: Work, claim: Claim) -> tuple[Answer, bool]:
    """The transaction step with an Idempotency-Key: the key's stored answer, or `work`'s answer
    stored and committed with its writes; and whether the answer is a replay. Raises what the
    work raised, after the rollback, with `claim.open` set: the caller may store a 4xx answer of
    that failure (`store_alone`); a 5xx is not stored (nothing committed: a retry runs again).

    dbapi sends BEGIN and COMMIT itself, each with a statement of its own, so psycopg2 runs in
    autocommit; the transaction stays the request's (`held`)."""
    SWEEPER.due(pool, claim.ttl)
    with BorrowedConnection(pool, spec.named, autocommit=True, held=True) as conn:
        begun = begin(conn, claim)
        if begun.replay is not None:
            return begun.replay, True
        claim.open = True
        try:
            answer = work(conn)
            stored = commit_with_answer(conn, claim, answer, begun)
        except BaseException:
            rollback_quietly(conn)
            raise
        claim.open = False
        if stored:
            return answer, False
        # Another request with the key committed after `begin` read: its answer is the key's.
        return stored_answer(conn, claim), True


class Sweeper:
    """Starts a sweep of a database's expired keys at most once per SWEEP_INTERVAL per process,
    in a daemon thread: the request that starts it does not wait for it."""

    def __init__(self) -> None:
        self.next_at: dict[str, float] = {}
        self.lock = threading.Lock()

    def due(self, pool: ConnectionPool, ttl: float) -> None:
        now = time.monotonic()
        if now < self.next_at.get(pool.name, 0.0):
            return
        with self.lock:
            if now < self.next_at.get(pool.name, 0.0):
                return
            # Jittered, so that the workers of a replica do not sweep together.
            self.next_at[pool.name] = now + SWEEP_INTERVAL * (1 + random.random() / 10)  # noqa: S311  # nosec B311
        threading.Thread(target=sweep_quietly, args=(pool, ttl), name='dbapi-idempotency-sweep', daemon=True).start()


def sweep(pool: ConnectionPool, ttl: float, batch: int = SWEEP_BATCH) -> int:
    """Delete the expired keys of `pool`'s database, `batch` rows per statement, each committed
    alone; rows another sweep is deleting are skipped. How many rows were deleted."""
    deleted = 0
    with pool.connection() as conn:
        conn.autocommit = True
        while True:
            with tuple_cursor(conn) as cursor:
                cursor.execute(SWEEP, {'ttl': ttl, 'batch': batch})
                deleted += cursor.rowcount
            if cursor.rowcount < batch:
                return deleted


def sweep_quietly(pool: ConnectionPool, ttl: float) -> None:
    try:
        deleted = sweep(pool, ttl)
    except psycopg2.Error as error:  # the pool's own errors (a timeout, a closed pool) are psycopg2's too
        log.warning('idempotency keys of database %r not swept: %s', pool.name, str(error).strip())
        return
    if deleted:
        log.info('deleted %d expired idempotency keys of database %r', deleted, pool.name)


SWEEPER = Sweeper()
