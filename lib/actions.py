"""From a module's routes table to a Flask blueprint: the only Flask plumbing a module gets.

Every route the helper makes is POST-only and behind Bearer auth (a blueprint-wide
`before_request`), so a module cannot forget auth by stacking decorators in the wrong order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Blueprint, Response, request
from gunicorn.http.errors import ParseException
from marshmallow import Schema

from lib.auth import require_bearer
from lib.db import connection
from lib.decorators import CONN_ATTR, SCHEMA_ATTR, ConnSpec
from lib.errors import ApiError, bad_request
from lib.json import contains_nul, json_response

RESERVED_MODULES = frozenset({'health'})
MAX_NAME_IN_MESSAGE = 80


@dataclass(frozen=True, slots=True)
class Action:
    module: str
    route: str
    function: Callable[..., Any]
    schema: Schema | None
    conn: ConnSpec | None

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
        actions[route] = Action(module, route, function, getattr(function, SCHEMA_ATTR, None), spec)
    return actions


def read_data() -> bytes:
    """The raw body. Broken chunked framing, or a client gone mid-body, is the client's error."""
    try:
        return request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: werkzeug raises 413
    except (ParseException, OSError) as error:
        # gunicorn parses chunked bodies only as the app reads them: its errors surface here.
        raise bad_request(f'the body could not be read: {str(error)[:MAX_NAME_IN_MESSAGE]}') from None


def read_body() -> dict[str, Any]:
    """The request body as a JSON object; an empty body is an empty object."""
    if not request.content_length and 'chunked' not in request.headers.get('Transfer-Encoding', ''):
        return {}
    mimetype = request.mimetype
    if mimetype != 'application/json' and not mimetype.endswith('+json'):
        raise ApiError(415, 'unsupported-media-type', f'the body must be application/json, not {mimetype!r}')
    data = read_data()
    if not data:
        return {}
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


def arguments(action: Action, body: dict[str, Any]) -> dict[str, Any]:
    if action.schema is not None:
        return action.schema.load(body)  # ValidationError -> 422 naming the fields
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
    with connection(spec.database, spec.named, spec.autocommit) as conn:
        result = action.function(conn=conn, **kwargs)
        if not conn.autocommit:
            conn.commit()
    return result


def make_view(module: str, actions: dict[str, Action]) -> Callable[..., Response]:
    def dispatch(route: str) -> Response:
        action = actions.get(route)
        if action is None:
            raise ApiError(404, 'not-found', f'module {module!r} has no action {route[:MAX_NAME_IN_MESSAGE]!r}')
        return json_response(run(action, read_body()))

    return dispatch


def module_blueprint(import_name: str, routes: Iterable[Mapping[str, Any]]) -> Blueprint:
    """The blueprint of the module package `import_name`, serving `POST /<module>/<route>`."""
    module = import_name.rpartition('.')[2]
    if module in RESERVED_MODULES:
        raise ValueError(f'module name {module!r} is reserved')
    actions = build_actions(module, routes)
    blueprint = Blueprint(module, import_name, url_prefix=f'/{module}')
    blueprint.before_request(require_bearer)
    view = make_view(module, actions)
    options = {'methods': ['POST'], 'provide_automatic_options': False}
    blueprint.add_url_rule('/', 'action', view, defaults={'route': ''}, strict_slashes=False, **options)
    blueprint.add_url_rule('/<path:route>', 'action', view, **options)
    blueprint.actions = actions  # type: ignore[attr-defined]
    return blueprint
