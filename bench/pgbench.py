"""The PostgreSQL references: pgbench running the bench module's own SQL, and its `json_agg` twin."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.measure import Measurement
from bench.service import BATCH
from modules.bench.sql import MAX_ROWS, SQL_READ, SQL_ROWS, SQL_UPSERT

PGBENCH = os.getenv('PGBENCH', 'pgbench')
ROWS = 1_000_000
PLACEHOLDER = re.compile(r'%\((\w+)\)s')


class PgbenchError(RuntimeError):
    """pgbench failed or its output could not be read."""


def statement(text: str) -> str:
    """The module's SQL with pgbench's `:name` variables for psycopg2's `%(name)s`."""
    return PLACEHOLDER.sub(r':\1', ' '.join(text.split())) + ';'


def upsert(aid: str) -> str:
    """The module's upsert of the row `aid` (a pgbench expression), with wrk.lua's bid and balance."""
    return (
        f'\\set aid {aid}\n\\set bid (:aid - 1) / 100000 + 1\n\\set abalance random(-5000, 5000)\n'
        f'{statement(SQL_UPSERT)}\n'
    )


# A batch's upserts as wrk.lua sends them: one key from each of BATCH slices, ascending, so that
# concurrent transactions lock rows in one order and never deadlock.
SLICE = ROWS // BATCH
BATCH_UPSERT = ''.join(upsert(f'{step * SLICE} + random(1, {SLICE})') for step in range(BATCH))
SCRIPTS = {
    'read': f'\\set aid random(1, {ROWS})\n{statement(SQL_READ)}\n',
    'upsert': (
        f'\\set aid random(1, {ROWS})\n\\set bid (:aid - 1) / 100000 + 1\n\\set abalance random(-5000, 5000)\n'
        f'BEGIN;\n{statement(SQL_UPSERT)}\nEND;\n'
    ),
    'rows': (
        f'\\set first random(1, {ROWS - MAX_ROWS + 1})\n\\set last :first + {MAX_ROWS - 1}\n'
        f'SELECT json_agg(r) FROM ({statement(SQL_ROWS).rstrip(";")}) r;\n'
    ),
    'batch_upsert': f'BEGIN;\n{BATCH_UPSERT}END;\n',  # the batch's 100 upserts in one transaction
}
SCRIPTS['batch_read'] = SCRIPTS['read']  # a batch's reads against the same read, one a transaction
TRANSACTION_ACTIONS = {'batch_upsert': BATCH}  # actions per pgbench transaction; 1 if not named


def run_pgbench(
    dbname: str, pg: dict, scenario: str, mode: str, connections: int, seconds: float, series: str
) -> Measurement:
    """pgbench with `connections` clients; the latencies come from its per-transaction log."""
    with tempfile.TemporaryDirectory(prefix='dbapi-pgbench-') as tmp:
        script = Path(tmp) / f'{scenario}.sql'
        script.write_text(SCRIPTS[scenario], encoding='utf-8')
        threads = min(connections, os.cpu_count() or 1)
        command = [PGBENCH, '-h', pg['host'], '-p', str(pg['port']), '-U', pg['user'], '-n', '-M', mode]
        command += [f'-c{connections}', f'-j{threads}', f'-T{max(1, round(seconds))}', '-f', str(script)]
        command += ['-l', f'--log-prefix={tmp}/log', dbname]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
        if done.returncode != 0:
            raise PgbenchError(f'pgbench {scenario} -M {mode} exited {done.returncode}: {done.stderr.strip()}')
        latencies = sorted(transaction_latencies(Path(tmp)))
    return measurement(done.stdout, latencies, scenario, series, connections)


def transaction_latencies(directory: Path) -> list[int]:
    """Microseconds per transaction: the third field of every line of pgbench's logs."""
    values: list[int] = []
    for path in directory.glob('log*'):
        with path.open(encoding='utf-8') as lines:
            values.extend(int(line.split()[2]) for line in lines if line.strip())
    return values


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise PgbenchError(f'pgbench output has no {pattern!r}: {text[-500:]!r}')
    return float(found.group(1))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank value at `fraction` (0.99 for the p99) of sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    return float(sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))])


def measurement(output: str, latencies: list[int], scenario: str, series: str, connections: int) -> Measurement:
    failed = re.search(r'number of failed transactions: (\d+)', output)
    return Measurement(
        scenario=scenario,
        series=series,
        connections=connections,
        rps=number(r'tps = ([\d.]+)', output),
        p50_ms=percentile(latencies, 0.50) / 1000,
        p99_ms=percentile(latencies, 0.99) / 1000,
        mean_ms=number(r'latency average = ([\d.]+) ms', output),
        requests=int(number(r'number of transactions actually processed: (\d+)', output)),
        errors=int(failed.group(1)) if failed else 0,
        non2xx=0,
        actions=TRANSACTION_ACTIONS.get(scenario, 1),
    )
