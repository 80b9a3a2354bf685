"""GET /asyncapi.json: the events' AsyncAPI 3.0 document, derived from the modules' declarations
and checked by the AsyncAPI project's own parser (@asyncapi/parser, pinned in
tools/asyncapi/package.json, run with the machine's Node.js)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from tests.conftest import MODULES, make_app
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
STREAM = 'tests.modules.stream'


@pytest.fixture(scope='module')
def parser() -> Path:
    require_tool(shutil.which('node'), 'node')
    require_tool(shutil.which('npm'), 'npm')
    subprocess.run([str(ROOT / 'scripts' / 'asyncapi_parser.sh')], check=True, timeout=300)
    return ROOT / '.local' / 'asyncapi' / 'validate.mjs'


@pytest.fixture
def app(database: dict[str, Any], log_dir: str) -> Flask:
    return make_app(database, log_dir, MODULES=[*MODULES, STREAM])


def parse(parser: Path, document: str) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(['node', str(parser)], input=document, capture_output=True, text=True, timeout=60)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]


def test_the_document_is_valid_asyncapi_with_one_message_per_declared_event(app: Flask, parser: Path) -> None:
    answer = app.test_client().get('/asyncapi.json')
    assert answer.status_code == 200 and answer.mimetype == 'application/json'
    code, lines = parse(parser, answer.get_data(as_text=True))
    assert code == 0, lines
    assert [line for line in lines if line.get('severity') == 0] == []
    assert lines[-1] == {'messages': ['user.saved', 'stream.appended', 'stream.noted']}
    document = answer.json
    assert document['asyncapi'].startswith('3.') and document['channels']['events']['address'] == 'dbapi.events'
    appended = document['components']['messages']['stream.appended']
    assert appended['contentType'] == 'application/cloudevents+json'
    assert appended['description'] == 'An append to a stream, with its number.'
    envelope = appended['payload']
    assert envelope['properties']['type'] == {'type': 'string', 'const': 'stream.appended'}
    data = document['components']['schemas']['stream.Appended']
    assert envelope['properties']['data'] == {'$ref': '#/components/schemas/stream.Appended'}
    assert data['required'] == ['n', 'stream'] and data['properties']['n']['minimum'] == 1


def test_the_parser_refuses_a_broken_document(app: Flask, parser: Path) -> None:
    document = app.test_client().get('/asyncapi.json').json
    document['channels']['events']['messages']['user.saved'] = {'$ref': '#/components/messages/nowhere'}
    code, lines = parse(parser, json.dumps(document))
    assert code == 1
    assert any(line.get('severity') == 0 for line in lines), lines


def test_flask_events_lists_what_the_document_holds(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=['events', '--json'])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [event['type'] for event in listed] == ['user.saved', 'stream.appended', 'stream.noted']
    assert listed[0] == {
        'type': 'user.saved',
        'module': 'example',
        'fields': [
            {'name': 'name', 'type': 'String', 'required': True},
            {'name': 'email', 'type': 'String', 'required': True},
        ],
    }
    table = app.test_cli_runner().invoke(args=['events']).output.splitlines()
    assert table[0].split() == ['TYPE', 'MODULE', 'FIELDS']
    assert table[1].startswith('user.saved       example  name (String, required)')
