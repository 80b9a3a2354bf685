"""Events: emitted in the action's transaction (lib/events/outbox.py), relayed to the machine's
real RabbitMQ (lib/events/relay.py), exactly as committed.

The outbox half checks the rows an action leaves in dbapi_outbox; the relay half runs a relay in
a thread against an exchange of the test's own and reads what a consumer would get.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2
import pytest
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_structured
from cloudevents.core.formats.json import JSONFormat
from flask import Flask
from marshmallow import Schema, fields
from psycopg2.extras import RealDictCursor, RealDictRow

from lib.core.config import ConfigError, load
from lib.core.json import dumps
from lib.db.connections import PooledConnection
from lib.events import outbox
from lib.events.cloudevent import document as cloudevent_document
from lib.events.relay import Row, delivered
from tests.amqp import Received, relay_thread, tap, undelivered, wait_delivered
from tests.conftest import AUTH, MODULES, TOKEN, make_app, query, schema_database
from tests.logs import read_lines
from tests.pg_wire import QueryLog

STREAM = 'tests.modules.stream'


@pytest.fixture(scope='module')
def events_database() -> Iterator[dict[str, Any]]:
    with schema_database('dbapi_events', [*MODULES, STREAM]) as params:
        yield params


@pytest.fixture
def app(events_database: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    application = make_app(events_database, log_dir, MODULES=[*MODULES, STREAM])
    yield application
    application.extensions['dbapi.pools'].close()


@pytest.fixture
def db(events_database: dict[str, Any]) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(**events_database)
    conn.autocommit = True
    query(conn, 'TRUNCATE dbapi_outbox, dbapi_idempotency, stream_heads, stream_log, users')
    yield conn
    conn.close()


def rows(db: psycopg2.extensions.connection) -> list[tuple[Any, ...]]:
    """(id, type, key, data) of every outbox row, in seq order."""
    return [
        (str(id_), type_, key, data)
        for id_, type_, key, data in query(db, 'SELECT id, type, key, data FROM dbapi_outbox ORDER BY seq')
    ]


def logged_ids(db: psycopg2.extensions.connection) -> list[str]:
    return [str(row[0]) for row in query(db, 'SELECT id FROM stream_log ORDER BY stream, n')]


# --- the outbox: what an action leaves -----------------------------------------------------------


def test_bar_emits_user_saved_with_its_commit(api: Any, db: Any) -> None:
    before = datetime.now(UTC)
    answer = api.post('/example/bar', {'name': 'ada', 'email': 'ada@example.com'})
    after = datetime.now(UTC)
    assert answer.status_code == 200
    [(event_id, type_, key, data)] = rows(db)
    assert uuid.UUID(event_id).version == 4
    assert (type_, key, data) == ('user.saved', 'ada', {'name': 'ada', 'email': 'ada@example.com'})
    [(committed,)] = query(db, 'SELECT time FROM dbapi_outbox')
    assert before <= committed <= after


def test_an_empty_key_orders_like_any_other_and_has_no_subject(api: Any, db: Any) -> None:
    """example/bar takes an empty name (the schema allows it), so its key may be ''."""
    assert api.post('/example/bar', {'name': ''}).status_code == 200
    [(_, _, key, data)] = rows(db)
    assert (key, data) == ('', {'name': '', 'email': ''})
    [(time_,)] = query(db, 'SELECT time FROM dbapi_outbox')
    document = json.loads(cloudevent_document('dbapi', 'x', 'user.saved', key, time_, json.dumps(data)))
    assert 'subject' not in document


def test_an_action_refused_after_emitting_emits_nothing(api: Any, db: Any) -> None:
    assert api.post('/stream/append', {'stream': 'a'}).status_code == 200
    answer = api.post('/stream/append', {'stream': 'a', 'fail': True})
    assert answer.status_code == 409
    assert [row[2] for row in rows(db)] == ['a']
    assert query(db, 'SELECT n FROM stream_log') == [(1,)]


def test_a_savepoint_rolled_back_takes_its_events_with_it(api: Any, db: Any) -> None:
    kept = api.post('/stream/append_in_block', {'stream': 'b', 'fail_inner': True}).json
    both = api.post('/stream/append_in_block', {'stream': 'c', 'fail_inner': False}).json
    assert [len(kept), len(both)] == [1, 2]
    assert [row[0] for row in rows(db)] == [kept[0]['id'], both[0]['id'], both[1]['id']]


def test_a_batch_emits_with_its_commit_and_a_failing_step_emits_nothing(api: Any, db: Any) -> None:
    steps = [{'action': 'stream/append', 'body': {'stream': 'd'}} for _ in range(3)]
    failing = [*steps, {'action': 'stream/append', 'body': {'stream': 'd', 'fail': True}}]
    assert api.post('/batch', {'actions': failing}).status_code == 409
    assert rows(db) == []
    answer = api.post('/batch', {'actions': steps})
    assert answer.status_code == 200
    ids = [result['id'] for result in answer.json['results']]
    assert [row[0] for row in rows(db)] == ids
    assert [row[3]['n'] for row in rows(db)] == [1, 2, 3]


def test_an_idempotency_key_replay_emits_nothing_new(api: Any, db: Any) -> None:
    key = {'Idempotency-Key': uuid.uuid4().hex}
    first = api.post('/stream/append', {'stream': 'e'}, headers=key)
    again = api.post('/stream/append', {'stream': 'e'}, headers=key)
    assert again.headers['Idempotent-Replayed'] == 'true' and again.json == first.json
    refused_key = {'Idempotency-Key': uuid.uuid4().hex}
    refused = api.post('/stream/append', {'stream': 'e', 'fail': True}, headers=refused_key)
    refused_again = api.post('/stream/append', {'stream': 'e', 'fail': True}, headers=refused_key)
    assert (refused.status_code, refused_again.status_code) == (409, 409)  # stored alone, replayed
    assert [row[0] for row in rows(db)] == [first.json['id']]


@pytest.mark.parametrize(
    ('route', 'said'),
    [
        ('undeclared', "emit('stream.unheard_of'): no module declares this event type"),
        ('invalid', "emit('stream.appended'): the data fails AppendedSchema (declared by module 'stream')"),
        ('in_autocommit', "emit('stream.noted') needs the action's transaction"),
    ],
)
def test_a_module_emitting_wrongly_is_a_500_naming_its_bug_and_commits_nothing(
    api: Any, db: Any, log_dir: str, route: str, said: str
) -> None:
    answer = api.post(f'/stream/{route}', {'note': 'x'})
    assert answer.status_code == 500
    assert said not in answer.get_data(as_text=True)  # the client learns nothing of the module
    assert rows(db) == [] and query(db, 'SELECT * FROM stream_heads') == []
    errors = [r for r in read_lines(log_dir) if r.get('log.level') == 'error']
    assert any(said in str(r) for r in errors), errors


def test_an_autocommit_action_emits_in_a_transactional_block(api: Any, db: Any) -> None:
    answer = api.post('/stream/in_own_block', {'note': 'kept'})
    assert answer.status_code == 200
    assert rows(db) == [(answer.json, 'stream.noted', None, {'note': 'kept'})]


def test_events_of_a_connection_never_reach_its_next_borrower(app: Flask, db: Any) -> None:
    """An event emitted on a connection whose transaction was never committed goes with it."""
    from lib.db.connections import connection

    with app.app_context():
        with connection('default', autocommit=False) as conn:
            outbox.emit(conn, 'stream.noted', {'note': 'forgotten'})
        with connection('default', autocommit=False) as conn:
            outbox.emit(conn, 'stream.noted', {'note': 'kept'})
            conn.commit()
    assert [row[3] for row in rows(db)] == [{'note': 'kept'}]


def test_declarations_are_checked() -> None:
    class Payload(Schema):
        x = fields.Integer(required=True)

    with pytest.raises(ValueError, match='must be lowercase words'):
        outbox.declare('tests_decl', [{'type': 'User Saved', 'schema': Payload}])
    with pytest.raises(ValueError, match='needs a marshmallow Schema'):
        outbox.declare('tests_decl', [{'type': 'x.saved', 'schema': dict}])
    with pytest.raises(ValueError, match="already declared by module 'example'"):
        outbox.declare('tests_decl', [{'type': 'user.saved', 'schema': Payload}])
    with pytest.raises(ValueError, match='unknown keys'):
        outbox.declare('tests_decl', [{'type': 'x.saved', 'schema': Payload, 'routing': 'x'}])
    assert 'x.saved' not in outbox.DECLARED


def test_data_is_checked_against_the_schema_as_consumers_get_it() -> None:
    event = outbox.DECLARED['stream.appended']
    assert outbox.payload(event, {'stream': 's', 'n': 3}) == b'{"stream":"s","n":3}'
    for data, error in [
        ({'stream': 's'}, "'n': ['Missing data for required field.']"),
        ({'stream': 's', 'n': 0}, "'n': ['Must be greater than or equal to 1.']"),
        ({'stream': 's', 'n': 1, 'extra': 2}, "'extra': ['Unknown field.']"),
        (['s', 1], 'data must be a mapping'),
        ({'stream': 'a\x00b', 'n': 1}, 'the data holds U.0000 .NUL.'),
    ]:
        with pytest.raises(outbox.EventError, match=error.replace('[', r'\[').replace(']', r'\]')):
            outbox.payload(event, data)
    # A backslash and "u0000" as text is no NUL: it is stored as written.
    assert outbox.payload(event, {'stream': '\\u0000', 'n': 1}) == b'{"stream":"\\\\u0000","n":1}'


def test_a_row_of_a_named_connection_is_checked_as_the_dict_of_its_columns(db: Any) -> None:
    """What an action most often emits is the row it wrote (a RealDictRow): it takes the dumper's
    path, with the answer marshmallow gives, and one it refuses is still refused."""
    event = outbox.DECLARED['stream.appended']
    assert event.dump is not None
    with db.cursor(cursor_factory=RealDictCursor) as cursor:
        cursor.execute("SELECT 's' AS stream, 3 AS n")
        row = cursor.fetchone()
        cursor.execute("SELECT 's' AS stream, 0 AS n")
        refused = cursor.fetchone()
    assert type(row) is RealDictRow and event.dump(row) is None  # the dumper itself takes exact dicts only
    calls: list[Any] = []
    dump = event.dump

    def seen(data: Any) -> Any:
        calls.append(data)
        return dump(data)

    try:
        object.__setattr__(event, 'dump', seen)
        assert outbox.payload(event, row) == b'{"stream":"s","n":3}' == dumps(event.schema.dump(row))
    finally:
        object.__setattr__(event, 'dump', dump)
    assert calls == [{'stream': 's', 'n': 3}] and type(calls[0]) is dict
    with pytest.raises(outbox.EventError, match='Must be greater than or equal to 1'):
        outbox.payload(event, refused)


def pending(key: str | None, n: int) -> outbox.Pending:
    return outbox.Pending(
        str(uuid.uuid4()),
        'stream.appended',
        key,
        None if key is None else outbox.key_lock(key),
        dumps({'stream': str(key), 'n': n}),
    )


def test_the_flush_takes_each_keys_lock_in_ascending_order_then_writes_in_emit_order(
    events_database: Any, db: Any
) -> None:
    """Two flushes never deadlock: each takes its keys' locks in one order (ascending), before any
    row takes its seq; the rows keep emit order. Seen from pg_locks: with the larger key held
    elsewhere, a flush emitting it first waits on it holding the smaller one."""
    for statement in (outbox.FLUSH_ONE, outbox.FLUSH_MANY):  # the class is written out in their SQL
        assert f'pg_advisory_xact_lock({outbox.WRITE_LOCK_CLASS},' in statement.query
    small, large = sorted(['a', 'b', 'c', 'd'], key=outbox.key_lock)[::3]
    events = [pending(large, 1), pending(None, 2), pending(small, 3), pending(large, 4), pending(small, 5)]
    holder = psycopg2.connect(**events_database)
    writer = psycopg2.connect(**events_database, connection_factory=PooledConnection)
    try:
        with holder.cursor() as cursor:
            cursor.execute('SELECT pg_advisory_xact_lock(%s, %s)', [outbox.WRITE_LOCK_CLASS, outbox.key_lock(large)])
        pid = writer.get_backend_pid()
        writer.pending_events = list(events)
        flushing = threading.Thread(target=writer.commit)
        flushing.start()
        held = 'SELECT objid::integer, granted FROM pg_locks WHERE locktype = %s AND pid = %s AND classid = %s'
        deadline = time.monotonic() + 10
        while not any(not granted for _, granted in query(db, held, ['advisory', pid, outbox.WRITE_LOCK_CLASS])):
            assert time.monotonic() < deadline, 'the flush never waited on the held key'
            time.sleep(0.01)
        as_objid = {outbox.key_lock(k): k for k in (small, large)}  # objid::integer: the key's lock as signed
        locks = {
            as_objid[objid]: granted for objid, granted in query(db, held, ['advisory', pid, outbox.WRITE_LOCK_CLASS])
        }
        assert locks == {small: True, large: False}
        assert rows(db) == []
        holder.rollback()
        flushing.join(10)
        assert not flushing.is_alive()
    finally:
        holder.close()
        writer.close()
    assert [(id_, key, data['n']) for id_, _, key, data in rows(db)] == [
        (e.id, e.key, n) for n, e in enumerate(events, 1)
    ]


def test_a_flush_notifies_at_most_once_so_often(events_database: Any, db: Any) -> None:
    listener = psycopg2.connect(**events_database)
    listener.autocommit = True
    writer = psycopg2.connect(**events_database, connection_factory=PooledConnection)
    try:
        with listener.cursor() as cursor:
            cursor.execute(f'LISTEN {outbox.CHANNEL}')
        outbox.Notifier.last = float('-inf')
        for n in range(3):  # one NOTIFY: the next two come within NOTIFY_EVERY of it (a class attribute set once)
            writer.pending_events = [pending('k', n + 1)]
            writer.commit()
            if n == 0:
                outbox.Notifier.last = float('inf')  # "just now", whatever the clock reads
        listener.poll()
        assert [note.channel for note in listener.notifies] == [outbox.CHANNEL]
    finally:
        outbox.Notifier.last = float('-inf')
        listener.close()
        writer.close()
    assert len(rows(db)) == 3


def test_the_events_statement_carries_the_commit(events_database: dict[str, Any], log_dir: str, db: Any) -> None:
    """An action's events cost it no round trip of their own: their statement goes out with the
    COMMIT (and with the BEGIN too when the action ran nothing else), read off the wire."""
    with QueryLog(events_database['host'], events_database['port']) as wire:
        app = make_app({**events_database, **wire.params}, log_dir, MODULES=[*MODULES, STREAM])
        try:
            client = app.test_client()
            for path, body in [('/stream/note', {'note': 'warm'}), ('/stream/append', {'stream': 'w'})]:
                assert client.post(path, json=body, headers=AUTH).status_code == 200  # statements prepared
            wire.take()
            assert client.post('/stream/note', json={'note': 'n'}, headers=AUTH).status_code == 200
            [alone] = wire.take()
            assert alone.startswith('BEGIN; EXECUTE dbapi_') and alone.endswith('; COMMIT')
            assert client.post('/stream/append', json={'stream': 's'}, headers=AUTH).status_code == 200
            first, log, flush = wire.take()
            assert first.startswith('BEGIN; \nINSERT INTO stream_heads') and log.startswith('INSERT INTO stream_log')
            assert flush.startswith('EXECUTE dbapi_') and flush.endswith('; COMMIT')
        finally:
            app.extensions['dbapi.pools'].close()
    assert [(type_, key) for _, type_, key, _ in rows(db)][-2:] == [('stream.noted', None), ('stream.appended', 's')]


def test_a_key_is_marked_delivered_only_up_to_its_first_unconfirmed_event() -> None:
    moment = datetime.now(UTC)
    batch = [Row(seq, str(seq), 't', key, '{}', moment) for seq, key in enumerate(['a', 'b', 'a', None, 'a', 'b'])]
    assert delivered(batch, [True, False, True, False, True, True]) == [0, 2, 4]
    assert delivered(batch, [True] * 6) == [0, 1, 2, 3, 4, 5]


def test_events_settings_are_checked() -> None:
    base = {'BEARER': TOKEN, 'DATABASES': {'default': {'dbname': 'x'}}}
    with pytest.raises(ConfigError, match='EVENTS_AMQP_URL is not an amqp'):
        load(overrides={**base, 'EVENTS_AMQP_URL': 'http://broker'})
    with pytest.raises(ConfigError, match='EVENTS_RETENTION'):
        load(overrides={**base, 'EVENTS_RETENTION': '0'})
    config = load(overrides={**base, 'EVENTS_AMQP_URL': 'amqps://u:p@broker/vhost', 'EVENTS_RETENTION': '60'})
    assert (config.events_amqp_url, config.events_retention) == ('amqps://u:p@broker/vhost', 60.0)


def test_metrics_show_the_outbox_backlog(api: Any, client: Any, db: Any) -> None:
    api.post('/stream/append', {'stream': 'm'})
    query(db, "UPDATE dbapi_outbox SET time = now() - interval '90 seconds'")
    text = client.get('/metrics').get_data(as_text=True)
    assert 'dbapi_outbox_pending{database="default"} 1.0' in text
    age = next(line for line in text.splitlines() if line.startswith('dbapi_outbox_oldest_age_seconds{'))
    assert float(age.split()[-1]) >= 90


# --- the relay: what consumers get ----------------------------------------------------------------


def cloudevent(message: Received) -> Any:
    """The message read by the CloudEvents SDK: a valid CloudEvents 1.0 structured message."""
    wire = RabbitMQMessage(headers={}, content_type=message.properties.content_type, body=message.body)
    return from_structured(wire, JSONFormat())


def test_exactly_the_committed_events_arrive_as_cloudevents(events_database: Any, api: Any, db: Any) -> None:
    with tap() as exchange, relay_thread(events_database, exchange.name):
        key = {'Idempotency-Key': uuid.uuid4().hex}
        for body, headers in [
            ({'stream': 'r'}, None),
            ({'stream': 'r', 'fail': True}, None),
            ({'stream': 'r'}, key),
            ({'stream': 'r'}, key),  # a replay
        ]:
            api.post('/stream/append', body, headers=headers)
        append = {'action': 'stream/append', 'body': {'stream': 's'}}
        api.post('/batch', {'actions': [append, {**append, 'body': {'stream': 's', 'fail': True}}]})
        api.post('/batch', {'actions': [append, append]})
        noted = api.post('/stream/note', {'note': 'hello'}).json
        api.post('/stream/in_autocommit', {'note': 'never'})
        committed = [*logged_ids(db), noted]
        assert len(committed) == 5
        wait_delivered(events_database)
        received = exchange.drain(lambda got: len(got) >= len(committed))
    assert sorted(message.id for message in received) == sorted(committed)
    by_id = {message.id: message for message in received}
    for event_id, type_, key_, data in rows(db):
        message = by_id[event_id]
        event = cloudevent(message)
        assert event.get_id() == event_id and event.get_type() == type_ == message.routing_key
        assert event.get_source() == 'dbapi' and event.get_subject() == key_
        assert event.get_datacontenttype() == 'application/json' and event.get_data() == data
        assert event.get_time() is not None and event.get_time().tzinfo is not None
        properties = message.properties
        assert (properties.content_type, properties.delivery_mode) == ('application/cloudevents+json', 2)
    assert undelivered(events_database) == 0


def test_two_relays_keep_each_keys_commit_order(events_database: Any, app: Flask, db: Any) -> None:
    streams, writers, per_writer = 4, 6, 40

    def write(index: int) -> None:
        client = app.test_client()
        for n in range(per_writer):
            body = {'stream': f'k{(index + n) % streams}'}
            assert client.post('/stream/append', json=body, headers=AUTH).status_code == 200

    with tap() as exchange, relay_thread(events_database, exchange.name), relay_thread(events_database, exchange.name):
        threads = [threading.Thread(target=write, args=(index,)) for index in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_delivered(events_database)
        received = exchange.drain(lambda got: len(got) >= writers * per_writer)
    first: dict[str, dict[str, Any]] = {}
    for message in received:
        first.setdefault(message.id, message.event)
    assert len(first) == writers * per_writer
    by_stream: dict[str, list[int]] = {}
    for event in first.values():  # in arrival order, duplicates dropped by id
        by_stream.setdefault(event['subject'], []).append(event['data']['n'])
    for numbers in by_stream.values():
        assert numbers == list(range(1, len(numbers) + 1))


def test_an_idle_relay_makes_at_most_one_query_a_second(events_database: Any) -> None:
    with schema_database('dbapi_idle', [*MODULES]) as database:

        def transactions() -> int:
            conn = psycopg2.connect(**{**database, 'dbname': 'postgres'})
            try:
                [(count,)] = query(
                    conn,
                    'SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s',
                    [database['dbname']],
                )
                return int(count)
            finally:
                conn.close()

        with tap() as exchange:
            before = transactions()
            started = time.monotonic()
            with relay_thread(database, exchange.name):
                time.sleep(3)
            seconds = time.monotonic() - started
            time.sleep(0.2)  # the relay's backend reports its counts as it exits
            made = transactions() - before
    # LISTEN, the first claim and its linger polls, then one poll per idle second.
    assert made <= 2 + 3 + seconds + 1, made


def rows_read(plan: dict[str, Any]) -> int:
    """The rows every node of an EXPLAIN (ANALYZE, FORMAT JSON) plan read from dbapi_outbox or its
    indexes: what it returned and what its filters threw away."""
    read = 0
    if plan.get('Relation Name') == 'dbapi_outbox' or str(plan.get('Index Name', '')).startswith('dbapi_outbox'):
        removed = plan.get('Rows Removed by Filter', 0) + plan.get('Rows Removed by Index Recheck', 0)
        read += (plan['Actual Rows'] + removed) * plan['Actual Loops']
    return read + sum(rows_read(child) for child in plan.get('Plans', []))


def test_the_claim_and_the_mark_read_a_window_whatever_the_backlog_and_the_statistics(db: Any) -> None:
    from lib.events.outbox import RELAY_LOCK_CLASS
    from lib.events.relay import BATCH, CLAIM, MARK, WINDOW

    # 20,000 delivered rows of the retention and a backlog of 5,000, not analyzed yet (a fresh
    # table, or one filled faster than autovacuum looks at it).
    query(
        db,
        'INSERT INTO dbapi_outbox (id, type, key, key_lock, data, time, delivered_at) SELECT gen_random_uuid(),'
        " 'user.saved', 'k' || g % 1000, g % 1000, '{}', now(), CASE WHEN g <= 20000 THEN now() END"
        ' FROM generate_series(1, 25000) AS g',
    )

    def read(statement: str, params: dict[str, Any]) -> int:
        query(db, 'BEGIN')
        try:
            [(plan,)] = query(db, 'EXPLAIN (ANALYZE, FORMAT JSON) ' + statement, params)
        finally:
            query(db, 'ROLLBACK')
        return rows_read(plan[0]['Plan'])

    claim = CLAIM.replace('BEGIN;', '', 1)
    claimed = query(db, 'BEGIN; ' + claim, {'window': WINDOW, 'class': RELAY_LOCK_CLASS, 'batch': BATCH})
    query(db, 'ROLLBACK')
    oldest = query(db, 'SELECT seq FROM dbapi_outbox WHERE delivered_at IS NULL ORDER BY seq LIMIT %s', [BATCH])
    assert [row[0] for row in claimed] == [row[0] for row in oldest]
    # The window's rows twice (for their keys, then for themselves), each an index entry and a
    # heap row, and the oldest one's index entry: not the backlog (5,000), not the table (25,000).
    assert read(claim, {'window': WINDOW, 'class': RELAY_LOCK_CLASS, 'batch': BATCH}) <= 4 * WINDOW + 10
    mark = MARK.removesuffix('; COMMIT')
    assert read(mark, {'seqs': [row[0] for row in claimed]}) <= 2 * BATCH  # an index entry and a row each


def test_delivered_events_are_pruned_after_the_retention(events_database: Any, api: Any, db: Any) -> None:
    for stream in ('p', 'q', 'q'):
        api.post('/stream/append', {'stream': stream})
    query(db, "UPDATE dbapi_outbox SET time = now() - interval '2 hours'")
    query(db, "UPDATE dbapi_outbox SET delivered_at = now() - interval '2 hours' WHERE key = 'q'")
    from lib.events.relay import Relay

    relay = Relay(events_database, 'amqp://127.0.0.1/', 'dbapi', retention=3600.0)
    relay.conn = psycopg2.connect(**events_database)
    relay.conn.autocommit = True
    try:
        assert relay.poll(relay.conn) is True  # the undelivered one stays, and is found
    finally:
        relay.close_database()
    assert [row[2] for row in rows(db)] == ['p']
