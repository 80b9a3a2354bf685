"""Loading an action's body with its marshmallow schema, without `Schema.load`'s generic machinery.

`Schema.load` wraps the work of the fields (type checks, conversions, validators) in layers a
plain schema never needs: pre/post-load hooks, schema validators, partial loading, an error
store, one closure per field. For a two-field schema those layers were half of its cost
(bench.micro). `loader_for` returns a function that deserializes every field, in the order and
with the arguments `Schema.load` uses, when the schema has none of those features (a plain
field's steps inline, `field_loader`; any other field's own `deserialize`); whenever a field
fails or the body has a key the schema does not know, it calls `Schema.load` itself, so every
error is marshmallow's own. Any other schema gets `Schema.load`.
tests/test_validation.py checks both give the same answer for the same body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError
from marshmallow.decorators import POST_LOAD, PRE_LOAD, VALIDATES, VALIDATES_SCHEMA
from marshmallow.fields import Field
from marshmallow.utils import missing

Loader = Callable[[Mapping[str, Any]], dict[str, Any]]
FieldLoader = Callable[[Any, str, Mapping[str, Any]], Any]
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
        (field.data_key if field.data_key is not None else name, field.attribute or name, field_loader(field))
        for name, field in schema.load_fields.items()
    )
    known = frozenset(key for key, _, _ in plan)
    strict = schema.unknown == RAISE

    def load(data: Mapping[str, Any]) -> dict[str, Any]:
        if strict and not known.issuperset(data):
            return schema.load(data)  # raises, naming the unknown fields
        result: dict[str, Any] = {}
        try:
            for key, attribute, load_field in plan:
                value = load_field(data.get(key, missing), key, data)
                if value is not missing:
                    result[attribute] = value
        except ValidationError:
            return schema.load(data)  # raises with every field's errors, as marshmallow words them
        return result

    return load


class Refused(ValidationError):
    """A field failed on the fast path: `Schema.load` runs again and words the errors."""


def field_loader(field: Field) -> FieldLoader:
    """`field.deserialize`, without its layers when the field adds nothing to them.

    For a field that keeps Field's own missing, None and validator steps (no pre- or post-load
    functions), the same steps run inline: the validators are called directly instead of through
    a new `And` made on every call. Any failure raises ValidationError, and the loader hands the
    body to `Schema.load`; success returns exactly what `deserialize` returns.
    """
    kind = type(field)
    own_steps = (
        kind.deserialize is Field.deserialize
        and kind._validate is Field._validate
        and kind._validate_missing is Field._validate_missing
        and getattr(kind, '_validate_all', None) is getattr(Field, '_validate_all', None)
    )
    if not own_steps or field.pre_load or field.post_load:
        return field.deserialize
    convert = field._deserialize
    validators = tuple(field.validators)
    required, allow_none, default = field.required, field.allow_none, field.load_default

    def load(value: Any, key: str, data: Mapping[str, Any]) -> Any:
        if value is missing:
            if required:
                raise Refused('required')
            return default() if callable(default) else default
        if value is None:
            if allow_none:
                return None
            raise Refused('null')
        output = convert(value, key, data)
        for validator in validators:
            validator(output)  # refuses by raising: marshmallow 4 ignores what it returns
        return output

    return load
