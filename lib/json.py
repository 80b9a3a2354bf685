"""JSON in and out with orjson: Flask's JSON provider, and the body parser of the actions.

Flask 3 ignores `app.json_encoder`; a provider is the supported hook. orjson encodes
datetime, date, time and UUID natively (ISO-8601); `default` covers the rest of what
PostgreSQL hands back.
"""

from __future__ import annotations

import base64
import datetime
import decimal
from typing import Any

import orjson
from flask import Response
from flask.json.provider import JSONProvider

OPTIONS = orjson.OPT_NON_STR_KEYS


def default(value: Any) -> Any:
    """What orjson cannot encode by itself; anything else is a TypeError naming the type."""
    if isinstance(value, decimal.Decimal):
        # A string keeps every digit; a float would round money and numeric(38, 10) alike.
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode('ascii')
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f'cannot encode {type(value).__name__} as JSON')


JSON_MIMETYPE = 'application/json'


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=default, option=OPTIONS)


class ORJSONProvider(JSONProvider):
    mimetype = JSON_MIMETYPE

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps(obj).decode('utf-8')

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


def json_response(value: Any, status: int = 200, mimetype: str = JSON_MIMETYPE) -> Response:
    return Response(dumps(value), status=status, mimetype=mimetype)


def contains_nul(value: Any) -> bool:
    """True when a string anywhere in `value` (keys included) holds U+0000."""
    if isinstance(value, str):
        return '\x00' in value
    if isinstance(value, dict):
        return any(contains_nul(k) or contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_nul(item) for item in value)
    return False
