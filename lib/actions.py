"""A module's actions: its routes table checked into `Action` records, the blueprint that lists
them in Flask's url map, and `serve()`, the one path that answers an action request.

`serve()` reads straight through the steps of a request, each owned by its own file:
the caller (lib.auth), the action and its method, the caller's scope for it (lib.auth), the
body (lib.body), validation (lib.validation), the Idempotency-Key (lib.idempotency), the
connection and its transaction (lib.transaction), the call and its answer (lib.answer: dumped
through the action's `@returns` schema when it declares one). Any failure becomes one problem
answer (lib.errors), in one place. `POST /batch` (lib.batch) runs the same steps per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask
from marshmallow import Schema
from psycopg2.extensions import connection as Connection

from lib import transaction
from lib.answer import Served, answer, problem_answer
from lib.auth import authenticate, authorize
from lib.body import read_body
from lib.db import give_back_borrowed
from lib.decorators import CONN_ATTR, RETURNS_ATTR, SCHEMA_ATTR, ConnSpec
from lib.errors import ApiError, to_problem
from lib.events.outbox import EventType, declare
from lib.idempotency import Claim, claim_of
from lib.scope import RequestScope
from lib.validation import arguments

RESERVED_MODULES = frozenset({'health', 'docs', 'openapi', 'metrics', 'batch'})  # Flask's blueprints, /batch
MAX_NAME_IN_MESSAGE = 80
ALLOW_POST = {'Allow': 'POST'}
ROOT_ENDPOINT = 'index'  # the endpoint name of a module's '' route (`POST /<module>/`)


@dataclass(frozen=True, slots=True)
class Action:
    module: str
    route: str
    function: Callable[..., Any]
    schema: Schema | None
    conn: ConnSpec | None
    returns: Schema | None = None  # `@returns`: the result is dumped through it

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
        schema, returned = getattr(function, SCHEMA_ATTR, None), getattr(function, RETURNS_ATTR, None)
        actions[route] = Action(module, route, function, schema, spec, returned)
    return actions


def find_action(actions: Mapping[str, Action], module: str, route: str, method: str) -> Action:
    """The action `POST /<module>/<route>` names: 404 when there is none, 405 for another method."""
    action = actions.get(route)
    if action is None:
        raise ApiError(404, 'not-found', f'module {module!r} has no action {route[:MAX_NAME_IN_MESSAGE]!r}')
    if method != 'POST':
        raise ApiError(
            405, 'method-not-allowed', f'actions are called with POST, not {method[:16]}', headers=ALLOW_POST
        )
    return action


def call(action: Action, kwargs: dict[str, Any], claim: Claim | None, scope: RequestScope) -> Served:
    """The action's answer. One with a connection runs in its transaction (lib.transaction),
    committed with its answer made (unless autocommit), rolled back when it raises."""
    if action.conn is None:
        return answer(action.returns, action.function(**kwargs))

    def work(conn: Connection) -> Served:
        return answer(action.returns, action.function(conn=conn, **kwargs))

    return transaction.run(action.conn, work, claim, scope)


def serve(
    scope: RequestScope,
    environ: Mapping[str, Any],
    actions: Mapping[str, Action],
    route: str,
    config: Mapping[str, Any],
) -> Served:
    """Answer a request for `/<scope.module>/<route>`; every failure becomes a problem answer,
    and whatever the request borrowed from a pool is back there when this returns."""
    try:
        caller = authenticate(environ.get('HTTP_AUTHORIZATION', ''), config['CALLERS'], config['JWT'])
        scope.caller = caller.name
        action = find_action(actions, scope.module or '', route, environ.get('REQUEST_METHOD', ''))
        scope.action = route
        authorize(caller, action.module, action.name)
        data, body = read_body(environ, config['MAX_CONTENT_LENGTH'])
        kwargs = arguments(action.schema, body)
        claim = claim_of(scope, environ, caller.name, action.name, action.conn, data, config['IDEMPOTENCY_TTL'])
        return call(action, kwargs, claim, scope)
    except Exception as error:  # noqa: BLE001 - every failure becomes a problem answer
        return problem_answer(to_problem(error), scope)
    finally:
        give_back_borrowed(scope)


class ModuleBlueprint(Blueprint):
    """A module's blueprint, carrying its checked routes table and its declared events."""

    def __init__(
        self, module: str, import_name: str, actions: dict[str, Action], events: tuple[EventType, ...] = ()
    ) -> None:
        super().__init__(module, import_name, url_prefix=f'/{module}')
        self.actions = actions
        self.events = events


def module_blueprints(app: Flask) -> list[ModuleBlueprint]:
    """The app's module blueprints, in registration order: what every derived view of the
    actions (the gateway, the CLI, the contract, the metrics) reads."""
    return [blueprint for blueprint in app.blueprints.values() if isinstance(blueprint, ModuleBlueprint)]


def module_tables(app: Flask) -> dict[str, Mapping[str, Action]]:
    """Each module's name and its actions by route."""
    return {blueprint.name: blueprint.actions for blueprint in module_blueprints(app)}


def module_actions(app: Flask) -> list[Action]:
    """Every action of every module, in registration order."""
    return [action for blueprint in module_blueprints(app) for action in blueprint.actions.values()]


def module_events(app: Flask) -> list[EventType]:
    """Every event the app's modules declare, in registration order (the AsyncAPI document, the CLI)."""
    return [event for blueprint in module_blueprints(app) for event in blueprint.events]


def module_blueprint(
    import_name: str, routes: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]] = ()
) -> ModuleBlueprint:
    """The blueprint of the module package `import_name`: its `actions` table, and one POST url
    rule per action so that Flask's url map (`flask routes`) lists every action. `events` are the
    events its actions `emit` (lib.events.outbox: `dict(type='user.saved', schema=...)`).

    The rules carry no view function: `lib.gateway` answers every path under the module's
    prefix with `serve()`, so Flask's routing never dispatches one.
    """
    module = import_name.rpartition('.')[2]
    if module in RESERVED_MODULES:
        raise ValueError(f'module name {module!r} is reserved')
    actions = build_actions(module, routes)
    blueprint = ModuleBlueprint(module, import_name, actions, declare(module, events))
    for route in actions:
        endpoint = route.replace('.', '_') or ROOT_ENDPOINT
        blueprint.add_url_rule(f'/{route}', endpoint, methods=['POST'], provide_automatic_options=False)
    return blueprint
