"""`python -m bench instructions`: machine instructions per request, counted by callgrind.

The judged cost of the code: a count that does not move with the machine's load. The WSGI app
runs in-process as production serves it (`create_app()` with the bench module, metrics on, JSON
access records written to files, a real database made by `bench.database.bench_database()`),
driven by `bench.micro`'s `call()`, and so does the floor, `bench/bare.py`.

How it counts: one Python process under `valgrind --tool=callgrind` per run imports everything
and creates the app, then forks, per scenario, two children: each sends the same
seeded warm-up requests, then one sends N more requests and the other none, and exits. Each child
is a callgrind run of its own (callgrind writes one file per process, holding what the process
executed, the parent's part before the fork included, the same in both), and
(total Ir of the N child - total Ir of the 0 child) / N is the cost of one request. A fork
rather than a fresh process per count: Python's start, the imports and `create_app()` run once
per run instead of once per count (they were most of the time), and both children start from the
very same state. Only the thread that serves the requests is counted (`--separate-threads=yes`,
its file): the metrics sampler's thread wakes every second of wall time, and under callgrind a
second is ~50 times as few requests as in production, so its count would follow the machine's
speed rather than the code. What varies otherwise is fixed: PYTHONHASHSEED, the seeded bodies
(reads and writes on disjoint keys, so an earlier upsert never changes what a later read
answers; balances of one width), the warm-up, and Idempotency-Keys unique in the database and of
one length.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / 'bench' / 'results'
ROWS = 1_000_000  # pgbench_accounts at the bench database's scale
READ_KEYS = (1, ROWS // 2)  # reads take keys from the lower half, writes from the upper one
WRITE_KEYS = (ROWS // 2 + 1, ROWS)
BATCH = 100  # actions per batch request (bench.service.BATCH)
SEED = 'dbapi-instructions'
TARGET_RATIO = 2.5  # the app's read and upsert against the bare ones (issue 28)
AGREEMENT = 0.01  # two runs agree within 1%
MAIN_THREAD = '-01'  # callgrind's suffix for the first thread's file (--separate-threads=yes)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    what: str
    server: str  # 'app' (create_app) or 'bare' (bench/bare.py)
    path: str
    bodies: str  # the kind of seeded body it sends (make_bodies)
    keyed: bool = False  # a fresh Idempotency-Key on every request
    actions: int = 1  # actions per request: the count is reported per action

    def requests(self, count: int) -> int:
        """Requests measured for `count` actions."""
        return max(1, count // self.actions)


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario('read', 'read by key', 'app', '/bench/read', 'read'),
        Scenario('upsert', 'upsert in a transaction', 'app', '/bench/upsert', 'upsert'),
        Scenario('upsert_keyed', 'upsert with an Idempotency-Key', 'app', '/bench/upsert', 'upsert', keyed=True),
        Scenario('upsert_event', 'upsert emitting one event', 'app', '/bench/upsert_event', 'upsert'),
        Scenario('foo', 'example/foo (no database)', 'app', '/example/foo', 'foo'),
        Scenario('batch_read', 'a batch of 100 reads, per read', 'app', '/batch', 'batch_read', actions=BATCH),
        Scenario('bare_read', 'bare read (bench/bare.py)', 'bare', '/bench/read', 'read'),
        Scenario('bare_upsert', 'bare upsert (bench/bare.py)', 'bare', '/bench/upsert', 'upsert'),
    )
}
# (what, the app's scenario, the bare one): each judged at TARGET_RATIO.
TARGETS = (('read', 'read', 'bare_read'), ('upsert', 'upsert', 'bare_upsert'))


def make_bodies(kind: str, count: int, salt: str = '') -> list[bytes]:
    """`count` request bodies of one kind, the same for a seed on any machine (a string seed is
    hashed with SHA-512, not with PYTHONHASHSEED). Numbers that vary have one width where the
    width is free (balances, names), so no request costs more for its digits than the same
    request of another run."""
    rng = random.Random(f'{SEED}:{kind}:{salt}')

    def read() -> dict[str, int]:
        return {'aid': rng.randint(*READ_KEYS)}

    def upsert() -> dict[str, int]:
        aid = rng.randint(*WRITE_KEYS)
        return {'aid': aid, 'bid': (aid - 1) // 100_000 + 1, 'abalance': rng.randint(1000, 9999)}

    def foo() -> dict[str, str]:
        user = f'user{rng.randint(100_000, 999_999)}'
        return {'name': user, 'email': f'{user}@example.com'}

    if kind == 'batch_read':
        from bench.micro import batch

        return [batch('bench/read_tx', [read() for _ in range(BATCH)]) for _ in range(count)]
    makers: dict[str, Callable[[], dict[str, Any]]] = {'read': read, 'upsert': upsert, 'foo': foo}
    make = makers[kind]
    return [json.dumps(make(), separators=(',', ':')).encode() for _ in range(count)]


# --- What runs under valgrind -----------------------------------------------------------------


def child(argv: list[str]) -> int:
    """The process under callgrind: `python -m bench.instructions --child SPEC.json`."""
    spec = json.loads(Path(argv[0]).read_text(encoding='utf-8'))
    scenarios = [SCENARIOS[name] for name in spec['scenarios']]
    warmup, count = spec['warmup'], spec['count']
    # Every body is made before the first fork: making them costs both children the same.
    bodies = {
        s.name: (make_bodies(s.bodies, s.requests(warmup), 'warmup'), make_bodies(s.bodies, s.requests(count)))
        for s in scenarios
    }
    from bench.micro import call

    forks = []
    servers = {scenario.server for scenario in scenarios}
    with served(servers, spec['dbname'], spec['token'], Path(spec['log_dir'])) as apps:
        # A process that has never run a full collection runs one at its next gen-1 threshold,
        # over every object the imports made: in whichever child reached it, it was ~18 million
        # instructions in a batch's ten requests. Collected here once, the children start as a
        # worker past its first requests, whose full collections are rare.
        gc.collect()
        for scenario in scenarios:
            app, (warm, measured) = apps[scenario.server], bodies[scenario.name]
            for requests in (0, len(measured)):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        for body in warm:
                            call(app, scenario.path, body, spec['token'], scenario.keyed)
                        for body in measured[:requests]:
                            call(app, scenario.path, body, spec['token'], scenario.keyed)
                        code = 0
                    except Exception:  # noqa: BLE001 - a forked child must reach os._exit: say why it failed
                        traceback.print_exc()
                    finally:
                        os._exit(code)  # no atexit work: both children end alike
                _, status = os.waitpid(pid, 0)
                if status != 0:
                    raise RuntimeError(f'{scenario.name}: the child of {requests} requests failed ({status})')
                forks.append({'scenario': scenario.name, 'requests': requests, 'pid': pid})
    Path(spec['manifest']).write_text(json.dumps(forks), encoding='utf-8')
    return 0


@contextmanager
def served(servers: set[str], dbname: str, token: str, log_dir: Path) -> Iterator[dict[str, Callable[..., Any]]]:
    """The app as production serves it (if `servers` names it) and the bare one, by name, with
    the same settings. Both in one process: the bare one's imports (`modules.bench.sql`
    imports `lib`) are most of the app's, and its child pays neither."""
    from bench.service import service_env

    # Before anything imports `lib`: the settings are read once, at its import.
    os.environ.update(service_env(dbname, token, log_dir, recycle=False))
    from bench import bare
    from bench.micro import production_app

    if 'app' not in servers:
        yield {'bare': bare.app}
        return
    with production_app(dbname, token, log_dir) as app:
        yield {'app': app, 'bare': bare.app}


