"""JSON in and out with orjson, and what the service's JSON may hold.

orjson encodes datetime, date, time and UUID natively (ISO-8601); `default` covers the rest of
what PostgreSQL hands back.
"""

from __future__ import annotations

import base64
import datetime
import decimal
from typing import Any

import orjson

JSON_MIMETYPE = 'application/json'
OPTIONS = orjson.OPT_NON_STR_KEYS
# The integers a body may hold: 64 bits, signed or not (PostgreSQL's bigint, and what a client's
# int64 or uint64 holds); orjson itself would turn a longer one into a float without a word.
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1


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


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=default, option=OPTIONS)


def contains_nul(value: Any) -> bool:
    """True when a string anywhere in `value` (keys included) holds U+0000."""
    if isinstance(value, str):
        return '\x00' in value
    if isinstance(value, dict):
        return any(contains_nul(k) or contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_nul(item) for item in value)
    return False
