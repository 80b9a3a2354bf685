"""Helpers of the Idempotency-Key and batch tests: an app with tests/modules/ledger, whose
appends are not idempotent by themselves, on a database of its own (conftest's `ledger_database`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
from flask import Flask

from tests.conftest import LEDGER, MODULES, make_app, query
from tests.modules.ledger import actions


def ledger_app(database: dict[str, Any], log_dir: str, **overrides: Any) -> Flask:
    """`other` is the same database under another name: a pool of its own, as another database."""
    databases = {'default': database, 'other': database}
    return make_app(database, log_dir, MODULES=[*MODULES, LEDGER], DATABASES=databases, **overrides)


def app_fixture(database: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    """The body of a test file's `app` fixture: conftest's `client` and `api` then use it."""
    application = ledger_app(database, log_dir)
    yield application
    application.extensions['dbapi.pools'].close()


def fresh_ledger(database: dict[str, Any]) -> Iterator[psycopg2.extensions.connection]:
    """A plain connection to the ledger database, after emptying it: no entries, keys or calls."""
    conn = psycopg2.connect(**database)
    conn.autocommit = True
    query(conn, 'TRUNCATE ledger_entries, dbapi_idempotency')
    actions.calls.clear()
    yield conn
    conn.close()


def notes(conn: psycopg2.extensions.connection) -> list[str]:
    return [row[0] for row in query(conn, 'SELECT note FROM ledger_entries ORDER BY id')]


def stored(conn: psycopg2.extensions.connection) -> list[tuple[Any, ...]]:
    """(caller, key, action, status, answer as bytes) of every stored answer."""
    rows = query(conn, 'SELECT caller, key, action, status, answer FROM dbapi_idempotency ORDER BY caller, key')
    return [(caller, key, action, status, bytes(answer)) for caller, key, action, status, answer in rows]
