from marshmallow import Schema, fields


class SecondsSchema(Schema):
    seconds = fields.Float(required=True)


class CodeSchema(Schema):
    code = fields.String(required=True)
