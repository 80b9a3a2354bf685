"""One access record per request, made of its finished `RequestRecord`.

It answers "what happened to request X, who called, how long did it take, what failed"
without ever holding a body, a token or a submitted value. The web layer writes it exactly once
per request, whatever answered (an action, Flask, an exception), when the answer has been handed
to the server whole or, for a streamed body, when the body has been sent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sys
from functools import lru_cache
from typing import Any

from lib.core.errors import ApiError
from lib.core.record import RequestRecord
from lib.observability.logs import FIELDS_ATTR
from lib.observability.metrics import Metrics

log = logging.getLogger('dbapi.access')

MAX_FIELD_PATHS = 50
MAX_CACHED_ADDRESS = 64  # a longer text is still checked, never kept: the cache stays small

WSGIEnviron = dict[str, Any]


def client_ip(environ: WSGIEnviron, hops: int) -> str | None:
    """The caller's address: X-Forwarded-For is trusted only for the configured proxy hops.

    Each trusted proxy appends the address it saw, so the client is the `hops`-th entry from
    the right; anything left of it was written by the client and proves nothing.
    """
    remote: str | None = environ.get('REMOTE_ADDR') or None
    forwarded: str | None = environ.get('HTTP_X_FORWARDED_FOR') if hops > 0 else None
    if not forwarded:
        return remote
    entries = forwarded.rsplit(',', hops)
    if len(entries) < hops:
        return remote  # fewer entries than proxies: this request did not come through them all
    candidate = entries[-hops].strip()
    if not is_ip_address(candidate):
        return remote  # `client.ip` is an `ip` field: a non-address would get the record rejected
    return candidate


def is_ip_address(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 address. Callers behind nginx are few and come back,
    so the answers for short texts are kept (a bounded cache)."""
    if len(text) > MAX_CACHED_ADDRESS:
        return _parses_as_ip(text)
    return _parses_as_ip_cached(text)


def _parses_as_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_parses_as_ip_cached = lru_cache(maxsize=1024)(_parses_as_ip)


def url_path(environ: WSGIEnviron) -> str:
    path: str = environ.get('PATH_INFO', '')
    # WSGI hands the path over as latin-1; the client sent UTF-8.
    return path if path.isascii() else path.encode('latin-1').decode('utf-8', 'replace')


def field_paths(errors: Any, prefix: str = '') -> list[str]:
    """The dotted names of the fields that failed validation (`items.0.code`), never the values."""
    if not isinstance(errors, dict):
        return [prefix] if prefix else []
    paths: list[str] = []
    for key, value in errors.items():
        name = f'{prefix}.{key}' if prefix else str(key)
        paths.extend(field_paths(value, name) if isinstance(value, dict) else [name])
    return sorted(paths)[:MAX_FIELD_PATHS]  # sorted: the same failure reads the same in every record


def problem_fields(problem: ApiError) -> dict[str, Any]:
    fields: dict[str, Any] = {'error.code': problem.slug}
    if problem.detail_logged:
        fields['error.message'] = problem.detail
    if problem.members and 'step' in problem.members:
        fields['dbapi.batch.step'] = problem.members['step']  # the batch step that failed
    if not isinstance(problem.errors, dict):
        return fields
    if problem.status == 422:
        fields['dbapi.invalid_fields'] = field_paths(problem.errors)
    elif problem.errors.get('constraint'):
        fields['dbapi.constraint'] = problem.errors['constraint']
    return fields


class AccessRecords:
    """Writes the access records of one app (the web layer makes one)."""

    def __init__(self, proxy_hops: int) -> None:
        self.proxy_hops = proxy_hops
        self._reported = False

    def write(self, record: RequestRecord, environ: WSGIEnviron, duration_ns: int, error: BaseException | None) -> None:
        """The record of a finished request; `error` escaped the app (the server answers 500)."""
        status = record.status or 500  # no status: the exception escaped, the server answers 500
        failed = status >= 500 or error is not None
        level = logging.ERROR if failed else logging.INFO
        if not log.isEnabledFor(level):
            return
        method = environ.get('REQUEST_METHOD', '')
        path = url_path(environ)
        problem = record.problem
        # Milliseconds to 3 decimals, rounded half up, from integers.
        micros = (duration_ns + 500) // 1000
        millis, fraction = divmod(micros, 1000)
        fields: dict[str, Any] = {
            'event.dataset': 'dbapi.access',
            'event.duration': duration_ns,
            'duration_ms': micros / 1000,
            'event.outcome': 'failure' if failed or status >= 400 else 'success',
            'http.request.id': record.request_id,
            'http.request.method': method,
            'url.path': path,
            'dbapi.module': record.module,
            'dbapi.action': record.action,
            'dbapi.caller': record.caller,
            'http.response.status_code': status,
            'http.response.body.bytes': record.sent,
            'client.ip': client_ip(environ, self.proxy_hops),
            'user_agent.original': environ.get('HTTP_USER_AGENT'),
        }
        if record.idempotency_key is not None:
            fields['dbapi.idempotency.key'] = record.idempotency_key
            fields['dbapi.idempotency.replayed'] = record.replayed
        if record.steps is not None:
            fields['dbapi.batch.steps'] = len(record.steps)
        if problem is not None:
            fields.update(problem_fields(problem))
        message = f'{method} {path} {status} {millis}.{fraction:03d}ms'
        exc_info = None if error is None else (type(error), error, error.__traceback__)
        # makeRecord + handle: what Logger.log does, without its walk of the stack for a caller
        # (no line shows one).
        log.handle(log.makeRecord(log.name, level, __file__, 0, message, (), exc_info, extra={FIELDS_ATTR: fields}))

    def report(self, failure: Exception) -> None:
        if self._reported:
            return
        self._reported = True
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f'dbapi: cannot write an access record: {type(failure).__name__}: {failure}\n')


class MeteredRecords(AccessRecords):
    """The last step of every request: its access record, then its metrics (lib.observability.metrics
    keeps the series; here only the common request's two appends, so the step stays in this file)."""

    def __init__(self, proxy_hops: int, metrics: Metrics) -> None:
        super().__init__(proxy_hops)
        self.metrics = metrics
        self.tallies = metrics.tallies

    def write(self, record: RequestRecord, environ: WSGIEnviron, duration_ns: int, error: BaseException | None) -> None:
        """The record, then the request's metrics: for a registered action's request without a
        database error or a replay, two appends to its tally, here rather than in Metrics.record (a call
        less per request); Metrics.record for any other."""
        try:
            AccessRecords.write(self, record, environ, duration_ns, error)  # not super(): a lookup less
        finally:
            by_action = self.tallies.get(record.module)
            tally = None if by_action is None else by_action.get(record.action)
            if tally is None or record.database_error is not None or record.replayed:
                self.metrics.record(record, duration_ns)
            else:
                tally.durations.append(duration_ns)
                tally.keys.append((record.status, record.caller))
