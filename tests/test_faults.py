"""Database and process faults, against real gunicorn and a PostgreSQL of this module's own.

Each test is one fault from the reliability issue; each records, when it passes, that the
service survived it (tests/figures.py). The last one checks what all the others left behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import figures
from tests.conftest import apply_migrations
from tests.pg_watch import SessionSampler, idle_in_transaction, service_sessions
from tests.private_pg import PrivatePostgres, private_postgres
from tests.service import Service, running_service
from tests.tools import LoadThreads

pytestmark = pytest.mark.slow

MODULES = ['modules.example', 'tests.modules.probe']
# What the tests ask of a request: the service must answer within the timeouts it is given.
CONNECT_TIMEOUT = 2
POOL_TIMEOUT = 1
RECOVERY_SECONDS = 2.0
# Every service of this module, with the most connections it may hold: (name, peak, limit).
connection_peaks: list[tuple[str, int, int]] = []
left_idle_in_transaction: list[tuple[str, list[dict[str, Any]]]] = []
graceful_classes: set[str] = set()
restart_modes: set[str] = set()


@pytest.fixture(scope='module')
def pg() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        apply_migrations(server.create_database('dbapi_faults'), MODULES)
        yield server


@pytest.fixture
def database(pg: PrivatePostgres) -> dict[str, Any]:
    return pg.params('dbapi_faults')


@pytest.fixture
def log_dir(tmp_path: Path) -> str:
    return str(tmp_path)


class Watched:
    """A running service and its session sampler; `finish()` records the peak and leftovers."""

    def __init__(
        self, name: str, pg: PrivatePostgres, service: Service, sampler: SessionSampler, pool_size: int
    ) -> None:
        self.name = name
        self.pg = pg
        self.service = service
        self.sampler = sampler
        self.limit = service.workers * pool_size

    def finish(self) -> None:
        """Call with every request answered: nothing may be left in a transaction."""
        self.sampler.stop()
        connection_peaks.append((self.name, self.sampler.peak, self.limit))
        left = idle_in_transaction(self.pg) if self.pg.accepts_connections() else []
        left_idle_in_transaction.append((self.name, left))
        assert not left, f'{self.name}: sessions left idle in transaction: {left}'
        assert self.sampler.peak <= self.limit, f'{self.name}: {self.sampler.peak} sessions > {self.limit}'


@contextlib.contextmanager
def watched(name: str, pg: PrivatePostgres, database: dict[str, Any], log_dir: str, **env: Any) -> Iterator[Watched]:
    """A real gunicorn service on the private database, its sessions counted all along."""
    env = {'POOL_TIMEOUT': POOL_TIMEOUT, 'CONNECT_TIMEOUT': CONNECT_TIMEOUT, 'POOL_SIZE': 2, **env}
    with running_service(database, log_dir, **env) as service, SessionSampler(pg) as sampler:
        yield Watched(name, pg, service, sampler, int(env['POOL_SIZE']))


@dataclass
class Answer:
    action: str
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    content_type: str
    body: Any
    retry_after: str | None

    @property
    def is_json(self) -> bool:
        return self.content_type.startswith(('application/json', 'application/problem+json'))


def call(service: Service, action: str, body: dict[str, Any], timeout: float = 15) -> Answer:
    started = time.monotonic()
    try:
        response = service.post(action, body, timeout=timeout)
    except requests.RequestException as error:
        return Answer(action, started, time.monotonic(), 0, '', repr(error), None)
    try:
        payload = response.json()
    except ValueError:
        payload = response.text[:200]
    return Answer(
        action,
        started,
        time.monotonic(),
        response.status_code,
        response.headers.get('Content-Type', ''),
        payload,
        response.headers.get('Retry-After'),
    )


def note() -> str:
    return f'n-{uuid.uuid4().hex}'


def notes_in_db(pg: PrivatePostgres, *notes: str) -> int:
    return pg.query('SELECT count(*) FROM probe_log WHERE note = ANY(%s)', [list(notes)], dbname='dbapi_faults')[0][0]


def assert_unavailable(answer: Answer) -> None:
    """A 503 that a client can act on: JSON problem, Retry-After."""
    assert answer.status == 503, answer
    assert answer.content_type.startswith('application/problem+json'), answer
    assert answer.retry_after, answer


class Load(LoadThreads):
    """Clients posting writes and upserts in a loop until stopped; every answer kept."""

    def __init__(self, service: Service, clients: int = 4) -> None:
        self.service = service
        self.threads = clients
        self.answers: list[Answer] = []
        self.written: list[tuple[str, Answer]] = []

    def load(self, index: int) -> None:
        turn = 0
        while self.running:
            turn += 1
            if turn % 2:
                text = note()
                answer = call(self.service, '/probe/write_note', {'note': text})
                self.written.append((text, answer))
            else:
                body = {'name': f'client-{index}', 'email': f'c{turn}@example.com'}
                answer = call(self.service, '/example/bar', body)
            self.answers.append(answer)


def check_recovery(answers: list[Answer], down_at: float, ready_at: float, limit: float) -> None:
    """While the database was away, JSON 503s with Retry-After (none slower than `limit` s); from
    RECOVERY_SECONDS after it came back, every request a 200. The outage must have been seen."""
    assert len(answers) > 50, f'too little load to mean anything: {len(answers)} requests'
    for answer in answers:
        assert answer.status in (200, 503), answer
        assert answer.is_json, answer
        assert answer.ended - answer.started < limit, f'{answer} took longer than the waits allow ({limit} s)'
        if answer.status == 503:
            assert_unavailable(answer)
    during = [a for a in answers if a.ended >= down_at and a.started <= ready_at]
    after = [a for a in answers if a.started >= ready_at + RECOVERY_SECONDS]
    assert any(a.status == 503 for a in during), 'the outage went unnoticed: the test proves nothing'
    assert len(after) > 20, f'too few requests after recovery: {len(after)}'
    failed = [a for a in after if a.status != 200]
    assert not failed, f'{len(failed)} requests failed {RECOVERY_SECONDS} s after the recovery: {failed[:3]}'


@pytest.mark.parametrize('mode', ['fast', 'immediate'])
def test_pg_restart_under_load(mode: str, pg: PrivatePostgres, database: dict[str, Any], log_dir: str) -> None:
    """`fast` is an orderly restart (sessions told to end), `immediate` a crash and recovery."""
    with watched(f'restart-{mode}', pg, database, log_dir) as watch, Load(watch.service) as load:
        time.sleep(1.0)
        down_at = time.monotonic()
        pg.restart(mode)
        ready_at = pg.wait_ready()
        time.sleep(RECOVERY_SECONDS + 2.0)
        load.__exit__()
        watch.finish()
    check_recovery(load.answers, down_at, ready_at, limit=CONNECT_TIMEOUT + POOL_TIMEOUT + 1.0)
    # No acknowledged write is lost: every 200 is in the database.
    acknowledged = [text for text, answer in load.written if answer.status == 200]
    assert notes_in_db(pg, *acknowledged) == len(acknowledged)
    restart_modes.add(mode)
    if restart_modes == {'fast', 'immediate'}:
        figures.fault_survived('pg-restart-under-load')


def test_pg_down_at_start(pg: PrivatePostgres, database: dict[str, Any], log_dir: str) -> None:
    pg.stop('fast')
    try:
        with watched('down-at-start', pg, database, log_dir) as watch:
            service = watch.service
            ready = requests.get(f'{service.url}/health/ready', timeout=10)
            assert ready.status_code == 503, ready.text
            assert ready.json()['status'] == 'unavailable'
            for _ in range(4):
                assert_unavailable(call(service, '/probe/write_note', {'note': note()}))
            pg.start()
            ready_at = pg.wait_ready()
            time.sleep(RECOVERY_SECONDS)
            answers = [call(service, '/probe/write_note', {'note': note()}) for _ in range(10)]
            assert [a.status for a in answers] == [200] * 10, answers
            assert requests.get(f'{service.url}/health/ready', timeout=10).status_code == 200
            assert time.monotonic() - ready_at < 30
            watch.finish()
    finally:
        if not pg.is_running():
            pg.start()
    figures.fault_survived('pg-down-at-start')


def test_backends_terminated_between_requests(pg: PrivatePostgres, database: dict[str, Any], log_dir: str) -> None:
    with watched('terminated', pg, database, log_dir) as watch:
        service = watch.service
        warm = [call(service, '/probe/write_note', {'note': note()}) for _ in range(20)]
        assert all(a.status == 200 for a in warm), warm
        sessions = service_sessions(pg)
        assert sessions, 'no pooled sessions to kill'
        # With a timeout, pg_terminate_backend waits until the backend is really gone.
        killed = pg.query(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name LIKE 'dbapi:%'"
        )
        assert killed and all(row[0] for row in killed), killed
        assert service_sessions(pg) == []
        answers = [call(service, '/probe/write_note', {'note': note()}) for _ in range(20)]
        assert [a.status for a in answers] == [200] * 20, [a for a in answers if a.status != 200]
        watch.finish()
    figures.fault_survived('backends-terminated')


def test_statement_timeout(pg: PrivatePostgres, database: dict[str, Any], log_dir: str) -> None:
    with watched(
        'statement-timeout', pg, database, log_dir, WEB_CONCURRENCY=1, POOL_SIZE=1, STATEMENT_TIMEOUT=300
    ) as watch:
        service = watch.service
        before = call(service, '/probe/backend_pid', {})
        assert before.status == 200, before
        # Cancelled before the sleep of 1 s ended: the 0.3 s applies, by PostgreSQL's own clock
        # (the timer and the sleep run in one backend), not the client's, which a busy machine moves.
        slow = call(service, '/probe/sleep', {'seconds': 1})
        assert slow.status == 504, slow
        assert slow.content_type.startswith('application/problem+json')
        running = [s for s in service_sessions(pg) if s['state'] == 'active' and 'pg_sleep' in (s['query'] or '')]
        assert running == [], f'the statement is still running in PostgreSQL: {running}'
        after = call(service, '/probe/backend_pid', {})
        assert after.status == 200 and after.body == before.body, 'the connection was not reused'
        assert call(service, '/probe/write_note', {'note': note()}).status == 200
        watch.finish()
    figures.fault_survived('statement-timeout')


def test_pool_exhausted(pg: PrivatePostgres, database: dict[str, Any], log_dir: str) -> None:
    env = {'WEB_CONCURRENCY': 1, 'WORKER_CLASS': 'gthread', 'THREADS': 6, 'POOL_SIZE': 2}
    with watched('pool-exhausted', pg, database, log_dir, **env) as watch:
        service = watch.service
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call, service, '/probe/sleep', {'seconds': 2.0}) for _ in range(6)]
            answers = [future.result() for future in futures]
        statuses = sorted(a.status for a in answers)
        assert statuses == [200, 200, 503, 503, 503, 503], answers
        for answer in answers:
            if answer.status == 503:
                assert_unavailable(answer)
                assert answer.body['type'].endswith('pool-timeout'), answer
                waited = answer.ended - answer.started
                assert waited < POOL_TIMEOUT + 0.5, f'waited {waited:.2f} s for a connection, over {POOL_TIMEOUT} s'
        # Nobody hangs: the worker answers at once afterwards.
        assert call(service, '/probe/write_note', {'note': note()}, timeout=3).status == 200
        watch.finish()
    figures.fault_survived('pool-exhausted')


def wait_for_session(pg: PrivatePostgres, needle: str, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    """The service's sessions running a query containing `needle`, once there are `count`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [s for s in service_sessions(pg) if s['state'] == 'active' and needle in (s['query'] or '')]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f'no {count} sessions running {needle!r} after {timeout} s: {service_sessions(pg)}')


