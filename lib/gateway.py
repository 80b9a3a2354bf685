"""The app's WSGI entry: every request gets its scope and its access record here, and an action
request (`/<module>/...` of a registered module) is answered here by `lib.actions.serve()`,
`POST /batch` by `lib.batch.serve_batch()`.

Everything else goes to Flask (health, unknown paths); the module blueprints put every action in
Flask's url map, but Flask never dispatches one. Flask's per-request machinery (request context,
routing, hooks, a response object) would add nothing an action uses, so action requests skip it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from lib.access_log import Exchange, LoggedBody
from lib.actions import module_tables, serve
from lib.answer import Served
from lib.batch import NAME as BATCH
from lib.batch import PATH as BATCH_PATH
from lib.batch import serve_batch
from lib.compression import choose, compressors
from lib.db import POOLS_KEY
from lib.http import common_headers, settle_request_id
from lib.json import JSON_MIMETYPE
from lib.metrics import access_records
from lib.scope import RequestScope, enter, leave

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]
STATUS_LINES = {code: f'{code} {phrase}' for code, phrase in HTTP_STATUS_CODES.items()}


class Gateway:
    def __init__(self, app: Flask, flask_wsgi: WSGIApp) -> None:
        self.config = app.config
        self.flask_wsgi = flask_wsgi
        self.pools = app.extensions[POOLS_KEY]
        self.modules = module_tables(app)
        self.records = access_records(app)  # the last step: the access record, then the metrics
        self.compressors = compressors(app.config)

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        scope = RequestScope(settle_request_id(environ), self.pools)
        exchange = Exchange(self.records, environ, scope, start_response)
        token = enter(scope)
        try:
            path = environ.get('PATH_INFO', '')
            module, _, route = path[1:].partition('/')
            actions = self.modules.get(module)
            if actions is not None:
                scope.module = module
                served = serve(scope, environ, actions, route, self.config)
            elif path == BATCH_PATH:
                scope.module = BATCH
                served = serve_batch(scope, environ, self.modules, self.config)
            else:
                return self.via_flask(environ, exchange)
            body, headers = self.encode(environ, served)
            headers.extend(common_headers(scope.request_id, self.config['REPLICA_ID']))
            exchange.start_response(STATUS_LINES.get(served.status, str(served.status)), headers)
            exchange.sent = len(body)
            exchange.finish()  # the body is whole: nothing is left to fail in the app
            return [body]
        except BaseException as error:
            exchange.finish(error)
            raise
        finally:
            leave(token)

    def via_flask(self, environ: WSGIEnviron, exchange: Exchange) -> Iterable[bytes]:
        """Flask's answer, with the common headers; its record is written once its body is sent."""
        extra = common_headers(exchange.scope.request_id, self.config['REPLICA_ID'])

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return exchange.start_response(status, [*headers, *extra], exc_info)

        return LoggedBody(self.flask_wsgi(environ, start_response), exchange)

    def encode(self, environ: WSGIEnviron, served: Served) -> tuple[bytes, list[tuple[str, str]]]:
        """The body, compressed as flask-compress compresses Flask's answers (same settings)."""
        body = served.body
        headers = [('Content-Type', served.content_type), ('Vary', 'Accept-Encoding'), *served.headers.items()]
        if (
            served.status == 200
            and served.content_type == JSON_MIMETYPE
            and len(body) >= self.config['COMPRESS_MIN_SIZE']
        ):
            algorithm = choose(environ.get('HTTP_ACCEPT_ENCODING', ''), self.compressors)
            if algorithm is not None:
                body = self.compressors[algorithm](body)
                headers.append(('Content-Encoding', algorithm))
        headers.append(('Content-Length', str(len(body))))
        return body, headers


def init_app(app: Flask) -> None:
    """Call last, after every module blueprint is registered: the gateway serves the ones it sees."""
    app.wsgi_app = Gateway(app, app.wsgi_app)  # type: ignore[method-assign]
