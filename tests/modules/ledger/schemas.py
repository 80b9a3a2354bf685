from marshmallow import Schema, fields


class NoteSchema(Schema):
    note = fields.String(required=True)


class CodeSchema(Schema):
    note = fields.String(required=True)
    code = fields.String(required=True)


class HoldSchema(Schema):
    note = fields.String(required=True)
    seconds = fields.Float(required=True)


class NestedSchema(Schema):
    outer = fields.String(required=True)
    inner = fields.String(required=True)
    fail_inner = fields.Boolean(load_default=False)


class CodesSchema(Schema):
    codes = fields.List(fields.String(), required=True)


class EntrySchema(Schema):
    id = fields.Integer()
    note = fields.String()
