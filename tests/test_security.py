"""Security properties that must hold in every build: static checks, config refusals, secrets,
SQL built only from quoted identifiers and bound values, and the safety headers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import errors, sql

from app import create_app
from lib.auth.callers import callers_of
from lib.core.config import KNOWN_TOKENS, Config, ConfigError, load
from lib.db.sql import Db
from tests.conftest import ClosingClient, apply_migrations
from tests.private_pg import PrivatePostgres, private_postgres

ROOT = Path(__file__).resolve().parent.parent
STRONG_TOKEN = 'q8Zr2mVx7LkP0sWd4Nf6Hj1Tb9Yc3Ge5'
DATABASES = {'default': {'dbname': 'x', 'host': '127.0.0.1', 'port': 5432, 'user': 'u'}}
# Python that bandit must pass: everything that runs in production, and the scripts around it.
BANDIT_TARGETS = ['app.py', 'settings.py', 'gunicorn.conf.py', 'lib', 'modules', 'scripts']


def tracked_files() -> list[str]:
    done = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True)
    return [name for name in done.stdout.decode().split('\0') if name]


# -- static analysis --------------------------------------------------------------------


def test_bandit_finds_nothing_medium_or_high() -> None:
    command = [sys.executable, '-m', 'bandit', '-q', '-f', 'json', '-c', 'pyproject.toml', '-r', *BANDIT_TARGETS]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    report = json.loads(done.stdout)
    assert not report['errors'], report['errors']
    serious = [
        f'{issue["filename"]}:{issue["line_number"]} {issue["test_id"]} {issue["issue_text"]}'
        for issue in report['results']
        if issue['issue_severity'] in {'MEDIUM', 'HIGH'}
    ]
    assert not serious, serious


def test_every_nosec_says_why() -> None:
    """A `# nosec` silences bandit: the line (or the one above) must carry the reason."""
    unexplained = []
    for name in tracked_files():
        if not name.endswith('.py'):
            continue
        lines = (ROOT / name).read_text(encoding='utf-8', errors='replace').splitlines()
        for number, line in enumerate(lines):
            if '# nosec' not in line:
                continue
            reason = re.sub(r'#\s*(nosec|noqa)\b[:\sA-Z0-9,]*', '', line.split('#', 1)[1]).strip()
            above = lines[number - 1].strip() if number else ''
            if not reason and not above.startswith('#'):
                unexplained.append(f'{name}:{number + 1}')
    assert not unexplained, unexplained


# -- configuration ----------------------------------------------------------------------


def config(**overrides: Any) -> Config:
    return load(overrides={'DATABASES': DATABASES, 'BEARER': STRONG_TOKEN, **overrides})


@pytest.mark.parametrize('environment', ['testing', 'production'])
@pytest.mark.parametrize('debug', ['1', 'true', 'on', 'yes', 'TRUE'])
def test_debug_refused_outside_local(environment: str, debug: str) -> None:
    with pytest.raises(ConfigError, match='DEBUG'):
        config(ENVIRONMENT=environment, DEBUG=debug)


def test_debug_only_where_asked() -> None:
    assert config(ENVIRONMENT='local', DEBUG='1').debug is True
    assert config(ENVIRONMENT='local', DEBUG='0').debug is False
    assert config(ENVIRONMENT='production').debug is False


def test_flask_debug_variable_does_not_turn_debug_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv('FLASK_DEBUG', '1')
    app = create_app(
        {'ENVIRONMENT': 'production', 'DATABASES': DATABASES, 'BEARER': STRONG_TOKEN, 'LOGGING': _logs(tmp_path)}
    )
    assert app.debug is False


def _logs(tmp_path: Path) -> dict[str, Any]:
    return {'log_dir': str(tmp_path), 'console': False}


@pytest.mark.parametrize(
    'bearer',
    [
        '',
        ' ',
        ',',
        *sorted(KNOWN_TOKENS),
        'short-token',
        f'{STRONG_TOKEN},local-dev-token',
        f'testing-token,{STRONG_TOKEN}',
    ],
)
def test_production_refuses_default_empty_or_short_tokens(bearer: str) -> None:
    with pytest.raises(ConfigError, match='BEARER') as caught:
        config(ENVIRONMENT='production', BEARER=bearer)
    for token in bearer.split(','):
        if len(token) >= 8:  # shorter ones ('token', 'secret') are words of the message itself
            assert token not in str(caught.value), 'the error repeats the token'


def test_production_accepts_a_strong_token() -> None:
    assert callers_of(config(ENVIRONMENT='production')).current


def test_production_process_refuses_the_default_token(tmp_path: Path) -> None:
    """The real start path: the process stops with one line, naming the setting, not the value."""
    env = {
        **os.environ,
        'ENVIRONMENT': 'production',
        'BEARER': 'local-dev-token',
        'DEFAULT_DB_NAME': 'x',
        'DEFAULT_DB_HOST': '127.0.0.1',
        'LOG_DIR': str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, '-c', 'import app; app.app'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert 'BEARER' in done.stderr
    assert 'local-dev-token' not in done.stderr


# -- secrets ----------------------------------------------------------------------------

SECRET_NAMES = re.compile(
    r'^\s*(?:export\s+)?([A-Z0-9_]*(?:BEARER|PASS|PASSWORD|SECRET|TOKEN|KEY)[A-Z0-9_]*)\s*=\s*(.*)$'
)
SECRET_PATTERNS = {
    'private key': re.compile(r'-----BEGIN [A-Z ]*PRIVATE KEY-----'),
    'AWS access key': re.compile(r'\bAKIA[0-9A-Z]{16}\b'),
    'GitHub token': re.compile(r'\bgh[pousr]_[A-Za-z0-9]{36,}\b'),
    'Slack token': re.compile(r'\bxox[abposr]-[A-Za-z0-9-]{10,}'),
    'password in a URL': re.compile(r'\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s:@]{3,}@'),
}


def test_production_env_files_are_examples_only() -> None:
    production = [name for name in tracked_files() if name.startswith('env/production/')]
    assert production == ['env/production/.env.example'], production
    ignored = subprocess.run(['git', 'check-ignore', '-q', 'env/production/.env'], cwd=ROOT, check=False)
    assert ignored.returncode == 0, 'env/production/.env is not in .gitignore: a real one could be committed'


def test_env_files_hold_no_real_secret() -> None:
    """Secret-looking settings in tracked env files are empty, or a token production refuses."""
    found = []
    for name in tracked_files():
        if not Path(name).name.startswith('.env'):
            continue
        for line in (ROOT / name).read_text(encoding='utf-8').splitlines():
            match = SECRET_NAMES.match(line)
            if not match:
                continue
            value = match.group(2).strip().strip('\'"')
            if value and value not in KNOWN_TOKENS and not match.group(1).endswith('_FILE'):
                found.append(f'{name}: {match.group(1)}')
    assert not found, f'values that look like real secrets: {found}'


def test_no_token_like_value_in_any_tracked_file() -> None:
    found = []
    for name in tracked_files():
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(encoding='utf-8', errors='ignore')
        found += [f'{name}: {kind}' for kind, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    assert not found, found


# -- SQL built by the Db helpers --------------------------------------------------------

HOSTILE_TABLE = 'evil"; DROP TABLE canary; --'
HOSTILE_COLUMNS = [
    'a"; DROP TABLE canary; --',
    "b') ; DROP TABLE canary; --",
    'c %s %(x)s {0} %%',
    "d}; __import__('os').system('false'); {",
    'e\\',
]
HOSTILE_VALUES = ["'; DROP TABLE canary; --", '%s', '%(x)s', '\\', '"); DROP TABLE canary; --', "' OR '1'='1"]


@pytest.fixture(scope='module')
def hostile_db() -> Iterator[tuple[PrivatePostgres, psycopg2.extensions.connection]]:
    """A private database with a canary table and a table whose names are all hostile."""
    with private_postgres({'log_statement': 'all'}) as pg:
        params = pg.create_database('dbapi_hostile')
        conn = psycopg2.connect(**params)
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE canary (id int PRIMARY KEY, note text); INSERT INTO canary VALUES (1, 'alive')"
            )
            columns = sql.SQL(', ').join(sql.SQL('{} text').format(sql.Identifier(c)) for c in HOSTILE_COLUMNS)
            cursor.execute(
                sql.SQL('CREATE TABLE {} (id int PRIMARY KEY, {})').format(sql.Identifier(HOSTILE_TABLE), columns)
            )
        yield pg, conn
        conn.close()


def canary_alive(conn: psycopg2.extensions.connection) -> bool:
    with conn.cursor() as cursor:
        cursor.execute("SELECT to_regclass('canary') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return False
        cursor.execute('SELECT note FROM canary WHERE id = 1')
        return cursor.fetchone() == ('alive',)


@pytest.mark.parametrize('value', HOSTILE_VALUES)
def test_db_helpers_quote_identifiers_and_bind_values(hostile_db: Any, value: str) -> None:
    _, conn = hostile_db
    db = Db(conn)
    row = {column: f'{value}|{column}' for column in HOSTILE_COLUMNS}
    key = abs(hash(value)) % 1_000_000
    inserted = db.insert(HOSTILE_TABLE, {'id': key, **row})
    assert inserted == [{'id': key, **row}]
    assert db.select(HOSTILE_TABLE, {'id': key, HOSTILE_COLUMNS[0]: row[HOSTILE_COLUMNS[0]]}) == inserted
    assert db.update(HOSTILE_TABLE, {HOSTILE_COLUMNS[1]: value}, {HOSTILE_COLUMNS[2]: row[HOSTILE_COLUMNS[2]]}) == 1
    upserted = db.upsert(HOSTILE_TABLE, {HOSTILE_COLUMNS[3]: value}, {'id': key})
    assert upserted[HOSTILE_COLUMNS[3]] == value and upserted[HOSTILE_COLUMNS[1]] == value
    assert db.delete(HOSTILE_TABLE, {HOSTILE_COLUMNS[4]: row[HOSTILE_COLUMNS[4]]}) == 1
    assert db.select(HOSTILE_TABLE, {'id': key}) == []
    assert canary_alive(conn)


@pytest.mark.parametrize(
    'call',
    [
        lambda db: db.select('canary"; DROP TABLE canary; --'),
        lambda db: db.insert('canary', {'id) VALUES (9, 9); DROP TABLE canary; --': 1}),
        lambda db: db.update('canary', {'note': 'x'}, {'id = id OR 1=1; --': 1}),
        lambda db: db.delete('canary', {'1=1 OR id': 1}),
        lambda db: db.upsert('canary', {'note': 'x'}, {'id"); DROP TABLE canary; --': 1}),
        lambda db: db.sp_fetch_one('pg_sleep(0); DROP TABLE canary; --'),
        lambda db: db.sp_fetch_all('canary', {'x => 1); DROP TABLE canary; --': 1}),
    ],
    ids=['table', 'insert column', 'update where', 'delete where', 'upsert key', 'function', 'named argument'],
)
def test_hostile_names_are_only_ever_names(hostile_db: Any, call: Any) -> None:
    """A name that is not there is an undefined-object error, never a syntax error or a second statement."""
    _, conn = hostile_db
    with pytest.raises((errors.UndefinedTable, errors.UndefinedColumn, errors.UndefinedFunction)):
        call(Db(conn))
    assert canary_alive(conn)


def test_server_saw_no_drop(hostile_db: Any) -> None:
    """PostgreSQL's own log of every statement (log_statement=all): no DROP ever ran on its own."""
    pg, conn = hostile_db
    assert canary_alive(conn)
    statements = [line for line in pg.server_log(tail=100_000).splitlines() if 'statement: ' in line]
    assert statements, 'log_statement=all logged nothing: the check proves nothing'
    assert not [line for line in statements if line.split('statement: ', 1)[1].lstrip().upper().startswith('DROP')]


