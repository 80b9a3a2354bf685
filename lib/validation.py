"""The validation step: an action's body loaded by its marshmallow schema into keyword arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import Schema

from lib.errors import ApiError


def arguments(schema: Schema | None, body: Mapping[str, Any]) -> dict[str, Any]:
    """`schema.load(body)`: a ValidationError becomes a 422 naming the fields (lib.errors).
    An action without a schema takes no arguments, so any field it is sent is refused."""
    if schema is not None:
        loaded: dict[str, Any] = schema.load(body)
        return loaded
    if body:
        unknown = {key: ['Unknown field.'] for key in body}
        raise ApiError(422, 'validation-error', 'the body failed validation', errors=unknown)
    return {}
