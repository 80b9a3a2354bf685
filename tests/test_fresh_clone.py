"""The README as a new user follows it, in a fresh `git clone` of this repository with nothing
prepared (no .venv, no .local, no logs, no DEFAULT_DB_* anywhere): its first command serves, then
its dev-loop block, run as written from a second shell while serve.sh runs: a module scaffolded
by the CLI is served without a restart (serve.sh applies its first migration), a broken Python
file and a broken migration are named while the old code keeps serving, a migration written with
`new-migration` is applied on save, `migrate --status` from the second shell reads serve.sh's
private PostgreSQL, and the module's test passes with the command the scaffold printed.

The clone holds only what is committed, as CI's checkout does. pip's cache is reused (the
environment's PIP_* settings are kept), so the new .venv costs what a user's second clone would.
One clone and one serve.sh run hold every step: a second clone would cost a second .venv. The
module's test borrows this venv's dev packages (lend_dev_packages): their install is what CI's own
scripts/test.sh does first, and in the clone it would cost a minute.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import psycopg2
import pytest
from dotenv import dotenv_values

from tests.test_serve import (
    ADA,
    ROOT,
    Served,
    free_port,
    kill_postgres,
    listens,
    postgres_processes,
    run_curl,
    start_serve,
    user_env,
)

FIRST_COMMAND = 'scripts/serve.sh'
START_TIMEOUT_SECONDS = 240  # a new .venv: pip installs requirements.txt and requirements-local.txt
SERVED_WITHIN_SECONDS = 15  # a new module answers within this long, without a restart (issue 30)
RELOAD_TIMEOUT_SECONDS = 60  # a check of the code, then new workers, on a busy shared machine
DEV_TEST_TIMEOUT_SECONDS = 180  # pip checks requirements-dev.txt, then pytest runs the module's test
SHELL_FENCE = re.compile(r'^```(sh|bash|shell|console)?\s*$')
DEV_LOOP = '<!-- run by tests/test_fresh_clone.py -->'  # the README's dev-loop block, run here
README_URL = 'http://127.0.0.1:8000'
CLI = ['scripts/flask', '--app', 'app']
MIGRATE = [*CLI, 'migrate']  # the one way SQL is applied; serve.sh runs it on every change

pytestmark = [pytest.mark.slow, pytest.mark.timeout(START_TIMEOUT_SECONDS + DEV_TEST_TIMEOUT_SECONDS + 180)]


def readme_first_command(readme: str) -> str:
    """The first command of the README's first shell block, its comment cut off."""
    lines = iter(readme.splitlines())
    for line in lines:
        if line.startswith('```'):
            assert SHELL_FENCE.match(line), f"README.md's first code block is not shell: {line!r}"
            break
    for line in lines:
        assert not line.startswith('```'), "README.md's first code block holds no command"
        words = shlex.split(line, comments=True)
        if words:
            return shlex.join(words)
    raise AssertionError('README.md has no code block')


def readme_dev_loop(readme: str) -> list[list[str]]:
    """The commands of the README's dev-loop block, one a line, comments cut off."""
    assert DEV_LOOP in readme, f'README.md has no block marked {DEV_LOOP}'
    lines = readme.split(DEV_LOOP + '\n', 1)[1].splitlines()
    assert SHELL_FENCE.match(lines[0]), lines[0]
    block = lines[1 : lines.index('```', 1)]
    return [words for words in (shlex.split(line, comments=True) for line in block) if words]


