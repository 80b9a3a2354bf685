"""An action runs without a Flask context, and its request leaves nothing current behind."""

from __future__ import annotations

from flask import has_app_context

from lib.db.connections import _lending
from tests.conftest import AUTH


def test_an_action_runs_without_a_flask_context_and_leaves_no_scope_behind(client):
    for number in range(3):
        request_id = f'scope-{number}'
        response = client.post('/probe/context', headers={**AUTH, 'X-Request-ID': request_id})
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.get_json() == {'app_context': False, 'request_context': False}
        assert response.headers['X-Request-ID'] == request_id
        assert _lending.get() is None  # nothing is left current after the request
        assert not has_app_context()
