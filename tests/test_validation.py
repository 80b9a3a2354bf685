"""lib.validation's loaders answer exactly as `Schema.load` does, for every body."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import EXCLUDE, INCLUDE, Schema, ValidationError, fields, post_load, validate, validates

from lib.validation import is_plain, loader_for
from modules.bench.schemas import KeySchema, RowsSchema, UpsertSchema
from modules.example.schemas import FooSchema
from tests.modules.probe import schemas as probe_schemas


class Inner(Schema):
    code = fields.String(required=True)


class Renamed(Schema):
    """data_key, attribute, defaults, None, nested and list fields, validators."""

    user_name = fields.String(data_key='userName', required=True, validate=validate.Length(min=1, max=5))
    count = fields.Integer(attribute='total', load_default=3, validate=validate.Range(min=0))
    note = fields.String(allow_none=True, load_default=None)
    inner = fields.Nested(Inner)
    tags = fields.List(fields.String(), load_default=list)
    shown = fields.String(dump_only=True)


class Lenient(Schema):
    class Meta:
        unknown = EXCLUDE

    name = fields.String(required=True)


class Including(Schema):
    class Meta:
        unknown = INCLUDE

    name = fields.String(required=True)


class Hooked(Schema):
    name = fields.String(required=True)

    @validates('name')
    def no_admin(self, value: str, **_: Any) -> None:
        if value == 'admin':
            raise ValidationError('not admin')

    @post_load
    def upper(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {**data, 'name': data['name'].upper()}


class Dotted(Schema):
    city = fields.String(attribute='address.city')


class Validated(Schema):
    """Validators that refuse by returning False or by raising, a callable default, pre- and post-load."""

    word = fields.String(validate=[lambda value: value != 'no', validate.Length(max=3)])
    mail = fields.Email(load_default=lambda: 'a@b.co')
    kept = fields.Integer(validate=validate.Range(min=0), allow_none=True)
    trimmed = fields.String(
        pre_load=lambda value: value.strip() if isinstance(value, str) else value, post_load=str.upper
    )


PROBE_SCHEMAS = [getattr(probe_schemas, name) for name in dir(probe_schemas) if name.endswith('Schema')]
SCHEMAS = [
    *(FooSchema, KeySchema, UpsertSchema, RowsSchema, *PROBE_SCHEMAS),
    *(Renamed, Lenient, Including, Hooked, Dotted, Validated),
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.emails()  # valid addresses: the success path of Email's validator
    | st.sampled_from(['no', ' ab ', 'a@b', '@x.org', 'user1@example.com']),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


def keys_of(schema: Schema) -> list[str]:
    names = [field.data_key or name for name, field in schema.fields.items()]
    return [*names, 'unknown', 'userName', 'count', 'total']


def outcome(load: Any, body: dict[str, Any]) -> tuple[str, Any]:
    try:
        return 'ok', load(body)
    except ValidationError as error:
        return 'invalid', (error.messages, error.data, error.valid_data)


@pytest.mark.parametrize('schema_class', SCHEMAS, ids=lambda cls: cls.__name__)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_loader_answers_as_schema_load_does(schema_class: type[Schema], data: st.DataObject) -> None:
    schema = schema_class()
    keys = st.sampled_from(keys_of(schema)) | st.text(max_size=4)
    body = data.draw(st.dictionaries(keys, json_values, max_size=6))
    fast = outcome(loader_for(schema), body)
    assert fast == outcome(schema.load, body)
    if fast[0] == 'ok':
        assert list(fast[1]) == list(schema.load(body)), 'the keys come in another order'


@pytest.mark.parametrize(
    ('body', 'expected'),
    [
        ({'name': 'a', 'email': 'a@example.com'}, {'name': 'a', 'email': 'a@example.com'}),
        ({'name': 'a'}, {'name': 'a'}),
        ({'email': 'nope'}, {'name': ['Missing data for required field.'], 'email': ['Not a valid email address.']}),
        ({'name': 'a', 'extra': 1}, {'extra': ['Unknown field.']}),
        ({'name': 5}, {'name': ['Not a valid string.']}),
    ],
)
def test_the_example_schema_loads_and_refuses_by_the_fast_path(body: dict[str, Any], expected: dict[str, Any]) -> None:
    schema = FooSchema()
    assert is_plain(schema)
    load = loader_for(schema)
    assert load is not schema.load
    try:
        assert load(body) == expected
    except ValidationError as error:
        assert error.messages == expected


@pytest.mark.parametrize('schema_class', [Including, Hooked, Dotted])
def test_schemas_with_more_than_fields_get_schema_load_itself(schema_class: type[Schema]) -> None:
    schema = schema_class()
    assert not is_plain(schema)
    assert loader_for(schema) == schema.load


def test_a_partial_or_many_schema_gets_schema_load_itself() -> None:
    for schema in (FooSchema(partial=True), FooSchema(many=True)):
        assert not is_plain(schema)
