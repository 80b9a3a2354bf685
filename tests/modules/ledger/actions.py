from psycopg2.extensions import connection as Connection

from lib import get_db_from_conn, inject_conn, not_found, returns, transactional, use_schema

from .schemas import CodeSchema, CodesSchema, EntrySchema, HoldSchema, NestedSchema, NoteSchema

calls: list[str] = []  # every action that ran, in order: a replay must not add to it
INSERT = 'INSERT INTO ledger_entries (note, code) VALUES (%(note)s, %(code)s) RETURNING id, note'


@use_schema(NoteSchema)
@inject_conn()
@returns(EntrySchema)
def append(conn: Connection, note: str) -> dict:
    """Not idempotent by itself: every call adds a row."""
    calls.append('append')
    return get_db_from_conn(conn).fetch_row(INSERT, {'note': note, 'code': None})


@use_schema(CodeSchema)
@inject_conn()
def add_code(conn: Connection, note: str, code: str) -> dict:
    """A second call with the same code is a unique violation (409)."""
    calls.append('add_code')
    return get_db_from_conn(conn).fetch_row(INSERT, {'note': note, 'code': code})


@use_schema(NoteSchema)
@inject_conn()
def append_then_refuse(conn: Connection, note: str) -> None:
    calls.append('append_then_refuse')
    get_db_from_conn(conn).execute(INSERT, {'note': note, 'code': None})
    raise not_found(f'nothing called {note!r}')


@use_schema(NoteSchema)
@inject_conn()
def append_then_crash(conn: Connection, note: str) -> None:
    calls.append('append_then_crash')
    get_db_from_conn(conn).execute(INSERT, {'note': note, 'code': None})
    raise RuntimeError('a bug after writing')


@use_schema(NoteSchema)
@inject_conn()
def append_then_serialization_failure(conn: Connection, note: str) -> None:
    """What a SERIALIZABLE transaction meets under contention: SQLSTATE 40001, worth a retry."""
    calls.append('append_then_serialization_failure')
    db = get_db_from_conn(conn)
    db.execute(INSERT, {'note': note, 'code': None})
    db.execute("DO $$ BEGIN RAISE EXCEPTION 'contention' USING ERRCODE = 'serialization_failure'; END $$")


@use_schema(HoldSchema)
@inject_conn()
def append_slowly(conn: Connection, note: str, seconds: float) -> dict:
    calls.append('append_slowly')
    db = get_db_from_conn(conn)
    row = db.fetch_row(INSERT, {'note': note, 'code': None})
    db.execute('SELECT pg_sleep(%(seconds)s)', {'seconds': seconds})
    return row


@use_schema(NestedSchema)
@inject_conn()
def nested(conn: Connection, outer: str, inner: str, fail_inner: bool) -> list:
    """An action's own `transactional()` block inside the request's transaction."""
    calls.append('nested')
    db = get_db_from_conn(conn)
    db.execute(INSERT, {'note': outer, 'code': None})
    try:
        with transactional(conn) as block:
            block.execute(INSERT, {'note': inner, 'code': None})
            if fail_inner:
                raise ValueError('the inner block fails')
    except ValueError:
        pass
    return [
        row['note'] for row in db.fetch_all('SELECT note FROM ledger_entries WHERE note IN (%s, %s)', [outer, inner])
    ]


@use_schema(CodesSchema)
@inject_conn(named=False)
def find_codes(conn: Connection, codes: list) -> list:
    """Rows as tuples: a batch step gets rows as its action declares."""
    calls.append('find_codes')
    return get_db_from_conn(conn).fetch_all(
        'SELECT code, note FROM ledger_entries WHERE code = ANY(%s) ORDER BY code', [codes]
    )


@inject_conn(autocommit=True)
def count(conn: Connection) -> int:
    calls.append('count')
    return get_db_from_conn(conn).fetch_one('SELECT count(*) FROM ledger_entries')


@use_schema(NoteSchema)
@inject_conn('other')
def append_elsewhere(conn: Connection, note: str) -> int:
    calls.append('append_elsewhere')
    return get_db_from_conn(conn).fetch_one(
        'INSERT INTO ledger_entries (note) VALUES (%(note)s) RETURNING id', {'note': note}
    )


@use_schema(NoteSchema)
def echo(note: str) -> str:
    calls.append('echo')
    return note


@use_schema(NoteSchema)
@inject_conn()
def append_and_commit(conn: Connection, note: str) -> None:
    """A bug: ends the request's transaction itself."""
    calls.append('append_and_commit')
    get_db_from_conn(conn).execute(INSERT, {'note': note, 'code': None})
    conn.commit()


@use_schema(NoteSchema)
@inject_conn()
def append_in_with_conn(conn: Connection, note: str) -> None:
    """The same bug, written with psycopg2's `with conn:`."""
    calls.append('append_in_with_conn')
    with conn:
        get_db_from_conn(conn).execute(INSERT, {'note': note, 'code': None})


@use_schema(NoteSchema)
@inject_conn(autocommit=True)
def append_twice_committing(conn: Connection, note: str) -> int:
    """In autocommit the transactions are the action's own: it may commit them."""
    calls.append('append_twice_committing')
    conn.autocommit = False
    db = get_db_from_conn(conn)
    db.execute(INSERT, {'note': note, 'code': None})
    conn.commit()
    db.execute(INSERT, {'note': note, 'code': None})
    conn.commit()
    conn.autocommit = True
    return 2
