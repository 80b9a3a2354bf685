from .actions import read, read_tx, rows, upsert, upsert_event
from .schemas import AccountSavedSchema

routes = [
    dict(route='read', action=read),
    dict(route='read_tx', action=read_tx),
    dict(route='upsert', action=upsert),
    dict(route='upsert_event', action=upsert_event),
    dict(route='rows', action=rows),
]

events = [dict(type='bench.account_saved', schema=AccountSavedSchema)]