def test_write_then_fail_and_sigkill(pg: PrivatePostgres, database: dict[str, Any], log_dir: str) -> None:
    with watched('sigkill', pg, database, log_dir) as watch:
        service = watch.service
        text = note()
        failed = call(service, '/probe/write_then_fail', {'note': text})
        assert failed.status == 500 and failed.content_type.startswith('application/problem+json'), failed
        assert notes_in_db(pg, text) == 0, 'a write of a failed action was persisted'

        victim_note = note()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            doomed = pool.submit(call, service, '/probe/write_then_sleep', {'note': victim_note, 'seconds': 2})
            session = wait_for_session(pg, 'pg_sleep')[0]
            worker = int(session['application_name'].split(':')[1])
            assert worker in service.worker_pids()
            os.kill(worker, signal.SIGKILL)
            others = [call(service, '/probe/write_note', {'note': note()}) for _ in range(10)]
            assert doomed.result().status == 0, 'the killed worker answered?'
        assert [a.status for a in others] == [200] * 10, others
        assert notes_in_db(pg, victim_note) == 0, 'a killed transaction left its insert behind'
        service.wait_workers(service.workers)  # the master replaced the worker
        deadline = time.monotonic() + 10
        while any(s['application_name'] == f'dbapi:{worker}' for s in service_sessions(pg)):
            assert time.monotonic() < deadline, 'the killed worker still has a session after 10 s'
            time.sleep(0.1)
        assert notes_in_db(pg, victim_note) == 0, 'a killed transaction was committed after all'
        watch.finish()
    figures.fault_survived('write-then-fail-and-sigkill')


