from typing import Any

from psycopg2.extensions import connection as Connection

from lib import conflict, emit, get_db_from_conn, inject_conn, transactional, use_schema

from .schemas import AppendSchema, BlockSchema, NoteSchema

NEXT = """
INSERT INTO stream_heads (stream, n) VALUES (%(stream)s, 1)
ON CONFLICT (stream) DO UPDATE SET n = stream_heads.n + 1
RETURNING n
"""
LOG = 'INSERT INTO stream_log (id, stream, n) VALUES (%(id)s, %(stream)s, %(n)s)'


def appended(conn: Connection, stream: str) -> dict[str, Any]:
    """The stream's next number (its head's row lock held to the commit), emitted and logged."""
    db = get_db_from_conn(conn)
    n = db.fetch_one(NEXT, {'stream': stream})
    event_id = emit(conn, 'stream.appended', {'stream': stream, 'n': n}, key=stream)
    db.execute(LOG, {'id': event_id, 'stream': stream, 'n': n})
    return {'id': event_id, 'n': n}


@use_schema(AppendSchema)
@inject_conn()
def append(conn: Connection, stream: str, fail: bool) -> dict[str, Any]:
    result = appended(conn, stream)
    if fail:
        raise conflict(f'append {result["n"]} to {stream!r} refused after emitting {result["id"]}')
    return result


@use_schema(BlockSchema)
@inject_conn()
def append_in_block(conn: Connection, stream: str, fail_inner: bool) -> list[dict[str, Any]]:
    """One append in the action's transaction, one in a savepoint that fails or not."""
    results = [appended(conn, stream)]
    try:
        with transactional(conn):
            results.append(appended(conn, stream))
            if fail_inner:
                raise ValueError('the inner block fails')
    except ValueError:
        results.pop()
    return results


@use_schema(NoteSchema)
@inject_conn()
def note(conn: Connection, note: str) -> str:
    """An event without a key."""
    return emit(conn, 'stream.noted', {'note': note})


@use_schema(NoteSchema)
@inject_conn()
def undeclared(conn: Connection, note: str) -> str:
    return emit(conn, 'stream.unheard_of', {'note': note})


@use_schema(NoteSchema)
@inject_conn()
def invalid(conn: Connection, note: str) -> str:
    appended(conn, 'invalid')  # written, then rolled back with the failing emit
    return emit(conn, 'stream.appended', {'stream': note, 'n': 'many'}, key=note)


@use_schema(NoteSchema)
@inject_conn(autocommit=True)
def in_autocommit(conn: Connection, note: str) -> str:
    return emit(conn, 'stream.noted', {'note': note})


@use_schema(NoteSchema)
@inject_conn(autocommit=True)
def in_own_block(conn: Connection, note: str) -> str:
    """An autocommit action's own transaction: its events commit with the block."""
    with transactional(conn):
        return emit(conn, 'stream.noted', {'note': note})
