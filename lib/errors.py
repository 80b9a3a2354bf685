"""Deprecated: the 0.1 import path `lib.errors`; import from `lib` instead (lib/_deprecated.py)."""

from typing import Any

from lib._deprecated import moved


def __getattr__(name: str) -> Any:
    return moved(__name__, name)
