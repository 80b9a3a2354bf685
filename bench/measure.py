"""One measurement: what a load tool saw for one scenario, one series, one concurrency."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Measurement:
    scenario: str  # foo, read, upsert, rows
    series: str  # app direct, app nginx, wsgi hello, pgbench simple, pgbench prepared, pgbench json_agg
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    requests: int
    errors: int  # socket errors, timeouts, failed transactions
    non2xx: int
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find(results: list[Measurement], scenario: str, series: str, connections: int) -> Measurement | None:
    for result in results:
        if (result.scenario, result.series, result.connections) == (scenario, series, connections):
            return result
    return None
