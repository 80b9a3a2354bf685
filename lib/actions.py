"""A module's actions: from its routes table to an answer, and the blueprint that carries them.

`serve()` is the one implementation of an action request: Bearer auth first, then the
action, the body, validation, the connection, the call and the JSON answer, with every
error turned into a problem. It works on the WSGI environ inside an app context, so the
gateway in front of Flask (lib/gateway.py, the hot path) and the blueprint's Flask view
give the same answer for the same request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from flask import Blueprint, Response, current_app, g, request
from gunicorn.http.errors import ParseException
from marshmallow import Schema
from werkzeug.exceptions import RequestEntityTooLarge

from lib.auth import authenticate
from lib.db import BorrowedConnection, give_back_borrowed
from lib.decorators import CONN_ATTR, SCHEMA_ATTR, ConnSpec
from lib.errors import PROBLEM_JSON, ApiError, bad_request, problem_document, to_problem
from lib.json import JSON_MIMETYPE, contains_nul, dumps
from lib.validation import Loader, loader_for

if TYPE_CHECKING:
    from flask.ctx import _AppCtxGlobals  # the class of `g`: for the annotations only

RESERVED_MODULES = frozenset({'health'})
MAX_NAME_IN_MESSAGE = 80


@dataclass(frozen=True, slots=True)
class Action:
    module: str
    route: str
    function: Callable[..., Any]
    schema: Schema | None
    conn: ConnSpec | None
    load: Loader | None = None  # the schema's load (lib.validation), set by build_actions

    @property
    def name(self) -> str:
        return f'{self.module}/{self.route}'


def build_actions(module: str, routes: Iterable[Mapping[str, Any]]) -> dict[str, Action]:
    """The routes table checked and indexed by route name; errors name the bad entry."""
    actions: dict[str, Action] = {}
    for entry in routes:
        route, function = entry.get('route'), entry.get('action')
        if not isinstance(route, str) or route.startswith('/'):
            raise ValueError(f'module {module!r}: route {route!r} must be a string without a leading /')
        if not callable(function):
            raise ValueError(f'module {module!r}: route {route!r} has no callable action')
        if route in actions:
            raise ValueError(f'module {module!r}: route {route!r} is listed twice')
        spec = getattr(function, CONN_ATTR, None)
        if spec is not None and 'conn' not in inspect.signature(function).parameters:
            raise ValueError(f'module {module!r}: action {route!r} injects a connection but takes no `conn`')
        schema = getattr(function, SCHEMA_ATTR, None)
        load = loader_for(schema) if schema is not None else None
        actions[route] = Action(module, route, function, schema, spec, load)
    return actions


def content_length(environ: Mapping[str, Any]) -> int | None:
    """The declared body length; None for a chunked body, whose length is known only once read."""
    if 'chunked' in environ.get('HTTP_TRANSFER_ENCODING', '').lower():
        return None
    raw = environ.get('CONTENT_LENGTH') or '0'
    if not raw.isdigit():
        raise bad_request(f'Content-Length {raw[:MAX_NAME_IN_MESSAGE]!r} is not a number')
    return int(raw)


def read_data(environ: Mapping[str, Any], length: int | None, limit: int) -> bytes:
    """The raw body, at most `limit` bytes. Broken chunked framing, or a client gone mid-body, is a 400."""
    if length is not None and length > limit:
        raise RequestEntityTooLarge()  # refused before a byte is read
    try:
        data = environ['wsgi.input'].read(limit + 1 if length is None else length)
    except (ParseException, OSError) as error:
        # gunicorn parses chunked bodies only as the app reads them: its errors surface here.
        raise bad_request(f'the body could not be read: {str(error)[:MAX_NAME_IN_MESSAGE]}') from None
    if len(data) > limit:
        raise RequestEntityTooLarge()
    if length is not None and len(data) < length:
        raise bad_request(f'the body ended after {len(data)} of {length} bytes')
    return data


def parse_body(data: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise bad_request(f'the body is not valid JSON: {error}') from None
    if not isinstance(body, dict):
        raise bad_request(f'the body must be a JSON object, not {type(body).__name__}')
    # PostgreSQL text cannot hold U+0000; the byte scan keeps the walk off the hot path.
    if b'\\u0000' in data and contains_nul(body):
        raise bad_request('strings cannot contain the NUL character (\\u0000)')
    return body


def read_body(environ: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """The request body as a JSON object; an empty body is an empty object."""
    length = content_length(environ)
    if length == 0:
        return {}
    mimetype = environ.get('CONTENT_TYPE', '').partition(';')[0].strip().lower()
    if mimetype != JSON_MIMETYPE and not mimetype.endswith('+json'):
        raise ApiError(415, 'unsupported-media-type', f'the body must be application/json, not {mimetype!r}')
    data = read_data(environ, length, limit)
    return parse_body(data) if data else {}


def arguments(action: Action, body: dict[str, Any]) -> dict[str, Any]:
    if action.load is not None:
        return action.load(body)  # ValidationError -> 422 naming the fields
    if body:
        unknown = {key: ['Unknown field.'] for key in body}
        raise ApiError(422, 'validation-error', 'the body failed validation', errors=unknown)
    return {}


def run(action: Action, body: dict[str, Any]) -> Any:
    """Validate, inject the connection, call, commit; the pool rolls back whatever is left."""
    kwargs = arguments(action, body)
    spec = action.conn
    if spec is None:
        return action.function(**kwargs)
    with BorrowedConnection(spec.database, spec.named, spec.autocommit) as conn:
        result = action.function(conn=conn, **kwargs)
        if not conn.autocommit:
            conn.commit()
    return result


@dataclass(slots=True)
class Served:
    """An action request's answer, and what the access record says of it."""

    status: int
    body: bytes
    content_type: str = JSON_MIMETYPE
    headers: dict[str, str] = field(default_factory=dict)
    action: str | None = None  # set only for a real action: a scanner's made-up names stay in url.path
    token_label: str | None = None
    problem: ApiError | None = None


