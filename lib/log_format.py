"""One log record as one NDJSON line with Elastic Common Schema names, so Kibana needs no mapping work.

Names are ECS (`@timestamp`, `log.level`, `service.name`, ...) written flat with dots; filebeat's
`expand_keys` nests them. A stack trace is a field (`error.stack_trace`), never extra lines.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.core import LogData
from pythonjsonlogger.orjson import OrjsonFormatter

import settings
from lib.log_files import HOSTNAME

ECS_VERSION = '8.11.0'
FIELDS_ATTR = 'ecs'  # `log.info(..., extra={'ecs': {'dbapi.x': 1}})` adds fields under their own names
# Set for the length of a request (by lib.access_log), so every record written meanwhile,
# a traceback included, carries the id that finds the request.
current_request_id: ContextVar[str | None] = ContextVar('dbapi_request_id', default=None)

_second_cache: tuple[int, str] = (-1, '')


def utc_timestamp(created: float) -> str:
    """ISO-8601 in UTC with milliseconds and `Z`, as Elasticsearch's `date` reads it."""
    global _second_cache
    second = int(created)
    cached_second, prefix = _second_cache
    if cached_second != second:  # strftime once a second, not once a record
        prefix = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(second))
        _second_cache = (second, prefix)
    return f'{prefix}.{int((created - second) * 1000):03d}Z'


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
        log_data['@timestamp'] = utc_timestamp(record.created)
        log_data['log.level'] = record.levelname.lower()
        log_data['log.logger'] = record.name
        log_data['message'] = record.message
        log_data.update(self.static_fields)
        log_data['process.pid'] = record.process
        log_data['process.thread.name'] = record.threadName
        request_id = current_request_id.get()
        if request_id is not None:
            log_data['http.request.id'] = request_id
        self._add_error(log_data, record, message_dict)
        for key, value in message_dict.items():  # `log.info({...})`: a dict message's own fields
            if key not in ('exc_info', 'stack_info'):
                log_data[key] = value
        fields = getattr(record, FIELDS_ATTR, None)
        if fields:
            log_data.update(fields)

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
            # orjson refuses lone surrogates (undecodable bytes); the stdlib escapes them. Never lose the line.
            return json.dumps(log_data, default=str, ensure_ascii=True, separators=(',', ':'))
