"""The production topology on this machine: real nginx (the production template) in front of
three gunicorn replicas started by start.sh, against the machine's real PostgreSQL.

Every write is a row with a unique note, so counting rows against answers shows a request
lost (answered but not run, or run but not answered) or run twice.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from scripts.topology import NGINX_DEFAULTS, Topology, find_nginx, free_port, topology
from tests.conftest import AUTH, MODULES, schema_database
from tests.tools import LoadThreads, require_tool

pytestmark = pytest.mark.slow

REPLICAS = 3
LOAD_THREADS = 6
APP_TARGET = f'app:create_app({{"MODULES": {MODULES!r}}})'


@pytest.fixture(scope='module')
def topology_database() -> Iterator[dict[str, Any]]:
    """A database of this module's own, so the row counts see only these tests' writes."""
    with schema_database('dbapi_topology') as params:
        yield params


@pytest.fixture(scope='module')
def top(topology_database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require_tool(find_nginx(), 'nginx')
    workdir = tmp_path_factory.mktemp('topology')
    env = {'ENVIRONMENT': 'testing', 'BEARER': AUTH['Authorization'].split()[1], 'APP_TARGET': APP_TARGET}
    with topology(REPLICAS, topology_database, workdir, **env) as running:
        yield running


@pytest.fixture
def db(topology_database: dict[str, Any]) -> Iterator[Any]:
    import psycopg2

    conn = psycopg2.connect(**topology_database)
    conn.autocommit = True
    yield conn
    conn.close()


@dataclass
class Result:
    note: str
    status: int | None
    served_by: str | None
    error: str | None = None


@dataclass
class Load(LoadThreads):
    """Threads POSTing write_note through nginx until stopped; one Result per request."""

    url: str
    threads: int = LOAD_THREADS
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    results: list[Result] = field(default_factory=list)

    def load(self, index: int) -> None:
        session = requests.Session()
        count = 0
        while self.running:
            note = f'{self.tag}-{index}-{count}'
            count += 1
            try:
                response = session.post(f'{self.url}/probe/write_note', json={'note': note}, headers=AUTH, timeout=30)
                self.results.append(Result(note, response.status_code, response.headers.get('X-Served-By')))
            except requests.RequestException as error:
                self.results.append(Result(note, None, None, repr(error)))

    def check_exactly_once(self, conn: Any) -> None:
        """Every request answered 200, and each one is exactly one row; no other row has the tag."""
        assert self.results, 'the load sent nothing'
        failed = [r for r in self.results if r.status != 200]
        assert not failed, f'{len(failed)} of {len(self.results)} requests failed: {failed[:5]}'
        with conn.cursor() as cursor:
            cursor.execute('SELECT note, count(*) FROM probe_log WHERE note LIKE %s GROUP BY note', [f'{self.tag}-%'])
            rows = dict(cursor.fetchall())
        twice = {note: n for note, n in rows.items() if n != 1}
        assert not twice, f'run more than once: {twice}'
        answered = {r.note for r in self.results}
        assert set(rows) == answered, (
            f'answered but not written: {sorted(answered - set(rows))[:5]}; '
            f'written but not answered: {sorted(set(rows) - answered)[:5]}'
        )


def post(url: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.post(f'{url}{path}', json=body, headers={**AUTH, **kwargs.pop('headers', {})}, timeout=30, **kwargs)


def assert_problem(response: requests.Response, status: int) -> dict[str, Any]:
    """nginx's own error, in the app's problem+json shape."""
    assert response.status_code == status, response.text
    assert response.headers['Content-Type'].startswith('application/problem+json'), response.headers
    body = response.json()
    assert set(body) == {'type', 'title', 'status', 'detail', 'request_id'}, body
    assert body['status'] == status
    assert body['type'].startswith('urn:dbapi:problem:')
    assert body['request_id'] == response.headers['X-Request-ID']
    return body


def test_requests_are_spread_over_every_replica(top: Topology) -> None:
    served = [post(top.url, '/example/').headers.get('X-Served-By') for _ in range(6 * REPLICAS)]
    assert set(served) == {replica.name for replica in top.replicas}, served


def test_nginx_runs_the_workers_the_stack_gives_it(top: Topology) -> None:
    master = psutil.Process(top.nginx.process.pid)
    assert len(master.children()) == int(NGINX_DEFAULTS['NGINX_WORKER_PROCESSES'])


def test_stopping_a_replica_under_load_loses_no_request(top: Topology, db: Any) -> None:
    victim = top.replicas[0]
    slow: dict[str, Any] = {}

    def slow_request() -> None:  # in flight on the victim when SIGTERM arrives: must finish
        slow['response'] = post(victim.url, '/probe/sleep', {'seconds': 1.0})

    with Load(top.url) as load:
        time.sleep(1.0)
        in_flight = threading.Thread(target=slow_request)
        in_flight.start()
        time.sleep(0.3)
        assert victim.stop() == 0
        in_flight.join(10)
        time.sleep(1.0)
    assert slow['response'].status_code == 200, slow['response'].text
    load.check_exactly_once(db)
    served = {r.served_by for r in load.results}
    assert victim.name in served and len(served) == REPLICAS  # the victim did take traffic before
    victim.start()


def test_rolling_restart_under_load_fails_no_request(top: Topology, db: Any) -> None:
    with Load(top.url) as load:
        time.sleep(0.5)
        for replica in top.replicas:
            old_pid = replica.process.pid
            top.restart_replica(replica)
            assert replica.process.pid != old_pid
        time.sleep(0.5)
    load.check_exactly_once(db)


def test_request_id_from_nginx_reaches_the_app_access_record(top: Topology) -> None:
    response = post(top.url, '/example/')
    request_id = response.headers['X-Request-ID']
    assert len(request_id) == 32  # nginx's $request_id: the client sent none
    chosen = post(top.url, '/example/', headers={'X-Request-ID': 'backend-abc.123'})
    assert chosen.headers['X-Request-ID'] == 'backend-abc.123'
    by_id = wait_for_access_records(top.log_dir, {request_id, 'backend-abc.123'})
    for wanted in (request_id, 'backend-abc.123'):
        assert wanted in by_id, f'{wanted} not in the app access records'
        assert by_id[wanted]['client.ip'] == '127.0.0.1'  # from X-Forwarded-For, PROXY_HOPS=1
    nginx_ids = {json.loads(line)['http.request.id'] for line in top.nginx.access_log.read_text().splitlines()}
    assert {request_id, 'backend-abc.123'} <= nginx_ids


def wait_for_access_records(log_dir: Path, ids: set[str], timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """The app's access records by request id, once all of `ids` are written (after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        by_id = {}
        for path in log_dir.glob('dbapi-*.log'):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get('event.dataset') == 'dbapi.access':
                    by_id[record.get('http.request.id')] = record
        if ids <= set(by_id) or time.monotonic() > deadline:
            return by_id
        time.sleep(0.1)


