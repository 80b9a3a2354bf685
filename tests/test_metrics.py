"""The metrics step in-process: every series moves as it should for each kind of answer.

The tests' process has no PROMETHEUS_MULTIPROC_DIR, so prometheus_client keeps the values in
this process (tests/test_metrics_processes.py runs the multiprocess mode under gunicorn). The
series are the process's, shared by every app the tests make: each test reads differences.
"""

from __future__ import annotations

import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from lib.core.record import RequestRecord
from lib.db.connections import POOLS_KEY
from lib.observability import metrics as metrics_module
from lib.observability.metrics import Metrics, scrape_registry
from lib.web.flask_app import METRICS_KEY
from tests.conftest import AUTH, make_app
from tests.private_pg import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f'not true within {timeout} s'
        time.sleep(0.01)


def value(app: Flask, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none), once
    `app` has written the requests it counted since its last flush."""
    metrics = app.extensions.get(METRICS_KEY)
    if metrics is not None:
        metrics.flush()
    total = 0.0
    for family in scrape_registry(False).collect():
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


class Deltas:
    """Values of series read before and after: `after - before` for each."""

    def __init__(self, app: Flask, *series: tuple[str, dict[str, str]]) -> None:
        self.app = app
        self.series = series
        self.before = [value(app, name, **labels) for name, labels in series]

    def __call__(self) -> list[float]:
        after = [value(self.app, name, **labels) for name, labels in self.series]
        return [now - before for now, before in zip(after, self.before, strict=True)]


def requests_of(module: str, action: str, status: str) -> tuple[str, dict[str, str]]:
    return 'dbapi_requests_total', {'module': module, 'action': action, 'status': status}


def duration_of(module: str, action: str) -> tuple[str, dict[str, str]]:
    return 'dbapi_request_duration_seconds_count', {'module': module, 'action': action}


def post(client: FlaskClient, path: str, body: Any = None, **kwargs: Any) -> Any:
    return client.post(path, json=body, headers=kwargs.pop('headers', AUTH), **kwargs)


def test_a_200_is_counted_once_with_its_duration_and_caller(client: FlaskClient) -> None:
    # The series are the process's: other tests' apps (401s, other callers) count here too, so
    # the caller is checked by the delta of the authenticated caller's own series.
    by_caller = requests_of('probe', 'returns_none', '200')
    deltas = Deltas(
        client.application,
        requests_of('probe', 'returns_none', '200'),
        duration_of('probe', 'returns_none'),
        (by_caller[0], {**by_caller[1], 'caller': 'default'}),  # BEARER's tokens are the caller `default`
    )
    for _ in range(3):
        assert post(client, '/probe/returns_none').status_code == 200
    assert deltas() == [3, 3, 3]


def test_client_errors_are_counted_under_the_real_action_or_none(client: FlaskClient) -> None:
    deltas = Deltas(
        client.application,
        requests_of('probe', 'add_item', '422'),
        requests_of('probe', 'add_item', '401'),
        requests_of('probe', 'add_item', '405'),
        requests_of('', '', '404'),
        ('dbapi_requests_total', {'module': 'probe', 'status': '404'}),
    )
    assert post(client, '/probe/add_item', {'code': 1}).status_code == 422
    assert post(client, '/probe/add_item', {}, headers={}).status_code == 401
    assert client.get('/probe/add_item', headers=AUTH).status_code == 405
    assert post(client, '/probe/no_such_action').status_code == 404
    assert post(client, '/no-such-module/x').status_code == 404
    assert client.get('/wp-login.php').status_code == 404
    assert deltas() == [1, 1, 1, 3, 0]
    sent_names = {'no_such_action', 'no-such-module', 'x', 'wp-login.php'}
    labels = {
        value for family in scrape_registry(False).collect() for s in family.samples for value in s.labels.values()
    }
    assert not labels & sent_names, 'a name a client made up became a label'


def test_a_401_caller_is_empty(client: FlaskClient) -> None:
    deltas = Deltas(
        client.application, ('dbapi_requests_total', {'module': 'probe', 'action': 'returns_none', 'caller': ''})
    )
    assert post(client, '/probe/returns_none', headers={'Authorization': 'Bearer wrong-token'}).status_code == 401
    assert deltas() == [1]


def test_server_errors_and_database_errors(client: FlaskClient) -> None:
    deltas = Deltas(
        client.application,
        requests_of('probe', 'crash', '500'),
        requests_of('probe', 'bad_sql', '500'),
        requests_of('probe', 'divide_by_zero', '400'),
        ('dbapi_db_errors_total', {'database': 'default', 'sqlstate_class': '42'}),
        ('dbapi_db_errors_total', {'database': 'default', 'sqlstate_class': '22'}),
        ('dbapi_db_errors_total', {}),
    )
    assert post(client, '/probe/crash').status_code == 500
    assert post(client, '/probe/bad_sql').status_code == 500  # 42601, a syntax error
    assert post(client, '/probe/divide_by_zero').status_code == 400  # 22012
    assert deltas() == [1, 1, 1, 1, 1, 2]  # the crash is no database error


def test_a_database_that_refuses_connections_is_an_error_without_sqlstate(
    database: dict[str, Any], log_dir: str
) -> None:
    nowhere = dict(database, port=free_port())  # nothing listens there
    app = make_app(nowhere, log_dir, CONNECT_TIMEOUT=1)
    deltas = Deltas(
        app,
        ('dbapi_db_errors_total', {'database': 'default', 'sqlstate_class': 'none'}),
        requests_of('probe', 'returns_none', '200'),
        requests_of('probe', 'backend_pid', '503'),
    )
    try:
        client = app.test_client()
        assert post(client, '/probe/backend_pid').status_code == 503
        assert post(client, '/probe/returns_none').status_code == 200  # no database: no error
    finally:
        app.extensions[POOLS_KEY].close()
    assert deltas() == [1, 1, 1]


@pytest.fixture
def small_pool_app(database: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    """One connection per pool, refused after 0.3 s of waiting."""
    app = make_app(database, log_dir, POOL_SIZE=1, POOL_TIMEOUT=0.3)
    yield app
    app.extensions[POOLS_KEY].close()


def test_a_pool_timeout(small_pool_app: Flask) -> None:
    pool = small_pool_app.extensions[POOLS_KEY].get('default')
    deltas = Deltas(
        small_pool_app,
        ('dbapi_pool_timeouts_total', {'database': 'default'}),
        ('dbapi_pool_wait_seconds_count', {'database': 'default'}),
        requests_of('probe', 'backend_pid', '503'),
        ('dbapi_db_errors_total', {}),
    )
    conn = pool.getconn()  # the only connection
    try:
        assert post(small_pool_app.test_client(), '/probe/backend_pid').status_code == 503
    finally:
        pool.putconn(conn)
    assert deltas() == [1, 1, 1, 0]  # a pool timeout is not a database error


def test_a_wait_that_ends_with_a_connection(database: dict[str, Any], log_dir: str) -> None:
    app = make_app(database, log_dir, POOL_SIZE=1, POOL_TIMEOUT=30)
    try:
        wait_then_get_a_connection(app)
    finally:
        app.extensions[POOLS_KEY].close()


def wait_then_get_a_connection(app: Flask) -> None:
    pool = app.extensions[POOLS_KEY].get('default')
    deltas = Deltas(
        app,
        ('dbapi_pool_wait_seconds_count', {'database': 'default'}),
        ('dbapi_pool_timeouts_total', {'database': 'default'}),
        requests_of('probe', 'backend_pid', '200'),
    )
    conn = pool.getconn()
    answer: dict[str, int] = {}

    def request() -> None:
        answer['status'] = post(app.test_client(), '/probe/backend_pid').status_code

    thread = threading.Thread(target=request)
    thread.start()
    wait_until(lambda: pool.waiting == 1)
    pool.putconn(conn)
    thread.join(10)
    assert answer == {'status': 200}
    assert deltas() == [1, 0, 1]


def scrape(client: FlaskClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics parsed with prometheus_client's parser: (name, labels) -> value."""
    response = client.get('/metrics')
    assert response.status_code == 200
    assert response.content_type.startswith('text/plain')
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def pool_state(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], state: str) -> float:
    return samples[('dbapi_pool_connections', frozenset({('database', 'default'), ('state', state)}))]


