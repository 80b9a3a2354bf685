"""Start a WSGI app under the production gunicorn configuration, and watch its workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.getenv('VIRTUAL_ENV', REPO / '.venv')) / 'bin'
START_TIMEOUT = 30.0
STOP_TIMEOUT = 35.0


class ServerError(RuntimeError):
    """The server did not start or answer."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []

    def worker_rss(self) -> dict[int, int]:
        """Resident bytes of each worker, by pid."""
        sizes = {}
        for worker in self.workers():
            try:
                sizes[worker.pid] = worker.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return sizes


def gunicorn_command(wsgi_app: str) -> list[str]:
    return [str(VENV_BIN / 'gunicorn'), '-c', str(REPO / 'gunicorn.conf.py'), wsgi_app]


@contextmanager
def serve(name: str, command: list[str], env: Mapping[str, str], log_dir: Path, probe: str) -> Iterator[Server]:
    """Run `command` (binding BIND from `env`, or `{port}`) until the block ends; `probe` must answer 2xx first."""
    port = free_port()
    log = log_dir / f'{name}.log'
    full_env = dict(env, BIND=f'127.0.0.1:{port}')
    command = [part.replace('{port}', str(port)) for part in command]  # servers that take the port as an argument
    with log.open('ab') as output:
        process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=output, stderr=subprocess.STDOUT)
    server = Server(name, process, port, log)
    try:
        wait_ready(server, probe)
        yield server
    finally:
        stop(process)


def wait_ready(server: Server, probe: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f'{server.name} exited {server.process.returncode} at start; see {server.log}')
        if answers(server.url + probe):
            return
        time.sleep(0.1)
    raise ServerError(f'{server.name} did not answer {probe} within {START_TIMEOUT:g} s; see {server.log}')


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (a loopback URL we built)
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
