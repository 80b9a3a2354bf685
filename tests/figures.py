"""The reliability suite's figures, recorded by the tests and printed as one line at the end.

`tests/conftest.py` prints `summary_line()` from pytest's terminal summary; a part that did
not run says so in the line instead of showing a made-up number.
"""

from __future__ import annotations

from typing import Any

FAULTS = (
    'pg-restart-under-load',
    'pg-down-at-start',
    'backends-terminated',
    'statement-timeout',
    'pool-exhausted',
    'write-then-fail-and-sigkill',
    'sigterm-graceful',
    'no-leaks',
)

survived: set[str] = set()
bad_inputs = {'cases': 0, '5xx': 0}
soak: dict[str, Any] = {}
exactly_once: dict[str, int] = {}


def fault_survived(name: str) -> None:
    if name not in FAULTS:
        raise ValueError(f'unknown fault {name!r} (known: {", ".join(FAULTS)})')
    survived.add(name)


def count_bad_input(status: int) -> None:
    bad_inputs['cases'] += 1
    if status >= 500:
        bad_inputs['5xx'] += 1


def record_soak(seconds: float, requests: int, errors: int, lost: int, rss_growth: float) -> None:
    soak.update(seconds=seconds, requests=requests, errors=errors, lost=lost, rss_growth=rss_growth)


def record_exactly_once(writes: int, keyed_doubled: int, keyed_lost: int, doubled: int, lost: int) -> None:
    """tests/test_exactly_once.py: `writes` appends sent at least once through faults, with keys
    (`keyed_*`) and without; how many ran twice or more (doubled) and not at all (lost)."""
    exactly_once.update(writes=writes, keyed_doubled=keyed_doubled, keyed_lost=keyed_lost, doubled=doubled, lost=lost)


def exactly_once_part() -> str:
    return (
        f'retried writes {exactly_once["writes"]:,} with Idempotency-Key (doubled: {exactly_once["keyed_doubled"]},'
        f' lost: {exactly_once["keyed_lost"]}), without (doubled: {exactly_once["doubled"]},'
        f' lost: {exactly_once["lost"]})'
    )


def summary_line() -> str | None:
    """The one line, or None when no part of the reliability suite ran."""
    if not survived and not bad_inputs['cases'] and not soak and not exactly_once:
        return None
    parts = [
        f'faults survived {len(survived)}/{len(FAULTS)}',
        f'bad inputs {bad_inputs["cases"]:,} (5xx: {bad_inputs["5xx"]})',
    ]
    if soak:
        parts.append(
            f'soak {soak["seconds"]:.0f} s {soak["requests"]:,} requests '
            f'(errors: {soak["errors"]}, lost: {soak["lost"]})'
        )
        parts.append(f'rss growth {soak["rss_growth"]:.0%}')
    else:
        parts.append('soak not run')
    if exactly_once:
        parts.append(exactly_once_part())
    return ', '.join(parts)
