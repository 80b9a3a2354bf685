"""The external tools the tests drive for real (nginx, the Docker CLI, envsubst)."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.getenv('CI', '').lower() in {'1', 'true', 'yes'}


def require_tool(path: str | None, name: str) -> str:
    """The tool's path. A missing tool fails the test under CI=true (it would prove nothing);
    on a developer's machine without it, the test is skipped with how to install it."""
    if path:
        return path
    message = f'{name} is not installed: scripts/ensure_tools.sh installs it'
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)  # never reached under CI: pytest.fail above raised
