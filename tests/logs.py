"""Reading what the service wrote: every line of every log file, parsed, with the checks all log tests share."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

TIMESTAMP = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z')
LEVELS = {'debug', 'info', 'warning', 'error', 'critical'}
# Every line: field -> type.
BASE_FIELDS: dict[str, type | tuple[type, ...]] = {
    '@timestamp': str,
    'log.level': str,
    'log.logger': str,
    'message': str,
    'ecs.version': str,
    'service.name': str,
    'service.environment': str,
    'process.pid': int,
    'process.thread.name': str,
    'host.hostname': str,
    'app': str,
    'index_name': str,
}
# Every access record, on top of the base fields (None: the field is there, and null).
ACCESS_FIELDS: dict[str, type | tuple[type, ...]] = {
    'event.dataset': str,
    'event.duration': int,
    'event.outcome': str,
    'duration_ms': float,
    'http.request.id': str,
    'http.request.method': str,
    'url.path': str,
    'dbapi.module': (str, type(None)),
    'dbapi.action': (str, type(None)),
    'dbapi.caller': (str, type(None)),
    'http.response.status_code': int,
    'http.response.body.bytes': int,
    'client.ip': (str, type(None)),
    'user_agent.original': (str, type(None)),
}
ERROR_FIELDS = {'error.type': str, 'error.message': str, 'error.stack_trace': str}


def log_paths(log_dir: str | Path, pattern: str = 'dbapi-*.log*') -> list[Path]:
    return sorted(Path(log_dir).glob(pattern))


def read_lines(log_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of every file, parsed; a line that is not one JSON object fails the test."""
    records = []
    for path in log_paths(log_dir):
        data = path.read_bytes()
        assert not data or data.endswith(b'\n'), f'{path.name}: the last line is cut: {data[-200:]!r}'
        for number, line in enumerate(data.decode('utf-8').split('\n')[:-1], 1):
            try:
                record = json.loads(line)
            except ValueError as error:
                raise AssertionError(f'{path.name}:{number} is not JSON ({error}): {line[:300]!r}') from None
            assert isinstance(record, dict), f'{path.name}:{number} is not an object: {line[:300]!r}'
            records.append(record)
    return records


def access_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in records if record.get('log.logger') == 'dbapi.access']


def check_types(record: dict[str, Any], fields: dict[str, type | tuple[type, ...]]) -> None:
    for name, kind in fields.items():
        assert name in record, f'{name} missing from {record}'
        value = record[name]
        # bool is an int in Python; a JSON true where a number belongs is still wrong
        assert isinstance(value, kind) and not isinstance(value, bool), f'{name}={value!r} is not {kind}: {record}'


def check_line(record: dict[str, Any], environment: str = 'testing') -> None:
    """The fields every line carries, with their types and values."""
    check_types(record, BASE_FIELDS)
    assert TIMESTAMP.fullmatch(record['@timestamp']), record['@timestamp']
    assert record['log.level'] in LEVELS, record
    assert record['service.name'] == 'dbapi'
    assert record['service.environment'] == environment
    assert record['index_name'] == f'dbapi_{environment}'
    assert record['app'].startswith('dbapi.')
    assert record['ecs.version'].count('.') == 2
    if record['log.logger'] == 'dbapi.access':
        check_types(record, ACCESS_FIELDS)
        assert record['event.duration'] >= 0
        assert abs(record['duration_ms'] - record['event.duration'] / 1e6) < 0.001
        assert record['event.dataset'] == 'dbapi.access'
    if 'error.stack_trace' in record:
        check_types(record, ERROR_FIELDS)