def test_the_pool_gauges_follow_the_pool(small_pool_app: Flask) -> None:
    client = small_pool_app.test_client()
    pool = small_pool_app.extensions[POOLS_KEY].get('default')
    conn = pool.getconn()
    try:
        held = scrape(client)
    finally:
        pool.putconn(conn)
    returned = scrape(client)
    assert (pool_state(held, 'in_use'), pool_state(held, 'idle')) == (1, 0)
    assert (pool_state(returned, 'in_use'), pool_state(returned, 'idle')) == (0, 1)
    assert returned[('dbapi_pool_size', frozenset({('database', 'default')}))] == 1


def test_infrastructure_requests_are_not_counted(client: FlaskClient) -> None:
    total = value(client.application, 'dbapi_requests_total')
    scrape(client)
    assert client.get('/health/live').status_code == 200
    assert client.get('/health/ready').status_code == 200
    scrape(client)
    assert value(client.application, 'dbapi_requests_total') == total


def test_the_exposition_has_the_build_and_the_process(client: FlaskClient) -> None:
    samples = scrape(client)
    with (ROOT / 'pyproject.toml').open('rb') as file:
        version = tomllib.load(file)['project']['version']
    assert samples[('dbapi_build_info', frozenset({('version', version)}))] == 1
    assert any(name == 'process_resident_memory_bytes' for name, _ in samples)


