"""The production worker (lib/gunicorn_worker.DrainingKeepAliveWorker), over raw sockets.

What it adds to gunicorn's parser and request cycle: kept-alive connections served by one
thread from one poller, pipelined requests, an unread body discarded, a stalled request
dropped, the answer's head and body sent together, and a SIGTERM that refuses new
connections at once while requests still arriving on kept-alive ones are answered.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from gunicorn.config import Config
from gunicorn.http.wsgi import Response

from lib.gunicorn_worker import CoalescingResponse, DrainingKeepAliveWorker, freeze_settings, open_client
from scripts.topology import wait_until
from tests.service import TOKEN, Service, running_service

READ_TIMEOUT = 10.0


def request(path: str, body: bytes = b'{}', token: str = TOKEN, extra: str = '') -> bytes:
    head = (
        f'POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n'
        f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n'
    )
    return head.encode('latin-1') + body


class Reader:
    """Reads whole HTTP/1.1 answers (with a Content-Length) off one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b''

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b'\r\n\r\n' not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b'\r\n\r\n')
        status_line, *lines = head.decode('latin-1').split('\r\n')
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(':') for line in lines)}
        length = int(headers['content-length'])
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """Whether the server has closed the connection (EOF), once what it sent is read."""
        try:
            return self.sock.recv(1) == b''
        except ConnectionResetError:
            return True

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f'closed by the server; unparsed: {self.buffer[:200]!r}')
        self.buffer += chunk


