"""Metrics with real processes: gunicorn's workers in multiprocess mode (recycled ones counted),
a real Prometheus scraping the one-machine topology's replicas, and promtool on the alert rules.

Prometheus and promtool are Debian's `prometheus` package (scripts/ensure_tools.sh installs it);
under CI=true a missing one fails instead of skipping.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from scripts.topology import Topology, find_nginx, free_port, topology
from tests.conftest import AUTH, MODULES, schema_database
from tests.service import Service, running_service
from tests.tools import require_tool

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / 'deploy' / 'prometheus'
APP_TARGET = f'app:create_app({{"MODULES": {MODULES!r}}})'
# What the tests send, by (path, token): the status each answers, and how many of each.
SENT = {
    ('/probe/returns_none', True): (200, 13),
    ('/probe/add_item', True): (422, 4),  # an empty body fails validation
    ('/probe/no_such_action', True): (404, 3),
    ('/probe/returns_none', False): (401, 3),
    ('/probe/crash', True): (500, 2),
    ('/probe/divide_by_zero', True): (400, 2),
}
TOTAL = sum(count for _, count in SENT.values())


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next((path for path in (f'/usr/bin/{name}',) if Path(path).exists()), None)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """`check()`'s first true value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f'{what}: not within {timeout:g} s (last: {found!r})')
        time.sleep(0.2)


def send_known_requests(url: str) -> Counter[str]:
    """Every request of SENT, interleaved; the statuses answered."""
    statuses: Counter[str] = Counter()
    session = requests.Session()
    plan = [(path, token) for (path, token), (_, count) in SENT.items() for _ in range(count)]
    for index in range(len(plan)):
        path, token = plan[(index * 7) % len(plan)]  # 7 is prime to the total: every request once
        headers = AUTH if token else {}
        response = session.post(f'{url}{path}', json={}, headers=headers, timeout=30)
        statuses[str(response.status_code)] += 1
    assert statuses == Counter({str(status): count for status, count in SENT.values()}), statuses
    return statuses


