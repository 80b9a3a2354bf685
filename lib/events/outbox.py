"""Events a module declares and `emit`s: each is written to `dbapi_outbox` in the transaction
that writes the action's data, so it exists if and only if that transaction commits.

A module declares its events next to its routes (`module_blueprint(__name__, routes,
events=events)`, each entry `dict(type='user.saved', schema=UserSavedSchema)`); `declare` checks
them and keeps them where `emit` finds them. `emit(conn, type, data, key=None)` checks the type
and the data at once and keeps the event on the connection (a `PooledConnection`); the
connection's commit writes every event it holds in one statement just before its COMMIT
(`flush`, installed as the db layer's `PooledConnection.write_events`), a rollback forgets them,
and a savepoint rolled back forgets the ones emitted inside it (lib.db.connections). So an event
written is one committed: a rolled-back action, a
failing batch step and a replayed Idempotency-Key emit nothing, and the row's `time` is the
commit's time.

Per key, events are written in commit order: the flush first takes a transaction-level advisory
lock on each of its keys (in one global order, so two flushes never deadlock), then takes the
rows' `seq`; a second transaction with the same key waits for the first to commit or roll back.
So for one key, `seq` order is commit order, and a relay delivers them in `seq` order
(lib/events/relay.py; docs/architecture.md).

The flush also sends `NOTIFY dbapi_outbox`, at most once per NOTIFY_EVERY seconds per process:
PostgreSQL serializes the commits of notifying transactions (one lock, held through the commit's
WAL flush), so one per transaction would halve a busy database's write rate; the relay polls a
few times after each wake-up and at least once a second, so a NOTIFY left out delays nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from marshmallow import Schema
from psycopg2.extensions import TRANSACTION_STATUS_INTRANS
from psycopg2.extensions import connection as Connection
from psycopg2.extras import RealDictRow

from lib.core.json import contains_nul, dumps
from lib.db.connections import PooledConnection
from lib.db.sql import Prepared, execute_prepared, tuple_cursor

CHANNEL = 'dbapi_outbox'  # LISTEN/NOTIFY channel: "events were committed"
EXCHANGE = 'dbapi.events'  # the durable topic exchange the relay publishes to
# Routing keys of a topic exchange: dot-separated words; `*` and `#` are for bindings only.
TYPE = re.compile(r'[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)*')
MAX_TYPE_LENGTH = 255  # AMQP's shortstr
MAX_KEY_LENGTH = 1000
# pg_advisory_xact_lock(int, int) classes: the writers' per-key lock and the relays' claim on a
# key. The two-key form never meets the one-key form lib.idempotency uses.
WRITE_LOCK_CLASS = 0x64626501
RELAY_LOCK_CLASS = 0x64626502
NOTIFY_EVERY = 0.1  # seconds: the most often one process sends NOTIFY


class EventError(RuntimeError):
    """A module's bug in emitting an event (a 500; nothing is committed)."""


Dump = Callable[[Mapping[str, Any]], dict[str, Any] | None]
Valid = Callable[[Mapping[str, Any]], bool]
# What gives an event's schema its shortcuts: marshmallow's adapter, in the pipeline layer above
# (lib.pipeline.input.data_checks), passed down by whoever declares the events.
Checks = Callable[[Schema], tuple[Dump | None, Valid | None]]


@dataclass(frozen=True, slots=True)
class EventType:
    """One declared event: its type (the routing key), the module that declares it, the schema
    of its `data`."""

    type: str
    module: str
    schema: Schema
    description: str = ''
    # `schema.dump` and `schema.validate` without marshmallow's machinery, for the data they can
    # prove the answer for (None: they cannot); None for a schema that is not simple.
    dump: Dump | None = None
    valid: Valid | None = None


class Pending(NamedTuple):
    """An emitted event, not yet written (a tuple: made on every emit, and cheaper so than a
    frozen dataclass)."""

    id: str
    type: str
    key: str | None
    lock: int | None  # the key's 32-bit hash: its advisory lock and the relays' claim
    data: bytes  # the JSON document of `data`


# Every declared event type, by type: what `emit` checks against. Filled when a module's
# blueprint is made (lib.actions.module_blueprint), once per process.
DECLARED: dict[str, EventType] = {}


