"""The developer's scripts around the dev loop: scripts/test.sh's help and its one-file mode, and
where the tests find a PostgreSQL (tests/conftest.py: TEST_PG_*, 127.0.0.1:5432, or the private
one a running scripts/serve.sh recorded). serve.sh's reloads run in tests/test_fresh_clone.py."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pg_server
from tests.private_pg import free_port
from tests.test_serve import ROOT, assert_help_runs_nothing, user_env

TEST_SH = 'scripts/test.sh'


def test_test_sh_help_prints_usage_and_runs_nothing(tmp_path: Path) -> None:
    assert_help_runs_nothing(TEST_SH, tmp_path, ('scripts/test.sh tests/test_module_orders.py', '-k', 'TEST_PG_HOST'))


def test_test_sh_with_a_file_runs_that_file_and_no_linter() -> None:
    done = subprocess.run(
        [TEST_SH, 'tests/test_json.py', '-q', '-p', 'no:cacheprovider'],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ' passed' in done.stdout.splitlines()[-1], done.stdout[-1000:]
    for linter_said in ('All checks passed!', 'files already formatted', 'Success: no issues found'):
        assert linter_said not in done.stdout + done.stderr


@pytest.fixture
def no_test_pg_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ('TEST_PG_HOST', 'TEST_PG_PORT', 'TEST_PG_USER'):
        monkeypatch.delenv(name, raising=False)


def record(tmp_path: Path, with_socket: bool) -> Path:
    socket_dir = tmp_path / 'pgdata'
    socket_dir.mkdir()
    if with_socket:
        (socket_dir / '.s.PGSQL.5433').touch()
    path = tmp_path / 'database.env'
    lines = [f'export DEFAULT_DB_HOST={socket_dir}', 'export DEFAULT_DB_PORT=5433', 'export DEFAULT_DB_USER=postgres']
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_with_nothing_on_the_default_port_the_tests_use_serves_private_postgres(
    tmp_path: Path, no_test_pg_variables: None
) -> None:
    closed = {'host': '127.0.0.1', 'port': free_port(), 'user': 'postgres'}
    assert pg_server(record(tmp_path, with_socket=True), closed) == {
        'host': str(tmp_path / 'pgdata'),
        'port': 5433,
        'user': 'postgres',
    }


def test_a_record_whose_server_is_gone_is_ignored(tmp_path: Path, no_test_pg_variables: None) -> None:
    closed = {'host': '127.0.0.1', 'port': free_port(), 'user': 'postgres'}
    assert pg_server(record(tmp_path, with_socket=False), closed) == closed


def test_test_pg_variables_and_an_answering_default_win_over_the_record(
    tmp_path: Path, no_test_pg_variables: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = record(tmp_path, with_socket=True)
    with socket.create_server(('127.0.0.1', 0)) as server:  # something answers on the default
        listening = {'host': '127.0.0.1', 'port': server.getsockname()[1], 'user': 'postgres'}
        assert pg_server(saved, listening) == listening
    closed = dict(listening, port=free_port())
    monkeypatch.setenv('TEST_PG_PORT', str(closed['port']))
    assert pg_server(saved, closed) == closed  # set by hand: used even when nothing answers
