"""The hot path: `POST /<module>/<action>` served straight from WSGI, in front of Flask.

An action request needs auth, a body, validation, a connection and a JSON answer; Flask's
per-request machinery around that (request context, routing, hooks, response object) cost
about two thirds of its CPU time (bench.micro). The gateway calls the same `serve()` the
blueprint's Flask view does, inside an app context (lib/app_context.py) so actions keep `g`
and `current_app`, and passes everything that is not a POST to a registered module on to
Flask: health, the JSON 404 of unknown paths, the 405 of other methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from flask_compress.flask_compress import _choose_algorithm, _compress_data
from werkzeug.http import HTTP_STATUS_CODES

from lib import app_context
from lib.access_log import FLASK_KEY
from lib.actions import Action, Served, serve
from lib.http import common_headers, settle_request_id
from lib.json import JSON_MIMETYPE

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
STATUS_LINES = {code: f'{code} {phrase}' for code, phrase in HTTP_STATUS_CODES.items()}


class ActionGateway:
    def __init__(self, app: Flask, fallback: WSGIApp) -> None:
        self.app = app
        self.fallback = fallback
        self.modules: dict[str, dict[str, Action]] = {
            name: blueprint.actions for name, blueprint in app.blueprints.items() if hasattr(blueprint, 'actions')
        }
        self.replica = app.config.get('REPLICA_ID')
        self.compress_min_size = app.config['COMPRESS_MIN_SIZE']
        self.algorithms = tuple(app.extensions['compress'].enabled_algorithms)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get('REQUEST_METHOD') != 'POST':
            return self.fallback(environ, start_response)
        module, _, route = environ.get('PATH_INFO', '')[1:].partition('/')
        actions = self.modules.get(module)
        if actions is None:
            return self.fallback(environ, start_response)
        request_id = settle_request_id(environ)
        context, token = app_context.push(self.app)
        try:
            served = serve(environ, module, actions, route, request_id, context.g, self.app.config)
        finally:
            app_context.pop(context, token)
        environ[FLASK_KEY] = (module, served.action, served.token_label, served.problem)
        body, headers = self.encode(environ, served)
        headers.extend(common_headers(request_id, self.replica))
        start_response(STATUS_LINES.get(served.status, str(served.status)), headers)
        return [body]

    def encode(self, environ: dict[str, Any], served: Served) -> tuple[bytes, list[tuple[str, str]]]:
        """The body, compressed as flask-compress would (same algorithms, same minimum size)."""
        body = served.body
        headers = [('Content-Type', served.content_type), ('Vary', 'Accept-Encoding'), *served.headers.items()]
        if served.content_type == JSON_MIMETYPE and served.status == 200 and len(body) >= self.compress_min_size:
            algorithm = _choose_algorithm(self.algorithms, environ.get('HTTP_ACCEPT_ENCODING', ''))
            if algorithm is not None:
                body = _compress_data(self.app, body, algorithm)
                headers.append(('Content-Encoding', algorithm))
        headers.append(('Content-Length', str(len(body))))
        return body, headers


def init_app(app: Flask) -> None:
    """Call after every module blueprint is registered: the gateway serves the ones it sees."""
    app.wsgi_app = ActionGateway(app, app.wsgi_app)  # type: ignore[method-assign]
