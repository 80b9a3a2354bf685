"""The simple loader and dumper (marshmallow's adapter, lib/pipeline/input.py) against marshmallow's
`Schema.load` and `Schema.dump`: on any body or data, the same result, or they decline and
marshmallow judges. Also the adapter's test: it fails when a marshmallow upgrade changes what
they rely on (`Schema._hooks`, the load and dump paths' methods, the fields' attributes, what a
field of a simple kind loads and dumps a value of its type as)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    pre_dump,
    pre_load,
    validates,
    validates_schema,
)
from marshmallow.validate import Length, OneOf, Range

from bench.instructions import make_bodies
from lib.events.outbox import EventError, EventType, payload
from lib.pipeline.input import Loaders, arguments, loader, simple_dumper, simple_loader, simple_plan, simple_validator
from modules.bench.schemas import AccountSavedSchema, KeySchema, RowsSchema, UpsertSchema
from modules.example.schemas import FooSchema, NameSchema, NewUserSchema

DECLINED: dict[str, Any] = {}  # what the loader under test falls back to: this very object


def declined(body: Mapping[str, Any]) -> dict[str, Any]:
    return DECLINED


def odd_text(value: str) -> bool:
    """A validator of the old kind: False for a refusal (marshmallow 4 ignores the return value)."""
    return len(value) % 2 == 1


def no_sevens(value: int) -> None:
    if '7' in str(value):
        raise ValidationError('No sevens.')


def broken(value: Any) -> None:
    if value == 13:
        raise LookupError('a validator that fails')


class Keyed(Schema):
    """data_key, attribute, defaults (plain and callable), None allowed, validators of every kind."""

    ident = fields.Integer(required=True, data_key='id', validate=[Range(min=0, max=1000), no_sevens, broken])
    label = fields.String(allow_none=True, attribute='title', validate=odd_text)
    active = fields.Boolean(load_default=False)
    count = fields.Integer(load_default=lambda: 7, strict=False)
    note = fields.String(load_default=None)
    mail = fields.Email(required=True, allow_none=True, validate=Length(max=20))


class Flags(Schema):
    """Booleans: any truthy value (empty `truthy`), a OneOf over bools; a required nullable String."""

    anything = fields.Boolean(truthy=set())
    only_true = fields.Boolean(validate=OneOf([True]))
    text = fields.String(required=True, allow_none=True)


class Empty(Schema):
    pass


SIMPLE = [KeySchema, UpsertSchema, RowsSchema, FooSchema, NewUserSchema, NameSchema, Keyed, Flags, Empty]
SIMPLE += [AccountSavedSchema]


def the_same(got: dict[str, Any], expected: dict[str, Any]) -> bool:
    """The same keys in the same order, the same values of the same types."""
    return list(got) == list(expected) and all(
        type(got[key]) is type(expected[key]) and got[key] == expected[key] for key in expected
    )


def judged(load: Any, body: Any) -> tuple[str, Any]:
    """What `load(body)` answers: loaded, refused (with marshmallow's messages) or raised."""
    try:
        return 'loaded', load(body)
    except ValidationError as error:
        return 'refused', error.messages
    except LookupError as error:  # `broken`: marshmallow lets a validator's own exception through
        return 'raised', type(error)


KEYS = st.sampled_from(['aid', 'bid', 'abalance', 'first', 'count', 'name', 'email', 'id', 'ident', 'label'])
KEYS |= st.sampled_from(['title', 'active', 'note', 'mail', 'anything', 'only_true', 'text', 'other'])
VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([0, 1, -1, 7, 13, 1000, 1001, 10_000, 10_001, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1])
    | st.text(max_size=8)
    | st.sampled_from(['ada', 'ada@example.com', 'a@b.co', 'x' * 257, '', '1', 'true'])
    | st.emails()
    | st.floats(allow_nan=False)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)


@settings(max_examples=400, deadline=None)
@given(index=st.sampled_from(range(len(SIMPLE))), body=st.dictionaries(KEYS, VALUES, max_size=6))
def test_the_simple_loader_agrees_with_schema_load_or_declines(index: int, body: dict[str, Any]) -> None:
    schema = SIMPLE[index]()
    verdict, expected = judged(schema.load, body)
    fast = simple_loader(schema, declined)
    assert fast is not None
    got = fast(body)
    if got is not DECLINED:
        assert verdict == 'loaded', (body, expected)
        assert the_same(got, expected), (body, got, expected)
    # What the pipeline runs: the same answer, or the same refusal in marshmallow's words.
    answered, answer = judged(loader(schema), body)
    assert answered == verdict
    assert the_same(answer, expected) if verdict == 'loaded' else answer == expected


def test_a_validator_that_fails_fails_the_same_way() -> None:
    body = {'id': 13, 'mail': None}
    assert judged(Keyed().load, body) == judged(loader(Keyed()), body) == ('raised', LookupError)


