"""bench.access_records: the durations the app's own access records give for a measurement."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.access_records import AccessRecords
from bench.measure import APP_P99, Measurement, combine
from bench.report import app_p99_cell
from bench.targets import p99_target


def record(duration_ms: float, dataset: str = 'dbapi.access') -> bytes:
    """A log line as lib.log_format writes one, with what the reader looks at."""
    fields = {'@timestamp': '2026-11-29T17:00:00.000Z', 'event.dataset': dataset, 'event.duration': duration_ms * 1e6}
    return json.dumps(fields).encode() + b'\n'


def append(path: Path, data: bytes) -> None:
    with path.open('ab') as file:
        file.write(data)


def test_a_read_returns_what_was_written_since_the_skip(tmp_path: Path) -> None:
    log = tmp_path / 'dbapi-vm-1234-abc.log'
    append(log, record(1.0) + record(2.0))  # before the measurement
    records = AccessRecords(tmp_path)
    records.skip()
    append(log, record(155.3) + record(9.0, dataset='dbapi.app') + record(3.5))  # an app line is no record
    newer = record(7.25)
    append(log, newer[:20])  # a record still being written
    assert records.durations_ms() == [3.5, 155.3]
    append(log, newer[20:])
    assert records.durations_ms() == [7.25]
    assert records.durations_ms() == []


def test_a_file_is_followed_through_its_rotation_and_a_new_one_read_whole(tmp_path: Path) -> None:
    log = tmp_path / 'dbapi-vm-1234-abc.log'
    append(log, record(1.0))
    records = AccessRecords(tmp_path)
    records.skip()
    append(log, record(4.0))
    os.replace(log, f'{log}.1')  # lib.log_files rotates by renaming
    append(log, record(6.0))
    append(tmp_path / 'dbapi-vm-5678-def.log', record(5.0))  # a worker started meanwhile
    append(tmp_path / 'other-vm-1-x.log', record(99.0))  # not this service's
    assert records.durations_ms() == [4.0, 5.0, 6.0]


def measured(p99_ms: float, app_p99_ms: float) -> Measurement:
    return Measurement('read', 'app direct', 8, 1000.0, 1.0, p99_ms, 8.0, 1000, 0, 0, {APP_P99: app_p99_ms})


def test_the_p99_line_judges_the_app_s_worst_round_whatever_wrk_saw() -> None:
    combined = combine([measured(12.0, 4.5), measured(31.0, 6.25)])
    assert (combined.detail[APP_P99], combined.detail[APP_P99 + '_rounds']) == (6.25, [4.5, 6.25])
    verdict = p99_target([combined])
    assert (verdict.measured, verdict.status) == ('6.25 ms', 'PASS')
    assert app_p99_cell(combined) == '6.25'
