"""The events' benchmark: what `emit` costs an action, and how fast the relay delivers.

    .venv/bin/python -m bench.events [--seconds 4] [--rounds 2] [--connections 8]

1. The app (gunicorn, production settings) serves `bench/upsert` and `bench/upsert_event`, the
   same upsert emitting one event; wrk alternates them, `--rounds` times each. Target: the upsert
   with its event at least 0.8x the upsert without (the means of the rounds).
2. The events those requests left in the outbox are delivered by the relay's own loop (claim,
   publish with confirms, mark, commit), timed from its first claim to the empty outbox; then the
   same messages are sent by a bare pika publisher with publisher confirms, in batches of the
   relay's size, each batch's confirms awaited before the next (SelectConnection: what pika offers
   that comes nearest the broker's limit). Both send to an exchange of the run's own, bound to a
   durable queue emptied between rounds, so the broker does the same work for both. Target: the
   relay at least 0.5x the bare publisher. A `BlockingChannel` publisher (one round trip per
   message) is shown for reference.
Both targets are ratios measured in the same run, on the same machine; the exit status is 1
when one fails.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pika
import psycopg2

from bench.database import PG, bench_database
from bench.servers import gunicorn_command, serve
from bench.service import PATHS, service_env
from bench.wrk import run_wrk
from lib.events.broker import Message
from lib.events.relay import Relay, Row

AMQP_URL = 'amqp://127.0.0.1:5672/%2F'
UPSERT_TARGET = 0.8
RELAY_TARGET = 0.5


def upserts(url: str, token: str, seconds: float, rounds: int, connections: int) -> dict[str, list[float]]:
    """Requests/s of each scenario, alternated round by round."""
    rates: dict[str, list[float]] = {'upsert': [], 'upsert_event': []}
    for scenario in rates:  # warm both: plans prepared, pools full
        run_wrk(url + PATHS[scenario], scenario, token, connections, 1, scenario, 'warm')
    for _ in range(rounds):
        for scenario, found in rates.items():
            measured = run_wrk(url + PATHS[scenario], scenario, token, connections, seconds, scenario, 'app')
            if measured.errors or measured.non2xx:
                raise RuntimeError(f'{scenario}: {measured.errors} errors, {measured.non2xx} non-2xx answers')
            found.append(measured.rps)
    return rates


class Exchange:
    """A topic exchange of the run's own and a durable queue bound to every key."""

    def __init__(self) -> None:
        self.name = f'dbapi.bench.{uuid.uuid4().hex[:8]}'
        with self.channel() as (_, channel):
            channel.exchange_declare(self.name, exchange_type='topic', durable=True)
            channel.queue_declare(self.name, durable=True)
            channel.queue_bind(self.name, self.name, routing_key='#')

    def channel(self) -> _Channel:
        return _Channel()

    def depth(self) -> int:
        with self.channel() as (_, channel):
            return int(channel.queue_declare(self.name, passive=True).method.message_count)

    def purge(self) -> None:
        with self.channel() as (_, channel):
            channel.queue_purge(self.name)

    def remove(self) -> None:
        with self.channel() as (_, channel):
            channel.queue_delete(self.name)
            channel.exchange_delete(self.name)


class _Channel:
    def __enter__(self) -> tuple[pika.BlockingConnection, Any]:
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        return self.connection, self.connection.channel()

    def __exit__(self, *_: object) -> None:
        self.connection.close()


def relay_rate(database: dict[str, object], exchange: str) -> tuple[float, int]:
    """Events/s of the relay's loop over the whole outbox, and how many it delivered."""
    relay = Relay(database, AMQP_URL, 'dbapi', 3600.0, exchange)
    relay.connect()
    try:
        started = time.perf_counter()
        count = 0
        while rows := relay.claim():
            count += relay.deliver(rows)
        elapsed = time.perf_counter() - started
    finally:
        relay.broker.close()
        relay.close_database()
    return count / elapsed, count


def outbox_messages(database: dict[str, object], exchange: str) -> list[Message]:
    """The messages the relay sent: the same bodies and properties, built once, untimed."""
    relay = Relay(database, AMQP_URL, 'dbapi', 3600.0, exchange)
    conn = psycopg2.connect(**database)
    try:
        with conn.cursor() as cursor:
            cursor.execute('SELECT seq, id::text, type, key, data::text, time FROM dbapi_outbox ORDER BY seq')
            return [relay.message(Row(*row)) for row in cursor.fetchall()]
    finally:
        conn.close()


