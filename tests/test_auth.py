"""Bearer auth: enforced on every module route by construction, looked up by digest, rotation-friendly."""

from __future__ import annotations

import pytest

from lib.auth.callers import Caller, CallerSet, token_digest
from lib.web.flask_app import REGISTRY_KEY
from tests.conftest import AUTH, make_app


def module_rules(app):
    """The url rules of the module blueprints (one per action), not Flask's own (health, the contract)."""
    modules = set(app.extensions[REGISTRY_KEY].modules)
    for rule in app.url_map.iter_rules():
        if rule.endpoint.partition('.')[0] in modules:
            yield rule


def test_every_module_route_refuses_requests_without_token(app):
    client = app.test_client()
    rules = list(module_rules(app))
    assert len(rules) >= 4
    for rule in rules:
        assert rule.methods == {'POST'}, rule
        path = rule.rule.replace('<path:route>', 'foo')
        for headers in ({}, {'Authorization': 'Bearer nope'}):
            response = client.post(path, json={'name': 'x'}, headers=headers)
            assert response.status_code == 401, (rule.rule, headers)


def test_every_action_answers_with_the_token(app):
    """The other half: with a token, every route in every routes table is reachable (not 401/404/405)."""
    client = app.test_client()
    for name, blueprint in app.blueprints.items():
        for route in getattr(blueprint, 'actions', {}):
            response = client.post(f'/{name}/{route}', json={}, headers=AUTH)
            assert response.status_code not in {401, 404, 405}, (name, route, response.status_code)


def test_a_request_without_a_token_is_never_served(api, client, db):
    from tests.conftest import query

    response = client.post('/example/bar', json={'name': 'intruder', 'email': 'i@example.com'})
    assert response.status_code == 401
    assert query(db, "SELECT count(*) FROM users WHERE name = 'intruder'") == [(0,)]


@pytest.mark.parametrize('scheme', ['Bearer', 'bearer', 'BEARER', 'bEaReR'])
def test_scheme_is_case_insensitive(client, scheme):
    response = client.post('/example/', headers={'Authorization': f'{scheme} testing-token'})
    assert response.status_code == 200


def test_several_tokens_for_rotation(database, log_dir):
    app = make_app(database, log_dir, BEARER='old-token, new-token')
    client = app.test_client()
    for token in ('old-token', 'new-token'):
        assert client.post('/example/', headers={'Authorization': f'Bearer {token}'}).status_code == 200
    assert client.post('/example/', headers={'Authorization': 'Bearer testing-token'}).status_code == 401


def test_non_ascii_and_huge_tokens_are_401_not_500(client):
    for token in ('tökén', 'x' * 10_000, 'testing-token\x7f'):
        response = client.post('/example/', headers={'Authorization': f'Bearer {token}'.encode().decode('latin-1')})
        assert response.status_code == 401


def test_tokens_are_found_by_digest():
    a, b = Caller('a', frozenset({'*'})), Caller('b', frozenset())
    callers = CallerSet({token_digest(b'a' * 32): a, token_digest(b'b' * 32): b})
    assert callers.find(b'b' * 32) is b
    assert callers.find(b'c' * 32) is None
    assert callers.find(b'') is None
    assert 'b' * 32 not in repr(callers) and token_digest(b'b' * 32).hex() not in repr(callers)


def test_token_is_not_in_errors_or_logs(client, log_dir):
    import pathlib

    for header in ('Bearer testing-token', 'Bearer testing-token-wrong', 'Basic testing-token'):
        response = client.post('/example/foo', json={'bad': 1}, headers={'Authorization': header})
        assert b'testing-token' not in response.data
    text = ''.join(p.read_text() for p in pathlib.Path(log_dir).glob('*.log*'))
    assert 'POST /example/foo' in text
    assert 'testing-token' not in text
