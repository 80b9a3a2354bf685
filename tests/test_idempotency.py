"""Idempotency-Key: a request sent again answers what the first answered, and never writes twice.

Every test checks the effect in the database: the rows the appends wrote, and the answers stored.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from flask import Flask

from lib.db.idempotency import SWEEPER, sweep
from tests.conftest import (
    AUTH,
    MODULES,
    PG,
    TOKEN,
    Api,
    apply_migrations,
    create_database,
    drop_database,
    make_app,
    query,
)
from tests.ledger import app_fixture, fresh_ledger, ledger_app, notes, stored
from tests.logs import access_records, read_lines
from tests.modules.ledger import actions


@pytest.fixture
def app(ledger_database: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    yield from app_fixture(ledger_database, log_dir)


@pytest.fixture
def ledger(ledger_database: dict[str, Any]) -> Iterator[psycopg2.extensions.connection]:
    yield from fresh_ledger(ledger_database)


def keyed(key: str) -> dict[str, str]:
    return {'Idempotency-Key': key}


def test_a_repeat_answers_the_stored_answer_without_running_the_action(api: Api, ledger) -> None:
    first = api.post('/ledger/append', {'note': 'once'}, headers=keyed('k-1'))
    again = api.post('/ledger/append', {'note': 'once'}, headers=keyed('k-1'))
    assert first.status_code == again.status_code == 200
    assert again.data == first.data
    assert again.headers['Idempotent-Replayed'] == 'true'
    assert 'Idempotent-Replayed' not in first.headers
    assert notes(ledger) == ['once']
    assert actions.calls == ['append']
    assert stored(ledger) == [('default', 'k-1', 'ledger/append', 200, first.data)]


def test_without_a_key_every_request_runs(api: Api, ledger) -> None:
    for _ in range(2):
        assert api.post('/ledger/append', {'note': 'twice'}).status_code == 200
    assert notes(ledger) == ['twice', 'twice']
    assert stored(ledger) == []


def test_keys_belong_to_their_caller(ledger_database: dict[str, Any], log_dir: str, tmp_path: Path, ledger) -> None:
    other = 'billing-token-0123456789abcdef'
    path = tmp_path / 'callers.toml'
    digest = hashlib.sha256(other.encode()).hexdigest()
    path.write_text(f'[callers.billing]\ntokens_sha256 = ["{digest}"]\nscopes = ["ledger"]\n')
    application = ledger_app(ledger_database, log_dir, CALLERS_FILE=str(path))
    client = application.test_client()
    try:
        for token in (TOKEN, other, other):
            headers = {'Authorization': f'Bearer {token}', **keyed('shared')}
            assert client.post('/ledger/append', json={'note': token[:7]}, headers=headers).status_code == 200
    finally:
        application.extensions['dbapi.pools'].close()
    assert notes(ledger) == ['testing', 'billing']
    assert [row[:3] for row in stored(ledger)] == [
        ('billing', 'shared', 'ledger/append'),
        ('default', 'shared', 'ledger/append'),
    ]


def test_the_quoted_form_of_the_draft_is_the_same_key(api: Api, ledger) -> None:
    api.post('/ledger/append', {'note': 'q'}, headers=keyed('"abc"'))
    again = api.post('/ledger/append', {'note': 'q'}, headers=keyed('abc'))
    assert again.headers['Idempotent-Replayed'] == 'true'
    assert notes(ledger) == ['q']


@pytest.mark.parametrize(
    'key',
    ['', '""', 'x' * 256, 'caf\u00e9', 'tab\there', '\x7f'],
    ids=['empty', 'empty-quoted', 'too-long', 'not-ascii', 'control', 'delete'],
)
def test_a_malformed_key_is_a_400_and_nothing_runs(api: Api, ledger, key: str) -> None:
    response = api.post('/ledger/append', {'note': 'no'}, headers=keyed(key))
    assert response.status_code == 400
    assert response.get_json()['detail'] == 'Idempotency-Key must be 1 to 255 printable ASCII characters'
    assert notes(ledger) == []
    assert actions.calls == []


def test_the_longest_key_is_accepted(api: Api, ledger) -> None:
    assert api.post('/ledger/append', {'note': 'long'}, headers=keyed('~' * 255)).status_code == 200
    assert stored(ledger)[0][1] == '~' * 255


@pytest.mark.parametrize(
    ('path', 'body', 'detail'),
    [
        ('/ledger/append', {'note': 'other body'}, 'this Idempotency-Key was used with another body'),
        ('/ledger/add_code', {'note': 'same', 'code': 'c'}, "this Idempotency-Key was used for 'ledger/append'"),
    ],
    ids=['another-body', 'another-action'],
)
def test_the_same_key_on_another_request_is_a_422(api: Api, ledger, path: str, body: dict, detail: str) -> None:
    api.post('/ledger/append', {'note': 'same'}, headers=keyed('reused'))
    response = api.post(path, body, headers=keyed('reused'))
    assert response.status_code == 422
    assert response.get_json()['type'] == 'urn:dbapi:problem:idempotency-key-reused'
    assert response.get_json()['detail'].startswith(detail)
    assert notes(ledger) == ['same']


def test_a_4xx_of_the_action_is_stored_and_its_writes_rolled_back(api: Api, ledger) -> None:
    first = api.post('/ledger/append_then_refuse', {'note': 'gone'}, headers=keyed('refused'))
    again = api.post('/ledger/append_then_refuse', {'note': 'gone'}, headers=keyed('refused'))
    assert first.status_code == again.status_code == 404
    assert again.data == first.data
    assert again.headers['Idempotent-Replayed'] == 'true'
    assert actions.calls == ['append_then_refuse']
    assert notes(ledger) == []
    assert [row[:4] for row in stored(ledger)] == [('default', 'refused', 'ledger/append_then_refuse', 404)]


def test_a_database_4xx_is_stored_too(api: Api, ledger) -> None:
    assert api.post('/ledger/add_code', {'note': 'a', 'code': 'dup'}).status_code == 200
    first = api.post('/ledger/add_code', {'note': 'b', 'code': 'dup'}, headers=keyed('dup'))
    assert first.status_code == 409
    assert first.get_json()['type'] == 'urn:dbapi:problem:unique-violation'
    query(ledger, "DELETE FROM ledger_entries WHERE code = 'dup'")
    again = api.post('/ledger/add_code', {'note': 'b', 'code': 'dup'}, headers=keyed('dup'))
    assert (again.status_code, again.data) == (409, first.data)  # the stored answer, not a new run
    assert notes(ledger) == []


@pytest.mark.parametrize(
    ('route', 'status'),
    [('append_then_crash', 500), ('append_then_serialization_failure', 409)],
    ids=['5xx', 'serialization-failure'],
)
def test_an_answer_a_retry_may_change_is_not_stored(api: Api, ledger, route: str, status: int) -> None:
    for _ in range(2):
        response = api.post(f'/ledger/{route}', {'note': 'retry me'}, headers=keyed('retry'))
        assert response.status_code == status
        assert 'Idempotent-Replayed' not in response.headers
    assert actions.calls == [route, route]  # the retry ran the action again
    assert notes(ledger) == []
    assert stored(ledger) == []


def test_a_repeat_while_the_first_runs_is_a_409_that_never_waits(app: Flask, api: Api, ledger) -> None:
    answers: list[Any] = []
    body = {'note': 'slow', 'seconds': 1.5}
    first = threading.Thread(
        target=lambda: answers.append(
            app.test_client().post('/ledger/append_slowly', json=body, headers={**AUTH, **keyed('busy')})
        )
    )
    first.start()
    deadline = time.monotonic() + 10
    while 'append_slowly' not in actions.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    repeat = api.post('/ledger/append_slowly', body, headers=keyed('busy'))
    running = first.is_alive()  # the repeat did not wait for the first to finish
    first.join()
    assert running
    assert repeat.status_code == 409
    assert repeat.headers['Retry-After'] == '1'
    assert repeat.get_json()['type'] == 'urn:dbapi:problem:idempotency-key-in-use'
    after = api.post('/ledger/append_slowly', body, headers=keyed('busy'))
    assert answers[0].status_code == 200
    assert (after.status_code, after.data) == (200, answers[0].data)
    assert notes(ledger) == ['slow']


def test_an_action_without_a_database_runs_as_usual(api: Api, ledger) -> None:
    for _ in range(2):
        response = api.post('/ledger/echo', {'note': 'hi'}, headers=keyed('echo'))
        assert (response.status_code, response.get_json()) == (200, 'hi')
    assert actions.calls == ['echo', 'echo']
    assert stored(ledger) == []


def test_a_key_on_an_autocommit_action_is_refused_saying_why(api: Api, ledger) -> None:
    response = api.post('/ledger/count', headers=keyed('ac'))
    assert response.status_code == 422
    assert response.get_json()['detail'].startswith("'ledger/count' runs in autocommit")
    assert actions.calls == []


def test_a_nested_transactional_block_is_a_savepoint(api: Api, ledger) -> None:
    body = {'outer': 'outer', 'inner': 'inner', 'fail_inner': True}
    response = api.post('/ledger/nested', body, headers=keyed('nested'))
    assert response.get_json() == ['outer']  # the inner block rolled back alone
    assert api.post('/ledger/nested', {**body, 'fail_inner': False}).get_json() == ['outer', 'outer', 'inner']
    assert notes(ledger) == ['outer', 'outer', 'inner']
    assert len(stored(ledger)) == 1


def test_an_expired_key_runs_again_and_the_sweep_deletes_in_batches(
    ledger_database: dict[str, Any], log_dir: str, ledger
) -> None:
    application = ledger_app(ledger_database, log_dir, IDEMPOTENCY_TTL=1)
    client = application.test_client()
    headers = {**AUTH, **keyed('short')}
    try:
        first = client.post('/ledger/append', json={'note': 'n'}, headers=headers)
        query(ledger, "UPDATE dbapi_idempotency SET created_at = now() - interval '2 seconds'")
        again = client.post('/ledger/append', json={'note': 'n'}, headers=headers)
        assert 'Idempotent-Replayed' not in again.headers
        assert again.get_json()['id'] == first.get_json()['id'] + 1
        assert len(stored(ledger)) == 1  # the expired answer was replaced
        query(
            ledger,
            'INSERT INTO dbapi_idempotency (caller, key, action, body_sha256, status, content_type, answer, created_at)'
            " SELECT 'old', g::text, 'ledger/append', '', 200, 'application/json', '', now() - interval '1 hour'"
            ' FROM generate_series(1, 2500) AS g',
        )
        with application.app_context():
            pool = application.extensions['dbapi.pools'].get('default')
            assert sweep(pool, ttl=1, batch=1000) == 2500
    finally:
        application.extensions['dbapi.pools'].close()
    assert [row[:2] for row in stored(ledger)] == [('default', 'short')]


def test_the_access_record_names_the_key_and_the_replay(api: Api, ledger, log_dir: str) -> None:
    api.post('/ledger/append', {'note': 'logged'}, headers=keyed('logged-key'))
    api.post('/ledger/append', {'note': 'logged'}, headers=keyed('logged-key'))
    records = access_records(read_lines(log_dir))
    assert [(r['dbapi.idempotency.key'], r['dbapi.idempotency.replayed']) for r in records[-2:]] == [
        ('logged-key', False),
        ('logged-key', True),
    ]


def test_without_the_table_the_client_gets_a_500_and_the_log_says_how_to_fix_it(log_dir: str) -> None:
    name = create_database('dbapi_no_table')
    params = dict(PG, dbname=name)
    apply_migrations(params, MODULES, own=False)  # the modules' tables, not dbapi's own
    application = make_app(params, log_dir)
    try:
        response = application.test_client().post(
            '/probe/write_note', json={'note': 'x'}, headers={**AUTH, **keyed('k')}
        )
    finally:
        application.extensions['dbapi.pools'].close()
        drop_database(name)
    assert response.status_code == 500
    assert response.get_json()['type'] == 'urn:dbapi:problem:idempotency-not-set-up'
    errors = [r for r in read_lines(log_dir) if r.get('log.level') == 'error']
    assert any('flask --app app migrate' in json.dumps(r) for r in errors)


def test_a_keyed_request_starts_the_sweep_in_the_background(
    ledger_database: dict[str, Any], log_dir: str, ledger
) -> None:
    """The sweep's own schedule: a keyed write starts it (at most once a minute per worker and
    database), in a thread of its own; it deletes what expired and nothing else."""
    query(
        ledger,
        'INSERT INTO dbapi_idempotency (caller, key, action, body_sha256, status, content_type, answer, created_at)'
        " SELECT 'old', g::text, 'ledger/append', '', 200, 'application/json', '', now() - interval '2 days'"
        ' FROM generate_series(1, 1500) AS g',
    )
    SWEEPER.next_at.clear()  # as in a new worker: the first keyed write starts a sweep
    application = ledger_app(ledger_database, log_dir)
    try:
        response = application.test_client().post('/ledger/append', json={'note': 's'}, headers={**AUTH, **keyed('k')})
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while query(ledger, "SELECT count(*) FROM dbapi_idempotency WHERE caller = 'old'") != [(0,)]:
            assert time.monotonic() < deadline, 'the expired keys were not swept'
            time.sleep(0.05)
        assert SWEEPER.next_at['default'] > time.monotonic()  # the next one is a minute away
    finally:
        application.extensions['dbapi.pools'].close()
    assert [row[:2] for row in stored(ledger)] == [('default', 'k')]
