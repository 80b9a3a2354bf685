"""A module for the pgbouncer tests: what an action sees of the statement timeout, prepared reads."""

from lib import module_blueprint

from .routes import routes

blueprint = module_blueprint(__name__, routes)
