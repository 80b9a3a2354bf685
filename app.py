"""The application factory, and the module-level `app` that `gunicorn app:app` serves.

`create_app` assembles the layers of lib/ (docs/architecture.md) around one configuration object:
the pools, the action registry (from the module blueprints), the pipeline, the infrastructure
routes Flask serves, the access records and metrics, and last the gateway, the WSGI entry.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib import import_module
from typing import Any

import orjson
from flask import Flask

import settings
from lib.auth.callers import callers_of
from lib.auth.jwt_verifier import JwtVerifier
from lib.contract.openapi import document
from lib.core.config import APP_ID, ConfigError, load, project_version
from lib.db.connections import POOLS_KEY, Pools
from lib.db.migrations import expected_migrations
from lib.db.pool import ConnectionPool
from lib.events import asyncapi
from lib.events.metrics import OutboxCollector
from lib.observability.access_log import AccessRecords, MeteredRecords
from lib.observability.logging_setup import setup_logging
from lib.observability.metrics import Metrics
from lib.pipeline.path import Pipeline
from lib.server import cli
from lib.web.blueprints import registry_of
from lib.web.compression import compress_flask_response
from lib.web.flask_app import (
    CONFIG_KEY,
    METRICS_KEY,
    PIPELINE_KEY,
    REGISTRY_KEY,
    ORJSONProvider,
    init_error_handlers,
)
from lib.web.gateway import Gateway
from lib.web.infrastructure import docs_blueprints, health_blueprint, health_operations, metrics_blueprint


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """A configured app; `overrides` replace settings by name (tests use them)."""
    config = load(settings.MODULES, overrides)
    setup_logging(config.log, config.environment, config.process_id)
    app = Flask(APP_ID)
    app.config.update(
        DEBUG=config.debug,
        MAX_CONTENT_LENGTH=config.max_content_length,
    )
    app.extensions[CONFIG_KEY] = config
    app.json = ORJSONProvider(app)
    # `//` in a path would be answered with an HTML 308 redirect (routing bypasses the error
    # handlers); a POST API has one spelling per action, anything else is a JSON 404.
    app.url_map.merge_slashes = False
    app.after_request(compress_flask_response(config.compress_min_size))  # the gateway compresses actions'
    pools = app.extensions[POOLS_KEY] = Pools(config)
    cli.init_app(app)  # flask --app app actions | new-module | migrate | new-migration | openapi | new-token
    for name in config.modules:
        app.register_blueprint(import_module(name).blueprint)
    # /health/live, /health/ready: readiness waits for the migrations this code needs.
    app.register_blueprint(health_blueprint(config, pools, expected_migrations(config)))
    registry = app.extensions[REGISTRY_KEY] = registry_of(app)
    verifier = None if config.jwt is None else JwtVerifier(config.jwt)
    pipeline = app.extensions[PIPELINE_KEY] = Pipeline(config, registry, callers_of(config), verifier, pools)
    init_error_handlers(app, pipeline)
    if config.api_docs:
        events = asyncapi.document(registry.events, project_version(), APP_ID)
        events_document = orjson.dumps(events, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        docs_blueprints(app, document(registry, config, health_operations(app)), events_document)
    records = AccessRecords(config.proxy_hops)
    if config.metrics:
        # dbapi_outbox_pending and _oldest_age_seconds: read from each database at scrape time
        outbox = OutboxCollector(lambda: [pools.get(name) for name in config.databases])
        metrics = app.extensions[METRICS_KEY] = Metrics(config, pools.stats, [outbox])
        ConnectionPool.observer = metrics  # every pool of the process: the series are the process's
        app.register_blueprint(metrics_blueprint(metrics))
        records = MeteredRecords(config.proxy_hops, metrics)
    # The WSGI entry, last: every request's id, record and access record; actions and batches to
    # the pipeline, the rest to Flask.
    app.wsgi_app = Gateway(app, config, registry, pipeline, records)  # type: ignore[method-assign]
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
