"""`GET /openapi.json` and `GET /docs`: the contract (lib.openapi) and its interactive page;
`GET /asyncapi.json`: the contract of the events (lib.events.asyncapi).

Both are outside the POST space like the health routes: Flask serves them (lib.gateway sends every
path that is not a module's to Flask), without a token, and only while `API_DOCS` is on. The page
is Swagger UI as the flask-swagger-ui package ships it (its assets are in the wheel, so nothing
comes from a CDN); a developer authorizes with a token and calls the actions of the same server.
"""

from __future__ import annotations

import orjson
from flask import Blueprint, Flask, Response
from flask_swagger_ui import get_swaggerui_blueprint

from lib.actions import module_events
from lib.config import project_version
from lib.events import asyncapi
from lib.json import JSON_MIMETYPE
from lib.openapi import document
from settings import APP_ID

DOCUMENT_PATH = '/openapi.json'
ASYNCAPI_PATH = '/asyncapi.json'
PAGE_PATH = '/docs'
# Swagger UI's options (its `config` object). No online validator badge: nothing leaves the page.
PAGE_CONFIG = {
    'app_name': 'dbapi: API reference',
    'layout': 'BaseLayout',
    'deepLinking': True,
    'displayOperationId': True,
    'validatorUrl': None,
}


def document_blueprint(body: bytes, events: bytes) -> Blueprint:
    blueprint = Blueprint('openapi', __name__)

    @blueprint.get(DOCUMENT_PATH)
    def openapi_json() -> Response:
        """The OpenAPI document, built once when the app was made."""
        return Response(body, mimetype=JSON_MIMETYPE)

    @blueprint.get(ASYNCAPI_PATH)
    def asyncapi_json() -> Response:
        """The AsyncAPI document of the declared events, built once when the app was made."""
        return Response(events, mimetype=JSON_MIMETYPE)

    return blueprint


def asyncapi_document(app: Flask) -> bytes:
    """The events' AsyncAPI document as JSON bytes (indented, ending with a newline)."""
    built = asyncapi.document(module_events(app), project_version(), APP_ID)
    return orjson.dumps(built, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def init_app(app: Flask) -> None:
    """Call after every module blueprint is registered: the document describes the ones it sees."""
    if not app.config['API_DOCS']:
        return
    app.register_blueprint(document_blueprint(document(app), asyncapi_document(app)))
    page = get_swaggerui_blueprint(PAGE_PATH, DOCUMENT_PATH, config=PAGE_CONFIG, blueprint_name='docs')
    app.register_blueprint(page)
    # The blueprint's page is `/docs/`; `/docs` answers the same page instead of a redirect to it.
    app.add_url_rule(PAGE_PATH, 'docs_page', app.view_functions['docs.show'])
