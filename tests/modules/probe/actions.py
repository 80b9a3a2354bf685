import contextlib
import datetime
import decimal
import io
import logging
import uuid

import psycopg2
from flask import has_app_context, has_request_context
from psycopg2.extensions import TRANSACTION_STATUS_INTRANS
from psycopg2.extensions import connection as Connection
from psycopg2.extras import NamedTupleCursor

from lib import DEFAULT_DATABASE, get_conn_from_dbname, get_db_from_conn, inject_conn, transactional, use_schema

from .schemas import ItemSchema, NoteFailSchema, NoteSchema, NoteSleepSchema, SleepSchema, TypesSchema

calls: list[str] = []  # what reached an action: validation failures must never show up here


@use_schema(ItemSchema)
@inject_conn()
def add_item(conn: Connection, code: str, qty: int, parent: int | None) -> dict:
    calls.append('add_item')
    return get_db_from_conn(conn).insert('probe_items', dict(code=code, qty=qty, parent=parent))[0]


@use_schema(NoteSchema)
@inject_conn()
def write_then_fail(conn: Connection, note: str) -> None:
    get_db_from_conn(conn).insert('probe_log', dict(note=note))
    raise RuntimeError('boom after writing')


@use_schema(NoteSchema)
@inject_conn()
def write_note(conn: Connection, note: str) -> int:
    return get_db_from_conn(conn).fetch_one(
        'INSERT INTO probe_log (note) VALUES (%(note)s) RETURNING id', dict(note=note)
    )


@use_schema(NoteSleepSchema)
@inject_conn()
def write_then_sleep(conn: Connection, note: str, seconds: float) -> int:
    """A transaction held open mid-way: for killing the worker in the middle of it."""
    db = get_db_from_conn(conn)
    db.insert('probe_log', dict(note=note))
    db.fetch_one('SELECT pg_sleep(%s)', [seconds])
    return db.fetch_one('SELECT count(*) FROM probe_log WHERE note = %s', [note])


@use_schema(SleepSchema)
@inject_conn()
def sleep(conn: Connection, seconds: float) -> bool:
    get_db_from_conn(conn).fetch_one('SELECT pg_sleep(%s)', [seconds])
    return True


@inject_conn()
def divide_by_zero(conn: Connection) -> int:
    return get_db_from_conn(conn).fetch_one('SELECT 1 / 0')


@inject_conn()
def bad_sql(conn: Connection) -> int:
    return get_db_from_conn(conn).fetch_one('SELEC nothing')


@inject_conn(named=False)
def tuples(conn: Connection) -> list:
    return get_db_from_conn(conn).fetch_all('SELECT 1 AS a, 2 AS b')


@inject_conn()
def raw_cursor(conn: Connection) -> list:
    with conn.cursor() as cursor:
        cursor.execute('SELECT 1 AS a')
        return cursor.fetchall()


def leak() -> int:
    """Takes a connection the article's way and never gives it back."""
    conn = get_conn_from_dbname(DEFAULT_DATABASE)
    return get_db_from_conn(conn).fetch_one('SELECT pg_backend_pid()')


@inject_conn()
def backend_pid(conn: Connection) -> int:
    return conn.get_backend_pid()


@inject_conn()
def in_transaction(conn: Connection) -> dict:
    with transactional(conn) as db:
        db.insert('probe_log', dict(note='tx'))
    # The block was a savepoint: the action's transaction is still open, committed only when it returns.
    return {'in_transaction': conn.get_transaction_status() == TRANSACTION_STATUS_INTRANS}


@inject_conn()
def pg_types(conn: Connection) -> dict:
    return get_db_from_conn(conn).fetch_row(
        """SELECT now() AS ts, current_date AS day, '12:34:56'::time AS t, 1.50::numeric AS num,
                  '3 days 04:00:00'::interval AS span, '\\x0102'::bytea AS raw,
                  gen_random_uuid() AS id, '{"a": [1, 2]}'::jsonb AS doc, ARRAY[1, 2] AS arr, NULL AS nothing"""
    )


def python_types() -> dict:
    return {
        'datetime': datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=datetime.UTC),
        'date': datetime.date(2024, 5, 6),
        'time': datetime.time(7, 8, 9),
        'decimal': decimal.Decimal('12345678901234567890.123456789'),
        'uuid': uuid.UUID('12345678-1234-5678-1234-567812345678'),
        'timedelta': datetime.timedelta(hours=1, seconds=1),
        'bytes': b'\x00\x01',
        'memoryview': memoryview(b'ab'),
        'tuple': (1, 2),
    }


@use_schema(TypesSchema)
def echo_types(day: datetime.date, amount: decimal.Decimal) -> dict:
    return {'day_type': type(day).__name__, 'amount_type': type(amount).__name__, 'day': day, 'amount': amount}


def big() -> list:
    return [{'i': i, 'text': 'x' * 50} for i in range(200)]


def returns_none() -> None:
    return None


def crash() -> None:
    raise KeyError('secret internal detail')


def returns_string() -> str:
    return '<b>not html</b>'


def context() -> dict:
    """What an action sees of Flask's contexts (none), and a log line written from inside it."""
    logging.getLogger('probe').warning('inside the action')
    return {'app_context': has_app_context(), 'request_context': has_request_context()}


# --- what an action's transaction takes in, whatever it runs it with --------------------------


@use_schema(NoteFailSchema)
@inject_conn()
def note_then_named_cursor(conn: Connection, note: str, fail: bool) -> list[int]:
    """A note, then a server-side cursor (psycopg2 refuses one outside a transaction)."""
    get_db_from_conn(conn).insert('probe_log', dict(note=note))
    with conn.cursor('probe_rows') as cursor:
        cursor.execute('SELECT generate_series(1, 3) AS n')
        rows = [row['n'] for row in cursor]
    if fail:
        raise RuntimeError('boom after the cursor')
    return rows


@use_schema(NoteFailSchema)
@inject_conn(named=False)
def named_cursor_then_note(conn: Connection, note: str, fail: bool) -> list[int]:
    with conn.cursor('probe_rows') as cursor:
        cursor.execute('SELECT generate_series(1, 3)')
        rows = [row[0] for row in cursor]
    get_db_from_conn(conn).insert('probe_log', dict(note=note))
    if fail:
        raise RuntimeError('boom after the note')
    return rows


@use_schema(NoteFailSchema)
@inject_conn()
def many_notes(conn: Connection, note: str, fail: bool) -> int:
    """Two notes by executemany, on a cursor of the action's own class."""
    with conn.cursor(cursor_factory=NamedTupleCursor) as cursor:
        cursor.executemany('INSERT INTO probe_log (note) VALUES (%s)', [(note,), (note,)])
    if fail:
        raise RuntimeError('boom after executemany')
    return 2


@use_schema(NoteFailSchema)
@inject_conn()
def copied_note(conn: Connection, note: str, fail: bool) -> int:
    with conn.cursor() as cursor:
        cursor.copy_expert('COPY probe_log (note) FROM STDIN', io.StringIO(note + '\n'))
    if fail:
        raise RuntimeError('boom after COPY')
    return 1


@use_schema(NoteSchema)
@inject_conn()
def swallowed_error(conn: Connection, note: str) -> str:
    """Writes, then catches a statement's error and goes on: the transaction has failed."""
    db = get_db_from_conn(conn)
    db.insert('probe_log', dict(note=note))
    with contextlib.suppress(psycopg2.Error):
        db.fetch_one('SELECT 1 / 0')
    return 'went on'
