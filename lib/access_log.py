"""One access record per request, written when the response is sent.

It answers "what happened to request X, who called, how long did it take, what failed"
without ever holding a body, a token or a submitted value.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, current_app, g, request

log = logging.getLogger('dbapi.access')


def start_timer() -> None:
    g.started_ns = time.perf_counter_ns()


def client_ip(hops: int) -> str | None:
    """The caller's address: X-Forwarded-For is trusted only for the configured proxy hops."""
    remote = request.remote_addr
    if hops <= 0:
        return remote
    forwarded = [part.strip() for part in request.headers.get('X-Forwarded-For', '').split(',') if part.strip()]
    if len(forwarded) < hops:
        return remote
    return forwarded[-hops]


def failed_fields(errors: Any) -> list[str] | None:
    """The names of the fields that failed validation (never their values)."""
    if isinstance(errors, dict):
        return sorted(str(key) for key in errors)
    return None


def access_record(response: Response) -> Response:
    started = g.get('started_ns')
    duration_ns = time.perf_counter_ns() - started if started else 0
    status = response.status_code
    module = request.blueprint
    fields: dict[str, Any] = {
        'event.dataset': 'dbapi.access',
        'event.duration': duration_ns,
        'duration_ms': round(duration_ns / 1e6, 3),
        'http.request.id': g.get('request_id'),
        'http.request.method': request.method,
        'url.path': request.path,
        'dbapi.module': module,
        'dbapi.action': (request.view_args or {}).get('route'),
        'http.response.status_code': status,
        'http.response.body.bytes': response.calculate_content_length(),
        'client.ip': client_ip(current_app.config['PROXY_HOPS']),
        'user_agent.original': request.user_agent.string or None,
        'dbapi.token': g.get('token_label'),
        'event.outcome': 'success' if status < 400 else 'failure',
    }
    problem = g.get('problem')
    if problem is not None:
        fields['error.type'] = problem.slug
        fields['error.message'] = problem.detail
        invalid = failed_fields(problem.errors) if problem.status == 422 else None
        if invalid:
            fields['dbapi.invalid_fields'] = invalid
    level = logging.ERROR if status >= 500 else logging.INFO
    log.log(level, '%s %s %s', request.method, request.path, status, extra={'ecs': fields})
    return response


def init_app(app: Flask) -> None:
    app.before_request(start_timer)
    # after_request hooks run last-registered first: registered before the others, this one
    # runs after them and sees the final status, headers and (compressed) size.
    app.after_request(access_record)
