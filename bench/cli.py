"""`python -m bench [--quick]`: the whole run, from an empty database to the README's table.

Every scenario is measured at each concurrency right next to its references, so each ratio
compares numbers taken seconds apart on the same (noisy, shared) machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ParamSpec

import psycopg2

from bench.access_records import AccessRecords
from bench.candidates import CANDIDATES, Candidate
from bench.database import PG, ConnectionWatch, bench_database, stored_keys
from bench.machine import others_cpu
from bench.measure import APP_P99, KERNEL_CPU, OTHERS_CPU, Measurement, combine
from bench.pgbench import percentile, run_pgbench
from bench.plot import write_plot
from bench.report import update_readme, write_json, write_markdown
from bench.servers import REPO, VENV_BIN, Server, gunicorn_command, serve
from bench.service import (
    PATHS,
    PEER_SCENARIOS,
    callers_env,
    peer_command,
    peer_env,
    peer_versions,
    same_answers,
    service_env,
)
from bench.targets import AT, BARE, NOKEY, NOMETRICS, PEER, PEER_NORESET, PGBOUNCER, ServerStats, Verdict, evaluate
from bench.wrk import run_wrk

RESULTS = REPO / 'bench' / 'results'
P = ParamSpec('P')
NGINX_SCENARIOS = ('foo', 'read', 'upsert', 'rows')  # measured through nginx too, beside direct
# Issue 20: 100 actions in one POST /batch, and an upsert with an Idempotency-Key; direct only.
SCENARIOS = (*NGINX_SCENARIOS, 'batch_read', 'batch_upsert', 'upsert_keyed')
KEYED = ('upsert_keyed',)  # each measurement also counts the answers it stored for its keys
PGBOUNCER_SCENARIOS = ('read', 'upsert')  # measured through pgbouncer too, beside direct
# (series, pgbench -M mode) measured beside each scenario; foo's reference is the WSGI hello.
PG_REFERENCES = {
    'read': [('pgbench simple', 'simple'), ('pgbench prepared', 'prepared')],
    'upsert': [('pgbench simple', 'simple'), ('pgbench prepared', 'prepared')],
    'rows': [('pgbench json_agg', 'simple')],
    'batch_read': [('pgbench simple', 'simple')],  # one read a transaction
    'batch_upsert': [('pgbench simple', 'simple')],  # the batch's upserts in one transaction
}
# (series, the server it is sent to, the body it sends) measured beside a scenario: the app's own
# requests as reference, such as the same upsert without an Idempotency-Key.
APP_REFERENCES = {'upsert_keyed': [(NOKEY, 'app direct', 'upsert')]}


@dataclass(frozen=True, slots=True)
class Plan:
    connections: tuple[int, ...]
    seconds: float
    warmup: float
    scenarios: tuple[str, ...] = SCENARIOS
    nginx: bool = True
    candidates: tuple[str, ...] = ()
    rounds: int = 1
    callers: int = 0  # > 0: the app authenticates through a CALLERS_FILE of this many callers
    # The FastAPI peer (bench/peer.py) and its variant without asyncpg's reset query, beside the
    # app for the scenarios they serve; --quick serves the peer only, --no-peer neither.
    peers: tuple[str, ...] = (PEER, PEER_NORESET)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='bench', description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='8 connections, 1 s each: the CI check (no speed judged)')
    parser.add_argument('--seconds', type=float, help='seconds per measurement (default 4, quick 1)')
    parser.add_argument('--connections', help='comma-separated, e.g. 1,8,32')
    parser.add_argument('--only', help='comma-separated scenarios: ' + ','.join(SCENARIOS))
    parser.add_argument(
        '--out', type=Path, help='results folder (default bench/results; with --quick or --only bench/results/tmp)'
    )
    parser.add_argument('--rounds', type=int, help='alternating rounds per measurement (default 2, quick 1)')
    parser.add_argument('--no-nginx', action='store_true', help='skip the scenarios through nginx')
    parser.add_argument('--no-peer', action='store_true', help='skip the FastAPI peer (bench/peer.py)')
    parser.add_argument(
        '--candidate', action='append', default=[], choices=sorted(CANDIDATES), help='another server to measure too'
    )
    parser.add_argument('--readme', action='store_true', help="write this run's targets table into README.md")
    parser.add_argument('--recycle', action='store_true', help="keep gunicorn's max_requests recycling on")
    parser.add_argument('--callers', type=int, default=0, help='authenticate through a CALLERS_FILE of N callers')
    args = parser.parse_args(argv)
    if args.readme and (args.quick or args.only or args.no_peer):
        parser.error('--readme takes a full run: the README shows every target')
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    connections = (8,) if args.quick else (1, 8, 32)
    if args.connections:
        connections = tuple(int(c) for c in args.connections.split(','))
    scenarios = tuple(args.only.split(',')) if args.only else SCENARIOS
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f'bench: unknown scenario(s) {", ".join(sorted(unknown))}; known: {", ".join(SCENARIOS)}')
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    rounds = args.rounds or (1 if args.quick else 2)
    return Plan(
        connections,
        seconds,
        1.0,
        scenarios,
        not args.no_nginx,
        tuple(args.candidate),
        rounds,
        args.callers,
        () if args.no_peer else (PEER,) if args.quick else (PEER, PEER_NORESET),
    )


def setting(env: dict[str, str], expression: str) -> str:
    """A value of the configuration (`config.<field>`) as the server will see it (its .env file included)."""
    code = f'from lib.core.config import load; config = load(); print({expression})'
    return subprocess.run(
        [str(VENV_BIN / 'python'), '-c', code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def gunicorn_setting(env: dict[str, str], name: str) -> str:
    """A value gunicorn.conf.py sets with this environment (its production default unless overridden)."""
    code = f"import runpy, sys; sys.path.insert(0, '.'); print(runpy.run_path('gunicorn.conf.py')[{name!r}])"
    done = subprocess.run([str(VENV_BIN / 'python'), '-c', code], env=env, cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip()


def worker_class(env: dict[str, str]) -> str:
    """The worker class gunicorn.conf.py picks with this environment, without its module."""
    return gunicorn_setting(env, 'worker_class').rpartition('.')[2] or 'unknown'


class Run:
    """One benchmark run: the servers, the measurements, the stats of the app's workers."""

    def __init__(self, plan: Plan, dbname: str, token: str, watch: ConnectionWatch, records: AccessRecords) -> None:
        self.plan = plan
        self.dbname = dbname
        self.token = token
        self.watch = watch
        self.records = records  # the app's access records: its own p99 of each measurement
        self.results: list[Measurement] = []
        self.urls: dict[str, str] = {}  # series -> the address it is measured at, references first
        self.scenarios: dict[str, tuple[str, ...]] = {}  # series measured for some scenarios only
        self.connections: dict[str, tuple[int, ...]] = {}  # series measured at some concurrencies only

    def serves(self, series: str, scenario: str, connections: int) -> bool:
        """Whether `series` is measured for `scenario` at `connections`."""
        wanted = scenario in self.scenarios.get(series, SCENARIOS)
        return wanted and connections in self.connections.get(series, (connections,))

    def log(self, text: str) -> None:
        print(text, flush=True)

    def wrk(
        self, scenario: str, series: str, connections: int, seconds: float, server: str = '', body: str = ''
    ) -> Measurement:
        """`series` of `scenario`: `body`'s requests (default the scenario's) sent to `server`
        (default the series' own). For the app's servers, with the app's own p99 beside wrk's."""
        server, body = server or series, body or scenario
        # The hello gets the very requests the app gets (same body, same headers): only the app differs.
        path = '/' if server.startswith('wsgi hello') else PATHS[body]
        url = self.urls[server] + path
        keys_before = stored_keys(self.dbname) if scenario in KEYED else 0
        self.records.skip()
        result = run_wrk(url, body, self.token, connections, seconds, scenario, series)
        served = self.records.durations_ms()
        if served:  # the hello and the bare read write no access record
            result.detail[APP_P99] = percentile(served, 0.99)
        if scenario in KEYED:
            result.detail['keys_stored'] = stored_keys(self.dbname) - keys_before  # the keys reached the table
        return result

    def warm_up(self) -> None:
        """Every server of the run with every scenario it serves, before anything is measured: a
        worker's first requests open its connections and prepare its statements, which would
        weigh on the first round of the servers not warmed."""
        for series in self.urls:
            for scenario in self.plan.scenarios:
                if scenario in self.scenarios.get(series, SCENARIOS):
                    self.wrk(scenario, series, AT, self.plan.warmup)

    def measure(self, scenario: str) -> None:
        """At each concurrency: the references, then every server of the app, in alternating rounds.

        Rounds spread every series over the same stretch of time, so load that comes and goes on
        a shared machine weighs on a ratio's two sides alike.
        """
        seconds = self.plan.seconds / self.plan.rounds
        for connections in self.plan.connections:
            rounds: dict[str, list[Measurement]] = {}
            for _ in range(self.plan.rounds):
                for series, mode in PG_REFERENCES.get(scenario, []):
                    result = beside_others(run_pgbench, self.dbname, PG, scenario, mode, connections, seconds, series)
                    rounds.setdefault(series, []).append(result)
                for series, server, body in APP_REFERENCES.get(scenario, []):
                    result = beside_others(self.wrk, scenario, series, connections, seconds, server, body)
                    rounds.setdefault(series, []).append(result)
                for series in self.urls:
                    if self.serves(series, scenario, connections):
                        result = beside_others(self.wrk, scenario, series, connections, seconds)
                        rounds.setdefault(series, []).append(result)
            for measured in rounds.values():
                self.record(combine(measured))

    def record(self, result: Measurement) -> None:
        self.results.append(result)
        self.log(
            f'  {result.scenario:<12} {result.series:<18} c={result.connections:<3} {result.rps:>9,.0f}/s '
            f'p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors} non-2xx {result.non2xx}'
            + (f'  ({result.action_rate:,.0f} actions/s)' if result.actions > 1 else '')
            + (f'  keys stored {result.detail["keys_stored"]}' if 'keys_stored' in result.detail else '')
        )


