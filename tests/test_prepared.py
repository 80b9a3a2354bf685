"""Prepared statements: declared types, prepared once per connection, recovery when stale."""

from __future__ import annotations

import psycopg2
import pytest

from lib.db.pool import ConnectionPool
from lib.db.sql import Db, Prepared, parse
from tests.conftest import query

BY_KEY = 'SELECT k, v FROM prepared_t WHERE k = %(k)s'


@pytest.fixture
def table(db):
    query(db, 'DROP TABLE IF EXISTS prepared_t; CREATE TABLE prepared_t (k integer PRIMARY KEY, v text)')
    query(db, "INSERT INTO prepared_t VALUES (1, 'one'), (2, 'two'), (3, '100%')")
    return 'prepared_t'


@pytest.fixture
def conn(database, table):
    connection = psycopg2.connect(**database)
    connection.autocommit = True
    yield connection
    connection.close()


def prepared_names(conn) -> list[str]:
    with conn.cursor() as cursor:
        cursor.execute('SELECT name FROM pg_prepared_statements ORDER BY name')
        return [name for (name,) in cursor.fetchall()]


def test_placeholders_become_numbered_in_order_of_first_use():
    params, text = parse('SELECT %(b)s, %(a)s, %(b)s, 5 %% 2')
    assert params == ['b', 'a']
    assert text == 'SELECT $1, $2, $1, 5 % 2'


@pytest.mark.parametrize(
    ('query_text', 'types', 'message'),
    [
        (BY_KEY, {}, r"undeclared: \['k'\]"),
        (BY_KEY, {'k': 'integer', 'x': 'text'}, r"not in the query: \['x'\]"),
        (BY_KEY, {'k': 'integer; DROP TABLE prepared_t'}, 'no plain SQL type name'),
        ('SELECT 100 % 7 WHERE %(k)s', {'k': 'integer'}, 'a lone %'),
    ],
)
def test_every_parameter_needs_one_plain_type(query_text, types, message):
    with pytest.raises(ValueError, match=message):
        Prepared(query_text, **types)


def test_rows_as_a_plain_query_gives_them(conn):
    statement = Prepared(BY_KEY, k='integer')
    db = Db(conn)
    assert db.fetch_all(statement, {'k': 2}) == db.fetch_all(BY_KEY, {'k': 2}) == [{'k': 2, 'v': 'two'}]
    assert db.fetch_row(statement, {'k': 9}) is None
    assert db.fetch_one(Prepared("SELECT v FROM prepared_t WHERE v LIKE '%%\\%%'"), None) == '100%'
    update = Prepared('UPDATE prepared_t SET v = %(v)s WHERE k < %(k)s', v='text', k='integer')
    assert db.execute(update, {'v': 'x', 'k': 3}) == 2
    assert query(conn, 'SELECT v FROM prepared_t ORDER BY k') == [('x',), ('x',), ('100%',)]


def test_prepared_once_per_connection(database, conn):
    statement = Prepared(BY_KEY, k='integer')
    db = Db(conn)
    for key in (1, 2, 3, 1):
        db.fetch_row(statement, {'k': key})  # a second PREPARE of the name would fail (42P05)
    assert prepared_names(conn) == [statement.name]
    other = psycopg2.connect(**database)
    try:
        assert prepared_names(other) == []  # another session knows nothing of it
        assert Db(other).fetch_row(statement, {'k': 1}) == {'k': 1, 'v': 'one'}
        assert prepared_names(other) == [statement.name]
    finally:
        other.close()


def test_values_take_the_declared_type(conn):
    statement = Prepared('SELECT %(n)s AS n', n='integer')
    db = Db(conn)
    assert db.fetch_one(statement, {'n': 7}) == 7  # not '7': the type is declared, not guessed
    assert db.fetch_one(statement, {'n': '12'}) == 12
    assert db.fetch_one(statement, {'n': None}) is None
    with pytest.raises(psycopg2.errors.NumericValueOutOfRange):
        db.fetch_one(statement, {'n': 2**40})


def test_parameters_go_by_name(conn):
    with pytest.raises(TypeError, match=r"by name \['k'\], not tuple"):
        Db(conn).fetch_row(Prepared(BY_KEY, k='integer'), (1,))


def test_a_rollback_keeps_the_statement(conn):
    statement = Prepared(BY_KEY, k='integer')
    conn.autocommit = False
    db = Db(conn)
    assert db.fetch_row(statement, {'k': 1})  # prepared inside this transaction
    with pytest.raises(psycopg2.errors.DivisionByZero):
        db.fetch_one('SELECT 1 / 0')
    conn.rollback()
    assert db.fetch_row(statement, {'k': 2}) == {'k': 2, 'v': 'two'}  # PostgreSQL did not undo PREPARE
    conn.rollback()


@pytest.mark.parametrize(
    'make_stale',
    [
        'DEALLOCATE ALL',  # the statement is gone: 26000
        'ALTER TABLE prepared_t ADD COLUMN extra integer',  # `SELECT *` changes its columns: 0A000
    ],
)
def test_a_stale_statement_closes_its_connection_and_the_pool_replaces_it(database, db, make_stale):
    statement = Prepared('SELECT * FROM prepared_t WHERE k = %(k)s', k='integer')
    pool = ConnectionPool('t', dict(database), max_size=1, timeout=1)
    with pool.connection() as first:
        first.autocommit = True
        assert Db(first).fetch_row(statement, {'k': 1}) == {'k': 1, 'v': 'one'}
        if make_stale.startswith('DEALLOCATE'):
            query(first, make_stale)
        else:
            query(db, make_stale)
        with pytest.raises(psycopg2.Error) as caught:
            Db(first).fetch_row(statement, {'k': 1})
        assert caught.value.pgcode in {'26000', '0A000'}
        assert first.closed
    with pool.connection() as second:
        second.autocommit = True
        assert second is not first
        assert Db(second).fetch_row(statement, {'k': 1})['v'] == 'one'
    pool.close()
