"""The service's contract: an OpenAPI 3.1 document built from what the modules declare.

Every action of the registry (lib.contract.registry) becomes one `POST /<module>/<route>`
operation: the request body from `@use_schema`, the 200 answer from `@returns`, the problem answers
from what the pipeline can answer for it (`@inject_conn` adds the database's, and the
Idempotency-Key header), summary and description from the docstring. `POST /batch` lists every
action a batch accepts, each with its body's schema. apispec's MarshmallowPlugin converts the
schemas, so nothing is written twice and the document cannot drift from the code. The
infrastructure's routes (health) are handed in by the web layer, which serves them.

`GET /openapi.json` (lib.web.infrastructure, built when the app is made) and `flask --app app
openapi` (lib.server.cli) hand out the same bytes.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields
from werkzeug.http import HTTP_STATUS_CODES

from lib.contract.registry import BATCH, BATCH_PATH, ROOT_ENDPOINT, Action, Registry
from lib.core.config import APP_ID, Config, project_version
from lib.core.errors import PROBLEM_JSON
from lib.core.json import INT64_MIN, JSON_MIMETYPE, UINT64_MAX

OPENAPI_VERSION = '3.1.0'
SECURITY_SCHEME = 'bearerAuth'
HEALTH_TAG = 'health'
# What the body step (lib.pipeline.input) refuses in any string: PostgreSQL text cannot hold U+0000.
KEY_ORDER = ('openapi', 'info', 'servers', 'tags', 'paths', 'components')
NO_NUL = '^[^\\u0000]*$'
DECIMAL = '^[+-]?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][+-]?[0-9]+)?$'  # a finite Decimal's text

# The problem answers the pipeline can give any action, and those an action with a database adds.
# A method other than POST is 405 with `Allow: POST`: an answer to another operation than the
# action's POST, so it is said in the document's description, not listed under the POST.
PROBLEMS: dict[int, str] = {
    400: 'The body is not a JSON object, has a NUL character or an integer beyond 64 bits; or '
    'PostgreSQL refused a value (data exception, not-null or check violation).',
    401: 'No `Authorization: Bearer <token>` header, or not a valid token.',
    403: 'The caller is known but has no scope for this action (`WWW-Authenticate` names the scope needed).',
    404: 'What the body names does not exist (the action answers `not_found`).',
    409: 'The data clashes with what is stored: a unique, foreign-key or exclusion violation, a '
    'serialization failure or a deadlock (safe to retry with the same body), or the action answers `conflict`; '
    'or a request with the same `Idempotency-Key` is still running (`idempotency-key-in-use`: retry after '
    '`Retry-After` seconds).',
    413: 'The body is larger than the service accepts (`MAX_CONTENT_LENGTH`).',
    415: 'The body is not `application/json`.',
    422: 'The body failed validation: `errors` names each refused field and why; or the `Idempotency-Key` '
    'was used before with another body or action (`idempotency-key-reused`), or the action runs in autocommit '
    'and takes no key (`idempotency-key-not-supported`).',
    503: 'The database is unreachable or no pooled connection was free in time; retry after `Retry-After` seconds.',
    504: 'A statement ran longer than `STATEMENT_TIMEOUT`: the transaction was rolled back.',
}
ALWAYS = (400, 401, 403, 404, 413, 415, 422)
WITH_DATABASE = (409, 503, 504)
PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {'WWW-Authenticate': {'description': 'The challenge', 'schema': {'type': 'string'}, 'required': True}},
    503: {'Retry-After': {'description': 'Seconds to wait', 'schema': {'type': 'string'}, 'required': True}},
}
RETRY_AFTER_HEADER = PROBLEM_HEADERS[503]

DESCRIPTION = f"""\
Database actions for internal backends. Every action is `POST /<module>/<action>` with a JSON
object body (an empty body counts as `{{}}`) and `Authorization: Bearer <token>`; any other
method on an action's path answers 405 with `Allow: POST`.

