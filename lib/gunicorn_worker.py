"""gunicorn's sync worker, stopping without dropping connections the kernel already accepted.

On SIGTERM the stock sync worker finishes its request and exits, while its copy of the
listening socket stays open until then: connections arriving meanwhile wait in the kernel's
queue and are reset when the last copy closes. nginx has already sent its POST on them and
(rightly) never sends a POST twice, so the client gets a 502 (measured: 6 in 629 requests
when one replica stopped under load). This worker, on SIGTERM, takes every queued connection,
closes its copy of the listener at once, so new connections are refused and nginx tries
another replica, and serves what it took before exiting.
"""

from __future__ import annotations

import socket
from types import FrameType
from typing import Any

from gunicorn import util
from gunicorn.workers.sync import SyncWorker


class ListenerAddress:
    """What `handle()` needs of a listener, its address, still there after the listener is closed
    (SIGTERM may close it while a request it accepted is being parsed)."""

    def __init__(self, name: Any) -> None:
        self.name = name

    def getsockname(self) -> Any:
        return self.name


class DrainingSyncWorker(SyncWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.addresses = {id(listener): ListenerAddress(listener.getsockname()) for listener in self.sockets}
        self.taken: list[tuple[ListenerAddress, socket.socket, Any]] = []
        self.draining = False

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        super().handle(self.addresses.get(id(listener), listener), client, addr)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM: take what is queued, stop listening; the run loop ends after its request."""
        self.alive = False
        if self.draining:
            return  # a second SIGTERM (from the master and from a process-group kill): the listeners are closed
        self.draining = True
        for listener in self.sockets:
            self.take_queued(listener)
            listener.close()

    def take_queued(self, listener: Any) -> None:
        name = self.addresses[id(listener)]
        while True:
            try:
                client, addr = listener.accept()
            except OSError:  # EAGAIN: the queue is empty (non-blocking); EBADF: a second SIGTERM
                return
            client.setblocking(True)
            util.close_on_exec(client)
            self.taken.append((name, client, addr))

    def run(self) -> None:
        try:
            super().run()
        except (OSError, ValueError):
            # The loop touched the listener the signal handler had just closed.
            if self.alive:
                raise
        while self.taken:
            name, client, addr = self.taken.pop(0)
            self.handle(name, client, addr)
