"""Health for the infrastructure: the only non-POST routes, without auth and without data.

Readiness is the gate of a rolling update: a replica whose code needs a migration that its
database has not recorded answers 503 naming it, so no request reaches code whose tables or
columns do not exist yet; once `migrate` has run, the next probe answers 200 (one query a
database per probe: the pending check replaces `SELECT 1`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2
from flask import Blueprint, Flask, Response, current_app
from marshmallow import Schema, fields
from marshmallow.validate import OneOf

from lib.config import ConfigError
from lib.db import pools
from lib.decorators import DEFAULT_DATABASE
from lib.errors import RETRY_AFTER_SECONDS, ApiError
from lib.json import json_response
from lib.migrations import Migration, MigrationError, by_database, pending_on
from lib.scope import current_scope

READY_TIMEOUT_SECONDS = 2.0
MIGRATIONS_KEY = 'dbapi.migrations'  # app.extensions: {database: the migrations this code needs there}

blueprint = Blueprint('health', __name__, url_prefix='/health')
STATES = ('ok', 'unavailable', 'migrations pending')
OK, UNAVAILABLE, PENDING = STATES


class LiveSchema(Schema):
    status = fields.String(required=True, validate=OneOf(['ok']))


class ReadySchema(Schema):
    status = fields.String(required=True, validate=OneOf([OK, UNAVAILABLE]))
    databases = fields.Dict(keys=fields.String(), values=fields.String(validate=OneOf(STATES)), required=True)
    # Each database's pending migrations (`module NNNN_name`), when it has some.
    pending = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))


def init_app(app: Flask) -> None:
    """The health routes, and the migrations each database must have recorded for this code
    (found once, at start: a misnamed file or a leftover schema.sql stops the start)."""
    try:
        app.extensions[MIGRATIONS_KEY] = by_database(app.config['MODULES'], app.config['DATABASES'], DEFAULT_DATABASE)
    except MigrationError as error:
        raise ConfigError(str(error)) from None
    app.register_blueprint(blueprint)


@blueprint.get('/live')
def live() -> Response:
    """The process answers."""
    return json_response({'status': 'ok'})


def check_database(name: str, expected: Sequence[Migration]) -> tuple[str, list[str]]:
    """The database's state, and the labels of its pending migrations: one query."""
    try:
        with pools().get(name).connection(timeout=READY_TIMEOUT_SECONDS) as conn:
            try:
                if expected:
                    pending = [migration.label for migration in pending_on(conn, expected)]
                else:
                    with conn.cursor() as cursor:
                        cursor.execute('SELECT 1')
                        cursor.fetchone()
                    pending = []
            finally:
                conn.rollback()
    except psycopg2.Error as error:
        current_app.logger.warning('readiness: database %r is not answering: %s', name, str(error).strip())
        return UNAVAILABLE, []
    return (PENDING if pending else OK), pending


@blueprint.get('/ready')
def ready() -> Response:
    """Every configured database answers, and has recorded every migration this code needs;
    503 names the databases that do not and the migrations pending."""
    expected = current_app.extensions[MIGRATIONS_KEY]
    checks: dict[str, Any] = {}
    pending: dict[str, list[str]] = {}
    for name in current_app.config['DATABASES']:
        checks[name], waiting = check_database(name, expected.get(name, ()))
        if waiting:
            pending[name] = waiting
    healthy = all(state == OK for state in checks.values())
    body: dict[str, Any] = {'status': OK if healthy else UNAVAILABLE, 'databases': checks}
    if pending:
        body['pending'] = pending
    response = json_response(body, 200 if healthy else 503)
    if not healthy:
        response.headers['Retry-After'] = RETRY_AFTER_SECONDS
        scope = current_scope()
        if scope is not None:  # the access record says why
            scope.problem = not_ready(checks, pending)
    return response


def not_ready(checks: dict[str, str], pending: dict[str, list[str]]) -> ApiError:
    if pending:
        detail = '; '.join(f'database {db!r}: migrations pending: {", ".join(names)}' for db, names in pending.items())
        return ApiError(503, 'migrations-pending', f'{detail} (flask --app app migrate)')
    down = ', '.join(repr(name) for name, state in checks.items() if state != OK)
    return ApiError(503, 'database-unavailable', f'database {down} not answering')


# What each route answers, by status: the OpenAPI document (lib.openapi) shows it.
ANSWERS: dict[str, dict[int, type[Schema]]] = {
    'health.live': {200: LiveSchema},
    'health.ready': {200: ReadySchema, 503: ReadySchema},
}
