"""The benchmark's actions over pgbench's tables: served only when `EXTRA_MODULES` names it."""

from lib import module_blueprint

from .routes import events, routes

blueprint = module_blueprint(__name__, routes, events=events)
