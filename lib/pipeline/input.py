"""The body and validation steps: the request body's framing checked, read, and parsed into a
JSON object; then loaded by the action's marshmallow schema into keyword arguments."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import orjson
from marshmallow import Schema
from werkzeug.exceptions import RequestEntityTooLarge

from lib.core.errors import ApiError, bad_request
from lib.core.json import INT64_MIN, JSON_MIMETYPE, UINT64_MAX, contains_nul

MAX_TEXT_IN_MESSAGE = 80
# What an action without a schema loads its body with: any field is refused, in marshmallow's words.
NO_FIELDS = Schema()
# Twenty digits in a row, or a minus and nineteen: the only ways a JSON number can be an integer
# beyond 64 bits, which orjson would turn into a float without a word. Rare, so only then is the
# body read again.
LONG_DIGITS = re.compile(rb'-\d{19}|\d{20}')


def content_length(environ: Mapping[str, Any]) -> int | None:
    """The declared body length; None for a chunked body, whose length is known only once read."""
    if 'chunked' in environ.get('HTTP_TRANSFER_ENCODING', '').lower():
        return None
    raw = environ.get('CONTENT_LENGTH') or '0'
    if not raw.isdigit():
        raise bad_request(f'Content-Length {raw[:MAX_TEXT_IN_MESSAGE]!r} is not a number')
    return int(raw)


def read_data(environ: Mapping[str, Any], length: int | None, limit: int) -> bytes:
    """The raw body, at most `limit` bytes. Broken chunked framing, or a client gone mid-body, is a 400."""
    if length is not None and length > limit:
        raise RequestEntityTooLarge()  # refused before a byte is read
    try:
        data: bytes = environ['wsgi.input'].read(limit + 1 if length is None else length)
    except OSError as error:
        # A chunked body is parsed only as the app reads it: its framing errors surface here (the
        # server adapter, lib.server.gunicorn_worker, raises them as OSError).
        raise bad_request(f'the body could not be read: {str(error)[:MAX_TEXT_IN_MESSAGE]}') from None
    if len(data) > limit:
        raise RequestEntityTooLarge()
    if length is not None and len(data) < length:
        raise bad_request(f'the body ended after {len(data)} of {length} bytes')
    return data


def _checked_int(text: str) -> int:
    value = int(text)
    if not INT64_MIN <= value <= UINT64_MAX:
        raise bad_request(f'the integer {text[:MAX_TEXT_IN_MESSAGE]} does not fit in 64 bits')
    return value


def refuse_long_integers(data: bytes) -> None:
    """400 for an integer beyond 64 bits anywhere in `data` (an already valid JSON document)."""
    if LONG_DIGITS.search(data) is None:
        return
    try:
        json.loads(data, parse_int=_checked_int)
    except ValueError:
        return  # orjson accepted what the stdlib refuses: orjson is the judge of validity


def parse_body(data: bytes) -> dict[str, Any]:
    """The body as a JSON object; anything else is a 400 that says what was wrong."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise bad_request(f'the body is not valid JSON: {error}') from None
    if not isinstance(body, dict):
        raise bad_request(f'the body must be a JSON object, not {type(body).__name__}')
    refuse_long_integers(data)
    # PostgreSQL text cannot hold U+0000; the byte scan keeps the walk off the common path.
    if b'\\u0000' in data and contains_nul(body):
        raise bad_request('strings cannot contain the NUL character (\\u0000)')
    return body


def read_body(environ: Mapping[str, Any], limit: int) -> tuple[bytes, dict[str, Any]]:
    """The request body's bytes and the JSON object they hold; an empty body is an empty object.
    The bytes are what an Idempotency-Key's fingerprint is taken of (lib.idempotency)."""
    length = content_length(environ)
    if length == 0:
        return b'', {}
    mimetype = environ.get('CONTENT_TYPE', '').partition(';')[0].strip().lower()
    if mimetype != JSON_MIMETYPE and not mimetype.endswith('+json'):
        raise ApiError(415, 'unsupported-media-type', f'the body must be application/json, not {mimetype!r}')
    data = read_data(environ, length, limit)
    return data, (parse_body(data) if data else {})


def arguments(schema: Schema | None, body: Mapping[str, Any]) -> dict[str, Any]:
    """The validation step: `schema.load(body)` as keyword arguments; a ValidationError becomes a
    422 naming the fields. An action without a schema takes no arguments: any field is refused."""
    if schema is not None:
        loaded: dict[str, Any] = schema.load(body)
        return loaded
    if body:
        NO_FIELDS.load(body)  # raises: every field is unknown
    return {}
