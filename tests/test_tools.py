"""Under CI=true a missing tool fails the test; it is never skipped."""

from __future__ import annotations

import pytest

from tests.tools import require_tool


def test_a_missing_tool_fails_under_ci(monkeypatch):
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(pytest.fail.Exception, match='nginx is not installed'):
        require_tool(None, 'nginx')


def test_a_missing_tool_is_a_skip_elsewhere(monkeypatch):
    monkeypatch.delenv('CI', raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool(None, 'nginx')


def test_a_present_tool_is_its_path():
    assert require_tool('/usr/sbin/nginx', 'nginx') == '/usr/sbin/nginx'
