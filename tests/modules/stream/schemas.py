from marshmallow import Schema, fields
from marshmallow.validate import Length, Range


class AppendSchema(Schema):
    stream = fields.String(required=True, validate=Length(min=1, max=100))
    fail = fields.Boolean(load_default=False)  # refuse (409) after emitting: nothing is committed


class BlockSchema(Schema):
    stream = fields.String(required=True, validate=Length(min=1, max=100))
    fail_inner = fields.Boolean(required=True)


class NoteSchema(Schema):
    note = fields.String(required=True)


class AppendedSchema(Schema):
    """The event stream.appended: the stream and the number its append took."""

    stream = fields.String(required=True)
    n = fields.Integer(required=True, validate=Range(min=1))


class NotedSchema(Schema):
    note = fields.String(required=True)
