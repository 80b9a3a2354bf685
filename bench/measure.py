"""One measurement: what a load tool saw for one scenario, one series, one concurrency."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Measurement:
    scenario: str  # foo, read, upsert, rows, batch_read, batch_upsert, upsert_keyed
    series: str  # app direct, app nginx, wsgi hello, wsgi psycopg2, pgbench simple, pgbench prepared... (bench.cli)
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    requests: int
    errors: int  # socket errors, timeouts, failed transactions
    non2xx: int
    detail: dict[str, Any] = field(default_factory=dict)
    actions: int = 1  # actions per request (a batch's steps) or per pgbench transaction

    @property
    def in_flight(self) -> float:
        """Requests in flight on average by Little's law (rate x mean latency): at most the
        connections, with a closed-loop client. More means the tool's latencies are not to be
        trusted for this measurement."""
        return self.rps * self.mean_ms / 1000

    @property
    def action_rate(self) -> float:
        """Actions per second: what a batch's ratio compares, the throughput for one action a request."""
        return self.rps * self.actions

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find(results: list[Measurement], scenario: str, series: str, connections: int) -> Measurement | None:
    for result in results:
        if (result.scenario, result.series, result.connections) == (scenario, series, connections):
            return result
    return None


SUMMED = ('keys_stored', 'replayed')  # counts in `detail` that add up over rounds
# In `detail`: the shares of the machine's CPU that other processes and the kernel's threads used
# during the measurement (bench.machine), 0 to 1, and the p99 of the durations in the app's own
# access records (bench.access_records), in ms. For rounds combined, the worst round's, with every
# round's under the name + '_rounds'.
OTHERS_CPU = 'others_cpu'
KERNEL_CPU = 'kernel_cpu'
APP_P99 = 'app_p99_ms'


def worst_rounds(rounds: list[Measurement]) -> dict[str, Any]:
    worst: dict[str, Any] = {}
    for name in (OTHERS_CPU, KERNEL_CPU, APP_P99):
        if all(name in r.detail for r in rounds):
            each = [r.detail[name] for r in rounds]
            worst |= {name: max(each), f'{name}_rounds': each}
    return worst


def combine(rounds: list[Measurement]) -> Measurement:
    """Rounds of one measurement as one: throughput over all of them, the worst p99, the mean p50."""
    first = rounds[0]
    if len(rounds) == 1:
        return first
    seconds = sum(r.requests / r.rps for r in rounds if r.rps)
    requests = sum(r.requests for r in rounds)
    return Measurement(
        scenario=first.scenario,
        series=first.series,
        connections=first.connections,
        rps=requests / seconds if seconds else 0.0,
        p50_ms=sum(r.p50_ms for r in rounds) / len(rounds),
        p99_ms=max(r.p99_ms for r in rounds),
        mean_ms=sum(r.mean_ms * r.requests for r in rounds) / requests if requests else 0.0,
        requests=requests,
        errors=sum(r.errors for r in rounds),
        non2xx=sum(r.non2xx for r in rounds),
        detail={
            'rounds': [round(r.rps, 1) for r in rounds],
            'in_flight': [round(r.in_flight, 1) for r in rounds],
            **{name: sum(r.detail[name] for r in rounds) for name in SUMMED if all(name in r.detail for r in rounds)},
            **worst_rounds(rounds),
        },
        actions=first.actions,
    )
