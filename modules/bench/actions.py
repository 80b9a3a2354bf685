from psycopg2.extensions import connection as Connection

from lib.db import get_db_from_conn, transactional
from lib.decorators import inject_conn, use_schema
from settings import DEFAULT

from .schemas import KeySchema, RowsSchema, UpsertSchema
from .sql import READ, SQL_ROWS, UPSERT


# Reads run in autocommit: one statement needs no BEGIN/COMMIT round trips.
@use_schema(KeySchema)
@inject_conn(DEFAULT, named=True, autocommit=True)
def read(conn: Connection, aid: int) -> dict | None:
    return get_db_from_conn(conn).fetch_row(READ, dict(aid=aid))


@use_schema(UpsertSchema)
@inject_conn(DEFAULT, named=True, autocommit=False)
def upsert(conn: Connection, aid: int, bid: int, abalance: int) -> dict | None:
    with transactional(conn) as db:
        return db.fetch_row(UPSERT, dict(aid=aid, bid=bid, abalance=abalance))


@use_schema(RowsSchema)
@inject_conn(DEFAULT, named=True, autocommit=True)
def rows(conn: Connection, first: int, count: int) -> list[dict]:
    return get_db_from_conn(conn).fetch_all(SQL_ROWS, dict(first=first, last=first + count - 1))
