"""Loading an action's body with its marshmallow schema, without `Schema.load`'s generic machinery.

`Schema.load` wraps the work of the fields (type checks, conversions, validators) in layers a
plain schema never needs: pre/post-load hooks, schema validators, partial loading, an error
store, one closure per field. For a two-field schema those layers were half of its cost
(bench.micro). `loader_for` returns a function that calls every field's own `deserialize`, in
the order and with the arguments `Schema.load` uses, when the schema has none of those
features; whenever a field fails or the body has a key the schema does not know, it calls
`Schema.load` itself, so every error is marshmallow's own. Any other schema gets `Schema.load`.
tests/test_validation.py checks both give the same answer for the same body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError
from marshmallow.decorators import POST_LOAD, PRE_LOAD, VALIDATES, VALIDATES_SCHEMA
from marshmallow.utils import missing

Loader = Callable[[Mapping[str, Any]], dict[str, Any]]
LOAD_HOOKS = (PRE_LOAD, POST_LOAD, VALIDATES, VALIDATES_SCHEMA)


def is_plain(schema: Schema) -> bool:
    """Whether `Schema.load` would do nothing for `schema` beyond calling each field."""
    hooks = getattr(schema, '_hooks', None)
    if not isinstance(hooks, Mapping) or any(hooks.get(tag) for tag in LOAD_HOOKS):
        return False
    if schema.many or schema.partial or schema.unknown not in (RAISE, EXCLUDE):
        return False
    if schema.dict_class is not dict or type(schema).handle_error is not Schema.handle_error:
        return False
    # A dotted attribute nests the value (marshmallow's set_value): left to marshmallow.
    return all('.' not in (field.attribute or name) for name, field in schema.load_fields.items())


def loader_for(schema: Schema) -> Loader:
    """A function equal to `schema.load` for a JSON object's body, cheaper for a plain schema."""
    if not is_plain(schema):
        return schema.load
    plan = tuple(
        (field.data_key if field.data_key is not None else name, field.attribute or name, field)
        for name, field in schema.load_fields.items()
    )
    known = frozenset(key for key, _, _ in plan)
    strict = schema.unknown == RAISE

    def load(data: Mapping[str, Any]) -> dict[str, Any]:
        if strict and not known.issuperset(data):
            return schema.load(data)  # raises, naming the unknown fields
        result: dict[str, Any] = {}
        try:
            for key, attribute, field in plan:
                value = field.deserialize(data.get(key, missing), key, data)
                if value is not missing:
                    result[attribute] = value
        except ValidationError:
            return schema.load(data)  # raises with every field's errors, as marshmallow words them
        return result

    return load
