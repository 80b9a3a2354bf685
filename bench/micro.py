"""The app's own cost per request, without sockets or a server: `python -m bench.micro [--profile]`.

Calls the production app's WSGI callable in a loop (CPU time per request, so a busy machine
blurs it less than wall time), and with `--profile` shows where that time goes (pyinstrument).
The server's and the network's share is what the full benchmark adds.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.database import bench_database
from bench.service import BATCH, PATHS, service_env


def batch(action: str, bodies: list[dict[str, int]]) -> bytes:
    return json.dumps({'actions': [{'action': action, 'body': body} for body in bodies]}).encode()


BODIES = {
    'foo': b'{"name":"user1","email":"user1@example.com"}',
    'read': b'{"aid":4242}',
    'upsert': b'{"aid":4242,"bid":1,"abalance":7}',
    'rows': b'{"first":4242}',
    'batch_read': batch('bench/read_tx', [{'aid': 4242 + 9973 * step} for step in range(BATCH)]),
    'batch_upsert': batch(
        'bench/upsert', [{'aid': 4242 + 9973 * step, 'bid': 1, 'abalance': 7} for step in range(BATCH)]
    ),
    'upsert_keyed': b'{"aid":4242,"bid":1,"abalance":7}',  # with a new Idempotency-Key on every call
    'upsert_event': b'{"aid":4242,"bid":1,"abalance":7}',  # the upsert and its event (bench.events)
}
KEYS = itertools.count()
KEY_PREFIX = secrets.token_hex(8)


def fresh_keys() -> None:
    """A new prefix in a forked child (bench.instructions forks one per count), so no two
    processes send the same Idempotency-Key."""
    global KEY_PREFIX
    KEY_PREFIX = secrets.token_hex(8)


os.register_at_fork(after_in_child=fresh_keys)


def environ(path: str, body: bytes, token: str, key: bool = False) -> dict[str, Any]:
    # Of one length (a prefix of 16 hex digits, a counter of 10 digits): what a request costs does
    # not change with how many came before it.
    extra = {'HTTP_IDEMPOTENCY_KEY': f'{KEY_PREFIX}-{next(KEYS):010d}'} if key else {}
    return {
        **extra,
        'REQUEST_METHOD': 'POST',
        'PATH_INFO': path,
        'SCRIPT_NAME': '',
        'QUERY_STRING': '',
        'SERVER_NAME': '127.0.0.1',
        'SERVER_PORT': '8000',
        'SERVER_PROTOCOL': 'HTTP/1.1',
        'REMOTE_ADDR': '127.0.0.1',
        'CONTENT_TYPE': 'application/json',
        'CONTENT_LENGTH': str(len(body)),
        'HTTP_AUTHORIZATION': f'Bearer {token}',
        'HTTP_HOST': '127.0.0.1:8000',
        'HTTP_USER_AGENT': 'bench.micro',
        'wsgi.input': io.BytesIO(body),
        'wsgi.url_scheme': 'http',
        'wsgi.errors': sys.stderr,
        'wsgi.multithread': False,
        'wsgi.multiprocess': True,
        'wsgi.run_once': False,
        'wsgi.version': (1, 0),
    }


def call(app: Callable[..., Any], path: str, body: bytes, token: str, key: bool = False) -> None:
    statuses: list[str] = []
    chunks = app(environ(path, body, token, key), lambda status, headers, exc_info=None: statuses.append(status))
    for _ in chunks:
        pass
    if hasattr(chunks, 'close'):
        chunks.close()
    if not statuses[0].startswith('2'):
        raise RuntimeError(f'{path} answered {statuses[0]}')


def per_request_us(app: Callable[..., Any], scenario: str, token: str, count: int) -> float:
    path, body = PATHS[scenario], BODIES[scenario]
    for _ in range(min(count, 200)):
        call(app, path, body, token, scenario == 'upsert_keyed')
    started = time.process_time()
    for _ in range(count):
        call(app, path, body, token, scenario == 'upsert_keyed')
    return (time.process_time() - started) / count * 1e6


@contextmanager
def production_app(dbname: str, token: str, log_dir: Path) -> Iterator[Callable[..., Any]]:
    os.environ.update(service_env(dbname, token, log_dir, recycle=False))
    from app import create_app  # imported after the environment is set: settings reads it once

    app = create_app()
    try:
        yield app
    finally:
        app.extensions['dbapi.pools'].close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench.micro', description=__doc__.splitlines()[0])
    parser.add_argument('scenarios', nargs='*', default=['foo', 'read', 'upsert', 'rows'])
    parser.add_argument('--count', type=int, default=3000)
    parser.add_argument('--profile', action='store_true')
    args = parser.parse_args(argv)
    token = secrets.token_hex(20)
    log_dir = Path(tempfile.mkdtemp(prefix='dbapi-micro-'))
    try:
        with bench_database() as dbname, production_app(dbname, token, log_dir) as app:
            for scenario in args.scenarios:
                count = max(20, args.count // 100) if scenario in ('rows', 'batch_read', 'batch_upsert') else args.count
                print(
                    f'{scenario:<7} {per_request_us(app, scenario, token, count):9.1f} µs CPU per request', flush=True
                )
                if args.profile:
                    profile(app, scenario, token, count)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def profile(app: Callable[..., Any], scenario: str, token: str, count: int) -> None:
    """A sampling profile (pyinstrument): unlike cProfile, it does not inflate small calls."""
    from pyinstrument import Profiler

    path, body = PATHS[scenario], BODIES[scenario]
    profiler = Profiler(interval=0.0002)
    profiler.start()
    for _ in range(count):
        call(app, path, body, token, scenario == 'upsert_keyed')
    profiler.stop()
    print(profiler.output_text(show_all=bool(os.getenv('SHOW_ALL')), short_mode=False, time='percent_of_total'))


if __name__ == '__main__':
    raise SystemExit(main())
