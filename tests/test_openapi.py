"""The contract: `GET /openapi.json` (and `flask --app app openapi`), an OpenAPI 3.1 document built
from the modules' routes tables and schemas; `@returns`; the `/docs` page's files; `API_DOCS`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from marshmallow import Schema, fields
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from lib import module_blueprint
from lib.contract.declarations import returns
from lib.contract.openapi import ALWAYS, WITH_DATABASE
from lib.core.config import ConfigError, load
from lib.web.blueprints import registry_of
from lib.web.flask_app import CONFIG_KEY
from lib.web.infrastructure import HEALTH_ANSWERS as ANSWERS
from tests.conftest import AUTH, MODULES, make_app

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WITH_BENCH = [*MODULES, 'modules.bench']


def get_document(app: Flask) -> dict[str, Any]:
    answer = app.test_client().get('/openapi.json')  # no token: the contract is public
    assert answer.status_code == 200, answer.data
    assert answer.mimetype == 'application/json'
    document: dict[str, Any] = orjson.loads(answer.data)
    return document


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A `$ref` to a component schema, followed."""
    ref = schema.get('$ref')
    if ref is None:
        return schema
    resolved: dict[str, Any] = document['components']['schemas'][ref.removeprefix('#/components/schemas/')]
    return resolved


def conforms(document: dict[str, Any], schema: dict[str, Any], value: Any) -> list[str]:
    """What is wrong with `value` against a schema of `document` (its refs resolved, formats checked)."""
    validator = OAS31Validator(
        {**schema, 'components': document['components']}, format_checker=OAS31Validator.FORMAT_CHECKER
    )
    return [error.message for error in validator.iter_errors(value)]


@pytest.fixture
def bench_app(database: dict[str, Any], log_dir: str) -> Iterator[Flask]:
    """Every module the repository has: the example, the tests' probe and the benchmark's."""
    application = make_app(database, log_dir, MODULES=WITH_BENCH)
    yield application
    application.extensions['dbapi.pools'].close()


@pytest.fixture
def document(app: Flask) -> dict[str, Any]:
    return get_document(app)


def test_the_document_is_valid_openapi_3_1(bench_app: Flask) -> None:
    document = get_document(bench_app)
    assert document['openapi'] == '3.1.0'
    validate(document)  # openapi-spec-validator: raises on any error


def test_every_action_of_every_module_is_one_post_operation_with_its_request_schema(bench_app: Flask) -> None:
    document = get_document(bench_app)
    actions = list(registry_of(bench_app))
    assert {action.module for action in actions} == {'example', 'probe', 'bench'}
    posted = {path for path, item in document['paths'].items() if 'post' in item}
    assert posted == {f'/{action.module}/{action.route}' for action in actions} | {'/batch'}
    for action in actions:
        item = document['paths'][f'/{action.module}/{action.route}']
        assert list(item) == ['post'], f'{action.name}: only POST is an operation'
        post = item['post']
        assert post['operationId'] == f'{action.module}.{action.route or "index"}'
        assert post['tags'] == [action.module]
        assert post['security'] == [{'bearerAuth': []}]
        body = resolve(document, post['requestBody']['content']['application/json']['schema'])
        assert body['additionalProperties'] is False, action.name
        loaded = {name: field for name, field in (action.schema.fields if action.schema else {}).items()}
        assert set(body['properties']) == {field.data_key or name for name, field in loaded.items()}, action.name
        required = sorted(field.data_key or name for name, field in loaded.items() if field.required)
        assert sorted(body.get('required', [])) == required, action.name
        assert post['requestBody']['required'] is bool(required), action.name
        takes_key = action.conn is not None and not action.conn.autocommit
        assert ('Idempotency-Key' in post['description']) is takes_key
        assert ('Idempotent-Replayed' in post['responses']['200'].get('headers', {})) is takes_key


