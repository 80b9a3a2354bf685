"""How a log line is made and written: ECS JSON lines, one file per process.

A record becomes one NDJSON line with Elastic Common Schema names (`@timestamp`, `log.level`,
`service.name`, ...) written flat with dots (filebeat's `expand_keys` nests them); a stack trace is
a field (`error.stack_trace`), never extra lines. Every line written while a request is served
carries its id (`http.request.id`).

Several processes appending to and rotating one file lose and shuffle lines (Python's logging
cookbook says so), so every process writes its own `<prefix>-<host>-<pid>-<random>.log`. Each
record is one `write()` on an O_APPEND descriptor: no buffer can hold half a line, and a line is
never split between two writes unless the disk fills up mid-line (the next line then starts on a
fresh line, so only that one record is damaged). A failure to write (full disk, unwritable
directory) is reported once on stderr; the record goes to stderr instead (which Docker keeps) and
the request goes on. Opening is retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pythonjsonlogger.core import LogData
from pythonjsonlogger.orjson import OrjsonFormatter

from lib.core import process
from lib.core.config import APP_ID

HOSTNAME = socket.gethostname()


class SecondText:
    """`make(second)`, kept until the second changes: every log line asks for its second's
    timestamp text, thousands of times a second."""

    __slots__ = ('kept', 'make')

    def __init__(self, make: Callable[[int], str]) -> None:
        self.make = make
        self.kept: tuple[int, str] = (-1, '')  # one tuple: a reader never sees a second with another's text

    def at(self, second: int) -> str:
        kept_second, text = self.kept
        if kept_second != second:
            text = self.make(second)
            self.kept = (second, text)
        return text


ECS_VERSION = '8.11.0'
FIELDS_ATTR = 'ecs'  # `log.info(..., extra={'ecs': {'dbapi.x': 1}})` adds fields under their own names


class RequestIdSlot(threading.local):
    """The id of the request this thread is serving, set by lib.access_log for its length, so
    every record written meanwhile, a traceback included, carries the id that finds the request.

    Not a ContextVar: the id is cleared when a request's answer ends, which can be in a
    finalizer run by the garbage collector (an answer dropped unread), and a ContextVar set
    from inside a collection that began in another ContextVar set corrupts CPython < 3.12's
    context (cpython#148891; it crashed the test process here with a segfault).
    """

    # Read and set as a plain attribute: every log line reads it, every request sets it.
    value: str | None = None

    def clear(self, request_id: str) -> None:
        """Forget `request_id`, unless this thread has moved on to another request meanwhile."""
        if self.value == request_id:
            self.value = None


current_request_id = RequestIdSlot()


# strftime once a second, not once a record
_second_prefix = SecondText(lambda second: time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second)))
# `.000Z` ... `.999Z`, looked up rather than formatted for every line
_MILLIS_SUFFIX = tuple(f'.{millis:03d}Z' for millis in range(1000))


def static_fields(environment: str, process_id: str) -> dict[str, Any]:
    """The fields every line of this process carries (`app` and `index_name`: filebeat's routing)."""
    return {
        'ecs.version': ECS_VERSION,
        'service.name': APP_ID,
        'service.environment': environment,
        'host.hostname': HOSTNAME,
        'app': f'{APP_ID}.{process_id}',
        'index_name': f'{APP_ID}_{environment}',
    }


class EcsFormatter(OrjsonFormatter):
    """python-json-logger's orjson formatter, with the fields laid out as ECS."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        """`fields`: what every line carries (`static_fields`)."""
        super().__init__(static_fields=dict(fields))

    def add_fields(self, log_data: LogData, record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data.update(
            self.base_fields(
                record.created, record.levelname, record.name, record.message, record.process, record.threadName
            )
        )
        self._add_error(log_data, record, message_dict)
        for key, value in message_dict.items():  # `log.info({...})`: a dict message's own fields
            if key not in ('exc_info', 'stack_info'):
                log_data[key] = value
        fields = getattr(record, FIELDS_ATTR, None)
        if fields:
            log_data.update(fields)

    def base_fields(
        self, created: float, level: str, logger: str, message: str, pid: int | None, thread: str | None
    ) -> dict[str, Any]:
        """The fields every line starts with, the request id of the current request included.

        `@timestamp` is ISO-8601 in UTC with milliseconds and `Z`, as Elasticsearch's `date`
        reads it (built here, not by a function of its own: this runs for every line)."""
        second = int(created)
        fields = {
            '@timestamp': _second_prefix.at(second) + _MILLIS_SUFFIX[int((created - second) * 1000)],
            'log.level': level.lower(),
            'log.logger': logger,
            'message': message,
            **self.static_fields,
            'process.pid': pid,
            'process.thread.name': thread,
        }
        request_id = current_request_id.value
        if request_id is not None:
            fields['http.request.id'] = request_id
        return fields

    @staticmethod
    def _add_error(log_data: LogData, record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            log_data['error.type'] = type(error).__qualname__
            log_data['error.message'] = str(error)
        trace = message_dict.get('exc_info') or message_dict.get('stack_info')
        if trace:
            log_data['error.stack_trace'] = trace

    def jsonify_log_record(self, log_data: LogData) -> str:
        try:
            return super().jsonify_log_record(log_data)
        except TypeError:
            return ascii_json(log_data)


def ascii_json(log_data: Mapping[str, Any]) -> str:
    """The line orjson refused: it refuses lone surrogates (undecodable bytes), the stdlib
    escapes them. Never lose the line."""
    return json.dumps(log_data, default=str, ensure_ascii=True, separators=(',', ':'))


OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
FILE_MODE = 0o644
# How often a process checks that its file still exists (deleted by hand or by retention).
RECHECK_SECONDS = 1.0
# After a failure, how long before opening the file is tried again (one syscall, not one per record).
RETRY_SECONDS = 1.0
SECONDS_PER_DAY = 86400


def log_files(directory: str | Path, prefix: str) -> list[Path]:
    """Every file of this service in `directory`, rotated ones included."""
    return sorted(Path(directory).glob(f'{prefix}-*.log*'))


def delete_old_logs(directory: str | Path, prefix: str, days: float) -> list[Path]:
    """The retention step: delete this service's log files not written to for `days` days."""
    limit = time.time() - days * SECONDS_PER_DAY
    deleted = []
    for path in log_files(directory, prefix):
        with contextlib.suppress(FileNotFoundError):  # another process rotated or deleted it first
            if path.stat().st_mtime < limit:
                path.unlink()
                deleted.append(path)
    return deleted


class ProcessFileHandler(logging.Handler):
    """Writes to `<directory>/<prefix>-<host>-<pid>-<random>.log`, rotated at `max_bytes`.

    The pid is read at every record, so a handler inherited across a fork (gunicorn's master
    configures logging before it forks) writes to the child's own file, never the parent's.
    """

    def __init__(
        self,
        directory: str,
        prefix: str,
        max_bytes: int,
        backup_count: int,
        retention_days: float | None = None,
        spill: bool = True,
    ) -> None:
        super().__init__()
        self.directory = directory
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.retention_days = retention_days
        self.spill = spill  # lines that cannot be written go to stderr (off when stdout has them)
        self.path = ''
        self.rotations = 0
        self._fd: int | None = None
        self._pid = 0
        self._size = 0
        self._checked_at = 0.0
        self._failed_at = 0.0
        self._torn = False  # a write stopped mid-line: the next record starts a new line
        self._reported = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record (wrong format args) is logging's usual report
            self.handleError(record)
            return
        self.emit_line(text, record.created)

    def emit_line(self, text: str, created: float) -> None:
        """Write one formatted line (the caller holds `self.lock`, as `Handler.handle` does)."""
        self.emit_bytes((text + '\n').encode('utf-8'), created)

    def emit_bytes(self, line: bytes, now: float) -> None:
        """Write one line already encoded, its newline included (the caller holds `self.lock`).

        One function, not a `try` around a helper: it runs for every access record."""
        try:
            if self._pid != process.pid or self._fd is None:
                if self._fd is None and now - self._failed_at < RETRY_SECONDS:
                    raise OSError(f'{self.path or self.directory}: still failing, retried every {RETRY_SECONDS:g} s')
                self._open()
            elif now - self._checked_at >= RECHECK_SECONDS:
                self._recheck(now)
            if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            if self._torn:
                line = b'\n' + line
                self._torn = False
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)  # type: ignore[arg-type]
                self._size += written
                view = view[written:]
                self._torn = bool(view)
        except OSError as error:
            self._failed(error, line)

    def close(self) -> None:
        self.acquire()
        try:
            self._close_file()
        finally:
            self.release()
        super().close()

    def _open(self) -> None:
        if self._pid != process.pid:
            # The parent's descriptor is closed here only; the parent keeps its own.
            self._close_file()
            self._pid = process.pid
            # Containers number their pids alike, and a fixed `hostname:` would make replicas
            # collide on a shared volume: a random part keeps every process's file its own.
            self.path = os.path.join(self.directory, f'{self.prefix}-{HOSTNAME}-{self._pid}-{secrets.token_hex(3)}.log')
            self._retention()
        os.makedirs(self.directory, exist_ok=True)
        self._fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
        self._size = os.fstat(self._fd).st_size
        self._checked_at = time.time()

    def _recheck(self, now: float) -> None:
        """Reopen when the file was deleted under us, instead of writing into a lost inode."""
        self._checked_at = now
        if os.fstat(self._fd).st_nlink == 0:  # type: ignore[arg-type]
            self._close_file()
            self._open()

    def _rotate(self) -> None:
        """`.log` -> `.log.1` -> ... -> `.log.<backup_count>`; the oldest is replaced."""
        if self.backup_count <= 0:
            return  # like the standard handler: no backups, no rotation
        self._close_file()
        for index in range(self.backup_count - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f'{self.path}.{index}', f'{self.path}.{index + 1}')
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, f'{self.path}.1')
        self.rotations += 1
        self._open()
        self._retention()

    def _retention(self) -> None:
        if self.retention_days is None:
            return
        with contextlib.suppress(OSError):
            delete_old_logs(self.directory, self.prefix, self.retention_days)

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _failed(self, error: OSError, line: bytes) -> None:
        """Report once, keep the line on stderr, and never raise into the request."""
        self._close_file()
        self._failed_at = time.time()
        if not self._reported:
            self._reported = True
            where = self.path or self.directory
            instead = 'its lines go to stderr' if self.spill else 'its lines are dropped'
            _to_stderr(f'dbapi: cannot write logs to {where}: {error}; {instead} until it works again\n')
        if self.spill:
            _to_stderr(line.decode('utf-8'))


def _to_stderr(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr itself may be gone
        sys.stderr.write(text)
        sys.stderr.flush()
