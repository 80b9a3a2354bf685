"""What a database error means: SQLSTATE to HTTP status, and the cause an operator reads.

psycopg2 errors go through the SQLSTATE table below. The client gets a status and a short detail;
PostgreSQL's own message only for the statuses whose cause is the client's input (400, 409), and
the log gets the rest (libpq's and pgbouncer's connection errors explained).
"""

from __future__ import annotations

import logging

import psycopg2

from lib.core.errors import RETRY_AFTER_SECONDS, ApiError, internal_error
from lib.db.pool import PoolTimeout

log = logging.getLogger('dbapi.errors')

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
# Database messages can quote the submitted values ('invalid input syntax for type integer: "42x"'):
# for these failures the access record names the kind and the constraint, never the message.
DATABASE_SLUGS = frozenset(slug for _, slug in SQLSTATE_STATUS.values())


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
    """The problem a database error answers; the log says what the client is not told."""
    status, slug = classify_database_error(error)
    headers = {'Retry-After': RETRY_AFTER_SECONDS} if status == 503 else None
    if status in CLIENT_STATUSES:
        diag = error.diag
        errors = {'constraint': diag.constraint_name} if diag.constraint_name else None
        return ApiError(status, slug, diag.message_primary or slug, errors=errors, detail_logged=False)
    if status == 503:
        log.warning('database unavailable: %s: %s%s', type(error).__name__, str(error).strip(), cause(error))
        detail = 'the database is unavailable, retry shortly'
        return ApiError(status, slug, detail, headers=headers, detail_logged=slug not in DATABASE_SLUGS)
    if status == 504:
        log.warning('statement timeout: %s', str(error).strip())
        return ApiError(
            status, slug, 'the statement took longer than the configured statement_timeout', detail_logged=False
        )
    log.error('database error %s%s', error.pgcode, cause(error), exc_info=error)
    return internal_error()
