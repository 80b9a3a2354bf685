"""Server-side prepared statements: parsed and planned once per connection, then run by name.

For a key lookup, parsing and planning are a large part of PostgreSQL's own work per query
(docs/performance.md has the figures). A module opts in per statement, in its `sql.py`:

    READ = Prepared('SELECT ... WHERE aid = %(aid)s', aid='integer')

and passes it to the `Db` helpers (or `execute_prepared`) in place of the text. Every parameter is
declared with its SQL type, so its meaning does not depend on the value sent: a value is
converted to that type as on an INSERT into such a column (`1.5` into `integer` is 2; a value
out of range is an error, SQLSTATE 22003). An undeclared parameter would be typed by its
first use, and a bare `%(x)s` in a select list would turn every value into text.

psycopg2 speaks only the simple protocol: the statement is `PREPARE`d by text, and each
call is `EXECUTE name(<values>)`, the values quoted by psycopg2 as in any query. A prepared
statement belongs to its session and survives a rollback (PostgreSQL does not undo PREPARE),
so each pooled connection prepares each statement once. A placeholder inside a quoted
literal is replaced as psycopg2 would replace it, which is never what such a query means.

A connection whose `session_state` is False (a database behind pgbouncer in transaction mode,
lib/pgbouncer.py) keeps nothing between transactions, so there the statement runs as its
`plain` text: the query with each parameter written `CAST(%(x)s AS <type>)`. The declared type
still decides what a value means, by an explicit cast rather than EXECUTE's assignment cast
(they differ only on conversions PostgreSQL allows explicitly, like a boolean into an integer).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg2
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

PLACEHOLDER = re.compile(r'%\((\w+)\)s|%%|%')
# A type name as SQL writes one: `integer`, `numeric(10, 2)`, `timestamp with time zone`, `int4[]`.
TYPE_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_ .,()\[\]]*')
# SQLSTATEs that mean the server no longer holds the statement as this connection believes:
# gone (DISCARD ALL, DEALLOCATE), or planned for a table whose columns have changed since.
STALE = frozenset({'26000', '0A000'})
PREPARED_KEY = 'dbapi_prepared'  # in a connection's __dict__: the names it has prepared
# The same for connections that have no __dict__ (plain psycopg2 ones); forgotten with them.
_prepared_elsewhere: weakref.WeakKeyDictionary[Connection, set[str]] = weakref.WeakKeyDictionary()


class Prepared:
    """One statement, with named `%(x)s` parameters, each declared with its SQL type."""

    __slots__ = ('call', 'name', 'params', 'plain', 'prepare', 'query')

    def __init__(self, query: str, /, **types: str) -> None:
        params, text = parse(query)
        unknown, undeclared = set(types) - set(params), [name for name in params if name not in types]
        if undeclared or unknown:
            raise ValueError(
                f'prepared statement: declare a type for each parameter, and only for those '
                f'(undeclared: {undeclared}, not in the query: {sorted(unknown)})'
            )
        for name, type_name in types.items():
            if not TYPE_NAME.fullmatch(type_name):
                raise ValueError(f'prepared statement: parameter {name!r} has no plain SQL type name: {type_name!r}')
        declared = ', '.join(types[name] for name in params)
        self.query = query
        self.params = params
        self.name = 'dbapi_' + hashlib.sha256(f'{declared}\0{text}'.encode()).hexdigest()[:24]
        self.prepare = f'PREPARE {self.name} ({declared}) AS {text}' if params else f'PREPARE {self.name} AS {text}'
        values = ', '.join(f'%({name})s' for name in params)
        self.call = f'EXECUTE {self.name} ({values})' if params else f'EXECUTE {self.name}'
        self.plain = typed_text(query, types)

    def __repr__(self) -> str:
        return f'Prepared({self.query!r})'


def parse(query: str) -> tuple[list[str], str]:
    """The parameter names in order of first use, and the text with `$n` in their place."""
    params: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            if match.group(0) == '%':
                raise ValueError(
                    f'prepared statement: a lone % in {query!r}: parameters are named, %(name)s, and a literal % is %%'
                )
            return '%'
        if name not in params:
            params.append(name)
        return f'${params.index(name) + 1}'

    return params, PLACEHOLDER.sub(replace, query)


def typed_text(query: str, types: Mapping[str, str]) -> str:
    """`query` for psycopg2 with each `%(x)s` cast to its declared type (`%%` stays for psycopg2)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        return match.group(0) if name is None else f'CAST(%({name})s AS {types[name]})'

    return PLACEHOLDER.sub(replace, query)


def execute_prepared(
    cursor: Cursor,
    statement: Prepared,
    params: Mapping[str, Any] | Sequence[Any] | None,
    before: str = '',
    after: str = '',
) -> None:
    """Run `statement` on the cursor's connection, preparing it there first if need be; on a
    connection that keeps no session state, as its plain text. `before` and `after` (SQL without
    parameters, `BEGIN; ` and `; COMMIT` say) go out in the same message: one round trip."""
    if statement.params and type(params) is not dict and not isinstance(params, Mapping):
        raise TypeError(f'{statement!r} takes its parameters by name {statement.params}, not {type(params).__name__}')
    conn = cursor.connection
    if not getattr(conn, 'session_state', True):
        # A mapping even when empty: psycopg2 then reads %% as %.
        cursor.execute(escaped(before) + statement.plain + escaped(after), params or {})
        return
    prepared = names_prepared_on(conn)
    if statement.name not in prepared:
        cursor.execute(statement.prepare)
        prepared.add(statement.name)
    try:
        if before or after:
            cursor.execute(escaped(before) + statement.call + escaped(after), params or {})
        else:
            cursor.execute(statement.call, params)
    except psycopg2.Error as error:
        if error.pgcode in STALE:
            # The server no longer holds the statement as this session believes. Closing the
            # connection makes the pool replace it, and the new session prepares afresh; rarer
            # than any other failure, so no repair in place (in a transaction there could be none).
            conn.close()
        raise


def escaped(text: str) -> str:
    """SQL text that goes out beside parameters: a literal % doubled, as psycopg2 reads it."""
    return text.replace('%', '%%')


def names_prepared_on(conn: Connection) -> set[str]:
    """The statements `conn` has prepared: kept on the connection when it can hold attributes
    (the pool's connections), else in a weak mapping that forgets them with the connection."""
    try:
        names = conn.__dict__
    except AttributeError:
        return _prepared_elsewhere.setdefault(conn, set())
    prepared = names.get(PREPARED_KEY)
    if prepared is None:
        prepared = names[PREPARED_KEY] = set()
    return prepared
