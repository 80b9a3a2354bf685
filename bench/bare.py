"""The floor: what a request needs without the framework, as one bare WSGI callable over psycopg2.

`POST /bench/upsert` upserts, any other POST reads by key: the Bearer token compared with BEARER
in constant time (`hmac.compare_digest`), the body parsed with the stdlib `json`, one `EXECUTE` of
the module's own statement (`modules.bench.sql` READ or UPSERT, both prepared once per
connection), the row answered as JSON; the upsert in a transaction (BEGIN, EXECUTE, COMMIT), the
read in autocommit, as the app runs them. No validation, pool, access record, metrics, Flask or
problem documents: the app against it is what the framework costs (the wrk benchmark under the
same gunicorn, `bench.instructions` in instructions per request). Each process opens its one
connection at its first request (after a fork). Any other method is the readiness probe, which
sends no token and no body: it reads aid 1.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import psycopg2

from modules.bench.sql import READ, UPSERT

APPLICATION_NAME = 'dbapi-bench-bare'  # not `dbapi:<pid>`: the app's connection count leaves it out
UPSERT_PATH = '/bench/upsert'
JSON_HEADERS = ('Content-Type', 'application/json')


class Connection:
    """The process's one connection, its cursor, and the token it accepts."""

    def __init__(self) -> None:
        self.token = os.environ['BEARER']
        self.conn = psycopg2.connect(
            dbname=os.environ['DEFAULT_DB_NAME'],
            host=os.environ['DEFAULT_DB_HOST'],
            port=os.environ['DEFAULT_DB_PORT'],
            user=os.environ['DEFAULT_DB_USER'],
            application_name=APPLICATION_NAME,
        )
        self.conn.autocommit = True
        self.cursor = self.conn.cursor()
        self.cursor.execute(READ.prepare)
        self.cursor.execute(UPSERT.prepare)


_connection: Connection | None = None


def connection() -> Connection:
    global _connection
    if _connection is None:
        _connection = Connection()
    return _connection


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    db = connection()
    if environ['REQUEST_METHOD'] != 'POST':  # the readiness probe
        return answer(start_response, '200 OK', read(db, {'aid': 1}))
    header = environ.get('HTTP_AUTHORIZATION', '')
    if not (header.startswith('Bearer ') and hmac.compare_digest(header[7:], db.token)):
        return answer(start_response, '401 Unauthorized', {'title': 'Unauthorized'})
    try:
        body = json.loads(environ['wsgi.input'].read())
        if environ['PATH_INFO'] == UPSERT_PATH:
            row = upsert(db, {'aid': body['aid'], 'bid': body['bid'], 'abalance': body['abalance']})
        else:
            row = read(db, {'aid': body['aid']})
    except (ValueError, TypeError, KeyError):
        return answer(start_response, '400 Bad Request', {'title': 'Bad Request'})
    return answer(start_response, '200 OK', row)


def read(db: Connection, params: dict[str, Any]) -> dict[str, Any] | None:
    db.cursor.execute(READ.call, params)
    return row_of(db.cursor)


def upsert(db: Connection, params: dict[str, Any]) -> dict[str, Any] | None:
    db.conn.autocommit = False  # client-side: psycopg2 sends BEGIN before the EXECUTE, as for the app
    try:
        db.cursor.execute(UPSERT.call, params)
        row = row_of(db.cursor)
        db.conn.commit()
    except BaseException:
        db.conn.rollback()
        raise
    finally:
        db.conn.autocommit = True
    return row


def row_of(cursor: Any) -> dict[str, Any] | None:
    row = cursor.fetchone()
    return None if row is None else dict(zip([column.name for column in cursor.description], row, strict=True))


def answer(start_response: Callable[..., Any], status: str, document: Any) -> list[bytes]:
    body = json.dumps(document).encode()
    start_response(status, [JSON_HEADERS, ('Content-Length', str(len(body)))])
    return [body]
