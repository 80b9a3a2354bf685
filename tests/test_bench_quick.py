"""The benchmark's CI check: `python -m bench --quick` drives every scenario and sees no error.

It never judges speed: the shared CI machine's timings mean nothing; errors and non-2xx do.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure import APP_P99, KERNEL_CPU, OTHERS_CPU
from bench.service import BATCH
from bench.targets import NOKEY

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
        # Each measurement says what was used of the CPU outside the benchmark meanwhile, and the
        # app's servers give the app's own p99 (its access records); pgbench and the bare read have none.
        assert 0 <= result['detail'][OTHERS_CPU] <= 1 and 0 <= result['detail'][KERNEL_CPU] <= 1, result
        own_p99 = result['series'].startswith('app ')
        assert (result['detail'].get(APP_P99, 0) > 0) == own_p99, result
    assert (tmp_path / 'quick.png').stat().st_size > 0
    table = (tmp_path / 'quick.md').read_text(encoding='utf-8')
    assert '| read by key |' in table
    assert '| 100 upserts in one batch (actions/s) |' in table
    assert re.search(r'sched_autogroup (on|off|absent)\.', table)  # the read p99 depends on it (README)