def serve(
    environ: dict[str, Any],
    module: str,
    actions: Mapping[str, Action],
    route: str,
    request_id: str,
    request_g: _AppCtxGlobals,
    config: Mapping[str, Any],
) -> Served:
    """Answer `POST /<module>/<route>` inside the app context whose `g` and config are given
    (actions and the pools use the context; passing them saves the LocalProxy lookups)."""
    token_label = None
    action = actions.get(route)
    vars(request_g)['request_id'] = request_id  # what `g.request_id = ...` does, without its Python __setattr__
    try:
        token_label = authenticate(environ.get('HTTP_AUTHORIZATION', ''), config['BEARER_TOKENS'])
        if action is None:
            raise ApiError(404, 'not-found', f'module {module!r} has no action {route[:MAX_NAME_IN_MESSAGE]!r}')
        result = run(action, read_body(environ, config['MAX_CONTENT_LENGTH']))
        return Served(200, dumps(result), action=route, token_label=token_label)
    except Exception as error:  # noqa: BLE001 - every failure becomes a problem answer
        problem = to_problem(error)
        body = dumps(problem_document(problem, request_id))
        return Served(problem.status, body, PROBLEM_JSON, problem.headers, action and route, token_label, problem)
    finally:
        give_back_borrowed(request_g)


def make_view(module: str, actions: Mapping[str, Action]) -> Callable[..., Response]:
    """The blueprint's Flask view: the same `serve()`, for a request that reaches Flask itself."""

    def dispatch(route: str) -> Response:
        served = serve(
            request.environ, module, actions, route, g.request_id, g._get_current_object(), current_app.config
        )
        g.token_label, g.problem = served.token_label, served.problem
        response = Response(served.body, status=served.status, content_type=served.content_type)
        response.headers.update(served.headers)
        return response

    return dispatch


def module_blueprint(import_name: str, routes: Iterable[Mapping[str, Any]]) -> Blueprint:
    """The blueprint of the module package `import_name`, serving `POST /<module>/<route>`.

    Its `actions` table is what the gateway serves; its POST-only url rules put the module in
    Flask's url map, where every other method is a 405 with `Allow: POST`.
    """
    module = import_name.rpartition('.')[2]
    if module in RESERVED_MODULES:
        raise ValueError(f'module name {module!r} is reserved')
    actions = build_actions(module, routes)
    blueprint = Blueprint(module, import_name, url_prefix=f'/{module}')
    view = make_view(module, actions)
    options = {'methods': ['POST'], 'provide_automatic_options': False}
    blueprint.add_url_rule('/', 'action', view, defaults={'route': ''}, strict_slashes=False, **options)
    blueprint.add_url_rule('/<path:route>', 'action', view, **options)
    blueprint.actions = actions  # type: ignore[attr-defined]
    return blueprint
