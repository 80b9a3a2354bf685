"""Health for the infrastructure: the only non-POST routes, without auth and without data."""

from __future__ import annotations

from typing import Any

import psycopg2
from flask import Blueprint, Response, current_app
from marshmallow import Schema, fields
from marshmallow.validate import OneOf

from lib.db import pools
from lib.errors import RETRY_AFTER_SECONDS
from lib.json import json_response

READY_TIMEOUT_SECONDS = 2.0

blueprint = Blueprint('health', __name__, url_prefix='/health')
STATES = ('ok', 'unavailable')


class LiveSchema(Schema):
    status = fields.String(required=True, validate=OneOf(['ok']))


class ReadySchema(Schema):
    status = fields.String(required=True, validate=OneOf(STATES))
    databases = fields.Dict(keys=fields.String(), values=fields.String(validate=OneOf(STATES)), required=True)


@blueprint.get('/live')
def live() -> Response:
    """The process answers."""
    return json_response({'status': 'ok'})


def check_database(name: str) -> str:
    try:
        with pools().get(name).connection(timeout=READY_TIMEOUT_SECONDS) as conn, conn.cursor() as cursor:
            cursor.execute('SELECT 1')
            cursor.fetchone()
            conn.rollback()
    except psycopg2.Error as error:
        current_app.logger.warning('readiness: database %r is not answering: %s', name, str(error).strip())
        return 'unavailable'
    return 'ok'


@blueprint.get('/ready')
def ready() -> Response:
    """Every configured database answers `SELECT 1`; 503 names those that do not."""
    checks: dict[str, Any] = {name: check_database(name) for name in current_app.config['DATABASES']}
    healthy = all(state == 'ok' for state in checks.values())
    body = {'status': 'ok' if healthy else 'unavailable', 'databases': checks}
    response = json_response(body, 200 if healthy else 503)
    if not healthy:
        response.headers['Retry-After'] = RETRY_AFTER_SECONDS
    return response


# What each route answers, by status: the OpenAPI document (lib.openapi) shows it.
ANSWERS: dict[str, dict[int, type[Schema]]] = {
    'health.live': {200: LiveSchema},
    'health.ready': {200: ReadySchema, 503: ReadySchema},
}
