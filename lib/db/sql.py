"""Running SQL: server-side prepared statements, and the `Db` helpers actions use.

Server-side prepared statements are parsed and planned once per connection, then run by name.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from operator import attrgetter
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from psycopg2.extensions import cursor as PlainCursor

Params = Mapping[str, Any] | Sequence[Any] | None
COLUMN_NAME = attrgetter('name')  # of a cursor.description entry
Row = dict[str, Any] | tuple[Any, ...]

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


# --- the Db helpers ---------------------------------------------------------------------------

Query = str | sql.Composable | Prepared


def get_db_from_conn(conn: Connection) -> Db:
    return Db(conn)


def quote(name: str) -> sql.SQL:
    """One quoted identifier, ready for a query that is executed with parameters.

    `psycopg2.sql.Identifier` leaves `%` alone, so a name holding `%s` would be read as a
    placeholder; doubling it keeps the name a name. The queries built here always pass
    parameters (at least an empty list), which is what makes `%%` mean `%`.
    """
    if not isinstance(name, str) or not name or '\x00' in name:
        raise ValueError(f'identifier {name!r} must be a non-empty string without NUL')
    return sql.SQL('"' + name.replace('"', '""').replace('%', '%%') + '"')


def identifier(name: str) -> sql.Composed:
    """A table or function name; `schema.table` becomes "schema"."table"."""
    if not isinstance(name, str) or not name:
        raise ValueError(f'identifier {name!r} must be a non-empty string')
    return sql.SQL('.').join(quote(part) for part in name.split('.'))


def _columns(names: Iterable[str]) -> sql.Composed:
    return sql.SQL(', ').join(map(quote, names))


def _pairs(values: Mapping[str, Any], prefix: str, params: dict[str, Any], glue: str = ' AND ') -> sql.Composable:
    """`"col" = %(p0)s` joined by `glue`; values go to `params` under generated names.

    Placeholder names never come from column names, so a hostile column name can only ever
    be a (quoted) identifier.
    """
    parts = []
    for index, (column, value) in enumerate(values.items()):
        key = f'{prefix}{index}'
        params[key] = value
        parts.append(sql.SQL('{} = {}').format(quote(column), sql.Placeholder(key)))
    return sql.SQL(glue).join(parts) if parts else sql.SQL('TRUE')


@lru_cache(maxsize=512)
def row_builder(columns: tuple[str, ...]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """A function making one row's dict with a dict display, cheaper than `dict(zip(...))`.

    The compiled text holds only generated names and indexes; the column names stay values in
    its namespace, so no column name can ever become code. A repeated name keeps its last value,
    as `dict(zip(...))` does.
    """
    names = {f'c{index}': name for index, name in enumerate(columns)}
    items = ', '.join(f'c{index}: row[{index}]' for index in range(len(columns)))
    # Safe eval: the text is built just above from indexes only.
    builder: Callable[[Sequence[Any]], dict[str, Any]] = eval(f'lambda row: {{{items}}}', names)  # noqa: S307  # nosec B307
    return builder


def execute_query(cursor: PlainCursor, query: Query, params: Params) -> None:
    """`cursor.execute`, which also runs a `Prepared` statement (lib/prepared.py)."""
    if isinstance(query, Prepared):
        execute_prepared(cursor, query, params)
    else:
        cursor.execute(query, params)


def tuple_cursor(conn: Connection) -> PlainCursor:
    """`conn.cursor(cursor_factory=PlainCursor)`: rows as tuples. A pooled connection names the
    class that makes (`tuple_cursor`, lib.db.connections): made directly, without its `cursor`
    method in Python."""
    make: type[PlainCursor] | None = getattr(conn, 'tuple_cursor', None)
    if make is None:
        return conn.cursor(cursor_factory=PlainCursor)
    return make(conn)


class Db:
    """Small helpers over one connection: identifiers quoted, every value a bound parameter."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.named = getattr(conn, 'named', True)

    def cursor(self) -> PlainCursor:
        # Always tuples underneath: `_rows` builds the dicts itself. `tuple_cursor`, inlined:
        # every statement of the helpers passes here.
        make: type[PlainCursor] | None = getattr(self.conn, 'tuple_cursor', None)
        if make is None:
            return self.conn.cursor(cursor_factory=PlainCursor)
        return make(self.conn)

    def _rows(self, cursor: Any) -> list[Row]:
        if cursor.description is None:
            return []
        rows: list[Any] = cursor.fetchall()
        if not self.named:
            return rows
        # Plain tuples made into dicts by a compiled builder, cheaper than RealDictCursor.
        return list(map(row_builder(tuple(map(COLUMN_NAME, cursor.description))), rows))

    def fetch_all(self, query: Query, params: Params = None) -> list[Row]:
        with self.cursor() as cursor:
            execute_query(cursor, query, params)
            return self._rows(cursor)

    def fetch_row(self, query: Query, params: Params = None) -> Row | None:
        rows = self.fetch_all(query, params)
        return rows[0] if rows else None

    def fetch_one(self, query: Query, params: Params = None) -> Any:
        """The first column of the first row, or None."""
        with self.cursor() as cursor:
            execute_query(cursor, query, params)
            row = cursor.fetchone() if cursor.description else None
            return row[0] if row else None

    def execute(self, query: Query, params: Params = None) -> int:
        """Run a statement; the number of rows it touched."""
        with self.cursor() as cursor:
            execute_query(cursor, query, params)
            return cursor.rowcount

    def select(self, table: str, where: Mapping[str, Any] | None = None) -> list[Row]:
        params: dict[str, Any] = {}
        query = sql.SQL('SELECT * FROM {} WHERE {}').format(identifier(table), _pairs(where or {}, 'w', params))
        return self.fetch_all(query, params)

    def insert(self, table: str, values: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Row]:
        """Insert one row (a dict) or several (a list of dicts with the same keys); the rows written."""
        rows = [values] if isinstance(values, Mapping) else list(values)
        if not rows:
            return []
        columns = list(rows[0])
        for row in rows:
            if list(row) != columns:
                raise ValueError(f'insert into {table!r}: every row needs the columns {columns}, got {list(row)}')
        placeholders = sql.SQL('({})').format(sql.SQL(', ').join(sql.Placeholder() * len(columns)))
        query = sql.SQL('INSERT INTO {} ({}) VALUES {} RETURNING *').format(
            identifier(table), _columns(columns), sql.SQL(', ').join([placeholders] * len(rows))
        )
        return self.fetch_all(query, [row[column] for row in rows for column in columns])

    def update(self, table: str, data: Mapping[str, Any], identifier_: Mapping[str, Any]) -> int:
        """Set `data` on the rows matching `identifier_`; how many rows changed."""
        if not data:
            raise ValueError(f'update of {table!r} needs at least one column to set')
        if not identifier_:
            raise ValueError(f'update of {table!r} needs an identifier: refusing to update every row')
        params: dict[str, Any] = {}
        query = sql.SQL('UPDATE {} SET {} WHERE {}').format(
            identifier(table), _pairs(data, 's', params, glue=', '), _pairs(identifier_, 'w', params)
        )
        return self.execute(query, params)

    def upsert(self, table: str, data: Mapping[str, Any], identifier_: Mapping[str, Any]) -> Row | None:
        """Insert, or update on conflict with `identifier_`'s unique key, in one atomic statement."""
        if not identifier_:
            raise ValueError(f'upsert into {table!r} needs an identifier (a unique key)')
        values = {**identifier_, **data}
        # Nothing to update still returns the row: a no-op update of the key locks and returns it.
        updated = list(data) or [next(iter(identifier_))]
        query = sql.SQL('INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {} RETURNING *').format(
            identifier(table),
            _columns(values),
            sql.SQL(', ').join(sql.Placeholder() * len(values)),
            _columns(identifier_),
            sql.SQL(', ').join(sql.SQL('{0} = EXCLUDED.{0}').format(quote(c)) for c in updated),
        )
        return self.fetch_row(query, list(values.values()))

    def delete(self, table: str, where: Mapping[str, Any]) -> int:
        if not where:
            raise ValueError(f'delete needs a condition: refusing to empty {table!r}')
        params: dict[str, Any] = {}
        query = sql.SQL('DELETE FROM {} WHERE {}').format(identifier(table), _pairs(where, 'w', params))
        return self.execute(query, params)

    def _call(self, function: str, params: Sequence[Any] | Mapping[str, Any] | None) -> tuple[sql.Composable, Any]:
        if isinstance(params, Mapping):
            arguments = sql.SQL(', ').join(
                sql.SQL('{} => {}').format(quote(name), sql.Placeholder()) for name in params
            )
            return sql.SQL('SELECT * FROM {}({})').format(identifier(function), arguments), list(params.values())
        params = list(params or ())
        arguments = sql.SQL(', ').join(sql.Placeholder() * len(params))
        return sql.SQL('SELECT * FROM {}({})').format(identifier(function), arguments), params

    def sp_fetch_one(self, function: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
        """Call a stored function; the first column of its first row."""
        return self.fetch_one(*self._call(function, params))

    def sp_fetch_all(self, function: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[Row]:
        """Call a set-returning stored function; all its rows."""
        return self.fetch_all(*self._call(function, params))
