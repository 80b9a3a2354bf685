"""The transaction lib holds for an action (lib/db/connections.py): lib sends BEGIN with the
action's first statement and COMMIT after it returns, read off the wire (tests/pg_wire.py); and
whatever the action runs its statements with (a server-side cursor, executemany, COPY, a cursor
class of its own), they commit together or not at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from lib.db.connections import ConnSpec, pools, run
from lib.db.sql import tuple_cursor
from tests.conftest import AUTH, make_app, query
from tests.logs import read_lines
from tests.pg_wire import QueryLog


def note() -> str:
    return f'tx-{uuid.uuid4().hex[:12]}'


def notes(db: Any, text: str) -> int:
    return int(query(db, 'SELECT count(*) FROM probe_log WHERE note = %s', [text])[0][0])


@pytest.fixture
def wire(database: dict[str, Any]) -> Iterator[QueryLog]:
    with QueryLog(database['host'], database['port']) as log:
        yield log


@pytest.fixture
def wired(database: dict[str, Any], log_dir: str, wire: QueryLog) -> Iterator[Flask]:
    """An app whose connections go through `wire`."""
    app = make_app({**database, **wire.params}, log_dir)
    yield app
    app.extensions['dbapi.pools'].close()


def sent(app: Flask, wire: QueryLog, path: str, body: Any = None) -> tuple[int, list[str]]:
    """The status of POST `path`, and the queries its request sent."""
    wire.take()
    response = app.test_client().post(path, json=body, headers=AUTH)
    return response.status_code, wire.take()


def test_begin_goes_out_with_the_first_statement_and_commit_after_the_last(
    wired: Flask, wire: QueryLog, db: Any
) -> None:
    assert sent(wired, wire, '/probe/write_note', {'note': note()})[0] == 200  # the pool's connection is open
    text = note()
    status, queries = sent(wired, wire, '/probe/write_note', {'note': text})
    assert status == 200
    assert len(queries) == 2, queries  # psycopg2 alone sent BEGIN, the INSERT, COMMIT: three round trips
    assert queries[0].startswith('BEGIN; INSERT INTO probe_log') and f"'{text}'" in queries[0]
    assert queries[1] == 'COMMIT'
    assert notes(db, text) == 1


def test_an_action_that_runs_nothing_sends_nothing(wired: Flask, wire: QueryLog) -> None:
    assert sent(wired, wire, '/probe/write_note', {'note': note()})[0] == 200
    assert sent(wired, wire, '/probe/backend_pid') == (200, [])


def test_an_action_that_raises_is_rolled_back(wired: Flask, wire: QueryLog, db: Any) -> None:
    text = note()
    status, queries = sent(wired, wire, '/probe/write_then_fail', {'note': text})
    assert status == 500
    assert queries[0].startswith('BEGIN; INSERT INTO') and queries[-1] == 'ROLLBACK'
    assert notes(db, text) == 0
    status, queries = sent(wired, wire, '/probe/divide_by_zero')
    assert status == 400 and queries == ['BEGIN; SELECT 1 / 0', 'ROLLBACK']  # 22012: the data's fault


@pytest.mark.parametrize('action', ['note_then_named_cursor', 'named_cursor_then_note'])
def test_a_server_side_cursor_runs_in_the_actions_transaction(api: Any, db: Any, action: str) -> None:
    """psycopg2 refuses a named cursor outside a transaction: lib hands the transaction to it,
    before or after lib's BEGIN went out, and the action's writes commit or roll back as one."""
    kept, dropped = note(), note()
    response = api.post(f'/probe/{action}', {'note': kept})
    assert response.status_code == 200 and response.get_json() == [1, 2, 3]
    assert api.post(f'/probe/{action}', {'note': dropped, 'fail': True}).status_code == 500
    assert (notes(db, kept), notes(db, dropped)) == (1, 0)
    assert api.post('/probe/write_note', {'note': kept}).status_code == 200  # the connection is clean again
    assert notes(db, kept) == 2


@pytest.mark.parametrize('action', ['many_notes', 'copied_note'])
def test_executemany_copy_and_a_cursor_class_of_the_actions_own_join_its_transaction(
    api: Any, db: Any, action: str
) -> None:
    kept, dropped = note(), note()
    written = api.post(f'/probe/{action}', {'note': kept})
    assert written.status_code == 200
    assert api.post(f'/probe/{action}', {'note': dropped, 'fail': True}).status_code == 500
    assert (notes(db, kept), notes(db, dropped)) == (written.get_json(), 0)


def test_an_action_that_catches_a_statements_error_and_goes_on_commits_nothing_and_says_so(
    api: Any, db: Any, log_dir: str
) -> None:
    """A failed transaction's COMMIT is a rollback PostgreSQL answers without an error: the
    request must not answer 200 over writes that are gone."""
    text = note()
    response = api.post('/probe/swallowed_error', {'note': text})
    assert response.status_code == 500
    assert response.get_json()['type'] == 'urn:dbapi:problem:internal-error'
    assert notes(db, text) == 0
    [logged] = [r for r in read_lines(log_dir) if r['log.logger'] == 'dbapi.errors']
    assert logged['error.type'] == 'TransactionFailed'
    assert logged['error.message'].startswith("the request's transaction had failed")


def test_the_next_user_of_a_connection_inherits_no_transaction_to_begin(app: Flask, db: Any) -> None:
    """An action that raised before running anything leaves lib's BEGIN unsent: a user of the
    pool's connection without `prepare` (the pool's own sweep) must not send it for it."""
    text = note()
    with app.app_context():
        pool = pools().get('default')

        def fails(conn: Any) -> None:
            raise RuntimeError('before any statement')

        with pytest.raises(RuntimeError):
            run(pool, ConnSpec('default', named=True, autocommit=False), fails)
        with pool.connection() as conn:  # the same one: the pool lends the warmest
            conn.autocommit = True
            with tuple_cursor(conn) as cursor:
                cursor.execute('INSERT INTO probe_log (note) VALUES (%s)', [text])
    assert notes(db, text) == 1
