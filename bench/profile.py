"""Profile the app's hot path: `python -m bench.profile read [--seconds 10] [--workers 1]`.

Starts the app as the benchmark does, drives one scenario with wrk, and records the workers
with py-spy (sampling, no code change); prints the top functions and writes a speedscope file.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path

from bench.cli import SCENARIOS
from bench.database import bench_database
from bench.servers import VENV_BIN, gunicorn_command, serve
from bench.service import PATHS, service_env
from bench.wrk import run_wrk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench.profile', description=__doc__.splitlines()[0])
    parser.add_argument('scenario', choices=SCENARIOS)
    parser.add_argument('--seconds', type=float, default=10.0)
    parser.add_argument('--workers', type=int, default=1)
    parser.add_argument('--connections', type=int, default=4)
    parser.add_argument('--rate', type=int, default=100, help='samples per second (py-spy); 1000 to see small steps')
    parser.add_argument('--out', type=Path, default=Path('bench/results/tmp'))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(20)
    tmp = Path(tempfile.mkdtemp(prefix='dbapi-profile-'))
    try:
        with bench_database() as dbname:
            env = dict(service_env(dbname, token, tmp, recycle=False), WEB_CONCURRENCY=str(args.workers))
            with serve('app', gunicorn_command('app:app'), env, tmp, probe='/health/ready') as app:
                run_wrk(app.url + PATHS[args.scenario], args.scenario, token, 2, 1, args.scenario, 'warm-up')
                return record(app.workers()[0].pid, app.url, args, token)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def record(pid: int, url: str, args: argparse.Namespace, token: str) -> int:
    output = args.out / f'profile-{args.scenario}.txt'
    spy = [str(VENV_BIN / 'py-spy'), 'record', '--pid', str(pid), '--duration', str(int(args.seconds))]
    # --gil: only samples holding the GIL, i.e. Python's own CPU, not the waits on PostgreSQL.
    spy += ['--format', 'raw', '--output', str(output), '--nonblocking', '--gil', '--rate', str(args.rate)]
    load = threading.Thread(
        target=run_wrk,
        args=(url + PATHS[args.scenario], args.scenario, token, args.connections, args.seconds, args.scenario, 'x'),
    )
    load.start()
    done = subprocess.run(spy, capture_output=True, text=True, check=False)
    load.join()
    if done.returncode != 0:
        print(done.stderr[-2000:])
        return done.returncode
    summarise(output)
    print(f'collapsed stacks: {output} (flamegraph.pl or speedscope.app draw them)')
    return 0


def summarise(path: Path, top: int = 35) -> None:
    """The functions that hold the most samples, counted once per stack (inclusive)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding='utf-8').splitlines():
        stack, _, count = line.rpartition(' ')
        if not count.isdigit():
            continue  # not a stack line (py-spy can leave a stray line when a process writes to its output)
        frames = stack.split(';')
        samples = int(count)
        total += samples
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    print(f'{total} samples; inclusive share, then own share')
    for frame, samples in inclusive.most_common(top):
        print(f'{samples / total:6.1%}  {frame}')
    print()
    for frame, samples in own.most_common(15):
        print(f'{samples / total:6.1%}  {frame}')


if __name__ == '__main__':
    raise SystemExit(main())
