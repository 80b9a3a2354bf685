"""The pool's liveness check, connection lifetimes and idle limits, against real PostgreSQL."""

from __future__ import annotations

import os
import re
import resource
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from flask import Flask

from lib.core.config import ConfigError, load
from lib.db.connections import HeldTransaction, PooledConnection, release
from lib.db.pool import LIFETIME_JITTER, ConnectionPool, is_broken
from tests.conftest import MODULES, PG, admin_connection, make_app, query

PARAMS = dict(PG, dbname='postgres')  # the pool tests need no schema of their own
FD_SETSIZE = 1024  # select() cannot watch a descriptor at or above this
SHORT = 0.2  # seconds: a lifetime or idle limit the tests outwait
OUTWAIT = SHORT * 1.5


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)


def backend_pid(conn: psycopg2.extensions.connection) -> int:
    return conn.info.backend_pid


def make_pool(max_size: int = 1, **limits: float) -> ConnectionPool:
    return ConnectionPool('t', dict(PARAMS), max_size=max_size, timeout=1, **limits)


@pytest.fixture
def pool() -> Iterator[ConnectionPool]:
    """A one-connection pool with the default limits, closed after the test."""
    made = make_pool()
    yield made
    made.close()


@pytest.fixture
def many_open_files() -> Iterator[None]:
    """So many open descriptors that the next socket's is above FD_SETSIZE."""
    wanted = FD_SETSIZE + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted + 100:
        if hard != resource.RLIM_INFINITY and hard < wanted + 100:
            pytest.fail(f'RLIMIT_NOFILE hard limit {hard} is too low to open {wanted} files')
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted + 100, hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(wanted)]
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def terminate(pid: int) -> None:
    admin = admin_connection()
    try:
        # With a timeout, pg_terminate_backend returns only once the backend is really gone.
        assert query(admin, 'SELECT pg_terminate_backend(%s, 5000)', [pid]) == [(True,)]
    finally:
        admin.close()


def test_a_connection_above_fd_setsize_is_reused_and_its_termination_seen(many_open_files: None) -> None:
    pool = make_pool()
    try:
        conn = pool.getconn()
        assert conn.fileno() >= FD_SETSIZE, f'fd {conn.fileno()}: the test needs one at or above {FD_SETSIZE}'
        pid = backend_pid(conn)
        pool.putconn(conn)
        assert not is_broken(conn)
        again = pool.getconn()
        assert again is conn and backend_pid(again) == pid  # the same session, not a reconnect
        pool.putconn(again)

        terminate(pid)
        assert is_broken(conn)
        fresh = pool.getconn()
        assert fresh is not conn and conn.closed
        assert backend_pid(fresh) != pid and query(fresh, 'SELECT 1') == [(1,)]
        pool.putconn(fresh)
    finally:
        pool.close()


def test_a_connection_past_its_lifetime_is_replaced_when_borrowed() -> None:
    pool = make_pool(max_lifetime=SHORT)
    try:
        first = pool.getconn()
        pid = backend_pid(first)
        pool.putconn(first)
        assert not first.closed  # returned young: kept
        pause(OUTWAIT)
        second = pool.getconn()
        assert first.closed and second is not first and backend_pid(second) != pid
        assert pool.stats['open'] == 1
        pool.putconn(second)
    finally:
        pool.close()


def test_a_connection_past_its_lifetime_is_not_closed_while_borrowed_but_when_returned() -> None:
    pool = make_pool(max_size=2, max_lifetime=SHORT)
    try:
        held = pool.getconn()
        pid = backend_pid(held)
        pause(OUTWAIT)
        other = pool.getconn()  # the pool at work beside it does not touch the borrowed one
        pool.putconn(other)
        assert not held.closed and query(held, 'SELECT pg_backend_pid()') == [(pid,)]
        pool.putconn(held)
        assert held.closed  # retired on its way back
        replacement = pool.getconn()
        assert replacement is not held and backend_pid(replacement) != pid
        pool.putconn(replacement)
    finally:
        pool.close()


def test_a_connection_idle_past_max_idle_is_replaced_when_borrowed() -> None:
    pool = make_pool(max_idle=SHORT)
    try:
        first = pool.getconn()
        pid = backend_pid(first)
        pool.putconn(first)
        assert pool.getconn() is first  # idle a moment only: reused
        pool.putconn(first)
        pause(OUTWAIT)
        second = pool.getconn()
        assert first.closed and second is not first and backend_pid(second) != pid
        pool.putconn(second)
    finally:
        pool.close()


