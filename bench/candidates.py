"""Other ways to serve the same app, measured beside the production gunicorn when asked for.

Each candidate serves the app and the raw WSGI hello the same way, so its own ratio to the
hello is fair; its read-by-key figure compares with the same run's pgbench.
`--candidate gthread` and `--candidate sync` need nothing more; `--candidate granian` needs
`pip install granian`. `--candidate worker` runs gunicorn with the worker class named by
BENCH_WORKER_CLASS (a dotted path; PYTHONPATH may reach a copy outside the repository, such as
the previous commit's worker): an A/B of two worker classes on the same app code in one run.
`--candidate tree` serves another checkout, BENCH_TREE (`git worktree add /tmp/old <commit>`),
with its own gunicorn.conf.py and code: an A/B of two commits in one run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.servers import VENV_BIN, gunicorn_command

GRANIAN_WORKERS = '5'  # as many processes as gunicorn's production default on 2 cores
TREE = os.getenv('BENCH_TREE', '')


def tree_command(wsgi_app: str) -> list[str]:
    """gunicorn serving `wsgi_app` from the checkout BENCH_TREE, with that checkout's settings."""
    if not TREE:
        raise SystemExit('bench: --candidate tree needs BENCH_TREE, the path of another checkout')
    return [str(VENV_BIN / 'gunicorn'), '--chdir', TREE, '-c', f'{TREE}/gunicorn.conf.py', wsgi_app]


def granian_command(wsgi_app: str) -> list[str]:
    command = [str(VENV_BIN / 'granian'), '--interface', 'wsgi', '--host', '127.0.0.1', '--port', '{port}']
    return [*command, '--workers', GRANIAN_WORKERS, '--blocking-threads', '1', '--no-log', wsgi_app]


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    command: Callable[[str], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    scenarios: tuple[str, ...] = ('foo', 'read')


CANDIDATES = {
    # gunicorn's threaded worker keeps connections alive (the sync worker closes each one).
    'gthread': Candidate('gthread', gunicorn_command, {'WORKER_CLASS': 'gthread', 'THREADS': '4'}),
    'granian': Candidate('granian', granian_command),
    # gunicorn's default worker: one request per connection.
    'sync': Candidate('sync', gunicorn_command, {'WORKER_CLASS': 'sync'}),
    'worker': Candidate('worker', gunicorn_command, {'WORKER_CLASS': os.getenv('BENCH_WORKER_CLASS', 'sync')}),
    # PYTHONPATH: that checkout's `app`, `lib` and `modules`, never this one's.
    'tree': Candidate('tree', tree_command, {'PYTHONPATH': TREE}, ('foo', 'read', 'upsert')),
}