def bare_rate(messages: Sequence[Message], exchange: str, batch: int) -> float:
    """Messages/s of plain pika: a SelectConnection in confirm mode, each batch's confirms
    awaited (an ack may cover several messages) before the next batch is sent."""
    outstanding: set[int] = set()
    state: dict[str, Any] = {'channel': None, 'sent': 0, 'started': 0.0}

    def send_batch() -> None:
        chunk = messages[state['sent'] : state['sent'] + batch]
        if not chunk:
            connection.ioloop.stop()
            return
        for message in chunk:
            state['channel'].basic_publish(exchange, message.routing_key, message.body, message.properties)
            state['sent'] += 1
            outstanding.add(state['sent'])  # delivery tags count from 1 on the channel

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Ack):
            raise RuntimeError('the broker refused a message')
        if method.multiple:
            outstanding.difference_update([tag for tag in outstanding if tag <= method.delivery_tag])
        else:
            outstanding.discard(method.delivery_tag)
        if not outstanding:
            send_batch()

    def start(_frame: Any) -> None:
        state['started'] = time.perf_counter()
        send_batch()

    def on_channel(channel: Any) -> None:
        state['channel'] = channel
        channel.confirm_delivery(on_confirm, callback=start)

    connection = pika.SelectConnection(
        pika.URLParameters(AMQP_URL),
        on_open_callback=lambda opened: opened.channel(on_open_callback=on_channel),
        on_close_callback=lambda *_: connection.ioloop.stop(),
    )
    connection.ioloop.start()
    elapsed = time.perf_counter() - state['started']
    connection.close()
    connection.ioloop.start()  # until closed: on_close stops it
    return len(messages) / elapsed


def blocking_rate(messages: Sequence[Message], exchange: str, limit: int) -> float:
    """Messages/s of pika's BlockingChannel in confirm mode: each publish waits for its confirm."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    chunk = messages[:limit]
    started = time.perf_counter()
    for message in chunk:
        channel.basic_publish(exchange, message.routing_key, message.body, message.properties)
    elapsed = time.perf_counter() - started
    connection.close()
    return len(chunk) / elapsed


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def verdict(ratio: float, target: float) -> str:
    return 'PASS' if ratio >= target else 'FAIL'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='the cost of emit and the relay against bare pika')
    parser.add_argument('--seconds', type=float, default=4.0, help='seconds per wrk measurement')
    parser.add_argument('--rounds', type=int, default=2, help='alternated rounds of each measurement')
    parser.add_argument('--connections', type=int, default=8)
    args = parser.parse_args(argv)
    for tool in ('wrk', 'pgbench'):
        if shutil.which(tool) is None:
            print(f'bench.events: {tool} is not installed (scripts/ensure_tools.sh)', file=sys.stderr)
            return 2
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix='dbapi-bench-events-') as tmp, bench_database() as dbname:
        log_dir = Path(tmp)
        env = service_env(dbname, token, log_dir, recycle=False)
        with serve('app', gunicorn_command('app:app'), env, log_dir, '/health/live') as server:
            rates = upserts(server.url, token, args.seconds, args.rounds, args.connections)
        database: dict[str, object] = {**PG, 'dbname': dbname}
        exchange = Exchange()
        try:
            messages = outbox_messages(database, exchange.name)
            relayed: list[float] = []
            bare: list[float] = []
            for _ in range(args.rounds):
                rate, count = relay_rate(database, exchange.name)
                if not count == len(messages) == exchange.depth():
                    raise RuntimeError(f'the relay delivered {count} of {len(messages)} events')
                relayed.append(rate)
                exchange.purge()
                bare.append(bare_rate(messages, exchange.name, Relay.batch))
                if exchange.depth() != len(messages):
                    raise RuntimeError('the bare publisher lost messages')
                exchange.purge()
                conn = psycopg2.connect(**database)
                with conn, conn.cursor() as cursor:  # every event undelivered again, for the next round
                    cursor.execute('UPDATE dbapi_outbox SET delivered_at = NULL')
                conn.close()
            blocking = blocking_rate(messages, exchange.name, min(len(messages), 5000))
        finally:
            exchange.remove()
    upsert, with_event = mean(rates['upsert']), mean(rates['upsert_event'])
    relay, publisher = mean(relayed), mean(bare)
    rows = [
        (
            'upsert emitting one event vs the same upsert',
            f'>= {UPSERT_TARGET}x',
            f'{with_event / upsert:.2f}x ({with_event:,.0f} / {upsert:,.0f} /s)',
            verdict(with_event / upsert, UPSERT_TARGET),
        ),
        (
            'relay delivered events/s vs bare pika with confirms',
            f'>= {RELAY_TARGET}x',
            f'{relay / publisher:.2f}x ({relay:,.0f} / {publisher:,.0f} /s, {len(messages):,} events)',
            verdict(relay / publisher, RELAY_TARGET),
        ),
        ('bare pika, BlockingChannel, a confirm per message', 'no target', f'{blocking:,.0f} /s', 'INFO'),
    ]
    print(f'bench.events: {args.rounds} alternated rounds, {args.seconds:g} s per wrk run, c={args.connections}')
    print('| target | wanted | measured | |')
    print('| --- | --- | --- | --- |')
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')
    print(
        'rounds: upsert '
        + ', '.join(f'{r:,.0f}' for r in rates['upsert'])
        + '; with event '
        + ', '.join(f'{r:,.0f}' for r in rates['upsert_event'])
        + '; relay '
        + ', '.join(f'{r:,.0f}' for r in relayed)
        + '; bare '
        + ', '.join(f'{r:,.0f}' for r in bare)
    )
    return 0 if all(row[3] != 'FAIL' for row in rows) else 1


if __name__ == '__main__':
    raise SystemExit(main())
