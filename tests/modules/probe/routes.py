from . import actions

routes = [
    dict(route=name, action=getattr(actions, name))
    for name in (
        'add_item',
        'write_then_fail',
        'write_note',
        'write_then_sleep',
        'sleep',
        'divide_by_zero',
        'bad_sql',
        'tuples',
        'raw_cursor',
        'leak',
        'backend_pid',
        'in_transaction',
        'pg_types',
        'python_types',
        'echo_types',
        'big',
        'returns_none',
        'crash',
        'returns_string',
        'context',
        'note_then_named_cursor',
        'named_cursor_then_note',
        'many_notes',
        'copied_note',
        'swallowed_error',
    )
] + [dict(route='nested/name', action=actions.returns_none)]
