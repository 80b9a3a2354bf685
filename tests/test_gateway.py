"""The gateway (the hot path in front of Flask) and the blueprint's Flask view answer alike.

Both call `lib.actions.serve()`; these tests send the same requests through each layer and
compare what a client sees, so the two can never drift apart.
"""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest
from werkzeug.test import EnvironBuilder

from lib.access_log import FLASK_KEY
from lib.gateway import ActionGateway
from tests.conftest import AUTH

VISIBLE_HEADERS = (
    'Content-Type',
    'Content-Encoding',
    'WWW-Authenticate',
    'Retry-After',
    'Allow',
    'Cache-Control',
    'X-Content-Type-Options',
    'X-Request-ID',
)


def call(wsgi: Any, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes, dict]:
    environ = EnvironBuilder(path=path, method='POST', data=data, headers=headers).get_environ()
    answer: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        answer['status'] = int(status[:3])
        answer['headers'] = dict(response_headers)

    chunks = wsgi(environ, start_response)
    body = b''.join(chunks)
    if hasattr(chunks, 'close'):
        chunks.close()
    return answer['status'], answer['headers'], body, environ


def comparable(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], Any]:
    if headers.get('Content-Encoding') == 'gzip':
        body = gzip.decompress(body)
    document = orjson.loads(body)
    if isinstance(document, dict) and 'time' in document:
        document['time'] = '<time>'
    return {name: headers[name] for name in VISIBLE_HEADERS if name in headers}, document


JSON_AUTH = {**AUTH, 'Content-Type': 'application/json', 'X-Request-ID': 'same-id'}
CASES = [
    ('/example/', None, {**AUTH, 'X-Request-ID': 'same-id'}),
    ('/example/foo', b'{"name": "ada", "email": "ada@example.com"}', JSON_AUTH),
    ('/example/foo', b'{"name": ', JSON_AUTH),
    ('/example/foo', b'[1]', JSON_AUTH),
    ('/example/foo', b'{"name": 1, "x": 2}', JSON_AUTH),
    ('/example/foo', b'{"name": "a"}', {'Content-Type': 'application/json', 'X-Request-ID': 'same-id'}),
    ('/example/foo', b'{"name": "a"}', {**JSON_AUTH, 'Authorization': 'Bearer wrong'}),
    ('/example/foo', b'name=a', {**JSON_AUTH, 'Content-Type': 'text/plain'}),
    ('/example/nope', b'{}', JSON_AUTH),
    ('/example/foo', b'{"name": "' + b'x' * 4096 + b'"}', JSON_AUTH),  # over the 2 KiB limit set below
    ('/probe/divide_by_zero', None, JSON_AUTH),
    ('/probe/crash', None, JSON_AUTH),
    ('/probe/big', None, {**JSON_AUTH, 'Accept-Encoding': 'gzip'}),
    ('/probe/python_types', None, JSON_AUTH),
]


@pytest.mark.parametrize(('path', 'data', 'headers'), CASES)
def test_gateway_and_flask_view_answer_alike(app, path, data, headers):
    app.config['MAX_CONTENT_LENGTH'] = 2048
    gateway = app.wsgi_app.app  # AccessLog(ActionGateway(Flask's own wsgi_app))
    assert isinstance(gateway, ActionGateway)
    fast = call(gateway, path, data, headers)
    flask = call(gateway.fallback, path, data, headers)
    assert fast[0] == flask[0], (fast[2], flask[2])
    assert comparable(fast[1], fast[2]) == comparable(flask[1], flask[2])
    assert (
        fast[3][FLASK_KEY][1:] == flask[3][FLASK_KEY][1:] or fast[3][FLASK_KEY][3].slug == flask[3][FLASK_KEY][3].slug
    )


def test_non_post_and_unknown_modules_go_to_flask(client):
    assert client.get('/health/live').status_code == 200
    response = client.get('/example/foo', headers=AUTH)
    assert response.status_code == 405 and response.headers['Allow'] == 'POST'
    assert client.post('/nomodule/foo', headers=AUTH).status_code == 404
