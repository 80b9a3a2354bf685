"""Text about the current second, made once a second instead of once a use."""

from __future__ import annotations

from collections.abc import Callable


class SecondText:
    """`make(second)`, kept until the second changes: the log lines' timestamps and the answers'
    Date line ask for the same text thousands of times a second."""

    __slots__ = ('kept', 'make')

    def __init__(self, make: Callable[[int], str]) -> None:
        self.make = make
        self.kept: tuple[int, str] = (-1, '')  # one tuple: a reader never sees a second with another's text

    def at(self, second: int) -> str:
        kept_second, text = self.kept
        if kept_second != second:
            text = self.make(second)
            self.kept = (second, text)
        return text
