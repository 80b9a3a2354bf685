from .actions import bar, foo, ping

routes = [
    dict(route='', action=ping),
    dict(route='foo', action=foo),
    dict(route='bar', action=bar),
]