def test_each_request_is_recorded_once_by_the_app_that_answered(client: FlaskClient, app: Flask) -> None:
    assert isinstance(app.extensions[METRICS_KEY], Metrics)
    deltas = Deltas(app, requests_of('probe', 'big', '200'))
    assert post(client, '/probe/big', headers={**AUTH, 'Accept-Encoding': 'gzip'}).status_code == 200
    assert deltas() == [1]


def test_metrics_off(database: dict[str, Any], log_dir: str) -> None:
    app = make_app(database, log_dir, METRICS='0')
    try:
        client = app.test_client()
        total = value(app, 'dbapi_requests_total')
        assert post(client, '/probe/returns_none').status_code == 200
        response = client.get('/metrics')
        assert response.status_code == 404
        assert response.content_type == 'application/problem+json'
        assert value(app, 'dbapi_requests_total') == total
        assert METRICS_KEY not in app.extensions
    finally:
        app.extensions[POOLS_KEY].close()


def test_the_duration_histogram_puts_a_request_in_its_bucket(client: FlaskClient) -> None:
    app = client.application
    labels = {'module': 'probe', 'action': 'sleep'}
    deltas = Deltas(
        app,
        ('dbapi_request_duration_seconds_bucket', {**labels, 'le': '0.25'}),
        ('dbapi_request_duration_seconds_bucket', {**labels, 'le': '+Inf'}),
        ('dbapi_request_duration_seconds_count', labels),
    )
    before = value(app, 'dbapi_request_duration_seconds_sum', **labels)
    assert post(client, '/probe/sleep', {'seconds': 0.3}).status_code == 200
    assert deltas() == [0, 1, 1]  # it took at least 0.3 s: above the 0.25 bucket
    assert value(app, 'dbapi_request_duration_seconds_sum', **labels) - before >= 0.3
    families = {family.name: family.type for family in text_string_to_metric_families(client.get('/metrics').text)}
    assert families['dbapi_request_duration_seconds'] == 'histogram'
    assert not [name for name in families if 'worker' in name]  # the stored gauges are never shown


def test_two_apps_in_one_process_add_up(client: FlaskClient, database: dict[str, Any], log_dir: str) -> None:
    other = make_app(database, log_dir)
    try:
        series = duration_of('probe', 'returns_none')
        first, second = Deltas(client.application, series), Deltas(other, series)
        assert post(client, '/probe/returns_none').status_code == 200
        assert post(other.test_client(), '/probe/returns_none').status_code == 200
        assert post(client, '/probe/returns_none').status_code == 200
        second()  # the other app writes what it timed
        assert first() == [3]  # the series are the process's: neither app's flush hides the other's
    finally:
        other.extensions[POOLS_KEY].close()


