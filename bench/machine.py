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
`cutime`/`cstime` once the parent has reaped it, so a short-lived process's CPU can land in the
measurement in which it was reaped.
"""

from __future__ import annotations

import os
import time
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


def others_ticks(before: Snapshot, after: Snapshot, root: int) -> Ticks:
    """CPU ticks used between the snapshots outside the benchmark: what a process seen in both
    added, all of a process new in `after`."""
    own = own_pids(before, root) | own_pids(after, root)
    processes = kernel = 0
    for pid, process in after.items():
        if pid in own:
            continue
        earlier = before.get(pid)
        # New, or the pid was reused. Not by name: a kernel worker's name changes with its work.
        if earlier is None or earlier.started != process.started:
            used = process.ticks
        else:
            used = max(0, process.ticks - earlier.ticks)
        if pid == KTHREADD or process.parent == KTHREADD:
            kernel += used
        else:
            processes += used
    return Ticks(processes, kernel)


@dataclass(slots=True)
class OthersCpu:
    """The shares of the machine's CPU used outside the benchmark during a `with others_cpu()`
    block, each 0.0 to 1.0, where 1.0 is every core busy all along. Read them after the block."""

    processes: float = 0.0  # by other processes
    kernel: float = 0.0  # by the kernel's threads


@contextmanager
def others_cpu(root: int | None = None) -> Iterator[OthersCpu]:
    """Measures what was used of the CPU outside the benchmark (`root`'s tree, default this
    process, and PostgreSQL) while the block ran."""
    root = os.getpid() if root is None else root
    load = OthersCpu()
    before, started = snapshot(), time.monotonic()
    yield load
    after, elapsed = snapshot(), time.monotonic() - started
    capacity = elapsed * (os.cpu_count() or 1)
    if capacity <= 0:
        return
    used = others_ticks(before, after, root)
    load.processes = used.processes * TICK_SECONDS / capacity
    load.kernel = used.kernel * TICK_SECONDS / capacity
