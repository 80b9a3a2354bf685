"""The application factory, and the module-level `app` that `gunicorn app:app` serves."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib import import_module
from typing import Any

from flask import Flask
from flask_compress import Compress

from lib import api_docs, cli, db, errors, gateway, health, metrics
from lib.config import ConfigError, build_config
from lib.errors import PROBLEM_JSON
from lib.json import JSON_MIMETYPE, ORJSONProvider
from lib.logger import setup_logging
from settings import APP_ID

COMPRESSED_MIMETYPES = [JSON_MIMETYPE, PROBLEM_JSON]


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """A configured app; `overrides` replace settings (tests use them)."""
    config = build_config(overrides)
    setup_logging(**config.get('LOGGING', {}))
    app = Flask(APP_ID)
    app.config.update(config, COMPRESS_MIMETYPES=COMPRESSED_MIMETYPES, COMPRESS_ALGORITHM=['zstd', 'br', 'gzip'])
    app.json = ORJSONProvider(app)
    # `//` in a path would be answered with an HTML 308 redirect (routing bypasses the error
    # handlers); a POST API has one spelling per action, anything else is a JSON 404.
    app.url_map.merge_slashes = False
    app.extensions['compress'] = Compress(app)
    errors.init_app(app)
    db.init_app(app)
    cli.init_app(app)  # flask --app app actions | new-module | migrate | new-migration | openapi | new-token
    health.init_app(app)  # /health/live, /health/ready (and the migrations readiness waits for)
    for name in config['MODULES']:
        app.register_blueprint(import_module(name).blueprint)
    # GET /openapi.json and /docs: the contract, built once from the modules registered above.
    api_docs.init_app(app)
    # GET /metrics (METRICS=1) and the metrics step the gateway runs after each access record.
    metrics.init_app(app)
    # The WSGI entry: request scope and access record for every request, and the one path of
    # action requests; the rest goes to Flask (lib/gateway.py).
    gateway.init_app(app)
    return app


def __getattr__(name: str) -> Flask:
    """`app` is built on first use, so importing `create_app` (tests) configures nothing."""
    if name != 'app':
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    try:
        application = create_app()
    except ConfigError as error:
        # One clear line instead of a traceback; gunicorn's master checks the same at start.
        sys.stderr.write(f'dbapi: configuration error: {error}\n')
        raise SystemExit(3) from None
    globals()['app'] = application
    return application
