"""The relay: a long-running process (`flask --app app relay`) that delivers the committed events
of `dbapi_outbox` to RabbitMQ, at least once, one key's events in commit order, with one or more
relays running at once (docs/architecture.md, "Events").

One cycle, in one transaction on the relay's own connection:
1. claim: within WINDOW seqs of the oldest undelivered event, take the relay lock of each key
   that no other relay holds (`pg_try_advisory_xact_lock`), then the undelivered rows of those
   keys and the key-less ones, in `seq` order, `FOR UPDATE SKIP LOCKED`;
2. publish them to the exchange (persistent, publisher confirms) and wait for the confirms;
3. mark delivered the rows the broker confirmed, but for each key only up to its first
   unconfirmed row, and commit: the locks go with the commit.
A relay killed mid-cycle leaves its transaction to roll back: its rows are undelivered again and
another relay sends them (a duplicate of anything already published carries the same id).

When nothing is left it waits on LISTEN/NOTIFY (lib.events.outbox sends NOTIFY with the
commits), polls a few times in the LINGER after its last work, then makes at most one query a
second (an existence check, with the prune of delivered rows older than EVENTS_RETENTION every
PRUNE_EVERY seconds). A broker or a database that cannot be reached is tried again with capped
exponential backoff. SIGTERM or SIGINT: the cycle in hand is finished, then the relay exits.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pika
import psycopg2
import psycopg2.extensions
from psycopg2.extensions import connection as Connection

from lib.events import cloudevent
from lib.events.broker import PERSISTENT, Broker, BrokerError, Message
from lib.events.metrics import PUBLISH_FAILURES, PUBLISHED
from lib.events.outbox import CHANNEL, RELAY_LOCK_CLASS

log = logging.getLogger('dbapi.events')

BATCH = 500  # events per cycle at most
WINDOW = 2000  # seqs from the oldest undelivered event: what one claim reads, at most
IDLE_POLL = 1.0  # seconds between the idle relay's queries
LINGER = (0.02, 0.05, 0.1)  # polls after the last work: a commit that sent no NOTIFY is found at once
PRUNE_EVERY = 60.0  # seconds
PRUNE_BATCH = 10_000
CONFIRM_TIMEOUT = 30.0  # seconds to wait for a batch's confirms before the connection is dropped
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0  # seconds: the first retry, and the longest wait between two

CLAIM = """
BEGIN;
WITH window_end AS MATERIALIZED (
    SELECT min(seq) + %(window)s AS seq FROM dbapi_outbox WHERE delivered_at IS NULL
), held AS MATERIALIZED (
    SELECT lock FROM (
        SELECT DISTINCT key_lock AS lock FROM dbapi_outbox
        WHERE delivered_at IS NULL AND seq < (SELECT seq FROM window_end) AND key_lock IS NOT NULL
    ) AS keys
    WHERE pg_try_advisory_xact_lock(%(class)s, lock)
)
SELECT seq, id::text, type, key, data::text, time FROM dbapi_outbox
WHERE delivered_at IS NULL AND seq < (SELECT seq FROM window_end)
  AND (key_lock IS NULL OR key_lock IN (SELECT lock FROM held))
ORDER BY seq LIMIT %(batch)s
FOR UPDATE SKIP LOCKED
"""
# `delivered_at IS NULL` lets the planner use the partial index: without it, every mark scans
# the whole table, delivered rows of the retention included.
MARK = (
    'UPDATE dbapi_outbox SET delivered_at = clock_timestamp()'
    ' WHERE seq = ANY(%(seqs)s) AND delivered_at IS NULL; COMMIT'
)
# The idle poll: anything undelivered? With `prune`, delivered rows past the retention go first.
POLL = 'SELECT 0, EXISTS (SELECT 1 FROM dbapi_outbox WHERE delivered_at IS NULL)'
PRUNE_AND_POLL = """
WITH pruned AS (
    DELETE FROM dbapi_outbox WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM dbapi_outbox
        WHERE time < now() - make_interval(secs => %(retention)s)
          AND delivered_at < now() - make_interval(secs => %(retention)s)
        LIMIT %(batch)s FOR UPDATE SKIP LOCKED))
    RETURNING 1)
