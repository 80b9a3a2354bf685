"""What an action declares: decorators that only record what it needs; the pipeline acts on it.

Because nothing is wrapped, the order of the decorators does not matter and an action stays
a plain function that tests can call with plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from marshmallow import Schema

from lib.core.config import DEFAULT_DATABASE
from lib.db.connections import ConnSpec

F = TypeVar('F', bound=Callable[..., Any])


SCHEMA_ATTR = '__dbapi_schema__'
CONN_ATTR = '__dbapi_conn__'
RETURNS_ATTR = '__dbapi_returns__'


def use_schema(schema: type[Schema] | Schema) -> Callable[[F], F]:
    """Load the JSON body with `schema`; the action gets the loaded fields as keyword arguments."""
    instance = schema() if isinstance(schema, type) else schema
    if not isinstance(instance, Schema):
        raise TypeError(f'use_schema() needs a marshmallow Schema, got {schema!r}')

    def record(action: F) -> F:
        setattr(action, SCHEMA_ATTR, instance)
        return action

    return record


def returns(schema: type[Schema] | Schema, many: bool = False) -> Callable[[F], F]:
    """Dump the action's result through `schema` (a list of them with `many=True`) before it is
    encoded: the answer carries the schema's fields only, and the schema is the 200 answer of the
    action in the OpenAPI document."""
    instance = schema(many=many) if isinstance(schema, type) else schema
    if not isinstance(instance, Schema):
        raise TypeError(f'returns() needs a marshmallow Schema, got {schema!r}')
    if instance.many != many:
        raise TypeError(f'returns({schema!r}, many={many}): the instance was built with many={instance.many}')

    def record(action: F) -> F:
        setattr(action, RETURNS_ATTR, instance)
        return action

    return record


def inject_conn(database: str = DEFAULT_DATABASE, named: bool = True, autocommit: bool = False) -> Callable[[F], F]:
    """Pass a pooled connection to `database` as `conn`: committed when the action returns,
    rolled back when it raises, and back in the pool clean either way."""

    def record(action: F) -> F:
        setattr(action, CONN_ATTR, ConnSpec(database, named, autocommit))
        return action

    return record
