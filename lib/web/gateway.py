"""The app's WSGI entry (Flask's `wsgi_app` middleware, its documented extension point), and the
one dispatcher of every request.

Every request gets its id, its `RequestRecord` and, once answered, its access record here. The
path is matched against the action registry: `/<module>/<route>` of a registered module and
`POST /batch` are answered by the pipeline (lib.pipeline.path); everything else (health, the
contract, /metrics, unknown paths) by Flask's own routing. Action requests skip Flask's
per-request machinery (request context, routing, hooks, a response object): the instruction
count of each is in docs/architecture.md. The module blueprints still put every action in
Flask's url map, so `flask routes` lists them.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from lib.contract.registry import BATCH, BATCH_PATH, Registry
from lib.core.config import Config
from lib.core.json import JSON_MIMETYPE
from lib.core.record import Answer, RequestRecord
from lib.observability.access_log import AccessRecords
from lib.observability.logs import current_request_id
from lib.pipeline.path import Pipeline
from lib.web.compression import VARY, compressed

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]
STATUS_LINES = {code: f'{code} {phrase}' for code, phrase in HTTP_STATUS_CODES.items()}
RECORD_KEY = 'dbapi.record'  # in the WSGI environ: the request's record, for what Flask answers
REQUEST_ID_HEADER = 'X-Request-ID'
REQUEST_ID_KEY = 'HTTP_X_REQUEST_ID'  # the header, as the WSGI environ names it
# Which replica answered, when REPLICA_ID is set: shows the balancing behind nginx.
SERVED_BY_HEADER = 'X-Served-By'
# An incoming id is kept only if it is short and plain, so it cannot forge log lines.
VALID_REQUEST_ID = re.compile(r'[A-Za-z0-9._:@/+=-]{1,128}')
RESPONSE_HEADERS = {
    'X-Content-Type-Options': 'nosniff',
    'Cache-Control': 'no-store',
}


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


def settle_request_id(environ: WSGIEnviron) -> str:
    """The request's id: the caller's X-Request-ID if short and plain, else a fresh one, which
    then also replaces the header in the environ, so whoever reads the header sees the id in use."""
    incoming: str = environ.get(REQUEST_ID_KEY, '')
    if incoming and VALID_REQUEST_ID.fullmatch(incoming):
        return incoming
    request_id = environ[REQUEST_ID_KEY] = new_request_id()
    return request_id


def fixed_headers(replica: str) -> tuple[tuple[str, str], ...]:
    """The headers every response carries after its X-Request-ID, whichever part of the app answers."""
    return (*RESPONSE_HEADERS.items(), *([(SERVED_BY_HEADER, replica)] if replica else []))


def common_headers(request_id: str, replica: str) -> list[tuple[str, str]]:
    """The headers every response carries, whichever part of the app answers."""
    return [(REQUEST_ID_HEADER, request_id), *fixed_headers(replica)]


class Gateway:
    """Dispatches every request: actions and batches to the pipeline, the rest to Flask."""

    def __init__(
        self,
        app: Flask,
        config: Config,
        registry: Registry,
        pipeline: Pipeline,
        records: AccessRecords,
    ) -> None:
        """Wraps `app.wsgi_app` (install it as the new one)."""
        self.flask_wsgi: WSGIApp = app.wsgi_app
        self.modules = registry.modules
        self.pipeline = pipeline
        self.records = records  # the last step: the access record, then the metrics
        self.compress_min_size = config.compress_min_size
        self.replica = config.replica_id
        self.fixed_headers = fixed_headers(self.replica)

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        record = RequestRecord(settle_request_id(environ), time.perf_counter_ns())
        current_request_id.value = record.request_id  # every log line of the request carries it
        try:
            path = environ.get('PATH_INFO', '')
            module, _, route = path[1:].partition('/')
            actions = self.modules.get(module)
            if actions is not None:
                answer = self.pipeline.serve(record, environ, module, actions, route)
            elif path == BATCH_PATH:
                answer = self.pipeline.serve(record, environ, BATCH, None, '')
            else:
                environ[RECORD_KEY] = record
                return self.via_flask(environ, start_response, record)
            body, headers = self.encode(environ, answer)
            headers.append((REQUEST_ID_HEADER, record.request_id))
            headers.extend(self.fixed_headers)
            record.status = answer.status
            start_response(STATUS_LINES.get(answer.status, str(answer.status)), headers)
            record.sent = len(body)
            self.finish(record, environ)  # the body is whole: nothing is left to fail in the app
            return [body]
        except BaseException as error:
            self.finish(record, environ, error)
            raise

    def finish(self, record: RequestRecord, environ: WSGIEnviron, error: BaseException | None = None) -> None:
        """Write the request's access record (and metrics), exactly once."""
        if record.finished:
            return
        record.finished = True
        duration_ns = time.perf_counter_ns() - record.started_ns
        if current_request_id.value == record.request_id:
            current_request_id.value = None
        try:
            self.records.write(record, environ, duration_ns, error)
        except Exception as failure:  # noqa: BLE001 - the record must never break the response
            self.records.report(failure)

    def via_flask(self, environ: WSGIEnviron, start_response: StartResponse, record: RequestRecord) -> Iterable[bytes]:
        """Flask's answer, with the common headers; its record is written once its body is sent."""
        extra = common_headers(record.request_id, self.replica)

        def with_headers(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            record.status = int(status[:3])
            return start_response(status, [*headers, *extra], exc_info)

        return LoggedBody(self.flask_wsgi(environ, with_headers), self, record, environ)

    def encode(self, environ: WSGIEnviron, answer: Answer) -> tuple[bytes, list[tuple[str, str]]]:
        """The answer's body and headers; a large JSON one compressed as the client asks
        (lib.web.compression, which compresses Flask's own answers too)."""
        body = answer.body
        headers = [('Content-Type', answer.content_type), VARY, *answer.headers.items()]
        if (
            answer.status == 200
            and len(body) >= self.compress_min_size
            and answer.content_type == JSON_MIMETYPE
            and 'HTTP_ACCEPT_ENCODING' in environ
        ):
            body, algorithm = compressed(body, environ['HTTP_ACCEPT_ENCODING'])
            if algorithm is not None:
                headers.append(('Content-Encoding', algorithm))
        headers.append(('Content-Length', str(len(body))))
        return body, headers


class LoggedBody:
    """Flask's response body, counted as it is sent; the record is written at its end or close."""

    __slots__ = ('_body', '_environ', '_gateway', '_record')

    def __init__(self, body: Iterable[bytes], gateway: Gateway, record: RequestRecord, environ: WSGIEnviron) -> None:
        self._body = body
        self._gateway = gateway
        self._record = record
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        record = self._record
        try:
            for chunk in self._body:
                record.sent += len(chunk)
                yield chunk
        except GeneratorExit:
            self._gateway.finish(record, self._environ)  # dropped unfinished: not an error of the app
            raise
        except BaseException as error:
            self._gateway.finish(record, self._environ, error)
            raise
        self._gateway.finish(record, self._environ)  # the server asked for more after the last chunk: sent

    def close(self) -> None:
        try:
            close = getattr(self._body, 'close', None)
            if close is not None:
                close()
        finally:
            self._gateway.finish(self._record, self._environ)
