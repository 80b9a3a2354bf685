"""Where the log lines go, for the app's processes and gunicorn's master alike.

- JSON files, always: one per process under LOG_DIR, ECS lines (lib.observability.logs).
- The same JSON lines on stdout with LOG_STDOUT=1, for a Docker log driver.
- A readable console on stderr when LOG_FORMAT=console (the default in `local`).

`setup_logging` runs in every process that serves (each gunicorn worker, from `create_app`);
lib.server.gunicorn_logging gives gunicorn's master the same handlers through `make_handler`.
`python -m lib.observability.logging_setup --retention` is the start script's retention step;
rotation runs it as well, so a long-lived replica cannot fill the volume.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections import Counter
from typing import Any

from lib.core.config import APP_ID, ConfigError, LogSettings, environment, parse_logging
from lib.observability.logs import EcsFormatter, ProcessFileHandler, delete_old_logs, static_fields

CONSOLE_FORMAT = '%(asctime)s %(levelname)-7s %(name)s: %(message)s'
ACCESS_LOGGER = 'dbapi.access'
TAG = '_dbapi_options'  # set on every handler made here: which settings made it
HANDLER_KINDS = ('file', 'stdout', 'console')


def make_handler(kind: str, log: LogSettings, environment: str, process_id: str) -> logging.Handler:
    """One handler of `kind` (`file`, `stdout`, `console`); also gunicorn's dictConfig factory."""
    if kind == 'file':
        handler: logging.Handler = ProcessFileHandler(
            log.log_dir,
            APP_ID,
            log.max_bytes,
            log.backup_count,
            retention_days=log.retention_days,
            spill=not log.stdout_json,
        )
        handler.setFormatter(EcsFormatter(static_fields(environment, process_id)))
    elif kind == 'stdout':
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(EcsFormatter(static_fields(environment, process_id)))
    elif kind == 'console':
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    else:
        raise ValueError(f'unknown log handler kind {kind!r} (known: {", ".join(HANDLER_KINDS)})')
    setattr(handler, TAG, (log, environment, process_id, kind))
    return handler


def _set_levels(log: LogSettings) -> None:
    logging.getLogger().setLevel(log.level)
    # One access record per request whatever LOG_LEVEL says: it is the answer operators look for.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    logging.getLogger('werkzeug').setLevel(logging.WARNING)  # its access lines would double ours


_lock = threading.Lock()


def log_settings(**overrides: Any) -> LogSettings:
    """The LOG_* settings of the environment, with `overrides` by LogSettings field (tests)."""
    raw = environment()
    return parse_logging(raw, raw['ENVIRONMENT'], overrides)


def setup_logging(log: LogSettings, environment: str, process_id: str = APP_ID) -> LogSettings:
    """Configure the root logger (`create_app` passes its Config's settings). Idempotent: when the
    root already has the handlers these settings make (a gunicorn worker inherits its master's),
    they are kept, with their state."""
    tags = [(log, environment, process_id, kind) for kind in log.kinds()]
    with _lock:
        root = logging.getLogger()
        current = [handler for handler in root.handlers if hasattr(handler, TAG)]
        if Counter(getattr(handler, TAG) for handler in current) != Counter(tags):
            for handler in current:
                root.removeHandler(handler)
                handler.close()
            for kind in log.kinds():
                root.addHandler(make_handler(kind, log, environment, process_id))
        _set_levels(log)
    return log


def main(argv: list[str] | None = None) -> int:
    try:
        raw = environment()
        log = parse_logging(raw, raw['ENVIRONMENT'])  # only the logs' settings: the rest may be wrong
    except ConfigError as error:
        sys.stderr.write(f'dbapi: configuration error: {error}\n')
        return 3
    parser = argparse.ArgumentParser(description='dbapi log maintenance')
    parser.add_argument('--retention', action='store_true', help='delete log files older than LOG_RETENTION_DAYS')
    parser.add_argument('--log-dir', default=log.log_dir)
    parser.add_argument('--days', type=float, default=log.retention_days)
    args = parser.parse_args(argv)
    if not args.retention:
        parser.print_help()
        return 2
    try:
        deleted = delete_old_logs(args.log_dir, APP_ID, args.days)
    except OSError as error:
        # The start script goes on: a missing or unreadable log directory must not stop the service.
        sys.stderr.write(f'dbapi: log retention in {args.log_dir}: {error}\n')
        return 0
    for path in deleted:
        print(f'deleted {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
