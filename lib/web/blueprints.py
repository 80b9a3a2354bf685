"""A module's blueprint: its routes table checked into the registry's `Action` records, and one
POST url rule per action so that Flask's url map (`flask routes`) lists every action."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flask import Blueprint, Flask

from lib.contract.registry import ROOT_ENDPOINT, Action, Registry, build_actions
from lib.events.outbox import EventType, declare
from lib.pipeline.input import data_checks


class ModuleBlueprint(Blueprint):
    """A module's blueprint, carrying its checked routes table (`actions`) and its declared events."""

    def __init__(
        self, module: str, import_name: str, actions: dict[str, Action], events: tuple[EventType, ...] = ()
    ) -> None:
        super().__init__(module, import_name, url_prefix=f'/{module}')
        self.actions = actions
        self.events = events


def module_blueprint(
    import_name: str, routes: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]] = ()
) -> ModuleBlueprint:
    """The blueprint of the module package `import_name` (a module's `__init__.py` passes its
    `__name__` and its `routes` table); `events` are the events its actions `emit`
    (`dict(type='user.saved', schema=UserSavedSchema)`: lib.events.outbox).

    The rules carry no view function: the gateway (lib.web.gateway) answers every path under the
    module's prefix through the pipeline, so Flask's routing never dispatches one.
    """
    module = import_name.rpartition('.')[2]
    actions = build_actions(module, routes)
    blueprint = ModuleBlueprint(module, import_name, actions, declare(module, events, data_checks))
    for route in actions:
        endpoint = route.replace('.', '_') or ROOT_ENDPOINT
        blueprint.add_url_rule(f'/{route}', endpoint, methods=['POST'], provide_automatic_options=False)
    return blueprint


def module_blueprints(app: Flask) -> list[ModuleBlueprint]:
    """The app's module blueprints, in registration order."""
    return [blueprint for blueprint in app.blueprints.values() if isinstance(blueprint, ModuleBlueprint)]


def registry_of(app: Flask) -> Registry:
    """The one registry of the app's actions, from its module blueprints."""
    blueprints = module_blueprints(app)
    return Registry(
        {blueprint.name: blueprint.actions for blueprint in blueprints},
        {blueprint.name: blueprint.import_name for blueprint in blueprints},
        [event for blueprint in blueprints for event in blueprint.events],
    )
