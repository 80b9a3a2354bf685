"""gunicorn's worker for this service: kept-alive connections, one thread, a stop that drops nothing.

This file is the adapter to gunicorn: the only place that uses gunicorn beyond its settings and
server hooks. A custom worker is a subclass of gunicorn's `Worker` that implements `run()` (the
`worker_class` setting); the worker below serves HTTP with gunicorn's own parser
(`http.get_parser`), environ and response (`wsgi.create`, `Response` unchanged), and runs the
same request cycle as gunicorn's gthread worker. gunicorn does not document those pieces as API;
tests/test_worker.py checks each one this file relies on, and that the bytes this worker sends
are the ones gunicorn's own gthread worker sends.

Why not gthread itself, or a subclass of it: gthread serves each request in two turns of its
event loop (the request, then putting the connection back), with its bookkeeping around both;
a gthread subclass measured well below this loop on the read-by-key benchmark (figures in the
commit message). What gunicorn does not do at all, and this worker adds:

- On SIGTERM it takes every connection already queued on the listening socket and closes its
  copy of the listener at once. gunicorn's master closes its copies first; a stock worker keeps
  its copy open until it exits, so connections arriving meanwhile wait in the kernel's queue and
  are reset when the last copy closes. nginx has already sent its POST on them and (rightly)
  never sends a POST twice: the client would get a 502. Closed at once, new connections are
  refused and nginx tries another replica.
- A busy worker leaves a new connection to an idle one for a moment (`accept_delay`).
- After an answer, a body the app left unread is read and thrown away, for a bounded time and
  size (what nginx's lingering close does), so a client still sending it reads the answer (a 413,
  say) instead of a reset.
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
from collections.abc import Iterator
from datetime import datetime
from types import FrameType
from typing import Any

from gunicorn import http
from gunicorn.http import wsgi
from gunicorn.http.errors import NoMoreData, ParseException
from gunicorn.workers.base import Worker


class Connection:
    """A kept-alive client connection: its socket, its parser, and when it was last used."""

    __slots__ = ('addr', 'answered', 'fd', 'last_used', 'out', 'parser', 'server', 'sock')

    def __init__(self, cfg: Any, sock: socket.socket, addr: Any, server: Any) -> None:
        self.sock = sock
        self.out = OneSend(sock)  # what gunicorn's Response writes answers to
        self.fd = sock.fileno()  # kept: an error answer may close the socket before we do
        self.addr = addr
        self.server = server
        self.parser = http.get_parser(cfg, sock, addr)
        self.last_used = time.monotonic()
        self.answered = 0

    def buffered(self) -> bool:
        """Whether a pipelined request is already read: the socket will not report it again.
        (gunicorn's gthread worker asks its parser's read-ahead buffer the same question.)"""
        held: int = self.parser.unreader.buf.getbuffer().nbytes
        return held > 0


class OneSend:
    """A connection's socket as gunicorn's `Response` writes an answer to it: the head is held
    and leaves with the first bytes of the body in one send, so a small answer is one segment
    and the client (nginx) reads it once, where `Response.write` makes two sends.

    Order is never at stake: `finish()` ends each answer by sending what is still held (a head
    without a body), and any other use of the socket (`send`, `sendfile`, ...) sends it first.
    """

    __slots__ = ('head', 'passing', 'sock')
    # Above this, a body goes out in a send of its own rather than copied behind the head.
    merge_limit = 256 * 1024

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b''
        self.passing = False  # the head is out: the rest of the answer goes straight through

    def sendall(self, data: bytes) -> None:
        if self.passing:
            self.sock.sendall(data)
        elif not self.head:
            self.head = bytes(data)
        else:
            head, self.head, self.passing = self.head, b'', True
            if len(data) > self.merge_limit:
                self.sock.sendall(head)
                self.sock.sendall(data)
            else:
                self.sock.sendall(head + data)

    def release(self) -> None:
        """Send what is held; what follows in this answer goes straight through."""
        head, self.head, self.passing = self.head, b'', True
        if head:
            self.sock.sendall(head)

    def finish(self) -> None:
        """The answer is whole: send what is still held; the next answer starts afresh. (After
        a failed answer the worker closes the connection: what was held is dropped with it.)"""
        self.release()
        self.passing = False

    def __getattr__(self, name: str) -> Any:
        self.release()
        return getattr(self.sock, name)


class DrainingKeepAliveWorker(Worker):
    """One thread serving many kept-alive connections in turn, and draining on SIGTERM.

    The sync worker closes every connection after its answer, so each request also pays a TCP
    connect, accept and close on both sides. This worker keeps every connection in one poller
    and serves each readable connection's request in the poller's own thread.

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
    request_timeout = 5.0  # seconds of silence allowed within a request, and within an answer's send
    # Lingering close: after an answer, the unread rest of the body is discarded for at most
    # `linger_seconds` (checked between reads, each also bounded by `request_timeout`) and at
    # most `linger_bytes`; past either bound the connection is closed.
    linger_seconds = 2.0
    linger_bytes = 64 * 1024 * 1024  # three times MAX_CONTENT_LENGTH's default
    accept_delay = 0.01  # how long a busy worker leaves a new connection to an idle one
    # After this many answers a connection is closed ("Connection: close", so the client knows):
    # it reconnects, and an idle worker takes it: pinned connections do not stay piled on one.
    # nginx does the same with its upstream connections (keepalive_requests, 1000).
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
        accepted it, and the busiest worker, always awake, would otherwise take most of them."""
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
        would wait behind the first while another worker sleeps."""
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
        bound_socket_calls(client, self.request_timeout)
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
            conn.sock.close()

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
            # The body the app left unread: read to its end (bounded) so the client, which may
            # still be sending it, reads the answer, and it is not taken for the next request.
            return discard_body(req.body, self.linger_seconds, self.linger_bytes) and keep
        except (NoMoreData, StopIteration):
            return False  # the client closed, or HTTP says this connection ends
        except (TimeoutError, BlockingIOError):  # the kernel's timeout (bound_socket_calls) ends as EAGAIN
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
        """gunicorn's request cycle (as its gthread worker runs it); True to keep the connection."""
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            request_start = datetime.now()
            resp, environ = wsgi.create(req, conn.out, conn.addr, conn.server, self.cfg)
            if 'chunked' in environ.get('HTTP_TRANSFER_ENCODING', '').lower():
                environ['wsgi.input'] = ChunkedInput(environ['wsgi.input'])
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
                conn.out.finish()  # the answer is whole: what is still held goes out
            finally:
                self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, 'close'):
                    respiter.close()
            return not resp.should_close()
        except OSError:
            raise  # the connection is gone: serve_one() logs it
        except (Exception, SystemExit):
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


