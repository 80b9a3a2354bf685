"""Throughput against concurrency, one panel per scenario, the references drawn dashed."""

from __future__ import annotations

from pathlib import Path

from bench.measure import Measurement
from bench.report import SCENARIO_NAMES
from bench.targets import BARE

REFERENCES = ('wsgi hello', BARE, 'pgbench simple', 'pgbench prepared', 'pgbench json_agg')


def write_plot(path: Path, results: list[Measurement], title: str) -> None:
    import matplotlib  # imported here: only the plot needs it (requirements-bench.txt)

    matplotlib.use('Agg')
    from matplotlib import pyplot

    scenarios = [name for name in SCENARIO_NAMES if any(r.scenario == name for r in results)]
    figure, axes = pyplot.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        draw_panel(ax, [r for r in results if r.scenario == scenario], SCENARIO_NAMES[scenario])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


def draw_panel(ax: object, results: list[Measurement], title: str) -> None:
    for series in sorted({r.series for r in results}, key=lambda s: (s in REFERENCES, s)):
        points = sorted((r.connections, r.rps) for r in results if r.series == series)
        style = '--' if series in REFERENCES else '-'
        ax.plot([c for c, _ in points], [v for _, v in points], style, marker='o', label=series)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks([1, 8, 32], labels=['1', '8', '32'])
    ax.set_xlabel('concurrent connections')
    ax.set_ylabel('answers per second')
    ax.set_title(title, fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