def test_requests_from_many_threads_during_flushes_are_each_counted_once(client: FlaskClient) -> None:
    """Requests only append to their action's tally, with no lock; flushes take from the front
    of the same lists meanwhile. None is lost or counted twice."""
    app = client.application
    series = requests_of('probe', 'returns_none', '200'), duration_of('probe', 'returns_none')
    deltas = Deltas(app, *series)
    metrics: Metrics = app.extensions[METRICS_KEY]
    threads, each = 4, 100
    done = threading.Event()

    def send() -> None:
        own = app.test_client()
        for _ in range(each):
            assert post(own, '/probe/returns_none').status_code == 200

    def flush_until_done() -> None:
        while not done.is_set():
            metrics.flush()

    flusher = threading.Thread(target=flush_until_done)
    flusher.start()
    senders = [threading.Thread(target=send) for _ in range(threads)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    done.set()
    flusher.join(10)
    assert deltas() == [threads * each, threads * each]


def test_a_duration_on_a_bound_is_in_that_bound_s_bucket(app: Flask) -> None:
    """`le` is inclusive: exactly 1 ms is in le=0.001, a nanosecond more is not."""
    metrics: Metrics = app.extensions[METRICS_KEY]
    labels = {'module': 'probe', 'action': 'returns_none'}
    deltas = Deltas(
        app,
        ('dbapi_request_duration_seconds_bucket', {**labels, 'le': '0.001'}),
        ('dbapi_request_duration_seconds_bucket', {**labels, 'le': '0.0025'}),
        ('dbapi_request_duration_seconds_count', labels),
    )
    before = value(app, 'dbapi_request_duration_seconds_sum', **labels)
    for duration_ns in (1_000_000, 1_000_001):
        record = RequestRecord('bound', 0, module='probe', action='returns_none', caller='x', status=200)
        metrics.record(record, duration_ns)
    assert deltas() == [1, 2, 2]
    assert value(app, 'dbapi_request_duration_seconds_sum', **labels) - before == pytest.approx(0.002000001)


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork on this platform')
def test_a_forked_child_starts_from_no_requests(client: FlaskClient) -> None:
    """A child's files start empty: what its parent counted and had not flushed is not the
    child's to write, and its totals start at 0."""
    assert post(client, '/probe/returns_none').status_code == 200
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        empty = all(not tally.keys and tally.buckets[-1] == 0 for tally in metrics_module.TALLIES.values())
        os._exit(0 if empty and not client.application.extensions[METRICS_KEY].tallies else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_idempotent_replays_and_batches(client: FlaskClient) -> None:
    app = client.application
    deltas = Deltas(
        app,
        requests_of('probe', 'write_note', '200'),
        ('dbapi_idempotent_replays_total', {'module': 'probe', 'action': 'write_note'}),
        requests_of('batch', '', '200'),
        requests_of('batch', '', '422'),
        ('dbapi_batch_steps_count', {}),
        ('dbapi_batch_steps_sum', {}),
        ('dbapi_batch_actions_total', {'module': 'probe', 'action': 'write_note', 'status': '200'}),
        ('dbapi_batch_actions_total', {'module': 'probe', 'action': 'returns_none', 'status': '200'}),
        ('dbapi_idempotent_replays_total', {'module': 'batch', 'action': ''}),
    )
    key = {**AUTH, 'Idempotency-Key': f'metrics-{os.getpid()}-{time.monotonic_ns()}'}
    for _ in range(3):
        assert post(client, '/probe/write_note', {'note': 'counted'}, headers=key).status_code == 200
    steps = [{'action': 'probe/write_note', 'body': {'note': 'step'}}] * 2 + [{'action': 'probe/returns_none'}]
    batch_key = {**AUTH, 'Idempotency-Key': f'metrics-batch-{os.getpid()}-{time.monotonic_ns()}'}
    for _ in range(2):
        assert post(client, '/batch', {'actions': steps}, headers=batch_key).status_code == 200
    assert post(client, '/batch', {'actions': []}).status_code == 422  # no step checked: no size
    assert deltas() == [3, 2, 2, 1, 1, 3, 2, 1, 1]  # the replayed batch ran no step
