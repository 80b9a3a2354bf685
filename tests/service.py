"""The service as production runs it: a real gunicorn master and workers, for process-level faults.

`Service` starts `gunicorn -c gunicorn.conf.py app:app` from the repository root with the
environment the tests choose (settings.py reads it), waits until it answers, and stops it
with SIGTERM (gunicorn's graceful shutdown). `post()` talks to it the way a backend does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import requests

from lib.server.startup import WORKER_LOGGER
from tests.logs import log_paths
from tests.private_pg import free_port

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / 'gunicorn'
TOKEN = 'testing-token'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
START_TIMEOUT_SECONDS = 30


class Service:
    """One gunicorn master with its workers, on 127.0.0.1 at a free port."""

    def __init__(self, database: dict[str, Any], log_dir: str, **env: Any) -> None:
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            'ENVIRONMENT': 'testing',
            'BEARER': TOKEN,
            'BIND': f'127.0.0.1:{self.port}',
            'WEB_CONCURRENCY': '2',
            'DEFAULT_DB_HOST': str(database['host']),
            'DEFAULT_DB_PORT': str(database['port']),
            'DEFAULT_DB_NAME': str(database['dbname']),
            'DEFAULT_DB_USER': str(database['user']),
            'LOG_DIR': log_dir,
            'EXTRA_MODULES': 'tests.modules.probe',
            'GUNICORN_LOG_LEVEL': 'warning',
            **{key: str(value) for key, value in env.items()},
        }
        self.workers = int(self.env['WEB_CONCURRENCY'])
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_path = Path(log_dir) / f'gunicorn-{self.port}.err'

    def __repr__(self) -> str:
        return f'<Service {self.url} pid={self.process.pid if self.process else None}>'

    def start(self) -> Service:
        with self.stderr_path.open('wb') as stderr:
            self.process = subprocess.Popen(
                [str(GUNICORN), '-c', 'gunicorn.conf.py', 'app:app'],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.wait_workers(self.workers)
        return self

    def wait_workers(self, count: int, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until `count` workers have loaded the app and the service answers /health/live.

        A forked worker that is still loading takes no connection: a test that needs every
        worker busy at once would see its requests queue on the workers already serving.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f'gunicorn exited at start:\n{self.stderr()}')
            workers = set(self.worker_pids())
            if len(workers) >= count and workers <= self.ready_pids() and self.live():
                return
            time.sleep(0.05)
        raise RuntimeError(f'gunicorn did not start {count} workers within {timeout} s:\n{self.stderr()}')

    def ready_pids(self) -> set[int]:
        """The workers that wrote their ready line (lib.server.startup.announce_worker_ready)."""
        pids = set()
        for path in log_paths(self.log_dir):
            for line in path.read_bytes().split(b'\n'):
                if WORKER_LOGGER.encode() not in line:
                    continue
                with contextlib.suppress(ValueError):  # a line still being written
                    record = json.loads(line)
                    if record.get('log.logger') == WORKER_LOGGER:
                        pids.add(record['process.pid'])
        return pids

    def live(self) -> bool:
        try:
            return requests.get(f'{self.url}/health/live', timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            return [child.pid for child in psutil.Process(self.process.pid).children()]
        return []

    def post(self, path: str, body: Any = None, timeout: float = 15, **kwargs: Any) -> requests.Response:
        return requests.post(f'{self.url}{path}', json=body, headers=AUTH, timeout=timeout, **kwargs)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (graceful: in-flight requests finish); the master's exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors='replace')[-4000:]
        return ''


@contextlib.contextmanager
def running_service(database: dict[str, Any], log_dir: str, **env: Any) -> Iterator[Service]:
    service = Service(database, log_dir, **env)
    try:
        yield service.start()
    finally:
        service.terminate()
