"""The app context an action runs in (lib/app_context.py): Flask's, lean only when nothing can tell."""

from __future__ import annotations

from flask import appcontext_popped, appcontext_pushed, has_app_context

from lib import app_context
from tests.conftest import AUTH


def context_seen(client, request_id: str) -> dict:
    response = client.post('/probe/context', headers={**AUTH, 'X-Request-ID': request_id})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_an_action_sees_its_app_and_request_and_a_fresh_g_every_time(app, client):
    assert not app_context.observed(app)  # the lean path: nothing registered
    for number in range(3):
        seen = context_seen(client, f'ctx-{number}')
        assert seen == {'app': app.name, 'request_id': f'ctx-{number}', 'marked_before': False}
        assert not has_app_context()  # nothing is left current after the request


def test_teardown_functions_and_signal_receivers_still_see_every_context(app, client):
    events: list[str] = []
    app.teardown_appcontext(lambda error: events.append('teardown'))

    def pushed(sender, **_):
        events.append('pushed')

    def popped(sender, **_):
        events.append('popped')

    appcontext_pushed.connect(pushed, app)
    appcontext_popped.connect(popped, app)
    try:
        assert app_context.observed(app)
        assert context_seen(client, 'ctx-observed')['marked_before'] is False
    finally:
        appcontext_pushed.disconnect(pushed, app)
        appcontext_popped.disconnect(popped, app)
    assert events == ['pushed', 'teardown', 'popped']
    assert not has_app_context()


def test_push_and_pop_pair_up_either_way(app):
    for register in (False, True):
        if register:
            app.teardown_appcontext(lambda error: None)
        context, token = app_context.push(app)
        assert has_app_context() and (token is None) is register
        app_context.pop(context, token)
        assert not has_app_context()
