"""Malformed and hostile HTTP over raw sockets: straight to a real gunicorn, and through nginx.

No HTTP client library would send most of these. Each case must get a 4xx (or a 200 where
the request is valid), never a 5xx, and the worker that read it must still be the same
process afterwards. What answers matters:

- through nginx (production), every answer is JSON: the app's problem, or nginx's own error
  page in the same shape for what nginx refuses itself (oversized lines and headers);
- straight to gunicorn, a request gunicorn cannot parse (bad request line, oversized or
  invalid header, smuggling-shaped framing) is refused by gunicorn's own plain-text 400 before
  the app sees it. That is right: the app never runs on a request nobody can parse, and in
  production nginx stands in front and refuses the same requests first (see the nginx cases).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from scripts.topology import Nginx, find_nginx
from tests import figures
from tests.conftest import apply_migrations
from tests.private_pg import private_postgres
from tests.service import Service, running_service

pytestmark = pytest.mark.slow

MODULES = ['modules.example', 'tests.modules.probe']
TOKEN = b'testing-token'
JSON_TYPES = (b'application/json', b'application/problem+json')


@dataclass(frozen=True)
class Raw:
    name: str
    request: bytes
    expect: frozenset[int]
    malformed: bool = False  # gunicorn may refuse it itself, with its own (non-JSON) page
    proxied: bool = False  # nginx passes it on, so gunicorn's page reaches the client even through nginx


def post(path: bytes, body: bytes = b'{"name": "a"}', headers: bytes = b'') -> bytes:
    return (
        b'POST ' + path + b' HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ' + TOKEN + b'\r\n'
        b'Content-Type: application/json\r\n' + headers + b'Content-Length: ' + str(len(body)).encode() + b'\r\n'
        b'Connection: close\r\n\r\n' + body
    )


def bare(path: bytes, headers: bytes, body: bytes = b'{"name": "a"}') -> bytes:
    """A POST with exactly these headers (no Authorization added)."""
    length = b'Content-Length: ' + str(len(body)).encode() + b'\r\n'
    return (
        b'POST '
        + path
        + b' HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
        + headers
        + length
        + (b'Connection: close\r\n\r\n' + body)
    )


def auth(value: bytes) -> bytes:
    return bare(b'/example/foo', b'Authorization: ' + value + b'\r\n')


CHUNKED_HEAD = b'POST /example/foo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ' + TOKEN + b'\r\n'
CHUNKED_HEAD += b'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n'
OK, BAD, UNAUTHORIZED, NOT_FOUND = frozenset({200}), frozenset({400}), frozenset({401}), frozenset({404})

CASES = [
    Raw('valid request', post(b'/example/foo'), OK),
    Raw('invalid UTF-8 body', post(b'/example/foo', b'{"name": "\xff"}'), BAD),
    Raw('100,000 levels of nesting', post(b'/example/foo', b'[' * 100_000 + b']' * 100_000), BAD),
    Raw('5,000-digit integer', post(b'/example/foo', b'{"name": ' + b'9' * 5000 + b'}'), BAD),
    Raw('NaN', post(b'/example/foo', b'{"name": NaN}'), BAD),
    Raw('lone surrogate', post(b'/example/foo', b'{"name": "\\ud800"}'), BAD),
    Raw('NUL', post(b'/example/foo', b'{"name": "\\u0000"}'), BAD),
    Raw('10 MiB string', post(b'/example/foo', b'{"name": "' + b'x' * (10 << 20) + b'"}'), OK),
    Raw('empty body', post(b'/probe/returns_none', b''), OK),
    Raw('huge Authorization header', auth(b'Bearer ' + b'A' * 65536), frozenset({400, 431}), malformed=True),
    Raw('Authorization just under 8 KiB', auth(b'Bearer ' + b'A' * 7900), UNAUTHORIZED),
    Raw('Bearer with no token', auth(b'Bearer'), UNAUTHORIZED),
    Raw('non-ASCII token (UTF-8)', auth('Bearer caf\u00e9\u2603'.encode()), UNAUTHORIZED),
    Raw('non-ASCII token (latin-1 byte)', auth(b'Bearer caf\xe9'), UNAUTHORIZED),
    # gunicorn joins them (no valid token); nginx refuses a duplicate Authorization itself.
    Raw(
        'two Authorization headers, the first valid',
        bare(b'/example/foo', b'Authorization: Bearer ' + TOKEN + b'\r\nAuthorization: Bearer nope\r\n'),
        frozenset({400, 401}),
    ),
    Raw(
        'two Authorization headers, the second valid',
        bare(b'/example/foo', b'Authorization: Bearer nope\r\nAuthorization: Bearer ' + TOKEN + b'\r\n'),
        frozenset({400, 401}),
    ),
    Raw('__init__', post(b'/example/__init__'), NOT_FOUND),
    Raw('__class__', post(b'/probe/__class__'), NOT_FOUND),
    Raw('../example/foo', post(b'/probe/../example/foo'), NOT_FOUND),
    Raw('%2e%2e/', post(b'/probe/%2e%2e/example/foo'), NOT_FOUND),
    # RFC 9112: a request target is ASCII. nginx passes raw bytes on; gunicorn refuses them.
    Raw('raw UTF-8 in the path', post('/probe/\u2603'.encode()), BAD, malformed=True, proxied=True),
    Raw('invalid UTF-8 in the path', post(b'/probe/\xff\xfe'), BAD, malformed=True, proxied=True),
    Raw('path of 4,000 bytes', post(b'/probe/' + b'a' * 4000), NOT_FOUND),
    Raw('path of 7,000 bytes', post(b'/probe/' + b'a' * 7000), NOT_FOUND),
    Raw('path of 100,000 bytes', post(b'/probe/' + b'a' * 100_000), frozenset({400, 414}), malformed=True),
    Raw('wrong content type', post(b'/example/foo').replace(b'application/json', b'text/xml'), frozenset({415})),
    Raw('no content type', post(b'/example/foo').replace(b'Content-Type: application/json\r\n', b''), frozenset({415})),
    Raw('chunked body', CHUNKED_HEAD + b'd\r\n{"name": "a"}\r\n0\r\n\r\n', OK),
    Raw('bad chunk size', CHUNKED_HEAD + b'zz\r\n{"name": "a"}\r\n0\r\n\r\n', BAD, malformed=True),
    Raw(
        'Content-Length and chunked (smuggling)',
        CHUNKED_HEAD.replace(b'Connection', b'Content-Length: 4\r\nConnection') + b'd\r\n{"name": "a"}\r\n0\r\n\r\n',
        BAD,
        malformed=True,
    ),
    Raw('two Content-Lengths', post(b'/example/foo', headers=b'Content-Length: 3\r\n'), BAD, malformed=True),
    Raw('negative Content-Length', post(b'/example/foo').replace(b'Content-Length: 13', b'Content-Length: -1'), BAD, malformed=True),  # noqa: E501
    Raw('NUL in a header', post(b'/example/foo', headers=b'X-A: a\x00b\r\n'), BAD, malformed=True),
    # nginx drops an invalid header line (ignore_invalid_headers) and passes the request on.
    Raw('header without a colon', post(b'/example/foo', headers=b'Nonsense\r\n'), frozenset({200, 400}), malformed=True),  # noqa: E501
    Raw('200 headers', post(b'/example/foo', headers=b''.join(b'X-%d: a\r\n' % i for i in range(200))), OK),
    # Valid, and gunicorn takes it; nginx refuses more than 32 KiB of headers.
    Raw('10,000 headers', post(b'/example/foo', headers=b''.join(b'X-%d: a\r\n' % i for i in range(10_000))), frozenset({200, 400}), malformed=True),  # noqa: E501
    Raw('garbage request line', b'HELLO\r\n\r\n', BAD, malformed=True),
    Raw('binary garbage', bytes(range(256)) * 4, BAD, malformed=True),
    Raw('HTTP/2 preface', b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', frozenset({400, 505}), malformed=True),
    Raw('HTTP/3.0', post(b'/example/foo').replace(b'HTTP/1.1', b'HTTP/3.0'), frozenset({400, 505}), malformed=True),
    Raw('lower-case method', post(b'/example/foo').replace(b'POST', b'post'), frozenset({400, 405}), malformed=True),
    Raw('absolute URI', post(b'http://evil.example/example/foo'), OK),
]  # fmt: skip


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def is_json(self) -> bool:
        return self.headers.get(b'content-type', b'').split(b';')[0].strip() in JSON_TYPES


def exchange(port: int, request: bytes, timeout: float = 20) -> Answer:
    """Send the bytes, read until the server closes; the parsed answer (status 0: none)."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before reading it all
            sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    raw = b''.join(chunks)
    head, _, body = raw.partition(b'\r\n\r\n')
    lines = head.split(b'\r\n')
    if not lines[0].startswith(b'HTTP/'):
        return Answer(0, {}, raw)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b':')
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body)


