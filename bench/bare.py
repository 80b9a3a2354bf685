"""The read's floor: the same gunicorn serving one prepared EXECUTE per request, and nothing else.

No auth, validation, pool, access record, Flask or error handling: what the server and
psycopg2 alone cost a read by key, the same statement (`modules.bench.sql.READ`) run the same
way (`EXECUTE` of a statement prepared once per connection). The app's reads against it are
what the framework costs; it against pgbench is what the server and the driver cost. Each
worker opens its one connection at its first request (after the fork).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import psycopg2

from modules.bench.sql import READ

APPLICATION_NAME = 'dbapi-bench-bare'  # not `dbapi:<pid>`: the app's connection count leaves it out
_cursor: Any = None


def cursor() -> Any:
    global _cursor
    if _cursor is None:
        conn = psycopg2.connect(
            dbname=os.environ['DEFAULT_DB_NAME'],
            host=os.environ['DEFAULT_DB_HOST'],
            port=os.environ['DEFAULT_DB_PORT'],
            user=os.environ['DEFAULT_DB_USER'],
            application_name=APPLICATION_NAME,
        )
        conn.autocommit = True
        _cursor = conn.cursor()
        _cursor.execute(READ.prepare)
    return _cursor


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    data = environ['wsgi.input'].read()
    params = orjson.loads(data) if data else {'aid': 1}  # the readiness probe sends no body
    cur = cursor()
    cur.execute(READ.call, params)
    row = cur.fetchone()
    body = orjson.dumps(dict(zip([column.name for column in cur.description], row, strict=True)) if row else None)
    start_response('200 OK', [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
    return [body]
