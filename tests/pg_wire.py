"""What a client sends PostgreSQL, read off the wire: a TCP relay in front of the real server
that keeps the text of every simple-protocol Query message (one per round trip psycopg2 makes).

    with QueryLog(host, port) as wire:
        params = {**params, **wire.params}  # connect through it, without TLS
        ...
        wire.take()  # the queries sent since the last take, in order

The relay reads the protocol's framing only (a startup packet, then typed messages of a byte and
a length), so it needs connections without TLS or GSS encryption: `params` asks for neither.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType
from typing import Any

QUERY = ord('Q')


class QueryLog:
    """A relay to `host:port` on a free local port, logging the Query messages it forwards."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, int(port))
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self.queries: list[str] = []
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.closed = False

    @property
    def params(self) -> dict[str, Any]:
        return {'host': '127.0.0.1', 'port': self.port, 'sslmode': 'disable', 'gssencmode': 'disable'}

    def __enter__(self) -> QueryLog:
        self.spawn(self.accept)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.closed = True
        for sock in [self.listener, *self.sockets]:  # shutdown, not close alone, wakes a blocked accept or recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(5)
            assert not thread.is_alive(), 'a relay thread did not stop'

    def take(self) -> list[str]:
        """The queries sent since the last call, in the order they went out."""
        with self.lock:
            taken, self.queries = self.queries, []
        return taken

    def spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            self.spawn(self.client_to_server, client, server)
            self.spawn(self.pipe, server, client)

    def pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            sink.close()

    def client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        buffer = b''
        started = False  # the untyped startup packet (and any encryption request before it) is past
        try:
            while chunk := client.recv(65536):
                server.sendall(chunk)
                buffer += chunk
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack('!ii', buffer[:8])
                        if len(buffer) < length:
                            break
                        buffer = buffer[length:]
                        started = code >> 16 == 3  # protocol 3.0, not an SSL or GSS request
                        continue
                    if len(buffer) < 5:
                        break
                    kind, length = buffer[0], struct.unpack('!i', buffer[1:5])[0]
                    if len(buffer) < 1 + length:
                        break
                    if kind == QUERY:
                        with self.lock:
                            self.queries.append(buffer[5 : 1 + length].rstrip(b'\x00').decode())
                    buffer = buffer[1 + length :]
        except OSError:
            pass
        finally:
            server.close()
