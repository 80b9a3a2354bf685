"""The production worker (lib/server/gunicorn_worker.DrainingKeepAliveWorker), over raw sockets.

What it adds to gunicorn's parser and request cycle: kept-alive connections served by one
thread from one poller, pipelined requests, an unread body discarded (a large one read to its
end, so a client still sending it gets its answer), a stalled request dropped, and a SIGTERM
that refuses new connections at once while queued ones and requests still arriving on
kept-alive ones are answered. Last, what it relies on of gunicorn: the pieces it calls, and
answers byte for byte the same as gunicorn's own gthread worker gives.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import selectors
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from gunicorn import http
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.message import Request

from lib.server.gunicorn_worker import Connection, DrainingKeepAliveWorker, OneSend, bound_socket_calls, discard_body
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


def test_a_large_body_the_app_never_read_is_discarded_and_the_connection_kept(service: Service) -> None:
    sock, reader = connect(service)
    with sock:
        sock.sendall(request('/probe/returns_none', body=b' ' * (4 * 1024 * 1024), token='wrong'))
        assert reader.answer()[0] == 401
        sock.sendall(request('/probe/returns_string'))
        assert reader.answer()[0] == 200


def test_a_client_that_sends_a_too_large_body_whole_before_reading_gets_its_413(service: Service) -> None:
    """urllib sends the whole body before it reads: the 413 is answered before the body is read,
    and the worker reads the rest (lingering close) instead of resetting the connection."""
    body = b'{"x": "' + b'a' * (21 * 1024 * 1024) + b'"}'
    call = urllib.request.Request(  # noqa: S310 (the test's own loopback URL)
        f'{service.url}/probe/returns_none',
        data=body,
        headers={'Authorization': f'Bearer {TOKEN}', 'Content-Type': 'application/json'},
        method='POST',
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(call, timeout=READ_TIMEOUT)  # noqa: S310 (the test's own loopback URL)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())['status'] == 413


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


def test_sigterm_answers_the_connections_already_queued(
    database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A connection waiting in the listen queue when SIGTERM arrives is served, not reset: nginx
    has sent its POST on it and will not send it again."""
    service = Service(database, str(tmp_path_factory.mktemp('worker-queued')), WEB_CONCURRENCY=1).start()
    try:
        busy, busy_reader = connect(service)
        queued, queued_reader = connect(service)
        with busy, queued:
            busy.sendall(request('/probe/sleep', body=b'{"seconds": 1}'))
            time.sleep(0.3)  # the only worker is busy: `queued` waits in the kernel's queue
            queued.sendall(request('/probe/returns_string'))
            service.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            assert busy_reader.answer()[0] == 200
            assert queued_reader.answer()[0] == 200
            wait_refused(service.port)
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


# --- the worker's parts ------------------------------------------------------------------------


class SocketBody:
    """A request body read straight off a socket, as gunicorn's reader does (`recv`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.read = sock.recv


def send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the reader closed its end: the send is cut short
        sock.sendall(data)


def test_discarding_a_body_stops_at_its_end() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        bound_socket_calls(ours, 0.3)
        peer.sendall(b'x' * 100_000)
        peer.shutdown(socket.SHUT_WR)
        assert discard_body(SocketBody(ours), seconds=5, max_bytes=1_000_000)


def test_discarding_a_body_stops_at_its_size_bound() -> None:
    ours, peer = socket.socketpair()
    with peer:
        sender = threading.Thread(target=send_quietly, args=(peer, b'x' * 2_000_000))
        sender.start()
        with ours:
            bound_socket_calls(ours, 0.3)
            assert not discard_body(SocketBody(ours), seconds=5, max_bytes=1_000_000)
        sender.join()


def test_discarding_a_body_stops_when_the_client_stalls() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        bound_socket_calls(ours, 0.3)
        peer.sendall(b'x' * 1000)  # then silence: the socket's timeout ends the read
        assert not discard_body(SocketBody(ours), seconds=5, max_bytes=1_000_000)


def test_a_client_socket_reads_without_a_python_timeout_and_a_stalled_peer_ends_in_eagain() -> None:
    """The kernel bounds each call (SO_RCVTIMEO), so Python polls nothing before a recv or send."""
    ours, peer = socket.socketpair()
    with ours, peer:
        bound_socket_calls(ours, 0.3)
        assert ours.gettimeout() is None  # blocking: no poll before each call
        bound = struct.pack('ll', 0, 300_000)  # the kernel's bound on each call: 0.3 s
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(bound)) == bound
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, len(bound)) == bound
        with pytest.raises(BlockingIOError):  # a blocking recv ends only through that bound
            ours.recv(10)
        peer.sendall(b'ready')
        assert ours.recv(10) == b'ready'


# --- what this worker relies on of gunicorn (the adapter's guard) --------------------------------


def test_the_gunicorn_calls_this_worker_makes_keep_their_shape() -> None:
    assert list(inspect.signature(http.get_parser).parameters)[:3] == ['cfg', 'source', 'source_addr']
    assert list(inspect.signature(wsgi.create).parameters)[:5] == ['req', 'sock', 'client', 'server', 'cfg']
    for name in ('start_response', 'write', 'close', 'force_close', 'should_close'):
        assert callable(getattr(wsgi.Response, name)), name


def test_the_parser_reports_a_pipelined_request_and_its_fields() -> None:
    """gunicorn's parser on a real socket: a request read ahead shows in its buffer (the poller
    will not report it again), a body reads to its end, and `req_number` counts requests."""
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(request('/a', body=b'{"a": 1}') + request('/b', body=b'{"b": 2}'))
        conn = Connection(Config(), ours, ('127.0.0.1', 1), ('127.0.0.1', 2))
        first = next(conn.parser)
        assert (type(first), first.path, first.req_number) == (Request, '/a', 1)
        assert discard_body(first.body, seconds=1, max_bytes=100)
        assert conn.buffered()  # the second request came with the first
        second = next(conn.parser)
        assert (second.path, second.req_number, second.body.read()) == ('/b', 2, b'{"b": 2}')
        assert not conn.buffered()


class CountingSocket:
    """A real socket whose `sendall` calls are counted: one call is one segment on the wire."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[int] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(len(data))
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def answered_through_one_send(body: bytes, method: str = 'POST', status: str = '200 OK') -> tuple[list[int], bytes]:
    """gunicorn's own Response writes one answer through OneSend: the sends the socket saw, and
    the bytes the peer read."""
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(f'{method} /a HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n'.encode())
        received = bytearray()
        reader = threading.Thread(target=read_to_end, args=(peer, received))
        reader.start()  # a large answer fills the socket's buffer: it is read while sent
        conn = Connection(Config(), ours, ('127.0.0.1', 1), ('127.0.0.1', 2))
        counting = CountingSocket(ours)
        out = OneSend(counting)  # type: ignore[arg-type]
        resp, _ = wsgi.create(next(conn.parser), out, conn.addr, conn.server, Config())
        resp.start_response(status, [('Content-Type', 'application/json'), ('Content-Length', str(len(body)))])
        resp.write(body)
        resp.close()
        out.finish()
        ours.shutdown(socket.SHUT_WR)
        reader.join(READ_TIMEOUT)
    return counting.sends, bytes(received)


