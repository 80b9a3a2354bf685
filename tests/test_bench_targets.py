"""How the benchmark prints a ratio next to its target."""

from __future__ import annotations

import pytest

from bench.measure import Measurement
from bench.targets import BARE, NOMETRICS, evaluate, shown


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
    floor = figures['bare WSGI + psycopg2 read (no framework)']
    assert floor.measured == '0.15x (6,000 / 40,000 /s)'
    assert figures['read by key, app / bare read'].measured == '0.75x (4,500 / 6,000 /s)'
    # The targets themselves are judged as before: the floor never replaces the reference.
    direct = next(v for v in verdicts if v.what == 'read by key, direct')
    assert (direct.measured, direct.status) == ('0.11x (4,500 / 40,000 /s)', 'FAIL')


def test_no_bare_read_no_figures() -> None:
    verdicts = evaluate(reads(**{'pgbench simple': 40_000, 'app direct': 4_500}), None)
    assert not [v for v in verdicts if 'bare' in v.what]


def test_upsert_is_judged_against_pgbench_and_foo_is_only_shown() -> None:
    results = [
        Measurement('upsert', 'app direct', 8, 2_000, 1.0, 2.0, 1.0, 2_000, 0, 0),
        Measurement('upsert', 'pgbench simple', 8, 6_000, 1.0, 2.0, 1.0, 6_000, 0, 0),
        Measurement('foo', 'app direct', 8, 5_000, 1.0, 2.0, 1.0, 5_000, 0, 0),
        Measurement('foo', 'wsgi hello', 8, 20_000, 1.0, 2.0, 1.0, 20_000, 0, 0),
    ]
    verdicts = {v.what: v for v in evaluate(results, None)}
    upsert = verdicts['upsert in a transaction, direct']
    assert (upsert.target, upsert.measured, upsert.status) == ('≥ 0.4x', '0.33x (2,000 / 6,000 /s)', 'FAIL')
    foo = verdicts['example/foo vs WSGI hello']
    assert (foo.measured, foo.status) == ('0.25x (5,000 / 20,000 /s)', 'INFO')


def test_the_metrics_cost_is_the_read_with_them_against_the_same_read_without() -> None:
    results = reads(**{'app direct': 4_700, NOMETRICS: 5_000})
    verdicts = {v.what: v for v in evaluate(results, None)}
    cost = verdicts['metrics cost: read with metrics vs without']
    assert (cost.target, cost.measured, cost.status) == ('≥ 0.95x', '0.94x (4,700 / 5,000 /s)', 'FAIL')
    assert not [v for v in verdicts.values() if 'nometrics' in v.what]  # not taken for a candidate server
