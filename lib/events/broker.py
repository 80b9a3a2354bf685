"""The relay's side of RabbitMQ: one pika `SelectConnection`, one channel in confirm mode, the
durable topic exchange declared, and batches published with their confirms awaited together.

pika's `BlockingChannel` waits for each message's confirm before sending the next (one round
trip per event); here a whole batch is sent, then the broker's acks (often one `multiple` ack
for many) are awaited at once. The relay is single-threaded: it runs pika's IOLoop only while it
waits (`run`, through the IOLoop's public start/stop), for the broker or for the database's
socket (`wait_readable`), so the connection's heartbeats are answered while the relay sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pika
import pika.exceptions
import pika.frame
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.connection import Connection
from pika.spec import Basic

from lib.events.outbox import EXCHANGE

log = logging.getLogger('dbapi.events')

PERSISTENT = pika.DeliveryMode.Persistent


class BrokerError(Exception):
    """The broker could not be reached, refused us, or went away."""


@dataclass(frozen=True, slots=True)
class Message:
    routing_key: str
    body: bytes
    properties: pika.BasicProperties


class Broker:
    """A connection to RabbitMQ for publishing with confirms; `open` again after any failure."""

    def __init__(self, url: str, exchange: str = EXCHANGE, ioloop: IOLoop | None = None) -> None:
        self.parameters = pika.URLParameters(url)
        self.exchange = exchange
        self.ioloop = ioloop or IOLoop()
        self.connection: Connection | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.error: BaseException | None = None
        self.tag = 0  # the channel's last delivery tag
        self.unconfirmed: dict[int, tuple[list[bool | None], int]] = {}  # tag -> (outcomes, index)

    # --- the loop -----------------------------------------------------------------------------

    def run(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run the IOLoop until `done()` or `timeout` seconds; whether `done()`. Callbacks that
        may make `done()` true stop the loop; a stop meant for an earlier run only costs a turn."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            timer = self.ioloop.call_later(left, self.ioloop.stop)
            try:
                self.ioloop.start()
            finally:
                self.ioloop.remove_timeout(timer)
        return True

    def stop_loop(self) -> None:
        """Make the running `run` look at its condition again: from a signal handler or another
        thread (pika's one thread-safe call)."""
        self.ioloop.add_callback_threadsafe(self.ioloop.stop)

    def wait_readable(self, fd: int, timeout: float, interrupted: Callable[[], bool]) -> bool:
        """Wait until `fd` can be read, `timeout` passes or `interrupted()`; whether it can."""
        readable = [False]

        def on_readable(_fd: int, _events: int) -> None:
            readable[0] = True
            self.ioloop.stop()

        self.ioloop.add_handler(fd, on_readable, IOLoop.READ)
        try:
            self.run(lambda: readable[0] or interrupted(), timeout)
        finally:
            self.ioloop.remove_handler(fd)
        return readable[0]

    def sleep(self, seconds: float, interrupted: Callable[[], bool]) -> None:
        self.run(interrupted, seconds)

    # --- the connection -----------------------------------------------------------------------

    def open(self, timeout: float) -> None:
        """Connect, open a channel in confirm mode and declare the exchange; BrokerError if not
        done within `timeout` seconds."""
        self.close()
        self.reset()
        self.connection = pika.SelectConnection(
            self.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_failed,
            on_close_callback=self._on_failed,
            custom_ioloop=self.ioloop,
        )
        if not self.run(lambda: self.ready or self.error is not None, timeout):
            self.close()
            raise BrokerError(f'no connection to the broker within {timeout:g} s')
        if self.error is not None:
            error = self.error
            self.close()
            raise BrokerError(describe(error))

    def reset(self) -> None:
        self.ready, self.error, self.tag = False, None, 0

    @property
    def connected(self) -> bool:
        return self.ready and self.error is None

    def close(self) -> None:
        """Close the connection, waiting briefly for the broker's answer; unconfirmed messages fail."""
        connection, self.connection, self.channel, self.ready = self.connection, None, None, False
        self._fail_unconfirmed()
        if connection is None or connection.is_closed:
            return
        if not connection.is_closing:
            try:
                connection.close()
            except pika.exceptions.ConnectionWrongStateError:
                return
        self.run(lambda: connection.is_closed, 2.0)

    def _on_open(self, connection: Connection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._declare(channel))

    def _declare(self, channel: Channel) -> None:
        channel.exchange_declare(self.exchange, exchange_type='topic', durable=True, callback=self._on_declared)

    def _on_declared(self, _frame: pika.frame.Method[Basic.Ack]) -> None:
        self.ready = True
        self.ioloop.stop()

    def _on_failed(self, _connection: Connection, error: BaseException) -> None:
        self.error = error
        self.ready = False
        self._fail_unconfirmed()
        self.ioloop.stop()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        """The broker closed the channel (a refused declaration, an unknown exchange): the
        connection goes too, and the next `open` starts afresh."""
        self.error = reason
        self.ready = False
        self._fail_unconfirmed()
        connection = self.connection
        if connection is not None and connection.is_open:
            connection.close()
        self.ioloop.stop()

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message], timeout: float) -> list[bool]:
        """Publish every message, then wait for the broker's confirms; for each message, whether
        the broker confirmed it (False: nacked, or unknown when the connection failed or the
        confirms took longer than `timeout`: the connection is then closed)."""
        channel = self.channel
        if channel is None or not self.connected:
            raise BrokerError('not connected to the broker')
        outcomes: list[bool | None] = [None] * len(messages)
        for index, message in enumerate(messages):
            channel.basic_publish(self.exchange, message.routing_key, message.body, message.properties)
            self.tag += 1
            self.unconfirmed[self.tag] = (outcomes, index)
        if not self.run(lambda: None not in outcomes or not self.connected, timeout):
            confirmed = sum(map(bool, outcomes))
            log.warning('the broker confirmed %d of %d messages within %g s', confirmed, len(outcomes), timeout)
            self.close()
        return [outcome is True for outcome in outcomes]

    def _on_confirm(self, frame: pika.frame.Method[Basic.Ack | Basic.Nack]) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        tag = method.delivery_tag
        tags = [known for known in self.unconfirmed if known <= tag] if method.multiple else [tag]
        for known in tags:
            found = self.unconfirmed.pop(known, None)
            if found is not None:
                outcomes, index = found
                outcomes[index] = acked
        if not self.unconfirmed:
            self.ioloop.stop()

    def _fail_unconfirmed(self) -> None:
        for outcomes, index in self.unconfirmed.values():
            outcomes[index] = False
        self.unconfirmed.clear()


def describe(error: BaseException) -> str:
    """One line for the log: pika's errors often say little by their class alone."""
    text = str(error).strip() or repr(error)
    return f'{type(error).__name__}: {text}'
