from . import actions

routes = [
    dict(route=name, action=getattr(actions, name))
    for name in (
        'append',
        'add_code',
        'append_then_refuse',
        'append_then_crash',
        'append_then_serialization_failure',
        'append_slowly',
        'nested',
        'find_codes',
        'count',
        'append_elsewhere',
        'echo',
        'append_and_commit',
        'append_in_with_conn',
        'append_twice_committing',
    )
]
