from marshmallow import Schema, fields


class FooSchema(Schema):
    name = fields.String(required=True)
    email = fields.Email(required=False)