def test_batch_lists_every_action_it_accepts_with_its_body(bench_app: Flask) -> None:
    document = get_document(bench_app)
    post = document['paths']['/batch']['post']
    body = post['requestBody']['content']['application/json']['schema']
    actions = body['properties']['actions']
    assert (actions['minItems'], actions['maxItems']) == (1, bench_app.extensions[CONFIG_KEY].batch_max_actions)
    steps = {step['properties']['action']['const']: step for step in actions['items']['oneOf']}
    accepted = [a for a in list(registry_of(bench_app)) if a.conn is None or not a.conn.autocommit]
    assert set(steps) == {action.name for action in accepted}
    for action in accepted:
        step_body = resolve(document, steps[action.name]['properties']['body'])
        fields = action.schema.fields if action.schema else {}
        assert set(step_body['properties']) == {field.data_key or name for name, field in fields.items()}, action.name
        needs_body = any(field.required for field in fields.values() if not field.dump_only)
        assert ('body' in steps[action.name]['required']) is needs_body, action.name
    assert {int(status) for status in post['responses']} == {200, 400, 401, 403, 404, 409, 413, 415, 422, 503, 504}
    assert 'Idempotency-Key' in post['description']
    problem = document['components']['schemas']['Problem']['properties']
    assert problem['step'] == {
        'type': 'integer',
        'minimum': 0,
        'description': 'POST /batch: the index of the step that failed',
    }


def test_operation_ids_are_unique(bench_app: Flask) -> None:
    ids = [op['operationId'] for item in get_document(bench_app)['paths'].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_summary_and_description_come_from_the_docstring(document: dict[str, Any]) -> None:
    user = document['paths']['/example/user']['post']
    assert user['summary'] == 'One user by name; 404 when there is none.'
    write_then_sleep = document['paths']['/probe/write_then_sleep']['post']
    assert write_then_sleep['summary'].startswith('A transaction held open mid-way')
    assert document['tags'][1] == {
        'name': 'probe',
        'description': 'A module for tests only: actions that exercise every path of the machinery.',
    }


def test_each_action_lists_the_problems_serve_can_answer_for_it(app: Flask, document: dict[str, Any]) -> None:
    for action in registry_of(app):
        answers = document['paths'][f'/{action.module}/{action.route}']['post']['responses']
        expected = {200, *ALWAYS, *(WITH_DATABASE if action.conn is not None else ())}
        assert {int(status) for status in answers} == expected, action.name
        # 405 answers another method than this operation's POST: the description says it instead.
        assert '405' not in answers
    assert 'Allow: POST' in document['info']['description']
    for name, response in document['components']['responses'].items():
        assert response['content']['application/problem+json']['schema'] == {'$ref': '#/components/schemas/Problem'}
        assert response['description'], name
    assert document['components']['responses']['Unauthorized']['headers']['WWW-Authenticate']['required'] is True


def test_types_formats_lengths_and_the_body_steps_limits_show(document: dict[str, Any]) -> None:
    schemas = document['components']['schemas']
    types = schemas['probe.Types']['properties']
    assert types['day'] == {'type': 'string', 'format': 'date'}
    assert types['amount']['type'] == ['string', 'number'] and types['amount']['format'] == 'decimal'
    assert re.fullmatch(types['amount']['pattern'], '-12.30') and not re.fullmatch(types['amount']['pattern'], '1,5')
    qty = schemas['probe.Item']['properties']['qty']
    assert (qty['minimum'], qty['maximum']) == (-(2**63), 2**64 - 1)  # lib.body refuses beyond 64 bits
    name = schemas['example.Name']['properties']['name']
    assert (name['minLength'], name['maxLength']) == (1, 256)
    assert re.fullmatch(name['pattern'], 'ada') and not re.fullmatch(name['pattern'], 'a\x00')
    assert schemas['example.Foo']['properties']['email']['format'] == 'email'
    assert schemas['probe.Item']['properties']['parent']['type'] == ['integer', 'null']  # load_default=None


def test_the_returns_schema_is_the_200_answer(document: dict[str, Any]) -> None:
    def answer(path: str) -> dict[str, Any]:
        schema: dict[str, Any] = document['paths'][path]['post']['responses']['200']['content']['application/json']
        return schema['schema']

    assert answer('/example/foo') == {'$ref': '#/components/schemas/example.FooResult'}
    assert answer('/example/bar') == {'type': 'array', 'items': {'$ref': '#/components/schemas/example.User'}}
    assert answer('/example/user') == {'$ref': '#/components/schemas/example.User'}
    assert answer('/example/') == {}  # no @returns: any JSON value
    assert document['components']['schemas']['example.FooResult']['properties']['email']['type'] == ['string', 'null']


def test_answers_match_the_documented_schemas(api: Any, document: dict[str, Any]) -> None:
    def check(path: str, body: dict[str, Any], status: int) -> None:
        answer = api.post(path, body)
        assert answer.status_code == status, answer.data
        documented = document['paths'][path]['post']['responses'][str(status)]
        if '$ref' in documented:
            documented = document['components']['responses'][documented['$ref'].rpartition('/')[2]]
        media, content = next(iter(documented['content'].items()))
        assert answer.mimetype == media
        assert conforms(document, content['schema'], answer.json) == [], answer.json

    check('/example/bar', {'name': 'ada', 'email': 'ada@example.com'}, 200)
    check('/example/bar', {'name': 'nobody-with-mail'}, 200)  # stored with email ''
    check('/example/user', {'name': 'ada'}, 200)
    check('/example/foo', {'name': 'ada'}, 200)  # email: null
    check('/example/foo', {'name': 'ada', 'unknown': 1}, 422)
    check('/example/user', {'name': f'nobody-{uuid.uuid4().hex}'}, 404)
    check('/example/bar', {'name': 'x' * 257}, 422)  # longer than the varchar(256) column: refused by the schema


def test_returns_sends_the_declared_fields_only_as_the_schema_dumps_them(api: Any) -> None:
    api.post('/example/bar', {'name': 'ada', 'email': 'ada@example.com'})
    answer = api.post('/example/user', {'name': 'ada'})
    assert answer.json == {'name': 'ada', 'email': 'ada@example.com'}
    foo = api.post('/example/foo', {'name': 'ada'}).json
    assert set(foo) == {'name', 'email', 'time'} and foo['email'] is None


def test_returns_refuses_what_is_not_a_schema_or_a_many_that_disagrees() -> None:
    class Thing(Schema):
        x = fields.Integer()

    with pytest.raises(TypeError, match='needs a marshmallow Schema'):
        returns(dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='many=True'):
        returns(Thing(many=True))
    assert returns(Thing, many=True)(lambda: []).__dbapi_returns__.many is True  # type: ignore[attr-defined]


def test_health_routes_are_documented_without_security(app: Flask, document: dict[str, Any]) -> None:
    health_rules = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith('health.')}
    assert health_rules == {'/health/live', '/health/ready'}
    assert set(ANSWERS) == {f'health.{rule.rpartition("/")[2]}' for rule in health_rules}
    for rule in health_rules:
        get = document['paths'][rule]['get']
        assert 'security' not in get and get['tags'] == ['health']
    ready = document['paths']['/health/ready']['get']['responses']
    assert set(ready) == {'200', '503'} and ready['503']['headers']['Retry-After']['required'] is True
    live = document['paths']['/health/live']['get']['responses']['200']['content']['application/json']['schema']
    assert conforms(document, live, app.test_client().get('/health/live').json) == []
    scheme = document['components']['securitySchemes']['bearerAuth']
    assert (scheme['type'], scheme['scheme']) == ('http', 'bearer')


