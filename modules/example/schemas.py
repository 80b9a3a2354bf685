from marshmallow import Schema, fields
from marshmallow.validate import Length


class FooSchema(Schema):
    name = fields.String(required=True)
    email = fields.Email(required=False)


class NameSchema(Schema):
    name = fields.String(required=True, validate=Length(min=1, max=256))
