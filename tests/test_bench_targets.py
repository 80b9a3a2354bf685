"""What the benchmark judges and what it only shows, and how it prints a ratio next to its target."""

from __future__ import annotations

import pytest

from bench.measure import APP_P99, Measurement, combine
from bench.targets import BARE, NOKEY, NOMETRICS, PEER, PEER_NORESET, evaluate, shown


@pytest.mark.parametrize(
    ('ratio', 'limit', 'text'),
    [
        (0.148, 0.15, '0.148'),  # two decimals would print the target it missed
        (0.1502, 0.15, '0.150'),
        (0.15, 0.15, '0.15'),
        (0.163, 0.15, '0.16'),
        (0.597, 0.6, '0.597'),
        (1.15, 1.5, '1.15'),
    ],
)
def test_a_ratio_never_prints_as_its_target_unless_it_is(ratio: float, limit: float, text: str) -> None:
    assert shown(ratio, limit) == text


def reads(**rps: float) -> list[Measurement]:
    return [Measurement('read', series, 8, rate, 1.0, 2.0, 1.0, int(rate), 0, 0) for series, rate in rps.items()]


def test_the_bare_read_is_reported_beside_the_targets_never_as_one() -> None:
    results = reads(**{'pgbench simple': 40_000, BARE: 6_000, 'app direct': 4_500, 'app nginx': 3_600})
    verdicts = evaluate(results, None)
    figures = {v.what: v for v in verdicts if v.status == 'INFO'}
    floor = figures['bare WSGI + psycopg2 read (no framework) vs pgbench']
    assert (floor.target, floor.measured) == ('no target', '0.15x (6,000 / 40,000 /s)')
    assert figures['read by key, app vs bare read'].measured == '0.75x (4,500 / 6,000 /s)'


def test_no_bare_read_no_figures() -> None:
    verdicts = evaluate(reads(**{'pgbench simple': 40_000, 'app direct': 4_500}), None)
    assert not [v for v in verdicts if 'bare' in v.what]


def test_the_app_is_judged_against_its_peer_and_pgbench_is_only_shown() -> None:
    results = [
        *reads(**{'app direct': 4_500, PEER: 3_000, PEER_NORESET: 3_900, 'pgbench simple': 40_000}),
        Measurement('upsert', 'app direct', 8, 2_000, 1.0, 2.0, 1.0, 2_000, 0, 0),
        Measurement('upsert', PEER, 8, 1_700, 1.0, 2.0, 1.0, 1_700, 0, 0),
        Measurement('upsert', PEER_NORESET, 8, 1_800, 1.0, 2.0, 1.0, 1_800, 0, 0),
        Measurement('upsert', 'pgbench simple', 8, 6_000, 1.0, 2.0, 1.0, 6_000, 0, 0),
    ]
    verdicts = evaluate(results, None)
    found = {v.what: (v.target, v.measured, v.status) for v in verdicts}
    assert found['read by key, app vs FastAPI peer'] == ('≥ 1.2x', '1.50x (4,500 / 3,000 /s)', 'PASS')
    assert found['upsert, app vs FastAPI peer'] == ('≥ 1.2x', '1.18x (2,000 / 1,700 /s)', 'FAIL')
    # Shown, never judged: the peer without asyncpg's reset query, and pgbench (the physical limit).
    assert found['read by key, app vs the peer without reset'] == ('no target', '1.15x (4,500 / 3,900 /s)', 'INFO')
    assert found['upsert, app vs the peer without reset'] == ('no target', '1.11x (2,000 / 1,800 /s)', 'INFO')
    assert found['read by key, app vs pgbench simple'] == ('no target', '0.11x (4,500 / 40,000 /s)', 'INFO')
    assert found['upsert, app vs pgbench simple'] == ('no target', '0.33x (2,000 / 6,000 /s)', 'INFO')
    judged = [v for v in verdicts if v.status != 'INFO']
    assert not [v for v in judged if 'pgbench simple' in v.what or 'without reset' in v.what]
    # The judged come first, then what is shown beside them.
    assert [v.status for v in verdicts] == sorted((v.status for v in verdicts), key=lambda status: status == 'INFO')


def test_no_peer_measured_its_targets_are_skipped_and_nothing_is_shown() -> None:
    verdicts = evaluate(reads(**{'app direct': 4_500, 'pgbench simple': 40_000}), None)
    found = {v.what: v.status for v in verdicts}
    assert found['read by key, app vs FastAPI peer'] == found['upsert, app vs FastAPI peer'] == 'SKIP'
    assert not [v for v in verdicts if 'without reset' in v.what]


def test_foo_is_only_shown() -> None:
    results = [
        Measurement('foo', 'app direct', 8, 5_000, 1.0, 2.0, 1.0, 5_000, 0, 0),
        Measurement('foo', 'wsgi hello', 8, 20_000, 1.0, 2.0, 1.0, 20_000, 0, 0),
    ]
    foo = next(v for v in evaluate(results, None) if v.what == 'example/foo vs WSGI hello')
    assert (foo.measured, foo.status) == ('0.25x (5,000 / 20,000 /s)', 'INFO')


def test_the_metrics_cost_is_the_read_with_them_against_the_same_read_without() -> None:
    results = reads(**{'app direct': 4_700, NOMETRICS: 5_000})
    verdicts = {v.what: v for v in evaluate(results, None)}
    cost = verdicts['metrics cost: read with metrics vs without']
    assert (cost.target, cost.measured, cost.status) == ('≥ 0.95x', '0.94x (4,700 / 5,000 /s)', 'FAIL')
    assert not [v for v in verdicts.values() if 'nometrics' in v.what]  # not taken for a candidate server


