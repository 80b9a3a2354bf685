"""The service through pgbouncer in transaction mode (DEFAULT_DB_PGBOUNCER=transaction), issue 21.

Debian's pgbouncer, with its default startup-parameter handling (`options` refused), stands in
front of a PostgreSQL of this module's own started with max_connections=30. The database
helpers, transactions, the SQLSTATE mapping and prepared reads run through it in-process; 300
client connections are served by its pool of 20; a real gunicorn meets the statement timeout
and the restarts of pgbouncer and of PostgreSQL behind it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
from flask import Flask

from lib.core.config import ConfigError, load
from lib.db.connections import connection, transactional
from lib.db.sql import Db, names_prepared_on
from lib.server import startup
from lib.server.startup import STARTUP_LOGGER, check_connection_budget
from scripts.topology import PgBouncer, find_pgbouncer, wait_until
from tests.conftest import AUTH, MODULES, apply_migrations, make_app
from tests.logs import read_lines
from tests.private_pg import PrivatePostgres, private_postgres
from tests.service import Service, running_service
from tests.test_faults import Load, call, check_recovery, note
from tests.tools import require_tool

pytestmark = pytest.mark.slow

DBNAME = 'dbapi_pgbouncer'
POOLER_MODULES = [*MODULES, 'tests.modules.pooler']
MAX_CONNECTIONS = 30
POOL = 20
QUERY_WAIT_TIMEOUT = 3  # seconds pgbouncer holds a query while no server connection can be had
RECOVERY_SECONDS = 2.0
CONNECT_TIMEOUT = 2
SERVICE_ENV = {
    'EXTRA_MODULES': 'tests.modules.probe,tests.modules.pooler',
    'DEFAULT_DB_PGBOUNCER': 'transaction',
    'POOL_TIMEOUT': 1,
    'CONNECT_TIMEOUT': CONNECT_TIMEOUT,
    'POOL_SIZE': 2,
}


@pytest.fixture(scope='module')
def pg() -> Iterator[PrivatePostgres]:
    with private_postgres({'max_connections': str(MAX_CONNECTIONS)}) as server:
        apply_migrations(server.create_database(DBNAME), POOLER_MODULES)
        yield server


def bouncer_in_front(pg: PrivatePostgres, directory: Path, **settings: str) -> PgBouncer:
    require_tool(find_pgbouncer(), 'pgbouncer')
    return PgBouncer(directory, pg.params(), **settings)


@contextlib.contextmanager
def running(bouncer: PgBouncer) -> Iterator[PgBouncer]:
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope='module')
def bouncer(pg: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgBouncer]:
    """pgbouncer's defaults but for the sizes and the two waits that decide how fast an outage shows."""
    settings = {
        'max_client_conn': '400',
        'default_pool_size': str(POOL),
        'query_wait_timeout': str(QUERY_WAIT_TIMEOUT),
        'server_login_retry': '1',
    }
    with running(bouncer_in_front(pg, tmp_path_factory.mktemp('pgbouncer'), **settings)) as started:
        yield started


@pytest.fixture(scope='module')
def through(bouncer: PgBouncer) -> dict[str, Any]:
    """The database's settings as the service gets them: pgbouncer's address, DB_PGBOUNCER=transaction."""
    return dict(bouncer.params(DBNAME), pgbouncer='transaction')


@contextlib.contextmanager
def app_through(database: dict[str, Any], log_dir: str, **overrides: Any) -> Iterator[Flask]:
    app = make_app(database, log_dir, MODULES=POOLER_MODULES, **overrides)
    try:
        yield app
    finally:
        app.extensions['dbapi.pools'].close()