def beside_others(take: Callable[P, Measurement], *args: P.args, **kwargs: P.kwargs) -> Measurement:
    """`take(*args, **kwargs)`'s measurement, with the shares of the machine's CPU that other
    processes and the kernel's threads used meanwhile (bench.machine) in its detail."""
    with others_cpu() as load:
        result = take(*args, **kwargs)
    result.detail |= {OTHERS_CPU: round(load.processes, 4), KERNEL_CPU: round(load.kernel, 4)}
    return result


@contextmanager
def app_server(env: dict[str, str], tmp: Path) -> Iterator[Server]:
    with serve('app', gunicorn_command('app:app'), env, tmp, probe='/health/ready') as server:
        yield server


@contextmanager
def nginx_in_front(app: Server, tmp: Path) -> Iterator[str]:
    """The production nginx template (nginx/nginx.conf) rendered by the topology runner, proxying to `app`."""
    nginx = topology().Nginx(tmp / 'nginx', [app.port])
    nginx.start()
    try:
        yield nginx.url
    finally:
        nginx.stop()


@contextmanager
def app_through_pgbouncer(env: dict[str, str], tmp: Path) -> Iterator[Server]:
    """The same app with its database behind Debian's pgbouncer in transaction mode (scripts/topology.py)."""
    pooler = topology().PgBouncer(tmp / 'pgbouncer', PG)
    pooler.start()
    try:
        through = dict(
            env, DEFAULT_DB_HOST='127.0.0.1', DEFAULT_DB_PORT=str(pooler.port), DEFAULT_DB_PGBOUNCER='transaction'
        )
        with serve(PGBOUNCER, gunicorn_command('app:app'), through, tmp, probe='/health/ready') as server:
            yield server
    finally:
        pooler.stop()


