"""A module for tests only: actions that exercise every path of the machinery."""

from lib import module_blueprint

from .routes import routes

blueprint = module_blueprint(__name__, routes)
