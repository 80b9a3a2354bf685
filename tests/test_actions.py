"""Modules and actions end to end: routing, validation, injection, transactions, effects in the database."""

from __future__ import annotations

import pytest

from modules.example.actions import foo
from tests.conftest import query
from tests.modules.probe import actions as probe


def test_empty_route_answers_true(api):
    for path in ('/example/', '/example'):
        response = api.post(path)
        assert response.status_code == 200, path
        assert response.get_json() is True


def test_foo_returns_loaded_fields_and_time(api):
    response = api.post('/example/foo', {'name': 'ada', 'email': 'ada@example.com'})
    assert response.status_code == 200
    body = response.get_json()
    assert body['name'] == 'ada'
    assert body['email'] == 'ada@example.com'
    assert body['time'].endswith('+00:00')


def test_foo_is_a_plain_function():
    assert foo(name='x')['name'] == 'x'


def test_bar_upserts_and_reads_back_in_one_transaction(api, db):
    first = api.post('/example/bar', {'name': 'grace', 'email': 'g@example.com'})
    assert first.status_code == 200
    assert first.get_json() == [{'name': 'grace', 'email': 'g@example.com'}]
    second = api.post('/example/bar', {'name': 'grace', 'email': 'grace@example.com'})
    assert second.get_json() == [{'name': 'grace', 'email': 'grace@example.com'}]
    assert query(db, "SELECT email FROM users WHERE name = 'grace'") == [('grace@example.com',)]


def test_validation_failure_is_422_and_never_reaches_the_action(api, db):
    probe.calls.clear()
    response = api.post('/probe/add_item', {'code': 'x', 'qty': 'many', 'extra': 1})
    assert response.status_code == 422
    body = response.get_json()
    assert set(body['errors']) == {'qty', 'extra'}
    assert probe.calls == []
    assert query(db, "SELECT count(*) FROM probe_items WHERE code = 'x'") == [(0,)]


def test_validation_errors_are_422_not_200(api):
    response = api.post('/example/foo', {'email': 'not-an-email'})
    assert response.status_code == 422
    assert response.content_type == 'application/problem+json'
    assert not isinstance(response.get_json(), list)
    assert set(response.get_json()['errors']) == {'name', 'email'}


def test_schema_loads_python_types(api):
    response = api.post('/probe/echo_types', {'day': '2024-02-29', 'amount': '10.50'})
    assert response.get_json() == {'day_type': 'date', 'amount_type': 'Decimal', 'day': '2024-02-29', 'amount': '10.50'}


def test_action_without_schema_rejects_fields(api):
    response = api.post('/example/', {'surprise': True})
    assert response.status_code == 422
    assert response.get_json()['errors'] == {'surprise': ['Unknown field.']}


def test_write_then_raise_persists_nothing(api, db):
    response = api.post('/probe/write_then_fail', {'note': 'must-not-stay'})
    assert response.status_code == 500
    assert query(db, "SELECT count(*) FROM probe_log WHERE note = 'must-not-stay'") == [(0,)]


def test_injected_connection_commits_on_return(api, db):
    response = api.post('/probe/write_note', {'note': 'committed'})
    assert response.status_code == 200
    assert query(db, 'SELECT note FROM probe_log WHERE id = %s', [response.get_json()]) == [('committed',)]


def test_transactional_in_an_injected_transaction_commits_with_it(api, db):
    before = query(db, "SELECT count(*) FROM probe_log WHERE note = 'tx'")[0][0]
    response = api.post('/probe/in_transaction')
    assert response.get_json() == {'in_transaction': True}
    assert query(db, "SELECT count(*) FROM probe_log WHERE note = 'tx'") == [(before + 1,)]


def test_named_false_gives_tuples_and_raw_cursor_gives_dicts(api):
    assert api.post('/probe/tuples').get_json() == [[1, 2]]
    assert api.post('/probe/raw_cursor').get_json() == [{'a': 1}]


@pytest.mark.parametrize(('route', 'expected'), [('returns_none', None), ('returns_string', '<b>not html</b>')])
def test_scalar_return_values_become_json(api, route, expected):
    response = api.post(f'/probe/{route}')
    assert response.status_code == 200
    assert response.content_type == 'application/json'
    assert response.get_json() == expected


def test_nested_route_names(api):
    assert api.post('/probe/nested/name').status_code == 200


def test_duplicate_and_bad_routes_are_refused_at_registration():
    from lib.contract.declarations import inject_conn
    from lib.contract.registry import build_actions

    with pytest.raises(ValueError, match="'a' is listed twice"):
        build_actions('m', [dict(route='a', action=probe.big), dict(route='a', action=probe.big)])
    with pytest.raises(ValueError, match='no callable action'):
        build_actions('m', [dict(route='b', action=None)])

    @inject_conn()
    def no_conn() -> None:
        return None

    with pytest.raises(ValueError, match='takes no `conn`'):
        build_actions('m', [dict(route='c', action=no_conn)])


def test_user_answers_the_row_or_a_404_through_the_public_helper(api, db):
    assert api.post('/example/bar', {'name': 'hopper', 'email': 'h@example.com'}).status_code == 200
    found = api.post('/example/user', {'name': 'hopper'})
    assert (found.status_code, found.get_json()) == (200, {'name': 'hopper', 'email': 'h@example.com'})
    missing = api.post('/example/user', {'name': 'nobody'})
    assert missing.status_code == 404
    assert missing.get_json()['type'] == 'urn:dbapi:problem:not-found'
    assert missing.get_json()['detail'] == "no user named 'nobody'"
