"""The database layer: pools, connections and transactions, prepared statements, the
Idempotency-Key store, pgbouncer, and what database errors mean.

`from lib.db import get_db_from_conn` (the 0.1 path) still works for one release, with a
DeprecationWarning: import it from `lib` (lib/_deprecated.py).
"""

from typing import Any

from lib._deprecated import moved


def __getattr__(name: str) -> Any:
    return moved(__name__, name)