@pytest.fixture
def app(through: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    with app_through(through, log_dir) as application:
        yield application


def post(app: Flask, path: str, body: Any = None) -> Any:
    return app.test_client().post(path, json=body, headers=AUTH)


def sessions_idle_in_transaction(pg: PrivatePostgres) -> list[tuple[Any, ...]]:
    return pg.query(
        "SELECT pid, state, query FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
        [DBNAME],
    )


def test_pgbouncer_runs_transaction_mode_and_refuses_startup_options(bouncer: PgBouncer) -> None:
    config = {row['key']: row['value'] for row in bouncer.show('CONFIG')}
    assert (config['pool_mode'], config['ignore_startup_parameters']) == ('transaction', '')
    with pytest.raises(psycopg2.OperationalError, match='unsupported startup parameter: options'):
        psycopg2.connect(**bouncer.params(DBNAME), options='-c statement_timeout=1000').close()


def test_without_the_setting_every_request_is_503_and_the_log_names_the_setting(
    bouncer: PgBouncer, log_dir: str
) -> None:
    with app_through(bouncer.params(DBNAME), log_dir) as app:
        response = post(app, '/probe/write_note', {'note': note()})
    assert response.status_code == 503 and response.headers['Retry-After'] == '1', response.text
    warnings = [r['message'] for r in read_lines(log_dir) if r['log.logger'] == 'dbapi.errors']
    assert any('set <NAME>_DB_PGBOUNCER=transaction' in message for message in warnings), warnings


def test_every_db_helper_through_pgbouncer(app: Flask, pg: PrivatePostgres) -> None:
    pg.query('DROP TABLE IF EXISTS pgb_t; CREATE TABLE pgb_t (k text PRIMARY KEY, v integer)', dbname=DBNAME)
    with app.app_context(), connection('default') as conn:
        db = Db(conn)
        assert db.insert('pgb_t', {'k': 'a', 'v': 1}) == [{'k': 'a', 'v': 1}]
        assert [r['k'] for r in db.insert('pgb_t', [{'k': 'b', 'v': 2}, {'k': 'c', 'v': 3}])] == ['b', 'c']
        assert db.select('pgb_t', {'k': 'a'}) == [{'k': 'a', 'v': 1}]
        assert db.update('pgb_t', {'v': 5}, {'k': 'a'}) == 1
        assert db.delete('pgb_t', {'k': 'c'}) == 1
        assert db.fetch_one('SELECT v FROM pgb_t WHERE k = %(k)s', {'k': 'a'}) == 5
        assert db.fetch_row('SELECT k, v FROM pgb_t WHERE k = %s', ['b']) == {'k': 'b', 'v': 2}
        assert db.fetch_all('SELECT k FROM pgb_t ORDER BY k') == [{'k': 'a'}, {'k': 'b'}]
        assert db.execute('UPDATE pgb_t SET v = v + 1') == 2
        assert db.upsert('pgb_t', {'v': 9}, {'k': 'b'}) == {'k': 'b', 'v': 9}
        assert db.upsert('pgb_t', {'v': 1}, {'k': 'z'}) == {'k': 'z', 'v': 1}
        assert db.sp_fetch_one('probe_double', [21]) == 42
        assert db.sp_fetch_all('probe_series', {'n': 2}) == [{'i': 1, 'sq': 1}, {'i': 2, 'sq': 4}]
    with app.app_context(), connection('default', named=False) as conn:
        assert Db(conn).fetch_all('SELECT 1 AS a, 2 AS b') == [(1, 2)]
    assert pg.query('SELECT k, v FROM pgb_t ORDER BY k', dbname=DBNAME) == [('a', 6), ('b', 9), ('z', 1)]


def test_transactions_commit_and_roll_back(app: Flask, pg: PrivatePostgres) -> None:
    pg.query('DROP TABLE IF EXISTS pgb_tx; CREATE TABLE pgb_tx (v int)', dbname=DBNAME)
    with app.app_context(), connection('default') as conn:
        with transactional(conn) as tx:
            tx.insert('pgb_tx', {'v': 1})
        with pytest.raises(RuntimeError), transactional(conn) as tx:
            tx.insert('pgb_tx', {'v': 2})
            raise RuntimeError('roll back')
        assert conn.autocommit and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert pg.query('SELECT v FROM pgb_tx', dbname=DBNAME) == [(1,)]
    failed_note, kept_note = note(), note()
    assert post(app, '/probe/write_then_fail', {'note': failed_note}).status_code == 500
    assert post(app, '/probe/write_note', {'note': kept_note}).status_code == 200
    assert post(app, '/probe/in_transaction').json == {'in_transaction': True}  # the block did not end it
    notes = pg.query('SELECT note FROM probe_log WHERE note = ANY(%s)', [[failed_note, kept_note]], dbname=DBNAME)
    assert notes == [(kept_note,)]


def test_an_idempotency_key_and_a_batch_through_pgbouncer(app: Flask, pg: PrivatePostgres) -> None:
    """The key's lock and statements live in the request's transaction: nothing on the session."""
    client = app.test_client()
    key_note = note()
    keyed = {**AUTH, 'Idempotency-Key': key_note}
    first = client.post('/probe/write_note', json={'note': key_note}, headers=keyed)
    again = client.post('/probe/write_note', json={'note': key_note}, headers=keyed)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers['Idempotent-Replayed'] == 'true' and again.data == first.data
    batch_notes = sorted([note(), note()])
    steps = [{'action': 'probe/write_note', 'body': {'note': text}} for text in batch_notes]
    failing = {'action': 'probe/write_then_fail', 'body': {'note': note()}}
    assert client.post('/batch', json={'actions': [*steps, failing]}, headers=AUTH).status_code == 500
    assert client.post('/batch', json={'actions': steps}, headers=AUTH).status_code == 200
    rows = pg.query(
        'SELECT note, count(*) FROM probe_log WHERE note = ANY(%s) GROUP BY note ORDER BY note',
        [[key_note, *batch_notes]],
        dbname=DBNAME,
    )
    assert rows == sorted([(key_note, 1), *[(text, 1) for text in batch_notes]])
    assert sessions_idle_in_transaction(pg) == []


def test_concurrent_upserts_of_one_key_leave_one_row(
    through: dict[str, Any], log_dir: str, pg: PrivatePostgres
) -> None:
    """50 clients at once, more than PostgreSQL's 30 connections: pgbouncer queues them on its 20."""
    pg.query('DROP TABLE IF EXISTS pgb_race; CREATE TABLE pgb_race (k text PRIMARY KEY, n int)', dbname=DBNAME)
    barrier = threading.Barrier(50)
    with app_through(through, log_dir, POOL_SIZE=50, POOL_TIMEOUT=10) as app:

        def upsert(n: int) -> Any:
            with app.app_context(), connection('default') as conn:
                barrier.wait()
                with transactional(conn) as tx:
                    return tx.upsert('pgb_race', {'n': n}, {'k': 'same'})

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(upsert, range(50)))
    assert len(results) == 50 and all(row['k'] == 'same' for row in results)
    assert pg.query('SELECT count(*) FROM pgb_race', dbname=DBNAME) == [(1,)]