VALID = [
    (KeySchema, {'aid': 1}),
    (UpsertSchema, {'aid': 500_001, 'bid': 6, 'abalance': -(2**31)}),
    (RowsSchema, {'first': 3}),
    (RowsSchema, {'first': 3, 'count': 10_000}),
    (FooSchema, {'name': 'ada'}),
    (FooSchema, {'name': 'ada', 'email': 'ada@example.com'}),
    (NewUserSchema, {'name': 'ada', 'email': 'ada@example.com'}),
    (NameSchema, {'name': 'a'}),
    (Keyed, {'id': 12, 'mail': None}),
    (Keyed, {'id': 0, 'label': 'abc', 'active': True, 'count': 3, 'note': None, 'mail': 'a@b.co'}),
    (Keyed, {'id': 1, 'label': None, 'mail': 'a@b.co'}),
    (Flags, {'text': None}),
    (Flags, {'anything': False, 'only_true': True, 'text': ''}),
    (Empty, {}),
]


@pytest.mark.parametrize(('schema_class', 'body'), VALID)
def test_valid_bodies_are_loaded_without_marshmallow(schema_class: type[Schema], body: dict[str, Any]) -> None:
    schema = schema_class()
    fast = simple_loader(schema, declined)
    assert fast is not None
    got = fast(body)
    assert got is not DECLINED
    assert the_same(got, schema.load(body))


def test_the_bench_bodies_are_loaded_without_marshmallow() -> None:
    import orjson

    for schema, kind in ((KeySchema(), 'read'), (UpsertSchema(), 'upsert'), (FooSchema(), 'foo')):
        fast = simple_loader(schema, declined)
        assert fast is not None
        for data in make_bodies(kind, 50, 'fast-load'):
            body = orjson.loads(data)
            got = fast(body)
            assert got is not DECLINED and the_same(got, schema.load(body))


class WithPreLoad(Schema):
    aid = fields.Integer()

    @pre_load
    def trim(self, data: Any, **kwargs: Any) -> Any:
        return data


class WithPostLoad(Schema):
    aid = fields.Integer()

    @post_load
    def wrap(self, data: Any, **kwargs: Any) -> Any:
        return data


class WithValidates(Schema):
    aid = fields.Integer()

    @validates('aid')
    def check(self, value: Any, **kwargs: Any) -> None:
        pass


class WithValidatesSchema(Schema):
    aid = fields.Integer()

    @validates_schema
    def check(self, data: Any, **kwargs: Any) -> None:
        pass


class Excluding(Schema):
    class Meta:
        unknown = EXCLUDE

    aid = fields.Integer()


class WithNested(Schema):
    inner = fields.Nested(KeySchema)


class WithFloat(Schema):
    amount = fields.Float()


class Shout(fields.String):
    pass


class WithSubclassedField(Schema):
    name = Shout()


class WithFieldPreLoad(Schema):
    name = fields.String(pre_load=str.strip)


class WithDottedAttribute(Schema):
    name = fields.String(attribute='user.name')


class WithOwnTruthy(Schema):
    flag = fields.Boolean(truthy={'yes'}, falsy={'no'})


