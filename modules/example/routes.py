from .actions import bar, foo, ping, user

routes = [
    dict(route='', action=ping),
    dict(route='foo', action=foo),
    dict(route='bar', action=bar),
    dict(route='user', action=user),
]
