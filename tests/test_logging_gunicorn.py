"""The logs with real processes: gunicorn with 4 workers, as production starts it, under load.

5,000 requests, each with its own X-Request-ID, while a small LOG_MAX_BYTES forces rotation and
MAX_REQUESTS recycles the workers: every id is in exactly one access record, every line of every
file is whole, and gunicorn's own lines are JSON too. Then an unwritable LOG_DIR: the API answers.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lib.server.startup import WORKER_LOGGER
from tests.conftest import TOKEN
from tests.logs import access_records, check_line, log_paths, read_lines

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = ROOT / '.venv' / 'bin' / 'gunicorn'
REQUESTS = 5000
THREADS = 16
LOAD_TIMEOUT_SECONDS = 120
START_TIMEOUT_SECONDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@contextmanager
def gunicorn(
    database: dict[str, Any], work_dir: Path, log_dir: str, workers: int, **env: str
) -> Iterator[tuple[int, Path]]:
    """`gunicorn app:app` from the repository root (gunicorn.conf.py included), stopped with SIGTERM."""
    port = free_port()
    stderr_path = work_dir / f'gunicorn-{port}.stderr'
    environment = {
        **os.environ,
        'ENVIRONMENT': 'testing',
        'LOG_DIR': log_dir,
        'DEFAULT_DB_HOST': str(database['host']),
        'DEFAULT_DB_PORT': str(database['port']),
        'DEFAULT_DB_USER': str(database['user']),
        'DEFAULT_DB_NAME': database['dbname'],
        'BEARER': TOKEN,
        'EXTRA_MODULES': 'tests.modules.probe',
        'BIND': f'127.0.0.1:{port}',
        'WEB_CONCURRENCY': str(workers),
        **env,
    }
    command = [str(GUNICORN), '--workers', str(workers), '--bind', f'127.0.0.1:{port}', '--no-control-socket']
    with stderr_path.open('wb') as stderr:
        process = subprocess.Popen([*command, 'app:app'], cwd=ROOT, env=environment, stderr=stderr)
    try:
        wait_until_ready(port, process, stderr_path)
        yield port, stderr_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def wait_until_ready(port: int, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f'gunicorn exited with {process.returncode}: {stderr_path.read_text()[-3000:]}')
        try:
            status, _ = request(port, 'GET', '/health/live', 'ready-check-' + uuid.uuid4().hex, {})
        except OSError:
            time.sleep(0.1)
            continue
        if status == 200:
            return
    raise AssertionError(f'gunicorn did not answer in {START_TIMEOUT_SECONDS} s: {stderr_path.read_text()[-3000:]}')


def request(port: int, method: str, path: str, request_id: str, headers: dict[str, str]) -> tuple[int, str]:
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        connection.request(method, path, body=b'{}', headers={'X-Request-ID': request_id, **headers})
        response = connection.getresponse()
        response.read()
        return response.status, response.headers.get('X-Request-ID', '')
    finally:
        connection.close()


# A mix: mostly the cheap action, some failures of every kind the load can produce.
def plan(number: int) -> tuple[str, dict[str, str], int]:
    auth = {'Authorization': f'Bearer {TOKEN}', 'Content-Type': 'application/json'}
    if number % 50 == 7:
        return '/probe/crash', auth, 500
    if number % 10 == 3:
        return '/example/', {'Authorization': f'Bearer {TOKEN}-wrong'}, 401
    if number % 10 == 5:
        return '/example/', {'Authorization': f'Token {TOKEN}'}, 401
    if number % 25 == 11:
        return '/no/such/module', auth, 404
    return '/example/', auth, 200


def send_load(port: int, count: int) -> dict[str, int]:
    ids = {f'load-{number:05d}-{uuid.uuid4().hex[:8]}': number for number in range(count)}

    def one(item: tuple[str, int]) -> tuple[str, int, int, str]:
        request_id, number = item
        path, headers, expected = plan(number)
        status, echoed = request(port, 'POST', path, request_id, headers)
        return request_id, expected, status, echoed

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(one, ids.items(), timeout=LOAD_TIMEOUT_SECONDS))
    for request_id, expected, status, echoed in results:
        assert (status, echoed) == (expected, request_id), (request_id, status, echoed)
    return {request_id: expected for request_id, expected, _, _ in results}


@pytest.mark.slow
def test_5000_requests_4_workers_rotation_every_id_once_no_torn_line(database: dict[str, Any], tmp_path: Path) -> None:
    log_dir = tmp_path / 'logs'
    env = {
        'LOG_MAX_BYTES': '200000',  # ~3.5 MB of records: every worker rotates several times
        'LOG_BACKUP_COUNT': '1000',  # rotation must not drop what the test counts
        'MAX_REQUESTS': '700',  # workers recycle under load: new pids, new files, nothing lost
        'MAX_REQUESTS_JITTER': '100',
        'GUNICORN_LOG_LEVEL': 'info',
    }
    started = time.monotonic()
    with gunicorn(database, tmp_path, str(log_dir), 4, **env) as (port, stderr_path):
        sent = send_load(port, REQUESTS)
        load_seconds = time.monotonic() - started
    records = read_lines(log_dir)  # fails on any torn, interleaved or cut line

    for item in records:
        check_line(item)
    access = [r for r in access_records(records) if not r['http.request.id'].startswith('ready-check-')]
    counts = Counter(r['http.request.id'] for r in access)
    assert set(counts) == set(sent), (len(set(sent) - set(counts)), len(set(counts) - set(sent)))
    assert [request_id for request_id, count in counts.items() if count != 1] == []
    for item in access:
        assert item['http.response.status_code'] == sent[item['http.request.id']]
    errors = [r for r in records if r['log.logger'] == 'dbapi.errors']
    assert len(errors) == sum(1 for status in sent.values() if status == 500)
    assert all(r['http.request.id'] in sent and r['error.stack_trace'] for r in errors)

    paths = log_paths(log_dir)
    rotated = [path for path in paths if not path.name.endswith('.log')]
    worker_pids = {r['process.pid'] for r in access}
    master_lines = [r for r in records if r['log.logger'] == 'gunicorn.error']
    assert len(worker_pids) > 4, 'MAX_REQUESTS should have recycled the workers'
    assert len(rotated) >= 4, [path.name for path in paths]
    assert any(r['message'].startswith('Listening at') for r in master_lines)  # the master's own lines, as JSON
    # Every worker the master booted wrote its ready line; a worker booted near the end of the
    # load (recycling) may have served nothing, so the booted are counted from the ready lines.
    ready_pids = {r['process.pid'] for r in records if r['log.logger'] == WORKER_LOGGER}
    assert worker_pids <= ready_pids
    assert sum(r['message'].startswith('Booting worker') for r in master_lines) == len(ready_pids)
    assert TOKEN not in ''.join(path.read_text() for path in paths) + stderr_path.read_text()
    print(
        f'\n{REQUESTS} requests in {load_seconds:.1f} s; {len(records)} lines, {len(access)} access records, '
        f'{len(paths)} files ({len(rotated)} rotated), {len(worker_pids)} worker pids'
    )


def test_gunicorn_with_an_unwritable_log_dir_answers_and_reports_once(database: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / 'a-file'
    blocker.write_text('LOG_DIR points under me, so it cannot be created, even by root')
    with gunicorn(database, tmp_path, str(blocker / 'logs'), 2, GUNICORN_LOG_LEVEL='info') as (port, stderr_path):
        ids = [f'unwritable-{number}' for number in range(40)]
        auth = {'Authorization': f'Bearer {TOKEN}', 'Content-Type': 'application/json'}
        statuses = [request(port, 'POST', '/example/', request_id, auth)[0] for request_id in ids]
    assert statuses == [200] * len(ids)
    err = stderr_path.read_text()
    assert err.count('dbapi: cannot write logs to') == 1, err[:3000]
    # nothing was lost: the JSON lines went to stderr instead
    spilled = [json.loads(line) for line in err.splitlines() if line.startswith('{')]
    for item in spilled:
        check_line(item)
    assert {r['http.request.id'] for r in access_records(spilled)} >= set(ids)
