"""Checks gunicorn's master runs once before forking workers (see gunicorn.conf.py), and the
line each worker writes once it serves.

A wrong setting stops the master with one line instead of every worker crash-looping, and
the database connections the whole deployment may open are compared with what PostgreSQL
accepts: `(replicas + 1) x workers x POOL_SIZE` per server, the `+ 1` being the replica a
`start-first` rolling update runs next to the old ones.

A database behind pgbouncer (`<NAME>_DB_PGBOUNCER`) has two budgets instead: those client
connections against pgbouncer's `max_client_conn`, and pgbouncer's own pool for the database
(`pool_size` + `reserve_pool`) against PostgreSQL's max_connections, read through pgbouncer.
pgbouncer's figures come from its admin console (`SHOW CONFIG`, `SHOW DATABASES`: the user must
be in its `stats_users` or `admin_users`), else from `<NAME>_DB_PGBOUNCER_MAX_CLIENT_CONN` and
`_POOL_SIZE`; with neither, that budget is not checked and the master says so. One pgbouncer
is assumed: several behind one address would each have these limits.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2

from lib.core import process
from lib.core.config import Config, ConfigError, Pgbouncer
from lib.db.migrations import expected_migrations, migrate
from lib.db.pgbouncer import limits_line

PROBE_TIMEOUT_SECONDS = 3
WORKER_LOGGER = 'dbapi.worker'
STARTUP_LOGGER = 'dbapi.startup'
# Connections PostgreSQL keeps for superusers (and, from 16, for pg_use_reserved_connections).
RESERVED_SETTINGS = ('superuser_reserved_connections', 'reserved_connections')


CONSOLE_DATABASE = 'pgbouncer'  # pgbouncer's admin console
DIRECT, CLIENTS, POOL = 'direct', 'pgbouncer clients', 'pgbouncer pool'


@dataclass(frozen=True, slots=True)
class Budget:
    server: str
    databases: int
    needed: int
    usable: int | None  # None: the server did not answer, nothing was checked
    error: str = ''
    kind: str = DIRECT  # DIRECT, CLIENTS (against max_client_conn) or POOL (pgbouncer's, against PostgreSQL)


def usable_connections(params: Mapping[str, Any]) -> int:
    """max_connections minus the reserved slots, as the server reports them."""
    conn = psycopg2.connect(**params, connect_timeout=PROBE_TIMEOUT_SECONDS, application_name='dbapi:startup')
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT sum(setting::int) FILTER (WHERE name = 'max_connections'),"
                ' coalesce(sum(setting::int) FILTER (WHERE name = ANY(%s)), 0)'
                ' FROM pg_settings',
                [list(RESERVED_SETTINGS)],
            )
            maximum, reserved = cursor.fetchone()
    finally:
        conn.close()
    return int(maximum) - int(reserved)


def by_server(databases: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """Databases grouped by the host and port they connect to."""
    grouped: dict[str, dict[str, Mapping[str, Any]]] = defaultdict(dict)
    for name, params in databases.items():
        grouped[f'{params.get("host", "local socket")}:{params.get("port", 5432)}'][name] = params
    return grouped


def probe(params: Mapping[str, Any]) -> tuple[int | None, str]:
    """usable_connections, or None and why: the database may come up after the API, and
    readiness keeps traffic away until then."""
    try:
        return usable_connections(params), ''
    except psycopg2.Error as failure:
        return None, str(failure).strip()


def budgets(config: Config, workers: int, replicas: int) -> list[Budget]:
    """One budget per PostgreSQL server (databases on the same host and port share it), two per pgbouncer."""
    poolers: Mapping[str, Pgbouncer] = config.pgbouncer
    clients = (replicas + 1) * workers * config.pool_size
    checked = []
    params = {name: db.params for name, db in config.databases.items()}
    for server, databases in by_server(params).items():
        direct = {name: params for name, params in databases.items() if name not in poolers}
        if direct:
            usable, error = probe(next(iter(direct.values())))
            checked.append(Budget(server, len(direct), clients * len(direct), usable, error))
        behind = {name: params for name, params in databases.items() if name in poolers}
        if behind:
            checked += pgbouncer_budgets(server, behind, poolers, clients)
    return checked


def pgbouncer_budgets(
    server: str, databases: Mapping[str, Mapping[str, Any]], poolers: Mapping[str, Pgbouncer], clients: int
) -> list[Budget]:
    """The replicas' clients against max_client_conn; pgbouncer's pools against PostgreSQL behind it."""
    names = list(databases)
    usable, error = probe(databases[names[0]])  # through pgbouncer: PostgreSQL's figures; its pool now exists
    max_client_conn, pool, unread = pgbouncer_limits(databases, poolers)
    missing = f'{unread}; set {{}} or let the user read the console (stats_users)'
    return [
        Budget(
            f'pgbouncer at {server} (max_client_conn)',
            len(names),
            clients * len(names),
            max_client_conn,
            missing.format(setting_names(names, 'MAX_CLIENT_CONN')) if max_client_conn is None else '',
            CLIENTS,
        ),
        Budget(
            f'PostgreSQL behind pgbouncer at {server}',
            len(names),
            pool or 0,
            usable if pool is not None else None,
            error or (missing.format(setting_names(names, 'POOL_SIZE')) if pool is None else ''),
            POOL,
        ),
    ]


def pgbouncer_limits(
    databases: Mapping[str, Mapping[str, Any]], poolers: Mapping[str, Pgbouncer]
) -> tuple[int | None, int | None, str]:
    """max_client_conn and the databases' pools summed, from pgbouncer's admin console, else
    from the settings (None where unset), with why the console was not read."""
    names = list(databases)
    try:
        config, pools = read_console(databases[names[0]])
    except psycopg2.Error as failure:
        limits = [poolers[name].max_client_conn for name in names]
        sizes = [poolers[name].pool_size for name in names]
        max_client_conn = None if None in limits else min(limit for limit in limits if limit is not None)
        pool = None if None in sizes else sum(size for size in sizes if size is not None)
        return max_client_conn, pool, f"pgbouncer's admin console was not read ({first_line(failure)})"
    pool = sum(pool_size(config, pools, databases[name]['dbname']) for name in names)
    return int(config['max_client_conn']), pool, ''


def read_console(params: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """pgbouncer's `SHOW CONFIG` as {key: value} and `SHOW DATABASES` by database name."""
    conn = psycopg2.connect(
        **dict(params, dbname=CONSOLE_DATABASE), connect_timeout=PROBE_TIMEOUT_SECONDS, application_name='dbapi:startup'
    )
    try:
        conn.autocommit = True  # the console knows no transactions
        with conn.cursor() as cursor:
            cursor.execute('SHOW CONFIG')
            config = {row[0]: row[1] for row in cursor.fetchall()}
            cursor.execute('SHOW DATABASES')
            columns = [column.name for column in cursor.description]
            pools = {row[0]: dict(zip(columns, row, strict=True)) for row in cursor.fetchall()}
    finally:
        conn.close()
    return config, pools


