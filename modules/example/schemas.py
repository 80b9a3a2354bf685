from marshmallow import Schema, fields
from marshmallow.validate import Length

# `examples` shows in the OpenAPI document: the values /docs fills in for "Try it out".
ADA = {'examples': ['ada']}
ADA_EMAIL = {'examples': ['ada@example.com']}


class FooSchema(Schema):
    name = fields.String(required=True, metadata=ADA)
    email = fields.Email(required=False, metadata=ADA_EMAIL)


class NewUserSchema(Schema):
    # Stored in varchar(256) columns: a longer value is refused here (422), not by PostgreSQL (400).
    name = fields.String(required=True, validate=Length(max=256), metadata=ADA)
    email = fields.Email(required=False, validate=Length(max=256), metadata=ADA_EMAIL)


class NameSchema(Schema):
    name = fields.String(required=True, validate=Length(min=1, max=256), metadata=ADA)


# What the actions answer (`@returns`): only these fields are sent, and the OpenAPI document shows them.
class FooResultSchema(Schema):
    name = fields.String(required=True)
    email = fields.Email(required=True, allow_none=True)
    time = fields.DateTime(required=True)


class UserSchema(Schema):
    name = fields.String(required=True)
    email = fields.String(required=True)  # '' when the user was stored without one


# The event example/bar emits (`user.saved`): consumers get these fields as its `data`.
class UserSavedSchema(Schema):
    name = fields.String(required=True)
    email = fields.String(required=True)  # '' when the user was stored without one
