from datetime import UTC, datetime

from psycopg2.extensions import connection as Connection

from lib.db import get_conn_from_dbname, get_db_from_conn, transactional
from lib.decorators import inject_conn, use_schema
from settings import DEFAULT

from .schemas import FooSchema
from .sql import SQL_USERS


def ping() -> bool:
    return True


@use_schema(FooSchema)
def foo(name: str, email: str | None = None) -> dict:
    return dict(name=name, email=email, time=datetime.now(UTC))


@use_schema(FooSchema)
@inject_conn(DEFAULT, named=True, autocommit=False)
def bar(conn: Connection, name: str, email: str | None = None) -> list[dict]:
    # Write inside a transaction on the injected connection...
    with transactional(conn) as db:
        db.upsert('users', dict(email=email or ''), dict(name=name))

    # ...and read it back on a second connection, which goes back to the pool with the request.
    db2 = get_db_from_conn(get_conn_from_dbname(DEFAULT))
    return db2.fetch_all(SQL_USERS, dict(name=name))
