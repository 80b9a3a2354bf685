"""Soak: 32 clients through nginx and three replicas, a mix of reads, upserts, writes and garbage.

Measured: every answer has the status its request deserves, no acknowledged write is missing,
worker memory is flat after warm-up, database sessions stay within the pools' bounds, and
there is exactly one access record (app and nginx) per request.

CI runs it for 60 s; longer: `SOAK_SECONDS=1800 .venv/bin/python -m pytest tests/test_soak.py`.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from scripts.topology import Topology, find_nginx, topology
from tests import figures
from tests.conftest import apply_migrations
from tests.pg_watch import SERVICE_SESSIONS, SessionSampler
from tests.private_pg import PrivatePostgres, private_postgres

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.getenv('SOAK_SECONDS', '60'))
WARM_UP_SECONDS = min(15.0, SOAK_SECONDS / 4)
# Each client goes on past SOAK_SECONDS until it has sent this many requests: enough load to mean
# anything however busy the machine is, counted rather than timed.
MIN_TURNS = max(1, int(SOAK_SECONDS))
CLIENTS = 32
REPLICAS = 3
WORKERS = 2
POOL_SIZE = 2
TOKEN = 'testing-token'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
MODULES = ['modules.example', 'tests.modules.probe']
MAX_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class Kind:
    """One kind of request of the mix and the only status it may get."""

    name: str
    path: str
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: {**AUTH, 'Content-Type': 'application/json'})


INVALID = [
    Kind('bad-json', '/example/foo', 400, b'{"name": '),
    Kind('missing-field', '/example/foo', 422, b'{}'),
    Kind('wrong-token', '/example/foo', 401, b'{"name": "x"}', {'Authorization': 'Bearer nope'}),
    Kind('unknown-action', '/example/nope', 404, b'{}'),
    Kind('wrong-type', '/example/foo', 415, b'name=x', {**AUTH, 'Content-Type': 'text/plain'}),
]
READ = Kind('read', '/probe/pg_types', 200, b'{}')
# Out of 20 requests: 8 reads, 5 upserts, 3 writes, 4 invalid.
MIX = ['read'] * 8 + ['upsert'] * 5 + ['write'] * 3 + ['invalid'] * 4


@dataclass
class Tally:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def require_nginx() -> None:
    """Fails, never skips: the soak proves nothing without the real proxy."""
    assert find_nginx() is not None, 'nginx is not installed: scripts/ensure_tools.sh installs it'


@pytest.fixture(scope='module')
def pg() -> Iterator[PrivatePostgres]:
    with private_postgres({'max_connections': '50'}) as server:
        apply_migrations(server.create_database('dbapi_soak'), MODULES)
        yield server


@pytest.fixture(scope='module')
def top(pg: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require_nginx()
    env = {
        'ENVIRONMENT': 'testing',
        'BEARER': TOKEN,
        'EXTRA_MODULES': 'tests.modules.probe',
        'WEB_CONCURRENCY': str(WORKERS),
        'POOL_SIZE': str(POOL_SIZE),
        'MAX_REQUESTS': '0',  # no recycling: a leak must show, not be hidden by fresh workers
    }
    with topology(REPLICAS, pg.params('dbapi_soak'), tmp_path_factory.mktemp('soak'), **env) as running:
        yield running


def request_for(kind: str, turn: int, client: int) -> tuple[Kind, str | None]:
    """The request of this turn, and the note it writes (for the lost-write check)."""
    if kind == 'read':
        return READ, None
    if kind == 'upsert':
        body = json.dumps({'name': f'soak-{turn % 200}', 'email': f'c{client}@example.com'}).encode()
        return Kind('upsert', '/example/bar', 200, body), None
    if kind == 'write':
        note = f'soak-{uuid.uuid4().hex}'
        return Kind('write', '/probe/write_note', 200, json.dumps({'note': note}).encode()), note
    return INVALID[turn % len(INVALID)], None


def client_loop(url: str, client: int, until: float, tally: Tally) -> None:
    session = requests.Session()
    for turn in itertools.count():
        if turn >= MIN_TURNS and time.monotonic() >= until:
            return
        kind, note = request_for(MIX[(turn + client) % len(MIX)], turn, client)
        request_id = f'soak-{client}-{turn}'
        headers = {**kind.headers, 'X-Request-ID': request_id}
        try:
            response = session.post(url + kind.path, data=kind.body, headers=headers, timeout=30)
            problem = None if response.status_code == kind.status else f'{kind.name}: {response.status_code}'
        except requests.RequestException as error:
            problem = f'{kind.name}: {type(error).__name__}'
        with tally.lock:
            tally.requests += 1
            tally.request_ids.append(request_id)
            if problem:
                tally.errors.append(problem)
            elif note:
                tally.written.append(note)


def worker_rss(top: Topology) -> dict[int, int]:
    """RSS in bytes of every gunicorn worker of every replica, by pid."""
    rss = {}
    for replica in top.replicas:
        for worker in psutil.Process(replica.process.pid).children():
            rss[worker.pid] = worker.memory_info().rss
    return rss


def access_ids(paths: list[Path], dataset: str | None) -> collections.Counter[str]:
    """How many access records each request id has in these JSON-lines files."""
    counts: collections.Counter[str] = collections.Counter()
    for path in paths:
        for line in path.read_text(errors='replace').splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if dataset is None or record.get('event.dataset') == dataset:
                counts[record.get('http.request.id')] += 1
    return counts


def test_soak(top: Topology, pg: PrivatePostgres) -> None:
    tally = Tally()
    started = time.monotonic()
    until = started + SOAK_SECONDS
    clients = [
        threading.Thread(target=client_loop, args=(top.url, n, until, tally), daemon=True) for n in range(CLIENTS)
    ]
    with SessionSampler(pg, interval=0.5) as sampler:
        for thread in clients:
            thread.start()
        time.sleep(WARM_UP_SECONDS)
        warm_rss = worker_rss(top)
        warm_sessions = sampler.peak
        for thread in clients:
            thread.join()  # each request times out at 30 s: a client ends within MIN_TURNS of them
        end_rss = worker_rss(top)
    elapsed = time.monotonic() - started

    lost = (
        len(tally.written)
        - pg.query('SELECT count(*) FROM probe_log WHERE note = ANY(%s)', [tally.written], dbname='dbapi_soak')[0][0]
    )
    assert set(end_rss) == set(warm_rss), 'a worker died or was replaced during the soak'
    growth = max((end_rss[pid] - warm_rss[pid]) / warm_rss[pid] for pid in warm_rss)
    figures.record_soak(elapsed, tally.requests, len(tally.errors), lost, max(growth, 0.0))

    assert tally.requests >= CLIENTS * MIN_TURNS, f'only {tally.requests} requests: a client stopped early'
    assert not tally.errors, f'{len(tally.errors)} unexpected answers: {collections.Counter(tally.errors)}'
    assert lost == 0, f'{lost} acknowledged writes are not in the database'
    assert growth < MAX_RSS_GROWTH, f'worker RSS grew {growth:.1%} after warm-up: {warm_rss} -> {end_rss}'
    limit = REPLICAS * WORKERS * POOL_SIZE
    assert sampler.peak <= limit, f'{sampler.peak} database sessions, over {limit}'
    assert warm_sessions > 0, 'the sampler saw no session: the check proves nothing'
    now = pg.query(f'SELECT count(*) FROM pg_stat_activity WHERE {SERVICE_SESSIONS}')[0][0]  # noqa: S608
    assert now <= limit

    time.sleep(1.0)  # the last records are written after the responses
    sent = collections.Counter(tally.request_ids)
    app_records = access_ids(sorted(top.log_dir.glob('dbapi-*.log*')), 'dbapi.access')
    nginx_records = access_ids([Path(top.nginx.access_log)], None)
    for name, records in (('app', app_records), ('nginx', nginx_records)):
        wrong = {rid: records[rid] for rid in sent if records[rid] != 1}
        examples = list(wrong.items())[:5]
        assert not wrong, f'{len(wrong)} requests without exactly one {name} access record, e.g. {examples}'
