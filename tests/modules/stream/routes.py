from .actions import append, append_in_block, in_autocommit, in_own_block, invalid, note, undeclared
from .schemas import AppendedSchema, NotedSchema

routes = [
    dict(route='append', action=append),
    dict(route='append_in_block', action=append_in_block),
    dict(route='note', action=note),
    dict(route='undeclared', action=undeclared),
    dict(route='invalid', action=invalid),
    dict(route='in_autocommit', action=in_autocommit),
    dict(route='in_own_block', action=in_own_block),
]

events = [
    dict(type='stream.appended', schema=AppendedSchema, description='An append to a stream, with its number.'),
    dict(type='stream.noted', schema=NotedSchema),
]
