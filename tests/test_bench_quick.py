"""The benchmark's CI check: `python -m bench --quick` drives every scenario and sees no error,
and the FastAPI peer answers a sample of requests with the app's very JSON.

It never judges speed: the shared CI machine's timings mean nothing; errors and non-2xx do.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.measure import APP_P99, KERNEL_CPU, OTHERS_CPU
from bench.service import BATCH, PeerMismatch, same_answers
from bench.targets import NOKEY, PEER, PEER_NORESET

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_runs_every_scenario_without_errors(tmp_path: Path) -> None:
    command = [sys.executable, '-m', 'bench', '--quick', '--out', str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, (
        f'bench --quick exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}'
    )
    document = json.loads((tmp_path / 'quick.json').read_text(encoding='utf-8'))
    measured = {(r['scenario'], r['series']) for r in document['results']}
    assert {('foo', 'app direct'), ('read', 'app direct'), ('upsert', 'app direct'), ('rows', 'app direct')} <= measured
    assert ('read', 'wsgi psycopg2') in measured  # the read's floor (bench/bare.py)
    assert {('read', 'app pgbouncer'), ('upsert', 'app pgbouncer')} <= measured  # through pgbouncer (issue 21)
    # The FastAPI peer beside the app (its variant without asyncpg's reset query: full runs only),
    # its sample answers the app's JSON before the load and after it.
    assert {('read', PEER), ('upsert', PEER)} <= measured
    assert not [series for _, series in measured if series == PEER_NORESET]
    assert len(re.findall(rf'^{PEER}: 4 sample answers the same JSON as the app\'s', done.stdout, re.M)) == 2
    # Issue 20: the batches and the keyed upsert, each beside its reference.
    results = {(r['scenario'], r['series']): r for r in document['results']}
    batches = ('batch_read', 'batch_upsert')
    assert {(scenario, series) for scenario in batches for series in ('app direct', 'pgbench simple')} <= measured
    assert [results[scenario, 'app direct']['actions'] for scenario in batches] == [BATCH, BATCH]
    assert results['batch_read', 'pgbench simple']['actions'] == 1  # the read alone, one a transaction
    assert results['batch_upsert', 'pgbench simple']['actions'] == BATCH  # the batch's upserts, one transaction
    keyed, unkeyed = results['upsert_keyed', 'app direct'], results['upsert_keyed', NOKEY]
    # Every keyed request stored its answer (a few more were in flight when wrk stopped); none was
    # a replay of another's key; the same upsert without a key stored nothing.
    assert keyed['requests'] <= keyed['detail']['keys_stored'] <= keyed['requests'] + keyed['connections']
    assert (keyed['detail']['replayed'], unkeyed['detail']['keys_stored']) == (0, 0)
    for result in document['results']:
        assert result['requests'] > 0, result
        assert (result['errors'], result['non2xx']) == (0, 0), result
        # Each measurement says what was used of the CPU outside the benchmark meanwhile (how much is
        # the neighbours' doing: its bounds are tested on synthetic data, tests/test_bench_machine.py),
        # and the app's servers give the app's own p99 (its access records); pgbench, the bare read
        # and the peer have none.
        assert 0 <= result['detail'][OTHERS_CPU] <= 1 and 0 <= result['detail'][KERNEL_CPU] <= 1, result
        own_p99 = result['series'].startswith('app ')
        assert (result['detail'].get(APP_P99, 0) > 0) == own_p99, result
    assert (tmp_path / 'quick.png').stat().st_size > 0
    table = (tmp_path / 'quick.md').read_text(encoding='utf-8')
    assert '| read by key |' in table
    assert re.search(
        r'The FastAPI peer: uvicorn \(uvloop, httptools\) x \d+ workers, asyncpg pool \d+: fastapi ', table
    )
    assert '| 100 upserts in one batch (actions/s) |' in table
    assert re.search(r'sched_autogroup (on|off|absent)\.', table)  # the read p99 depends on it (README)


class Answers(BaseHTTPRequestHandler):
    """Answers every POST with the JSON its server's `answers` holds for the path."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers['Content-Length']))
        kind, body = self.server.answers[self.path]
        self.send_response(200)
        self.send_header('Content-Type', kind)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


Serve = Callable[[dict[str, tuple[str, bytes]]], str]


@pytest.fixture
def server() -> Iterator[Serve]:
    """Starts loopback servers answering fixed bodies: `server({path: (content type, body)})` is its URL."""
    started = []

    def start(answers: dict[str, tuple[str, bytes]]) -> str:
        httpd = ThreadingHTTPServer(('127.0.0.1', 0), Answers)
        httpd.answers = answers
        threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
        started.append(httpd)
        return f'http://127.0.0.1:{httpd.server_address[1]}'

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


ROW = b'{"aid":7,"bid":1,"abalance":-3,"filler":"  "}'
UPSERTED = b'{"aid":7,"bid":1,"abalance":-3}'


def test_the_peer_s_answers_are_compared_as_json(server: Serve) -> None:
    app = server({'/bench/read': ('application/json', ROW), '/bench/upsert': ('application/json', UPSERTED)})
    # Another order of keys and other spacing is the same JSON.
    peer = server(
        {
            '/bench/read': ('application/json', b'{"filler": "  ", "abalance": -3, "bid": 1, "aid": 7}'),
            '/bench/upsert': ('application/json', UPSERTED),
        }
    )
    assert same_answers(app, peer, 'token', 7, -3) == 4


@pytest.mark.parametrize(
    ('upserted', 'named'),
    [
        (('application/json', b'{"aid":7,"bid":1,"abalance":3}'), '"abalance": 3'),  # another value
        (('application/json', b'{"aid":7,"bid":1,"abalance":-3,"x":null}'), '"x": null'),  # a field more
        (('text/plain', UPSERTED), 'text/plain'),  # not JSON
    ],
)
def test_a_peer_answering_otherwise_stops_the_run(server: Serve, upserted: tuple[str, bytes], named: str) -> None:
    app = server({'/bench/read': ('application/json', ROW), '/bench/upsert': ('application/json', UPSERTED)})
    peer = server({'/bench/read': ('application/json', ROW), '/bench/upsert': upserted})
    with pytest.raises(PeerMismatch, match=re.escape(named)):
        same_answers(app, peer, 'token', 7, -3)