# --- Reading callgrind's files ----------------------------------------------------------------


def total_ir(text: str) -> int:
    """The Ir total of one callgrind out file: its `totals:` line (or the older `summary:`),
    the column that `events:` names Ir."""
    events: list[str] = []
    found: dict[str, list[int]] = {}
    for line in text.splitlines():
        if line.startswith('events:'):
            events = line.split()[1:]
        elif line.startswith(('totals:', 'summary:')):
            name, _, text_values = line.partition(':')
            found[name] = [int(value) for value in text_values.split()]
    if 'Ir' not in events:
        raise ValueError('not a callgrind out file with Ir: no `events:` line naming Ir')
    totals = found.get('totals') or found.get('summary')
    if not totals:
        raise ValueError('not a callgrind out file: no `totals:` or `summary:` line')
    return totals[events.index('Ir')]


def per_action(with_requests: int, without: int, requests: int, actions: int = 1) -> float:
    """Instructions per action: what `requests` requests of `actions` actions each added."""
    if requests <= 0:
        raise ValueError('no request measured')
    return (with_requests - without) / requests / actions


def spread(values: list[float]) -> float:
    """How far runs apart: (largest - smallest) / smallest; 0.0 for a single run."""
    return (max(values) - min(values)) / min(values) if len(values) > 1 else 0.0


