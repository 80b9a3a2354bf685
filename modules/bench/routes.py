from .actions import read, read_tx, rows, upsert

routes = [
    dict(route='read', action=read),
    dict(route='read_tx', action=read_tx),
    dict(route='upsert', action=upsert),
    dict(route='rows', action=rows),
]
