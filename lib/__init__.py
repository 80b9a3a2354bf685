"""dbapi's public face for module authors: everything a module needs, from one place.

    from lib import module_blueprint, use_schema, returns, inject_conn, get_db_from_conn

Modules import only this package (import-linter enforces it); the sub-modules behind it are
the engine's own and may move. Each name below is documented on the docs site's
"Writing a module" pages.
"""

from lib.actions import module_blueprint
from lib.db import Db, Row, connection, get_conn_from_dbname, get_db_from_conn, transactional
from lib.decorators import DEFAULT_DATABASE, inject_conn, returns, use_schema
from lib.errors import ApiError, conflict, not_found, unprocessable
from lib.events.outbox import emit
from lib.prepared import Prepared

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
