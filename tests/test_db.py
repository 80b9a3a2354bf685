"""The database layer: Db helpers one by one, transactions, the pool, concurrency and recovery."""

from __future__ import annotations

import datetime
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from lib.db.connections import connection, pools, transactional
from lib.db.pool import ConnectionPool, PoolTimeout
from lib.db.sql import Db
from tests.conftest import AUTH, make_app, query


@pytest.fixture
def helper_db(database, db):
    """A Db over a fresh connection, with its own table."""
    query(db, 'DROP TABLE IF EXISTS helper_t; CREATE TABLE helper_t (k text PRIMARY KEY, v integer, at date)')
    conn = psycopg2.connect(**database)
    conn.autocommit = True
    yield Db(conn)
    conn.close()


def test_insert_one_and_many(helper_db, db):
    assert helper_db.insert('helper_t', {'k': 'a', 'v': 1}) == [{'k': 'a', 'v': 1, 'at': None}]
    rows = helper_db.insert('helper_t', [{'k': 'b', 'v': 2}, {'k': 'c', 'v': 3}])
    assert [r['k'] for r in rows] == ['b', 'c']
    assert query(db, 'SELECT count(*) FROM helper_t') == [(3,)]
    with pytest.raises(ValueError, match='every row needs the columns'):
        helper_db.insert('helper_t', [{'k': 'd'}, {'v': 4}])


def test_select_update_delete(helper_db):
    helper_db.insert('helper_t', [{'k': 'a', 'v': 1}, {'k': 'b', 'v': 1}])
    assert len(helper_db.select('helper_t')) == 2
    assert helper_db.select('helper_t', {'k': 'a'}) == [{'k': 'a', 'v': 1, 'at': None}]
    assert helper_db.update('helper_t', {'v': 5, 'at': datetime.date(2024, 1, 2)}, {'k': 'a'}) == 1
    assert helper_db.select('helper_t', {'k': 'a'})[0]['at'] == datetime.date(2024, 1, 2)
    assert helper_db.delete('helper_t', {'v': 1}) == 1
    with pytest.raises(ValueError, match='refusing'):
        helper_db.delete('helper_t', {})
    with pytest.raises(ValueError, match='refusing'):
        helper_db.update('helper_t', {'v': 1}, {})


def test_fetch_helpers(helper_db):
    helper_db.insert('helper_t', {'k': 'a', 'v': 7})
    assert helper_db.fetch_one('SELECT v FROM helper_t WHERE k = %(k)s', {'k': 'a'}) == 7
    assert helper_db.fetch_one('SELECT v FROM helper_t WHERE k = %(k)s', {'k': 'zz'}) is None
    assert helper_db.fetch_row('SELECT k, v FROM helper_t') == {'k': 'a', 'v': 7}
    assert helper_db.fetch_all('SELECT k FROM helper_t') == [{'k': 'a'}]
    assert helper_db.execute('UPDATE helper_t SET v = v + 1') == 1


def test_upsert_inserts_then_updates(helper_db):
    assert helper_db.upsert('helper_t', {'v': 1}, {'k': 'u'}) == {'k': 'u', 'v': 1, 'at': None}
    assert helper_db.upsert('helper_t', {'v': 2}, {'k': 'u'})['v'] == 2
    assert helper_db.upsert('helper_t', {}, {'k': 'u'})['v'] == 2
    assert len(helper_db.select('helper_t')) == 1


def test_stored_functions(helper_db):
    assert helper_db.sp_fetch_one('probe_double', [21]) == 42
    assert helper_db.sp_fetch_one('public.probe_double', {'n': 4}) == 8
    assert helper_db.sp_fetch_all('probe_series', [3]) == [{'i': 1, 'sq': 1}, {'i': 2, 'sq': 4}, {'i': 3, 'sq': 9}]


def test_schema_qualified_table(helper_db):
    helper_db.insert('public.helper_t', {'k': 'q', 'v': 1})
    assert helper_db.select('public.helper_t', {'k': 'q'})[0]['v'] == 1


def test_hostile_identifiers_and_values_run_only_the_intended_statement(helper_db, db):
    query(db, 'DROP TABLE IF EXISTS canary; CREATE TABLE canary (x int)')
    hostile = 'x"; DROP TABLE canary; --'
    query(db, 'DROP TABLE IF EXISTS "weird%s""t"; CREATE TABLE "weird%s""t" (k text, "a%s"" b" text)')
    row = helper_db.insert('weird%s"t', {'k': hostile, 'a%s" b': "'); DROP TABLE canary; --"})[0]
    assert row == {'k': hostile, 'a%s" b': "'); DROP TABLE canary; --"}
    assert helper_db.select('weird%s"t', {'a%s" b': "'); DROP TABLE canary; --"}) == [row]
    with pytest.raises(psycopg2.errors.UndefinedTable):
        helper_db.select(hostile)
    with pytest.raises(psycopg2.errors.UndefinedColumn):
        helper_db.select('helper_t', {hostile: 1})
    assert query(db, "SELECT to_regclass('canary') IS NOT NULL") == [(True,)]


def test_transactional_commits_or_rolls_back(database, db):
    query(db, 'DROP TABLE IF EXISTS tx_t; CREATE TABLE tx_t (v int)')
    conn = psycopg2.connect(**database)
    with transactional(conn) as tx:
        tx.insert('tx_t', {'v': 1})
    with pytest.raises(RuntimeError), transactional(conn) as tx:
        tx.insert('tx_t', {'v': 2})
        raise RuntimeError('roll back')
    assert query(db, 'SELECT v FROM tx_t') == [(1,)]
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    conn.close()


