"""A module for the Idempotency-Key and batch tests: appends that are not idempotent by themselves,
and actions that fail in each way a retry must tell apart."""

from lib import module_blueprint

from .routes import routes

blueprint = module_blueprint(__name__, routes)
