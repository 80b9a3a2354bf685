"""Fresh request ids: the format callers and nginx share, unique within and across processes."""

from __future__ import annotations

import os
import re

from lib.web.gateway import new_request_id, settle_request_id

HEX32 = re.compile(r'[0-9a-f]{32}')


def test_fresh_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(HEX32.fullmatch(item) for item in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_process_draws_ids_of_its_own() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave at once, running nothing of pytest's
        os.close(read)
        os.write(write, ' '.join(new_request_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_request_id() for _ in range(100)}
    assert len(child) == 100 and not child & parent
    # The counter alone would have repeated: the child continued from the parent's count.
    assert {item[:16] for item in child}.isdisjoint({item[:16] for item in parent})


def test_a_request_without_a_usable_id_gets_a_fresh_one_kept_for_every_layer() -> None:
    environ = {'HTTP_X_REQUEST_ID': 'bad id with spaces'}
    first = settle_request_id(environ)
    assert HEX32.fullmatch(first) and settle_request_id(environ) == first
    assert environ['HTTP_X_REQUEST_ID'] == first
