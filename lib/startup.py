"""Checks gunicorn's master runs once before forking workers (see gunicorn.conf.py), and the
line each worker writes once it serves.

A wrong setting stops the master with one line instead of every worker crash-looping, and
the database connections the whole deployment may open are compared with what PostgreSQL
accepts: `(replicas + 1) x workers x POOL_SIZE` per server, the `+ 1` being the replica a
`start-first` rolling update runs next to the old ones.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2

from lib import process
from lib.config import ConfigError, build_config

PROBE_TIMEOUT_SECONDS = 3
WORKER_LOGGER = 'dbapi.worker'
# Connections PostgreSQL keeps for superusers (and, from 16, for pg_use_reserved_connections).
RESERVED_SETTINGS = ('superuser_reserved_connections', 'reserved_connections')


@dataclass(frozen=True, slots=True)
class Budget:
    server: str
    databases: int
    needed: int
    usable: int | None  # None: the server did not answer, nothing was checked
    error: str = ''


def replicas_from_env() -> int:
    """API_REPLICAS: how many replicas of this service run (the stack passes deploy.replicas)."""
    raw = os.getenv('API_REPLICAS', '1')
    try:
        replicas = int(raw)
    except ValueError:
        raise ConfigError(f'API_REPLICAS={raw!r} is not a whole number') from None
    if replicas < 1:
        raise ConfigError(f'API_REPLICAS={replicas} must be at least 1')
    return replicas


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


def budgets(config: Mapping[str, Any], workers: int, replicas: int) -> list[Budget]:
    """One budget per PostgreSQL server: databases on the same host and port share it."""
    by_server: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for params in config['DATABASES'].values():
        by_server[f'{params.get("host", "local socket")}:{params.get("port", 5432)}'].append(params)
    checked = []
    for server, databases in by_server.items():
        needed = (replicas + 1) * workers * config['POOL_SIZE'] * len(databases)
        try:
            usable: int | None = usable_connections(databases[0])
            error = ''
        except psycopg2.Error as failure:
            # The database may come up after the API: readiness keeps traffic away until then.
            usable, error = None, str(failure).strip()
        checked.append(Budget(server, len(databases), needed, usable, error))
    return checked


def check_connection_budget(config: Mapping[str, Any], workers: int, replicas: int) -> list[Budget]:
    """Refuse to start when the deployment could open more connections than a server accepts.

    Refused rather than warned: over-subscription only shows under load, as 503s, long after
    the deploy; a refused start is seen at once, and Swarm rolls the update back.
    """
    checked = budgets(config, workers, replicas)
    for budget in checked:
        if budget.usable is not None and budget.needed > budget.usable:
            databases = f' x {budget.databases} databases' if budget.databases > 1 else ''
            raise ConfigError(
                f'(API_REPLICAS={replicas} + 1) x workers={workers} x POOL_SIZE={config["POOL_SIZE"]}{databases}'
                f' = {budget.needed} connections exceed the {budget.usable} that PostgreSQL at {budget.server}'
                ' accepts (max_connections minus reserved): lower one of them or raise max_connections'
            )
    return checked


def check_master(workers: int) -> tuple[dict[str, Any], list[Budget]]:
    """Everything the master checks before forking; ConfigError names the bad setting."""
    config = build_config()
    return config, check_connection_budget(config, workers, replicas_from_env())


def announce_worker_ready(worker: Any) -> None:
    """gunicorn's `post_worker_init`: the app is loaded and the worker starts serving now.

    A forked worker takes a second or more to import and build the app, and only then takes
    connections: this line tells operators (and the tests, which wait for it) when a new or
    replaced worker really serves.
    """
    served = sorted(getattr(worker.wsgi, 'blueprints', ())) or ['a plain WSGI app']
    logging.getLogger(WORKER_LOGGER).info('worker %d ready, serving %s', process.pid, ', '.join(served))
