"""The external tools the tests drive for real (nginx, the Docker CLI, envsubst)."""

from __future__ import annotations

import os
import threading
from typing import Self

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


class LoadThreads:
    """`threads` threads each running `load(index)` for the length of a `with` block.

    `load` loops while `self.running`; the block's end stops and joins them.
    """

    threads = 4

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self.load, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def load(self, index: int) -> None:
        raise NotImplementedError