def test_metrics_are_a_json_404_from_nginx_and_each_replica_serves_its_own(top: Topology) -> None:
    for path in ('/metrics', '//metrics', '/metrics?format=x', '/%6Detrics'):
        response = requests.get(f'{top.url}{path}', timeout=10)
        assert_problem(response, 404)
        assert 'X-Served-By' not in response.headers, path  # nginx answered, no replica
    direct = requests.get(f'{top.replicas[0].url}/metrics', timeout=10)
    assert direct.status_code == 200
    assert 'dbapi_build_info{' in direct.text


def test_a_body_over_the_limit_is_a_json_413_from_nginx(top: Topology) -> None:
    too_big = b'{"note": "' + b'x' * (20 * 1024 * 1024) + b'"}'
    response = requests.post(
        f'{top.url}/probe/write_note',
        data=too_big,
        headers={**AUTH, 'Content-Type': 'application/json'},
        timeout=30,
    )
    assert_problem(response, 413)
    assert 'X-Served-By' not in response.headers  # nginx answered, no replica read 20 MiB


def test_a_large_body_under_the_limit_reaches_the_app_and_is_written(top: Topology, db: Any) -> None:
    """Bodies over nginx's memory buffer go through its temp files: they must be writable by its workers."""
    note = 'y' * (2 * 1024 * 1024)
    response = post(top.url, '/probe/write_note', {'note': note})
    assert response.status_code == 200, response.text
    with db.cursor() as cursor:
        cursor.execute('SELECT length(note) FROM probe_log WHERE id = %s', [response.json()])
        assert cursor.fetchone() == (len(note),)


def test_over_the_rate_limit_is_a_json_429(top: Topology) -> None:
    limited = top.another_nginx('nginx-limited', NGINX_RATE_LIMIT='2r/s', NGINX_RATE_BURST='2')
    responses = [post(limited.url, '/example/') for _ in range(10)]
    statuses = [response.status_code for response in responses]
    assert 200 in statuses and 429 in statuses, statuses
    rejected = next(response for response in responses if response.status_code == 429)
    assert_problem(rejected, 429)
    assert rejected.headers['Retry-After'] == '1'


def test_every_replica_down_is_a_json_502(top: Topology) -> None:
    nowhere = top.another_nginx('nginx-nowhere', ports=[free_port(), free_port()])
    for _ in range(3):  # every replica refuses: each request tried on all, none run
        assert_problem(post(nowhere.url, '/probe/write_note', {'note': 'lost'}), 502)