def declare(module: str, events: Iterable[Mapping[str, Any]], checks: Checks | None = None) -> tuple[EventType, ...]:
    """`events` checked (a type that is a routing key, a marshmallow schema) and declared; a type
    another module declares is refused. The module's entries replace its earlier ones. `checks`
    gives each schema the shortcuts `emit` tries before marshmallow (none without it)."""
    declared: dict[str, EventType] = {}
    for entry in events:
        unknown = set(entry) - {'type', 'schema', 'description'}
        name, schema = entry.get('type'), entry.get('schema')
        if unknown:
            raise ValueError(f'module {module!r}: event {name!r} has unknown keys {sorted(unknown)}')
        if not isinstance(name, str) or len(name) > MAX_TYPE_LENGTH or not TYPE.fullmatch(name):
            raise ValueError(
                f'module {module!r}: event type {name!r} must be lowercase words (a-z, 0-9, _ and -) joined'
                f' by dots, at most {MAX_TYPE_LENGTH} characters, e.g. user.saved'
            )
        instance = schema() if isinstance(schema, type) and issubclass(schema, Schema) else schema
        if not isinstance(instance, Schema):
            raise ValueError(f'module {module!r}: event {name!r} needs a marshmallow Schema, got {schema!r}')
        if name in declared:
            raise ValueError(f'module {module!r}: event {name!r} is declared twice')
        owner = DECLARED.get(name)
        if owner is not None and owner.module != module:
            raise ValueError(f'module {module!r}: event {name!r} is already declared by module {owner.module!r}')
        description = str(entry.get('description') or '')
        dump, valid = checks(instance) if checks is not None else (None, None)
        declared[name] = EventType(name, module, instance, description, dump, valid)
    for name in [name for name, event in DECLARED.items() if event.module == module]:
        del DECLARED[name]
    DECLARED.update(declared)
    return tuple(declared.values())


def key_lock(key: str) -> int:
    """The key's 32-bit hash, signed as PostgreSQL's integer: its advisory locks' second key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), 'big', signed=True)


def new_id() -> str:
    """A random (version 4) UUID as text, what `str(uuid.uuid4())` gives, made without the UUID
    object (a fifth of what an emit cost)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    text = raw.hex()
    return f'{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}'


def in_transaction(conn: Connection) -> bool:
    """Whether what `conn` writes now is committed by lib as one transaction: psycopg2 runs it
    in a transaction, or lib begins it (an action's request: its next statement carries BEGIN),
    or lib sent BEGIN on it itself (a keyed request's, lib.idempotency)."""
    if not conn.autocommit or getattr(conn, 'lib_begins', False):
        return True
    return bool(getattr(conn, 'held', False)) and conn.info.transaction_status == TRANSACTION_STATUS_INTRANS


def payload(event: EventType, data: Any) -> bytes:
    """`data` dumped through the event's schema, as consumers get it, as JSON; EventError when it
    is not a mapping of the schema's fields, when the dumped document fails the schema's own
    checks, or when it cannot be written as JSON (an integer beyond 64 bits, say) or stored by
    PostgreSQL's JSON functions (a string holding U+0000)."""
    dumped = checked(event, data)
    try:
        document = dumps(dumped)
    except TypeError as error:  # orjson.JSONEncodeError is one
        raise EventError(f'emit({event.type!r}): the data cannot be written as JSON: {error}') from None
    if b'\\u0000' in document and contains_nul(dumped):
        raise EventError(f'emit({event.type!r}): the data holds U+0000 (NUL), which PostgreSQL cannot store in text')
    return document


def checked(event: EventType, data: Any) -> Any:
    """`data` dumped through the event's schema and found valid by it; EventError otherwise."""
    if event.dump is not None and event.valid is not None:
        # A row of a named connection (what an action most often emits) is an OrderedDict of its
        # columns: the dumper, which takes exact dicts only, gets the plain dict of them.
        dumped = event.dump(dict(data) if type(data) is RealDictRow else data)
        if dumped is not None and event.valid(dumped):
            return dumped  # what the lines below make of it, proven so
    if not isinstance(data, Mapping):
        raise EventError(f'emit({event.type!r}): data must be a mapping, not {type(data).__name__}')
    schema = event.schema
    fails = f'emit({event.type!r}): the data fails {type(schema).__name__} (declared by module {event.module!r})'
    known = {field.attribute or name for name, field in schema.fields.items()}
    unknown = sorted(str(name) for name in data if name not in known)
    try:
        dumped = schema.dump(data)
    except (TypeError, ValueError, AttributeError) as error:
        raise EventError(f'{fails}: it cannot be dumped: {error}') from None
    errors: dict[str, Any] = schema.validate(dumped)
    for name in unknown:
        errors.setdefault(name, ['Unknown field.'])
    if errors:
        raise EventError(f'{fails}: {errors}')
    return dumped


