"""The engine's shape (docs/architecture.md): one keyed action request runs code in few files of
lib/, the 0.1 import paths still work with a warning, and the public face is what modules use."""

from __future__ import annotations

import re
import sys
import uuid
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder

import lib
from tests.conftest import AUTH

LIB = Path(lib.__file__).resolve().parent
MOST_FILES = 12  # issue 29: one keyed action request runs code in at most this many files of lib/


def files_run(app: Flask, path: str, body: Any, headers: dict[str, str]) -> tuple[int, set[str]]:
    """The status of one request, and every file of lib/ whose code ran while the app served it
    (the WSGI call and the reading of its answer; the environ is built before)."""
    seen: set[str] = set()
    environ = EnvironBuilder(path=path, method='POST', data=orjson.dumps(body), headers=headers).get_environ()
    environ['CONTENT_TYPE'] = 'application/json'
    statuses: list[str] = []

    def profile(frame: FrameType, event: str, _: Any) -> None:
        if event == 'call':
            filename = frame.f_code.co_filename
            if filename.startswith(str(LIB)):
                seen.add(str(Path(filename).relative_to(LIB)))

    sys.setprofile(profile)
    try:
        answer = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
        b''.join(answer)
    finally:
        sys.setprofile(None)
    return int(statuses[0][:3]), seen


def test_a_keyed_action_request_runs_code_in_at_most_twelve_files_of_lib(app: Flask, client: FlaskClient) -> None:
    body = {'name': f'layers-{uuid.uuid4().hex[:8]}', 'email': 'ada@example.com'}
    client.post('/example/bar', json=body, headers=AUTH)  # warm: the first request of a process prepares more
    headers = {**AUTH, 'Idempotency-Key': uuid.uuid4().hex}
    status, seen = files_run(app, '/example/bar', body, headers)
    assert status == 200
    assert len(seen) <= MOST_FILES, f'{len(seen)} files: {sorted(seen)}'
    # What it must have passed through: the one path, from the WSGI entry to the access record.
    assert {'web/gateway.py', 'pipeline/path.py', 'db/idempotency.py', 'observability/access_log.py'} <= seen


def test_the_0_1_import_paths_still_work_with_a_deprecation_warning() -> None:
    from lib import get_db_from_conn, inject_conn, module_blueprint, not_found

    for old, name, new in (
        ('lib.db', 'get_db_from_conn', get_db_from_conn),
        ('lib.decorators', 'inject_conn', inject_conn),
        ('lib.actions', 'module_blueprint', module_blueprint),
        ('lib.errors', 'not_found', not_found),
    ):
        module = __import__(old, fromlist=[name])
        with pytest.warns(DeprecationWarning, match=rf'import it as `from lib import {name}`'):
            assert getattr(module, name) is new


def test_an_unknown_old_name_is_an_attribute_error_not_a_warning() -> None:
    import lib.db

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(AttributeError, match=re.escape("module 'lib.db' has no attribute 'nothing'")):
            lib.db.nothing  # noqa: B018


def test_the_face_exports_what_it_lists() -> None:
    for name in lib.__all__:
        assert getattr(lib, name) is not None, name
