"""Apply dbapi's own SQL (lib/idempotency.sql), then the `schema.sql` of every registered module,
to a configured database (`flask --app app apply-sql`, lib.server.cli).

The files are written to be re-runnable (`CREATE ... IF NOT EXISTS`); each runs in one
transaction, so a broken file changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import psycopg2

SCHEMA_FILE = 'schema.sql'
PROJECT_SQL = Path(__file__).with_name('idempotency.sql')  # the table of Idempotency-Key answers


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
    files = [PROJECT_SQL] if project else []
    conn = psycopg2.connect(**params)
    try:
        for path in [*files, *schema_files(modules)]:
            with conn, conn.cursor() as cursor:
                cursor.execute(path.read_text(encoding='utf-8'))
            applied.append(path)
    finally:
        conn.close()
    return applied
