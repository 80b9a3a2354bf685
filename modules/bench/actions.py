from psycopg2.extensions import connection as Connection

from lib import Row, emit, get_db_from_conn, inject_conn, use_schema

from .schemas import KeySchema, RowsSchema, UpsertSchema
from .sql import READ, SQL_ROWS, UPSERT


# Reads run in autocommit: one statement needs no BEGIN/COMMIT round trips.
@use_schema(KeySchema)
@inject_conn(named=True, autocommit=True)
def read(conn: Connection, aid: int) -> Row | None:
    return get_db_from_conn(conn).fetch_row(READ, dict(aid=aid))


# The same read as a batch step: a batch refuses actions in autocommit, its steps share its transaction.
@use_schema(KeySchema)
@inject_conn(named=True, autocommit=False)
def read_tx(conn: Connection, aid: int) -> Row | None:
    return get_db_from_conn(conn).fetch_row(READ, dict(aid=aid))


@use_schema(UpsertSchema)
@inject_conn(named=True, autocommit=False)
def upsert(conn: Connection, aid: int, bid: int, abalance: int) -> Row | None:
    # inject_conn's transaction: committed when the action returns
    return get_db_from_conn(conn).fetch_row(UPSERT, dict(aid=aid, bid=bid, abalance=abalance))


# The same upsert, and its event (bench.events: the cost of emit, the relay's throughput).
@use_schema(UpsertSchema)
@inject_conn(named=True, autocommit=False)
def upsert_event(conn: Connection, aid: int, bid: int, abalance: int) -> Row | None:
    row = get_db_from_conn(conn).fetch_row(UPSERT, dict(aid=aid, bid=bid, abalance=abalance))
    emit(conn, 'bench.account_saved', row, key=str(aid))
    return row


@use_schema(RowsSchema)
@inject_conn(named=True, autocommit=True)
def rows(conn: Connection, first: int, count: int) -> list[Row]:
    return get_db_from_conn(conn).fetch_all(SQL_ROWS, dict(first=first, last=first + count - 1))
