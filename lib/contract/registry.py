"""The one registry of actions: each module's routes table checked into `Action` records.

Everything that lists or finds actions reads this registry: the web layer's dispatch, the
batch's steps, the metrics' labels (through the request record), the OpenAPI document and the
CLI. It is built once per app from the module blueprints (lib.web.blueprints).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema

from lib.contract.declarations import CONN_ATTR, RETURNS_ATTR, SCHEMA_ATTR
from lib.db.connections import ConnSpec
from lib.events.outbox import EventType

BATCH = 'batch'  # POST /batch: the module name it reserves, and its Idempotency-Key's action
BATCH_PATH = f'/{BATCH}'
# Paths of the service's own (Flask's infrastructure routes, /batch), never a module's.
RESERVED_MODULES = frozenset({'health', 'docs', 'openapi', 'metrics', BATCH, 'asyncapi'})
ROOT_ENDPOINT = 'index'  # the endpoint name of a module's '' route (`POST /<module>/`)


@dataclass(frozen=True, slots=True)
class Action:
    module: str
    route: str
    name: str  # `module/route`: what scopes, batches and the logs call it
    function: Callable[..., Any]
    schema: Schema | None  # `@use_schema`: the body is loaded by it
    conn: ConnSpec | None  # `@inject_conn`: the connection it is passed
    returns: Schema | None = None  # `@returns`: the result is dumped through it


def build_actions(module: str, routes: Iterable[Mapping[str, Any]]) -> dict[str, Action]:
    """The routes table checked and indexed by route name; errors name the bad entry."""
    if module in RESERVED_MODULES:
        raise ValueError(f'module name {module!r} is reserved')
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
        actions[route] = Action(module, route, f'{module}/{route}', function, schema, spec, returned)
    return actions


class Registry:
    """Every module's actions, by module and route, in registration order."""

    def __init__(
        self,
        tables: Mapping[str, Mapping[str, Action]],
        packages: Mapping[str, str] | None = None,
        events: Iterable[EventType] = (),
    ) -> None:
        self.modules: dict[str, Mapping[str, Action]] = dict(tables)  # module -> route -> Action
        self.packages = dict(packages or {})  # module -> its package's import name (`modules.example`)
        self.events = list(events)  # the events the modules declare (the AsyncAPI document, the CLI)

    def __iter__(self) -> Iterator[Action]:
        for actions in self.modules.values():
            yield from actions.values()

    def find(self, name: str) -> Action | None:
        """The action `module/route` names, or None."""
        module, _, route = name.partition('/')
        actions = self.modules.get(module)
        return None if actions is None else actions.get(route)
