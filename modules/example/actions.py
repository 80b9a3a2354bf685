"""The example module's actions: plain functions; the decorators only declare what they need."""

from datetime import UTC, datetime
from typing import Any

from psycopg2.extensions import connection as Connection

from lib import Row, emit, get_db_from_conn, inject_conn, not_found, returns, use_schema

from .schemas import FooResultSchema, FooSchema, NameSchema, NewUserSchema, UserSchema
from .sql import SQL_USER


def ping() -> bool:
    """No body, no database: answers true."""
    return True


@use_schema(FooSchema)
@returns(FooResultSchema)
def foo(name: str, email: str | None = None) -> dict[str, Any]:
    """Echo the validated body with the server's time; no database."""
    return dict(name=name, email=email, time=datetime.now(UTC))


@use_schema(NewUserSchema)
@returns(UserSchema, many=True)
@inject_conn()  # one transaction: committed when the action returns, rolled back if it raises
def bar(conn: Connection, name: str, email: str | None = None) -> list[Row]:
    """Create or update the user `name`, and answer the stored rows for that name; every other
    service hears `user.saved` once the transaction commits."""
    db = get_db_from_conn(conn)
    saved = db.upsert('users', dict(email=email or ''), dict(name=name))
    emit(conn, 'user.saved', saved, key=name)
    return db.fetch_all(SQL_USER, dict(name=name))


@use_schema(NameSchema)
@returns(UserSchema)
@inject_conn(autocommit=True)  # a single read needs no transaction
def user(conn: Connection, name: str) -> Row:
    """One user by name; 404 when there is none."""
    row = get_db_from_conn(conn).fetch_row(SQL_USER, dict(name=name))
    if row is None:
        raise not_found(f'no user named {name!r}')
    return row
