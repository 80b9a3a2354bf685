from . import actions

routes = [
    dict(route=name, action=getattr(actions, name))
    for name in ('sleep_autocommit', 'timeouts', 'read_item', 'missing_prepared')
]
