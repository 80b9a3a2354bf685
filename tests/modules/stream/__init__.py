"""A module for the events tests: appends to streams whose events must arrive exactly as
committed, and actions that emit wrongly (each a 500 that commits nothing)."""

from lib import module_blueprint

from .routes import events, routes

blueprint = module_blueprint(__name__, routes, events=events)
