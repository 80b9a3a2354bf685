"""docs/events.md keeps its promises: its consumer runs as written against the real RabbitMQ and
drops a duplicate by its id, and its table of events is what the modules declare."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika
import psycopg2

from lib.events.outbox import DECLARED
from lib.server.cli import fields_text, schema_fields
from tests.amqp import AMQP_URL, blocking, relay_thread, tap, wait_delivered
from tests.conftest import AUTH, MODULES, make_app, query, schema_database

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / 'docs' / 'events.md').read_text(encoding='utf-8')


CONSUMER = '<!-- run by tests/test_events_docs.py -->'  # the marker before the consumer's block


def consumer_code() -> str:
    section = DOC[DOC.index('## Consuming events') :]
    start = section.index(f'{CONSUMER}\n```python\n') + len(f'{CONSUMER}\n```python\n')
    return section[start : section.index('```', start)]


def wait_for_queue(name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = blocking()
        try:
            conn.channel().queue_declare(name, passive=True)
            return
        except pika.exceptions.ChannelClosedByBroker:
            time.sleep(0.1)
        finally:
            if conn.is_open:
                conn.close()
    raise AssertionError(f'the consumer did not declare its queue {name} within {timeout:g} s')


def read_lines(stream: Any, count: int, timeout: float = 30.0) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count and time.monotonic() < deadline:
        line = stream.readline()
        if line:
            lines.append(line.strip())
    return lines


def test_the_consumer_applies_each_event_once_and_drops_a_duplicate_by_its_id(tmp_path: Path) -> None:
    """On a database of its own: the relay sends only this test's events."""
    with schema_database('dbapi_docs') as database:
        app = make_app(database, str(tmp_path / 'logs'), MODULES=MODULES)
        try:
            run_the_consumer(database, app.test_client(), tmp_path)
        finally:
            app.extensions['dbapi.pools'].close()


def run_the_consumer(database: dict[str, Any], client: Any, tmp_path: Path) -> None:
    script = tmp_path / 'consumer.py'
    script.write_text(consumer_code(), encoding='utf-8')
    queue = f'dbapi.test.consumer.{os.getpid()}.{time.monotonic_ns()}'
    with tap() as exchange:
        env = {
            **os.environ,
            'AMQP_URL': AMQP_URL,
            'EVENTS_EXCHANGE': exchange.name,
            'QUEUE': queue,
            'CONSUMER_DB': str(tmp_path / 'consumer.sqlite3'),
        }
        consumer = subprocess.Popen(
            [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for_queue(queue)
            with relay_thread(database, exchange.name):
                first = client.post('/example/bar', json={'name': 'docs-ada', 'email': 'old@example.com'}, headers=AUTH)
                second = client.post(
                    '/example/bar', json={'name': 'docs-ada', 'email': 'new@example.com'}, headers=AUTH
                )
                assert first.status_code == second.status_code == 200
                wait_delivered(database)
            replayed = query_outbox(database, 'docs-ada')[0][0]
            message = next(m for m in exchange.drain(lambda got: len(got) >= 2) if m.id == replayed)
            conn = blocking()  # the broker redelivering the first event: the same id and body
            conn.channel().basic_publish(exchange.name, message.routing_key, message.body, message.properties)
            conn.close()
            lines = read_lines(consumer.stdout, 3)
        finally:
            consumer.send_signal(signal.SIGINT)
            _, errors = consumer.communicate(timeout=30)
            cleanup = blocking()
            cleanup.channel().queue_delete(queue)
            cleanup.close()
    assert consumer.returncode == 0, errors
    ids = [row[0] for row in query_outbox(database, 'docs-ada')]
    assert lines == [
        f'applied user.saved {ids[0]}',
        f'applied user.saved {ids[1]}',
        f'duplicate dropped user.saved {ids[0]}',
    ]
    store = sqlite3.connect(tmp_path / 'consumer.sqlite3')
    assert store.execute('SELECT name, email FROM users').fetchall() == [('docs-ada', 'new@example.com')]
    store.close()


def query_outbox(database: dict[str, Any], key: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(**database)
    try:
        return [(str(row[0]),) for row in query(conn, 'SELECT id FROM dbapi_outbox WHERE key = %s ORDER BY seq', [key])]
    finally:
        conn.close()


def test_the_table_of_events_is_what_the_modules_declare() -> None:
    import modules.example  # noqa: F401 - declares its events

    rows = re.findall(r'^\| `([a-z0-9_.-]+)` \| (\w+) \| (.+) \|$', DOC, re.MULTILINE)
    declared = [event for event in DECLARED.values() if event.module == 'example']
    assert rows == [(event.type, event.module, fields_text(schema_fields(event.schema))) for event in declared]
