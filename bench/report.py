"""The run written down: JSON for machines, a Markdown table for the README."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.measure import APP_P99, KERNEL_CPU, OTHERS_CPU, Measurement
from bench.targets import Verdict

SCENARIO_NAMES = {
    'foo': 'example/foo (no database)',
    'read': 'read by key',
    'upsert': 'upsert in a transaction',
    'rows': '10,000-row read',
    'batch_read': '100 reads by key in one batch',
    'batch_upsert': '100 upserts in one batch',
    'upsert_keyed': 'upsert with an Idempotency-Key',
}


def callers_note(meta: dict[str, Any]) -> str:
    """How the app authenticated, when through a CALLERS_FILE (`--callers N`)."""
    callers = meta.get('callers', 0)
    return f', a CALLERS_FILE of {callers:,} callers loaded' if callers else ''


def write_json(path: Path, meta: dict[str, Any], results: list[Measurement], verdicts: list[Verdict]) -> None:
    document = {
        'meta': meta,
        'results': [result.as_dict() for result in results],
        'targets': [verdict.as_dict() for verdict in verdicts],
    }
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


def targets_table(verdicts: list[Verdict]) -> list[str]:
    lines = ['| target (8 connections) | wanted | measured | |', '| --- | --- | --- | --- |']
    lines += [f'| {v.what} | {v.target} | {v.measured} | **{v.status}** |' for v in verdicts]
    return lines


def results_table(results: list[Measurement]) -> list[str]:
    lines = [
        '| scenario | series | conns | req/s | actions/s | p50 ms | p99 ms | app p99 ms | errors | non-2xx '
        "| others' CPU (kernel's) |",
        '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for r in results:
        name = SCENARIO_NAMES.get(r.scenario, r.scenario)
        lines.append(
            f'| {name} | {r.series} | {r.connections} | {r.rps:,.0f} | {r.action_rate:,.0f} | {r.p50_ms:.2f} '
            f'| {r.p99_ms:.2f} | {app_p99_cell(r)} | {r.errors} | {r.non2xx} | {others_cell(r)} |'
        )
    return lines


def app_p99_cell(result: Measurement) -> str:
    """The app's own p99 (its access records), for the series that have one."""
    p99 = result.detail.get(APP_P99)
    return '' if p99 is None else f'{p99:.2f}'


def others_cell(result: Measurement) -> str:
    """The shares of the CPU that other processes and the kernel's threads used in the
    measurement's worst round for each."""
    others, kernel = result.detail.get(OTHERS_CPU), result.detail.get(KERNEL_CPU)
    return '' if others is None or kernel is None else f'{others:.1%} ({kernel:.1%})'


def markdown(meta: dict[str, Any], results: list[Measurement], verdicts: list[Verdict]) -> str:
    ordered = sorted(results, key=lambda r: (list(SCENARIO_NAMES).index(r.scenario), r.series, r.connections))
    header = [
        f'Run of {meta["started"]} on {meta["host"]} ({meta["cpus"]} cores), {meta["seconds_per_run"]:g} s per '
        f'measurement in {meta.get("rounds", 1)} alternating rounds, {meta["server"]}; '
        f'whole run {meta["elapsed_s"]:.0f} s. Kernel {meta.get("kernel", "?")}, '
        f'sched_autogroup {AUTOGROUP.get(meta.get("sched_autogroup"), "?")}.' + peer_note(meta),
        '',
    ]
    return '\n'.join(header + targets_table(verdicts) + [''] + results_table(ordered)) + '\n'


def peer_note(meta: dict[str, Any]) -> str:
    """What the FastAPI peer (bench/peer.py) ran on, when it was served."""
    return f' The FastAPI peer: {meta["peer"]}.' if meta.get('peer') else ''


def write_markdown(path: Path, meta: dict[str, Any], results: list[Measurement], verdicts: list[Verdict]) -> None:
    path.write_text(markdown(meta, results, verdicts), encoding='utf-8')


AUTOGROUP = {True: 'on', False: 'off', None: 'absent'}
README_START = '<!-- bench:latest:start -->'
README_END = '<!-- bench:latest:end -->'


def readme_block(meta: dict[str, Any], verdicts: list[Verdict]) -> str:
    lines = [
        README_START,
        f'The latest full run: {meta["server"]}, {meta["seconds_per_run"]:g} s per measurement '
        f'in {meta.get("rounds", 1)} alternating rounds{callers_note(meta)}, on a shared 2-core machine.'
        + peer_note(meta),
        '',
        *targets_table(verdicts),
        '',
        '![throughput against concurrency](bench/results/latest.png)',
        '',
        'Its date and every measurement (1, 8 and 32 connections, p50, p99, errors): '
        '[latest.md](bench/results/latest.md).',
        README_END,
    ]
    return '\n'.join(lines)


def update_readme(path: Path, meta: dict[str, Any], verdicts: list[Verdict]) -> None:
    """Replace the block between the README's bench markers with this run's targets."""
    text = path.read_text(encoding='utf-8')
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f'{path} has no {README_START} ... {README_END} block to update')
    path.write_text(text[:start] + readme_block(meta, verdicts) + text[end + len(README_END) :], encoding='utf-8')
