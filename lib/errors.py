"""Every error becomes one JSON shape: RFC 9457 `application/problem+json`.

One place maps exceptions to statuses: HTTP errors keep theirs, psycopg2 errors go through
the SQLSTATE table below. The client gets a title, a detail and the request id; the log gets
the traceback and the SQL error, never the client.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg2
from flask import Flask, Response
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from lib.http import new_request_id
from lib.json import json_response
from lib.pool import PoolTimeout
from lib.scope import current_scope

log = logging.getLogger('dbapi.errors')

PROBLEM_JSON = 'application/problem+json'
RETRY_AFTER_SECONDS = '1'

# SQLSTATE (exact code, or its two-character class) -> (HTTP status, problem slug).
# https://www.postgresql.org/docs/current/errcodes-appendix.html
SQLSTATE_STATUS: dict[str, tuple[int, str]] = {
    '23505': (409, 'unique-violation'),
    '23503': (409, 'foreign-key-violation'),
    '23P01': (409, 'exclusion-violation'),
    '40001': (409, 'serialization-failure'),
    '40P01': (409, 'deadlock-detected'),
    '23502': (400, 'not-null-violation'),
    '23514': (400, 'check-violation'),
    '22': (400, 'data-exception'),
    '57014': (504, 'statement-timeout'),
    '57P01': (503, 'database-unavailable'),  # admin shutdown
    '57P02': (503, 'database-unavailable'),  # crash shutdown
    '57P03': (503, 'database-unavailable'),  # cannot connect now (starting up)
    '08': (503, 'database-unavailable'),  # connection exception
    '53': (503, 'database-unavailable'),  # insufficient resources, too many connections
    '25P03': (503, 'database-unavailable'),  # idle-in-transaction timeout
    '26000': (503, 'prepared-statement-missing'),  # its session is gone; the connection was closed
}
# What an error means, for the log line, by SQLSTATE, then by the words of a message that has
# none (libpq's and pgbouncer's connection errors come without one).
CAUSES_BY_CODE = {
    '26000': 'the session that prepared the statement is gone: the connection was reset (DISCARD ALL, a restart)'
    ' or a transaction pooler gave this transaction another server session; lib/prepared.py closed the'
    ' connection, so a retry prepares afresh, but an action cannot PREPARE statements of its own behind pgbouncer',
    '25001': 'on a database behind pgbouncer (<NAME>_DB_PGBOUNCER) each autocommit statement runs in a transaction'
    ' block with its SET LOCAL statement_timeout: run this one against a direct database',
}
CAUSES_BY_MESSAGE = (
    (
        'no more connections allowed (max_client_conn)',
        "pgbouncer's max_client_conn is reached: (API_REPLICAS + 1) x workers x POOL_SIZE must stay under it",
    ),
    (
        'server login has been failing',
        'pgbouncer cannot log in to PostgreSQL (down, or refusing the user); it tries again after server_login_retry',
    ),
    (
        'query_wait_timeout',
        'pgbouncer had no server connection to give within query_wait_timeout: PostgreSQL is down or its pool is full',
    ),
    ('server conn crashed', 'the PostgreSQL session behind pgbouncer ended mid-request: a restart or a crash'),
    (
        'unsupported startup parameter',
        'pgbouncer refuses a startup parameter: set <NAME>_DB_PGBOUNCER=transaction for a database behind pgbouncer',
    ),
    (
        'server closed the connection unexpectedly',
        'PostgreSQL restarted or crashed, or a pgbouncer in front of it stopped or gave up waiting for a server'
        ' connection (query_wait_timeout); their logs say which',
    ),
    ('Connection refused', 'nothing listens at the database address: PostgreSQL (or pgbouncer) is down'),
)
# Statuses whose cause is the client's input: the database's own message is safe and useful.
CLIENT_STATUSES = {400, 409}


class ApiError(Exception):
    """An error with a status, a short title and a detail for the client."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        errors: Any = None,
        headers: dict[str, str] | None = None,
        members: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.members = members  # RFC 9457 extension members of the document (a batch's `step`, `action`)


def bad_request(detail: str) -> ApiError:
    return ApiError(400, 'bad-request', detail)


# For actions: `raise not_found(...)` answers that problem, and the transaction rolls back.
def not_found(detail: str) -> ApiError:
    """404: what the body names does not exist."""
    return ApiError(404, 'not-found', detail)