Answers are JSON: datetimes in ISO-8601, decimals and UUIDs as strings. Every error is an
RFC 9457 problem document (`{PROBLEM_JSON}`: `type`, `title`, `status`, `detail`, `request_id`,
and `errors` per field on a 422). Every answer carries `X-Request-ID` (the caller's, if it sent
one), which finds the request in the service's logs. A status that no operation lists here is an
error of the service: the request id finds it.

A write is safe to retry with an `Idempotency-Key` header (1 to 255 printable ASCII characters):
the same key and body answer what the first request answered, without writing twice; the same
key with another body is a 422, and a repeat while the first still runs a 409 with `Retry-After`.
`POST /batch` runs several actions in one transaction.
"""


# An RFC 9457 problem document as `lib.core.errors.problem_document` writes it; nginx's own errors
# (nginx/nginx.conf) have the same shape. The service's own JSON, not a module's schema.
PROBLEM = {
    'type': 'object',
    'properties': {
        'type': {'type': 'string', 'pattern': '^urn:dbapi:problem:', 'description': '`urn:dbapi:problem:<slug>`'},
        'title': {'type': 'string', 'description': 'The status phrase'},
        'status': {'type': 'integer', 'minimum': 400, 'maximum': 599},
        'detail': {'type': 'string', 'description': 'What was wrong, for a person'},
        'request_id': {'type': 'string', 'description': 'The `X-Request-ID` of the request'},
        'errors': {
            'type': 'object',
            'description': 'By field, what validation refused (422); the constraint that refused (409)',
        },
        'step': {'type': 'integer', 'minimum': 0, 'description': 'POST /batch: the index of the step that failed'},
        'action': {'type': 'string', 'description': 'POST /batch: the action of the step that failed'},
    },
    'required': ['type', 'title', 'status', 'detail', 'request_id'],
    'additionalProperties': False,
}
PROBLEM_REF = {'$ref': '#/components/schemas/Problem'}
# The Idempotency-Key of lib.db.idempotency is said in the descriptions, not as a header parameter:
# a key's validity depends on what was sent with it before (a new request needs a new key), which
# no schema states, and a contract-driven client (schemathesis) would send one key with many bodies.
KEY_NOTE = (
    'Safe to retry with an `Idempotency-Key` header (1 to 255 printable ASCII characters; a new key, a '
    'UUID say, per new request): the same key with the same body answers the first answer again, with '
    '`Idempotent-Replayed: true`, without running again.'
)
REPLAYED_HEADER = {
    'Idempotent-Replayed': {
        'description': '`true` when the answer is the stored one of an earlier request with the same key',
        'schema': {'type': 'string', 'enum': ['true']},
    }
}
BATCH_PROBLEMS = (400, 401, 403, 404, 409, 413, 415, 422, 503, 504)


def schema_name(schema: type[Schema] | Schema) -> str:
    """`<package>.<Name>` (`example.User` for modules.example.schemas.UserSchema), so two
    modules' schemas of the same class name never share a component."""
    cls = schema if isinstance(schema, type) else type(schema)
    package = cls.__module__.removesuffix('.schemas').rpartition('.')[2]
    name = cls.__name__.removesuffix('Schema') or cls.__name__
    return f'{package}.{name}'