def test_info_version_is_pyprojects_and_servers_are_a_setting(database: dict[str, Any], log_dir: str) -> None:
    with (ROOT / 'pyproject.toml').open('rb') as file:
        version = tomllib.load(file)['project']['version']
    app = make_app(database, log_dir, OPENAPI_SERVERS='https://dbapi.internal, /')
    try:
        document = get_document(app)
    finally:
        app.extensions['dbapi.pools'].close()
    assert document['info'] == {**document['info'], 'title': 'dbapi', 'version': version}
    assert document['servers'] == [{'url': 'https://dbapi.internal'}, {'url': '/'}]


@pytest.mark.parametrize('value', ['', 'ftp://files', 'dbapi.internal', '//host/x', 'https://'])
def test_a_bad_servers_setting_stops_the_start_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match='OPENAPI_SERVERS'):
        load(overrides={'OPENAPI_SERVERS': value, 'BEARER': 'x', 'DATABASES': {'default': {'dbname': 'x'}}})


def test_the_default_server_is_the_one_serving_the_document(document: dict[str, Any]) -> None:
    assert document['servers'] == [{'url': '/'}]


def test_the_cli_writes_the_same_bytes_as_the_route(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=['openapi'])
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == app.test_client().get('/openapi.json').data


def test_flask_openapi_runs_from_a_shell(app: Flask) -> None:
    """`flask --app app openapi`, as a calling team's CI would run it: the settings' modules."""
    env = {**os.environ, 'ENVIRONMENT': 'testing', 'EXTRA_MODULES': ','.join(MODULES[1:])}
    run = subprocess.run(
        [str(BIN / 'flask'), '--app', 'app', 'openapi'], cwd=ROOT, env=env, capture_output=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == app.test_client().get('/openapi.json').data


SCHEMA_V1 = """
from marshmallow import Schema, fields

class ThingSchema(Schema):
    colour = fields.String(required=True)
"""
SCHEMA_V2 = """
from marshmallow import Schema, fields
from marshmallow.validate import OneOf

class ThingSchema(Schema):
    colour = fields.String(required=True, validate=OneOf(['red', 'green']))
    size = fields.Integer(required=False, strict=True)
"""
PACKAGE = """
from lib import module_blueprint
from lib.contract.declarations import returns, use_schema

from .schemas import ThingSchema


@use_schema(ThingSchema)
@returns(ThingSchema)
def paint(**thing):
    '''Paint the thing.'''
    return {**thing, 'secret': 'never sent'}


blueprint = module_blueprint(__name__, [dict(route='paint', action=paint)])
"""


@pytest.fixture
def scratch_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A module package written for the test, importable by name, forgotten after it."""
    name = f'contract_{uuid.uuid4().hex[:8]}'
    (tmp_path / name).mkdir()
    (tmp_path / name / '__init__.py').write_text(textwrap.dedent(PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, 'dont_write_bytecode', True)  # a rewrite within the second is read again
    yield name, tmp_path / name / 'schemas.py'
    for module in [key for key in sys.modules if key == name or key.startswith(f'{name}.')]:
        del sys.modules[module]


def thing_document(database: dict[str, Any], log_dir: str, name: str) -> tuple[dict[str, Any], Any]:
    for module in [key for key in sys.modules if key == name or key.startswith(f'{name}.')]:
        del sys.modules[module]
    app = make_app(database, log_dir, MODULES=[name])
    try:
        painted = app.test_client().post(f'/{name}/paint', json={'colour': 'red'}, headers=AUTH)
        return get_document(app), painted.json
    finally:
        app.extensions['dbapi.pools'].close()


def test_a_schema_change_shows_in_the_document(
    scratch_module: tuple[str, Path], database: dict[str, Any], log_dir: str
) -> None:
    name, schemas = scratch_module
    schemas.write_text(SCHEMA_V1)
    before, painted = thing_document(database, log_dir, name)
    assert painted == {'colour': 'red'}  # @returns: the action's extra key is not sent
    thing = before['components']['schemas'][f'{name}.Thing']
    assert set(thing['properties']) == {'colour'} and 'enum' not in thing['properties']['colour']

    schemas.write_text(SCHEMA_V2)
    after, _ = thing_document(database, log_dir, name)
    thing = after['components']['schemas'][f'{name}.Thing']
    assert set(thing['properties']) == {'colour', 'size'}
    assert thing['properties']['colour']['enum'] == ['red', 'green']
    assert after['paths'][f'/{name}/paint']['post']['summary'] == 'Paint the thing.'


def test_api_docs_off_serves_neither_but_the_cli_still_prints(database: dict[str, Any], log_dir: str) -> None:
    app = make_app(database, log_dir, API_DOCS='0')
    try:
        client = app.test_client()
        for path in ('/openapi.json', '/asyncapi.json', '/docs', '/docs/', '/docs/swagger-ui.css'):
            answer = client.get(path)
            assert answer.status_code == 404 and answer.mimetype == 'application/problem+json', path
        result = app.test_cli_runner().invoke(args=['openapi'])
        assert result.exit_code == 0 and orjson.loads(result.stdout_bytes)['openapi'] == '3.1.0'
    finally:
        app.extensions['dbapi.pools'].close()


def test_the_docs_page_and_its_files_come_from_the_service(client: Any) -> None:
    page = client.get('/docs')
    assert page.status_code == 200 and page.mimetype == 'text/html'
    assert client.get('/docs/').data == page.data
    html = page.get_data(as_text=True)
    assert '/openapi.json' in html
    linked = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert linked and all(link.startswith('/docs/') for link in linked), linked  # nothing from another host
    for link in linked:
        assert client.get(link).status_code == 200, link


def test_docs_and_the_document_are_outside_the_post_space(client: Any) -> None:
    assert client.post('/openapi.json', headers=AUTH).status_code == 405
    assert client.get('/openapi.json', headers={'Authorization': 'Bearer wrong'}).status_code == 200


def test_a_module_cannot_take_the_pages_name() -> None:
    with pytest.raises(ValueError, match="'docs' is reserved"):
        module_blueprint('modules.docs', [])


def test_each_operation_states_the_scopes_that_grant_it_and_documents_the_403(app: Flask, client) -> None:
    operation = get_document(app)['paths']['/example/foo']['post']
    assert operation['x-dbapi-scopes'] == ['example/foo', 'example', '*']
    assert '`example/foo`' in operation['description']
    assert '403' in operation['responses']
