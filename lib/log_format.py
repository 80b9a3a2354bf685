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
from lib.clock import SecondText
from lib.log_files import HOSTNAME

ECS_VERSION = '8.11.0'
# OrjsonFormatter's options (its jsonify_log_record), with the line's newline added by orjson.
LINE_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
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
