"""Watching the service from PostgreSQL's side: how many sessions it holds, and in what state.

The sessions of the service are the ones whose application_name is `dbapi:<worker pid>`
(lib/db.py names them so).
"""

from __future__ import annotations

import contextlib
import threading
from types import TracebackType
from typing import Any

import psycopg2

from tests.private_pg import PrivatePostgres

SERVICE_SESSIONS = "application_name LIKE 'dbapi:%'"


def service_sessions(pg: PrivatePostgres) -> list[dict[str, Any]]:
    rows = pg.query(
        f'SELECT pid, application_name, state, query FROM pg_stat_activity WHERE {SERVICE_SESSIONS}'  # noqa: S608
    )
    return [dict(zip(('pid', 'application_name', 'state', 'query'), row, strict=True)) for row in rows]


def idle_in_transaction(pg: PrivatePostgres) -> list[dict[str, Any]]:
    return [s for s in service_sessions(pg) if s['state'] and s['state'].startswith('idle in transaction')]


class SessionSampler:
    """Counts the service's sessions every `interval` seconds in a thread; keeps the peak.

    The database may be down for part of the time (that is the point of the fault tests):
    a failed sample is skipped and the next one reconnects.
    """

    def __init__(self, pg: PrivatePostgres, interval: float = 0.05) -> None:
        self.pg = pg
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='session-sampler', daemon=True)

    def __enter__(self) -> SessionSampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling, with one last sample: a short fault test may open and use its sessions
        between two ticks, and they are still there (idle in the pool) while the service runs."""
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(psycopg2.Error):
            self._record(self.pg.query(f'SELECT count(*) FROM pg_stat_activity WHERE {SERVICE_SESSIONS}')[0][0])  # noqa: S608

    def _record(self, count: int) -> None:
        self.samples += 1
        self.peak = max(self.peak, count)

    def _run(self) -> None:
        conn = None
        while not self._stop.wait(self.interval):
            try:
                if conn is None or conn.closed:
                    conn = self.pg.connect(timeout=1)
                with conn.cursor() as cursor:
                    cursor.execute(f'SELECT count(*) FROM pg_stat_activity WHERE {SERVICE_SESSIONS}')  # noqa: S608
                    count = cursor.fetchone()[0]
            except psycopg2.Error:
                with contextlib.suppress(psycopg2.Error, AttributeError):
                    conn.close()
                conn = None
                continue
            self._record(count)
        if conn is not None:
            conn.close()