def pool_size(config: Mapping[str, str], pools: Mapping[str, Mapping[str, Any]], dbname: str) -> int:
    """The server connections pgbouncer may open for `dbname`: its pool plus the reserve."""
    entry = pools.get(dbname)
    if entry is not None:
        return int(entry['pool_size']) + int(entry['reserve_pool'])
    return int(config['default_pool_size']) + int(config['reserve_pool_size'])


def setting_names(names: list[str], suffix: str) -> str:
    return ', '.join(f'{name.upper()}_DB_PGBOUNCER_{suffix}' for name in names)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def refusal(budget: Budget, config: Config, workers: int, replicas: int) -> str:
    """The one line that stops the master when `budget` is over."""
    databases = f' x {budget.databases} databases' if budget.databases > 1 else ''
    clients = f'(API_REPLICAS={replicas} + 1) x workers={workers} x POOL_SIZE={config.pool_size}{databases}'
    if budget.kind == CLIENTS:
        return (
            f"{clients} = {budget.needed} client connections exceed {budget.server}'s {budget.usable}:"
            ' lower one of them or raise max_client_conn'
        )
    if budget.kind == POOL:
        return (
            f"pgbouncer's pool of {budget.needed} server connections (pool_size + reserve_pool) exceeds the"
            f' {budget.usable} that {budget.server} accepts (max_connections minus reserved):'
            ' lower its default_pool_size or raise max_connections'
        )
    return (
        f'{clients} = {budget.needed} connections exceed the {budget.usable} that PostgreSQL at {budget.server}'
        ' accepts (max_connections minus reserved): lower one of them or raise max_connections'
    )


def check_connection_budget(config: Config, workers: int, replicas: int) -> list[Budget]:
    """Refuse to start when the deployment could open more connections than a server accepts.

    Refused rather than warned: over-subscription only shows under load, as 503s, long after
    the deploy; a refused start is seen at once, and Swarm rolls the update back.
    """
    checked = budgets(config, workers, replicas)
    for budget in checked:
        if budget.usable is not None and budget.needed > budget.usable:
            raise ConfigError(refusal(budget, config, workers, replicas))
    return checked


def check_master(config: Config, workers: int) -> list[Budget]:
    """Everything the master checks before forking (`config`: settings.MODULES' configuration);
    ConfigError names the bad setting. The databases behind pgbouncer are named once, with what
    cannot work through them. With MIGRATE_ON_START the pending migrations are applied last,
    under the same lock as `flask --app app migrate` (replicas starting together apply each file
    once), before any worker serves; MigrationError names the file."""
    planned = expected_migrations(config)  # a misnamed file stops the master here, with one line
    checked = check_connection_budget(config, workers, config.server.replicas)
    log = logging.getLogger(STARTUP_LOGGER)
    if config.pgbouncer:
        log.info(limits_line(list(config.pgbouncer)))
    if config.migrate_on_start:
        for name, migrations in planned.items():
            migrate(config.databases[name].migrate_params(), migrations, database=name, say=log.info)
    return checked


def announce_worker_ready(worker: Any) -> None:
    """gunicorn's `post_worker_init`: the app is loaded and the worker starts serving now.

    A forked worker takes a second or more to import and build the app, and only then takes
    connections: this line tells operators (and the tests, which wait for it) when a new or
    replaced worker really serves.
    """
    served = sorted(getattr(worker.wsgi, 'blueprints', ())) or ['a plain WSGI app']
    logging.getLogger(WORKER_LOGGER).info('worker %d ready, serving %s', process.pid, ', '.join(served))
