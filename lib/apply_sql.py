"""Apply dbapi's own SQL (lib/idempotency.sql, lib/sql/0002_outbox.sql), then the `schema.sql`
of every registered module, to a configured database.

    python -m lib.apply_sql [--database default]

The files are written to be re-runnable (`CREATE ... IF NOT EXISTS`); each runs in one
transaction, so a broken file changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import psycopg2

import settings
from lib.config import ConfigError, check_databases

SCHEMA_FILE = 'schema.sql'
PROJECT_SQL = [
    Path(__file__).with_name('idempotency.sql'),  # the table of Idempotency-Key answers
    Path(__file__).parent / 'sql' / '0002_outbox.sql',  # the events' outbox (lib/events)
]


def schema_files(modules: Iterable[str]) -> list[Path]:
    files = []
    for name in modules:
        package = import_module(name)
        if package.__file__ is None:
            raise ValueError(f'module {name!r} is a namespace package: a module is a package with an __init__.py')
        path = Path(package.__file__).parent / SCHEMA_FILE
        if path.exists():
            files.append(path)
    return files


def apply_sql(params: Mapping[str, Any], modules: Iterable[str], project: bool = True) -> list[Path]:
    """Run the files, each in its own transaction; the ones run. `project`: dbapi's own first."""
    applied = []
    files = list(PROJECT_SQL) if project else []
    conn = psycopg2.connect(**params)
    try:
        for path in [*files, *schema_files(modules)]:
            with conn, conn.cursor() as cursor:
                cursor.execute(path.read_text(encoding='utf-8'))
            applied.append(path)
    finally:
        conn.close()
    return applied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--database', default=settings.DEFAULT, help='a name from settings.DATABASES')
    args = parser.parse_args(argv)
    try:
        databases = check_databases(settings.DATABASES)
    except ConfigError as error:
        print(f'dbapi: configuration error: {error}', file=sys.stderr)
        return 2
    if args.database not in databases:
        print(f'dbapi: no database named {args.database!r} (known: {", ".join(databases)})', file=sys.stderr)
        return 2
    for path in apply_sql(databases[args.database], settings.MODULES):
        print(f'applied {path.relative_to(settings.BASE_DIR)}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
