"""Per-request plumbing every response shares: the request id and the safety headers."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

from flask import Flask, Response, current_app, g, request

import settings

REQUEST_ID_HEADER = 'X-Request-ID'
# Which replica answered, when REPLICA_ID is set: shows the balancing behind nginx.
SERVED_BY_HEADER = 'X-Served-By'
# An incoming id is kept only if it is short and plain, so it cannot forge log lines.
VALID_REQUEST_ID = re.compile(r'[A-Za-z0-9._:@/+=-]{1,128}')
RESPONSE_HEADERS = {
    'X-Content-Type-Options': 'nosniff',
    'Cache-Control': 'no-store',
}


class RequestIds:
    """Fresh request ids: 32 hex digits, like uuid4's and nginx's `$request_id`, made of a random
    prefix drawn once per process and a counter. Unique across processes (a fork draws a new
    prefix) without a system call per request, which `os.urandom` was; an id is a label for
    finding a request in the logs, not a secret.
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def new(self) -> str:
        return f'{self.prefix}{next(self.counter):016x}'


new_request_id = RequestIds().new
REQUEST_ID_KEY = 'HTTP_X_REQUEST_ID'  # the header, as the WSGI environ names it
SETTLED_KEY = 'dbapi.request_id'  # the id once checked: every later layer reads it back


def settle_request_id(environ: dict[str, Any]) -> str:
    """The request's id: the caller's X-Request-ID if short and plain, else a fresh one.

    The id is kept in the environ, so every layer that asks again (the access record, the
    gateway, Flask's hook) gets the same one without checking it again: the response, the
    access record and any traceback of the request all show it. A fresh id also replaces the
    header there, so whoever reads the header sees the id in use.
    """
    settled = environ.get(SETTLED_KEY)
    if settled is not None:
        return settled
    incoming = environ.get(REQUEST_ID_KEY, '')
    if incoming and VALID_REQUEST_ID.fullmatch(incoming):
        request_id = incoming
    else:
        request_id = new_request_id()
        environ[REQUEST_ID_KEY] = request_id
    environ[SETTLED_KEY] = request_id
    return request_id


def assign_request_id() -> None:
    g.request_id = settle_request_id(request.environ)


def request_id() -> str:
    """This request's id, assigned now if the request failed before the first hook ran."""
    if 'request_id' not in g:
        assign_request_id()
    return g.request_id


def common_headers(request_id: str, replica: str | None) -> list[tuple[str, str]]:
    """The headers every response carries, whichever layer (Flask or the gateway) answers."""
    headers = [(REQUEST_ID_HEADER, request_id), *RESPONSE_HEADERS.items()]
    if replica:
        headers.append((SERVED_BY_HEADER, replica))
    return headers


def finish_response(response: Response) -> Response:
    for name, value in common_headers(request_id(), current_app.config['REPLICA_ID']):
        response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    app.config.setdefault('REPLICA_ID', settings.REPLICA_ID)
    app.before_request(assign_request_id)
    app.after_request(finish_response)
