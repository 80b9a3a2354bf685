"""The metrics step: Prometheus series of every request, of the pools and of the database errors,
and what `GET /metrics` (lib.web.infrastructure) serves for the whole replica.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before anything imports
prometheus_client: each worker then writes its values to files of its own in that directory,
and a scrape of any worker reads every file, so it answers the replica's totals, the counts of
workers since recycled included. Without that directory (`flask run`, the tests' in-process
apps) the values live in this one process.

Labels are bounded: `module` and `action` are a registered action's names or "" (an unknown
path or action is never counted under the name a client sent), `status` is a status code,
`caller` a configured caller's name, `database` a configured database's name.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from lib.core import process
from lib.core.config import Config, project_version
from lib.core.record import RequestRecord

BATCH = 'batch'  # the module name of POST /batch in the series
SAMPLE_SECONDS = 1.0  # how often each process writes its counts, durations and pools' state
NO_SQLSTATE = 'none'  # the connection itself failed: libpq gives no SQLSTATE

REQUESTS = Counter(
    'dbapi_requests_total',
    'Requests answered, by action, status and caller (module and action are "" for an unknown path)',
    ['module', 'action', 'status', 'caller'],
)
# dbapi_request_duration_seconds, a histogram at every scrape, is kept by each worker in plain
# numbers and written every SAMPLE_SECONDS as two gauges of cumulative per-worker values ('sum'
# across every worker that ever lived, as a counter is), which `Exposition` turns back into the
# histogram: prometheus_client's Histogram writes two values to the worker's file per request.
DURATION = 'dbapi_request_duration_seconds'
DURATION_HELP = "Seconds from a request's arrival in the app to its answer handed to the server"
DURATION_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_LE = (*(str(bound) for bound in DURATION_BOUNDS), '+Inf')
DURATION_BUCKETS_NAME = 'dbapi_request_duration_worker_buckets'
DURATION_SUM_NAME = 'dbapi_request_duration_worker_seconds'
DURATION_BUCKETS = Gauge(
    DURATION_BUCKETS_NAME,
    f'Stored {DURATION}_bucket of each worker (Exposition shows the histogram)',
    ['module', 'action', 'le'],
    multiprocess_mode='sum',
)
DURATION_SUM = Gauge(
    DURATION_SUM_NAME,
    f'Stored {DURATION}_sum of each worker (Exposition shows the histogram)',
    ['module', 'action'],
    multiprocess_mode='sum',
)
POOL_CONNECTIONS = Gauge(
    'dbapi_pool_connections',
    "Open connections of the live workers' pools, idle or in use",
    ['database', 'state'],
    multiprocess_mode='livesum',
)
POOL_SIZE = Gauge(
    'dbapi_pool_size', "Connections the live workers' pools may open in all", ['database'], multiprocess_mode='livesum'
)
POOL_WAIT = Histogram(
    'dbapi_pool_wait_seconds',
    'Seconds a checkout waited for a free connection; only checkouts that found every connection in use',
    ['database'],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
POOL_TIMEOUTS = Counter(
    'dbapi_pool_timeouts_total', 'Checkouts that got no connection within POOL_TIMEOUT (answered 503)', ['database']
)
DB_ERRORS = Counter(
    'dbapi_db_errors_total',
    'Database errors answered, by SQLSTATE class ("none": the connection failed, no SQLSTATE)',
    ['database', 'sqlstate_class'],
)
REPLAYS = Counter(
    'dbapi_idempotent_replays_total',
    'Answers replayed for a repeated Idempotency-Key, the action not run again (batch: module "batch")',
    ['module', 'action'],
)
BATCH_STEPS = Histogram(
    'dbapi_batch_steps',
    'Steps per POST /batch, for the batches whose steps were all checked',
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
BATCH_ACTIONS = Counter(
    'dbapi_batch_actions_total',
    "Steps of batches, by action and the batch's status (every step, run or rolled back, shares it)",
    ['module', 'action', 'status'],
)
BUILD_INFO = Gauge('dbapi_build_info', 'The running version (pyproject.toml)', ['version'], multiprocess_mode='livemax')

RequestLabels = tuple[str, str, int, str]  # module, action, status, caller
# The duration buckets' bounds in integer nanoseconds: the number of durations <= a bound is the
# count of its bucket (`le` is inclusive), found without converting a duration to seconds.
DURATION_BOUNDS_NS = tuple(round(bound * 1e9) for bound in DURATION_BOUNDS)


class Tally:
    """One (module, action)'s requests in this process.

    A request only appends to `durations` and `keys` (list.append is atomic: no lock on the
    request's path); flush() takes what was appended, counts it, and adds it to the totals.
    """

    __slots__ = ('action', 'buckets', 'durations', 'keys', 'module', 'nanoseconds')

    def __init__(self, module: str, action: str) -> None:
        self.module = module
        self.action = action
        self.durations: list[int] = []  # nanoseconds of each request not yet flushed
        self.keys: list[tuple[int, str | None]] = []  # (status, caller) of each, 0 and None as given
        # Since the process started, what DURATION_BUCKETS and DURATION_SUM hold once flushed:
        # requests at or under each bound (cumulative, the last one +Inf) and their nanoseconds.
        self.buckets = [0] * len(DURATION_LE)
        self.nanoseconds = 0


# The process's tallies, whichever of its apps counted or flushes them (the series are the
# process's too): (module, action) -> Tally, bounded as the labels are. FLUSH_LOCK makes one
# flush at a time: a flush takes its items from the front of the lists, requests append at the end.
TALLIES: dict[tuple[str, str], Tally] = {}
FLUSH_LOCK = threading.Lock()
LIVE_METRICS: weakref.WeakSet[Metrics] = weakref.WeakSet()


def tally_of(module: str, action: str) -> Tally:
    return TALLIES.setdefault((module, action), Tally(module, action))


def taken(items: list[Any]) -> list[Any]:
    """The items appended so far, removed from `items`; appends made meanwhile stay."""
    count = len(items)
    first = items[:count]
    del items[:count]
    return first


def forget_after_fork() -> None:
    """In a forked child: its files start empty, so do its totals; its parent's unflushed
    requests are the parent's. Each app finds its tallies again, and its first request starts
    the child's sampler (Metrics.record)."""
    global FLUSH_LOCK
    FLUSH_LOCK = threading.Lock()  # a parent's thread may have held it
    TALLIES.clear()
    for metrics in LIVE_METRICS:
        metrics.tallies.clear()  # in place: MeteredRecords holds it
        metrics.sample_lock = threading.Lock()


os.register_at_fork(after_in_child=forget_after_fork)


PoolStats = Callable[[], Mapping[str, Mapping[str, int]]]  # database -> open, idle, max


class Metrics:
    """One app's metrics step and the pools' reports (a pool observer); the series are the process's own."""

    def __init__(self, config: Config, pool_stats: PoolStats, extra: Sequence[Collector] = ()) -> None:
        """`pool_stats`: this process's pools' state by database, sampled every SAMPLE_SECONDS;
        `extra`: collectors a scrape reads too."""
        self.pool_stats = pool_stats
        # prometheus_client chose its storage when it was imported, from the same directory.
        self.multiprocess = bool(config.server.metrics_dir)
        # module -> action -> its tally, for the registered actions requested in this process:
        # what labels() gives a request whose record names both, found without building labels.
        self.tallies: dict[str | None, dict[str | None, Tally]] = {}
        self.sampled: dict[str, tuple[int, int, int]] = {}  # database -> (idle, in use, size) last written
        self.sample_lock = threading.Lock()
        self.sampler_pid = 0
        self.lock = threading.Lock()
        self.extra = extra  # collectors read at scrape time (the outbox's, lib.events.metrics)
        LIVE_METRICS.add(self)
        BUILD_INFO.labels(project_version()).set(1)
        for database in config.databases:  # every series present from the start, at 0
            POOL_TIMEOUTS.labels(database)
            POOL_WAIT.labels(database)
            POOL_SIZE.labels(database).set(config.pool_size)
            for state in ('idle', 'in_use'):
                POOL_CONNECTIONS.labels(database, state).set(0)

    def record(self, record: RequestRecord, duration_ns: int) -> None:
        """The metrics of one finished request, whatever answered it. MeteredRecords.write
        calls it for the requests it does not count itself: a database error, the first
        request of an action in this process, or one without a registered action. It caches
        a registered action's tally for MeteredRecords, and the first request of a process
        starts its sampler."""
        if self.sampler_pid != process.pid:
            self.start_sampler()
        if record.database_error is not None:
            self.database_error(record.database or '', record.database_error)
        status = record.status or 500
        if record.replayed:
            REPLAYS.labels(record.module or '', record.action or '').inc()
        if record.module == BATCH:
            self.batch(record, status)
        labels = self.labels(record, status)
        if labels is None:
            return
        module, action, _, caller = labels
        tally = tally_of(module, action)
        if action and record.module == module and action == record.action:
            self.tallies.setdefault(module, {})[action] = tally
        tally.durations.append(duration_ns)
        tally.keys.append((status, caller))

    def flush(self) -> None:
        """Write what this process counted since the last flush to its series: every app's,
        whichever flushes (every SAMPLE_SECONDS from the sampler, before a scrape, at exit)."""
        with FLUSH_LOCK:
            for tally in list(TALLIES.values()):
                if not tally.keys:
                    continue
                keys, durations = taken(tally.keys), taken(tally.durations)
                module, action = tally.module, tally.action
                for (status, caller), count in collections.Counter(keys).items():
                    REQUESTS.labels(module, action, str(status or 500), caller or '').inc(count)
                durations.sort()
                for index, bound in enumerate(DURATION_BOUNDS_NS):
                    tally.buckets[index] += bisect_right(durations, bound)  # durations <= bound
                tally.buckets[-1] += len(durations)
                tally.nanoseconds += sum(durations)
                for le, cumulative in zip(DURATION_LE, tally.buckets, strict=True):
                    DURATION_BUCKETS.labels(module, action, le).set(cumulative)
                DURATION_SUM.labels(module, action).set(tally.nanoseconds / 1e9)

    def batch(self, record: RequestRecord, status: int) -> None:
        """A batch's size and its steps' actions, once all its steps were checked (a replayed
        batch ran none)."""
        if record.steps is None or record.replayed:
            return
        BATCH_STEPS.observe(len(record.steps))
        for name in record.steps:
            module, _, action = name.partition('/')
            BATCH_ACTIONS.labels(module, action, str(status)).inc()

    def labels(self, record: RequestRecord, status: int) -> RequestLabels | None:
        """The request's labels; None for what Flask answered other than a 404 (health, /metrics,
        the docs): those are the infrastructure's requests, not the API's. A batch is module
        `batch`, action `""`; a path that names no registered action is `""`, `""`."""
        caller = record.caller or ''
        module, action = record.module, record.action
        if module is None:
            return ('', '', status, caller) if status == 404 else None
        if module == BATCH:
            return (BATCH, '', status, caller)
        if action is None:
            return ('', '', status, caller)
        return (module, action, status, caller)

    def database_error(self, database: str, error: Exception) -> None:
        """A database error answered (the pool's own timeouts are counted by `timed_out`)."""
        code = getattr(error, 'pgcode', None) or ''
        DB_ERRORS.labels(database, code[:2] or NO_SQLSTATE).inc()

    def waited(self, pool: str, seconds: float) -> None:
        POOL_WAIT.labels(pool).observe(seconds)

    def timed_out(self, pool: str) -> None:
        POOL_TIMEOUTS.labels(pool).inc()

    def sample_pools(self) -> None:
        """Write this process's pools' state, where it changed since the last time (one sample
        at a time: the sampler's cannot overwrite a scrape's newer one)."""
        with self.sample_lock:
            for name, stats in self.pool_stats().items():
                sample = (stats['idle'], stats['open'] - stats['idle'], stats['max'])
                if self.sampled.get(name) == sample:
                    continue
                self.sampled[name] = sample
                POOL_CONNECTIONS.labels(name, 'idle').set(sample[0])
                POOL_CONNECTIONS.labels(name, 'in_use').set(sample[1])
                POOL_SIZE.labels(name).set(sample[2])

    def start_sampler(self) -> None:
        """Each process flushes its requests and writes its pools' state every SAMPLE_SECONDS
        from a thread of its own: a scrape is answered by one worker, which cannot read the
        others' pools, and what requests append waits for a flush."""
        with self.lock:
            if self.sampler_pid == process.pid:
                return
            self.sampler_pid = process.pid
            self.sampled = {}  # a new process: its files start empty
        thread = threading.Thread(target=sample_every, args=(weakref.ref(self),), name='dbapi-metrics', daemon=True)
        thread.start()


def sample_every(ref: weakref.ref[Metrics]) -> None:
    """Flush and sample until the metrics are gone (their app dropped) or the process ends."""
    while True:
        time.sleep(SAMPLE_SECONDS)
        metrics = ref()
        if metrics is None:
            return
        metrics.flush()
        metrics.sample_pools()
        del metrics


def replica_pids() -> list[int]:
    """The gunicorn master (this worker's parent) and every child of it: the replica's processes."""
    master = os.getppid()
    pids = [master]
    for entry in os.scandir('/proc'):
        if not entry.name.isdigit():
            continue
        try:
            with open(f'/proc/{entry.name}/stat', 'rb') as stat:
                parent = int(stat.read().rsplit(b')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if parent == master:
            pids.append(int(entry.name))
    return pids


def constant(pid: int) -> Callable[[], int]:
    return lambda: pid


class ReplicaProcesses(Collector):
    """`process_*` of each of the replica's processes, labelled `pid`. A worker's own process
    collector would describe whichever worker answered the scrape, a different one each time."""

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in replica_pids():
            for family in ProcessCollector(pid=constant(pid), registry=None).collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, 'pid': str(pid)}, sample.value)
        return families.values()


class Exposition(Collector):
    """`source`'s families, with the stored duration gauges shown as the histogram they hold,
    then those of `extra` (read at scrape time)."""

    def __init__(self, source: Collector, *extra: Collector) -> None:
        self.source = source
        self.extra = extra

    def collect(self) -> Iterable[Metric]:
        buckets: dict[tuple[str, str], list[tuple[str, float]]] = {}
        sums: dict[tuple[str, str], float] = {}
        for family in self.source.collect():
            if family.name == DURATION_BUCKETS_NAME:
                for sample in family.samples:
                    key = (sample.labels['module'], sample.labels['action'])
                    buckets.setdefault(key, []).append((sample.labels['le'], sample.value))
            elif family.name == DURATION_SUM_NAME:
                for sample in family.samples:
                    sums[(sample.labels['module'], sample.labels['action'])] = sample.value
            else:
                yield family
        histogram = HistogramMetricFamily(DURATION, DURATION_HELP, labels=['module', 'action'])
        for key, by_le in buckets.items():
            ordered = sorted(by_le, key=lambda bucket: float(bucket[0]))
            histogram.add_metric(list(key), ordered, sums.get(key, 0.0))
        yield histogram
        for collector in self.extra:
            yield from collector.collect()


def scrape_registry(multiprocess: bool, *extra: Collector) -> Collector:
    """What a scrape answers: in multiprocess mode, every worker's files, the replica's processes
    and the Python version; otherwise this process's registry (with its process collector); then
    `extra`."""
    if not multiprocess:
        return Exposition(REGISTRY, *extra)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client leaves it untyped
    PlatformCollector(registry=registry)
    registry.register(ReplicaProcesses())
    return Exposition(registry, *extra)


def scrape(metrics: Metrics, accept: str) -> tuple[bytes, str]:
    """The replica's series, in Prometheus' text format or OpenMetrics as `accept` asks, with
    their content type: this process's latest counts and pools first."""
    metrics.flush()
    metrics.sample_pools()
    encoder, content_type = choose_encoder(accept)
    return encoder(scrape_registry(metrics.multiprocess, *metrics.extra)), content_type