def scraped(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = requests.get(f'{url}/metrics', timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def by_status(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (name, labels), value in samples.items():
        if name == 'dbapi_requests_total':
            counts[dict(labels)['status']] += int(value)
    return counts


@pytest.fixture(scope='module')
def metrics_database() -> Iterator[dict[str, Any]]:
    with schema_database('dbapi_metrics') as params:
        yield params


def test_every_scrape_sums_every_worker_recycled_ones_included(
    metrics_database: dict[str, Any], tmp_path: Path
) -> None:
    env = {'WEB_CONCURRENCY': '3', 'MAX_REQUESTS': '5', 'MAX_REQUESTS_JITTER': '0', 'POOL_SIZE': '2'}
    with running_service(metrics_database, str(tmp_path), **env) as service:
        first_workers = set(service.worker_pids())
        statuses = send_known_requests(service.url)
        assert first_workers - set(service.worker_pids()), 'no worker was recycled'
        # A live worker adds its counts to the files every second (a recycled one as it exits).
        wait_for(lambda: by_status(scraped(service.url)) == statuses, 30, 'every request counted')
        for _ in range(5):  # each scrape is answered by any worker, and counts as a request of its own
            samples = scraped(service.url)
            assert by_status(samples) == statuses
            timed = sum(value for (name, _), value in samples.items() if name == 'dbapi_request_duration_seconds_count')
            assert timed == TOTAL
        assert_replica_series(service, samples)


def assert_replica_series(service: Service, samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
    """The replica's processes by pid, one build, the live workers' pool sizes."""
    pids = {dict(labels)['pid'] for name, labels in samples if name == 'process_resident_memory_bytes'}
    assert str(service.process.pid) in pids and len(pids) >= 2, pids
    assert [name for name, _ in samples].count('dbapi_build_info') == 1

    def pool_size() -> float:
        size = scraped(service.url).get(('dbapi_pool_size', frozenset({('database', 'default')})))
        return size == 3 * 2 and size  # three live workers, two connections each; dead ones left the sum

    wait_for(pool_size, 30, 'the pool size of three live workers')


def promtool() -> str:
    return require_tool(find_binary('promtool'), "promtool (Debian's prometheus package)")


def test_promtool_checks_the_rules_and_the_stacks_configuration() -> None:
    for command in (['check', 'rules', 'alerts.yml'], ['check', 'config', 'prometheus.yml']):
        done = subprocess.run([promtool(), *command], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_the_alerts() -> None:
    done = subprocess.run(
        [promtool(), 'test', 'rules', 'alerts.test.yml'], cwd=DEPLOY, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r'alertname: (\w+)', (DEPLOY / 'alerts.test.yml').read_text()))
    defined = set(re.findall(r'- alert: (\w+)', (DEPLOY / 'alerts.yml').read_text()))
    assert tested == defined and len(defined) == 6


class Prometheus:
    """Debian's Prometheus scraping `targets` every second, its storage under `directory`."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        self.binary = require_tool(find_binary('prometheus'), "Prometheus (Debian's prometheus package)")
        self.directory = directory
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        shutil.copy(DEPLOY / 'alerts.yml', directory / 'alerts.yml')
        config = {
            'global': {'scrape_interval': '1s', 'evaluation_interval': '1s'},
            'rule_files': ['alerts.yml'],
            'scrape_configs': [{'job_name': 'dbapi', 'static_configs': [{'targets': targets}]}],
        }
        (directory / 'prometheus.yml').write_text(json.dumps(config))  # JSON is YAML
        self.log = directory / 'prometheus.log'
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            self.binary,
            f'--config.file={self.directory / "prometheus.yml"}',
            f'--storage.tsdb.path={self.directory / "data"}',
            f'--web.listen-address=127.0.0.1:{self.port}',
        ]
        with self.log.open('ab') as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for(self.ready, 60, f'Prometheus ready on {self.url}')

    def ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            return requests.get(f'{self.url}/-/ready', timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = requests.get(f'{self.url}/api/v1/query', params={'query': promql}, timeout=10)
        body = response.json()
        assert body['status'] == 'success', (promql, body)
        result: list[dict[str, Any]] = body['data']['result']
        return result

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope='module')
def prometheus_top(metrics_database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require_tool(find_nginx(), 'nginx')
    workdir = tmp_path_factory.mktemp('prometheus-topology')
    env = {'ENVIRONMENT': 'testing', 'BEARER': AUTH['Authorization'].split()[1], 'APP_TARGET': APP_TARGET}
    with topology(2, metrics_database, workdir, **env) as running:
        yield running


@pytest.fixture
def prometheus(prometheus_top: Topology, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, [f'127.0.0.1:{replica.port}' for replica in prometheus_top.replicas])
    try:
        server.start()
        yield server
    finally:
        server.stop()


def scalar(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]['value'][1]) if result else None


def test_a_real_prometheus_counts_every_request_sent_through_nginx(
    prometheus_top: Topology, prometheus: Prometheus
) -> None:
    statuses = send_known_requests(prometheus_top.url)
    wait_for(
        lambda: scalar(prometheus.query('sum(dbapi_requests_total)')) == TOTAL,
        60,
        f'sum(dbapi_requests_total) == {TOTAL}',
    )
    per_status = prometheus.query('sum by (status) (dbapi_requests_total)')
    assert {row['metric']['status']: int(float(row['value'][1])) for row in per_status} == statuses
    up = prometheus.query('up{job="dbapi"}')
    assert len(up) == len(prometheus_top.replicas) and all(row['value'][1] == '1' for row in up), up
    served = prometheus.query('count(count by (instance) (dbapi_requests_total))')
    assert scalar(served) == len(prometheus_top.replicas)  # nginx spread the requests over both


def test_the_rules_load_and_every_dashboard_query_is_valid_promql(prometheus: Prometheus) -> None:
    rules = requests.get(f'{prometheus.url}/api/v1/rules', timeout=10).json()['data']['groups']
    assert {rule['name'] for group in rules for rule in group['rules']} >= {
        'DbapiHighErrorRatio',
        'DbapiSlowAction',
        'DbapiPoolTimeouts',
        'DbapiReplicaDown',
        'DbapiNotScraped',
    }
    dashboard = json.loads((DEPLOY / 'grafana-dashboard.json').read_text())
    expressions = [target['expr'] for panel in dashboard['panels'] for target in panel['targets']]
    assert len(expressions) >= 10
    for expression in expressions:
        prometheus.query(expression.replace('$__rate_interval', '1m'))  # asserts status success
    series = set(re.findall(r'\b(dbapi_[a-z_]+?)(?:_bucket|_count|_sum)?\b', ' '.join(expressions)))
    assert series <= {
        'dbapi_requests_total',
        'dbapi_request_duration_seconds',
        'dbapi_pool_connections',
        'dbapi_pool_size',
        'dbapi_pool_wait_seconds',
        'dbapi_pool_timeouts_total',
        'dbapi_db_errors_total',
        'dbapi_build_info',
    }, series