@pytest.fixture(scope='module')
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with private_postgres() as pg:
        database = pg.create_database('dbapi_bad_http')
        apply_migrations(database, MODULES)
        log_dir = str(tmp_path_factory.mktemp('bad-http'))
        with running_service(database, log_dir, WEB_CONCURRENCY=2) as running:
            yield running


@pytest.fixture(scope='module')
def nginx(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    assert find_nginx() is not None, 'nginx is not installed: scripts/ensure_tools.sh installs it'
    proxy = Nginx(tmp_path_factory.mktemp('bad-http-nginx'), [service.port])
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.stop()


def assert_worker_alive(service: Service, workers: list[int]) -> None:
    assert service.worker_pids() == workers, 'a worker died or was replaced'
    assert service.live()


def check(answer: Answer, case: Raw, through_nginx: bool) -> None:
    figures.count_bad_input(answer.status)
    assert answer.status, f'no HTTP answer at all: {answer.body[:200]!r}'
    assert answer.status < 500, answer
    assert answer.status in case.expect, f'{answer.status} not in {sorted(case.expect)}: {answer.body[:300]!r}'
    from_app = b'x-request-id' in answer.headers
    if (through_nginx and not case.proxied) or from_app or not case.malformed:
        assert answer.is_json, f'not JSON: {answer.headers} {answer.body[:300]!r}'
        assert orjson.loads(answer.body)['status'] == answer.status if answer.status >= 400 else True
    if through_nginx:
        assert answer.headers.get(b'server', b'nginx') == b'nginx', 'nginx shows its version'


@pytest.mark.parametrize('case', CASES, ids=[case.name for case in CASES])
def test_straight_to_gunicorn(service: Service, case: Raw) -> None:
    workers = service.worker_pids()
    check(exchange(service.port, case.request), case, through_nginx=False)
    assert_worker_alive(service, workers)


@pytest.mark.parametrize('case', CASES, ids=[case.name for case in CASES])
def test_through_nginx(service: Service, nginx: Nginx, case: Raw) -> None:
    workers = service.worker_pids()
    check(exchange(nginx.port, case.request), case, through_nginx=True)
    assert_worker_alive(service, workers)


def test_slow_client_does_not_hold_the_worker(service: Service, nginx: Nginx) -> None:
    """Half a request sent, then silence: nginx holds it; the workers keep serving others."""
    with socket.create_connection(('127.0.0.1', nginx.port)) as stalled:
        stalled.sendall(post(b'/example/foo')[:40])
        time.sleep(0.2)
        for _ in range(4):
            answer = exchange(nginx.port, post(b'/example/foo'))
            figures.count_bad_input(answer.status)
            assert answer.status == 200, answer


@pytest.mark.parametrize(
    'request_bytes',
    [post(b'/example/foo'), post(b'/probe/' + b'a' * 10_000), b'HELLO\r\n\r\n'],
    ids=['app answer', 'nginx 414', 'nginx 400'],
)
def test_nginx_hides_its_version(nginx: Nginx, request_bytes: bytes) -> None:
    """server_tokens off: `Server: nginx`, no version in headers or bodies; nginx's own errors are safe too."""
    answer = exchange(nginx.port, request_bytes)
    figures.count_bad_input(answer.status)
    assert answer.headers.get(b'server') == b'nginx', answer.headers
    assert b'nginx/' not in answer.body
    assert answer.headers.get(b'x-content-type-options') == b'nosniff'
    assert answer.headers.get(b'cache-control') == b'no-store'
