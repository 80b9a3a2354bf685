"""gunicorn's worker for this service: kept-alive connections, one thread, a drain that drops nothing.

Measured under load through nginx (tests/test_topology.py, README "Deploy"): gunicorn's stock
sync and gthread workers both reset requests when a replica stopped. On SIGTERM a worker
finishes its request and exits while its copy of the listening socket stays open: connections
arriving meanwhile wait in the kernel's queue and are reset when the last copy closes. nginx
has already sent its POST on them and (rightly) never sends a POST twice, so the client gets a
502. This worker, on SIGTERM, takes every queued connection and closes its copy of the
listener at once, so new connections are refused and nginx tries another replica.

Measured with /proc CPU counters under wrk (README "Speed"): the sync worker's TCP connect,
accept and close per request, and gunicorn's two sends per answer (head, then body), were most
of a small request's cost in the server. This worker keeps connections alive in one poller and
sends each answer at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import socket
import struct
import time
from datetime import datetime
from types import FrameType
from typing import Any, ClassVar

from gunicorn import http, util
from gunicorn.http import wsgi
from gunicorn.http.wsgi import Response
from gunicorn.workers.base import Worker

from lib.clock import SecondText

# `util.http_date()`, formatted once a second: it has no finer unit.
_http_date = SecondText(util.http_date)


class CoalescingResponse(Response):
    """Sends a small answer whole, head and body in one send, when the app is done with it.

    gunicorn sends the head and the body with two `sendall` calls; on a loopback or LAN each
    send costs the kernel's whole TCP path, and the pair was most of a small request's time in
    the server. The bytes also wait for the end of the app's iteration (the access record is
    written there): a send wakes the client, which on a busy machine takes the CPU from this
    worker, and work left after the send then resumes later with cold caches. Up to
    `hold_bytes` are held; a larger answer streams, its first piece sent with the head. Nothing
    here serves files, so sendfile (which writes the head itself) is off.
    """

    hold_bytes = 64 * 1024
    held: list[bytes] | None = None  # the head, then body pieces, not sent yet
    held_size = 0
    # Header lines gunicorn has checked and passed through unchanged, kept per process: most of
    # an answer's headers are the same on every answer (Content-Type, Vary, Cache-Control...),
    # and the check (two regexes, the hop-by-hop test) was ~0.7 µs a header. Bounded, so ever
    # new values (request ids) stop being added; Content-Length is never kept: it sets a field.
    passed_headers: ClassVar[set[tuple[str, str]]] = set()
    passed_headers_max = 256

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        passed = self.passed_headers
        for header in headers:
            if type(header) is tuple and header in passed:
                self.headers.append(header)
                continue
            count = len(self.headers)
            super().process_headers((header,))
            if (
                len(self.headers) == count + 1
                and self.headers[count] == header
                and header[0].lower() != 'content-length'
                and len(passed) < self.passed_headers_max
            ):
                passed.add(header)

    def default_headers(self) -> list[str]:
        """gunicorn's own first lines, the same text, with the Date line made once a second:
        `util.http_date` (email.utils.formatdate) was five Python calls on every answer."""
        if self.upgrade:
            connection = 'upgrade'
        elif self.should_close():
            connection = 'close'
        else:
            connection = 'keep-alive'
        headers = [
            f'HTTP/{self.req.version[0]}.{self.req.version[1]} {self.status}\r\n',
            f'Server: {self.version}\r\n',
            f'Date: {_http_date.at(int(time.time()))}\r\n',
            f'Connection: {connection}\r\n',
        ]
        if self.chunked:
            headers.append('Transfer-Encoding: chunked\r\n')
        return headers

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        # A list, not a generator: a generator is resumed once per header (a Python call each).
        lines = [*self.default_headers(), *[f'{name}: {value}\r\n' for name, value in self.headers], '\r\n']
        head = ''.join(lines).encode('latin-1')
        self.held, self.held_size = [head], len(head)
        self.headers_sent = True

    def _emit_body(self, data: bytes) -> None:
        if self.chunked:
            data = b'%X\r\n%s\r\n' % (len(data), data)
        if self.held is None:  # streaming already: the rest goes as it comes
            self.sock.sendall(data)
            return
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > self.hold_bytes:
            self.flush()

    def flush(self, tail: bytes = b'') -> None:
        held, self.held, self.held_size = self.held or [], None, 0
        if tail:
            held.append(tail)
        if held:
            self.sock.sendall(b''.join(held))

    def close(self) -> None:
        if not self.headers_sent:
            self.send_headers()
        self.flush(b'0\r\n\r\n' if self.chunked else b'')

    def can_sendfile(self) -> bool:
        return False

    def unsend(self) -> None:
        """The app failed before any byte left: the worker may still answer 500 instead."""
        if self.held:
            self.held, self.held_size = None, 0
            self.headers_sent = False


class Receiver:
    """What gunicorn's parser reads from: the socket's `recv` and nothing else.

    Without `settimeout` to find, the parser's `finish_body` leaves the socket's mode alone;
    it otherwise switched it twice a request (an ioctl each), and the kernel's receive timeout
    (`open_client`) bounds every read anyway.
    """

    __slots__ = ('recv',)

    def __init__(self, sock: socket.socket) -> None:
        self.recv = sock.recv


class Connection:
    """A kept-alive client connection: its socket, its parser, and when it was last used."""

    __slots__ = ('addr', 'answered', 'fd', 'last_used', 'parser', 'server', 'sock')

    def __init__(self, cfg: Any, sock: socket.socket, addr: Any, server: Any) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: an error answer may close the socket before we do
        self.addr = addr
        self.server = server
        self.parser = http.get_parser(cfg, Receiver(sock), addr)
        self.last_used = time.monotonic()
        self.answered = 0

    def buffered(self) -> bool:
        """Whether a pipelined request is already read: the socket will not report it again."""
        return self.parser.unreader.buf.getbuffer().nbytes > 0


class DrainingKeepAliveWorker(Worker):
    """One thread serving many kept-alive connections in turn, and draining on SIGTERM.

    The sync worker closes every connection after its answer, so each request also pays a TCP
    connect, accept and close on both sides; gthread keeps connections alive but hands every
    request to a thread pool. This worker keeps every connection in one poller and serves each
    readable connection's request in the poller's own thread, with gunicorn's own parser.

    Like the sync worker it serves one request at a time. A client that sends part of a request
    holds it for at most `request_timeout` seconds; it belongs behind nginx, which sends whole
    requests. On SIGTERM it takes every connection already queued, closes its copy of the
    listener (new connections are refused, nginx tries another replica), answers requests still
    arriving on kept-alive connections with "Connection: close", and closes a connection only
    after it has been idle for `stop_linger` seconds, then exits.
    """

    # Longer than nginx's upstream keepalive_timeout (2 s): an idle connection is closed by
    # nginx, never by us while nginx may be sending a POST on it (nginx never resends a POST).
    stop_linger = 3.0
    request_timeout = 5.0  # for the rest of a request once its first bytes arrived
    drain_max_bytes = 64 * 1024  # unread body discarded to keep a connection; more closes it
    accept_delay = 0.01  # how long a busy worker leaves a new connection to an idle one
    # After this many answers a connection is closed ("Connection: close", so the client knows):
    # it reconnects, and an idle worker takes it: pinned connections do not stay piled on one.
    # Not much lower: when every worker is busy the new connection waits `accept_delay`, and at
    # 200 that wait cost reads by key 9% of their rate and raised their p99 (measured, README).
    requests_per_connection = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: dict[int, Connection] = {}
        self.taken: list[tuple[socket.socket, Any, Any]] = []
        self.draining = False
        self.last_notified = 0.0
        self.accept_wanted_since: float | None = None

    def init_process(self) -> None:
        if self.cfg.is_ssl:
            raise RuntimeError('DrainingKeepAliveWorker serves plain HTTP/1.1 behind nginx; ssl is not supported')
        self.poller = selectors.DefaultSelector()
        freeze_settings(self.cfg)
        # Before the app loads and SIGTERM can arrive: handle_exit's accept must never block.
        for listener in self.sockets:
            listener.setblocking(False)
        super().init_process()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM: take what is queued and stop listening; run() then drains and returns."""
        self.alive = False
        if self.draining:
            return  # a second SIGTERM (from the master and from a process-group kill)
        self.draining = True
        for listener in self.sockets:
            while True:
                try:
                    client, addr = listener.accept()
                except OSError:  # EAGAIN: the queue is empty (non-blocking)
                    break
                self.taken.append((client, addr, listener.getsockname()))
        self.stop_accepting(close=True)

    def stop_accepting(self, close: bool) -> None:
        """Unregister the listeners first: the poller keys them by descriptor."""
        for listener in self.sockets:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(listener)
            if close:
                listener.close()

    def notify(self) -> bool:
        """The heartbeat file's timestamp: once a second is plenty for a 60 s timeout. True when
        it was written: the loop checks its parent at the same pace, not with a call a request."""
        now = time.monotonic()
        if now - self.last_notified < 1.0:
            return False
        self.last_notified = now
        super().notify()
        return True

    def run(self) -> None:
        # Signals (SIGTERM among them) write to this pipe: the wait ends at once.
        self.poller.register(self.PIPE[0], selectors.EVENT_READ)
        if not self.draining:  # a SIGTERM while the app loaded has closed the listeners
            for listener in self.sockets:
                self.poller.register(listener, selectors.EVENT_READ, listener)
        while self.alive:
            if self.notify() and self.ppid != os.getppid():
                self.log.info('Parent changed, shutting down: %s', self)
                break
            self.serve_ready(timeout=1.0)
            self.close_idle(self.cfg.keepalive)
        self.drain()

    def drain(self) -> None:
        """Serve what was taken and what still arrives on open connections, then close them."""
        self.stop_accepting(close=False)
        while self.taken:
            self.open(*self.taken.pop(0))
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.connections and time.monotonic() < deadline:
            self.notify()
            self.serve_ready(timeout=0.2)
            self.close_idle(self.stop_linger)
        for conn in list(self.connections.values()):
            self.close(conn)
        self.poller.close()

    def serve_ready(self, timeout: float) -> None:
        try:
            events = self.poller.select(timeout)
        except OSError as error:
            if error.errno != errno.EINTR:
                raise
            return
        listeners = []
        busy = False
        for key, _ in events:
            if isinstance(key.data, Connection):
                self.serve(key.data)
                busy = True
            elif key.data is not None:
                listeners.append(key.data)
            else:
                with contextlib.suppress(OSError):  # EAGAIN: already emptied
                    os.read(self.PIPE[0], 4096)
        if not listeners:
            # Another worker took what was waiting: the next wait starts afresh, not from a stale
            # start that would make a busy worker take the next connection at once.
            self.accept_wanted_since = None
            return
        if self.may_accept(busy or self.awaiting_first_request()):
            for listener in listeners:
                self.accept(listener)

    def may_accept(self, busy: bool) -> bool:
        """Whether to take a new connection now: a worker with requests of its own waiting leaves
        it to an idle one for `accept_delay`. A kept-alive connection stays with the worker that
        accepted it, and the busiest worker, always awake, would otherwise take most of them
        (measured: 5 of nginx's 8 connections on one of 5 workers, one worker with none)."""
        now = time.monotonic()
        if not busy:
            self.accept_wanted_since = None
            return True
        if self.accept_wanted_since is None:
            self.accept_wanted_since = now
        if now - self.accept_wanted_since < self.accept_delay:
            return False
        self.accept_wanted_since = None
        return True

    def awaiting_first_request(self) -> bool:
        """Whether a connection taken here has not sent its first request yet. Clients connect,
        then send: such a worker is about to be busy, and a second new connection taken now
        would wait behind the first while another worker sleeps (measured: half of the pairs of
        connections opened 30 ms apart landed on one of two idle workers)."""
        return any(conn.answered == 0 for conn in self.connections.values())

    def accept(self, listener: socket.socket) -> None:
        try:
            client, addr = listener.accept()
        except OSError as error:  # EBADF: SIGTERM closed it after the poller reported it
            if self.draining or error.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.open(client, addr, listener.getsockname())

    def open(self, client: socket.socket, addr: Any, server: Any) -> None:
        util.close_on_exec(client)
        open_client(client, self.request_timeout)
        conn = Connection(self.cfg, client, addr, server)
        self.connections[conn.fd] = conn
        self.poller.register(client, selectors.EVENT_READ, conn)

    def close(self, conn: Connection, graceful: bool = False) -> None:
        self.connections.pop(conn.fd, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.fd)
        if graceful:
            close_without_waiting(conn.sock)
        else:
            util.close(conn.sock)

    def close_idle(self, idle_seconds: float) -> None:
        """Close connections unused for `idle_seconds`, but not one with a request waiting: while
        this thread was busy elsewhere its client may have sent one (closing would reset it)."""
        cutoff = time.monotonic() - idle_seconds
        idle = [conn for conn in self.connections.values() if conn.last_used < cutoff]
        if not idle:
            return
        probe = select.poll()  # poll, not select: descriptors may be above FD_SETSIZE
        for conn in idle:
            probe.register(conn.fd, select.POLLIN)
        waiting = {fd for fd, _ in probe.poll(0)}
        for conn in idle:
            if conn.fd not in waiting:
                self.close(conn)

    def serve(self, conn: Connection) -> None:
        """Answer the requests the connection has sent; close it when it ends or must end."""
        while True:
            keep = self.serve_one(conn)
            if not keep:
                self.close(conn, graceful=True)
                return
            conn.last_used = time.monotonic()
            if not conn.buffered():
                return

    def serve_one(self, conn: Connection) -> bool:
        """One request; True when the connection stays open for the next."""
        req = None
        try:
            req = next(conn.parser)
            keep = self.handle_request(req, conn)
            # A body the app left unread would make the socket look readable: discard it.
            return keep and conn.parser.finish_body(max_bytes=self.drain_max_bytes)
        except (http.errors.NoMoreData, StopIteration):
            return False  # the client closed, or HTTP says this connection ends
        except (TimeoutError, BlockingIOError):  # the kernel's timeout (open_client) ends as EAGAIN
            self.log.debug('Closing a connection that stalled mid-request.')
            return False
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception('Socket error processing request.')
            return False
        except Exception as error:  # noqa: BLE001  # gunicorn answers it: 400 for bad HTTP, 500 otherwise
            self.handle_error(req, conn.sock, conn.addr, error)
            return False

    def handle_request(self, req: Any, conn: Connection) -> bool:
        """gunicorn's request cycle with the coalescing response; True to keep the connection."""
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            request_start = datetime.now()
            resp, environ = wsgi.create(req, conn.sock, conn.addr, conn.server, self.cfg, CoalescingResponse)
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info('Autorestarting worker after current request.')
                self.alive = False
            conn.answered += 1
            if (
                not self.alive
                or not self.cfg.keepalive
                or conn.answered >= self.requests_per_connection
                or len(self.connections) > self.cfg.worker_connections
            ):
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                for item in respiter:
                    resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, 'close'):
                    respiter.close()
            return not resp.should_close()
        except OSError:
            raise  # the connection is gone: serve_one() logs it
        except (Exception, SystemExit):
            if resp is not None:
                resp.unsend()
            if resp is not None and resp.headers_sent:
                # Part of the answer is out: a 500 now would corrupt it (SystemExit: the timeout).
                self.log.exception('Error handling request')
                raise StopIteration() from None
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception('Exception in post_request hook')