@pytest.mark.parametrize(
    ('path', 'body', 'status'),
    [
        ('/probe/add_item', {'code': 'dup', 'qty': 1}, 409),  # 23505, on the second call
        ('/probe/add_item', {'code': 'orphan', 'qty': 1, 'parent': 999999}, 409),  # 23503
        ('/probe/add_item', {'code': 'big', 'qty': 2**40}, 400),  # 22003
        ('/probe/add_item', {'code': 'neg', 'qty': -1}, 400),  # 23514
        ('/probe/divide_by_zero', None, 400),  # 22012
        ('/probe/bad_sql', None, 500),  # 42601
    ],
)
def test_sqlstates_map_as_they_do_direct(app: Flask, path: str, body: Any, status: int) -> None:
    if status == 409 and body['code'] == 'dup':
        post(app, path, body)
    response = post(app, path, body)
    assert response.status_code == status, response.text
    assert response.content_type == 'application/problem+json'


def test_a_missing_prepared_statement_is_a_503_and_a_log_line_naming_the_cause(app: Flask, log_dir: str) -> None:
    response = post(app, '/pooler/missing_prepared')
    assert response.status_code == 503 and response.headers['Retry-After'] == '1', response.text
    assert response.json['type'].endswith('prepared-statement-missing')
    warnings = [r['message'] for r in read_lines(log_dir) if r['log.logger'] == 'dbapi.errors']
    assert any('transaction pooler gave this transaction another server session' in m for m in warnings), warnings


