"""The routes Flask serves for the infrastructure, outside the POST space and without a token:
health (`/health/live`, `/health/ready`), the contracts (`/openapi.json` and its page `/docs`,
and the events' `/asyncapi.json`, while API_DOCS is on) and `/metrics` (while METRICS is on).

Readiness is the gate of a rolling update: a replica whose code needs a migration that its
database has not recorded answers 503 naming it, so no request reaches code whose tables or
columns do not exist yet; once `migrate` has run, the next probe answers 200 (one query a
database per probe: the pending check replaces `SELECT 1`).

The page is Swagger UI as the flask-swagger-ui package ships it (its assets are in the wheel, so
nothing comes from a CDN); a developer authorizes with a token and calls the actions of the
same server.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg2
from flask import Blueprint, Flask, Response, request
from flask_swagger_ui import get_swaggerui_blueprint
from marshmallow import Schema, fields
from marshmallow.validate import OneOf
from werkzeug.http import HTTP_STATUS_CODES

from lib.contract.openapi import HEALTH_TAG, RETRY_AFTER_HEADER, docstring_parts
from lib.core.config import Config
from lib.core.errors import RETRY_AFTER_SECONDS, ApiError
from lib.core.json import JSON_MIMETYPE, dumps
from lib.core.record import RequestRecord
from lib.db.connections import Pools
from lib.db.migrations import Migration, pending_on
from lib.observability.metrics import Metrics, scrape
from lib.web.gateway import RECORD_KEY

log = logging.getLogger('dbapi.health')

READY_TIMEOUT_SECONDS = 2.0
STATES = ('ok', 'unavailable', 'migrations pending')
OK, UNAVAILABLE, PENDING = STATES
DOCUMENT_PATH = '/openapi.json'
ASYNCAPI_PATH = '/asyncapi.json'
PAGE_PATH = '/docs'
# Swagger UI's options (its `config` object). No online validator badge: nothing leaves the page.
PAGE_CONFIG = {
    'app_name': 'dbapi: API reference',
    'layout': 'BaseLayout',
    'deepLinking': True,
    'displayOperationId': True,
    'validatorUrl': None,
}


def json_response(value: Any, status: int = 200) -> Response:
    return Response(dumps(value), status=status, mimetype=JSON_MIMETYPE)


class LiveSchema(Schema):
    status = fields.String(required=True, validate=OneOf(['ok']))


class ReadySchema(Schema):
    status = fields.String(required=True, validate=OneOf([OK, UNAVAILABLE]))
    databases = fields.Dict(keys=fields.String(), values=fields.String(validate=OneOf(STATES)), required=True)
    # Each database's pending migrations (`module NNNN_name`), when it has some.
    pending = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))


# What each health route answers, by status: the OpenAPI document shows it.
HEALTH_ANSWERS: dict[str, dict[int, type[Schema]]] = {
    'health.live': {200: LiveSchema},
    'health.ready': {200: ReadySchema, 503: ReadySchema},
}


def health_blueprint(config: Config, pools: Pools, expected: Mapping[str, Sequence[Migration]]) -> Blueprint:
    """`expected`: the migrations each database must have recorded for this code."""
    blueprint = Blueprint('health', __name__, url_prefix='/health')

    @blueprint.get('/live')
    def live() -> Response:
        """The process answers."""
        return json_response({'status': 'ok'})

    def check_database(name: str) -> tuple[str, list[str]]:
        """The database's state, and the labels of its pending migrations: one query."""
        migrations = expected.get(name, ())
        try:
            with pools.get(name).connection(timeout=READY_TIMEOUT_SECONDS) as conn:
                try:
                    if migrations:
                        pending = [migration.label for migration in pending_on(conn, migrations)]
                    else:
                        with conn.cursor() as cursor:
                            cursor.execute('SELECT 1')
                            cursor.fetchone()
                        pending = []
                finally:
                    conn.rollback()
        except psycopg2.Error as error:
            log.warning('readiness: database %r is not answering: %s', name, str(error).strip())
            return UNAVAILABLE, []
        return (PENDING if pending else OK), pending

    @blueprint.get('/ready')
    def ready() -> Response:
        """Every configured database answers, and has recorded every migration this code needs;
        503 names the databases that do not and the migrations pending."""
        checks: dict[str, Any] = {}
        pending: dict[str, list[str]] = {}
        for name in config.databases:
            checks[name], waiting = check_database(name)
            if waiting:
                pending[name] = waiting
        healthy = all(state == OK for state in checks.values())
        body: dict[str, Any] = {'status': OK if healthy else UNAVAILABLE, 'databases': checks}
        if pending:
            body['pending'] = pending
        response = json_response(body, 200 if healthy else 503)
        if not healthy:
            response.headers['Retry-After'] = RETRY_AFTER_SECONDS
            record: RequestRecord | None = request.environ.get(RECORD_KEY)
            if record is not None:  # the access record says why
                record.problem = not_ready(checks, pending)
        return response

    return blueprint