@pytest.mark.parametrize('worker_class', ['production', 'gthread'])
def test_sigterm_graceful(worker_class: str, pg: PrivatePostgres, database: dict[str, Any], log_dir: str) -> None:
    """`production` is gunicorn.conf.py's own worker class; gthread the alternative it allows."""
    env: dict[str, Any] = {'THREADS': 2 if worker_class == 'gthread' else 1, 'GRACEFUL_TIMEOUT': 20}
    if worker_class != 'production':
        env['WORKER_CLASS'] = worker_class
    with watched(f'sigterm-{worker_class}', pg, database, log_dir, **env) as watch:
        service = watch.service
        in_flight = service.workers * int(env['THREADS'])
        texts = [note() for _ in range(in_flight)]
        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            futures = [
                pool.submit(call, service, '/probe/write_then_sleep', {'note': t, 'seconds': 1.5}) for t in texts
            ]
            # Every worker is inside a transaction; the rest are accepted or queued behind them.
            wait_for_session(pg, 'pg_sleep', count=service.workers)
            time.sleep(0.2)
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in futures]
            code = service.process.wait(30)
        assert [a.status for a in answers] == [200] * in_flight, answers
        assert [a.body for a in answers] == [1] * in_flight
        assert notes_in_db(pg, *texts) == in_flight
        assert code == 0, service.stderr()
        watch.finish()
    graceful_classes.add(worker_class)
    if graceful_classes == {'production', 'gthread'}:
        figures.fault_survived('sigterm-graceful')


def test_nothing_left_behind(pg: PrivatePostgres) -> None:
    """Runs last: what every fault above left in PostgreSQL."""
    names = {name for name, _, _ in connection_peaks}
    assert len(names) >= 9, f'the fault tests did not all run: {sorted(names)}'
    over = [(name, peak, limit) for name, peak, limit in connection_peaks if peak > limit]
    assert not over, f'connections over workers x pool size: {over}'
    assert all(peak > 0 for _, peak, _ in connection_peaks), f'the sampler saw nothing: {connection_peaks}'
    assert not [left for _, left in left_idle_in_transaction if left]
    assert idle_in_transaction(pg) == []
    assert service_sessions(pg) == [], 'sessions outlived their service'
    figures.fault_survived('no-leaks')
