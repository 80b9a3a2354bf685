"""Logging for ELK: where the lines go, for the app's processes and gunicorn's master alike.

- JSON files, always: one per process under LOG_DIR (`lib.log_files`), ECS lines (`lib.log_format`).
- The same JSON lines on stdout with LOG_STDOUT=1, for a Docker log driver.
- A readable console on stderr when LOG_FORMAT=console (the default in `local`).

`setup_logging` runs in every process that serves (each gunicorn worker, from `create_app`);
`gunicorn_logconfig` gives gunicorn's master the same handlers, so its own lines (boot, worker
timeouts) are JSON in its own file too. `python -m lib.logger --retention` is the start
script's retention step; rotation runs it as well, so a long-lived replica cannot fill the volume.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from gunicorn import glogging

import settings
from lib.config import ConfigError, parse_flag, parse_float, parse_int
from lib.log_files import ProcessFileHandler, delete_old_logs
from lib.log_format import EcsFormatter

CONSOLE_FORMAT = '%(asctime)s %(levelname)-7s %(name)s: %(message)s'
ACCESS_LOGGER = 'dbapi.access'
TAG = '_dbapi_options'  # set on every handler made here: which options made it
HANDLER_KINDS = ('file', 'stdout', 'console')
MIN_LOG_BYTES = 4096


@dataclass(frozen=True, slots=True)
class LogOptions:
    log_dir: str
    level: str
    console: bool
    stdout_json: bool
    max_bytes: int
    backup_count: int
    retention_days: float

    def kinds(self) -> list[str]:
        return ['file'] + ['stdout'] * self.stdout_json + ['console'] * self.console


def log_options(**overrides: Any) -> LogOptions:
    """The settings, with whatever the caller (a test) overrides, checked: errors name the setting."""
    raw: dict[str, Any] = {
        'log_dir': settings.LOG_DIR,
        'level': settings.LOG_LEVEL,
        'console': settings.LOG_FORMAT == 'console',
        'stdout_json': parse_flag(settings.LOG_STDOUT),
        'max_bytes': settings.LOG_MAX_BYTES,
        'backup_count': settings.LOG_BACKUP_COUNT,
        'retention_days': settings.LOG_RETENTION_DAYS,
    }
    unknown = set(overrides) - set(raw)
    if unknown:
        raise TypeError(f'unknown logging options: {", ".join(sorted(unknown))}')
    raw.update({key: value for key, value in overrides.items() if value is not None})
    level = str(raw['level']).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f'LOG_LEVEL={raw["level"]!r} is not a logging level')
    return LogOptions(
        log_dir=str(raw['log_dir']),
        level=level,
        console=bool(raw['console']),
        stdout_json=bool(raw['stdout_json']),
        # A file must rotate and old ones must go, or one busy replica can fill the shared volume.
        max_bytes=parse_int('LOG_MAX_BYTES', raw['max_bytes'], minimum=MIN_LOG_BYTES),
        backup_count=parse_int('LOG_BACKUP_COUNT', raw['backup_count'], minimum=1),
        retention_days=parse_float('LOG_RETENTION_DAYS', raw['retention_days'], minimum=0.01, inclusive=True),
    )


def make_handler(kind: str, **overrides: Any) -> logging.Handler:
    """One handler of `kind` (`file`, `stdout`, `console`); also gunicorn's dictConfig factory."""
    options = log_options(**overrides)
    if kind == 'file':
        handler: logging.Handler = ProcessFileHandler(
            options.log_dir,
            settings.APP_ID,
            options.max_bytes,
            options.backup_count,
            retention_days=options.retention_days,
            spill=not options.stdout_json,
        )
        handler.setFormatter(EcsFormatter())
    elif kind == 'stdout':
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(EcsFormatter())
    elif kind == 'console':
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    else:
        raise ValueError(f'unknown log handler kind {kind!r} (known: {", ".join(HANDLER_KINDS)})')
    setattr(handler, TAG, (options, kind))
    return handler


def _set_levels(options: LogOptions) -> None:
    logging.getLogger().setLevel(options.level)
    # One access record per request whatever LOG_LEVEL says: it is the answer operators look for.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    logging.getLogger('werkzeug').setLevel(logging.WARNING)  # its access lines would double ours


_lock = threading.Lock()


def setup_logging(**overrides: Any) -> LogOptions:
    """Configure the root logger. Idempotent: when the root already has the handlers these
    options make (a gunicorn worker inherits its master's), they are kept, with their state."""
    options = log_options(**overrides)
    wanted = Counter((options, kind) for kind in options.kinds())
    with _lock:
        root = logging.getLogger()
        current = [handler for handler in root.handlers if hasattr(handler, TAG)]
        if Counter(getattr(handler, TAG) for handler in current) != wanted:
            for handler in current:
                root.removeHandler(handler)
                handler.close()
            for kind in options.kinds():
                root.addHandler(make_handler(kind, **asdict(options)))
        _set_levels(options)
    return options


def gunicorn_logconfig() -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: its master's and workers' own lines go through our handlers.

    gunicorn's loggers keep no handler of their own and propagate to the root, so each process
    writes one file; gunicorn's access log stays off (the app writes one record per request).
    """
    options = log_options()
    kinds = options.kinds()
    return {
        'version': 1,
        'disable_existing_loggers': False,
        'formatters': {},
        'handlers': {kind: {'()': 'lib.logger.make_handler', 'kind': kind} for kind in kinds},
        'root': {'level': options.level, 'handlers': kinds},
        'loggers': {
            'gunicorn.error': {'handlers': [], 'propagate': True},
            'gunicorn.access': {'handlers': [], 'propagate': False},
        },
    }


class GunicornLogger(glogging.Logger):
    """gunicorn's logger, without its access log: the app writes one record per request itself
    (lib/access_log.py), so gunicorn's `access()` (the documented hook of a logger class) does
    nothing, and builds nothing, for every request."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='dbapi log maintenance')
    parser.add_argument('--retention', action='store_true', help='delete log files older than LOG_RETENTION_DAYS')
    parser.add_argument('--log-dir', default=settings.LOG_DIR)
    parser.add_argument('--days', type=float, default=float(settings.LOG_RETENTION_DAYS))
    args = parser.parse_args(argv)
    if not args.retention:
        parser.print_help()
        return 2
    try:
        deleted = delete_old_logs(args.log_dir, settings.APP_ID, args.days)
    except OSError as error:
        # The start script goes on: a missing or unreadable log directory must not stop the service.
        sys.stderr.write(f'dbapi: log retention in {args.log_dir}: {error}\n')
        return 0
    for path in deleted:
        print(f'deleted {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
