"""Where a read's tail latency comes from: `python -m bench.stalls [--rounds 30] [--seconds 2]`.

Serves the app as the benchmark does and drives the read by key in short rounds. For each round
it prints what wrk saw beside what the app saw: wrk's rate, mean and p99, the requests in
flight they imply (Little's law: rate x mean latency, never more than the connections for a
closed-loop client), the app's own p99 and slowest request (the access records' durations,
which end before the answer is sent), the workers' major page faults, and the shares of the CPU
that other processes and the kernel's threads took meanwhile (bench.machine). A round is marked
when wrk's figures imply more in flight than the p99 target trusts (bench.targets), or when the
app took over SLOW_MS on a request. docs/performance.md has what this found.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import tempfile
from pathlib import Path

from bench.access_records import AccessRecords
from bench.database import bench_database
from bench.machine import others_cpu, read_stat
from bench.pgbench import percentile
from bench.servers import gunicorn_command, serve
from bench.service import PATHS, service_env
from bench.targets import implausible
from bench.wrk import run_wrk

SLOW_MS = 40.0  # a request the app took this long over is counted and listed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench.stalls', description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=30)
    parser.add_argument('--seconds', type=float, default=2.0)
    parser.add_argument('--connections', type=int, default=8)
    args = parser.parse_args(argv)
    token = secrets.token_hex(20)
    log_dir = Path(tempfile.mkdtemp(prefix='dbapi-stalls-'))
    try:
        with bench_database() as dbname:
            env = service_env(dbname, token, log_dir, recycle=False)
            with serve('app', gunicorn_command('app:app'), env, log_dir, probe='/health/ready') as app:
                url = app.url + PATHS['read']
                run_wrk(url, 'read', token, args.connections, 2, 'read', 'warm-up')
                pids = [worker.pid for worker in app.workers()]
                records = AccessRecords(log_dir)
                for number in range(1, args.rounds + 1):
                    faults = major_faults(pids)
                    records.skip()
                    with others_cpu() as others:
                        seen = run_wrk(url, 'read', token, args.connections, args.seconds, 'read', 'round')
                    faults = major_faults(pids) - faults
                    served = records.durations_ms()
                    slow = [ms for ms in served if ms > SLOW_MS]
                    mark = ' <' if implausible(seen.in_flight, args.connections) or slow else ''
                    print(
                        f'{number:3d} wrk {seen.rps:6,.0f}/s mean {seen.mean_ms:6.2f} p99 {seen.p99_ms:8.2f} ms'
                        f' in flight {seen.in_flight:5.1f} | app p99 {percentile(served, 0.99):6.2f}'
                        f' max {max(served, default=0):8.2f} ms, {len(slow)} over {SLOW_MS:g} ms'
                        f' | major faults {faults} | CPU of others {others.processes:5.1%},'
                        f' kernel {others.kernel:5.1%}{mark}',
                        flush=True,
                    )
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def major_faults(pids: list[int]) -> int:
    """The major page faults of these processes so far."""
    total = 0
    for pid in pids:
        try:
            total += read_stat(pid).major_faults
        except OSError:
            continue  # the worker is gone
    return total


if __name__ == '__main__':
    raise SystemExit(main())