def conflict(detail: str, errors: Any = None) -> ApiError:
    """409: the request clashes with the data as it is (a duplicate, a stale version)."""
    return ApiError(409, 'conflict', detail, errors=errors)


def unprocessable(detail: str, errors: dict[str, list[str]] | None = None) -> ApiError:
    """422: the body is well formed but cannot be acted on; `errors` names fields as validation does."""
    return ApiError(422, 'validation-error', detail, errors=errors)


def classify_database_error(error: psycopg2.Error) -> tuple[int, str]:
    """(status, slug) for a psycopg2 error: by SQLSTATE, then by class, then by kind."""
    if isinstance(error, PoolTimeout):
        return 503, 'pool-timeout'
    code = error.pgcode or ''
    for key in (code, code[:2]):
        if key in SQLSTATE_STATUS:
            return SQLSTATE_STATUS[key]
    if isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) and not code:
        return 503, 'database-unavailable'  # no SQLSTATE: the connection itself failed
    return 500, 'internal-error'


def cause(error: psycopg2.Error) -> str:
    """What `error` means when its text alone would not say (pooler and connection errors), or ''."""
    known = CAUSES_BY_CODE.get(error.pgcode or '')
    if known:
        return f' ({known})'
    text = str(error)
    return next((f' ({meaning})' for words, meaning in CAUSES_BY_MESSAGE if words in text), '')


def database_problem(error: psycopg2.Error) -> ApiError:
    scope = current_scope()
    if scope is not None:
        scope.database_error = error  # lib.metrics counts it by database and SQLSTATE class
    status, slug = classify_database_error(error)
    headers = {'Retry-After': RETRY_AFTER_SECONDS} if status == 503 else None
    if status in CLIENT_STATUSES:
        diag = error.diag
        errors = {'constraint': diag.constraint_name} if diag.constraint_name else None
        return ApiError(status, slug, diag.message_primary or slug, errors=errors)
    if status == 503:
        log.warning('database unavailable: %s: %s%s', type(error).__name__, str(error).strip(), cause(error))
        return ApiError(status, slug, 'the database is unavailable, retry shortly', headers=headers)
    if status == 504:
        log.warning('statement timeout: %s', str(error).strip())
        return ApiError(status, slug, 'the statement took longer than the configured statement_timeout')
    log.error('database error %s%s', error.pgcode, cause(error), exc_info=error)
    return ApiError(500, 'internal-error', 'internal error; the request id finds it in the logs')


def to_problem(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ValidationError):
        return ApiError(422, 'validation-error', 'the body failed validation', errors=error.messages)
    if isinstance(error, psycopg2.Error):
        return database_problem(error)
    if isinstance(error, HTTPException):
        headers = {k: v for k, v in error.get_headers() if k.lower() in {'allow', 'www-authenticate', 'retry-after'}}
        slug = (error.name or 'error').lower().replace(' ', '-')
        return ApiError(error.code or 500, slug, error.description or error.name, headers=headers)
    log.error('unhandled %s', type(error).__name__, exc_info=error)
    return ApiError(500, 'internal-error', 'internal error; the request id finds it in the logs')


def problem_document(error: ApiError, request_id: str) -> dict[str, Any]:
    """The RFC 9457 body of `error`: the one shape of every error, whichever layer answers."""
    body: dict[str, Any] = {
        'type': f'urn:dbapi:problem:{error.slug}',
        'title': HTTP_STATUS_CODES.get(error.status, 'Error'),
        'status': error.status,
        'detail': error.detail,
        'request_id': request_id,
    }
    if error.errors is not None:
        body['errors'] = error.errors
    if error.members:
        body.update(error.members)
    return body


def problem_response(error: ApiError) -> Response:
    """The problem answer of a request Flask serves (health, unknown paths), in the same shape as
    an action's; the request's scope keeps the problem for its access record."""
    scope = current_scope()
    if scope is None:  # only outside lib.gateway: a test's request context, say
        request_id = new_request_id()
    else:
        scope.problem = error
        request_id = scope.request_id
    response = json_response(problem_document(error, request_id), status=error.status, mimetype=PROBLEM_JSON)
    response.headers.update(error.headers)
    return response


def handle_error(error: BaseException) -> Response:
    return problem_response(to_problem(error))


def init_app(app: Flask) -> None:
    # HTTPException covers routing (404, 405) and werkzeug's 400/413; Exception everything else.
    app.register_error_handler(HTTPException, handle_error)
    app.register_error_handler(Exception, handle_error)
