"""POST /batch: every step checked before any runs, then all of them in one transaction.

Every test checks the effect in the database: a batch writes all its steps' rows or none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from flask import Flask

from tests.conftest import Api
from tests.ledger import app_fixture, fresh_ledger, ledger_app, notes, stored
from tests.logs import access_records, read_lines
from tests.modules.ledger import actions


@pytest.fixture
def app(ledger_database: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    yield from app_fixture(ledger_database, log_dir)


@pytest.fixture
def ledger(ledger_database: dict[str, Any]) -> Iterator[psycopg2.extensions.connection]:
    yield from fresh_ledger(ledger_database)


def step(action: str, **body: Any) -> dict[str, Any]:
    return {'action': action, 'body': body}


def test_the_steps_run_in_order_in_one_transaction(api: Api, ledger) -> None:
    response = api.post(
        '/batch',
        {
            'actions': [
                step('ledger/append', note='order'),
                step('ledger/add_code', note='line', code='L1'),
                step('ledger/find_codes', codes=['L1']),
                step('ledger/echo', note='no database'),
            ]
        },
    )
    assert response.status_code == 200
    results = response.get_json()['results']
    assert results[0]['note'] == 'order'
    assert results[1]['note'] == 'line'
    assert results[2] == [['L1', 'line']]  # the step's named=False holds inside the batch; it sees step 1's row
    assert results[3] == 'no database'
    assert notes(ledger) == ['order', 'line']
    assert actions.calls == ['append', 'add_code', 'find_codes', 'echo']


def test_the_first_failing_step_rolls_back_every_step_and_is_named(api: Api, ledger) -> None:
    body = {
        'actions': [
            step('ledger/append', note='first'),
            step('ledger/append_then_refuse', note='second'),
            step('ledger/append', note='never'),
        ]
    }
    response = api.post('/batch', body)
    assert response.status_code == 404
    problem = response.get_json()
    assert (problem['step'], problem['action']) == (1, 'ledger/append_then_refuse')
    assert problem['detail'] == "step 1 (ledger/append_then_refuse): nothing called 'second'"
    assert notes(ledger) == []
    assert actions.calls == ['append', 'append_then_refuse']


def test_a_database_error_in_a_step_rolls_back_the_batch(api: Api, ledger) -> None:
    body = {'actions': [step('ledger/add_code', note='a', code='same'), step('ledger/add_code', note='b', code='same')]}
    response = api.post('/batch', body)
    assert response.status_code == 409
    assert response.get_json()['type'] == 'urn:dbapi:problem:unique-violation'
    assert response.get_json()['step'] == 1
    assert notes(ledger) == []


@pytest.mark.parametrize(
    ('steps', 'status', 'failing'),
    [
        ([step('ledger/append', note='ok'), step('ledger/nope')], 404, (1, 'ledger/nope')),
        ([step('ledger/append', note='ok'), step('nomodule/append')], 404, (1, 'nomodule/append')),
        ([step('ledger/append', note='ok'), step('ledger/append')], 422, (1, 'ledger/append')),
        ([step('ledger/append', note=5)], 422, (0, 'ledger/append')),
        ([step('ledger/append', note='ok', extra=1)], 422, (0, 'ledger/append')),
        ([step('ledger/append', note='ok'), step('ledger/count')], 422, (1, 'ledger/count')),
    ],
    ids=['unknown-action', 'unknown-module', 'missing-field', 'wrong-type', 'unknown-field', 'autocommit'],
)
def test_a_bad_step_is_named_and_nothing_runs(
    api: Api, ledger, steps: list[dict[str, Any]], status: int, failing: tuple[int, str]
) -> None:
    response = api.post('/batch', {'actions': steps})
    assert response.status_code == status
    problem = response.get_json()
    assert (problem['step'], problem['action']) == failing
    assert actions.calls == []
    assert notes(ledger) == []


@pytest.mark.parametrize(
    'body',
    [
        {},
        {'actions': []},
        {'actions': 'ledger/append'},
        {'actions': [{'body': {}}]},
        {'actions': [{'action': 'ledger/echo', 'body': []}]},
        {'actions': [step('ledger/echo', note='x')], 'extra': True},
        {'actions': [step('ledger/echo', note='x')] * 101},
    ],
    ids=['no-actions', 'empty', 'not-a-list', 'no-action-name', 'body-not-an-object', 'unknown-member', 'too-many'],
)
def test_a_malformed_batch_is_a_422(api: Api, ledger, body: dict[str, Any]) -> None:
    response = api.post('/batch', body)
    assert response.status_code == 422
    assert response.content_type == 'application/problem+json'
    assert actions.calls == []


def test_batch_max_actions_is_configurable(ledger_database: dict[str, Any], log_dir: str, ledger) -> None:
    application = ledger_app(ledger_database, log_dir, BATCH_MAX_ACTIONS=2)
    try:
        api = Api(application.test_client())
        assert api.post('/batch', {'actions': [step('ledger/echo', note='x')] * 2}).status_code == 200
        response = api.post('/batch', {'actions': [step('ledger/echo', note='x')] * 3})
    finally:
        application.extensions['dbapi.pools'].close()
    assert response.status_code == 422
    assert response.get_json()['detail'] == 'a batch holds at most 2 actions, not 3'


def test_steps_on_two_databases_are_refused(api: Api, ledger) -> None:
    response = api.post(
        '/batch', {'actions': [step('ledger/append', note='a'), step('ledger/append_elsewhere', note='b')]}
    )
    assert response.status_code == 422
    assert response.get_json()['detail'] == 'the steps use the databases default, other: one batch runs on one database'
    assert notes(ledger) == []


def test_only_post_and_a_token(app: Flask, ledger) -> None:
    client = app.test_client()
    assert client.post('/batch', json={'actions': [step('ledger/echo', note='x')]}).status_code == 401
    response = client.get('/batch', headers={'Authorization': 'Bearer testing-token'})
    assert (response.status_code, response.headers['Allow']) == (405, 'POST')


def test_each_step_needs_the_callers_scope(
    ledger_database: dict[str, Any], log_dir: str, tmp_path: Path, ledger
) -> None:
    token = 'echo-only-0123456789abcdef'
    path = tmp_path / 'callers.toml'
    path.write_text(
        f'[callers.echoer]\ntokens_sha256 = ["{hashlib.sha256(token.encode()).hexdigest()}"]\n'
        'scopes = ["ledger/echo"]\n'
    )
    application = ledger_app(ledger_database, log_dir, CALLERS_FILE=str(path))
    try:
        client = application.test_client()
        headers = {'Authorization': f'Bearer {token}'}
        body = {'actions': [step('ledger/echo', note='x'), step('ledger/append', note='y')]}
        response = client.post('/batch', json=body, headers=headers)
        allowed = client.post('/batch', json={'actions': [step('ledger/echo', note='x')]}, headers=headers)
    finally:
        application.extensions['dbapi.pools'].close()
    assert response.status_code == 403
    assert (response.get_json()['step'], response.get_json()['action']) == (1, 'ledger/append')
    assert 'scope="ledger/append"' in response.headers['WWW-Authenticate']
    assert allowed.get_json() == {'results': ['x']}
    assert actions.calls == ['echo']
    assert notes(ledger) == []


def test_a_steps_own_transactional_block_never_commits_the_batch(api: Api, ledger) -> None:
    body = {
        'actions': [
            step('ledger/nested', outer='outer', inner='inner'),  # its block commits nothing alone
            step('ledger/append_then_refuse', note='fails'),
        ]
    }
    assert api.post('/batch', body).status_code == 404
    assert notes(ledger) == []


def test_an_idempotency_key_covers_the_batch_as_a_whole(api: Api, ledger) -> None:
    body = {'actions': [step('ledger/append', note='a'), step('ledger/append', note='b')]}
    first = api.post('/batch', body, headers={'Idempotency-Key': 'batch-1'})
    again = api.post('/batch', body, headers={'Idempotency-Key': 'batch-1'})
    other = api.post('/batch', {'actions': body['actions'][:1]}, headers={'Idempotency-Key': 'batch-1'})
    assert (again.status_code, again.data) == (200, first.data)
    assert again.headers['Idempotent-Replayed'] == 'true'
    assert other.status_code == 422
    assert notes(ledger) == ['a', 'b']
    assert [row[:4] for row in stored(ledger)] == [('default', 'batch-1', 'batch', 200)]


def test_a_hundred_reads_in_one_batch(api: Api, ledger) -> None:
    api.post('/ledger/add_code', {'note': 'read me', 'code': 'R'})
    response = api.post('/batch', {'actions': [step('ledger/find_codes', codes=['R'])] * 100})
    assert response.status_code == 200
    assert response.get_json()['results'] == [[['R', 'read me']]] * 100


def test_the_access_record_names_the_batch_its_steps_and_the_failing_one(api: Api, ledger, log_dir: str) -> None:
    api.post('/batch', {'actions': [step('ledger/echo', note='x')] * 3})
    api.post('/batch', {'actions': [step('ledger/echo', note='x'), step('ledger/append_then_refuse', note='y')]})
    records = access_records(read_lines(log_dir))[-2:]
    assert [(r['dbapi.module'], r['dbapi.batch.steps'], r.get('dbapi.batch.step')) for r in records] == [
        ('batch', 3, None),
        ('batch', 2, 1),
    ]


@pytest.mark.parametrize(
    ('body', 'errors'),
    [
        ({}, {'actions': ['Missing data for required field.']}),
        ({'actions': {}}, {'actions': ['Not a valid list.']}),
        ({'actions': [step('ledger/echo', note='x')], 'extra': 1}, {'extra': ['Unknown field.']}),
        (
            {'actions': [{'body': {}}, 'x', {'action': 1, 'body': [], 'more': 2}, step('ledger/echo', note='x')]},
            {
                'actions': {
                    '0': {'action': ['Missing data for required field.']},
                    '1': {'_schema': ['Invalid input type.']},
                    '2': {
                        'action': ['Not a valid string.'],
                        'body': ['Not a valid mapping type.'],
                        'more': ['Unknown field.'],
                    },
                }
            },
        ),
    ],
    ids=['no-actions', 'not-a-list', 'unknown-member', 'every-bad-step'],
)
def test_the_envelopes_errors_name_each_bad_member(api: Api, ledger, body: dict[str, Any], errors: dict) -> None:
    response = api.post('/batch', body)
    assert response.status_code == 422
    assert response.get_json()['errors'] == errors


# -- the request's transaction is lib's to end ------------------------------------------------


@pytest.mark.parametrize('route', ['append_and_commit', 'append_in_with_conn'])
def test_an_action_cannot_end_the_requests_transaction(api: Api, ledger, route: str, log_dir: str) -> None:
    """Alone, keyed or in a batch: a commit of its own would break the batch's and the key's
    all-or-nothing, so it is a 500 and nothing is written."""
    assert api.post(f'/ledger/{route}', {'note': 'alone'}).status_code == 500
    assert api.post(f'/ledger/{route}', {'note': 'keyed'}, headers={'Idempotency-Key': route}).status_code == 500
    steps = [step('ledger/append', note='first'), step(f'ledger/{route}', note='second')]
    response = api.post('/batch', {'actions': steps})
    assert (response.status_code, response.get_json()['step']) == (500, 1)
    assert notes(ledger) == []
    assert stored(ledger) == []
    logged = [r for r in read_lines(log_dir) if r.get('error.type') == 'HeldTransaction']
    assert len(logged) == 3, logged
    assert 'cannot' in logged[0]['error.message'] and 'transactional(conn)' in logged[0]['error.message']


def test_an_autocommit_action_commits_its_own_transactions(api: Api, ledger) -> None:
    assert api.post('/ledger/append_twice_committing', {'note': 'mine'}).get_json() == 2
    assert notes(ledger) == ['mine', 'mine']