def test_concurrent_upserts_of_one_key_leave_one_row(database, db):
    query(db, 'DROP TABLE IF EXISTS race_t; CREATE TABLE race_t (k text PRIMARY KEY, n int)')
    barrier = threading.Barrier(50)

    def upsert(n: int) -> dict:
        conn = psycopg2.connect(**database)
        try:
            barrier.wait()
            with transactional(conn) as tx:
                return tx.upsert('race_t', {'n': n}, {'k': 'same'})
        finally:
            conn.close()

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(upsert, range(50)))
    assert len(results) == 50
    assert query(db, 'SELECT count(*) FROM race_t') == [(1,)]


def test_connection_goes_back_clean_after_error(app, database, db):
    client = app.test_client()
    client.post('/probe/write_then_fail', json={'note': 'x'}, headers=AUTH)
    client.post('/probe/divide_by_zero', headers=AUTH)
    stats = app.extensions['dbapi.pools'].stats()['default']
    assert stats['open'] == stats['idle']  # nothing checked out
    idle_in_tx = query(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
        [database['dbname']],
    )
    assert idle_in_tx == [(0,)]


def test_pooled_connections_decode_non_ascii_names_status_values_and_messages(app):
    with app.app_context(), connection('default', named=False) as conn, conn.cursor() as cursor:
        cursor.execute('SELECT 2 AS "ünïcode", %(text)s::text AS "naïve"', {'text': 'ß'})
        description, status, rows = cursor.description, cursor.statusmessage, cursor.fetchall()
        assert ([column.name for column in description], status, rows) == (['ünïcode', 'naïve'], 'SELECT 1', [(2, 'ß')])
        with pytest.raises(psycopg2.errors.DivisionByZero) as raised:
            cursor.execute('SELECT 1 / 0 AS "ü"')
        assert raised.value.pgerror.startswith('ERROR:  division by zero')
        cursor.execute("DO $$ BEGIN RAISE NOTICE 'héllo wörld'; END $$")
        assert conn.notices[-1] == 'NOTICE:  héllo wörld\n'
    assert conn.encoding == 'UTF8'


def test_pools_outside_an_app_context_is_a_clear_error(app):
    with pytest.raises(RuntimeError, match='needs a request or an app context'):
        pools()
    with app.app_context():
        assert pools() is app.extensions['dbapi.pools']


def test_forgotten_connection_goes_back_when_the_request_ends(database, log_dir):
    app = make_app(database, log_dir, POOL_SIZE=2, POOL_TIMEOUT=0.5)
    client = app.test_client()
    pids = {client.post('/probe/leak', headers=AUTH).get_json() for _ in range(20)}
    assert len(pids) <= 2  # the same connections, reused: the pool was never drained
    stats = app.extensions['dbapi.pools'].stats()['default']
    assert stats['open'] == stats['idle']
    app.extensions['dbapi.pools'].close()


def test_connections_are_pooled_not_opened_per_call(database, log_dir, db):
    app = make_app(database, log_dir, POOL_SIZE=3)
    client = app.test_client()
    for i in range(30):
        assert client.post('/example/bar', json={'name': f'pool{i}'}, headers=AUTH).status_code == 200
    backends = query(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'dbapi:%%'",
        [database['dbname']],
    )[0][0]
    assert 1 <= backends <= 3
    app.extensions['dbapi.pools'].close()


def test_pool_recovers_after_backends_are_terminated(app, database, db):
    client = app.test_client()
    first = client.post('/probe/backend_pid', headers=AUTH).get_json()
    # With a timeout, pg_terminate_backend returns only once the backends are really gone.
    query(
        db,
        'SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()',
        [database['dbname']],
    )
    response = client.post('/probe/backend_pid', headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() != first


def test_pool_is_bounded_and_times_out(database):
    pool = ConnectionPool('t', dict(database), max_size=2, timeout=0.2)
    a, b = pool.getconn(), pool.getconn()
    with pytest.raises(PoolTimeout, match=r'within 0\.2 s') as caught:
        pool.getconn()
    assert isinstance(caught.value, psycopg2.OperationalError)
    pool.putconn(a)
    assert pool.getconn() is a
    pool.putconn(a)
    pool.putconn(b)
    pool.close()


@pytest.mark.parametrize('release', ['putconn', 'discard'])
def test_a_waiting_caller_is_woken_when_a_connection_or_a_slot_comes_back(database, release):
    pool = ConnectionPool('t', dict(database), max_size=1, timeout=5)
    held = pool.getconn()
    with ThreadPoolExecutor(1) as executor:
        waiter = executor.submit(pool.getconn)  # waits: the one connection is taken
        threading.Event().wait(0.2)
        assert not waiter.done()
        if release == 'putconn':
            pool.putconn(held)
        else:
            held.close()  # broken: dropped on return, and its slot is free for a new one
            pool.putconn(held)
        got = waiter.result(timeout=4)  # woken, not left to its 5 s timeout
    assert (got is held) == (release == 'putconn') and not got.closed
    pool.putconn(got)
    pool.close()


def test_pool_rolls_back_and_replaces_broken_connections(database):
    pool = ConnectionPool('t', dict(database), max_size=1, timeout=1)
    conn = pool.getconn()
    conn.cursor().execute('SELECT 1')  # now in a transaction
    pool.putconn(conn)
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    conn.close()  # broken while idle in the pool
    fresh = pool.getconn()
    assert fresh is not conn and not fresh.closed
    pool.putconn(fresh)
    pool.close()
