"""How the benchmark runs the service (the production settings, pointed at the bench database)
and its FastAPI peer, and checks that both answer alike."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.database import PG
from bench.servers import VENV_BIN

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


# The peer (bench/peer.py): FastAPI on uvicorn, measured beside the app in the same rounds.
PEER_SCENARIOS = ('read', 'upsert')
PEER_PACKAGES = ('fastapi', 'pydantic', 'asyncpg', 'uvicorn', 'uvloop', 'httptools')


def peer_env(env: dict[str, str], token: str, pool_size: int, log_dir: Path, reset: bool) -> dict[str, str]:
    """The app's environment (its database), plus the peer's own settings."""
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(PEER_TOKEN=token, PEER_POOL_SIZE=str(pool_size), PEER_LOG_DIR=str(log_dir))
    return dict(env, **settings, PEER_RESET='1' if reset else '0')


def peer_command(workers: int) -> list[str]:
    """uvicorn with uvloop and httptools, `workers` processes; the access lines are the app's own."""
    command = [str(VENV_BIN / 'uvicorn'), 'bench.peer:app', '--host', '127.0.0.1', '--port', '{port}']
    return [*command, '--workers', str(workers), '--loop', 'uvloop', '--http', 'httptools', '--no-access-log']


def peer_versions() -> str:
    return ', '.join(f'{name} {metadata.version(name)}' for name in PEER_PACKAGES)


class PeerMismatch(RuntimeError):
    """The peer answered a sample request otherwise than the app."""


def post(url: str, body: dict[str, Any], token: str) -> tuple[int, Any]:
    """The status and the JSON of the answer to `body` POSTed with the Bearer token."""
    headers = {'Content-Type': 'application/json', 'Authorization': f'Bearer {token}'}
    # A loopback URL the benchmark built (S310).
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method='POST')  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            status, kind, data = answer.status, answer.headers.get_content_type(), answer.read()
    except urllib.error.HTTPError as error:
        status, kind, data = error.code, error.headers.get_content_type(), error.read()
    if not kind.endswith('json'):
        raise PeerMismatch(f'{url} answered {status} with {kind}: {data[:200]!r}')
    return status, json.loads(data)


def samples(aid: int, abalance: int) -> list[tuple[str, dict[str, Any]]]:
    """A read of `aid`, an upsert of it, the read again, and a read of a key no row has."""
    upsert = {'aid': aid, 'bid': (aid - 1) // 100_000 + 1, 'abalance': abalance}
    return [('read', {'aid': aid}), ('upsert', upsert), ('read', {'aid': aid}), ('read', {'aid': 10**9})]


def same_answers(app_url: str, peer_url: str, token: str, aid: int, abalance: int) -> int:
    """Send each sample to the app, then to the peer: the same status and JSON, or PeerMismatch.
    The number of samples compared."""
    checked = samples(aid, abalance)
    for scenario, body in checked:
        mine, theirs = post(app_url + PATHS[scenario], body, token), post(peer_url + PATHS[scenario], body, token)
        if mine != theirs or mine[0] != 200:
            raise PeerMismatch(
                f'{scenario} {json.dumps(body)}: the app answered {mine[0]} {json.dumps(mine[1])}, '
                f'the peer at {peer_url} {theirs[0]} {json.dumps(theirs[1])}'
            )
    return len(checked)
