"""Settings and start-up checks: a wrong setting fails with one line naming it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lib.auth.callers import callers_of
from lib.core.config import ConfigError, load
from tests.conftest import MODULES

ROOT = Path(__file__).resolve().parent.parent
GOOD_DB = {'default': {'dbname': 'x', 'host': '127.0.0.1', 'port': '5432', 'user': 'postgres'}}


def config(**overrides):
    return load(overrides={'DATABASES': GOOD_DB, 'MODULES': MODULES, **overrides})


@pytest.mark.parametrize(
    ('overrides', 'message'),
    [
        ({'ENVIRONMENT': 'staging'}, "ENVIRONMENT='staging'"),
        ({'BEARER': ''}, 'BEARER is empty'),
        ({'BEARER': ' , '}, 'BEARER is empty'),
        ({'ENVIRONMENT': 'production', 'BEARER': 'local-dev-token'}, 'default token'),
        ({'ENVIRONMENT': 'production', 'BEARER': 'short'}, 'shorter than'),
        ({'ENVIRONMENT': 'production', 'BEARER': 'x' * 40, 'DEBUG': '1'}, 'DEBUG is on'),
        ({'DEBUG': 'true'}, 'DEBUG is on'),
        ({'POOL_SIZE': 'four'}, "POOL_SIZE='four'"),
        ({'POOL_SIZE': 0}, 'POOL_SIZE=0'),
        ({'POOL_TIMEOUT': 0}, 'POOL_TIMEOUT=0'),
        ({'DATABASES': {}}, "no 'default' database"),
        ({'DATABASES': {'default': {'dbname': ''}}}, 'DEFAULT_DB_NAME is not set'),
        ({'DATABASES': {'default': {'dbname': 'x', 'port': 'abc'}}}, "DEFAULT_DB_PORT='abc'"),
        ({'DATABASES': {'default': {'dbname': 'x', 'pgbouncer': 'session'}}}, "DEFAULT_DB_PGBOUNCER='session' must be"),
        (
            {'DATABASES': {'default': {'dbname': 'x', 'pgbouncer_pool_size': '20'}}},
            'DEFAULT_DB_PGBOUNCER_POOL_SIZE is set but DEFAULT_DB_PGBOUNCER is not',
        ),
        (
            {'DATABASES': {'default': {'dbname': 'x', 'pgbouncer': 'transaction', 'pgbouncer_max_client_conn': '0'}}},
            'DEFAULT_DB_PGBOUNCER_MAX_CLIENT_CONN=0 must be at least 1',
        ),
    ],
)
def test_bad_settings_name_themselves(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(**overrides)


def test_good_production_config():
    built = config(ENVIRONMENT='production', BEARER='a' * 32 + ',' + 'b' * 32)
    assert len(callers_of(built).current) == 2
    assert 'a' * 32 not in repr(built)  # the tokens never show in a repr or a log
    assert built.debug is False


def run_settings(env: dict[str, str], code: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.endswith(('_DB_NAME', '_DB_HOST')) and k != 'BEARER'}
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_env_file_is_loaded_and_process_environment_wins():
    assert (
        run_settings(
            {'ENVIRONMENT': 'testing'}, 'from lib.core.config import load; print(load().bearer_tokens[0].decode())'
        )
        == 'testing-token'
    )
    out = run_settings(
        {'ENVIRONMENT': 'testing', 'BEARER': 'from-env'},
        'from lib.core.config import load; print(load().bearer_tokens[0].decode())',
    )
    assert out == 'from-env'


def test_secrets_from_files_and_named_databases(tmp_path):
    secret = tmp_path / 'bearer'
    secret.write_text('file-token\n')
    password = tmp_path / 'pass'
    password.write_text('pw')
    env = {
        'ENVIRONMENT': 'testing',
        'BEARER_FILE': str(secret),
        'DEFAULT_DB_PASS_FILE': str(password),
        'REPORTS_DB_NAME': 'reports',
        'REPORTS_DB_HOST': 'replica',
    }
    code = (
        'from lib.core.config import load; c = load(); d = c.databases;'
        ' print(c.bearer_tokens[0].decode(), d["default"].params["password"], d["reports"].params["host"])'
    )
    assert run_settings(env, code) == 'file-token pw replica'


def test_wrong_setting_stops_gunicorn_app_with_one_line():
    env = {**os.environ, 'ENVIRONMENT': 'production', 'BEARER': 'local-dev-token', 'DEFAULT_DB_NAME': 'x'}
    result = subprocess.run(
        [sys.executable, '-c', 'import app; app.app'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        'dbapi: configuration error: BEARER holds a default token: production needs a token of its own'
    ]


def test_requirements_pin_every_package_the_start_needs():
    pins = {}
    for line in (ROOT / 'requirements.txt').read_text().splitlines():
        if '==' in line and not line.startswith('#'):
            name, version = line.split('==')
            pins[name.strip().lower()] = version.strip()
    for package in (
        'flask',
        'brotli',  # the answers' compression (flask-compress was dropped: lib/web/compression.py says why)
        'backports.zstd',
        'psycopg2-binary',
        'marshmallow',
        'python-dotenv',  # python-json-logger was dropped: lib/observability/logs.py writes the lines itself
        'gunicorn',
    ):
        assert package in pins, package
    # every runtime line is pinned exactly
    for line in (ROOT / 'requirements.txt').read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            assert re.fullmatch(r'[A-Za-z0-9_.\-]+==[\w.]+', line.strip()), line
