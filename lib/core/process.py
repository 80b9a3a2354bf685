"""This process's id, read without a system call: `process.pid`.

`os.getpid()` is a system call on every use (glibc stopped caching it), and the hot path asks
three times a request: is the pool still ours, is the log file still ours, which pid goes on
the line. The answer changes only at a fork, so it is read once and again in each child.
"""

from __future__ import annotations

import os

pid = os.getpid()


def _forked() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