SELECT (SELECT count(*) FROM pruned), EXISTS (SELECT 1 FROM dbapi_outbox WHERE delivered_at IS NULL)
"""


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    id: str
    type: str
    key: str | None
    data: str
    time: Any  # datetime, aware


def delivered(rows: Sequence[Row], confirmed: Sequence[bool]) -> list[int]:
    """The seqs to mark delivered: the confirmed rows, except a key's rows after its first
    unconfirmed one (sent again later, they must not overtake it)."""
    blocked: set[str] = set()
    seqs = []
    for row, ok in zip(rows, confirmed, strict=True):
        if row.key is not None and row.key in blocked:
            continue
        if ok:
            seqs.append(row.seq)
        elif row.key is not None:
            blocked.add(row.key)
    return seqs


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: 0.1 s, 0.2 s, 0.4 s ... 5 s."""

    first: float = BACKOFF_FIRST
    most: float = BACKOFF_MAX
    failures: int = 0

    def next(self) -> float:
        delay = min(self.most, self.first * 2**self.failures)
        self.failures += 1
        return float(delay * (0.5 + random.random() / 2))  # noqa: S311  # nosec B311 - jitter, not a secret

    def reset(self) -> None:
        self.failures = 0


@dataclass
class Relay:
    """One relay process's state: its database connection, its broker connection, its loop."""

    database: Mapping[str, Any]  # libpq parameters of the database whose outbox it relays
    amqp_url: str
    source: str  # the CloudEvents `source`: the service's name
    retention: float  # seconds a delivered event is kept
    exchange: str = 'dbapi.events'
    batch: int = BATCH
    stopping: bool = False
    conn: Connection | None = None
    broker: Broker = field(init=False)
    backoff: Backoff = field(default_factory=Backoff)
    prune_at: float = 0.0
    linger: int = 0  # polls left before the relay waits for NOTIFY or the idle poll
    down: str | None = None  # what is unreachable, while it is (logged once per outage)

    def __post_init__(self) -> None:
        self.broker = Broker(self.amqp_url, self.exchange)

    # --- the process ----------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Finish the cycle in hand, then return from `run` (a signal handler, or another thread)."""
        self.stopping = True
        self.broker.stop_loop()

    def install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.on_signal)
            signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info('relay: %s: finishing the batch in hand, then exiting', signal.Signals(signum).name)
        self.stop()

    def run(self) -> None:
        """Relay until `stop`."""
        logging.getLogger('pika').setLevel(logging.WARNING)  # a line per connection step otherwise
        log.info('relay started: outbox of %s to exchange %r', self.database.get('dbname'), self.exchange)
        try:
            while not self.stopping:
                try:
                    self.connect()
                    self.cycle()
                except (psycopg2.Error, BrokerError) as error:
                    self.failed(error)
        finally:
            self.broker.close()
            self.close_database()
            log.info('relay stopped')

    def failed(self, error: Exception) -> None:
        """Drop what failed, say so once per outage, and wait before trying again."""
        what = 'database' if isinstance(error, psycopg2.Error) else 'broker'
        if isinstance(error, psycopg2.Error):
            self.close_database()
        else:
            self.broker.close()
        if self.down != what:
            log.warning('relay: the %s is unreachable, retrying with backoff: %s', what, str(error).strip())
            self.down = what
        self.broker.sleep(self.backoff.next(), lambda: self.stopping)

    def connect(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg2.connect(
                **self.database,
                application_name='dbapi-relay',
                connect_timeout=int(CONNECT_TIMEOUT),
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
            self.conn.autocommit = True
            with self.conn.cursor() as cursor:
                cursor.execute(f'LISTEN {CHANNEL}')
            self.linger = len(LINGER)  # events may have been committed while it was not listening
        if not self.broker.connected:
            self.broker.open(CONNECT_TIMEOUT)
        if self.down is not None:
            log.info('relay: the %s is back', self.down)
            self.down = None
        self.backoff.reset()

    def close_database(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            conn.close()

    # --- one cycle ----------------------------------------------------------------------------

    def cycle(self) -> int:
        """Deliver one batch, or wait for one; how many events were delivered."""
        rows = self.claim()
        if rows:
            count = self.deliver(rows)
            self.linger = len(LINGER)
            return count
        if not self.stopping:
            self.wait()
        return 0

    def claim(self) -> list[Row]:
        """The batch, claimed in an open transaction; [] with the transaction ended."""
        conn = self.database_conn()
        with conn.cursor() as cursor:
            cursor.execute(CLAIM, {'window': WINDOW, 'class': RELAY_LOCK_CLASS, 'batch': self.batch})
            rows = [Row(*found) for found in cursor.fetchall()]
            if not rows:
                cursor.execute('ROLLBACK')
        return rows

    def deliver(self, rows: list[Row]) -> int:
        """Publish the claimed rows, mark the confirmed ones and commit; how many were delivered."""
        conn = self.database_conn()
        try:
            confirmed = self.broker.publish([self.message(row) for row in rows], CONFIRM_TIMEOUT)
        except BrokerError:
            self.rollback(conn)
            raise
        seqs = delivered(rows, confirmed)
        with conn.cursor() as cursor:
            cursor.execute(MARK, {'seqs': seqs})
        by_type: dict[str, int] = {}
        marked = set(seqs)
        for row in rows:
            if row.seq in marked:
                by_type[row.type] = by_type.get(row.type, 0) + 1
        for type_, count in by_type.items():
            PUBLISHED.labels(type_).inc(count)
        if len(seqs) < len(rows):
            PUBLISH_FAILURES.inc(len(rows) - len(seqs))
            if not self.broker.connected:
                raise BrokerError(f'the broker went away: {len(rows) - len(seqs)} of {len(rows)} events to send again')
        return len(seqs)

    def message(self, row: Row) -> Message:
        properties = pika.BasicProperties(
            content_type=cloudevent.CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=row.id,
            type=row.type,
            app_id=self.source,
        )
        body = cloudevent.document(self.source, row.id, row.type, row.key, row.time, row.data)
        return Message(row.type, body, properties)

    def rollback(self, conn: Connection) -> None:
        if not conn.closed:
            with conn.cursor() as cursor:
                cursor.execute('ROLLBACK')

    def wait(self) -> None:
        """Until events may be there: a NOTIFY, a linger poll, or the idle poll finding some."""
        conn = self.database_conn()
        if conn.notifies:  # read with a claim's answer: a commit the claim may not have seen
            conn.notifies.clear()
            return
        if self.linger:
            delay = LINGER[len(LINGER) - self.linger]
            self.linger -= 1
            if self.broker.wait_readable(conn.fileno(), delay, lambda: self.stopping):
                self.notified(conn)
            return
        while not self.stopping:
            if self.broker.wait_readable(conn.fileno(), IDLE_POLL, lambda: self.stopping):
                self.notified(conn)
                return
            if self.poll(conn):
                return

    def notified(self, conn: Connection) -> None:
        conn.poll()
        conn.notifies.clear()

    def poll(self, conn: Connection) -> bool:
        """One query: whether anything is undelivered (pruning first when due)."""
        now = time.monotonic()
        with conn.cursor() as cursor:
            if now >= self.prune_at:
                cursor.execute(PRUNE_AND_POLL, {'retention': self.retention, 'batch': PRUNE_BATCH})
                pruned, pending = cursor.fetchone() or (0, False)
                if pruned < PRUNE_BATCH:
                    self.prune_at = now + PRUNE_EVERY
                if pruned:
                    log.info('relay: pruned %d delivered events older than %g s', pruned, self.retention)
            else:
                cursor.execute(POLL)
                _, pending = cursor.fetchone() or (0, False)
        return bool(pending)

    def database_conn(self) -> Connection:
        if self.conn is None or self.conn.closed:
            raise psycopg2.OperationalError('the relay has no database connection')
        return self.conn