def test_prepared_reads_run_as_plain_text_on_any_server_session(app: Flask) -> None:
    """Behind pgbouncer, SQL-level PREPARE failed three reads in four: now none is prepared."""
    assert post(app, '/probe/add_item', {'code': 'read-me', 'qty': 7}).status_code == 200

    def read(_: int) -> Any:
        return post(app, '/pooler/read_item', {'code': 'read-me'})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(read, range(120)))
    assert [a.status_code for a in answers] == [200] * 120, [a.text for a in answers if a.status_code != 200][:3]
    # The declared types still decide what a value means: 1.5 into integer is 2.
    assert answers[0].json == {'code': 'read-me', 'qty': 7, 'bonus': 2, 'pct': '50%'}
    with app.app_context(), connection('default') as conn:
        assert names_prepared_on(conn) == set()


def test_the_statement_timeout_lives_in_each_transaction_and_never_in_the_session(
    pg: PrivatePostgres, log_dir: str, tmp_path: Path
) -> None:
    """One server session behind pgbouncer: what the service set must be gone for the next client."""
    with running(bouncer_in_front(pg, tmp_path, default_pool_size='1')) as single:
        database = dict(single.params(DBNAME), pgbouncer='transaction')
        with app_through(database, log_dir, STATEMENT_TIMEOUT=1234) as app:
            seen = post(app, '/pooler/timeouts').json
            assert post(app, '/probe/in_transaction').status_code == 200
            assert post(app, '/pooler/read_item', {'code': 'nothing'}).status_code == 200
        other = psycopg2.connect(**single.params(DBNAME))
        try:
            other.autocommit = True
            with other.cursor() as cursor:
                cursor.execute('SHOW statement_timeout')
                after = cursor.fetchone()[0]
        finally:
            other.close()
        servers = single.show('SERVERS')
    assert seen == {'autocommit': '1234ms', 'transaction': '1234ms'}
    assert len(servers) == 1, servers  # the same server session served both clients
    assert after == '0', 'the service left its statement_timeout on the server session'


def test_the_budget_counts_clients_against_max_client_conn_and_the_pool_against_postgresql(
    through: dict[str, Any], bouncer: PgBouncer
) -> None:
    config = load(overrides={'DATABASES': {'default': through}, 'POOL_SIZE': 2})
    clients, pool = check_connection_budget(config, workers=3, replicas=9)
    assert (clients.kind, clients.needed, clients.usable) == (startup.CLIENTS, 10 * 3 * 2, 400)
    assert (pool.kind, pool.needed, pool.usable) == (startup.POOL, POOL, MAX_CONNECTIONS - 3)
    with pytest.raises(ConfigError, match=r"= 404 client connections exceed pgbouncer at .*'s 400"):
        check_connection_budget(config, workers=2, replicas=100)


def test_without_the_console_the_settings_stand_in_or_nothing_is_checked(pg: PrivatePostgres, tmp_path: Path) -> None:
    with running(bouncer_in_front(pg, tmp_path, admin_users='', default_pool_size='40')) as closed:
        database = dict(closed.params(DBNAME), pgbouncer='transaction')
        config = load(overrides={'DATABASES': {'default': database}, 'POOL_SIZE': 2})
        clients, pool = check_connection_budget(config, workers=3, replicas=1)
        assert clients.usable is None and 'DEFAULT_DB_PGBOUNCER_MAX_CLIENT_CONN' in clients.error
        assert pool.usable is None and 'stats_users' in pool.error
        sized = dict(database, pgbouncer_pool_size='40', pgbouncer_max_client_conn='100')
        config = load(overrides={'DATABASES': {'default': sized}, 'POOL_SIZE': 2})
        with pytest.raises(ConfigError, match=r"pgbouncer's pool of 40 server connections .* exceeds the 27"):
            check_connection_budget(config, workers=3, replicas=1)


