"""The import paths of dbapi 0.1 that module authors used, kept for one release.

`from lib.db import get_db_from_conn` (and the like) still works, with a DeprecationWarning naming
the new spelling: `from lib import get_db_from_conn`. Remove in the release after next.
"""

from __future__ import annotations

import warnings
from importlib import import_module
from typing import Any

# name -> where it lives now; every one of them is also on lib's face unless noted.
MOVED = {
    'module_blueprint': 'lib.web.blueprints',
    'use_schema': 'lib.contract.declarations',
    'returns': 'lib.contract.declarations',
    'inject_conn': 'lib.contract.declarations',
    'Db': 'lib.db.sql',
    'Row': 'lib.db.sql',
    'Prepared': 'lib.db.sql',
    'get_db_from_conn': 'lib.db.sql',
    'transactional': 'lib.db.connections',
    'connection': 'lib.db.connections',
    'get_conn_from_dbname': 'lib.db.connections',
    'POOLS_KEY': 'lib.db.connections',
    'ApiError': 'lib.core.errors',
    'not_found': 'lib.core.errors',
    'conflict': 'lib.core.errors',
    'unprocessable': 'lib.core.errors',
    'bad_request': 'lib.core.errors',
}


def moved(old_module: str, name: str) -> Any:
    """`name` as `old_module` offered it, with a DeprecationWarning naming its new home."""
    home = MOVED.get(name)
    if home is None:
        raise AttributeError(f'module {old_module!r} has no attribute {name!r}')
    face = 'lib' if name in import_module('lib').__all__ else home
    warnings.warn(
        f'{old_module}.{name} is deprecated: import it as `from {face} import {name}`',
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(import_module(home), name)
