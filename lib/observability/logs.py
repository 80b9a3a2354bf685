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

import base64
import contextlib
import enum
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import orjson

from lib.core import process
from lib.core.config import APP_ID

HOSTNAME = socket.gethostname()
T = TypeVar('T')


class SecondText(Generic[T]):
    """`make(second)`, kept until the second changes: every log line asks for its second's
    timestamp text, thousands of times a second."""

    __slots__ = ('kept', 'make')

    def __init__(self, make: Callable[[int], T], empty: T) -> None:
        self.make = make
        self.kept: tuple[int, T] = (-1, empty)  # one tuple: a reader never sees a second with another's text

    def at(self, second: int) -> T:
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
_second_prefix = SecondText(lambda second: time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second)), '')
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


class EcsFormatter(logging.Formatter):
    """Each record as one ECS JSON object (`format`: the text; `line`: the bytes a file gets).

    The fields, in order: `base_fields`; the error (`error.type`, `error.message`,
    `error.stack_trace`, from the record's exception, cached `exc_text` or stack); a dict
    message's own fields (`log.info({...})`: the message is then ''); the `extra={'ecs': {...}}`
    fields. A later field of the same name replaces an earlier one's value in its place.

    A line of a plain record (a text message, no error, extra fields named apart from the base
    ones: every access record) is put together from pieces kept per second, per logger and
    level, per process and thread; any other record, or a value orjson refuses, is made from
    the whole dict of its fields (`fields`): the same line.
    """

    def __init__(self, fields: Mapping[str, Any]) -> None:
        """`fields`: what every line carries (`static_fields`)."""
        super().__init__()
        self.static_fields = dict(fields)
        self._base_keys = frozenset((*BASE_KEYS, *self.static_fields))
        self._heads: dict[tuple[str, str], bytes] = {}
        self._tails: dict[tuple[Any, Any], bytes] = {}
        try:  # `,"ecs.version":"8.11.0",...`: the static fields' part of every line
            self._static: bytes | None = b''.join(b',' + orjson.dumps({k: v})[1:-1] for k, v in fields.items())
        except TypeError:
            self._static = None  # a static field orjson refuses: every line is made whole

    def format(self, record: logging.LogRecord) -> str:
        return self.line(record)[:-1].decode('utf-8')

    def line(self, record: logging.LogRecord) -> bytes:
        """`format(record)` with its newline, encoded: what a file handler writes."""
        extra = record.__dict__.get(FIELDS_ATTR)
        if (
            isinstance(record.msg, dict)
            or record.exc_info
            or record.exc_text
            or record.stack_info
            or self._static is None
            or (extra and not self._base_keys.isdisjoint(extra))
        ):
            return whole_line(self.fields(record))
        message = record.message = record.getMessage()
        request_id = current_request_id.value
        rest: dict[str, Any] | None = extra
        if request_id is not None:
            rest = {'http.request.id': request_id}
            if extra:
                rest.update(extra)
        try:
            created = record.created
            second = int(created)
            kept_second, prefix = _second_head.kept
            if kept_second != second:
                prefix = _second_head.at(second)
            head = self._heads.get((record.levelname, record.name)) or self._head(record.levelname, record.name)
            tail = self._tails.get((record.process, record.threadName)) or self._tail(record.process, record.threadName)
            millis = _MILLIS_FIELD[int((created - second) * 1000)]
            if not rest:
                return b''.join((prefix, millis, head, orjson.dumps(message), self._static, tail, b'}\n'))
            fields = orjson.dumps(rest)  # `{...}`: its members follow the base ones
            return b''.join((prefix, millis, head, orjson.dumps(message), self._static, tail, b',', fields[1:], b'\n'))
        except TypeError:  # a value orjson refuses
            return whole_line(self.fields(record))

    def _head(self, level: str, logger: str) -> bytes:
        """`,"log.level":"info","log.logger":"dbapi.access","message":`"""
        head = b',"log.level":%b,"log.logger":%b,"message":' % (orjson.dumps(level.lower()), orjson.dumps(logger))
        if len(self._heads) < MAX_KEPT:
            self._heads[level, logger] = head
        return head

    def _tail(self, pid: int | None, thread: str | None) -> bytes:
        """`,"process.pid":1,"process.thread.name":"MainThread"`"""
        tail = b',"process.pid":%b,"process.thread.name":%b' % (orjson.dumps(pid), orjson.dumps(thread))
        if len(self._tails) < MAX_KEPT:
            self._tails[pid, thread] = tail
        return tail

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The record's fields, in the order the line shows them; sets `record.message`."""
        message = record.msg
        if isinstance(message, dict):
            own: dict[Any, Any] | None = message
            record.message = ''
        else:
            own = None
            record.message = record.getMessage()
        fields = self.base_fields(
            record.created, record.levelname, record.name, record.message, record.process, record.threadName
        )
        if own is not None or record.exc_info or record.exc_text or record.stack_info:
            self._add_error_and_own(fields, record, own)
        extra = record.__dict__.get(FIELDS_ATTR)
        if extra:
            fields.update(extra)
        return fields

    def base_fields(
        self, created: float, level: str, logger: str, message: str, pid: int | None, thread: str | None
    ) -> dict[str, Any]:
        """The fields every line starts with, the request id of the current request included.

        `@timestamp` is ISO-8601 in UTC with milliseconds and `Z`, as Elasticsearch's `date`
        reads it (built here, not by a function of its own: this runs for every line)."""
        second = int(created)
        kept_second, prefix = _second_prefix.kept
        if kept_second != second:
            prefix = _second_prefix.at(second)
        fields = {
            '@timestamp': prefix + _MILLIS_SUFFIX[int((created - second) * 1000)],
            'log.level': _LEVELS.get(level) or level.lower(),
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

    def _add_error_and_own(self, fields: dict[str, Any], record: logging.LogRecord, own: dict[Any, Any] | None) -> None:
        """The error fields, then a dict message's own. A dict message's `exc_info` or
        `stack_info` member is the trace in place of the record's."""
        trace = own.get('exc_info') if own else None
        if not trace and record.exc_info:
            trace = self.formatException(record.exc_info)
        if not trace and record.exc_text:
            trace = record.exc_text
        if not trace:
            trace = own.get('stack_info') if own else None
            if not trace and record.stack_info:
                trace = self.formatStack(record.stack_info)
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            fields['error.type'] = type(error).__qualname__
            fields['error.message'] = str(error)
        if trace:
            fields['error.stack_trace'] = trace
        if own:
            for key, value in own.items():
                if key not in ('exc_info', 'stack_info'):
                    fields[key] = value


BASE_KEYS = ('@timestamp', 'log.level', 'log.logger', 'message', 'process.pid', 'process.thread.name')
MAX_KEPT = 1024  # pieces of lines kept per formatter (loggers x levels, processes x threads)
_LEVELS = {name: name.lower() for name in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')}
# `{"@timestamp":"2026-12-05T10:00:00` of a second, and `.000Z"` ... `.999Z"`
_second_head = SecondText(lambda second: b'{"@timestamp":"' + _second_prefix.at(second).encode('ascii'), b'')
_MILLIS_FIELD = tuple(suffix.encode('ascii') + b'"' for suffix in _MILLIS_SUFFIX)


def whole_line(fields: dict[str, Any]) -> bytes:
    """The line of `fields`, made whole by orjson; what orjson refuses, by the stdlib."""
    try:
        return orjson.dumps(fields, default=encodable, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return (ascii_json(fields) + '\n').encode('utf-8')


def encodable(value: Any) -> Any:
    """A value orjson cannot encode, as it is written: an exception as `Type: message`, a
    traceback as its text, bytes in URL-safe base64, an enum by its value(s), a class by its
    name, anything else by `str` (or `repr`)."""
    if isinstance(value, BaseException):
        return f'{type(value).__name__}: {value}'
    if isinstance(value, TracebackType):
        return ''.join(traceback.format_tb(value)).strip()
    if isinstance(value, (bytes, bytearray)):
        return base64.urlsafe_b64encode(value).decode('utf-8')
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, enum.EnumMeta):
        return [member.value for member in value]  # type: ignore[var-annotated]  # EnumMeta iterates Any
    if isinstance(value, type):
        return value.__name__
    for text in (str, repr):
        with contextlib.suppress(Exception):
            return text(value)
    return '__could_not_encode__'


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
        formatter = self.formatter
        try:
            if isinstance(formatter, EcsFormatter):
                line = formatter.line(record)
            else:
                line = (self.format(record) + '\n').encode('utf-8')
        except Exception:  # noqa: BLE001 - a bad record (wrong format args) is logging's usual report
            self.handleError(record)
            return
        self.emit_bytes(line, record.created)

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
            written = os.write(self._fd, line)  # type: ignore[arg-type]
            self._size += written
            if written < len(line):  # a short write (a full disk): the rest, or a torn line
                self._torn = True
                view = memoryview(line)[written:]
                while view:
                    written = os.write(self._fd, view)  # type: ignore[arg-type]
                    self._size += written
                    view = view[written:]
                self._torn = False
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
