"""The benchmark's watch on database sessions: the peak of the measured server's, at little cost."""

from __future__ import annotations

import time

import psycopg2
import pytest

from bench import database as bench_database
from bench.database import ConnectionWatch
from scripts.topology import wait_until


@pytest.fixture
def sessions(database):
    """Open sessions named as the pool names them: `sessions('dbapi:1', ...)`."""
    opened = []

    def open_sessions(*names: str) -> None:
        opened.extend(psycopg2.connect(**database, application_name=name) for name in names)

    yield open_sessions
    for conn in opened:
        conn.close()


@pytest.fixture
def watch(database, monkeypatch):
    monkeypatch.setattr(bench_database, 'PG', {key: database[key] for key in ('host', 'port', 'user')})
    return ConnectionWatch(database['dbname'])


def test_the_peak_counts_only_the_watched_workers_sessions(watch, sessions):
    workers = [101, 102]
    watch.watch(lambda: workers)
    sessions('dbapi:101', 'dbapi:102', 'dbapi:999')  # 999: another server's worker
    with watch:
        wait_until(lambda: watch.peak >= 2, 5, 'the watch did not see both sessions')
        time.sleep(0.3)  # about 15 more polls
    assert watch.peak == 2


def test_the_workers_are_looked_up_again_only_when_an_unknown_session_appears(watch, sessions):
    workers = [201, 202]
    watch.watch(lambda: workers)
    sessions('dbapi:201')
    with watch:
        wait_until(lambda: watch.peak == 1, 5, 'the watch did not see the session')
        time.sleep(0.5)  # ~25 polls of known sessions: no lookup
        assert watch.lookups == 1
        workers.append(203)  # a recycled worker, say: found at the next lookup
        sessions('dbapi:202', 'dbapi:203')
        wait_until(lambda: watch.peak == 3, 5, "the watch did not see the new worker's session")
    assert watch.peak == 3
    assert watch.lookups == 2