# Attribute functions of apispec's field converter (its documented extension point): each gets
# the converter, the field and what is known so far (`ret`), and returns what to add.
def service_limits(converter: Any, field: fields.Field[Any], ret: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """What the body step (lib.pipeline.input) refuses before any schema runs, said on the fields it concerns
    (no NUL in a free string, integers within 64 bits), and decimals as the strings lib.core.json writes."""
    types = ret.get('type')
    kinds = [types] if isinstance(types, str) else list(types or [])
    if isinstance(field, fields.Decimal):  # read from a string or a number; lib.core.json writes a string
        return {
            'type': ['string', 'number', *(['null'] if 'null' in kinds else [])],
            'format': 'decimal',
            'pattern': DECIMAL,
        }
    if 'string' in kinds and 'format' not in ret and 'pattern' not in ret and 'enum' not in ret:
        return {'pattern': NO_NUL}
    if 'integer' in kinds:
        return {'minimum': ret.get('minimum', INT64_MIN), 'maximum': ret.get('maximum', UINT64_MAX)}
    return {}


def docstring_parts(function: Callable[..., Any]) -> dict[str, str]:
    """`summary`: the docstring's first paragraph, on one line; `description`: the rest."""
    doc = inspect.getdoc(function)
    if not doc:
        return {}
    first, _, rest = doc.partition('\n\n')
    parts = {'summary': ' '.join(first.split())}
    if rest.strip():
        parts['description'] = rest.strip()
    return parts


def operation_id(action: Action) -> str:
    return f'{action.module}.{action.route or ROOT_ENDPOINT}'


def request_body(schema: Schema | None) -> dict[str, Any]:
    """Required when the schema requires a field (an empty body counts as `{}`); without a schema,
    only an empty object is accepted."""
    if schema is None:
        body: Any = {'type': 'object', 'properties': {}, 'additionalProperties': False}
        required = False
    else:
        body = schema
        required = any(field.required for field in schema.fields.values() if not field.dump_only)
    return {'required': required, 'content': {JSON_MIMETYPE: {'schema': body}}}


def problem_name(status: int) -> str:
    """The response component of a status: `NotFound` for 404."""
    return HTTP_STATUS_CODES[status].replace(' ', '').replace('-', '')


def takes_key(action: Action) -> bool:
    """Whether an Idempotency-Key protects the action: one that runs in a transaction."""
    return action.conn is not None and not action.conn.autocommit


def responses(action: Action) -> dict[str, Any]:
    answer: dict[str, Any] = {'schema': action.returns if action.returns is not None else {}}
    documented: dict[str, Any] = {'200': {'description': 'The result', 'content': {JSON_MIMETYPE: answer}}}
    if takes_key(action):
        documented['200']['headers'] = REPLAYED_HEADER
    statuses = sorted((*ALWAYS, *(WITH_DATABASE if action.conn is not None else ())))
    documented.update({str(status): problem_name(status) for status in statuses})
    return documented


def needed_scopes(action: Action) -> list[str]:
    """The caller scopes that grant `action` (lib/callers.py): its own name, its module, or `*`."""
    return [action.name, action.module, '*']


def operation(action: Action) -> dict[str, Any]:
    parts = docstring_parts(action.function)
    scopes = needed_scopes(action)
    needs = f'Needs the scope `{scopes[0]}` (or `{scopes[1]}`, or `*`).'
    if takes_key(action):
        needs = f'{needs} {KEY_NOTE}'
    parts['description'] = f'{parts["description"]}\n\n{needs}' if parts.get('description') else needs
    return {
        'operationId': operation_id(action),
        'tags': [action.module],
        **parts,
        'x-dbapi-scopes': scopes,
        'security': [{SECURITY_SCHEME: []}],
        'requestBody': request_body(action.schema),
        'responses': responses(action),
    }


def batch_step(action: Action, converter: Any) -> dict[str, Any]:
    """One step a batch accepts: the action's name and its body's schema (an absent body is `{}`)."""
    described = request_body(action.schema)
    body = described['content'][JSON_MIMETYPE]['schema']
    if isinstance(body, Schema):
        body = converter.resolve_nested_schema(body)  # a $ref to the component the operation uses
    return {
        'type': 'object',
        'properties': {'action': {'const': action.name}, 'body': body},
        'required': ['action', 'body'] if described['required'] else ['action'],
        'additionalProperties': False,
    }


def batch_operation(actions: list[Action], most: int, converter: Any) -> dict[str, Any]:
    """`POST /batch` with the steps it accepts: every action but those in autocommit."""
    steps = [batch_step(action, converter) for action in actions if action.conn is None or takes_key(action)]
    body = {
        'type': 'object',
        'properties': {'actions': {'type': 'array', 'minItems': 1, 'maxItems': most, 'items': {'oneOf': steps}}},
        'required': ['actions'],
        'additionalProperties': False,
    }
    results = {
        'type': 'object',
        'properties': {'results': {'type': 'array', 'description': "Each step's result, in order"}},
        'required': ['results'],
    }
    return {
        'operationId': BATCH,
        'tags': [BATCH],
        'summary': 'Several actions in one transaction',
        'description': 'Every step is authorized and validated before any runs (a bad step answers its '
        'problem with `step` and `action`, and nothing runs); then the steps run in order in one '
        'transaction on one database (steps on two databases are a 422). The first step that fails rolls '
        'back every step and answers its '
        'own problem, with `step` and `action` added. Each step needs the scope of its action. An '
        f'`Idempotency-Key` covers the batch as a whole. {KEY_NOTE}',
        'security': [{SECURITY_SCHEME: []}],
        'requestBody': {'required': True, 'content': {JSON_MIMETYPE: {'schema': body}}},
        'responses': {
            '200': {
                'description': 'Every step ran and the transaction committed',
                'headers': REPLAYED_HEADER,
                'content': {JSON_MIMETYPE: {'schema': results}},
            },
            **{str(status): problem_name(status) for status in BATCH_PROBLEMS},
        },
    }


def tag_description(import_name: str) -> dict[str, str]:
    """The first paragraph of the module package's docstring, when it has one."""
    package = sys.modules.get(import_name)
    doc = inspect.getdoc(package) if package is not None else None
    return {'description': doc.partition('\n\n')[0]} if doc else {}


def build_spec(registry: Registry, config: Config, infrastructure: Iterable[tuple[str, dict[str, Any]]]) -> APISpec:
    """The document: every module's actions in routes-table order, POST /batch, then the
    infrastructure's path items (health)."""
    plugin = MarshmallowPlugin(schema_name_resolver=schema_name)
    spec = APISpec(
        title=APP_ID,
        version=project_version(),
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={'description': DESCRIPTION},
        servers=[{'url': url} for url in config.openapi_servers],
    )
    if plugin.converter is None:  # APISpec(plugins=...) sets it
        raise RuntimeError('apispec did not initialise the MarshmallowPlugin')
    plugin.converter.add_attribute_function(service_limits)  # type: ignore[no-untyped-call]  # apispec: untyped
    spec.components.security_scheme(
        SECURITY_SCHEME,
        {'type': 'http', 'scheme': 'bearer', 'description': 'One of the tokens the service is configured with.'},
    )
    spec.components.schema('Problem', PROBLEM)
    for status, description in PROBLEMS.items():
        content = {PROBLEM_JSON: {'schema': PROBLEM_REF}}
        headers = {'headers': PROBLEM_HEADERS[status]} if status in PROBLEM_HEADERS else {}
        spec.components.response(problem_name(status), {'description': description, 'content': content, **headers})
    actions = []
    for module, table in registry.modules.items():
        spec.tag({'name': module, **tag_description(registry.packages.get(module, module))})
        for action in table.values():
            spec.path(path=f'/{action.module}/{action.route}', operations={'post': operation(action)})
            actions.append(action)
    spec.tag({'name': BATCH, 'description': 'Several actions in one transaction.'})
    batch = batch_operation(actions, config.batch_max_actions, plugin.converter)
    spec.path(path=BATCH_PATH, operations={'post': batch})
    spec.tag({'name': HEALTH_TAG, 'description': 'For the infrastructure: no token, no data.'})
    for path, operations in infrastructure:
        spec.path(path=path, operations=operations)
    return spec


def document(registry: Registry, config: Config, infrastructure: Iterable[tuple[str, dict[str, Any]]]) -> bytes:
    """The document as JSON bytes (indented, ending with a newline)."""
    unordered = build_spec(registry, config, infrastructure).to_dict()
    ordered = {key: unordered[key] for key in KEY_ORDER if key in unordered}
    return orjson.dumps({**ordered, **unordered}, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
