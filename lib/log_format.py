"""One log record as one NDJSON line with Elastic Common Schema names, so Kibana needs no mapping work.

Names are ECS (`@timestamp`, `log.level`, `service.name`, ...) written flat with dots; filebeat's
`expand_keys` nests them. A stack trace is a field (`error.stack_trace`), never extra lines.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import orjson
from pythonjsonlogger.core import LogData
from pythonjsonlogger.orjson import OrjsonFormatter

import settings
from lib import process
from lib.clock import SecondText
from lib.log_files import HOSTNAME, ProcessFileHandler

ECS_VERSION = '8.11.0'
# OrjsonFormatter's options (its jsonify_log_record), with the line's newline added by orjson.
LINE_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
FIELDS_ATTR = 'ecs'  # `log.info(..., extra={'ecs': {'dbapi.x': 1}})` adds fields under their own names
# The names of the levels lines are written at, as named when this module loads
# (`logging.getLevelName` is a Python call a line); any other level is looked up.
LEVEL_NAMES = {level: logging.getLevelName(level) for level in (logging.INFO, logging.WARNING, logging.ERROR)}


class RequestIdSlot(threading.local):
    """The id of the request this thread is serving, set by lib.access_log for its length, so
    every record written meanwhile, a traceback included, carries the id that finds the request.

    Not a ContextVar: the id is cleared when a request's answer ends, which can be in a
    finalizer run by the garbage collector (an answer dropped unread), and a ContextVar set
    from inside a collection that began in another ContextVar set corrupts CPython < 3.12's
    context (cpython#148891; it crashed the test process here with a segfault).
    """

    # Read and set as a plain attribute (a C-level access on a thread-local, where a method is a
    # Python call): every log line reads it, every request sets it.
    value: str | None = None

    def clear(self, request_id: str) -> None:
        """Forget `request_id`, unless this thread has moved on to another request meanwhile."""
        if self.value == request_id:
            self.value = None


current_request_id = RequestIdSlot()


class ThreadName(threading.local):
    """This thread's name, read once per thread (`threading.local` runs `__init__` in each
    thread at its first use): `threading.current_thread().name` was two Python calls on every
    access record. A thread renamed after its first line keeps its first name in later lines;
    nothing here renames threads (gunicorn's workers serve from their main thread)."""

    def __init__(self) -> None:
        self.name = threading.current_thread().name


thread_name = ThreadName()

# strftime once a second, not once a record
_second_prefix = SecondText(lambda second: time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second)))
# `.000Z` ... `.999Z`, looked up: formatting the milliseconds was a third of a line's base fields
_MILLIS_SUFFIX = tuple(f'.{millis:03d}Z' for millis in range(1000))


def static_fields() -> dict[str, Any]:
    """The fields every line of this process carries."""
    return {
        'ecs.version': ECS_VERSION,
        'service.name': settings.APP_ID,
        'service.environment': settings.ENVIRONMENT,
        'host.hostname': HOSTNAME,
        'app': settings.ELK_APP,
        'index_name': settings.ELK_INDEX,
    }


class EcsFormatter(OrjsonFormatter):
    """python-json-logger's orjson formatter, with the fields laid out as ECS."""

    def __init__(self, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__(static_fields=dict(static_fields() if fields is None else fields))

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
        request_id = current_request_id.value  # the attribute, not get(): a Python call a line
        if request_id is not None:
            fields['http.request.id'] = request_id
        return fields

    def format_fields(self, created: float, level: str, logger: str, message: str, fields: Mapping[str, Any]) -> bytes:
        """The line `format()` makes of a record with no exception and `fields` as its `ecs` extra,
        encoded and with its newline, without a LogRecord (the access record's hot path,
        `log_fields` below): orjson's bytes go to the file as they are."""
        log_data = self.base_fields(created, level, logger, message, process.pid, thread_name.name)
        log_data.update(fields)
        try:
            return orjson.dumps(log_data, default=self.json_default, option=LINE_OPTIONS)
        except TypeError:
            return (ascii_json(log_data) + '\n').encode('utf-8')

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


def log_fields(logger: logging.Logger, level: int, message: str, fields: dict[str, Any]) -> None:
    """`logger.log(level, message, extra={'ecs': fields})`, cheaper when it can be.

    When every handler the record would reach is a log file writing these ECS lines, the line is
    made and written without a LogRecord and logging's dispatch (a third of an access record's
    cost); any other handler (stdout, console, a test's capture) gets the usual record.
    """
    handlers = ecs_file_handlers(logger, level)
    if not handlers:
        record = logger.makeRecord(logger.name, level, __file__, 0, message, (), None, extra={FIELDS_ATTR: fields})
        logger.handle(record)
        return
    created = time.time()
    level_name = LEVEL_NAMES.get(level) or logging.getLevelName(level)
    for handler in handlers:
        line = handler.formatter.format_fields(created, level_name, logger.name, message, fields)  # type: ignore[union-attr]
        with handler.lock:  # type: ignore[union-attr]
            handler.emit_bytes(line, created)


def ecs_file_handlers(logger: logging.Logger, level: int) -> list[ProcessFileHandler] | None:
    """The handlers `Logger.handle` would call for a record at `level`, if all are ECS log files."""
    if logger.disabled or logger.filters:
        return None
    found: list[ProcessFileHandler] = []
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level < handler.level:
                continue
            if type(handler) is not ProcessFileHandler or handler.filters:
                return None
            if type(handler.formatter) is not EcsFormatter:
                return None
            found.append(handler)
        current = current.parent if current.propagate else None
    return found