class WithOwnLoad(Schema):
    aid = fields.Integer()

    def load(self, data: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().load(data, **kwargs)


@pytest.mark.parametrize(
    'schema',
    [
        WithPreLoad(),
        WithPostLoad(),
        WithValidates(),
        WithValidatesSchema(),
        Excluding(),
        KeySchema(many=True),
        KeySchema(partial=True),
        KeySchema(unknown=EXCLUDE),
        WithNested(),
        WithFloat(),
        WithSubclassedField(),
        WithFieldPreLoad(),
        WithDottedAttribute(),
        WithOwnTruthy(),
        WithOwnLoad(),
    ],
    ids=lambda schema: f'{type(schema).__name__}{"(many)" if schema.many else ""}',
)
def test_schemas_that_are_not_simple_are_loaded_by_marshmallow(schema: Schema) -> None:
    assert simple_plan(schema) is None
    assert loader(schema) == schema.load


@pytest.mark.parametrize('schema_class', SIMPLE)
def test_simple_schemas_are_seen_as_simple(schema_class: type[Schema]) -> None:
    """Fails when marshmallow no longer has what simple_plan reads (the loader then declines
    every schema: correct, but the validation step is marshmallow's whole cost again)."""
    assert simple_plan(schema_class()) is not None


def test_one_loader_per_schema_and_none_for_no_schema() -> None:
    key = KeySchema()
    loaders = Loaders([key, None])
    assert loaders[key] is loaders[key]
    assert loaders[key]({'aid': 3}) == {'aid': 3}
    assert loaders[None]({}) == {} == arguments(None, {})
    with pytest.raises(ValidationError) as raised:
        loaders[None]({'surprise': 1})
    assert raised.value.messages == {'surprise': ['Unknown field.']}
    other = UpsertSchema()  # not registered: built the first time it is asked for
    assert loaders[other]({'aid': 1, 'bid': 1, 'abalance': 0}) == {'aid': 1, 'bid': 1, 'abalance': 0}
    assert other in loaders


# --- The dump side: what `emit` checks an event's data with ----------------------------------------


def emitted(event: EventType, data: Any) -> tuple[str, str]:
    """What `payload` makes of `data`: the JSON text, or the EventError's message."""
    try:
        return 'written', payload(event, data)
    except EventError as error:
        return 'refused', str(error)
    except LookupError as error:  # `broken`: the validator's own exception goes through
        return 'raised', type(error).__name__


@st.composite
def event_data(draw: st.DrawFn) -> tuple[Schema, dict[str, Any]]:
    """A simple schema and data for it: mostly its own attributes, with values of every kind
    (so that many are valid), and now and then a key it does not know."""
    schema = draw(st.sampled_from(SIMPLE))()
    kinds: dict[type, st.SearchStrategy[Any]] = {
        fields.Integer: st.integers(-(2**31), 2**31) | st.sampled_from([0, 7, 13, 1000, 1001, 2**64]),
        fields.String: st.text(max_size=6),
        fields.Email: st.emails() | st.text(max_size=6),
        fields.Boolean: st.booleans(),
    }
    data: dict[str, Any] = {}
    for name, field in schema.dump_fields.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # left out
        typed = kinds[type(field)]
        data[field.attribute or name] = draw(typed if draw(st.integers(0, 4)) else st.none() | VALUES)
    if draw(st.integers(0, 9)) == 0:
        data['other'] = draw(VALUES)
    return schema, data


@settings(max_examples=600, deadline=None)
@given(drawn=event_data())
def test_the_simple_dumper_agrees_with_schema_dump_or_declines(drawn: tuple[Schema, dict[str, Any]]) -> None:
    schema, data = drawn
    dump, valid = simple_dumper(schema), simple_validator(schema)
    assert dump is not None and valid is not None
    dumped = dump(data)
    if dumped is not None:
        assert the_same(dumped, schema.dump(data)), (data, dumped)
        if valid(dumped):
            assert schema.validate(dumped) == {}, (data, dumped)
    # What emit writes with the shortcut and without it: the same document, or the same error.
    fast = EventType('t.saved', 'm', schema, '', dump, valid)
    slow = EventType('t.saved', 'm', schema)
    assert emitted(fast, data) == emitted(slow, data)


def test_the_bench_event_is_dumped_and_checked_without_marshmallow() -> None:
    import modules.bench  # noqa: F401 - its blueprint declares the event, with the shortcuts
    from lib.events.outbox import DECLARED

    event = DECLARED['bench.account_saved']
    dump, valid, schema = event.dump, event.valid, event.schema
    assert dump is not None and valid is not None
    data = {'aid': 1, 'bid': 1, 'abalance': -5}
    dumped = dump(data)
    assert dumped is not None and valid(dumped) and the_same(dumped, schema.dump(data))


class WithPreDump(Schema):
    aid = fields.Integer()

    @pre_dump
    def trim(self, data: Any, **kwargs: Any) -> Any:
        return data


class WithPostDump(Schema):
    aid = fields.Integer()

    @post_dump
    def wrap(self, data: Any, **kwargs: Any) -> Any:
        return data


class WithIntegerAsString(Schema):
    aid = fields.Integer(as_string=True)


class WithDumpDefault(Schema):
    aid = fields.Integer(dump_default=0)


class WithDumpOnly(Schema):
    aid = fields.Integer()
    made = fields.String(dump_only=True)


class WithOwnDump(Schema):
    aid = fields.Integer()

    def dump(self, obj: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().dump(obj, **kwargs)


@pytest.mark.parametrize(
    'schema',
    [
        WithPreDump(),
        WithPostDump(),
        WithIntegerAsString(),
        WithDumpDefault(),
        WithDumpOnly(),
        WithOwnDump(),
        WithFloat(),
    ],
    ids=lambda schema: type(schema).__name__,
)
def test_schemas_that_are_not_simple_are_dumped_by_marshmallow(schema: Schema) -> None:
    assert simple_dumper(schema) is None


@pytest.mark.parametrize('schema_class', SIMPLE)
def test_simple_schemas_are_seen_as_simple_to_dump(schema_class: type[Schema]) -> None:
    """Fails when marshmallow no longer has what simple_dumper reads (emit would then check
    every event with marshmallow's whole dump and validate again: correct, 143,000 instructions)."""
    assert simple_dumper(schema_class()) is not None
    assert simple_validator(schema_class()) is not None
