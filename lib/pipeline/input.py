"""The body and validation steps: the request body's framing checked, read, and parsed into a
JSON object; then loaded by the action's marshmallow schema into keyword arguments.

marshmallow is the judge of every body, but a schema of simple fields gets a loader that returns
what `Schema.load` would, without its machinery, for the bodies it can prove valid, and hands
every other body to `Schema.load` (`simple_loader`); the same proofs check an event's data for
`emit` (`data_checks`, given to the events layer when a module declares its events). This file
is marshmallow's adapter: the one place that reads a private name of it (`Schema._hooks`, to know
a schema has no hooks); tests/test_fast_load.py fails when an upgrade changes what it relies on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from marshmallow import RAISE, Schema, fields, missing
from marshmallow.decorators import POST_DUMP, POST_LOAD, PRE_DUMP, PRE_LOAD, VALIDATES, VALIDATES_SCHEMA
from werkzeug.exceptions import RequestEntityTooLarge

from lib.core.errors import ApiError, bad_request
from lib.core.json import INT64_MIN, JSON_MIMETYPE, UINT64_MAX, contains_nul
from lib.events.outbox import Dump, Valid

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


Load = Callable[[Mapping[str, Any]], dict[str, Any]]

# The fields a simple schema may hold, and the one type of value each loads as itself.
SIMPLE_KINDS: dict[type[fields.Field[Any]], type] = {
    fields.Integer: int,
    fields.String: str,
    fields.Email: str,
    fields.Boolean: bool,
}
LOAD_HOOKS = (PRE_LOAD, POST_LOAD, VALIDATES, VALIDATES_SCHEMA)
# The methods of Schema.load's path: a schema that overrides one is not simple.
LOAD_PATH = ('load', '_do_load', '_deserialize', '_invoke_field_validators')

# One field of a simple schema: (the body's key, the loaded key, the value's type, the field's
# validators, required, load_default, allow_none).
Plan = tuple[tuple[str, str, type, tuple[Callable[[Any], Any], ...], bool, Any, bool], ...]


def simple_plan(schema: Schema) -> Plan | None:
    """How to load `schema` without marshmallow, or None when it is not simple: only Integer,
    String, Email and Boolean fields (exactly these classes, no pre_load/post_load functions, no
    dotted names), no load hooks, unknown=RAISE, not many, not partial, Schema's own load path.
    A marshmallow that no longer has what this reads makes every schema not simple."""
    cls = type(schema)
    try:
        hooks = cls._hooks
        if not isinstance(hooks, Mapping) or any(hooks.get(tag) for tag in LOAD_HOOKS):
            return None
        if any(getattr(cls, name) is not getattr(Schema, name) for name in LOAD_PATH):
            return None
        if schema.many or schema.partial not in (None, False) or schema.unknown != RAISE:
            return None
        if schema.dict_class is not dict:
            return None
        plan = []
        for name, field in schema.load_fields.items():
            kind = SIMPLE_KINDS.get(type(field))
            key = field.data_key if field.data_key is not None else name
            attribute = field.attribute or name
            if kind is None or '.' in attribute or field.pre_load != [] or field.post_load != []:
                return None
            if kind is bool and not _loads_bools_as_themselves(field):
                return None
            validators = tuple(field.validators)
            plan.append((key, attribute, kind, validators, field.required, field.load_default, field.allow_none))
    except AttributeError:
        return None
    return tuple(plan)


def _loads_bools_as_themselves(field: Any) -> bool:
    """A Boolean loads True as True and False as False (its `truthy` and `falsy` sets allow it)."""
    if not field.truthy:
        return True
    return True in field.truthy and False not in field.truthy and False in field.falsy


class _Declined(Exception):
    """The body is not one the simple loader can prove valid."""


def simple_loader(schema: Schema, fallback: Load) -> Load | None:
    """`schema.load` for a simple schema (`simple_plan`), or None for any other. A body whose
    keys are all the schema's, whose present values are each of its field's type (None where the
    field allows it) and pass the field's validators (called as marshmallow calls them: a False
    return or an exception refuses), with every required field present, is loaded here: the
    same dict, in the same order, `schema.load` returns. Every other body goes to `fallback`
    (`schema.load`: marshmallow judges it, and words every refusal)."""
    plan = simple_plan(schema)
    if plan is None:
        return None
    known = frozenset(key for key, *_ in plan)

    def load(body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            if type(body) is not dict or not known.issuperset(body):
                raise _Declined
            loaded: dict[str, Any] = {}
            for key, attribute, kind, validators, required, default, allow_none in plan:
                value = body.get(key, missing)
                if type(value) is kind:
                    for validator in validators:
                        if validator(value) is False:
                            raise _Declined
                    loaded[attribute] = value
                elif value is missing:
                    if required:
                        raise _Declined
                    value = default() if callable(default) else default
                    if value is not missing:
                        loaded[attribute] = value
                elif value is None and allow_none:
                    loaded[attribute] = None
                else:
                    raise _Declined
        except Exception:  # noqa: BLE001 - declined, or a validator refused: marshmallow judges the body
            return fallback(body)
        return loaded

    return load


DUMP_HOOKS = (PRE_DUMP, POST_DUMP)
# The methods of Schema.dump's path: a schema that overrides one is not simple to dump.
DUMP_PATH = ('dump', '_serialize', 'get_attribute')


def simple_dumper(schema: Schema) -> Dump | None:
    """A function that returns `schema.dump(data)` for the data it can prove it for, and None for
    any other (`schema.dump` is then the judge); None when `schema` is not simple to dump: it must
    be simple to load (`simple_plan`), dump the same fields it loads, none of them an Integer
    `as_string` or with a `dump_default`, and have no dump hooks. The data it dumps is a dict
    whose keys are among the fields' attributes and whose values are each of its field's exact
    type, or None: each such value dumps as itself."""
    plan = simple_plan(schema)
    cls = type(schema)
    try:
        if plan is None or any(cls._hooks.get(tag) for tag in DUMP_HOOKS):
            return None
        if any(getattr(cls, name) is not getattr(Schema, name) for name in DUMP_PATH):
            return None
        if list(schema.dump_fields.items()) != list(schema.load_fields.items()):
            return None
        for field in schema.dump_fields.values():
            if getattr(field, 'as_string', False) or field.dump_default is not missing:
                return None
    except AttributeError:
        return None
    steps = tuple((key, attribute, kind) for key, attribute, kind, *_ in plan)
    known = frozenset(attribute for _, attribute, _ in steps)

    def dump(data: Mapping[str, Any]) -> dict[str, Any] | None:
        if type(data) is not dict or not known.issuperset(data):
            return None
        dumped: dict[str, Any] = {}
        for key, attribute, kind in steps:
            value = data.get(attribute, missing)
            if value is missing:
                continue
            if value is not None and type(value) is not kind:
                return None
            dumped[key] = value
        return dumped

    return dump


def simple_validator(schema: Schema) -> Valid | None:
    """A function that answers True when `schema.validate(data)` would find no error, as far as
    the simple loader can prove it, and False when it cannot (`schema.validate` is then the
    judge); None when `schema` is not simple (`simple_plan`)."""

    def undecided(_body: Mapping[str, Any]) -> dict[str, Any]:
        raise _Declined

    load = simple_loader(schema, undecided)
    if load is None:
        return None

    def valid(data: Mapping[str, Any]) -> bool:
        try:
            load(data)
        except _Declined:
            return False
        return True

    return valid


def data_checks(schema: Schema) -> tuple[Dump | None, Valid | None]:
    """`emit`'s shortcuts for an event's schema (lib.events.outbox.declare): its simple dumper
    and validator, each None when the schema is not simple."""
    return simple_dumper(schema), simple_validator(schema)


def loader(schema: Schema | None) -> Load:
    """The validation step of one schema: `arguments(schema, body)`, built once."""
    if schema is None:
        return _no_fields
    return simple_loader(schema, schema.load) or schema.load


def _no_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    return arguments(None, body)


class Loaders(dict[Schema | None, Load]):
    """Each action's schema -> its loader: built for the registry's actions when the pipeline is
    made, and for any other schema the first time it is asked for."""

    def __init__(self, schemas: Iterable[Schema | None] = ()) -> None:
        super().__init__((schema, loader(schema)) for schema in schemas)

    def __missing__(self, schema: Schema | None) -> Load:
        load = self[schema] = loader(schema)
        return load