# -- response headers -------------------------------------------------------------------

SAFETY_HEADERS = {'X-Content-Type-Options': 'nosniff', 'Cache-Control': 'no-store'}


@pytest.fixture(scope='module')
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with private_postgres() as pg:
        database = pg.create_database('dbapi_headers')
        modules = ['modules.example', 'tests.modules.probe']
        apply_migrations(database, modules)  # ready: /health/ready answers 200
        app = create_app(
            {
                'ENVIRONMENT': 'testing',
                'BEARER': 'testing-token',
                'DATABASES': {'default': database},
                'MODULES': modules,
                'MAX_CONTENT_LENGTH': 1024,
                'LOGGING': _logs(tmp_path_factory.mktemp('headers')),
            }
        )
        # Every answer read whole and closed: one left open was closed by the garbage collector
        # tests later, and its access record landed in a later test's log files.
        app.test_client_class = ClosingClient
        yield app.test_client()
        app.extensions['dbapi.pools'].close()


AUTH = {'Authorization': 'Bearer testing-token'}


@pytest.mark.parametrize(
    ('method', 'path', 'kwargs', 'status'),
    [
        ('POST', '/example/foo', {'json': {'name': 'a'}, 'headers': AUTH}, 200),
        ('POST', '/example/foo', {'json': {}, 'headers': AUTH}, 422),
        ('POST', '/example/foo', {'data': b'{', 'content_type': 'application/json', 'headers': AUTH}, 400),
        ('POST', '/example/foo', {'json': {'name': 'a'}}, 401),
        ('POST', '/example/nope', {'headers': AUTH}, 404),
        ('GET', '/example/foo', {'headers': AUTH}, 405),
        ('POST', '/example/foo', {'json': {'name': 'x' * 2000}, 'headers': AUTH}, 413),
        ('POST', '/example/foo', {'data': b'x', 'content_type': 'text/plain', 'headers': AUTH}, 415),
        ('POST', '/probe/crash', {'headers': AUTH}, 500),
        ('POST', '/probe/big', {'headers': {**AUTH, 'Accept-Encoding': 'gzip'}}, 200),
        ('GET', '/health/live', {}, 200),
        ('GET', '/health/ready', {}, 200),
        ('GET', '/nowhere', {}, 404),
    ],
)
def test_every_response_carries_the_safety_headers(
    client: Any, method: str, path: str, kwargs: Any, status: int
) -> None:
    response = client.open(path, method=method, **kwargs)
    assert response.status_code == status, response.get_data()[:200]
    for name, value in SAFETY_HEADERS.items():
        assert response.headers.get(name) == value, f'{name} on {method} {path} ({status}): {response.headers}'
