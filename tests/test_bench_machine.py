"""bench.machine: the CPU that processes outside the benchmark take while it measures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.machine import (
    TICK_SECONDS,
    CpuTimes,
    OthersCpu,
    ProcessStat,
    Ticks,
    cpu_times,
    others_cpu,
    others_ticks,
    own_pids,
    parse_cpu_times,
    parse_stat,
    shares,
    snapshot,
)
from bench.measure import APP_P99, KERNEL_CPU, OTHERS_CPU, Measurement, combine
from bench.report import others_cell
from bench.targets import p99_target

# Burns `seconds` of CPU, writes its pid to argv[2], then idles until killed.
BURNER = """
import os, sys, time
started = time.process_time()
while time.process_time() - started < float(sys.argv[1]):
    pass
with open(sys.argv[2] + '.tmp', 'w') as marker:
    marker.write(str(os.getpid()))
os.rename(sys.argv[2] + '.tmp', sys.argv[2])
time.sleep(60)
"""


def test_a_stat_line_is_read_after_the_last_parenthesis() -> None:
    # A name may hold spaces and parentheses; the fields after it are proc(5)'s from `state` on.
    line = '42 (tmux: (x) y) S 7 42 42 0 -1 4194560 100 0 5 0 11 22 33 44 20 0 1 0 99 1000 10\n'
    assert parse_stat(line) == ProcessStat('tmux: (x) y', 7, 11 + 22 + 33 + 44, 99, 5)


def test_this_process_is_in_a_snapshot_with_its_parent() -> None:
    mine = snapshot()[os.getpid()]
    assert (mine.parent, mine.ticks >= 0) == (os.getppid(), True)


def processes(**rows: tuple[str, int, int] | tuple[str, int, int, int]) -> dict[int, ProcessStat]:
    """`p<pid>=(name, parent, ticks[, started])`: a snapshot as bench.machine reads one."""
    return {int(pid[1:]): stat(*row) for pid, row in rows.items()}


def stat(name: str, parent: int, ticks: int, started: int = 0) -> ProcessStat:
    return ProcessStat(name, parent, ticks, started, 0)


def test_the_benchmark_owns_its_tree_and_postgres() -> None:
    seen = processes(
        p1=('init', 0, 0),
        p10=('python', 1, 0),  # the benchmark
        p11=('gunicorn', 10, 0),
        p12=('gunicorn', 11, 0),  # a worker, under the master
        p20=('postgres', 1, 0),
        p21=('postgres', 20, 0),
        p30=('beam.smp', 1, 0),
    )
    assert own_pids(seen, 10) == {10, 11, 12, 20, 21}


def test_others_are_counted_by_what_they_added_and_the_kernel_apart() -> None:
    before = processes(
        p1=('init', 0, 100),
        p2=('kthreadd', 0, 0),
        p10=('python', 1, 500),
        p11=('wrk', 10, 0),
        p20=('postgres', 1, 50),
        p30=('redis', 1, 7),
        p71=('kdamond.0', 2, 40),
    )
    after = processes(
        # Reaped a short-lived child of 30 ticks, and cron (p40 before), which had used 1,000
        # ticks by the first snapshot and 4 more since: only those 4 are the measurement's.
        p1=('init', 0, 100 + 30 + 1_004),
        p2=('kthreadd', 0, 0),
        p10=('python', 1, 900),
        p11=('wrk', 10, 400),
        p20=('postgres', 1, 300),
        p30=('redis', 1, 9),
        p31=('beam.smp', 1, 25),  # new since the first snapshot: all of it
        p40=('sh', 1, 3, 500),  # p40 was another process before: its pid was reused
        p71=('kdamond.0', 2, 52),
        p72=('kworker/0:1-events', 2, 106),  # a kernel worker's name changes with its work
    )
    before[40] = stat('cron', 1, 1_000, 20)
    before[72] = stat('kworker/0:1-writeback', 2, 100)
    assert others_ticks(before, after, 10) == Ticks(processes=30 + 4 + 2 + 25 + 3, kernel=12 + 6)


def test_a_reaped_child_adds_only_what_it_used_during_the_measurement() -> None:
    # A shell reaps a test run of ten minutes that ended during a measurement of one second: its
    # cutime grows by the run's whole life, of which only the last 90 ticks fell in the window.
    before = processes(p1=('init', 0, 0), p10=('python', 1, 0), p20=('bash', 1, 50), p21=('pytest', 20, 60_000))
    after = processes(p1=('init', 0, 0), p10=('python', 1, 0), p20=('bash', 1, 50 + 60_090 + 2))
    assert others_ticks(before, after, 10) == Ticks(processes=90 + 2, kernel=0)


def test_the_cpu_line_of_proc_stat_gives_busy_and_total_ticks() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice: guests are in user already.
    text = 'cpu  100 5 40 800 30 2 3 1 7 0\ncpu0 50 2 20 400 15 1 2 0 3 0\nintr 1 2 3\n'
    assert parse_cpu_times(text) == CpuTimes(busy=100 + 5 + 40 + 2 + 3 + 1, total=100 + 5 + 40 + 2 + 3 + 1 + 800 + 30)
    with pytest.raises(ValueError, match='not /proc/stat'):
        parse_cpu_times('intr 1 2 3\n')
    now = cpu_times()
    assert 0 <= now.busy <= now.total


def test_shares_are_of_the_window_and_never_above_what_the_cpus_were_busy() -> None:
    before, after = CpuTimes(busy=1_000, total=10_000), CpuTimes(busy=1_400, total=11_000)  # 2 CPUs, 5 s
    assert shares(Ticks(processes=300, kernel=50), before, after) == OthersCpu(processes=0.3, kernel=0.05)
    # Counted above what the CPUs did (a reaped child never seen, a process ignoring SIGCHLD):
    # the kernel's threads keep theirs, the processes get the rest of the busy time.
    assert shares(Ticks(processes=5_000, kernel=100), before, after) == OthersCpu(processes=0.3, kernel=0.1)
    assert shares(Ticks(processes=5_000, kernel=5_000), before, after) == OthersCpu(processes=0.0, kernel=0.4)
    assert shares(Ticks(processes=5, kernel=5), before, before) == OthersCpu()  # no time passed


def test_a_fully_busy_machine_is_a_share_of_one_at_most() -> None:
    before, after = CpuTimes(busy=0, total=0), CpuTimes(busy=2_000, total=2_000)
    load = shares(Ticks(processes=2_546, kernel=0), before, after)  # 1.273 of the machine, as read before
    assert (load.processes, load.kernel) == (1.0, 0.0)


def test_a_process_that_ended_unreaped_adds_nothing() -> None:
    before = processes(p1=('init', 0, 0), p10=('python', 1, 0), p50=('gone', 1, 80))
    after = processes(p1=('init', 0, 0), p10=('python', 1, 0))
    assert others_ticks(before, after, 10) == Ticks(0, 0)


Burner = Callable[[float, bool], int]


@pytest.fixture
def burner(tmp_path: Path) -> Iterator[Burner]:
    """Starts a CPU burner, detached (its shell exits, so it is nobody's child here) or as a child
    of this process; yields a function that waits for it to have burned and returns its pid."""
    detached_pids: list[int] = []
    children: list[subprocess.Popen[bytes]] = []

    def start(seconds: float, detached: bool) -> int:
        marker = tmp_path / f'burner-{len(detached_pids) + len(children)}'
        command = [sys.executable, '-c', BURNER, str(seconds), str(marker)]
        if detached:
            subprocess.run(['sh', '-c', '"$@" >/dev/null 2>&1 &', 'sh', *command], check=True)
        else:
            children.append(subprocess.Popen(command))
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, 'the burner did not finish burning'
            time.sleep(0.05)
        pid = int(marker.read_text())
        if detached:
            detached_pids.append(pid)
        return pid

    yield start
    for pid in detached_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for child in children:
        child.kill()
        child.wait()


def test_a_detached_process_burning_cpu_is_another_s(burner: Burner) -> None:
    before = snapshot()
    with others_cpu() as load:
        started = time.monotonic()
        pid = burner(0.5, True)
        elapsed = time.monotonic() - started
    after = snapshot()
    assert pid not in own_pids(after, os.getpid())
    # What others took is at least what the burner burned (anything else on the machine adds to it).
    assert load.processes * elapsed * (os.cpu_count() or 1) >= 0.4
    assert others_ticks(before, after, os.getpid()).processes * TICK_SECONDS >= 0.4


def test_a_child_burning_cpu_is_the_benchmark_s(burner: Burner) -> None:
    pid = burner(0.2, False)
    assert pid in own_pids(snapshot(), os.getpid())


def measured(others: float, kernel: float, p99_ms: float = 5.0) -> Measurement:
    """A read round; the app's own p99 as wrk's, which the p99 line judges."""
    detail = {OTHERS_CPU: others, KERNEL_CPU: kernel, APP_P99: p99_ms}
    return Measurement('read', 'app direct', 8, 1000.0, 1.0, p99_ms, 8.0, 1000, 0, 0, detail)


def test_rounds_keep_the_worst_shares_and_each_round_s() -> None:
    combined = combine([measured(0.01, 0.2), measured(0.12, 0.0), measured(0.03, 0.05)])
    assert combined.detail[OTHERS_CPU] == 0.12
    assert combined.detail[KERNEL_CPU] == 0.2
    assert combined.detail[OTHERS_CPU + '_rounds'] == [0.01, 0.12, 0.03]
    assert others_cell(combined) == '12.0% (20.0%)'


def test_the_p99_line_names_the_cpu_used_outside_from_five_percent() -> None:
    loaded = p99_target([combine([measured(0.02, 0.01, 4.0), measured(0.01, 0.08, 31.0)])])
    calm = p99_target([combine([measured(0.02, 0.0, 4.0), measured(0.049, 0.049, 31.0)])])
    assert loaded.measured == (
        "31.00 ms (in its worst rounds other processes took 2% of the CPU, the kernel's threads 8%)"
    )
    assert (calm.measured, calm.status) == ('31.00 ms', 'FAIL')
