from marshmallow import Schema, fields
from marshmallow.validate import Range

from .sql import MAX_ROWS

KEY = fields.Integer(required=True, strict=True, validate=Range(min=1))


class KeySchema(Schema):
    aid = KEY


class UpsertSchema(Schema):
    aid = KEY
    bid = fields.Integer(required=True, strict=True, validate=Range(min=1))
    abalance = fields.Integer(required=True, strict=True, validate=Range(min=-(2**31), max=2**31 - 1))


class RowsSchema(Schema):
    first = KEY
    count = fields.Integer(load_default=MAX_ROWS, strict=True, validate=Range(min=1, max=MAX_ROWS))


class AccountSavedSchema(Schema):
    """The event of bench/upsert_event: the account as written."""

    aid = fields.Integer(required=True)
    bid = fields.Integer(required=True)
    abalance = fields.Integer(required=True)
