"""The README's first command, as a new user runs it: in a fresh `git clone` of this repository
with nothing prepared (no .venv, no .local, no logs, no DEFAULT_DB_* anywhere).

The clone holds only what is committed, as CI's checkout does. pip's cache is reused (the
environment's PIP_* settings are kept), so the new .venv costs what a user's second clone would.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_serve import (
    ADA,
    ROOT,
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
SHELL_FENCE = re.compile(r'^```(sh|bash|shell|console)?\s*$')

pytestmark = [pytest.mark.slow, pytest.mark.timeout(START_TIMEOUT_SECONDS + 120)]


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


def test_readme_first_command_serves_from_a_fresh_clone() -> None:
    clone = Path(tempfile.mkdtemp(prefix='dbapi-fresh-clone-')).resolve()
    pgdata = clone / '.local' / 'pgdata'
    served = None
    try:
        subprocess.run(['git', 'clone', '--quiet', str(ROOT), str(clone)], check=True, capture_output=True, timeout=120)
        command = readme_first_command((clone / 'README.md').read_text(encoding='utf-8'))
        assert command == FIRST_COMMAND, f'the README starts with {command!r} now: run that here instead'
        for fresh in ('.venv', '.local', 'logs'):
            assert not (clone / fresh).exists(), fresh
        port = free_port()
        served = start_serve(shlex.split(command), clone, user_env(PORT=str(port)), Path(tempfile.mkdtemp()))
        curl = served.wait_for_curl(START_TIMEOUT_SECONDS)
        assert curl[0] == 'curl' and f'http://127.0.0.1:{port}/example/bar' in curl, curl
        assert run_curl(curl) == ('200', [ADA]), served.output()
        assert postgres_processes(pgdata), served.output()
        assert 'Traceback' not in served.output(), served.output()
        # Ctrl-C in the terminal: SIGINT to serve.sh's whole process group.
        assert served.stop(signal.SIGINT, group=True) == 0, served.output()
        assert not listens(port)
        assert postgres_processes(pgdata) == [], served.output()
        assert 'Traceback' not in served.output(), served.output()  # gunicorn drained: no worker cut short
    finally:
        if served is not None:
            served.kill()
            shutil.rmtree(served.stdout.parent, ignore_errors=True)
        kill_postgres(pgdata)
        shutil.rmtree(clone, ignore_errors=True)
