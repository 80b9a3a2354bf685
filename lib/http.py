"""Per-request plumbing every response shares: the request id and the common headers."""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

REQUEST_ID_HEADER = 'X-Request-ID'
# Which replica answered, when REPLICA_ID is set: shows the balancing behind nginx.
SERVED_BY_HEADER = 'X-Served-By'
# An incoming id is kept only if it is short and plain, so it cannot forge log lines.
VALID_REQUEST_ID = re.compile(r'[A-Za-z0-9._:@/+=-]{1,128}')
RESPONSE_HEADERS = {
    'X-Content-Type-Options': 'nosniff',
    'Cache-Control': 'no-store',
}
REQUEST_ID_KEY = 'HTTP_X_REQUEST_ID'  # the header, as the WSGI environ names it


class RequestIds:
    """Fresh request ids: 32 hex digits, like nginx's `$request_id`, made of a random prefix drawn
    once per process and a counter. Unique across processes (a fork draws a new prefix) without a
    system call per request; an id is a label for finding a request in the logs, not a secret.
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


def settle_request_id(environ: dict[str, Any]) -> str:
    """The request's id: the caller's X-Request-ID if short and plain, else a fresh one, which
    then also replaces the header in the environ, so whoever reads the header sees the id in use."""
    incoming: str = environ.get(REQUEST_ID_KEY, '')
    if incoming and VALID_REQUEST_ID.fullmatch(incoming):
        return incoming
    request_id = environ[REQUEST_ID_KEY] = new_request_id()
    return request_id


def common_headers(request_id: str, replica: str | None) -> list[tuple[str, str]]:
    """The headers every response carries, whichever part of the app answers."""
    headers = [(REQUEST_ID_HEADER, request_id), *RESPONSE_HEADERS.items()]
    if replica:
        headers.append((SERVED_BY_HEADER, replica))
    return headers