def read_to_end(sock: socket.socket, into: bytearray) -> None:
    sock.settimeout(READ_TIMEOUT)
    while chunk := sock.recv(1 << 20):
        into += chunk


def test_an_answer_leaves_in_one_send_head_and_body_together() -> None:
    """The worker's gain over two sends relies on gunicorn's Response writing the head, then the
    body, through the socket's `sendall`: an upgrade that writes otherwise shows here."""
    sends, received = answered_through_one_send(b'{"a": 1}')
    head, _, body = received.partition(b'\r\n\r\n')
    assert body == b'{"a": 1}'
    assert head.startswith(b'HTTP/1.1 200 OK\r\n')
    assert sends == [len(received)]


def test_a_head_only_answer_is_sent_when_it_ends() -> None:
    """HEAD: gunicorn writes no body; what was held goes out at `finish`."""
    sends, received = answered_through_one_send(b'', method='HEAD')
    assert received.startswith(b'HTTP/1.1 200 OK\r\n') and received.endswith(b'\r\n\r\n')
    assert sends == [len(received)]


def test_a_large_body_is_not_copied_behind_the_head() -> None:
    body = b'x' * (OneSend.merge_limit + 1)
    sends, received = answered_through_one_send(body)
    assert received.endswith(body)
    assert sends == [len(received) - len(body), len(body)]


def test_any_other_use_of_the_socket_sends_what_is_held_first() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        out = OneSend(ours)
        out.sendall(b'head ')
        out.send(b'then this')  # not held: the head must leave first
        out.sendall(b' and the rest')
        out.finish()
        ours.shutdown(socket.SHUT_WR)
        received = bytearray()
        read_to_end(peer, received)
    assert received == b'head then this and the rest'


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(('127.0.0.1', port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b''.join(chunks)


VARYING = (b'date:', b'x-request-id:')  # per answer; everything else must match


def comparable(answer: bytes) -> bytes:
    head, _, body = answer.partition(b'\r\n\r\n')
    lines = [line for line in head.split(b'\r\n') if not line.lower().startswith(VARYING)]
    try:
        document = json.loads(body)
    except ValueError:
        return b'\r\n'.join(lines) + b'\r\n\r\n' + body
    if isinstance(document, dict):
        document.pop('request_id', None)
    return b'\r\n'.join(lines) + b'\r\n\r\n' + json.dumps(document).encode()


def test_answers_are_byte_for_byte_those_of_gunicorns_own_gthread_worker(
    database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, service: Service
) -> None:
    """The request cycle here is gthread's: a gunicorn upgrade that changes what gthread sends
    (headers, framing, error pages) shows here as a difference."""
    requests = [
        request('/probe/returns_string', extra='Connection: close\r\n'),
        request('/probe/nope', extra='Connection: close\r\n'),
        request('/probe/returns_none', token='wrong', extra='Connection: close\r\n'),
        b'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        b'POST /probe/returns_none HTTP/1.0\r\nContent-Length: 0\r\n\r\n',
        b'BAD REQUEST LINE\r\n\r\n',  # gunicorn's own 400 page
    ]
    log_dir = str(tmp_path_factory.mktemp('gthread-parity'))
    with running_service(database, log_dir, WEB_CONCURRENCY=1, WORKER_CLASS='gthread', THREADS=1) as gthread:
        for data in requests:
            ours, theirs = raw_exchange(service.port, data), raw_exchange(gthread.port, data)
            assert ours.startswith(b'HTTP/1.'), ours
            assert comparable(ours) == comparable(theirs)
