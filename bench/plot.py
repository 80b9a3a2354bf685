"""Throughput against concurrency, one panel per scenario, the references drawn dashed."""

from __future__ import annotations

from pathlib import Path

from bench.measure import Measurement
from bench.report import SCENARIO_NAMES
from bench.targets import BARE, NOKEY

REFERENCES = ('wsgi hello', BARE, 'pgbench simple', 'pgbench prepared', 'pgbench json_agg', NOKEY)
COLUMNS = 4  # panels a row


def write_plot(path: Path, results: list[Measurement], title: str) -> None:
    import matplotlib  # imported here: only the plot needs it (requirements-bench.txt)

    matplotlib.use('Agg')
    from matplotlib import pyplot

    scenarios = [name for name in SCENARIO_NAMES if any(r.scenario == name for r in results)]
    columns = min(COLUMNS, len(scenarios))
    rows = -(-len(scenarios) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(4.2 * columns, 4 * rows), squeeze=False)
    panels = [ax for row in axes for ax in row]
    for ax, scenario in zip(panels, scenarios, strict=False):
        draw_panel(ax, [r for r in results if r.scenario == scenario], SCENARIO_NAMES[scenario])
    for ax in panels[len(scenarios) :]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


def draw_panel(ax: object, results: list[Measurement], title: str) -> None:
    for series in sorted({r.series for r in results}, key=lambda s: (s in REFERENCES, s)):
        points = sorted((r.connections, r.action_rate) for r in results if r.series == series)
        style = '--' if series in REFERENCES else '-'
        ax.plot([c for c, _ in points], [v for _, v in points], style, marker='o', label=series)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks([1, 8, 32], labels=['1', '8', '32'])
    ax.set_xlabel('concurrent connections')
    ax.set_ylabel('actions per second (a batch: its steps)')
    ax.set_title(title, fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