ANNOTATED = re.compile(r'^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(\S.*?)\s*$')
BUILD_PATH = re.compile(r'^.*/(Python-[\d.]+|site-packages)/')


def annotated_costs(text: str) -> dict[str, int]:
    """`callgrind_annotate` output: each function's cost (`file:function [object]`), by name."""
    costs: dict[str, int] = {}
    rows = False
    for line in text.splitlines():
        if line.startswith('Ir') and 'file:function' in line:
            rows = True
        elif rows and (match := ANNOTATED.match(line)):
            costs[match.group(2)] = costs.get(match.group(2), 0) + int(match.group(1).replace(',', ''))
    return costs


def per_request_costs(with_requests: dict[str, int], without: dict[str, int], requests: int) -> list[tuple[str, float]]:
    """Each function's cost per request, largest first: what the N requests added to it."""
    names = set(with_requests) | set(without)
    added = ((name, (with_requests.get(name, 0) - without.get(name, 0)) / requests) for name in names)
    return sorted((item for item in added if item[1] > 0), key=lambda item: -item[1])


def short_name(name: str) -> str:
    """`file:function [object]` without the build's and the venv's folders, the object by its file name."""
    function, _, library = name.partition(' [')
    function = BUILD_PATH.sub('', function)
    return f'{function} [{Path(library.rstrip("]")).name}]' if library else function