def test_300_client_connections_through_a_pool_of_20(pg: PrivatePostgres, log_dir: str, tmp_path: Path) -> None:
    """300 requests hold a client connection each at once; PostgreSQL sees pgbouncer's 20 sessions.

    The test holds a lock the requests' INSERT waits for, so the first 20 hold every server
    connection and the other 280 queue in pgbouncer, until all 300 are connected.
    """
    clients = 300
    settings = {'max_client_conn': '400', 'default_pool_size': str(POOL), 'query_wait_timeout': '30'}
    with running(bouncer_in_front(pg, tmp_path, **settings)) as pooler:
        database = dict(pooler.params(DBNAME), pgbouncer='transaction')
        with app_through(database, log_dir, POOL_SIZE=clients, POOL_TIMEOUT=30) as app:
            # The module's other pgbouncer keeps its idle server sessions (server_idle_timeout): they
            # go, and the two sessions the test needs are opened before the load, so pgbouncer's 20
            # fit in max_connections with room to spare.
            pg.query(TERMINATE_IDLE, [DBNAME])
            wait_until(lambda: sessions_on(pg, DBNAME) == 0, 10, 'an earlier session is still open')
            monitor = pg.connect()
            holder = pg.connect(DBNAME)
            holder.autocommit = False
            with holder.cursor() as cursor:
                cursor.execute('LOCK TABLE probe_log IN ACCESS EXCLUSIVE MODE')
            with ThreadPoolExecutor(clients) as pool:
                futures = [pool.submit(post, app, '/probe/write_note', {'note': note()}) for _ in range(clients)]
                try:
                    wait_until(lambda: queued(pooler) >= clients, 60, f'{clients} clients were not all connected')
                    (row,) = [r for r in pooler.show('POOLS') if r['database'] == DBNAME]
                    sessions = waiting_for_the_lock(monitor)
                    servers = [r for r in pooler.show('SERVERS') if r['database'] == DBNAME]
                finally:
                    holder.close()  # the lock goes: the queue drains
                    monitor.close()
                statuses = [future.result().status_code for future in futures]
            opened = app.extensions['dbapi.pools'].stats()['default']['open']
    assert statuses == [200] * clients, {status: statuses.count(status) for status in set(statuses)}
    assert opened == clients, f'the app held {opened} client connections, not {clients}'
    assert row['cl_active'] + row['cl_waiting'] >= clients and row['cl_waiting'] >= clients - POOL, row
    assert len(servers) == sessions == POOL, f'{sessions} PostgreSQL sessions for a pgbouncer pool of {POOL}'


def queued(pooler: PgBouncer) -> int:
    """Client connections pgbouncer holds for the test database, linked or waiting."""
    return sum(r['cl_active'] + r['cl_waiting'] for r in pooler.show('POOLS') if r['database'] == DBNAME)


WAITING_FOR_A_LOCK = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"


def waiting_for_the_lock(monitor: psycopg2.extensions.connection) -> int:
    """PostgreSQL's sessions on the test database whose statement waits for a lock."""
    with monitor.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", [DBNAME]
        )
        return int(cursor.fetchone()[0])


TERMINATE_IDLE = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND state = 'idle'"