@pytest.fixture(scope='module')
def service(database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # One worker: every connection of a test meets the same single thread.
    with running_service(database, str(tmp_path_factory.mktemp('worker-logs')), WEB_CONCURRENCY=1) as running:
        yield running


def connect(service: Service) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(('127.0.0.1', service.port), timeout=READ_TIMEOUT)
    return sock, Reader(sock)


def test_stopped_workers_end_their_database_sessions_instead_of_dropping_them(database, tmp_path) -> None:
    """PostgreSQL counts a session whose client vanished without saying goodbye as abandoned
    (pg_stat_database.sessions_abandoned). After a SIGTERM no session is: gunicorn.conf.py's
    worker_exit closes the pools, and a worker's normal exit would close its connections too;
    a worker that died hard (os._exit, a kill) would leave them abandoned."""
    admin = psycopg2.connect(**database)
    admin.autocommit = True

    def sessions() -> tuple[int, int]:
        with admin.cursor() as cursor:
            cursor.execute('SELECT pg_stat_clear_snapshot()')
            cursor.execute(
                'SELECT sessions, sessions_abandoned FROM pg_stat_database WHERE datname = %s', [database['dbname']]
            )
            return cursor.fetchone()

    started, abandoned = sessions()
    with running_service(database, str(tmp_path)) as service:
        backends = {service.post('/probe/backend_pid').json() for _ in range(20)}
        assert backends  # the workers hold pooled sessions
    wait_until(lambda: sessions()[0] >= started + len(backends), 5, "the workers' sessions did not end")
    ended, abandoned_after = sessions()
    admin.close()
    assert ended >= started + len(backends)  # every worker's session has ended
    assert abandoned_after == abandoned


def test_the_production_worker_is_this_one(service: Service) -> None:
    sock, reader = connect(service)
    with sock:
        sock.sendall(request('/probe/returns_none'))
        status, headers, _ = reader.answer()
    assert status == 200
    assert headers['connection'] == 'keep-alive'  # the sync worker would say close


def test_one_connection_serves_request_after_request(service: Service) -> None:
    sock, reader = connect(service)
    with sock:
        for _ in range(5):
            sock.sendall(request('/probe/returns_string'))
            status, headers, body = reader.answer()
            assert (status, headers['connection'], json.loads(body)) == (200, 'keep-alive', '<b>not html</b>')


def test_pipelined_requests_are_all_answered_in_order(service: Service) -> None:
    sock, reader = connect(service)
    with sock:
        sock.sendall(request('/probe/returns_none') + request('/probe/returns_string') + request('/probe/nope'))
        statuses = [reader.answer()[0] for _ in range(3)]
    assert statuses == [200, 200, 404]


def test_a_body_the_app_never_read_does_not_spill_into_the_next_request(service: Service) -> None:
    sock, reader = connect(service)
    with sock:
        # Refused before the body is read (wrong token); its bytes must not be taken for a request.
        sock.sendall(request('/probe/returns_none', body=b'{"x": "GET / HTTP/1.1"}' * 100, token='wrong'))
        assert reader.answer()[0] == 401
        sock.sendall(request('/probe/returns_string'))
        assert reader.answer()[0] == 200


def test_connection_close_from_the_client_is_honoured(service: Service) -> None:
    sock, reader = connect(service)
    with sock:
        sock.sendall(request('/probe/returns_none', extra='Connection: close\r\n'))
        status, headers, _ = reader.answer()
        assert (status, headers['connection']) == (200, 'close')
        assert reader.closed()


def test_a_connection_is_closed_after_its_share_of_answers(service: Service) -> None:
    sock, reader = connect(service)
    with sock:
        for _ in range(DrainingKeepAliveWorker.requests_per_connection - 1):
            sock.sendall(request('/probe/returns_none'))
            assert reader.answer()[1]['connection'] == 'keep-alive'
        sock.sendall(request('/probe/returns_none'))
        status, headers, _ = reader.answer()
        assert (status, headers['connection']) == (200, 'close')  # the client reconnects, to any worker
        assert reader.closed()


def test_a_busy_worker_leaves_new_connections_to_idle_ones_for_a_moment() -> None:
    worker = DrainingKeepAliveWorker.__new__(DrainingKeepAliveWorker)  # no process: only the rule
    worker.accept_wanted_since = None
    assert worker.may_accept(busy=False)
    assert not worker.may_accept(busy=True)
    time.sleep(DrainingKeepAliveWorker.accept_delay * 1.5)
    assert worker.may_accept(busy=True)  # never starved: after the delay it takes it
    assert not worker.may_accept(busy=True)


def test_a_wait_for_a_connection_another_worker_took_does_not_carry_over() -> None:
    worker = DrainingKeepAliveWorker.__new__(DrainingKeepAliveWorker)
    worker.accept_wanted_since = None
    worker.connections = {}
    worker.poller = selectors.DefaultSelector()  # nothing registered: no listener is readable
    assert not worker.may_accept(busy=True)
    time.sleep(DrainingKeepAliveWorker.accept_delay * 1.5)
    worker.serve_ready(timeout=0)  # the connection is gone: another worker took it
    assert not worker.may_accept(busy=True), 'a busy worker took the next connection at once'


def test_a_connection_that_has_not_sent_yet_keeps_its_worker_from_taking_another(
    database: dict[str, Any], tmp_path: Any
) -> None:
    """Clients connect, then send. A worker holding a connection whose first request has not
    arrived yet is about to be busy: a second new connection must go to the idle worker, or its
    request waits behind the first while a worker sleeps (the sigterm fault test saw this once).
    Each worker has its own pool, so the database backend that answers tells the worker apart."""
    with running_service(database, str(tmp_path), WEB_CONCURRENCY=2) as two_workers:
        for _ in range(10):  # with the worker's old accept rule, half the pairs landed on one worker
            first, first_reader = connect(two_workers)
            time.sleep(0.03)  # both workers have woken and one holds `first`
            second, second_reader = connect(two_workers)
            time.sleep(0.03)
            first.sendall(request('/probe/backend_pid'))
            second.sendall(request('/probe/backend_pid'))
            pids = [json.loads(reader.answer()[2]) for reader in (first_reader, second_reader)]
            first.close()
            second.close()
            assert pids[0] != pids[1], 'both new connections were taken by one worker'


def test_a_stalled_request_is_dropped_and_the_others_are_served_meanwhile_or_after(service: Service) -> None:
    stalled, stalled_reader = connect(service)
    other, other_reader = connect(service)
    with stalled, other:
        stalled.sendall(request('/probe/returns_none')[:20])  # half a request line, then nothing
        time.sleep(0.2)
        started = time.monotonic()
        other.sendall(request('/probe/returns_none'))
        assert other_reader.answer()[0] == 200
        waited = time.monotonic() - started
        assert stalled_reader.closed()
    assert waited < DrainingKeepAliveWorker.request_timeout + 2


def test_sigterm_refuses_new_connections_and_still_answers_kept_alive_ones(
    database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    log_dir = str(tmp_path_factory.mktemp('worker-stop'))
    service = Service(database, log_dir, WEB_CONCURRENCY=1).start()
    try:
        sock, reader = connect(service)
        with sock:
            sock.sendall(request('/probe/returns_none'))
            assert reader.answer()[0] == 200
            service.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            refused_after = wait_refused(service.port)
            # nginx may already be sending a POST on its kept-alive connection: it is answered,
            # with "Connection: close", not dropped.
            sock.sendall(request('/probe/returns_string'))
            status, headers, _ = reader.answer()
            assert (status, headers['connection']) == (200, 'close')
            assert reader.closed()
        assert refused_after < 1.0
        assert service.process.wait(DrainingKeepAliveWorker.stop_linger + 10) == 0  # type: ignore[union-attr]
    finally:
        service.terminate()


def wait_refused(port: int, limit: float = 5.0) -> float:
    """Seconds until a new connection to `port` is refused."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
        except ConnectionRefusedError:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f'port {port} still accepted connections {limit} s after SIGTERM')


# --- the answer's bytes ------------------------------------------------------------------------


class FakeSocket:
    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


class FakeRequest:
    version = (1, 1)
    method = 'POST'

    def should_close(self) -> bool:
        return False


def response(sock: FakeSocket, method: str = 'POST') -> CoalescingResponse:
    from gunicorn.config import Config

    req = FakeRequest()
    req.method = method
    return CoalescingResponse(req, sock, Config())


def started(headers: list[tuple[str, str]], method: str = 'POST') -> tuple[FakeSocket, CoalescingResponse]:
    """A response whose app has called start_response, and the socket it would send on."""
    sock = FakeSocket()
    resp = response(sock, method)
    resp.start_response('200 OK', headers)
    return sock, resp


def test_head_and_body_leave_in_one_send() -> None:
    sock, resp = started([('Content-Type', 'application/json'), ('Content-Length', '2')])
    resp.write(b'{}')
    resp.close()
    assert len(sock.sends) == 1
    head, _, body = sock.sends[0].partition(b'\r\n\r\n')
    assert head.startswith(b'HTTP/1.1 200 OK\r\n') and b'Content-Length: 2' in head and body == b'{}'


def test_a_body_without_length_is_chunked_and_terminated() -> None:
    sock, resp = started([('Content-Type', 'application/json')])
    resp.write(b'[1,')
    resp.write(b'2]')
    resp.close()
    wire = b''.join(sock.sends)
    head, _, body = wire.partition(b'\r\n\r\n')
    assert b'Transfer-Encoding: chunked' in head
    assert body == b'3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n'


def test_an_answer_without_body_still_sends_its_head_once() -> None:
    sock, resp = started([('Content-Type', 'application/json'), ('Content-Length', '2')], method='HEAD')
    resp.write(b'{}')  # a HEAD answer carries no body, whatever the app writes
    resp.close()
    assert len(sock.sends) == 1 and sock.sends[0].endswith(b'\r\n\r\n')


def test_the_answer_leaves_only_when_the_app_is_done_and_a_large_one_streams() -> None:
    sock, resp = started([('Content-Length', '4')])
    resp.write(b'{}')
    resp.write(b'[]')
    assert sock.sends == []  # held: the app (its access record) finishes before the client wakes
    resp.close()
    assert len(sock.sends) == 1 and sock.sends[0].endswith(b'\r\n\r\n{}[]')
    big = b'x' * (CoalescingResponse.hold_bytes + 1)
    sock, resp = started([('Content-Length', str(len(big) + 1))])
    resp.write(big)
    assert len(sock.sends) == 1 and sock.sends[0].endswith(big)  # not held in memory: it streams
    resp.write(b'y')
    resp.close()
    assert b''.join(sock.sends).endswith(big + b'y') and len(sock.sends) == 2


ANSWER_HEADERS = [
    ('Content-Type', 'application/json'),
    ('Content-Length', '2'),
    ('Connection', 'keep-alive'),  # hop-by-hop: gunicorn drops it
    ('X-Padded', ' value\t'),  # stripped
    ('Cache-Control', 'no-store'),
]


def plain_gunicorn_headers(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int | None]:
    resp = Response(FakeRequest(), FakeSocket(), Config())
    resp.process_headers(headers)
    return resp.headers, resp.response_length


@pytest.mark.parametrize('round_', [1, 2, 3])  # the first checks and keeps; the later ones use what was kept
def test_kept_header_checks_give_gunicorns_own_result(round_: int) -> None:
    for answer in (ANSWER_HEADERS, [('Content-Length', '7'), ('Content-Type', 'application/json')]):
        _, resp = started(answer)
        assert (resp.headers, resp.response_length) == plain_gunicorn_headers(answer)
    assert ('Content-Type', 'application/json') in CoalescingResponse.passed_headers
    assert not any(name.lower() in ('content-length', 'connection') for name, _ in CoalescingResponse.passed_headers)


@pytest.mark.parametrize(
    ('version', 'method', 'headers', 'close'),
    [
        ((1, 1), 'POST', [('Content-Length', '2')], False),
        ((1, 1), 'POST', [('Content-Length', '2')], True),
        ((1, 1), 'POST', [], False),  # no length: chunked
        ((1, 0), 'POST', [('Content-Length', '2')], False),
        ((1, 1), 'GET', [('Connection', 'upgrade'), ('Upgrade', 'websocket')], False),
    ],
)
def test_the_first_lines_are_gunicorns_own(monkeypatch: pytest.MonkeyPatch, version, method, headers, close) -> None:
    for now in (1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.5):  # the Date line follows the second
        monkeypatch.setattr(time, 'time', lambda now=now: now)
        lines = []
        for kind in (Response, CoalescingResponse):
            req = FakeRequest()
            req.version, req.method = version, method
            resp = kind(req, FakeSocket(), Config())
            resp.start_response('200 OK', list(headers))
            if close:
                resp.force_close()
            lines.append(resp.default_headers())
        assert lines[0] == lines[1]


@pytest.mark.parametrize('bad', [('Bad Name', 'x'), ('X-Ok', 'line\r\nbreak'), ('X-Ok', 3)])
def test_a_bad_header_is_refused_even_next_to_kept_ones(bad: tuple[str, Any]) -> None:
    answer = [('Cache-Control', 'no-store'), bad]
    started(answer[:1])
    with pytest.raises(Exception) as plain:  # whichever gunicorn raises: checked next
        plain_gunicorn_headers(answer)
    with pytest.raises(type(plain.value)):
        started(answer)


def test_kept_header_checks_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CoalescingResponse, 'passed_headers', set())
    monkeypatch.setattr(CoalescingResponse, 'passed_headers_max', 3)
    for number in range(10):
        started([('X-Request-ID', f'id-{number}')])
    assert len(CoalescingResponse.passed_headers) == 3


def test_a_failure_after_body_bytes_were_held_can_still_become_a_500() -> None:
    sock, resp = started([('Content-Length', '4')])
    resp.write(b'{}')  # held, not sent
    resp.unsend()
    assert sock.sends == [] and not resp.headers_sent


def test_a_client_socket_reads_without_a_python_timeout_and_a_stalled_peer_ends_in_eagain() -> None:
    """The kernel bounds each call (SO_RCVTIMEO), so Python polls nothing before a recv or send."""
    ours, peer = socket.socketpair()
    with ours, peer:
        open_client(ours, 0.3)
        assert ours.gettimeout() is None  # blocking: no poll before each call
        started = time.monotonic()
        with pytest.raises(BlockingIOError):
            ours.recv(10)
        assert 0.25 < time.monotonic() - started < 2
        peer.sendall(b'ready')
        assert ours.recv(10) == b'ready'


def test_a_failure_before_any_byte_left_can_still_become_a_500() -> None:
    sock, resp = started([('Content-Length', '2')])
    resp.send_headers()  # the head is ready, not sent
    resp.unsend()
    assert sock.sends == [] and not resp.headers_sent


def test_frozen_settings_read_as_gunicorn_config_does() -> None:
    cfg = Config()
    cfg.set('keepalive', 7)
    cfg.set('limit_request_line', 8190)
    cfg.set('worker_class', 'lib.gunicorn_worker.DrainingKeepAliveWorker')
    before = {name: getattr(cfg, name) for name in cfg.settings}
    freeze_settings(cfg)
    assert {name: getattr(cfg, name) for name in cfg.settings} == before
    assert vars(cfg)['keepalive'] == 7  # a plain attribute now: no __getattr__, no get()
    assert cfg.worker_class is DrainingKeepAliveWorker  # properties still work