def by_library(costs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The costs summed by the library (shared object) the function is in. callgrind names no
    library for code inlined from a header: Python's headers (`./Include/`) count as libpython."""
    sums: dict[str, float] = {}
    for name, cost in costs:
        function, _, library = name.partition(' [')
        inlined = 'libpython (inlined)' if '/Include/' in function else '?'
        key = Path(library.rstrip(']')).name if library else inlined
        sums[key] = sums.get(key, 0.0) + cost
    return sorted(sums.items(), key=lambda item: -item[1])


# --- The run --------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    scenario: str
    what: str
    runs: list[float]  # instructions per action, one per run

    @property
    def mean(self) -> float:
        return sum(self.runs) / len(self.runs)

    @property
    def spread(self) -> float:
        return spread(self.runs)


@dataclass(frozen=True, slots=True)
class Target:
    what: str
    measured: float
    wanted: float
    status: str


def ensure_valgrind() -> str:
    """valgrind's path, installed from Debian by scripts/ensure_tools.sh when missing."""
    found = shutil.which('valgrind')
    if found is None:
        subprocess.run([str(REPO / 'scripts' / 'ensure_tools.sh')], check=True)
        found = shutil.which('valgrind')
    if found is None:
        raise RuntimeError('valgrind is not installed and scripts/ensure_tools.sh could not install it')
    return found


def callgrind(valgrind: str, spec: dict[str, Any], folder: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Runs `spec`'s scenarios under callgrind; the forks it made, each with its file's Ir total."""
    spec_path = folder / 'spec.json'
    spec_path.write_text(json.dumps(spec), encoding='utf-8')
    command = [valgrind, '--tool=callgrind', '--separate-threads=yes', '--dump-line=no']
    command += [f'--log-file={folder}/valgrind.%p.log']
    command += [f'--callgrind-out-file={folder}/callgrind.%p', sys.executable, '-m', 'bench.instructions']
    command += ['--child', str(spec_path)]
    with (folder / 'child.log').open('wb') as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = (folder / 'child.log').read_text(encoding='utf-8', errors='replace')[-3000:]
        raise RuntimeError(f'callgrind run in {folder} exited {done.returncode}:\n{tail}')
    forks: list[dict[str, Any]] = json.loads(Path(spec['manifest']).read_text(encoding='utf-8'))
    for fork in forks:
        path = folder / f'callgrind.{fork["pid"]}{MAIN_THREAD}'
        fork['file'] = str(path)
        fork['ir'] = total_ir(path.read_text(encoding='utf-8', errors='replace'))
    return forks


def measure(
    valgrind: str, scenarios: list[Scenario], count: int, warmup: int, dbname: str, folder: Path
) -> dict[str, dict[str, Any]]:
    """One run of every scenario: per scenario, the two forks' Ir and their files."""
    (folder / 'logs').mkdir(parents=True)
    (folder / 'metrics').mkdir()
    spec = {
        'scenarios': [scenario.name for scenario in scenarios],
        'count': count,
        'warmup': warmup,
        'dbname': dbname,
        'token': secrets.token_hex(20),
        'log_dir': str(folder / 'logs'),
        'manifest': str(folder / 'manifest.json'),
    }
    env = dict(os.environ, PYTHONHASHSEED='0', PROMETHEUS_MULTIPROC_DIR=str(folder / 'metrics'))
    found: dict[str, dict[str, Any]] = {}
    for fork in callgrind(valgrind, spec, folder, env):
        found.setdefault(fork['scenario'], {})[str(fork['requests'])] = fork
    return found


def judge(results: dict[str, Result]) -> list[Target]:
    targets = []
    for what, scenario, bare in TARGETS:
        if scenario in results and bare in results:
            ratio = results[scenario].mean / results[bare].mean
            status = 'PASS' if ratio <= TARGET_RATIO else 'FAIL'
            targets.append(Target(f'{what}, app / bare {what}', round(ratio, 3), TARGET_RATIO, status))
    for result in results.values():
        if len(result.runs) > 1:
            status = 'PASS' if result.spread <= AGREEMENT else 'FAIL'
            targets.append(Target(f'{result.scenario}, runs apart', round(result.spread, 6), AGREEMENT, status))
    return targets


def table(results: dict[str, Result], targets: list[Target]) -> str:
    runs = max(len(result.runs) for result in results.values())
    head = '| scenario | ' + ' | '.join(f'run {n + 1}' for n in range(runs)) + ' | runs apart |'
    lines = [head, '|' + ' --- |' * (runs + 2)]
    for result in results.values():
        counts = ' | '.join(f'{value:,.0f}' for value in result.runs)
        lines.append(f'| {result.what} | {counts} | {result.spread:.4%} |')
    lines.append('')
    lines += [f'{t.status:<4}  {t.what}: {t.measured:g} (wanted <= {t.wanted:g})' for t in targets]
    return '\n'.join(lines)


def breakdown(fork_with: dict[str, Any], fork_without: dict[str, Any], per: int) -> list[tuple[str, float]]:
    """Every function's own instructions (not its callees') per action: callgrind_annotate's
    figures for the two forks, subtracted. Exact, and they add up to the total per action."""
    costs = []
    for fork in (fork_with, fork_without):
        command = ['callgrind_annotate', '--threshold=100', fork['file']]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        costs.append(annotated_costs(done.stdout))
    return per_request_costs(costs[0], costs[1], fork_with['requests'] * per)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='bench instructions', description=__doc__.splitlines()[0])
    parser.add_argument('--count', type=int, default=1000, help='actions measured per scenario (default 1000)')
    parser.add_argument('--warmup', type=int, default=100, help='actions sent before counting (default 100)')
    parser.add_argument('--runs', type=int, default=2, help='runs of every scenario (default 2)')
    parser.add_argument('--only', help='comma-separated scenarios: ' + ','.join(SCENARIOS))
    parser.add_argument('--out', type=Path, help='the JSON results (default bench/results/instructions.json)')
    parser.add_argument('--top', type=int, default=0, help="also each library's and the N costliest functions' cost")
    args = parser.parse_args(argv)
    names = args.only.split(',') if args.only else list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f'unknown scenarios: {", ".join(unknown)}')
    scenarios = [SCENARIOS[name] for name in names]
    started, started_at = time.monotonic(), datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')
    valgrind = ensure_valgrind()
    from bench.database import bench_database

    folder = Path(tempfile.mkdtemp(prefix='dbapi-instructions-'))
    results = {s.name: Result(s.name, s.what, []) for s in scenarios}
    forks: list[dict[str, dict[str, Any]]] = []
    try:
        with bench_database() as dbname:
            for run in range(args.runs):
                print(f'run {run + 1} of {args.runs} ({time.monotonic() - started:.0f} s)', flush=True)
                forks.append(measure(valgrind, scenarios, args.count, args.warmup, dbname, folder / f'run{run + 1}'))
                for scenario in scenarios:
                    found = forks[-1][scenario.name]
                    requests = scenario.requests(args.count)
                    cost = per_action(found[str(requests)]['ir'], found['0']['ir'], requests, scenario.actions)
                    results[scenario.name].runs.append(cost)
        targets = judge(results)
        print(table(results, targets))
        tops = {}
        for name in results if args.top else ():
            if name in results:
                scenario, found = SCENARIOS[name], forks[0][name]
                rows = breakdown(found[str(scenario.requests(args.count))], found['0'], scenario.actions)
                tops[name] = {
                    'libraries': {library: round(ir) for library, ir in by_library(rows) if round(ir) > 0},
                    'functions': {short_name(function): round(ir) for function, ir in rows[: args.top]},
                }
                print(f'\n{name}: own instructions per request, by library, then the {args.top} costliest functions')
                for label, ir in [*tops[name]['libraries'].items(), ('', 0), *tops[name]['functions'].items()]:
                    print(f'{ir:10,.0f}  {label}' if label else '')
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        print(f'bench instructions: {error}\n(files kept in {folder})', file=sys.stderr)
        return 2
    shutil.rmtree(folder, ignore_errors=True)
    elapsed = time.monotonic() - started
    document = {
        'started': started_at,
        'elapsed_s': round(elapsed, 1),
        'commit': commit(),
        'python': platform.python_version(),
        'valgrind': subprocess.run([valgrind, '--version'], capture_output=True, text=True, check=False).stdout.strip(),
        'count': args.count,
        'warmup': args.warmup,
        'results': [
            {**asdict(result), 'runs': [round(run, 1) for run in result.runs], 'mean': round(result.mean, 1)}
            | {'spread': round(result.spread, 6)}
            for result in results.values()
        ],
        'targets': [asdict(target) for target in targets],
        'top': tops,
    }
    out: Path = args.out or RESULTS / 'instructions.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + '\n', encoding='utf-8')
    print(f'\n{elapsed:.0f} s; results: {out}')
    return 1 if any(target.status == 'FAIL' for target in targets) else 0


def commit() -> str:
    command = ['git', 'describe', '--always', '--dirty']
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip()


if __name__ == '__main__':
    if sys.argv[1:2] == ['--child']:
        raise SystemExit(child(sys.argv[2:]))
    raise SystemExit(main(sys.argv[1:]))
