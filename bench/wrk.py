"""Drive an HTTP endpoint with wrk and bench/wrk.lua; parse the line the script prints."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

from bench.measure import Measurement
from bench.service import ACTIONS, BATCH

WRK = os.getenv('WRK', 'wrk')
SCRIPT = Path(__file__).with_name('wrk.lua')
MARKER = 'BENCH_JSON '


class WrkError(RuntimeError):
    """wrk failed or printed no result line."""


def run_wrk(
    url: str, body: str, token: str, connections: int, seconds: float, scenario: str, series: str
) -> Measurement:
    """`connections` keep-alive connections for `seconds`; wrk's threads never outnumber the cores.

    `body` names what bench/wrk.lua sends; keyed bodies take their Idempotency-Keys from a
    prefix new to each run, so no key of one run is ever replayed by another.
    """
    threads = min(connections, os.cpu_count() or 1)
    command = [WRK, f'-t{threads}', f'-c{connections}', f'-d{max(1, round(seconds))}s', '--timeout', '5s']
    command += ['-s', str(SCRIPT), url]
    env = dict(os.environ, BENCH_SCENARIO=body, BENCH_TOKEN=token, BENCH_BATCH=str(BATCH))
    env['BENCH_KEY_PREFIX'] = secrets.token_hex(8)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False)
    line = next((line for line in done.stdout.splitlines() if line.startswith(MARKER)), None)
    if done.returncode != 0 or line is None:
        raise WrkError(f'wrk {url} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}')
    raw = json.loads(line[len(MARKER) :])
    return measurement(raw, scenario, series, connections, ACTIONS.get(body, 1))


def measurement(raw: dict, scenario: str, series: str, connections: int, actions: int = 1) -> Measurement:
    seconds = raw['duration_us'] / 1e6
    errors = raw['connect_errors'] + raw['read_errors'] + raw['write_errors'] + raw['timeouts']
    return Measurement(
        scenario=scenario,
        series=series,
        connections=connections,
        rps=raw['requests'] / seconds if seconds else 0.0,
        p50_ms=raw['p50_us'] / 1000,
        p99_ms=raw['p99_us'] / 1000,
        mean_ms=raw['mean_us'] / 1000,
        requests=raw['requests'],
        errors=errors,
        non2xx=raw['non2xx'],
        detail={
            'statuses': raw['statuses'],
            'bytes': raw['bytes'],
            'max_ms': raw['max_us'] / 1000,
            'replayed': raw['replayed'],  # answers with Idempotent-Replayed: a key sent twice
        },
        actions=actions,
    )
