"""The benchmark's own database (pgbench's 1,000,000 accounts), and a watch on its connections."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import psycopg2
from psycopg2 import sql

from bench.servers import REPO, VENV_BIN

PG = {
    'host': os.getenv('BENCH_PG_HOST', '127.0.0.1'),
    'port': int(os.getenv('BENCH_PG_PORT', '5432')),
    'user': os.getenv('BENCH_PG_USER', 'postgres'),
}
SCALE = 10  # pgbench's 100,000 accounts per unit
POLL_SECONDS = 0.02
# Finding a server's workers scans every process in /proc (psutil, ~1.4 ms of CPU): done again
# only when a session of an unknown process shows up, and then at most this often.
RESOLVE_SECONDS = 1.0


def admin() -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dbname='postgres', connect_timeout=5, **PG)
    conn.autocommit = True
    return conn


def execute(query: sql.Composable) -> None:
    conn = admin()
    try:
        with conn.cursor() as cursor:
            cursor.execute(query)
    finally:
        conn.close()


@contextmanager
def bench_database() -> Iterator[str]:
    """A fresh database for this run (server-side generation takes seconds), dropped at the end.

    A new one every run keeps runs alike (the upserts change balances) and lets a CI
    `--quick` run beside a full one without either seeing the other's writes.
    """
    name = f'dbapi_bench_{uuid.uuid4().hex[:8]}'
    execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(name)))
    try:
        initialise(name)
        yield name
    finally:
        execute(sql.SQL('DROP DATABASE IF EXISTS {} WITH (FORCE)').format(sql.Identifier(name)))


def initialise(name: str) -> None:
    command = ['pgbench', '-h', PG['host'], '-p', str(PG['port']), '-U', PG['user']]
    command += ['-i', '-s', str(SCALE), '-I', 'dtGvp', '-q', name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f'pgbench -i -s {SCALE} {name} exited {done.returncode}: {done.stderr.strip()}')
    apply_dbapi_sql(name)


def apply_dbapi_sql(name: str) -> None:
    """dbapi's own migrations (dbapi_idempotency, for Idempotency-Key) and the served modules',
    applied by `flask --app app migrate` as a deployment applies them. A process of its own:
    bench.micro sets the settings for its own app after this runs."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(('_DB_NAME', '_DB_HOST', '_DB_PORT', '_DB_USER'))}
    env.update(
        DEFAULT_DB_NAME=name,
        DEFAULT_DB_HOST=PG['host'],
        DEFAULT_DB_PORT=str(PG['port']),
        DEFAULT_DB_USER=PG['user'],
        EXTRA_MODULES='modules.bench',
    )
    command = [str(VENV_BIN / 'flask'), '--app', 'app', 'migrate']
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f'flask --app app migrate on {name} exited {done.returncode}: {done.stderr.strip()}')


def stored_keys(name: str) -> int:
    """How many Idempotency-Key answers the database holds."""
    conn = psycopg2.connect(dbname=name, connect_timeout=5, **PG)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute('SELECT count(*) FROM dbapi_idempotency')
            (count,) = cursor.fetchone()
            return int(count)
    finally:
        conn.close()


class ConnectionWatch:
    """Polls pg_stat_activity for the sessions of one server's workers (by pid); keeps the peak.

    The pool names each session `dbapi:<pid>`, so only the measured server's count, not the
    sessions of a candidate server measured beside it. The workers are looked up when a
    session names a process not yet known, not at every poll: done 50 times a second, the
    lookup alone took ~7% of a core from the machine under test.
    """

    QUERY = "SELECT application_name FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'dbapi:%%'"

    def __init__(self, dbname: str) -> None:
        self.dbname = dbname
        self.peak = 0
        self.pids: Callable[[], Iterable[int]] = list
        self.lookups = 0  # how often the workers were looked up
        self._known: frozenset[str] = frozenset()
        self._resolved_at = float('-inf')
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name='pg-connections', daemon=True)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, pids: Callable[[], Iterable[int]]) -> None:
        """Count the sessions of the processes `pids()` names (looked up again as they change)."""
        self.pids = pids
        self._resolved_at = float('-inf')  # the next unknown name is looked up at once

    def count(self, names: Iterable[str]) -> int:
        """How many of these session names belong to the watched server's workers."""
        names = list(names)
        stale = time.monotonic() - self._resolved_at >= RESOLVE_SECONDS
        if stale and not self._known.issuperset(names):
            self._known = frozenset(f'dbapi:{pid}' for pid in self.pids())
            self._resolved_at = time.monotonic()
            self.lookups += 1
        return sum(1 for name in names if name in self._known)

    def _poll(self) -> None:
        conn = admin()
        try:
            with conn.cursor() as cursor:
                while not self._stop.wait(POLL_SECONDS):
                    cursor.execute(self.QUERY, (self.dbname,))
                    self.peak = max(self.peak, self.count(name for (name,) in cursor.fetchall()))
        finally:
            conn.close()
