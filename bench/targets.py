"""The issue's targets, each a ratio or a bound measured within one run, judged PASS or FAIL."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.measure import APP_P99, KERNEL_CPU, OTHERS_CPU, Measurement, find

AT = 8  # connections, unless a target says otherwise
PGBOUNCER = 'app pgbouncer'  # the app with DEFAULT_DB_PGBOUNCER=transaction, through Debian's pgbouncer
NOMETRICS = 'app direct nometrics'  # the same app and server with METRICS=0: the read only
NOKEY = 'app direct, no key'  # the upsert sent without an Idempotency-Key, alternated with the keyed one
MAIN_SERIES = frozenset({'app direct', 'app nginx', PGBOUNCER, NOMETRICS, NOKEY})
# The peer (bench/peer.py): the same read and upsert in FastAPI + asyncpg on uvicorn, with the
# app's workers and pool size, alternated with the app round by round. The app is judged against
# it; against pgbench (the physical limit: the machine, not the code, moved those ratios) only shown.
PEER = 'fastapi peer'
PEER_NORESET = 'fastapi peer, no reset'  # the same without asyncpg's reset query on release: shown
PEER_RATIO = 1.2
# example/foo against the WSGI hello on the same server: shown, no longer judged. It rewarded
# coupling to the server's internals, and any faster server speeds the hello as much as the app.
FOO_RATIO = 0.6
# Read by key and upsert through pgbouncer in transaction mode, against the same app direct.
PGBOUNCER_RATIO = 0.7
METRICS_RATIO = 0.95  # read by key with the metrics step, against the same read without it
BARE = 'wsgi psycopg2'  # bench/bare.py: the read's floor, the same server and driver without the framework
# Issue 20, in actions per second. A batch of 100 reads by key, against pgbench -M simple running
# the read alone (one a transaction); a batch of 100 upserts, against pgbench running the same 100
# in one transaction; an upsert with an Idempotency-Key of its own, against the same upsert without.
BATCH_READ_RATIO = 0.5
BATCH_READ_MOONSHOT = 0.8
BATCH_UPSERT_RATIO = 0.5
KEYED_RATIO = 0.7
P99_MS = 10.0  # the read's p99 at AT connections, from the app's own access records


@dataclass(frozen=True, slots=True)
class Verdict:
    what: str
    target: str
    measured: str
    status: str  # PASS, FAIL, or SKIP when a series was not measured

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ServerStats:
    workers: int
    pool_size: int
    rss_before: int  # bytes, all workers, after the warm-up
    rss_after: int
    peak_connections: int

    @property
    def memory_growth(self) -> float:
        return (self.rss_after - self.rss_before) / self.rss_before if self.rss_before else 0.0


def ratio_target(
    results: list[Measurement],
    what: str,
    top: tuple[str, str],
    bottom: tuple[str, str],
    limit: float,
    at_least: bool,
    note: str = '',
) -> Verdict:
    """`top` / `bottom` throughput in actions (one per request, but a batch's) at AT connections
    against `limit`; `note` follows the target."""
    mine, reference = find(results, *top, AT), find(results, *bottom, AT)
    sign = '≥' if at_least else '≤'
    target = f'{sign} {limit:g}x' + (f' ({note})' if note else '')
    if mine is None or reference is None or not reference.rps or not mine.rps:
        return Verdict(what, target, 'not measured', 'SKIP')
    ratio = mine.action_rate / reference.action_rate
    ok = ratio >= limit if at_least else ratio <= limit
    measured = f'{shown(ratio, limit)}x ({mine.action_rate:,.0f} / {reference.action_rate:,.0f} /s)'
    return Verdict(what, target, measured, passed(ok))


def shown(ratio: float, limit: float) -> str:
    """Two decimals, or three where two would print the limit itself (0.148 is not 0.15)."""
    text = f'{ratio:.2f}'
    return f'{ratio:.3f}' if float(text) == limit and ratio != limit else text


def rows_target(results: list[Measurement]) -> Verdict:
    """Time per answer (connections ÷ throughput) of the 10,000-row read against json_agg's."""
    mine, reference = find(results, 'rows', 'app direct', AT), find(results, 'rows', 'pgbench json_agg', AT)
    if mine is None or reference is None or not mine.rps or not reference.rps:
        return Verdict('10,000-row read vs json_agg', '≤ 1.5x', 'not measured', 'SKIP')
    mine_ms, reference_ms = 1000 * AT / mine.rps, 1000 * AT / reference.rps
    ratio = mine_ms / reference_ms
    measured = f'{ratio:.2f}x ({mine_ms:.1f} ms / {reference_ms:.1f} ms)'
    return Verdict('10,000-row read vs json_agg', '≤ 1.5x', measured, passed(ratio <= 1.5))


# A closed-loop client keeps at most `connections` requests in flight; wrk's figures have shown
# far more in a round (docs/performance.md): its latencies for that round are then wrong.
IN_FLIGHT_SLACK = 1.25


def implausible(in_flight: float, connections: int) -> bool:
    """Whether wrk's figures imply more requests in flight than its connections can hold."""
    return in_flight > connections * IN_FLIGHT_SLACK


# The p99 line names the CPU used outside the benchmark from this share of the machine on, in
# a round: bursts of other processes or of the kernel's threads stop the app and PostgreSQL alike.
OTHERS_NOTE = 0.05


def p99_target(results: list[Measurement]) -> Verdict:
    """The read's p99 in the app's own access records (the worst round's): the app's time, without
    the load generator, the server's parsing and sending, or the kernel, all on the same cores."""
    what, target = "read by key p99, the app's own", f'≤ {P99_MS:g} ms'
    mine = find(results, 'read', 'app direct', AT)
    if mine is None or APP_P99 not in mine.detail:
        return Verdict(what, target, 'not measured', 'SKIP')
    measured = f'{mine.detail[APP_P99]:.2f} ms'
    others, kernel = mine.detail.get(OTHERS_CPU, 0.0), mine.detail.get(KERNEL_CPU, 0.0)
    if max(others, kernel) >= OTHERS_NOTE:
        measured += (
            f" (in its worst rounds other processes took {others:.0%} of the CPU, the kernel's threads {kernel:.0%})"
        )
    return Verdict(what, target, measured, passed(mine.detail[APP_P99] <= P99_MS))


def wrk_p99_figure(results: list[Measurement]) -> Verdict | None:
    """The read's p99 as wrk saw it (INFO): the load generator and everything else on the cores included."""
    mine = find(results, 'read', 'app direct', AT)
    if mine is None:
        return None
    measured = f'{mine.p99_ms:.2f} ms'
    worst = max(mine.detail.get('in_flight') or [mine.in_flight])
    if implausible(worst, mine.connections):
        measured += f" (wrk's latencies inconsistent: {worst:.0f} in flight on {mine.connections} connections)"
    return Verdict("read by key p99, wrk's", 'no target', measured, 'INFO')


def errors_target(results: list[Measurement]) -> Verdict:
    bad = [r for r in results if r.errors or r.non2xx]
    errors = sum(r.errors + r.non2xx for r in results)
    named = ', '.join(f'{r.scenario}/{r.series}/{r.connections}' for r in bad[:5])
    measured = f'{errors} in {len(results)} runs' + (f' ({named})' if named else '')
    return Verdict('errors and non-2xx answers', '0', measured, passed(errors == 0))


def memory_target(stats: ServerStats | None) -> Verdict:
    if stats is None:
        return Verdict('worker memory growth', '< 10%', 'not measured', 'SKIP')
    mib = 1024 * 1024
    measured = f'{stats.memory_growth:+.1%} ({stats.rss_before / mib:.0f} → {stats.rss_after / mib:.0f} MiB)'
    return Verdict('worker memory growth', '< 10%', measured, passed(stats.memory_growth < 0.10))


def connections_target(stats: ServerStats | None) -> Verdict:
    if stats is None:
        return Verdict('peak database connections', '≤ workers x pool', 'not measured', 'SKIP')
    limit = stats.workers * stats.pool_size
    target = f'≤ {stats.workers} x {stats.pool_size} = {limit}'
    return Verdict(
        'peak database connections', target, str(stats.peak_connections), passed(stats.peak_connections <= limit)
    )


def figure(results: list[Measurement], what: str, top: tuple[str, str], bottom: tuple[str, str]) -> Verdict | None:
    """`top` / `bottom` at AT connections, shown with no target; None when either was not measured."""
    verdict = ratio_target(results, what, top, bottom, 1, True)
    return None if verdict.status == 'SKIP' else Verdict(what, 'no target', verdict.measured, 'INFO')


def candidate_figures(results: list[Measurement]) -> list[Verdict | None]:
    """Every candidate server's read against pgbench and foo against its hello, for comparison (INFO)."""
    names = sorted({r.series[4:] for r in results if r.series.startswith('app ') and r.series not in MAIN_SERIES})
    figures: list[Verdict | None] = []
    for name in names:
        mine = find(results, 'read', f'app {name}', AT)
        p99 = f'{mine.p99_ms:.2f} ms' if mine else 'not measured'
        figures += [
            figure(results, f'{name}: read by key vs pgbench', ('read', f'app {name}'), ('read', 'pgbench simple')),
            figure(results, f'{name}: foo vs its hello', ('foo', f'app {name}'), ('foo', f'wsgi hello {name}')),
            Verdict(f"{name}: read by key p99, wrk's", 'no target', p99, 'INFO'),
        ]
    return figures


def passed(ok: bool) -> str:
    return 'PASS' if ok else 'FAIL'


def evaluate(results: list[Measurement], stats: ServerStats | None) -> list[Verdict]:
    """The judged targets (PASS, FAIL, or SKIP when not measured), then the figures shown beside them (INFO)."""
    judged = [
        ratio_target(
            results, 'read by key, app vs FastAPI peer', ('read', 'app direct'), ('read', PEER), PEER_RATIO, True
        ),
        ratio_target(
            results, 'upsert, app vs FastAPI peer', ('upsert', 'app direct'), ('upsert', PEER), PEER_RATIO, True
        ),
        p99_target(results),
        ratio_target(results, 'read by key, nginx', ('read', 'app nginx'), ('read', 'app direct'), 0.8, True),
        ratio_target(
            results, 'read by key, pgbouncer', ('read', PGBOUNCER), ('read', 'app direct'), PGBOUNCER_RATIO, True
        ),
        ratio_target(
            results, 'upsert, pgbouncer', ('upsert', PGBOUNCER), ('upsert', 'app direct'), PGBOUNCER_RATIO, True
        ),
        ratio_target(
            results,
            'metrics cost: read with metrics vs without',
            ('read', 'app direct'),
            ('read', NOMETRICS),
            METRICS_RATIO,
            True,
        ),
        ratio_target(
            results,
            '100 reads by key in one batch (actions/s)',
            ('batch_read', 'app direct'),
            ('batch_read', 'pgbench simple'),
            BATCH_READ_RATIO,
            True,
            f'moonshot {BATCH_READ_MOONSHOT:g}x',
        ),
        ratio_target(
            results,
            '100 upserts in one batch (actions/s)',
            ('batch_upsert', 'app direct'),
            ('batch_upsert', 'pgbench simple'),
            BATCH_UPSERT_RATIO,
            True,
        ),
        ratio_target(
            results,
            'upsert with an Idempotency-Key vs without',
            ('upsert_keyed', 'app direct'),
            ('upsert_keyed', NOKEY),
            KEYED_RATIO,
            True,
        ),
        rows_target(results),
        errors_target(results),
        memory_target(stats),
        connections_target(stats),
    ]
    figures = [
        figure(results, 'read by key, app vs pgbench simple', ('read', 'app direct'), ('read', 'pgbench simple')),
        figure(results, 'upsert, app vs pgbench simple', ('upsert', 'app direct'), ('upsert', 'pgbench simple')),
        figure(results, 'read by key, app vs the peer without reset', ('read', 'app direct'), ('read', PEER_NORESET)),
        figure(results, 'upsert, app vs the peer without reset', ('upsert', 'app direct'), ('upsert', PEER_NORESET)),
        wrk_p99_figure(results),
        figure(results, 'example/foo vs WSGI hello', ('foo', 'app direct'), ('foo', 'wsgi hello')),
        figure(
            results, 'bare WSGI + psycopg2 read (no framework) vs pgbench', ('read', BARE), ('read', 'pgbench simple')
        ),
        figure(results, 'read by key, app vs bare read', ('read', 'app direct'), ('read', BARE)),
        *candidate_figures(results),
    ]
    return judged + [verdict for verdict in figures if verdict is not None]
