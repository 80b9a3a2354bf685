"""gunicorn's configuration (read by `gunicorn -c gunicorn.conf.py app:app`).

Every value comes from the one configuration object (lib.core.config: the environment over
env/<ENVIRONMENT>/.env), read once here; the defaults are the production ones. A wrong setting
stops the master with one line before it binds or forks (and `on_starting` checks the database
connection budget), instead of every worker crash-looping.
"""

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# gunicorn has put the repository on sys.path before reading this file.
import settings
from lib.core.config import ConfigError, load

try:
    # Not named `config`: gunicorn reads every module name that is one of its settings.
    dbapi = load(settings.MODULES)
except ConfigError as error:
    sys.stderr.write(f'dbapi: configuration error: {error}\n')
    sys.exit(3)

# Prometheus (lib/observability/metrics.py): the workers of one replica write their values to files
# in one directory, named here, before any worker imports prometheus_client. The default is a
# directory of this master's own under the system temp dir (a container's own /tmp), never under
# LOG_DIR: that volume is shared by every replica on a node, and each master empties its directory at start.
METRICS_DIR_DEFAULT = os.path.join(tempfile.gettempdir(), f'dbapi-metrics-{os.getpid()}')
if not dbapi.server.metrics_dir:
    os.environ['PROMETHEUS_MULTIPROC_DIR'] = METRICS_DIR_DEFAULT  # read by prometheus_client, and by load()
metrics_dir = dbapi.server.metrics_dir or METRICS_DIR_DEFAULT

_server = dbapi.server
bind = _server.bind
workers = _server.workers
# The project's worker (lib/server/gunicorn_worker.py, the adapter to gunicorn): one thread serving
# kept-alive connections with gunicorn's parser and request cycle, plus what gunicorn lacks: on
# SIGTERM it stops listening at once, so nginx tries another replica instead of sending a POST
# into a queue that is reset (stock sync and gthread both lost requests when a replica stopped
# under load), and a body the app refused is read to its end so the client gets the answer.
# gthread (WORKER_CLASS=gthread) is the stock alternative; the sync worker closes every
# connection. nginx buffers requests and responses and keeps its upstream connections alive,
# so slow clients never hold a worker.
worker_class = _server.worker_class
threads = _server.threads  # gthread only; POOL_SIZE should be >= threads
timeout = _server.timeout  # above STATEMENT_TIMEOUT (30 s): the database gives up first
# SIGTERM: stop accepting, let in-flight requests finish for up to this long, then exit.
# The stack's stop_grace_period must be longer.
graceful_timeout = _server.graceful_timeout
keepalive = _server.keepalive  # idle seconds; above nginx's upstream keepalive_timeout (2 s)
# At or above nginx's limits (large_client_header_buffers 4 8k): nginx refuses oversized
# requests first, with a JSON problem, instead of gunicorn with a plain-text page.
limit_request_line = 8190  # gunicorn's maximum
limit_request_field_size = 8190
limit_request_fields = 32768  # gunicorn's maximum: nginx's 32 KiB of header buffers bounds the count
max_requests = _server.max_requests
max_requests_jitter = _server.max_requests_jitter  # workers do not all recycle at once
# The app, and so its database pools, is loaded in each worker after the fork: never shared.
preload_app = False
accesslog = None  # the app writes one JSON access record per request itself
errorlog = '-'
loglevel = _server.log_level
# gunicorn's own lines (master and workers) go through the app's handlers: ECS JSON in the same
# per-process files (lib/observability/logging_setup.py).
from lib.server.gunicorn_logging import gunicorn_logconfig  # noqa: E402

logconfig_dict = gunicorn_logconfig(dbapi)
logger_class = 'lib.server.gunicorn_logging.GunicornLogger'  # no per-request work for gunicorn's access log
proc_name = dbapi.replica_id or 'dbapi'


