"""lib.process: the cached pid follows a fork."""

from __future__ import annotations

import os

from lib.core import process


def test_the_pid_is_this_process_and_each_forked_child_gets_its_own() -> None:
    assert process.pid == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child reports what it sees, then leaves without running pytest's exit
        os.write(write, f'{process.pid} {os.getpid()}'.encode())
        os._exit(0)
    os.close(write)
    seen, actual = os.read(read, 100).decode().split()
    os.close(read)
    os.waitpid(child, 0)
    assert seen == actual == str(child)
    assert process.pid == os.getpid()