def test_a_batch_is_judged_in_actions_per_second_against_pgbench() -> None:
    results = [
        # 100 reads a request against pgbench's one read a transaction
        Measurement('batch_read', 'app direct', 8, 82, 80.0, 200.0, 90.0, 82, 0, 0, actions=100),
        Measurement('batch_read', 'pgbench simple', 8, 13_000, 0.2, 7.0, 0.6, 13_000, 0, 0),
        # 100 upserts a request against pgbench's 100 a transaction
        Measurement('batch_upsert', 'app direct', 8, 30, 250.0, 500.0, 260.0, 30, 0, 0, actions=100),
        Measurement('batch_upsert', 'pgbench simple', 8, 140, 50.0, 100.0, 55.0, 140, 0, 0, actions=100),
    ]
    verdicts = {v.what: v for v in evaluate(results, None)}
    read = verdicts['100 reads by key in one batch (actions/s)']
    assert (read.target, read.measured, read.status) == ('≥ 0.5x (moonshot 0.8x)', '0.63x (8,200 / 13,000 /s)', 'PASS')
    upsert = verdicts['100 upserts in one batch (actions/s)']
    assert (upsert.target, upsert.measured, upsert.status) == ('≥ 0.5x', '0.21x (3,000 / 14,000 /s)', 'FAIL')


def test_a_keyed_upsert_is_judged_against_the_same_upsert_without_a_key() -> None:
    results = [
        Measurement('upsert_keyed', 'app direct', 8, 1_200, 5.0, 12.0, 6.0, 1_200, 0, 0),
        Measurement('upsert_keyed', NOKEY, 8, 1_500, 4.0, 10.0, 5.0, 1_500, 0, 0),
        Measurement('upsert', 'app direct', 8, 3_000, 2.0, 6.0, 2.5, 3_000, 0, 0),  # another run's: not compared
    ]
    verdicts = evaluate(results, None)
    keyed = next(v for v in verdicts if v.what == 'upsert with an Idempotency-Key vs without')
    assert (keyed.target, keyed.measured, keyed.status) == ('≥ 0.7x', '0.80x (1,200 / 1,500 /s)', 'PASS')
    assert not [v for v in verdicts if 'no key' in v.what]  # not taken for a candidate server


def test_rounds_add_up_the_keys_they_stored() -> None:
    rounds = [
        Measurement('upsert_keyed', 'app direct', 8, rate, 5.0, 12.0, 6.0, int(rate), 0, 0, {'keys_stored': stored})
        for rate, stored in ((1_000, 1_004), (500, 503))
    ]
    combined = combine(rounds)
    assert (combined.requests, combined.detail['keys_stored']) == (1_500, 1_507)


def read_round(rps: float, mean_ms: float, p99_ms: float, app_p99_ms: float = 3.0) -> Measurement:
    return Measurement('read', 'app direct', 8, rps, 1.5, p99_ms, mean_ms, int(rps * 2), 0, 0, {APP_P99: app_p99_ms})


@pytest.mark.parametrize(
    ('rounds', 'measured'),
    [
        # 4,600/s at a mean of 1.7 ms is 7.8 in flight: wrk's latencies hold together.
        ([read_round(4_600, 1.7, 4.2), read_round(4_500, 1.8, 6.0)], '6.00 ms'),
        # 4,500/s at a mean of 20.4 ms would be 92 requests in flight on 8 connections: said so.
        (
            [read_round(4_600, 1.7, 4.2), read_round(4_500, 20.44, 460.9)],
            "460.90 ms (wrk's latencies inconsistent: 92 in flight on 8 connections)",
        ),
    ],
)
def test_wrk_s_p99_is_shown_and_says_when_its_latencies_break_littles_law(
    rounds: list[Measurement], measured: str
) -> None:
    p99 = next(v for v in evaluate([combine(rounds)], None) if v.what == "read by key p99, wrk's")
    assert (p99.target, p99.measured, p99.status) == ('no target', measured, 'INFO')


@pytest.mark.parametrize(
    ('app_p99s', 'measured', 'status'),
    [
        ([4.5, 9.99], '9.99 ms', 'PASS'),  # the worst round's
        ([4.5, 10.01], '10.01 ms', 'FAIL'),
    ],
)
def test_the_read_p99_is_judged_on_the_app_s_own_records_whatever_wrk_saw(
    app_p99s: list[float], measured: str, status: str
) -> None:
    rounds = [read_round(4_600, 1.7, 460.9, app_p99s[0]), read_round(4_500, 1.8, 31.0, app_p99s[1])]
    p99 = next(v for v in evaluate([combine(rounds)], None) if v.what == "read by key p99, the app's own")
    assert (p99.target, p99.measured, p99.status) == ('≤ 10 ms', measured, status)


def test_the_read_p99_without_the_app_s_records_is_not_judged() -> None:
    wrk_only = Measurement('read', 'app direct', 8, 4_600, 1.5, 4.0, 1.7, 9_200, 0, 0)
    p99 = next(v for v in evaluate([wrk_only], None) if v.what == "read by key p99, the app's own")
    assert (p99.measured, p99.status) == ('not measured', 'SKIP')
