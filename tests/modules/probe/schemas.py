from marshmallow import Schema, fields, validate


class ItemSchema(Schema):
    code = fields.String(required=True)
    qty = fields.Integer(required=True)
    parent = fields.Integer(load_default=None)


class NoteSchema(Schema):
    note = fields.String(required=True, validate=validate.Length(max=10_000_000))


class NoteFailSchema(Schema):
    note = fields.String(required=True)
    fail = fields.Boolean(load_default=False)


class SleepSchema(Schema):
    seconds = fields.Float(required=True)


class NoteSleepSchema(Schema):
    note = fields.String(required=True)
    seconds = fields.Float(required=True)


class TypesSchema(Schema):
    day = fields.Date(required=True)
    amount = fields.Decimal(required=True)