def sessions_on(pg: PrivatePostgres, dbname: str) -> int:
    """PostgreSQL's client sessions on `dbname`."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'"
    return int(pg.query(query, [dbname])[0][0])


@contextlib.contextmanager
def service_through(bouncer: PgBouncer, log_dir: str, **env: Any) -> Iterator[Service]:
    with running_service(bouncer.params(DBNAME), log_dir, **{**SERVICE_ENV, **env}) as service:
        yield service


def client_connections(bouncer: PgBouncer, application_name: str) -> list[tuple[str, int]]:
    """The (address, port) of each client connection pgbouncer has from that application."""
    return [(c['addr'], c['port']) for c in bouncer.show('CLIENTS') if c['application_name'] == application_name]


def test_statement_timeout_through_pgbouncer(bouncer: PgBouncer, pg: PrivatePostgres, log_dir: str) -> None:
    env = {'WEB_CONCURRENCY': 1, 'POOL_SIZE': 1, 'STATEMENT_TIMEOUT': 300}
    with service_through(bouncer, log_dir, **env) as service:
        assert call(service, '/probe/write_note', {'note': note()}).status == 200
        (worker,) = service.worker_pids()
        before = client_connections(bouncer, f'dbapi:{worker}')
        for path in ('/probe/sleep', '/pooler/sleep_autocommit'):  # in a transaction, then autocommit
            # Cancelled before the sleep of 1 s ended: the 0.3 s applies, by PostgreSQL's own clock.
            slow = call(service, path, {'seconds': 1})
            assert slow.status == 504 and slow.content_type.startswith('application/problem+json'), slow
            running_sleeps = pg.query(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' AND query LIKE %s",
                [DBNAME, '%pg_sleep%'],
            )
            assert running_sleeps == [], 'the statement still runs in PostgreSQL'
        after = client_connections(bouncer, f'dbapi:{worker}')
        assert len(before) == 1 and after == before, f'the connection was not reused: {before} then {after}'
        assert call(service, '/probe/write_note', {'note': note()}).status == 200
    said = [r['message'] for r in read_lines(log_dir) if r['log.logger'] == STARTUP_LOGGER]
    assert len(said) == 1 and 'through pgbouncer in transaction mode' in said[0], said
    assert 'PREPARE' in said[0] and 'advisory' in said[0]


def acknowledged_writes_kept(pg: PrivatePostgres, load: Load) -> None:
    acknowledged = [text for text, answer in load.written if answer.status == 200]
    kept = pg.query('SELECT count(*) FROM probe_log WHERE note = ANY(%s)', [acknowledged], dbname=DBNAME)
    assert kept == [(len(acknowledged),)]


def survives_outage(bouncer: PgBouncer, pg: PrivatePostgres, log_dir: str, outage: Callable[[], float]) -> None:
    """Load through pgbouncer across `outage` (it returns when the service can answer again):
    503s while it lasts, 200s after, no acknowledged write lost, no session left in a transaction."""
    with service_through(bouncer, log_dir) as service, Load(service) as load:
        time.sleep(1.0)
        down_at = time.monotonic()
        ready_at = outage()
        time.sleep(RECOVERY_SECONDS + 2.0)
        load.__exit__()
    check_recovery(load.answers, down_at, ready_at, limit=QUERY_WAIT_TIMEOUT + CONNECT_TIMEOUT + 1.0)
    acknowledged_writes_kept(pg, load)
    assert sessions_idle_in_transaction(pg) == []


def test_pgbouncer_restarted_under_load(bouncer: PgBouncer, pg: PrivatePostgres, log_dir: str) -> None:
    def restart_pgbouncer() -> float:
        bouncer.stop()
        time.sleep(1.0)
        bouncer.start()
        return time.monotonic()

    survives_outage(bouncer, pg, log_dir, restart_pgbouncer)


def test_postgresql_restarted_behind_pgbouncer_under_load(
    bouncer: PgBouncer, pg: PrivatePostgres, log_dir: str
) -> None:
    def restart_postgresql() -> float:
        pg.stop('fast')
        # Down for longer than pgbouncer holds a query: a restart of a second or so is hidden
        # whenever no query was running at the shutdown (pgbouncer waits, then sends it to the
        # new server), so nothing would show that the outage was met.
        time.sleep(QUERY_WAIT_TIMEOUT + 1.0)
        pg.start()
        return pg.wait_ready()

    survives_outage(bouncer, pg, log_dir, restart_postgresql)


def test_no_server_session_is_left_idle_in_transaction(pg: PrivatePostgres, bouncer: PgBouncer) -> None:
    """Runs last: what every test above left behind pgbouncer."""
    assert sessions_idle_in_transaction(pg) == []
    assert all(row['cl_waiting'] == 0 for row in bouncer.show('POOLS')), bouncer.show('POOLS')


# --- migrations: the service through pgbouncer, migrate straight to PostgreSQL ------------------

MIGRATE_DB = 'dbapi_pgbouncer_migrate'
FLASK = Path(sys.executable).parent / 'flask'
ROOT = Path(__file__).resolve().parent.parent


def migrate_command(bouncer: PgBouncer, **env: str) -> subprocess.CompletedProcess[str]:
    """`flask --app app migrate` with the service's settings: its database is pgbouncer's address."""
    settings = {
        **os.environ,
        'ENVIRONMENT': 'testing',
        'EXTRA_MODULES': SERVICE_ENV['EXTRA_MODULES'],
        'DEFAULT_DB_HOST': '127.0.0.1',
        'DEFAULT_DB_PORT': str(bouncer.port),
        'DEFAULT_DB_NAME': MIGRATE_DB,
        'DEFAULT_DB_USER': bouncer.user,
        'DEFAULT_DB_PGBOUNCER': 'transaction',
        **env,
    }
    command = [str(FLASK), '--app', 'app', 'migrate']
    return subprocess.run(command, cwd=ROOT, env=settings, capture_output=True, text=True, timeout=60, check=False)


def test_the_service_serves_through_pgbouncer_while_migrate_goes_direct(
    bouncer: PgBouncer, pg: PrivatePostgres, log_dir: str
) -> None:
    pg.create_database(MIGRATE_DB)
    recorded = 'SELECT count(*) FROM pg_tables WHERE tablename = %s'
    with running_service(bouncer.params(MIGRATE_DB), log_dir, **SERVICE_ENV) as service:
        ready = f'{service.url}/health/ready'
        pending = requests.get(ready, timeout=10)  # read through pgbouncer
        assert pending.status_code == 503 and 'dbapi 0001_idempotency' in pending.json()['pending']['default']

        refused = migrate_command(bouncer)
        assert refused.returncode != 0
        assert refused.stderr.strip() == (
            'Error: DEFAULT_DB_PGBOUNCER is set: migrate needs a session of its own, which a transaction pooler'
            ' does not keep; set DEFAULT_DB_MIGRATE_HOST and DEFAULT_DB_MIGRATE_PORT to PostgreSQL itself'
        )
        undeclared = migrate_command(bouncer, DEFAULT_DB_PGBOUNCER='')  # nobody said it is a pooler: found out
        assert undeclared.returncode != 0
        assert undeclared.stderr.strip().startswith(
            f"Error: database 'default': migrate reached 127.0.0.1:{bouncer.port}/{MIGRATE_DB} through a"
            ' transaction pooler (pgbouncer?)'
        ), undeclared.stderr
        assert pg.query(recorded, ['dbapi_migrations'], dbname=MIGRATE_DB) == [(0,)]

        direct = migrate_command(bouncer, DEFAULT_DB_MIGRATE_HOST=pg.host, DEFAULT_DB_MIGRATE_PORT=str(pg.port))
        assert direct.returncode == 0, direct.stderr
        assert direct.stdout.startswith('default: applied dbapi 0001_idempotency'), direct.stdout
        wait_until(lambda: requests.get(ready, timeout=10).status_code == 200, 30, 'ready after migrate')
        assert call(service, '/probe/write_note', {'note': note()}).status == 200