def freeze_settings(cfg: Any) -> None:
    """Make every setting a plain attribute of this worker's copy of gunicorn's Config.

    Each `cfg.name` otherwise goes through Config.__getattr__ and the setting's `get()`: the
    parser, the environ and the response read about thirty of them per request, a quarter of
    gunicorn's own cost of a request (measured in-process: parse, environ and answer of a small
    POST, 165 -> 125 µs). A worker never changes its settings (a reload starts new workers), so
    the values are read once. Properties (`is_ssl`, `worker_class`...) stay properties.
    """
    for name, setting in cfg.settings.items():
        if not isinstance(getattr(type(cfg), name, None), property):
            object.__setattr__(cfg, name, setting.get())  # Config.__setattr__ refuses settings


def open_client(sock: socket.socket, timeout: float) -> None:
    """Blocking mode with the kernel's send and receive timeouts: a ready socket is read at once,
    a stalled peer ends the call with EAGAIN after `timeout` seconds.

    Not `settimeout()`: with a Python-level timeout every recv and send first polls the socket,
    two extra system calls per request on a socket the poller has just reported ready.
    """
    sock.setblocking(True)
    seconds = int(timeout)
    interval = struct.pack('ll', seconds, int((timeout - seconds) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)


def close_without_waiting(sock: socket.socket) -> None:
    """Close after the answer: FIN first, then discard what the peer already sent, so the close
    is not a reset that could cut the answer short. Never waits (one thread serves everyone)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        while sock.recv(65536):
            pass
    except OSError:  # BlockingIOError: nothing more sent; or the peer is gone already
        pass
    util.close(sock)