class InvalidBody(OSError):
    """A chunked body whose framing gunicorn's parser refused, as the app sees it."""


class ChunkedInput:
    """`wsgi.input` of a chunked body. gunicorn parses the chunks only as the app reads them, and
    some of its parse errors (ParseException: a bad trailer, say) are not OSError; here they are
    raised as OSError (InvalidBody), which the app answers with a 400 like any unreadable body,
    so gunicorn's exceptions stay inside this adapter."""

    __slots__ = ('body',)

    def __init__(self, body: Any) -> None:
        self.body = body

    def read(self, size: int | None = None) -> bytes:
        return self.parsed(self.body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self.parsed(self.body.readline, size)

    @staticmethod
    def parsed(read: Any, size: int | None) -> bytes:
        """`read(size)`, gunicorn's parse errors raised as InvalidBody."""
        try:
            data: bytes = read(size)
        except ParseException as error:
            raise InvalidBody(str(error)) from error
        return data

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


def discard_body(body: Any, seconds: float, max_bytes: int) -> bool:
    """Read and drop what is left of a request body; True when it ended within the bounds.

    Each read is bounded by the socket's own timeout, the whole by `seconds` (checked between
    reads) and `max_bytes`. A body already read costs no system call.
    """
    deadline = time.monotonic() + seconds
    discarded = 0
    try:
        while discarded <= max_bytes and time.monotonic() < deadline:
            data = body.read(65536)
            if not data:
                return True
            discarded += len(data)
    except (OSError, ParseException):  # the peer stalled or left, or sent a malformed chunk
        return False
    return False


def bound_socket_calls(sock: socket.socket, timeout: float) -> None:
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
    sock.close()