def test_the_oldest_idle_connection_is_closed_even_when_a_warmer_one_is_borrowed() -> None:
    pool = make_pool(max_size=2, max_idle=SHORT)
    try:
        stale, warm = pool.getconn(), pool.getconn()
        pool.putconn(stale)
        pause(OUTWAIT)
        pool.putconn(warm)
        assert pool.getconn() is warm
        assert stale.closed and pool.stats == {'open': 1, 'idle': 0, 'max': 2}
        pool.putconn(warm)
    finally:
        pool.close()


def test_lifetimes_are_jittered_within_ten_percent_below_max_lifetime() -> None:
    lifetime = 100.0
    pool = make_pool(max_size=8, max_lifetime=lifetime)
    conns = [pool.getconn() for _ in range(8)]
    try:
        lifetimes = [pool.lifetime(conn) for conn in conns]
        assert len(set(lifetimes)) > 1, lifetimes
        assert all(lifetime * (1 - LIFETIME_JITTER) <= each <= lifetime for each in lifetimes), lifetimes
    finally:
        for conn in conns:
            pool.putconn(conn)
        pool.close()


def test_a_connection_from_elsewhere_is_refused(pool: ConnectionPool) -> None:
    stranger = psycopg2.connect(**PARAMS)
    try:
        with pytest.raises(ValueError, match='was not opened by pool'):
            pool.putconn(stranger)
    finally:
        stranger.close()
    assert pool.stats['open'] == 0


@pytest.mark.parametrize('limit', ['max_lifetime', 'max_idle'])
def test_limits_must_be_positive(limit: str) -> None:
    with pytest.raises(ValueError, match=f'{limit}=0 must be more than 0'):
        make_pool(**{limit: 0})


@pytest.mark.parametrize(
    ('overrides', 'message'),
    [
        ({'POOL_MAX_LIFETIME': 'half an hour'}, "POOL_MAX_LIFETIME='half an hour'"),
        ({'POOL_MAX_LIFETIME': 0}, 'POOL_MAX_LIFETIME=0'),
        ({'POOL_MAX_IDLE': 'ten'}, "POOL_MAX_IDLE='ten'"),
        ({'POOL_MAX_IDLE': -1}, 'POOL_MAX_IDLE=-1'),
    ],
)
def test_bad_pool_limits_name_themselves(overrides: dict[str, Any], message: str) -> None:
    good_db = {'default': {'dbname': 'x', 'host': '127.0.0.1', 'port': '5432', 'user': 'postgres'}}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(overrides={'DATABASES': good_db, 'MODULES': MODULES, **overrides})


def test_the_apps_pools_get_the_configured_limits(database: dict[str, Any], log_dir: str) -> None:
    app: Flask = make_app(database, log_dir, POOL_MAX_LIFETIME='90', POOL_MAX_IDLE='30.5')
    pools = app.extensions['dbapi.pools']
    try:
        pool = pools.get('default')
        assert (pool.max_lifetime, pool.max_idle) == (90.0, 30.5)
    finally:
        pools.close()


@pytest.mark.parametrize('leaving', ['sql-begin', 'held-with-conn', 'psycopg2-transaction'])
def test_a_connection_returned_inside_a_transaction_comes_back_idle_and_reused(leaving: str) -> None:
    """Whoever began it: psycopg2 (autocommit off); SQL (lib.idempotency's own BEGIN, which
    psycopg2 never knew of); or an action's `with conn:` on a held autocommit connection, whose
    refused commit leaves psycopg2 believing in a transaction the server no longer has."""
    pool = ConnectionPool('t', dict(PARAMS, connection_factory=PooledConnection), max_size=1, timeout=1)
    try:
        conn = pool.getconn()
        pid = backend_pid(conn)
        conn.autocommit = leaving != 'psycopg2-transaction'
        with conn.cursor() as cursor:
            if leaving == 'sql-begin':
                cursor.execute('BEGIN; SELECT 1')
            elif leaving == 'held-with-conn':
                conn.held = True
                with pytest.raises(HeldTransaction), conn:
                    cursor.execute('SELECT 1')  # psycopg2 begins a transaction, even in autocommit
                cursor.execute('ROLLBACK')  # the server's ends; psycopg2's does not know
                release(conn)
                assert conn.status != psycopg2.extensions.STATUS_READY
            else:
                cursor.execute('SELECT 1')
        pool.putconn(conn)
        again = pool.getconn()
        assert again is conn and backend_pid(again) == pid  # reused, not replaced
        assert again.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert again.status == psycopg2.extensions.STATUS_READY
        again.autocommit = False  # psycopg2 agrees: no transaction it believes open
        pool.putconn(again)
    finally:
        pool.close()
