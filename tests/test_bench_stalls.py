"""bench.stalls' readings: the shared percentile and the workers' page faults."""

from __future__ import annotations

import os

from bench.pgbench import percentile
from bench.stalls import major_faults


def test_the_shared_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert (percentile(values, 0.99), percentile(values, 0.50), percentile([], 0.99)) == (100.0, 51.0, 0.0)


def test_major_faults_reads_this_process_and_skips_a_gone_one() -> None:
    assert major_faults([os.getpid()]) >= 0
    assert major_faults([2**22 + 1]) == 0  # above pid_max's default: no such process