def not_ready(checks: Mapping[str, str], pending: Mapping[str, list[str]]) -> ApiError:
    if pending:
        detail = '; '.join(f'database {db!r}: migrations pending: {", ".join(names)}' for db, names in pending.items())
        return ApiError(503, 'migrations-pending', f'{detail} (flask --app app migrate)')
    down = ', '.join(repr(name) for name, state in checks.items() if state != OK)
    return ApiError(503, 'database-unavailable', f'database {down} not answering')


def docs_blueprints(app: Flask, document: bytes, events: bytes) -> None:
    """GET /openapi.json (`document`, built once) and its page, GET /docs; GET /asyncapi.json
    (`events`, the AsyncAPI document of the declared events)."""
    blueprint = Blueprint('openapi', __name__)

    @blueprint.get(DOCUMENT_PATH)
    def openapi_json() -> Response:
        """The OpenAPI document, built once when the app was made."""
        return Response(document, mimetype=JSON_MIMETYPE)

    @blueprint.get(ASYNCAPI_PATH)
    def asyncapi_json() -> Response:
        """The AsyncAPI document of the declared events, built once when the app was made."""
        return Response(events, mimetype=JSON_MIMETYPE)

    app.register_blueprint(blueprint)
    app.register_blueprint(get_swaggerui_blueprint(PAGE_PATH, DOCUMENT_PATH, config=PAGE_CONFIG, blueprint_name='docs'))
    # The blueprint's page is `/docs/`; `/docs` answers the same page instead of a redirect to it.
    endpoint, _ = app.url_map.bind('localhost').match(f'{PAGE_PATH}/')
    app.add_url_rule(PAGE_PATH, 'docs_page', app.view_functions[endpoint])


def metrics_blueprint(metrics: Metrics) -> Blueprint:
    blueprint = Blueprint('metrics', __name__)

    @blueprint.get('/metrics')
    def scrape_metrics() -> Response:
        """The replica's series, in Prometheus' text format or OpenMetrics, as the scraper asks."""
        body, content_type = scrape(metrics, request.headers.get('Accept', ''))
        return Response(body, content_type=content_type)

    return blueprint


def health_operations(app: Flask) -> list[tuple[str, dict[str, Any]]]:
    """Each health route of the app's url map as an OpenAPI path item: what HEALTH_ANSWERS says it
    answers, no security."""
    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint not in HEALTH_ANSWERS:
            continue
        answers = {
            str(status): {
                'description': HTTP_STATUS_CODES[status],
                'content': {JSON_MIMETYPE: {'schema': schema}},
                **({'headers': RETRY_AFTER_HEADER} if status == 503 else {}),
            }
            for status, schema in HEALTH_ANSWERS[rule.endpoint].items()
        }
        view = app.view_functions[rule.endpoint]
        get = {'operationId': rule.endpoint, 'tags': [HEALTH_TAG], **docstring_parts(view), 'responses': answers}
        found.append((rule.rule, {'get': get}))
    return found