def empty_metrics_dir() -> None:
    """Start the replica's counts from zero: files left by an earlier run would be added in."""
    directory = Path(metrics_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob('*.db'):
        path.unlink()


def on_starting(server: Any) -> None:
    """Check the settings and the database connection budget, apply the migrations when
    MIGRATE_ON_START=1, and empty the metrics directory, before binding or forking."""
    from lib.db.migrations import MigrationError
    from lib.server.startup import check_master

    try:
        budgets = check_master(dbapi, workers)
    except ConfigError as error:
        sys.stderr.write(f'dbapi: configuration error: {error}\n')
        sys.stderr.flush()
        sys.exit(3)
    except MigrationError as error:  # MIGRATE_ON_START=1
        sys.stderr.write(f'dbapi: migration failed: {error}\n')
        sys.stderr.flush()
        sys.exit(3)
    for budget in budgets:
        if budget.usable is None:
            server.log.warning('connection budget of %s not checked: %s', budget.server, budget.error)
        else:
            server.log.info(
                'connection budget of %s: %d of %d connections', budget.server, budget.needed, budget.usable
            )
    empty_metrics_dir()


# The project's own code: what SIGHUP reloads (scripts/devloop.py sends it when a file changes).
PROJECT_PACKAGES = frozenset({'app', 'settings', 'lib', 'modules'})


def project_modules() -> dict[str, Any]:
    return {name: module for name, module in sys.modules.items() if name.split('.')[0] in PROJECT_PACKAGES}


def metrics_of(modules: dict[str, Any]) -> list[Any]:
    """The Prometheus metrics these modules define: each registered once in the default registry,
    so a module imported again must not find its earlier self there."""
    from prometheus_client import Counter, Enum, Gauge, Histogram, Info, Summary

    kinds = (Counter, Enum, Gauge, Histogram, Info, Summary)
    found = {
        id(value): value for module in modules.values() for value in vars(module).values() if isinstance(value, kinds)
    }
    return list(found.values())


def unregister(metrics: list[Any]) -> None:
    from prometheus_client import REGISTRY

    for metric in metrics:
        with contextlib.suppress(KeyError):  # never registered (a module that failed half way)
            REGISTRY.unregister(metric)


def import_project() -> None:
    """Import app, settings and every module of MODULES in the master (no app is created, no
    connection opened): the workers forked next inherit this code instead of reading the files
    while they boot, so a file saved broken meanwhile cannot stop the server."""
    import importlib

    importlib.invalidate_caches()  # a new module's directory is seen at once
    fresh_settings = importlib.import_module('settings')
    importlib.import_module('app')
    for name in fresh_settings.MODULES:
        importlib.import_module(name)


def when_ready(server: Any) -> None:
    """Local development (scripts/serve.sh reloads on every change): the first workers inherit
    the code too. Elsewhere each worker imports it after the fork, as before."""
    if dbapi.environment == 'local':
        try:
            import_project()
        except Exception as error:  # noqa: BLE001 - the workers will say it, each with its traceback
            server.log.error('the code does not import: %s: %s', type(error).__name__, error)


def on_reload(server: Any) -> None:
    """SIGHUP, before the new workers are forked: the master imports the project's code as it is
    now, and every new worker inherits it. When it does not import, the master keeps the modules
    it had and the new workers run the code from before."""
    previous = project_modules()
    previous_metrics = metrics_of(previous)
    unregister(previous_metrics)
    for name in previous:
        del sys.modules[name]
    try:
        import_project()
    except Exception as error:  # noqa: BLE001 - any import error: the code from before stays
        from prometheus_client import REGISTRY

        failed = project_modules()
        unregister(metrics_of(failed))
        for name in failed:
            del sys.modules[name]
        sys.modules.update(previous)
        for metric in previous_metrics:
            REGISTRY.register(metric)
        server.log.error(
            'reload: the code does not import (%s: %s): the new workers run the code from before',
            type(error).__name__,
            error,
        )


def post_worker_init(worker: Any) -> None:
    from lib.server.startup import announce_worker_ready

    announce_worker_ready(worker)


def worker_exit(server: Any, worker: Any) -> None:
    """Write this worker's last counts to its metric files; close its pools so PostgreSQL sees
    its sessions end instead of dropping."""
    extensions = getattr(getattr(worker, 'wsgi', None), 'extensions', None)
    if not extensions:
        return  # the app never loaded
    from lib.db.connections import POOLS_KEY
    from lib.web.flask_app import METRICS_KEY

    metrics = extensions.get(METRICS_KEY)
    if metrics is not None:
        metrics.flush()
    pools = extensions.get(POOLS_KEY)
    if pools is not None:
        pools.close()


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone (recycled, killed): its pool gauges leave the replica's sums; its counts
    stay in its files, so the replica's totals keep them."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]  # untyped in prometheus_client


def on_exit(server: Any) -> None:
    """Remove the default metrics directory: nothing reads it once the replica is gone."""
    if metrics_dir == METRICS_DIR_DEFAULT:
        shutil.rmtree(METRICS_DIR_DEFAULT, ignore_errors=True)
