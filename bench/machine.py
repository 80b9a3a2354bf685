"""The CPU that processes outside the benchmark used while it measured.

The benchmark shares a small machine with whatever else runs there (other databases and brokers,
their health checks, the kernel's own threads). A burst of theirs stops the app and PostgreSQL
alike for tens of milliseconds, which is a read's whole p99 budget (docs/performance.md). Each
measurement therefore records how much of the machine's CPU went to such processes meanwhile,
so a figure can be read beside the load it was taken under.

What counts as the benchmark's own: the benchmark process and every process under it (servers,
wrk, pgbench, nginx, pgbouncer), and PostgreSQL's processes, which serve both sides of every
ratio. The kernel's threads are counted apart: some of their work is the benchmark's (writing
back its database and log files, finishing its I/O), some is not (DAMON's scans). Every other
process is another's. A process that ended meanwhile is counted through its parent's
`cutime`/`cstime` once the parent has reaped it, less what it had used before the measurement
(its CPU before the first snapshot is not the measurement's), so a short-lived process's CPU can
land in the measurement in which it was reaped.

A share is CPU time over the window's capacity: the time every CPU spent over the window (from
/proc/stat), of which all the processes together cannot use more than the CPUs were busy. What
is counted per process is at most that (a process that ignores SIGCHLD, a parent's reaped child
that was never seen, ticks rounded per process), so no share, and not both together, exceeds 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROC = Path('/proc')
TICK_SECONDS = 1 / os.sysconf('SC_CLK_TCK')
SHARED = frozenset({'postgres'})  # processes of the benchmark's own that are not under it
KTHREADD = 2  # the kernel's threads are it and its children


@dataclass(frozen=True, slots=True)
class ProcessStat:
    name: str
    parent: int
    ticks: int  # user + system time, its own and its reaped children's
    started: int  # ticks after boot: a pid reused meanwhile is a process started later
    major_faults: int


Snapshot = dict[int, ProcessStat]


def parse_stat(text: str) -> ProcessStat:
    """One /proc/<pid>/stat line. The name is between the first '(' and the last ')' (it may
    hold either); fields 12 and 14-17 are majflt, utime, stime, cutime and cstime, 22 the start
    time (proc(5))."""
    name = text[text.index('(') + 1 : text.rindex(')')]
    fields = text[text.rindex(')') + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])
    return ProcessStat(name, int(fields[1]), ticks, int(fields[19]), int(fields[9]))


def read_stat(pid: int, proc: Path = PROC) -> ProcessStat:
    """The process's stat; OSError when it is gone (or never was)."""
    return parse_stat((proc / str(pid) / 'stat').read_text(encoding='utf-8', errors='replace'))


def snapshot(proc: Path = PROC) -> Snapshot:
    """Every process's stat; one that ends while it is read is left out."""
    processes: Snapshot = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            processes[int(entry.name)] = read_stat(int(entry.name), proc)
        except (OSError, ValueError, IndexError):
            continue
    return processes


def own_pids(processes: Snapshot, root: int) -> set[int]:
    """`root`, every process under it, and the shared ones (PostgreSQL's)."""
    children: dict[int, list[int]] = {}
    for pid, process in processes.items():
        children.setdefault(process.parent, []).append(pid)
    own, pending = set(), [root]
    while pending:
        pid = pending.pop()
        own.add(pid)
        pending.extend(children.get(pid, ()))
    return own | {pid for pid, process in processes.items() if process.name in SHARED}


@dataclass(frozen=True, slots=True)
class Ticks:
    processes: int  # other processes'
    kernel: int  # the kernel's threads'


def ended(before: Snapshot, after: Snapshot) -> dict[int, int]:
    """Per parent, the ticks that its children which ended between the snapshots had used by the
    first one: a parent that reaps such a child adds the child's whole life to its own ticks."""
    used: dict[int, int] = {}
    for pid, process in before.items():
        later = after.get(pid)
        # Gone, or the pid was reused. Not by name: a kernel worker's name changes with its work.
        if later is None or later.started != process.started:
            used[process.parent] = used.get(process.parent, 0) + process.ticks
    return used


def others_ticks(before: Snapshot, after: Snapshot, root: int) -> Ticks:
    """CPU ticks used between the snapshots outside the benchmark: what a process seen in both
    added (less what its children that ended meanwhile had used before), all of a process new
    in `after`."""
    own = own_pids(before, root) | own_pids(after, root)
    earlier_lives = ended(before, after)
    processes = kernel = 0
    for pid, process in after.items():
        if pid in own:
            continue
        earlier = before.get(pid)
        if earlier is None or earlier.started != process.started:  # new, or the pid was reused
            used = process.ticks
        else:
            used = max(0, process.ticks - earlier.ticks - earlier_lives.get(pid, 0))
        if pid == KTHREADD or process.parent == KTHREADD:
            kernel += used
        else:
            processes += used
    return Ticks(processes, kernel)


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """The first line of /proc/stat: every CPU's time since boot, in ticks, added up."""

    busy: int  # running anything: user, nice, system, irq, softirq, steal
    total: int  # busy, idle and iowait: the time that passed times the CPUs


def parse_cpu_times(text: str) -> CpuTimes:
    """/proc/stat's `cpu` line (proc(5)): user nice system idle iowait irq softirq steal, then
    guest and guest_nice, which user and nice already hold."""
    line = text.split('\n', 1)[0]
    if not line.startswith('cpu '):
        raise ValueError(f'not /proc/stat: {line[:40]!r}')
    values = [int(value) for value in line.split()[1:9]]
    values += [0] * (8 - len(values))  # older kernels have fewer columns
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return CpuTimes(busy, busy + idle + iowait)


def cpu_times(proc: Path = PROC) -> CpuTimes:
    return parse_cpu_times((proc / 'stat').read_text(encoding='ascii'))


@dataclass(slots=True)
class OthersCpu:
    """The shares of the machine's CPU used outside the benchmark during a `with others_cpu()`
    block, each 0.0 to 1.0, where 1.0 is every core busy all along. Read them after the block."""

    processes: float = 0.0  # by other processes
    kernel: float = 0.0  # by the kernel's threads


def shares(used: Ticks, before: CpuTimes, after: CpuTimes) -> OthersCpu:
    """`used` as shares of the CPU time that passed between two readings of /proc/stat, each
    bounded by what the CPUs were busy meanwhile (the kernel's threads first): 0.0 to 1.0, and
    together at most 1.0."""
    capacity = after.total - before.total
    if capacity <= 0:
        return OthersCpu()
    busy = max(0, after.busy - before.busy)
    kernel = min(used.kernel, busy)
    processes = min(used.processes, busy - kernel)
    return OthersCpu(processes / capacity, kernel / capacity)


@contextmanager
def others_cpu(root: int | None = None) -> Iterator[OthersCpu]:
    """Measures what was used of the CPU outside the benchmark (`root`'s tree, default this
    process, and PostgreSQL) while the block ran."""
    root = os.getpid() if root is None else root
    load = OthersCpu()
    machine_before = cpu_times()
    before = snapshot()
    yield load
    after = snapshot()
    measured = shares(others_ticks(before, after, root), machine_before, cpu_times())
    load.processes, load.kernel = measured.processes, measured.kernel
