"""bench.stalls' readings: the server's own durations from access records, and page faults."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.pgbench import percentile
from bench.stalls import major_faults, server_durations_ms


def record(at: str, duration_ms: float, dataset: str = 'dbapi.access') -> str:
    return json.dumps({'@timestamp': at, 'event.dataset': dataset, 'event.duration': int(duration_ms * 1e6)})


def test_the_server_durations_are_the_access_records_of_the_round(tmp_path: Path) -> None:
    lines = [
        record('2026-11-29T15:00:00.500Z', 1.5),  # before the round
        record('2026-11-29T15:00:01.250Z', 2.0),
        record('2026-11-29T15:00:01.750Z', 155.3),
        record('2026-11-29T15:00:01.800Z', 9.0, dataset='dbapi.app'),  # not an access record
        record('2026-11-29T15:00:03.500Z', 1.0),  # after it
    ]
    (tmp_path / 'dbapi-vm-1234-abc.log').write_text('\n'.join(lines) + '\n')
    started = 1_795_964_401.0  # 2026-11-29T15:00:01Z
    assert server_durations_ms(tmp_path, started, started + 2.0) == [2.0, 155.3]


def test_the_shared_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert (percentile(values, 0.99), percentile(values, 0.50), percentile([], 0.99)) == (100.0, 51.0, 0.0)


def test_major_faults_reads_this_process_and_skips_a_gone_one() -> None:
    assert major_faults([os.getpid()]) >= 0
    assert major_faults([2**22 + 1]) == 0  # above pid_max's default: no such process