def emit(conn: Connection, type: str, data: Any, key: str | None = None) -> str:
    """Emit the event `type` with `data` (its declared schema's fields) and `key` (events with the
    same key are delivered in commit order), in the transaction of `conn`; its id, a UUID string.

    Raises EventError (a 500: a bug in the module, nothing committed) for an undeclared type, data
    the schema refuses, a key that is not a short string, or a connection in autocommit."""
    event = DECLARED.get(type)
    if event is None:
        known = ', '.join(sorted(DECLARED)) or 'none'
        raise EventError(
            f'emit({type!r}): no module declares this event type (declared: {known}); list it in the'
            " module's events: module_blueprint(__name__, routes, events=[dict(type=..., schema=...)])"
        )
    if key is not None and (not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or '\x00' in key):
        raise EventError(f'emit({type!r}): key must be a string of at most {MAX_KEY_LENGTH} characters, without NUL')
    if not hasattr(conn, 'pending_events') or not in_transaction(conn):
        raise EventError(
            f"emit({type!r}) needs the action's transaction: the connection is in autocommit or not one of lib's"
            ' (use inject_conn() without autocommit, or a transactional(conn) block)'
        )
    document = payload(event, data)
    pending = Pending(new_id(), type, key, None if key is None else key_lock(key), document)
    held: list[Pending] | None = getattr(conn, 'pending_events', None)
    if held is None:
        setattr(conn, 'pending_events', [pending])  # noqa: B010 - lib's PooledConnection has it
    else:
        held.append(pending)
    return pending.id


class Notifier:
    """When this process last sent NOTIFY: at most one per NOTIFY_EVERY seconds."""

    last = float('-inf')

    @classmethod
    def due(cls) -> bool:
        now = time.monotonic()
        if now - cls.last < NOTIFY_EVERY:
            return False
        cls.last = now
        return True


# The flush's statements take the events as one JSON parameter, objects of id, type, key, lock
# and data (psycopg2 adapts each parameter for about 2 us: one per event field was most of what a
# flush cost the app), read by json_to_record(set), which keeps `data`'s text as written. Each
# takes its keys' locks (class 1684169985: WRITE_LOCK_CLASS; a NULL key takes none, the function
# is strict) in a materialized CTE, before any row takes its seq. Prepared once per connection.
#
# One event, the common case: the cheaper statement for PostgreSQL (23 us a row against 33 us).
FLUSH_ONE = Prepared(
    """
WITH e AS MATERIALIZED (
    SELECT * FROM json_to_record(%(events)s) AS e(id uuid, type text, key text, lock integer, data json)
), locked AS MATERIALIZED (SELECT pg_advisory_xact_lock(1684169985, e.lock) FROM e)
INSERT INTO dbapi_outbox (id, type, key, key_lock, data, time)
SELECT e.id, e.type, e.key, e.lock, e.data, statement_timestamp() FROM e, locked
""",
    events='json',
)
# Several: each key's lock once, in ascending order (so two flushes never deadlock); the rows in
# emit order (nextval runs above the sort).
FLUSH_MANY = Prepared(
    """
WITH e AS MATERIALIZED (
    SELECT * FROM ROWS FROM (
        json_to_recordset(%(events)s) AS (id uuid, type text, key text, lock integer, data json)
    ) WITH ORDINALITY AS e(id, type, key, lock, data, n)
), locked AS MATERIALIZED (
    SELECT pg_advisory_xact_lock(1684169985, k.lock)
    FROM (SELECT DISTINCT lock FROM e WHERE lock IS NOT NULL ORDER BY lock) AS k
)
INSERT INTO dbapi_outbox (id, type, key, key_lock, data, time)
SELECT e.id, e.type, e.key, e.lock, e.data, statement_timestamp()
FROM e, (SELECT count(*) FROM locked) AS l
ORDER BY e.n
""",
    events='json',
)


def as_json(event: Pending) -> dict[str, Any]:
    return {
        'id': event.id,
        'type': event.type,
        'key': event.key,
        'lock': event.lock,
        'data': orjson.Fragment(event.data),
    }


def flush(conn: Connection, after: str = '') -> int:
    """Write the events `conn` holds, in its transaction, the SQL `after` in the same message
    (`; COMMIT`; otherwise the commit follows); how many."""
    held: list[Pending] | None = getattr(conn, 'pending_events', None)
    if not held:
        return 0
    setattr(conn, 'pending_events', None)  # noqa: B010 - lib's PooledConnection has it
    if Notifier.due():
        after = f'; NOTIFY {CHANNEL}{after}'
    if len(held) == 1:
        statement, events = FLUSH_ONE, orjson.dumps(as_json(held[0]))
    else:
        statement, events = FLUSH_MANY, orjson.dumps([as_json(event) for event in held])
    with tuple_cursor(conn) as cursor:
        execute_prepared(cursor, statement, {'events': events.decode()}, after=after)
    return len(held)


# The writer a PooledConnection's commit, its transaction step and a keyed request run for the
# events it holds (the db layer cannot import the events layer above it).
PooledConnection.write_events = flush  # type: ignore[method-assign,assignment]
