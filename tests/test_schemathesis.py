"""schemathesis against a real gunicorn, from the service's own `/openapi.json`, with a token.

Every operation of the document, every check schemathesis has (`--checks all`: no 5xx; every
status, content type and header documented; answers that match their schemas; bodies that break
the schema refused, bodies that keep it accepted; the token required; other methods refused with
405 and `Allow`), in every phase (the documented examples, boundary values, random bodies).
Whatever it finds is fixed in the service or in the document, never excluded here.

The service runs the modules production serves (`settings.MODULES`): the tests' probe module
fails on purpose (`crash`, `bad_sql`...). The examples in the document name the user `ada`, who
is stored first, so the examples reach the action's 200. Each run draws a new seed; a failure
prints it, and `SCHEMATHESIS_SEED=<seed>` replays that run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.service import TOKEN, Service, running_service

SCHEMATHESIS = Path(sys.executable).parent / 'schemathesis'
# Per operation and phase; the whole run takes about 10 s on the shared 2-core machine.
MAX_EXAMPLES = 100
RUN_TIMEOUT_SECONDS = 240


@pytest.fixture(scope='module')
def service(database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log_dir = str(tmp_path_factory.mktemp('schemathesis-logs'))
    with running_service(database, log_dir, EXTRA_MODULES='') as running:
        stored = running.post('/example/bar', {'name': 'ada', 'email': 'ada@example.com'})
        assert stored.status_code == 200, stored.text
        yield running


def test_schemathesis_finds_nothing_in_any_operation(service: Service, tmp_path: Path) -> None:
    document = requests.get(f'{service.url}/openapi.json', timeout=10).json()
    operations = sum(len(item) for item in document['paths'].values())
    seed = os.getenv('SCHEMATHESIS_SEED')
    command = [
        str(SCHEMATHESIS),
        'run',
        f'{service.url}/openapi.json',
        '--checks=all',
        f'--header=Authorization: Bearer {TOKEN}',
        f'--max-examples={MAX_EXAMPLES}',
        '--workers=1',
        '--request-timeout=10',
        '--generation-database=none',  # nothing written to the working tree
        '--no-color',
        *([f'--seed={seed}'] if seed else []),
    ]
    run = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f'schemathesis found problems (replay with SCHEMATHESIS_SEED=<its Seed>):\n{output}'
    assert f'Operations:       {operations} selected / {operations} total' in output, output
    tested = re.search(r'Tested: (\d+)', output)
    assert tested is not None and int(tested[1]) == operations, output
    assert 'No issues found' in output, output
