"""dbapi's public face for module authors: everything a module needs, from one place.

    from lib import module_blueprint, use_schema, returns, inject_conn, get_db_from_conn

Modules import only this package (import-linter enforces it); the sub-packages behind it are the
engine's layers (docs/architecture.md) and may change. Each name is documented on the docs
site's "Writing a module" pages.
"""

from lib.contract.declarations import inject_conn, returns, use_schema
from lib.core.config import DEFAULT_DATABASE
from lib.core.errors import ApiError, conflict, not_found, unprocessable
from lib.db.connections import connection, get_conn_from_dbname, transactional
from lib.db.sql import Db, Prepared, Row, get_db_from_conn
from lib.events.outbox import emit
from lib.web.blueprints import module_blueprint

__all__ = [
    'DEFAULT_DATABASE',
    'ApiError',
    'Db',
    'Prepared',
    'Row',
    'conflict',
    'connection',
    'emit',
    'get_conn_from_dbname',
    'get_db_from_conn',
    'inject_conn',
    'module_blueprint',
    'not_found',
    'returns',
    'transactional',
    'unprocessable',
    'use_schema',
]
