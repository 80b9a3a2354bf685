from .actions import bar, foo, ping, user
from .schemas import UserSavedSchema

routes = [
    dict(route='', action=ping),
    dict(route='foo', action=foo),
    dict(route='bar', action=bar),
    dict(route='user', action=user),
]

# What the actions emit (`emit(conn, type, data, key)`): every other service can subscribe to them.
events = [
    dict(type='user.saved', schema=UserSavedSchema),
]
