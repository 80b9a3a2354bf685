"""How the benchmark runs the service: the production settings, pointed at the bench database."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bench.database import PG

PATHS = {
    'foo': '/example/foo',
    'read': '/bench/read',
    'upsert': '/bench/upsert',
    'rows': '/bench/rows',
    'batch_read': '/batch',
    'batch_upsert': '/batch',
    'upsert_keyed': '/bench/upsert',  # with an Idempotency-Key of its own on every request
    'upsert_event': '/bench/upsert_event',  # the same upsert emitting one event (bench.events)
}
BATCH = 100  # actions per batch request (BATCH_MAX_ACTIONS's default), and per pgbench batch transaction
ACTIONS = {'batch_read': BATCH, 'batch_upsert': BATCH}  # actions per request of a scenario; 1 if not named


def service_env(dbname: str, token: str, log_dir: Path, recycle: bool) -> dict[str, str]:
    """The production settings, pointed at the bench database, with the bench module added."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(('_DB_NAME', '_DB_HOST', '_DB_PORT', '_DB_USER'))}
    env.update(
        ENVIRONMENT='production',
        BEARER=token,
        DEFAULT_DB_NAME=dbname,
        DEFAULT_DB_HOST=PG['host'],
        DEFAULT_DB_PORT=str(PG['port']),
        DEFAULT_DB_USER=PG['user'],
        EXTRA_MODULES='modules.bench',
        LOG_DIR=str(log_dir),
        LOG_STDOUT='0',
        PROXY_HOPS='1',  # as the stack sets it (docker-compose.yml): nginx appends the caller's address
    )
    if not recycle:
        # Recycled workers would hide a leak from the memory figure and blur the connection peak.
        env['MAX_REQUESTS'] = '0'
    return env


def callers_env(token: str, count: int, folder: Path) -> dict[str, str]:
    """Settings that authenticate through a CALLERS_FILE of `count` callers instead of BEARER.

    The benchmark's token is the last caller's, scoped to what the scenarios call, so each request
    pays the file's whole path: the digest lookup among `count` callers, the scope check and the
    once-a-second stat. The other callers hold random digests.
    """
    lines = []
    for number in range(count - 1):
        digest = os.urandom(32).hex()
        lines += [f'[callers.team{number:05d}]', f'tokens_sha256 = ["{digest}"]', 'scopes = ["example"]', '']
    digest = hashlib.sha256(token.encode()).hexdigest()
    lines += ['[callers.bench]', f'tokens_sha256 = ["{digest}"]', 'scopes = ["bench", "example/foo"]', '']
    path = folder / 'callers.toml'
    path.write_text('\n'.join(lines))
    return {'CALLERS_FILE': str(path), 'BEARER': ''}
