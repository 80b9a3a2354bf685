from .actions import read, rows, upsert

routes = [
    dict(route='read', action=read),
    dict(route='upsert', action=upsert),
    dict(route='rows', action=rows),
]
