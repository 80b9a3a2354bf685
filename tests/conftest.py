"""Fixtures chained app -> client -> helpers, against the machine's real PostgreSQL.

Each test session makes its own database and drops it at the end. Nothing is mocked.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault('ENVIRONMENT', 'testing')

import psycopg2
import pytest
from dotenv import dotenv_values
from flask import Flask
from flask.testing import FlaskClient
from psycopg2 import sql

from app import create_app
from lib.db.migrations import Migration, discover, migrate

DEFAULT_PG = {'host': '127.0.0.1', 'port': 5432, 'user': 'postgres'}
SERVE_RECORD = Path(__file__).resolve().parent.parent / '.local' / 'database.env'  # settings.py reads it too


def answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def served_pg(record: Path) -> dict[str, Any] | None:
    """The private PostgreSQL a running scripts/serve.sh recorded, when its socket is there."""
    values = dotenv_values(record) if record.is_file() else {}
    host, port = values.get('DEFAULT_DB_HOST'), values.get('DEFAULT_DB_PORT')
    if not host or not port or not (Path(host) / f'.s.PGSQL.{port}').exists():
        return None
    return {'host': host, 'port': int(port), 'user': values.get('DEFAULT_DB_USER') or 'postgres'}


def pg_server(record: Path = SERVE_RECORD, default: dict[str, Any] = DEFAULT_PG) -> dict[str, Any]:
    """Where the tests create their databases: TEST_PG_HOST, _PORT, _USER when any is set; else
    127.0.0.1:5432 when it answers; else the private PostgreSQL of a running scripts/serve.sh
    (a new checkout's `scripts/test.sh tests/test_module_x.py` with nothing else installed)."""
    chosen = {
        'host': os.getenv('TEST_PG_HOST', default['host']),
        'port': int(os.getenv('TEST_PG_PORT', str(default['port']))),
        'user': os.getenv('TEST_PG_USER', default['user']),
    }
    if any(os.getenv(f'TEST_PG_{name}') for name in ('HOST', 'PORT', 'USER')):
        return chosen
    if answers(chosen['host'], chosen['port']):
        return chosen
    return served_pg(record) or chosen


PG = pg_server()
TOKEN = 'testing-token'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
MODULES = ['modules.example', 'tests.modules.probe']
LEDGER = 'tests.modules.ledger'  # appends that are not idempotent by themselves: tests/ledger.py


def admin_connection() -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dbname='postgres', connect_timeout=5, **PG)
    conn.autocommit = True
    return conn


def create_database(prefix: str = 'dbapi_test') -> str:
    name = f'{prefix}_{uuid.uuid4().hex[:10]}'
    conn = admin_connection()  # not `with conn`: in psycopg2 2.9 that opens a transaction
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(name)))
    finally:
        conn.close()
    return name


def drop_database(name: str) -> None:
    conn = admin_connection()
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL('DROP DATABASE IF EXISTS {} WITH (FORCE)').format(sql.Identifier(name)))
    finally:
        conn.close()


def apply_migrations(params: dict[str, Any], modules: list[str], own: bool = True) -> list[Migration]:
    """dbapi's migrations (unless not `own`), then the modules', applied by the engine as `migrate` does."""
    migrations = [m for m in discover(modules) if own or m.module != 'dbapi']
    return migrate(params, migrations, say=lambda line: None)


@contextmanager
def schema_database(prefix: str = 'dbapi_test', modules: list[str] = MODULES) -> Iterator[dict[str, Any]]:
    """A new database with dbapi's and every module's migrations applied, dropped when the block ends."""
    name = create_database(prefix)
    params = dict(PG, dbname=name)
    apply_migrations(params, modules)
    try:
        yield params
    finally:
        drop_database(name)


@pytest.fixture(scope='module')
def ledger_database() -> Iterator[dict[str, Any]]:
    """A database with tests/modules/ledger's table too (the Idempotency-Key and batch tests)."""
    with schema_database('dbapi_ledger', [*MODULES, LEDGER]) as params:
        yield params


@pytest.fixture(scope='session')
def database() -> Iterator[dict[str, Any]]:
    """A database of this session's own, with every module's schema applied."""
    with schema_database() as params:
        yield params


def make_app(database: dict[str, Any], log_dir: str, **overrides: Any) -> Flask:
    config = {
        'ENVIRONMENT': 'testing',
        'BEARER': TOKEN,
        'DATABASES': {'default': database},
        'MODULES': MODULES,
        'POOL_SIZE': 4,
        'POOL_TIMEOUT': 2,
        'LOGGING': {'log_dir': log_dir, 'console': False},
    }
    config.update(overrides)
    app = create_app(config)
    app.test_client_class = ClosingClient
    return app


class ClosingClient(FlaskClient):
    """Reads every answer whole and closes it, as a WSGI server does.

    Flask's client leaves an answer's iterator open until the test reads the body; one never
    read was closed by the garbage collector, tests later, and its access record was written
    then, into that later test's log files.
    """

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any) -> Any:
        return super().open(*args, buffered=buffered, **kwargs)


@pytest.fixture
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp('logs'))


@pytest.fixture
def app(database: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    application = make_app(database, log_dir)
    yield application
    application.extensions['dbapi.pools'].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


class Api:
    """POSTs actions the way an internal backend does."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return self.client.post(path, json=body, headers={**AUTH, **(headers or {})}, **kwargs)


@pytest.fixture
def api(client: FlaskClient) -> Api:
    return Api(client)


@pytest.fixture
def db(database: dict[str, Any]) -> Iterator[psycopg2.extensions.connection]:
    """A plain connection to the test database, to check what actions really wrote."""
    conn = psycopg2.connect(**database)
    conn.autocommit = True
    yield conn
    conn.close()


def query(conn: psycopg2.extensions.connection, text: str, params: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(text, params)
        return cursor.fetchall() if cursor.description else []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The reliability suite's one line of figures (tests/figures.py), when any part of it ran."""
    from tests.figures import summary_line

    line = summary_line()
    if line:
        terminalreporter.write_sep('=', 'reliability')
        terminalreporter.write_line(line)
