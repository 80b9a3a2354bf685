"""Every row of the error table answers as the README says, always as problem+json."""

from __future__ import annotations

import pytest

from tests.conftest import AUTH, make_app

PROBLEM = 'application/problem+json'


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == PROBLEM
    body = response.get_json()
    assert body['status'] == status
    assert body['type'].startswith('urn:dbapi:problem:')
    assert body['title'] and body['detail']
    assert body['request_id'] == response.headers['X-Request-ID']
    return body


@pytest.mark.parametrize(
    ('data', 'detail'),
    [
        (b'{"name": ', 'not valid JSON'),
        (b'[1, 2]', 'must be a JSON object'),
        (b'"text"', 'must be a JSON object'),
        (b'NaN', 'not valid JSON'),
        (b'{"name": "a\\u0000b"}', 'NUL'),
        (b'\xff\xfe', 'not valid JSON'),
        (b'{"n": 1' + b'0' * 5000 + b'}', 'not valid JSON'),
    ],
)
def test_400_bad_bodies(client, data, detail):
    response = client.post('/example/foo', data=data, headers={**AUTH, 'Content-Type': 'application/json'})
    assert detail in assert_problem(response, 400)['detail']


@pytest.mark.parametrize('header', [None, 'Bearer wrong', 'Basic dGVzdA==', 'Bearer', 'Bearer  ', 'testing-token'])
def test_401_missing_or_wrong_token(client, header):
    headers = {'Authorization': header} if header is not None else {}
    response = client.post('/example/foo', json={'name': 'x'}, headers=headers)
    assert_problem(response, 401)
    # RFC 6750 3.1: an error code only when a token came and is not valid
    code = ', error="invalid_token"' if header == 'Bearer wrong' else ''
    assert response.headers['WWW-Authenticate'] == f'Bearer realm="dbapi"{code}'


@pytest.mark.parametrize('path', ['/nomodule/foo', '/example/nope', '/example/__init__', '/example/../example/foo'])
def test_404_unknown_module_or_action(api, path):
    assert_problem(api.post(path, {}), 404)


@pytest.mark.parametrize('method', ['GET', 'PUT', 'DELETE', 'PATCH', 'OPTIONS'])
def test_405_non_post_methods(client, method):
    response = client.open('/example/foo', method=method, headers=AUTH)
    assert_problem(response, 405)
    assert response.headers['Allow'] == 'POST'


def test_413_body_over_max_content_length(database, log_dir):
    app = make_app(database, log_dir, MAX_CONTENT_LENGTH=1024)
    try:
        data = b'{"name": "' + b'x' * 2048 + b'"}'
        response = app.test_client().post(
            '/example/foo', data=data, headers={**AUTH, 'Content-Type': 'application/json'}
        )
        assert_problem(response, 413)
    finally:
        app.extensions['dbapi.pools'].close()


@pytest.mark.parametrize('content_type', ['text/plain', 'application/x-www-form-urlencoded', None])
def test_415_body_not_json(client, content_type):
    headers = {**AUTH, 'Content-Type': content_type} if content_type else AUTH
    response = client.post('/example/foo', data=b'name=x', headers=headers)
    assert_problem(response, 415)


def test_422_validation_names_fields(api):
    body = assert_problem(api.post('/example/foo', {'name': 5, 'unknown': 1}), 422)
    assert set(body['errors']) == {'name', 'unknown'}


def test_409_unique_violation(api):
    assert api.post('/probe/add_item', {'code': 'dup', 'qty': 1}).status_code == 200
    body = assert_problem(api.post('/probe/add_item', {'code': 'dup', 'qty': 1}), 409)
    assert body['errors'] == {'constraint': 'probe_items_code_key'}


def test_409_foreign_key_violation(api):
    assert_problem(api.post('/probe/add_item', {'code': 'orphan', 'qty': 1, 'parent': 999999}), 409)


@pytest.mark.parametrize(
    ('path', 'body'),
    [
        ('/probe/add_item', {'code': 'negative', 'qty': -1}),  # check violation
        ('/probe/add_item', {'code': 'x' * 40, 'qty': 1}),  # 22001 string too long
        ('/probe/divide_by_zero', None),  # 22012
        ('/probe/add_item', {'code': 'big', 'qty': 2**40}),  # 22003 out of range for integer
    ],
)
def test_400_data_errors_from_postgres(api, path, body):
    assert_problem(api.post(path, body), 400)


def test_503_pool_timeout_has_retry_after(database, log_dir):
    from tests.conftest import make_app

    app = make_app(database, log_dir, POOL_SIZE=1, POOL_TIMEOUT=0.2)
    client = app.test_client()
    # leak keeps its connection until its request ends; holding the pool open from outside
    # the request makes the next acquisition wait for the deadline.
    pool = app.extensions['dbapi.pools']
    with app.app_context():
        held = pool.get('default').getconn()
    try:
        response = client.post('/probe/write_note', json={'note': 'x'}, headers=AUTH)
        assert_problem(response, 503)
        assert response.headers['Retry-After'] == '1'
    finally:
        pool.get('default').putconn(held)
        pool.close()


def test_503_database_unreachable(database, log_dir):
    from tests.conftest import make_app

    unreachable = dict(database, host='127.0.0.1', port=1)  # nothing listens on port 1
    app = make_app(unreachable, log_dir)
    response = app.test_client().post('/probe/write_note', json={'note': 'x'}, headers=AUTH)
    assert_problem(response, 503)
    assert response.headers['Retry-After'] == '1'


def test_504_statement_timeout(database, log_dir):
    from tests.conftest import make_app

    app = make_app(database, log_dir, STATEMENT_TIMEOUT=100)
    response = app.test_client().post('/probe/sleep', json={'seconds': 2}, headers=AUTH)
    assert_problem(response, 504)
    app.extensions['dbapi.pools'].close()


@pytest.mark.parametrize('path', ['/probe/crash', '/probe/bad_sql'])
def test_500_hides_internals(api, path):
    response = api.post(path)
    body = assert_problem(response, 500)
    text = response.get_data(as_text=True)
    assert 'secret internal detail' not in text
    assert 'SELEC' not in text and 'Traceback' not in text
    assert body['detail'].startswith('internal error')


def test_errors_are_never_html(api, client):
    for response in (
        api.post('/probe/crash'),
        api.post('/example/foo', {'name': 'x', 'unknown': 1}),
        api.post('/probe/bad_sql'),
        client.get('/nowhere'),
    ):
        assert response.content_type == PROBLEM
        assert b'<html' not in response.data.lower()


def test_every_response_has_request_id_and_safety_headers(api):
    ok = api.post('/example/')
    assert len(ok.headers['X-Request-ID']) == 32
    assert ok.headers['X-Content-Type-Options'] == 'nosniff'
    assert ok.headers['Cache-Control'] == 'no-store'
    mine = api.post('/example/', headers={'X-Request-ID': 'caller-id-1'})
    assert mine.headers['X-Request-ID'] == 'caller-id-1'
    forged = api.post('/example/', headers={'X-Request-ID': 'bad id "} {"log.level": "fake'})
    assert len(forged.headers['X-Request-ID']) == 32  # replaced, not echoed
