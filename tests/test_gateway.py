"""lib.gateway: the one path of action requests, Flask for the rest, and the url map listing every action."""

from __future__ import annotations

import gzip
from typing import Any

import brotli
import orjson
import pytest

try:  # Python 3.14's standard library, or its backport
    from compression import zstd
except ImportError:
    from backports import zstd
from tests.conftest import AUTH, MODULES


def test_flasks_url_map_lists_every_action_of_every_module(app) -> None:
    listed = {
        (rule.rule, tuple(sorted(rule.methods or ())))
        for rule in app.url_map.iter_rules()
        if rule.endpoint.partition('.')[0] in {name.rpartition('.')[2] for name in MODULES}
    }
    expected = {
        (f'/{name}/{route}', ('POST',))
        for name, blueprint in app.blueprints.items()
        if hasattr(blueprint, 'actions')
        for route in blueprint.actions
    }
    assert listed == expected
    assert ('/example/foo', ('POST',)) in listed and ('/example/', ('POST',)) in listed


@pytest.mark.parametrize('method', ['GET', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'])
def test_another_method_on_an_action_is_a_json_405_with_allow(client, method: str) -> None:
    response = client.open('/example/foo', method=method, headers=AUTH)
    assert response.status_code == 405
    assert response.headers['Allow'] == 'POST'
    assert response.content_type == 'application/problem+json'
    assert response.get_json()['type'] == 'urn:dbapi:problem:method-not-allowed'


def test_an_unknown_action_is_a_json_404_and_so_is_an_unknown_module(client) -> None:
    for path in ('/example/nope', '/nomodule/foo', '/example/foo/more'):
        response = client.post(path, headers=AUTH)
        assert response.status_code == 404, path
        assert response.content_type == 'application/problem+json'


def test_an_action_needs_the_token_before_anything_is_said_of_it(client) -> None:
    for path, method in (('/example/foo', 'POST'), ('/example/nope', 'POST'), ('/example/foo', 'GET')):
        response = client.open(path, method=method)
        assert response.status_code == 401, path
        assert response.headers['WWW-Authenticate'].startswith('Bearer')


@pytest.mark.parametrize('path', ['/example/', '/example'])
def test_a_modules_root_action_answers_with_and_without_the_slash(client, path: str) -> None:
    assert client.post(path, headers=AUTH).get_json() is True


def test_flask_answers_carry_the_same_common_headers_as_actions(client) -> None:
    health = client.get('/health/live', headers={'X-Request-ID': 'common-1'})
    action = client.post('/example/', headers={**AUTH, 'X-Request-ID': 'common-2'})
    for response, request_id in ((health, 'common-1'), (action, 'common-2')):
        assert response.headers['X-Request-ID'] == request_id
        assert response.headers['Cache-Control'] == 'no-store'
        assert response.headers['X-Content-Type-Options'] == 'nosniff'


DECODERS: dict[str, Any] = {'gzip': gzip.decompress, 'br': brotli.decompress, 'zstd': zstd.decompress}


@pytest.mark.parametrize(
    ('accept', 'chosen'),
    [
        ('gzip', 'gzip'),
        ('br', 'br'),
        ('zstd', 'zstd'),
        ('gzip, br', 'br'),  # equal quality: the server's order (zstd, br, gzip)
        ('br;q=0.5, gzip', 'gzip'),
        ('*', 'zstd'),
        ('identity', None),
        ('gzip;q=0', None),
        ('', None),
    ],
)
def test_a_large_answer_is_compressed_as_the_client_asks(client, accept: str, chosen: str | None) -> None:
    response = client.post('/probe/big', headers={**AUTH, 'Accept-Encoding': accept})
    assert response.status_code == 200
    assert response.headers.get('Content-Encoding') == chosen
    assert response.headers['Vary'] == 'Accept-Encoding'
    data = response.get_data()
    assert int(response.headers['Content-Length']) == len(data)
    document = orjson.loads(DECODERS[chosen](data) if chosen else data)
    assert document == orjson.loads(client.post('/probe/big', headers=AUTH).get_data())


def test_a_small_answer_or_a_problem_is_never_compressed(client) -> None:
    small = client.post('/example/', headers={**AUTH, 'Accept-Encoding': 'gzip'})
    problem = client.post('/example/nope', headers={**AUTH, 'Accept-Encoding': 'gzip'})
    assert 'Content-Encoding' not in small.headers and 'Content-Encoding' not in problem.headers
