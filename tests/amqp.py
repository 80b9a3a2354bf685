"""The events tests' side of RabbitMQ (the machine's, at 127.0.0.1:5672): an exchange and a queue
of each test's own, removed after; a relay run in a thread; the outbox waited for."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import psycopg2
import pytest

from lib.events.relay import Relay
from tests.tools import in_ci

AMQP_URL = os.getenv('TEST_AMQP_URL', 'amqp://127.0.0.1:5672/%2F')


def blocking(url: str = AMQP_URL) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def require_broker(url: str = AMQP_URL) -> None:
    """RabbitMQ answers; without it a test fails under CI=true (.ci/run starts it), else skips."""
    try:
        blocking(url).close()
    except pika.exceptions.AMQPError as error:
        message = f'RabbitMQ is not reachable at {url.split("@")[-1]}: {error!r} (rabbitmq-server -detached starts it)'
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)  # never reached under CI: pytest.fail above raised


@dataclass(frozen=True)
class Received:
    routing_key: str
    properties: pika.BasicProperties
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document

    @property
    def id(self) -> str:
        return str(self.properties.message_id)


@dataclass
class Tap:
    """A topic exchange of the test's own and a durable queue bound to every routing key."""

    url: str = AMQP_URL
    name: str = field(default_factory=lambda: f'dbapi.test.{uuid.uuid4().hex[:12]}')

    def declare(self) -> None:
        conn = blocking(self.url)
        try:
            channel = conn.channel()
            channel.exchange_declare(self.name, exchange_type='topic', durable=True)
            channel.queue_declare(self.name, durable=True)
            channel.queue_bind(self.name, self.name, routing_key='#')
        finally:
            conn.close()

    def remove(self) -> None:
        with suppress(pika.exceptions.AMQPError):
            conn = blocking(self.url)
            try:
                channel = conn.channel()
                channel.queue_delete(self.name)
                channel.exchange_delete(self.name)
            finally:
                conn.close()

    def drain(self, enough: Callable[[list[Received]], bool], timeout: float = 30.0) -> list[Received]:
        """Every message in the queue, consumed until `enough(received)` and the queue stays
        empty for a moment, or `timeout` seconds."""
        received: list[Received] = []
        deadline = time.monotonic() + timeout
        conn = blocking(self.url)
        try:
            channel = conn.channel()
            for method, properties, body in channel.consume(self.name, auto_ack=True, inactivity_timeout=0.3):
                if method is not None:
                    received.append(Received(method.routing_key, properties, body))
                elif enough(received) or time.monotonic() > deadline:
                    break
            channel.cancel()
        finally:
            conn.close()
        return received


@contextmanager
def tap(url: str = AMQP_URL) -> Iterator[Tap]:
    require_broker(url)
    made = Tap(url)
    made.declare()
    try:
        yield made
    finally:
        made.remove()


@contextmanager
def relay_thread(database: dict[str, Any], exchange: str, url: str = AMQP_URL, **options: Any) -> Iterator[Relay]:
    """A relay running in a thread of this process, stopped (its batch finished) on the way out."""
    relay = Relay(database, url, 'dbapi', options.pop('retention', 3600.0), exchange, **options)
    thread = threading.Thread(target=relay.run, name='relay', daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(15)
        assert not thread.is_alive(), 'the relay did not stop within 15 s'


def undelivered(database: dict[str, Any]) -> int:
    conn = psycopg2.connect(**database)
    try:
        with conn.cursor() as cursor:
            cursor.execute('SELECT count(*) FROM dbapi_outbox WHERE delivered_at IS NULL')
            row = cursor.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


def wait_delivered(database: dict[str, Any], timeout: float = 30.0) -> None:
    """Until the outbox holds no undelivered event (the relays confirmed every one)."""
    deadline = time.monotonic() + timeout
    while (left := undelivered(database)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == 0, f'{left} events still undelivered after {timeout:g} s'
