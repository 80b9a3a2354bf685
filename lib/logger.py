"""Logging for ELK: one NDJSON line per record, Elastic Common Schema names, a file per process.

Several processes appending to and rotating one file lose and shuffle lines (Python's
logging cookbook says so), so every process writes its own file, named with the host and
pid, and rotates it by size. Filebeat reads them all. A logging failure (a full disk, an
unwritable directory) is reported once on stderr and never breaks a request.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import orjson
from pythonjsonlogger.orjson import OrjsonFormatter

import settings

ECS_VERSION = '8.11.0'
FIELDS_ATTR = 'ecs'  # `extra={'ecs': {...}}`: dotted ECS names added to the line as they are
CONSOLE_FORMAT = '%(asctime)s %(levelname)-7s %(name)s: %(message)s'
HOSTNAME = socket.gethostname()


def utc_timestamp(created: float) -> str:
    """ISO-8601, UTC, milliseconds and `Z`, as Elasticsearch's date type expects."""
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.strftime('%Y-%m-%dT%H:%M:%S.') + f'{moment.microsecond // 1000:03d}Z'


class EcsFormatter(OrjsonFormatter):
    """A log record as one line of ECS fields; exceptions go in `error.*`, never across lines."""

    def __init__(self, static_fields: Mapping[str, Any]) -> None:
        super().__init__(static_fields=dict(static_fields))

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            '@timestamp': utc_timestamp(record.created),
            'log.level': record.levelname.lower(),
            'log.logger': record.name,
            'message': record.getMessage(),
            **self.static_fields,
            'process.pid': record.process,
            'process.thread.name': record.threadName,
        }
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line['error.type'] = type(error).__qualname__
            line['error.message'] = str(error)
            line['error.stack_trace'] = self.formatException(record.exc_info)
        fields = getattr(record, FIELDS_ATTR, None)
        if fields:
            line.update(fields)
        return orjson.dumps(line, default=str).decode('utf-8')


class ProcessFileHandler(RotatingFileHandler):
    """A size-rotated file of this process's own: `<dir>/<app>-<host>-<pid>.log`.

    The file name is taken at the first record a process writes, so a handler inherited
    across a fork (gunicorn's preload) opens a new file in the child instead of sharing one.
    """

    def __init__(self, directory: str, prefix: str, max_bytes: int, backup_count: int) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self._pid = os.getpid()
        self._reported = False
        super().__init__(self._path(), maxBytes=max_bytes, backupCount=backup_count, encoding='utf-8', delay=True)

    def _path(self) -> str:
        return str(self.directory / f'{self.prefix}-{HOSTNAME}-{os.getpid()}.log')

    def emit(self, record: logging.LogRecord) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self.stream = None  # the parent's stream stays open in the parent, not here
            self.baseFilename = os.path.abspath(self._path())
            self.createLock()
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """Report once; the request that logged must not notice."""
        if self._reported:
            return
        self._reported = True
        error = sys.exc_info()[1]
        with contextlib.suppress(OSError, ValueError):  # stderr itself may be gone
            sys.stderr.write(f'dbapi: cannot write logs to {self.baseFilename}: {error}; going on without them\n')


def static_fields() -> dict[str, Any]:
    return {
        'ecs.version': ECS_VERSION,
        'service.name': settings.APP_ID,
        'service.environment': settings.ENVIRONMENT,
        'host.hostname': HOSTNAME,
        'app': settings.ELK_APP,
        'index_name': settings.ELK_INDEX,
    }


def _flag(value: str) -> bool:
    return str(value).strip().lower() in {'1', 'true', 'yes', 'on'}


_configured_lock = threading.Lock()
_configured: tuple[Any, ...] | None = None


def setup_logging(
    log_dir: str | None = None,
    level: str | None = None,
    console: bool | None = None,
    stdout_json: bool | None = None,
    max_bytes: int | None = None,
    backup_count: int | None = None,
) -> None:
    """Configure the root logger once per set of arguments (idempotent: app factories call it)."""
    global _configured
    log_dir = log_dir or settings.LOG_DIR
    level = (level or settings.LOG_LEVEL).upper()
    console = settings.LOG_FORMAT == 'console' if console is None else console
    stdout_json = _flag(settings.LOG_STDOUT) if stdout_json is None else stdout_json
    max_bytes = int(settings.LOG_MAX_BYTES) if max_bytes is None else max_bytes
    backup_count = int(settings.LOG_BACKUP_COUNT) if backup_count is None else backup_count
    key = (log_dir, level, console, stdout_json, max_bytes, backup_count)
    with _configured_lock:
        if _configured == key:
            return
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, '_dbapi', False):
                root.removeHandler(handler)
                handler.close()
        formatter = EcsFormatter(static_fields())
        handlers: list[logging.Handler] = []
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            handlers.append(ProcessFileHandler(log_dir, settings.APP_ID, max_bytes, backup_count))
        except OSError as error:
            sys.stderr.write(f'dbapi: cannot use LOG_DIR={log_dir!r}: {error}; JSON log files are off\n')
        if stdout_json:
            handlers.append(logging.StreamHandler(sys.stdout))
        for handler in handlers:
            handler.setFormatter(formatter)
        if console:
            readable = logging.StreamHandler(sys.stderr)
            readable.setFormatter(logging.Formatter(CONSOLE_FORMAT))
            handlers.append(readable)
        for handler in handlers:
            handler._dbapi = True  # type: ignore[attr-defined]
            root.addHandler(handler)
        root.setLevel(level)
        # werkzeug's own access lines would double ours
        logging.getLogger('werkzeug').setLevel(logging.WARNING)
        _configured = key


def log_files(log_dir: str) -> list[Path]:
    return sorted(Path(log_dir).glob(f'{settings.APP_ID}-*.log*'))


def delete_old_logs(log_dir: str, days: float) -> list[Path]:
    """The retention step: delete this service's log files not written for `days` days."""
    limit = time.time() - days * 86400
    deleted = []
    for path in log_files(log_dir):
        try:
            if path.stat().st_mtime < limit:
                path.unlink()
                deleted.append(path)
        except FileNotFoundError:
            continue
    return deleted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='dbapi log maintenance')
    parser.add_argument('--retention', action='store_true', help='delete log files older than LOG_RETENTION_DAYS')
    parser.add_argument('--log-dir', default=settings.LOG_DIR)
    parser.add_argument('--days', type=float, default=float(settings.LOG_RETENTION_DAYS))
    args = parser.parse_args(argv)
    if args.retention:
        for path in delete_old_logs(args.log_dir, args.days):
            print(f'deleted {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
