"""Garbage in, a 4xx JSON problem out: never a 5xx, never a dead worker.

Property-based cases (hypothesis) and a hand-written list run against the real app in this
process; tests/test_bad_http.py sends the malformed-HTTP part to a real gunicorn. Every case
is counted for the suite's summary line (tests/figures.py).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from app import create_app
from tests import figures
from tests.conftest import apply_migrations
from tests.private_pg import private_postgres

MODULES = ['modules.example', 'tests.modules.probe']
TOKEN = 'testing-token'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
JSON = {**AUTH, 'Content-Type': 'application/json'}
MIB = 1024 * 1024
# Actions that are valid to call with anything: none of them fails on purpose.
TARGETS = [
    '/example/',
    '/example/foo',
    '/example/bar',
    '/probe/add_item',
    '/probe/write_note',
    '/probe/echo_types',
    '/probe/returns_none',
    '/probe/nested/name',
]
FIELDS = ['name', 'email', 'code', 'qty', 'parent', 'note', 'day', 'amount', 'seconds']


def examples(count: int) -> settings:
    return settings(
        max_examples=count,
        deadline=None,
        derandomize=True,  # the same cases in CI as on a laptop: a failure is reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


CHEAP = examples(2000)  # answered before any SQL runs: ~2 ms each
COSTLY = examples(600)  # most reach PostgreSQL


@pytest.fixture(scope='module')
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    with private_postgres() as pg:
        database = pg.create_database('dbapi_bad_input')
        apply_migrations(database, MODULES)
        application = create_app(
            {
                'ENVIRONMENT': 'testing',
                'BEARER': TOKEN,
                'DATABASES': {'default': database},
                'MODULES': MODULES,
                'POOL_SIZE': 2,
                'POOL_TIMEOUT': 2,
                'LOGGING': {'log_dir': str(tmp_path_factory.mktemp('bad-input-logs')), 'console': False},
            }
        )
        yield application
        application.extensions['dbapi.pools'].close()


@pytest.fixture(scope='module')
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def check(response: TestResponse, allowed: Collection[int] | None = None) -> None:
    """The contract for any input: 200 with JSON, or a 4xx problem; counted either way."""
    figures.count_bad_input(response.status_code)
    status = response.status_code
    assert status < 500, f'{status}: {response.get_data()[:300]!r}'
    if allowed is not None:
        assert status in allowed, f'{status} not in {sorted(allowed)}: {response.get_data()[:300]!r}'
    if status >= 400:
        assert response.mimetype == 'application/problem+json', response.headers
        problem = response.get_json()
        assert problem['status'] == status and problem['detail'], problem
    else:
        assert response.mimetype == 'application/json', response.headers
    assert response.headers['X-Content-Type-Options'] == 'nosniff'


# -- property-based ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
# Bodies shaped like the actions' own: known field names, so many reach validation and SQL.
shaped_bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6)


@CHEAP
@given(target=st.sampled_from(TARGETS), body=json_values)
def test_random_json_documents(client: FlaskClient, target: str, body: Any) -> None:
    check(client.post(target, data=json.dumps(body), headers=JSON))


@COSTLY
@given(target=st.sampled_from(TARGETS), body=shaped_bodies)
def test_random_bodies_shaped_like_the_actions(client: FlaskClient, target: str, body: dict[str, Any]) -> None:
    check(client.post(target, data=json.dumps(body), headers=JSON))


@CHEAP
@given(
    target=st.sampled_from(TARGETS), body=st.binary(max_size=200), mimetype=st.sampled_from(['application/json', ''])
)
def test_random_bytes(client: FlaskClient, target: str, body: bytes, mimetype: str) -> None:
    headers = {**AUTH, 'Content-Type': mimetype} if mimetype else AUTH
    check(client.post(target, data=body, headers=headers))


# Header values as a WSGI server hands them over: latin-1 text (any byte is one character).
latin1_text = st.text(alphabet=st.characters(max_codepoint=255, blacklist_characters='\r\n'), max_size=60)


@CHEAP
@given(authorization=latin1_text, content_type=latin1_text)
def test_random_headers(client: FlaskClient, authorization: str, content_type: str) -> None:
    headers = {'Authorization': authorization, 'Content-Type': content_type}
    check(client.post('/example/foo', data=b'{"name": "ada"}', headers=headers), frozenset({200, 400, 401, 415}))


@CHEAP
@given(module=st.sampled_from(['example', 'probe', 'health', 'nope']), route=st.text(max_size=40))
def test_random_action_names(client: FlaskClient, module: str, route: str) -> None:
    expected = {200, 400, 401, 404, 405}
    actions = getattr(client.application.blueprints.get(module), 'actions', {})
    if route in actions:
        expected.add(422)  # hypothesis found a real action ('bar'): its empty body fails validation
    check(client.post(f'/{module}/{route}', headers=AUTH), frozenset(expected))


# -- the hand-written list ----------------------------------------------------------------


@dataclass
class Case:
    name: str
    body: bytes | None = None
    path: str = '/example/foo'
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    expect: set[int] = field(default_factory=lambda: {400})
    environ: dict[str, Any] = field(default_factory=dict)


def bearer(value: str) -> dict[str, str]:
    return {**JSON, 'Authorization': value}


def typed(content_type: str) -> dict[str, str]:
    return {**AUTH, 'Content-Type': content_type}


def long_string(name: str, size: int, fill: bytes) -> bytes:
    return b'{"' + name.encode() + b'": "' + fill * size + b'"}'


def amount(value: str) -> bytes:
    """A /probe/echo_types body: a valid date and this amount."""
    return b'{"day": "2024-02-03", "amount": "' + value.encode() + b'"}'


def nested(depth: int) -> bytes:
    return b'{"name": ' + b'[' * depth + b']' * depth + b'}'


A = b'{"name": "a"}'
NOTE = '/probe/write_note'
ITEM = '/probe/add_item'
CHUNKED = {'wsgi.input_terminated': True}  # what gunicorn sets for a chunked body
TYPES = '/probe/echo_types'
CASES = [
    Case('100,000 levels of arrays', nested(100_000)),
    Case('100,000 levels of objects', b'{"a":' * 100_000 + b'1' + b'}' * 100_000),
    Case('1,000 levels, under the parser limit', nested(1_000), expect={422}),
    Case('integer of 5,000 digits', b'{"qty": ' + b'9' * 5000 + b'}', path=ITEM),
    Case('negative integer of 5,000 digits', b'{"name": -' + b'7' * 5000 + b'}'),
    Case('integer beyond 64 bits', b'{"code": "a", "qty": 18446744073709551616}', path=ITEM),
    Case('integer beyond int4 for an int4 column', b'{"code": "big", "qty": 4294967296}', path=ITEM),
    # marshmallow's Integer() truncates 1.5 to 1 unless the module declares strict=True.
    Case('float for an integer field', b'{"code": "f", "qty": 1.5}', path=ITEM, expect={200}),
    Case('NaN', b'{"name": NaN}'),
    Case('Infinity', b'{"name": Infinity}'),
    Case('-Infinity', b'{"name": -Infinity}'),
    Case('1e999 (a float overflow)', b'{"seconds": 1e999}', path='/probe/sleep'),
    Case('invalid UTF-8', b'{"name": "\xff\xfe"}'),
    Case('overlong UTF-8', b'{"name": "\xc0\xaf"}'),
    Case('UTF-16 body', '{"name": "ada"}'.encode('utf-16')),
    Case('BOM before the body', b'\xef\xbb\xbf{"name": "ada"}', expect={200, 400}),
    Case('lone high surrogate', b'{"name": "\\ud800"}'),
    Case('lone low surrogate', b'{"name": "\\udc00"}'),
    Case('surrogate in a key', b'{"\\ud800": 1}'),
    Case('NUL in a value', b'{"name": "a\\u0000b"}'),
    Case('NUL in a key', b'{"na\\u0000me": "a"}'),
    Case('NUL in a value written to PostgreSQL', b'{"note": "\\u0000"}', path='/probe/write_note'),
    Case('raw NUL byte', b'{"name": "a\x00b"}'),
    Case('10 MiB string echoed', long_string('name', 10 * MIB, b'x'), expect={200}),
    Case('10 MiB string over the field limit', long_string('note', 10 * MIB, b'x'), path=NOTE, expect={422}),
    Case('9.5 MiB string into PostgreSQL', long_string('note', 19 * MIB // 2, b'x'), path=NOTE, expect={200}),
    # The schema holds the column's limit, so PostgreSQL never sees it (its 400: the int4 case above).
    Case('10 MiB string in a varchar(256)', long_string('name', 10 * MIB, b'y'), path='/example/bar', expect={422}),
    Case('10 MiB string as a key', b'{"' + b'k' * (10 * MIB) + b'": 1}', expect={422}),
    Case('body over MAX_CONTENT_LENGTH', long_string('name', 21 * MIB, b'z'), expect={413}),
    Case('duplicate keys', b'{"name": "a", "name": "b"}', expect={200}),
    Case('duplicate keys, the last invalid', b'{"name": "a", "name": 5}', expect={422}),
    Case('a JSON array', b'[1, 2]'),
    Case('a JSON string', b'"name"'),
    Case('JSON null', b'null'),
    Case('trailing garbage', b'{"name": "a"} x'),
    Case('two documents', b'{"name": "a"}{"name": "b"}'),
    Case('truncated', b'{"name": "a'),
    Case('comments', b'{"name": "a" /* c */}'),
    Case('single quotes', b"{'name': 'a'}"),
    Case('only whitespace', b'   \n\t ', expect={400}),
    Case('empty body', b'', expect={422}),
    Case('empty body to an action without fields', b'', path='/probe/returns_none', expect={200}),
    Case('no body, no content type', None, path='/probe/returns_none', headers=dict(AUTH), expect={200}),
    Case('text/plain', A, headers=typed('text/plain'), expect={415}),
    Case('form encoded', b'name=a', headers=typed('application/x-www-form-urlencoded'), expect={415}),
    Case('multipart', b'--x\r\n\r\n--x--', headers=typed('multipart/form-data; boundary=x'), expect={415}),
    Case('missing content type', A, headers=dict(AUTH), expect={415}),
    Case('content type with a charset', A, headers=typed('application/json; charset=utf-8'), expect={200}),
    Case('content type +json', A, headers=typed('application/vnd.x+json'), expect={200}),
    Case('garbage content type', A, headers=typed(';;;=\x7f'), expect={415}),
    Case('wrong field types', b'{"name": {"a": 1}, "email": [1]}', expect={422}),
    Case('unknown fields', b'{"name": "a", "admin": true}', expect={422}),
    Case('invalid date', b'{"day": "2024-02-30", "amount": "1"}', path='/probe/echo_types', expect={422}),
    Case('decimal with 5,000 digits', amount('9' * 5000), path=TYPES, expect={200, 422}),
    Case('decimal NaN', amount('NaN'), path=TYPES, expect={422}),
    Case('decimal sNaN', amount('sNaN'), path=TYPES, expect={422}),
    Case('decimal Infinity', amount('Infinity'), path=TYPES, expect={422}),
    Case('decimal with a huge exponent', amount('1e999999999'), path=TYPES, expect={200, 422}),
    Case('negative quantity (check constraint)', b'{"code": "neg", "qty": -1}', path=ITEM),
    Case('unknown parent (foreign key)', b'{"code": "o", "qty": 1, "parent": 2147483647}', path=ITEM, expect={409}),
    Case('code longer than varchar(32)', b'{"code": "' + b'c' * 33 + b'", "qty": 1}', path=ITEM),
    Case('sleep for NaN seconds', b'{"seconds": "NaN"}', path='/probe/sleep', expect={422}),
    Case('huge Authorization header', A, headers=bearer('Bearer ' + 'A' * (64 * 1024)), expect={401}),
    Case('Bearer with no token', A, headers=bearer('Bearer'), expect={401}),
    Case('Bearer and spaces', A, headers=bearer('Bearer    '), expect={401}),
    Case('Basic auth', A, headers=bearer('Basic dXNlcjpwYXNz'), expect={401}),
    Case('no Authorization', A, headers={'Content-Type': 'application/json'}, expect={401}),
    Case('token with a prefix', A, headers=bearer(f'Bearer x{TOKEN}'), expect={401}),
    Case('token in lower case scheme', A, headers=bearer(f'bearer {TOKEN}'), expect={200}),
    Case('non-ASCII token (latin-1)', A, headers=bearer('Bearer caf\xe9'), expect={401}),
    Case('non-ASCII token (UTF-8 bytes)', A, headers=bearer('Bearer \xe2\x98\x83'), expect={401}),
    Case('non-latin-1 token (not valid WSGI)', A, headers=bearer('Bearer \u2603'), expect={401}),
    Case('NUL in the token', A, headers=bearer(f'Bearer {TOKEN}\x00'), expect={401}),
    Case('two Authorization headers joined', A, headers=bearer(f'Bearer {TOKEN}, Bearer x'), expect={401}),
    Case('action __init__', path='/example/__init__', expect={404}),
    Case('action __class__', path='/example/__class__', expect={404}),
    Case('action __dict__', path='/probe/__dict__', expect={404}),
    Case('action calls', path='/probe/calls', expect={404}),
    Case('../example/foo', path='/probe/../example/foo', expect={404}),
    Case('..%2fexample%2ffoo', path='/probe/..%2fexample%2ffoo', expect={404}),
    Case('%2e%2e/', path='/probe/%2e%2e/example/foo', expect={404}),
    Case('%00 in the path', path='/probe/returns_none%00', expect={404}),
    Case('very long action name', path='/probe/' + 'a' * 100_000, expect={404}),
    Case('very deep path', path='/probe/' + 'a/' * 10_000, expect={404}),
    Case('module that does not exist', path='/nope/foo', expect={404}),
    Case('health with a body', b'{"name": "a"}', path='/health/live', expect={405}),
    Case('double slash', path='/example//foo', expect={404}),
    Case('trailing slash', path='/example/foo/', expect={404}),
    Case('path with invalid UTF-8', path='/probe/%ff%fe', expect={404}),
    Case('chunked body', A, environ=CHUNKED, headers={**JSON, 'Transfer-Encoding': 'chunked'}, expect={200}),
]  # fmt: skip


@pytest.mark.parametrize('case', CASES, ids=[case.name for case in CASES])
def test_hand_written(client: FlaskClient, case: Case) -> None:
    response = client.post(case.path, data=case.body, headers=case.headers, environ_overrides=case.environ)
    check(response, case.expect)
    # The worker (here: the app and its pool) still serves the next request.
    check(client.post('/example/foo', data=b'{"name": "ok"}', headers=JSON), frozenset({200}))


@pytest.mark.parametrize('method', ['GET', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'HEAD', 'TRACE', 'BREW'])
def test_other_methods(client: FlaskClient, method: str) -> None:
    response = client.open('/example/foo', method=method, headers=AUTH)
    figures.count_bad_input(response.status_code)
    assert response.status_code == 405, response.status_code
    if method != 'HEAD':
        assert response.mimetype == 'application/problem+json'


def test_nothing_left_in_the_pool(app: Flask, client: FlaskClient) -> None:
    """After all the garbage: the pool holds no connection in a transaction, none is lost."""
    check(client.post('/probe/write_note', data=b'{"note": "still fine"}', headers=JSON), frozenset({200}))
    stats = app.extensions['dbapi.pools'].stats()['default']
    assert stats['open'] == stats['idle'], stats
