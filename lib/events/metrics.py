"""The events' series, and which process serves each.

- The API (`GET /metrics` of every replica) serves `dbapi_outbox_pending` and
  `dbapi_outbox_oldest_age_seconds`, read from the database at each scrape (`OutboxCollector`):
  they must be there when no relay runs, which is when they matter most. Every replica answers
  the same figures: aggregate them with `max`, never `sum`.
- Each relay serves `dbapi_events_published_total{type}` and
  `dbapi_events_publish_failures_total` on its own port (EVENTS_METRICS_PORT): only the process
  that publishes knows them. They live in `RELAY_REGISTRY`, not in the API's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import psycopg2
import psycopg2.errors
from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg2.extensions import cursor as PlainCursor

from lib.db.pool import ConnectionPool

log = logging.getLogger('dbapi.events')

RELAY_REGISTRY = CollectorRegistry()
PUBLISHED = Counter(
    'dbapi_events_published_total',
    'Events the broker confirmed, by type (a duplicate sent after a failure counts again)',
    ['type'],
    registry=RELAY_REGISTRY,
)
PUBLISH_FAILURES = Counter(
    'dbapi_events_publish_failures_total',
    'Events published but not confirmed (nacked, or the connection failed first): sent again later',
    registry=RELAY_REGISTRY,
)
ProcessCollector(registry=RELAY_REGISTRY)

PENDING = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(time)), 0)::float8
FROM dbapi_outbox WHERE delivered_at IS NULL
"""
SCRAPE_TIMEOUT = 1.0  # seconds a scrape waits for a pooled connection


class OutboxCollector(Collector):
    """Each database's undelivered events and the age of the oldest, at scrape time; a database
    without the table (dbapi's SQL not applied there) or out of reach is left out."""

    def __init__(self, pools: Callable[[], Iterable[ConnectionPool]]) -> None:
        self.pools = pools  # this process's pools, found at scrape time (they are made after the fork)
        self.warned: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        pending = GaugeMetricFamily(
            'dbapi_outbox_pending', 'Events committed but not yet confirmed by the broker', labels=['database']
        )
        oldest = GaugeMetricFamily(
            'dbapi_outbox_oldest_age_seconds',
            'Seconds since the oldest undelivered event was committed (0: none)',
            labels=['database'],
        )
        for pool in self.pools():
            found = self.read(pool)
            if found is not None:
                pending.add_metric([pool.name], found[0])
                oldest.add_metric([pool.name], found[1])
        return [pending, oldest]

    def read(self, pool: ConnectionPool) -> tuple[int, float] | None:
        try:
            with pool.connection(SCRAPE_TIMEOUT) as conn:
                conn.autocommit = True
                with conn.cursor(cursor_factory=PlainCursor) as cursor:
                    cursor.execute(PENDING)
                    row = cursor.fetchone()
        except psycopg2.errors.UndefinedTable:
            return None
        except psycopg2.Error as error:
            if pool.name not in self.warned:
                self.warned.add(pool.name)
                log.warning('outbox of database %r not read for /metrics: %s', pool.name, str(error).strip())
            return None
        self.warned.discard(pool.name)
        return (int(row[0]), float(row[1])) if row else (0, 0.0)