def topology() -> ModuleType:
    """scripts/topology.py, the one place that renders the nginx template for a local run."""
    spec = importlib.util.spec_from_file_location('dbapi_topology', REPO / 'scripts' / 'topology.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_candidate(stack: ExitStack, run: Run, candidate: Candidate, env: dict[str, str], tmp: Path) -> None:
    """Another server for the app and the hello, measured beside the production one."""
    env = dict(env, **candidate.env)
    hello = f'wsgi hello {candidate.name}'
    run.urls = {hello: '', **run.urls}  # the references are measured first
    run.urls[hello] = stack.enter_context(serve(hello, candidate.command('bench.hello:app'), env, tmp, '/')).url
    run.scenarios[hello] = ('foo',)
    series = f'app {candidate.name}'
    run.urls[series] = stack.enter_context(serve(series, candidate.command('app:app'), env, tmp, '/health/ready')).url
    run.scenarios[series] = candidate.scenarios


def start_peers(stack: ExitStack, run: Run, env: dict[str, str], tmp: Path) -> str:
    """The plan's peers (bench/peer.py) with the app's number of workers and pool size, for the
    scenarios they serve, at the targets' concurrency only; what they are, for the report.

    At 32 connections each peer's pools would hold workers x pool size sessions (asyncpg keeps an
    idle one 300 s), 40 for both on 2 cores: with pgbench's 32 clients and the app's servers, more
    than a shared server's max_connections of 100 allows."""
    scenarios = tuple(scenario for scenario in PEER_SCENARIOS if scenario in run.plan.scenarios)
    if not run.plan.peers or not scenarios:
        return ''
    workers, pool_size = int(gunicorn_setting(env, 'workers')), int(setting(env, 'config.pool_size'))
    for series in run.plan.peers:
        settings = peer_env(env, run.token, pool_size, tmp / 'peer', reset=series != PEER_NORESET)
        run.urls[series] = stack.enter_context(serve(series, peer_command(workers), settings, tmp, '/health')).url
        run.scenarios[series] = scenarios
        run.connections[series] = (AT,)
    return f'uvicorn (uvloop, httptools) x {workers} workers, asyncpg pool {pool_size}: {peer_versions()}'


def check_peers(run: Run) -> None:
    """A sample of each peer's answers against the app's, for the same keys (bench.service.same_answers)."""
    for series in run.plan.peers:
        if series in run.urls:
            aid, abalance = secrets.randbelow(1_000_000) + 1, secrets.randbelow(10_001) - 5_000
            count = same_answers(run.urls['app direct'], run.urls[series], run.token, aid, abalance)
            run.log(f"{series}: {count} sample answers the same JSON as the app's (key {aid})")


def measure_all(run: Run, peers: ExitStack) -> None:
    """Every scenario of the plan; the peers are checked once more and stopped after the last
    scenario they serve, so the later scenarios' pgbench at 32 clients has their sessions."""
    for number, scenario in enumerate(run.plan.scenarios):
        run.measure(scenario)
        if peers_started(run) and not set(run.plan.scenarios[number + 1 :]) & set(PEER_SCENARIOS):
            check_peers(run)  # after the load too, on keys the measurements may have changed
            peers.close()
            for series in run.plan.peers:
                run.urls.pop(series, None)


def peers_started(run: Run) -> bool:
    return any(series in run.urls for series in run.plan.peers)


def execute(plan: Plan, recycle: bool, tmp: Path) -> tuple[list[Measurement], ServerStats, str, str]:
    token = secrets.token_hex(20)
    with ExitStack() as stack:
        dbname = stack.enter_context(bench_database())
        watch = stack.enter_context(ConnectionWatch(dbname))
        env = service_env(dbname, token, tmp, recycle)
        if plan.callers > 0:
            env.update(callers_env(token, plan.callers, tmp))
        run = Run(plan, dbname, token, watch, AccessRecords(tmp))
        if 'foo' in plan.scenarios:
            hello = stack.enter_context(serve('hello', gunicorn_command('bench.hello:app'), env, tmp, probe='/'))
            run.urls['wsgi hello'] = hello.url
            run.scenarios['wsgi hello'] = ('foo',)
        if 'read' in plan.scenarios:
            bare = stack.enter_context(serve(BARE, gunicorn_command('bench.bare:app'), env, tmp, probe='/'))
            run.urls[BARE] = bare.url
            run.scenarios[BARE] = ('read',)
        app = stack.enter_context(app_server(env, tmp))
        run.urls['app direct'] = app.url
        watch.watch(lambda: [worker.pid for worker in app.workers()])
        if plan.nginx:
            run.urls['app nginx'] = stack.enter_context(nginx_in_front(app, tmp))
            run.scenarios['app nginx'] = NGINX_SCENARIOS
        if 'read' in plan.scenarios:
            # The same app with METRICS=0, its reads alternated with the app's: the metrics' cost.
            nometrics = serve(NOMETRICS, gunicorn_command('app:app'), dict(env, METRICS='0'), tmp, '/health/ready')
            run.urls[NOMETRICS] = stack.enter_context(nometrics).url
            run.scenarios[NOMETRICS] = ('read',)
        pooled = tuple(scenario for scenario in PGBOUNCER_SCENARIOS if scenario in plan.scenarios)
        if pooled:
            run.urls[PGBOUNCER] = stack.enter_context(app_through_pgbouncer(env, tmp)).url
            run.scenarios[PGBOUNCER] = pooled
        peers = stack.enter_context(ExitStack())
        peer = start_peers(peers, run, env, tmp)
        for candidate in plan.candidates:
            start_candidate(stack, run, CANDIDATES[candidate], env, tmp)
        run.log(f'database {dbname} ready; servers up')
        check_peers(run)
        run.log('warming up')
        run.warm_up()
        rss_before = sum(app.worker_rss().values())
        measure_all(run, peers)
        stats = ServerStats(
            workers=len(app.workers()),
            pool_size=int(setting(env, 'config.pool_size')),
            rss_before=rss_before,
            rss_after=sum(app.worker_rss().values()),
            peak_connections=watch.peak,
        )
        server = f'gunicorn {worker_class(env)} x {stats.workers} workers, pool {stats.pool_size}'
    return run.results, stats, server, peer


def report(
    args: argparse.Namespace, plan: Plan, results: list[Measurement], stats: ServerStats, meta: dict
) -> list[Verdict]:
    verdicts = evaluate(results, stats)
    # Only a full run replaces the published results (the README links them).
    out: Path = args.out or (RESULTS / 'tmp' if args.quick or args.only else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = 'quick' if args.quick else 'latest'
    write_json(out / f'{stem}.json', meta, results, verdicts)
    write_markdown(out / f'{stem}.md', meta, results, verdicts)
    write_plot(out / f'{stem}.png', results, f'dbapi vs PostgreSQL, {meta["started"]}, {meta["server"]}')
    print()
    for verdict in verdicts:
        print(f'{verdict.status:<4}  {verdict.what}: {verdict.measured} (wanted {verdict.target})')
    if args.readme:
        update_readme(REPO / 'README.md', meta, verdicts)
    print(f'\nresults: {out / stem}.md, .json, .png')
    return verdicts


def sched_autogroup() -> bool | None:
    """Whether the kernel groups processes by session for scheduling (None: no such setting).

    It matters to the read p99: with it on, PostgreSQL's backends (one session of their own)
    compete as one group, and now and then a backend waits 100-300 ms to run (README).
    """
    try:
        return Path('/proc/sys/kernel/sched_autogroup_enabled').read_text(encoding='ascii').strip() == '1'
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = make_plan(args)
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')  # before the run, not after
    tmp = Path(tempfile.mkdtemp(prefix='dbapi-bench-'))
    try:
        results, stats, server, peer = execute(plan, args.recycle, tmp)
    except (RuntimeError, OSError, subprocess.SubprocessError, psycopg2.Error) as error:
        print(f'bench: {error}\n(server logs kept in {tmp})', file=sys.stderr)
        return 2
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        'started': started_at,
        'host': socket.gethostname(),
        'cpus': os.cpu_count(),
        'kernel': platform.release(),
        'sched_autogroup': sched_autogroup(),
        'seconds_per_run': plan.seconds,
        'rounds': plan.rounds,
        'connections': list(plan.connections),
        'server': server,
        'peer': peer,
        'callers': plan.callers,
        'elapsed_s': time.monotonic() - started,
        'quick': args.quick,
    }
    verdicts = report(args, plan, results, stats, meta)
    if args.quick:
        # CI judges correctness only: any error or non-2xx answer fails, speed never does.
        return 1 if any(r.errors or r.non2xx for r in results) else 0
    return 1 if any(v.status == 'FAIL' for v in verdicts) else 0
