"""Flask's side of the app: its JSON provider (orjson) and its error handlers, which answer
through the pipeline's one failure path, so whatever Flask serves fails in the same shape as an
action does."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException

from lib.core.json import JSON_MIMETYPE, dumps
from lib.core.record import RequestRecord
from lib.pipeline.path import Pipeline
from lib.web.gateway import RECORD_KEY, new_request_id

# What an app keeps in `app.extensions` (the pools are lib.db.connections.POOLS_KEY).
CONFIG_KEY = 'dbapi.config'  # its Config
REGISTRY_KEY = 'dbapi.registry'  # its action Registry
METRICS_KEY = 'dbapi.metrics'  # its Metrics, when METRICS is on
PIPELINE_KEY = 'dbapi.pipeline'  # its Pipeline (the callers it authenticates)


class ORJSONProvider(JSONProvider):
    """Flask 3 ignores `app.json_encoder`; a provider is the supported hook."""

    mimetype = JSON_MIMETYPE

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps(obj).decode('utf-8')

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        import orjson

        return orjson.loads(s)


def init_error_handlers(app: Flask, pipeline: Pipeline) -> None:
    """Routing's 404 and 405, werkzeug's 400 and 413, and anything a view raises: one problem
    answer, rendered by the pipeline; the request's record keeps the problem."""

    def handle_error(error: Exception) -> Response:
        record: RequestRecord | None = request.environ.get(RECORD_KEY)
        if record is None:  # a request made around the gateway (a test's request context)
            record = RequestRecord(new_request_id(), time.perf_counter_ns())
        answer = pipeline.failure(record, error, None)
        response = Response(answer.body, status=answer.status, content_type=answer.content_type)
        response.headers.update(answer.headers)
        return response

    app.register_error_handler(HTTPException, handle_error)
    app.register_error_handler(Exception, handle_error)
