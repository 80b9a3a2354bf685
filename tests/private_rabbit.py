"""A RabbitMQ node of the test's own, to stop and start at will: the fault test takes the broker
away under the relays, which the machine's shared node must never be.

Debian's `rabbitmq-server` runs the node as the `rabbitmq` OS user (the script does `su` when run
as root), with its own name, AMQP port, distribution port, data and logs in a world-writable
temporary directory, no plugins, and the machine's epmd and Erlang cookie.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions

from scripts.topology import free_port
from tests.tools import require_tool

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


class PrivateRabbit:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix='dbapi-rabbit-'))
        self.directory.chmod(0o777)  # the node runs as the rabbitmq user
        self.node = f'dbapi-{uuid.uuid4().hex[:8]}@localhost'
        self.port = free_port()
        self.url = f'amqp://127.0.0.1:{self.port}/%2F'
        (self.directory / 'enabled_plugins').write_text('[].\n', encoding='utf-8')
        (self.directory / 'rabbitmq.conf').write_text(
            f'listeners.tcp.local = 127.0.0.1:{self.port}\n', encoding='utf-8'
        )
        self.env = {
            **os.environ,
            'RABBITMQ_NODENAME': self.node,
            'RABBITMQ_DIST_PORT': str(free_port()),
            'RABBITMQ_CONFIG_FILE': str(self.directory / 'rabbitmq.conf'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': str(self.directory / 'enabled_plugins'),
            'RABBITMQ_MNESIA_BASE': str(self.directory / 'mnesia'),
            'RABBITMQ_LOG_BASE': str(self.directory / 'log'),
            'RABBITMQ_PID_FILE': str(self.directory / 'node.pid'),
        }

    def answers(self) -> bool:
        try:
            pika.BlockingConnection(pika.URLParameters(self.url)).close()
        except pika.exceptions.AMQPError:
            return False
        return True

    def start(self) -> None:
        """Start the node and wait until it takes AMQP connections."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / 'node.pid').unlink()
        subprocess.run([self.binary, '-detached'], env=self.env, check=True, timeout=30, capture_output=True)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.answers():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f'the private RabbitMQ {self.node} did not answer within {START_TIMEOUT_SECONDS:g} s'
                )
            time.sleep(0.2)

    def pid(self) -> int | None:
        try:
            return int((self.directory / 'node.pid').read_text(encoding='utf-8').strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the node (SIGTERM: RabbitMQ's orderly shutdown) and wait until its process is gone."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while Path(f'/proc/{pid}').exists():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def private_rabbit() -> Iterator[PrivateRabbit]:
    binary = require_tool(
        shutil.which('rabbitmq-server') or shutil.which('rabbitmq-server', path='/usr/sbin'), 'rabbitmq-server'
    )
    node = PrivateRabbit(binary)
    try:
        node.start()
        yield node
    finally:
        node.remove()