def wait_for(what: str, found: Callable[[], bool], served: Served, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert served.process.poll() is None, f'serve.sh exited while waiting for {what}\n{served.output()}'
        assert time.monotonic() < deadline, f'no {what} after {timeout} s\n{served.output()}'
        time.sleep(0.2)


def gunicorn_master(served: Served) -> int:
    [master] = [
        child.pid for child in psutil.Process(served.process.pid).children() if 'gunicorn' in ' '.join(child.cmdline())
    ]
    return master


def edit_and_wait(served: Served, path: Path, text: str, named: str = '', error: str = '') -> None:
    """Save `path` as `text`, then wait for the watcher's verdict: with `named`, its one line
    `serve.sh: not reloaded: <named>...` (holding `error`) while the code from before serves;
    without, the workers reloaded on the file."""
    reloads = served.output().count('reloading the workers')
    refusals = served.stderr.read_text().count('serve.sh: not reloaded: ')
    path.write_text(text, encoding='utf-8')
    if not named:
        wait_for(
            f'the reload of {path.name}',
            lambda: served.output().count('reloading the workers') > reloads,
            served,
            RELOAD_TIMEOUT_SECONDS,
        )
        return
    wait_for(f'the error naming {named}', lambda: named in served.stderr.read_text(), served, RELOAD_TIMEOUT_SECONDS)
    lines = served.stderr.read_text().splitlines()
    [line] = [line for line in lines if named in line]
    assert line.startswith(f'serve.sh: not reloaded: {named}') and line.endswith('from before)'), line
    assert error in line, line
    assert served.output().count('reloading the workers') == reloads, 'reloaded on a broken file'
    assert served.stderr.read_text().count('serve.sh: not reloaded: ') > refusals


def run_in(clone: Path, words: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A command typed in a second shell of the clone: the user's environment, nothing set."""
    return subprocess.run(words, cwd=clone, env=user_env(), capture_output=True, text=True, timeout=timeout)


def lend_dev_packages(clone: Path) -> None:
    """Let the clone's .venv see this venv's packages (a .pth file, appended after its own).

    scripts/test.sh starts by installing requirements-dev.txt; in the clone's new .venv that is
    a minute of pip (mypy, Material's theme, matplotlib, ...) that proves nothing the first
    command's install has not. With this venv's packages on its path, pip finds every pin
    satisfied, and the command still runs whole, as printed.
    """
    done = subprocess.run(
        [str(clone / '.venv' / 'bin' / 'python'), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    own = sysconfig.get_paths()['purelib']
    (Path(done.stdout.strip()) / 'dbapi-test-lent-packages.pth').write_text(own + '\n', encoding='utf-8')


def test_readme_first_command_serves_from_a_fresh_clone_and_its_dev_loop_runs() -> None:
    clone = Path(tempfile.mkdtemp(prefix='dbapi-fresh-clone-')).resolve()
    pgdata = clone / '.local' / 'pgdata'
    served = None
    try:
        subprocess.run(['git', 'clone', '--quiet', str(ROOT), str(clone)], check=True, capture_output=True, timeout=120)
        readme = (clone / 'README.md').read_text(encoding='utf-8')
        command = readme_first_command(readme)
        assert command == FIRST_COMMAND, f'the README starts with {command!r} now: run that here instead'
        serve, scaffold, call, migrate_status, module_test = readme_dev_loop(readme)
        assert serve == [FIRST_COMMAND]
        assert scaffold[:4] == ['scripts/flask', '--app', 'app', 'new-module'], scaffold
        assert call[0] == 'curl' and README_URL in ' '.join(call), call
        assert migrate_status == [*MIGRATE, '--status'], migrate_status
        for fresh in ('.venv', '.local', 'logs'):
            assert not (clone / fresh).exists(), fresh
        port = free_port()
        served = start_serve(shlex.split(command), clone, user_env(PORT=str(port)), Path(tempfile.mkdtemp()))
        curl = served.wait_for_curl(START_TIMEOUT_SECONDS)
        assert curl[0] == 'curl' and f'http://127.0.0.1:{port}/example/bar' in curl, curl
        assert run_curl(curl) == ('200', [ADA]), served.output()
        assert postgres_processes(pgdata), served.output()
        master = gunicorn_master(served)

        # Shell 2: the module, scaffolded while serve.sh runs, answers without a restart.
        name = scaffold[4]
        done = run_in(clone, scaffold, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        printed = [line.removeprefix('next:').strip() for line in done.stdout.splitlines()]
        assert shlex.join(module_test) in printed, done.stdout  # the README runs what it printed
        assert any(line.startswith(shlex.join(MIGRATE)) for line in printed), done.stdout
        call = [word.replace(README_URL, f'http://127.0.0.1:{port}') for word in call]
        wait_for(f'a 200 from {name}', lambda: run_curl(call)[0] == '200', served, SERVED_WITHIN_SECONDS)
        assert gunicorn_master(served) == master, 'gunicorn was restarted'
        assert re.search(rf'^serve\.sh: default: applied {name} 0001_initial in \d+ ms$', served.output(), re.M)

        # A broken Python file: one line naming it, and the code from before keeps serving.
        path = f'modules/{name}/actions.py'
        good = (clone / path).read_text(encoding='utf-8')
        edit_and_wait(served, clone / path, good + 'def broken(:\n', f'{path}, line ', 'SyntaxError')
        assert run_curl(call)[0] == '200', served.output()
        edit_and_wait(served, clone / path, good)

        # A migration, as the README says: new-migration in shell 2 writes the next file, which
        # holds only comments (refused, nothing applied); saved broken, it is named with
        # PostgreSQL's message and nothing of it is applied; saved right, it is applied and served.
        done = run_in(clone, [*CLI, 'new-migration', name, 'add_note'], timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        path = f'modules/{name}/migrations/0002_add_note.sql'
        assert done.stdout.startswith(f'created {path}'), done.stdout
        empty = f'serve.sh: not reloaded: {path} holds no SQL statement'
        wait_for('the refusal of the migration without SQL', lambda: empty in served.stderr.read_text(), served, 60)
        header = (clone / path).read_text(encoding='utf-8')
        broken = f'ALTR TABLE {name}_items ADD COLUMN note text;\n'
        edit_and_wait(served, clone / path, header + broken, f'{path} line 4: syntax error at or near "ALTR"', '')
        assert run_curl(call)[0] == '200', served.output()
        fixed = f"ALTER TABLE {name}_items ADD COLUMN note text NOT NULL DEFAULT '';\n"
        edit_and_wait(served, clone / path, header + fixed)
        assert re.search(rf'^serve\.sh: default: applied {name} 0002_add_note in \d+ ms$', served.output(), re.M)
        assert gunicorn_master(served) == master, 'gunicorn was restarted'

        # The README's migrate --status, from a second process, reads serve.sh's private
        # PostgreSQL: the rows it shows are the ones there, written by serve.sh's own runs.
        record = dotenv_values(clone / '.local' / 'database.env')
        private = dict(host=record['DEFAULT_DB_HOST'], port=record['DEFAULT_DB_PORT'], user='postgres')
        assert private['host'] == str(pgdata), record
        conn = psycopg2.connect(dbname=record['DEFAULT_DB_NAME'], **private)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    'SELECT version, applied_by FROM dbapi_migrations WHERE module = %s ORDER BY version', [name]
                )
                applied = cursor.fetchall()
                cursor.execute(
                    'SELECT column_name FROM information_schema.columns WHERE table_name = %s AND column_name = %s',
                    [f'{name}_items', 'note'],
                )
                assert cursor.fetchall() == [('note',)]  # 0002_add_note, applied by serve.sh's watcher
        finally:
            conn.close()
        assert [version for version, _ in applied] == [1, 2], applied
        done = run_in(clone, migrate_status, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        for (_, applied_by), stem in zip(applied, ('0001_initial', '0002_add_note'), strict=True):
            [row] = [line for line in done.stdout.splitlines() if f' {name} {stem} ' in line]
            assert re.search(rf'^default +{name} {stem} +applied .* by {re.escape(applied_by)}$', row), row
        assert 'pending' not in done.stdout, done.stdout
        assert run_curl(call)[0] == '200', served.output()

        # The module's test, with the command the scaffold printed.
        lend_dev_packages(clone)
        done = run_in(clone, module_test, timeout=DEV_TEST_TIMEOUT_SECONDS)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert re.search(r'\b4 passed\b', done.stdout), done.stdout[-3000:]

        assert 'Traceback' not in served.output(), served.output()
        # Ctrl-C in the terminal: SIGINT to serve.sh's whole process group.
        assert served.stop(signal.SIGINT, group=True) == 0, served.output()
        assert not listens(port)
        assert postgres_processes(pgdata) == [], served.output()
        assert not (clone / '.local' / 'database.env').exists(), 'the record outlived the server'
        assert 'Traceback' not in served.output(), served.output()  # gunicorn drained: no worker cut short
    finally:
        if served is not None:
            served.kill()
            shutil.rmtree(served.stdout.parent, ignore_errors=True)
        kill_postgres(pgdata)
        shutil.rmtree(clone, ignore_errors=True)
