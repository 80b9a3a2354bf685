"""The events' fault run: 5,000 appends through nginx and 3 replicas from 16 writers, while two
relays (`flask --app app relay`, real processes) deliver them to a RabbitMQ node of the test's
own; one relay is SIGKILLed and another started, and the broker is stopped and started again
under the load. Afterwards, as a consumer that drops duplicates by id sees the queue:
every committed event arrived, nothing arrived for an uncommitted write, duplicates share an id
and a body, each stream's events are in commit order, and the service answered no 5xx.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests

from scripts.topology import ROOT, find_nginx, topology
from tests.amqp import Tap, wait_delivered
from tests.conftest import AUTH, MODULES, query, schema_database
from tests.private_rabbit import PrivateRabbit, private_rabbit
from tests.tools import require_tool

pytestmark = pytest.mark.slow

STREAM = 'tests.modules.stream'
APPENDS = 5000
WRITERS = 16
STREAMS = 32
REFUSE_EVERY = 10  # every 10th append is refused (409) after emitting: nothing of it may arrive
KILL_AT = 1000  # appends answered when relay A is SIGKILLed and relay C started
BROKER_DOWN_AT = 2000  # appends answered when the broker is stopped
WHILE_DOWN = 500  # appends answered while it is down, before it is started again


@dataclass
class Writers:
    """16 threads sharing APPENDS appends through nginx; each answer's status and time."""

    url: str
    gate: int = BROKER_DOWN_AT  # no append past it until `open_gate`: the broker is down by then
    next_index: int = 0
    statuses: list[tuple[int, int | None, float]] = field(default_factory=list)  # (index, status, when)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def take(self) -> int | None:
        with self.lock:
            self.lock.wait_for(lambda: self.next_index < self.gate or self.next_index >= APPENDS, timeout=120)
            if self.next_index >= APPENDS:
                return None
            self.next_index += 1
            return self.next_index - 1

    def open_gate(self) -> None:
        with self.lock:
            self.gate = APPENDS
            self.lock.notify_all()

    def write(self) -> None:
        session = requests.Session()
        session.headers.update(AUTH)
        while (index := self.take()) is not None:
            body = {'stream': f's{index % STREAMS}', 'fail': index % REFUSE_EVERY == 0}
            try:
                status: int | None = session.post(f'{self.url}/stream/append', json=body, timeout=30).status_code
            except requests.RequestException:
                status = None
            self.statuses.append((index, status, time.monotonic()))

    def answered(self) -> int:
        return len(self.statuses)

    def wait_answered(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.answered() < count:
            assert time.monotonic() < deadline, f'only {self.answered()} of {count} appends answered'
            time.sleep(0.01)


def start_relay(
    database: dict[str, Any], broker: PrivateRabbit, exchange: str, log_dir: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        'ENVIRONMENT': 'testing',
        'LOG_DIR': str(log_dir),
        'DEFAULT_DB_HOST': str(database['host']),
        'DEFAULT_DB_PORT': str(database['port']),
        'DEFAULT_DB_USER': str(database['user']),
        'DEFAULT_DB_NAME': str(database['dbname']),
        'EVENTS_AMQP_URL': broker.url,
        'EVENTS_METRICS_PORT': '0',
    }
    flask = Path(sys.executable).parent / 'flask'
    return subprocess.Popen(
        [str(flask), '--app', 'app', 'relay', '--exchange', exchange],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(log_dir / 'relays.stderr').open('ab'),
    )


@pytest.fixture
def events_database() -> Iterator[dict[str, Any]]:
    with schema_database('dbapi_events_faults', [*MODULES, STREAM]) as params:
        yield params


def test_every_committed_event_arrives_in_order_through_relay_and_broker_faults(
    events_database: dict[str, Any], tmp_path: Path
) -> None:
    require_tool(find_nginx(), 'nginx')
    log_dir = tmp_path / 'relays'
    log_dir.mkdir()
    target = f'app:create_app({{"MODULES": {[*MODULES, STREAM]!r}}})'
    env = {'ENVIRONMENT': 'testing', 'BEARER': AUTH['Authorization'].split()[1], 'APP_TARGET': target}
    relays: list[subprocess.Popen[bytes]] = []
    with private_rabbit() as broker, topology(3, events_database, tmp_path / 'topology', **env) as top:
        exchange = Tap(broker.url)
        exchange.declare()
        try:
            relays += [start_relay(events_database, broker, exchange.name, log_dir) for _ in range(2)]
            writers = Writers(top.url)
            threads = [threading.Thread(target=writers.write) for _ in range(WRITERS)]
            for thread in threads:
                thread.start()

            writers.wait_answered(KILL_AT)
            relays[0].send_signal(signal.SIGKILL)  # whatever it held unconfirmed is sent by another
            relays.append(start_relay(events_database, broker, exchange.name, log_dir))

            writers.wait_answered(BROKER_DOWN_AT)
            broker.stop()
            down_from = time.monotonic()
            writers.open_gate()
            writers.wait_answered(BROKER_DOWN_AT + WHILE_DOWN)
            down_until = time.monotonic()
            broker.start()

            for thread in threads:
                thread.join()
            wait_delivered(events_database, timeout=60)
            for relay in relays[1:]:  # SIGTERM: each finishes what it holds and exits cleanly
                relay.send_signal(signal.SIGTERM)
            assert [relay.wait(30) for relay in relays[1:]] == [0, 0]
            received = exchange.drain(lambda got: len(got) >= APPENDS - APPENDS // REFUSE_EVERY, timeout=60)
        finally:
            for relay in relays:
                if relay.poll() is None:
                    relay.kill()
                    relay.wait()
            exchange.remove()

    statuses = Counter(status for _, status, _ in writers.statuses)
    assert statuses == {200: APPENDS - APPENDS // REFUSE_EVERY, 409: APPENDS // REFUSE_EVERY}, statuses
    while_down = [status for _, status, when in writers.statuses if down_from <= when <= down_until]
    assert len(while_down) >= WHILE_DOWN and set(while_down) <= {200, 409}

    conn = psycopg2.connect(**events_database)
    try:
        committed = {
            str(event_id): (stream, n) for event_id, stream, n in query(conn, 'SELECT id, stream, n FROM stream_log')
        }
    finally:
        conn.close()
    assert len(committed) == APPENDS - APPENDS // REFUSE_EVERY

    bodies: dict[str, bytes] = {}
    first_arrivals: list[str] = []
    for message in received:
        assert bodies.setdefault(message.id, message.body) == message.body, 'a duplicate differs from the original'
        if len(bodies) > len(first_arrivals):
            first_arrivals.append(message.id)
    assert set(bodies) == set(committed), (
        f'committed, never arrived: {len(set(committed) - set(bodies))}; '
        f'arrived, never committed: {len(set(bodies) - set(committed))}'
    )
    by_stream: dict[str, list[int]] = {}
    for event_id in first_arrivals:
        stream, n = committed[event_id]
        by_stream.setdefault(stream, []).append(n)
    out_of_order = {stream: ns for stream, ns in by_stream.items() if ns != sorted(ns)}
    assert not out_of_order, out_of_order
    duplicates = len(received) - len(committed)
    print(f'events fault run: {len(received)} messages for {len(committed)} events ({duplicates} duplicates)')
