"""bench.instructions (instructions per request under callgrind) and bench.bare (the floor).

The counting's arithmetic and callgrind's files on synthetic data; the method (two forks of one
process under callgrind, the first thread's file) on a tiny real run; the bare app against the
machine's real PostgreSQL. The full count is `python -m bench instructions` (minutes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from bench import bare
from bench.instructions import (
    MAIN_THREAD,
    READ_KEYS,
    WRITE_KEYS,
    Result,
    annotated_costs,
    by_library,
    judge,
    make_bodies,
    per_action,
    per_request_costs,
    short_name,
    spread,
    total_ir,
)
from bench.micro import environ
from tests.conftest import PG, create_database, drop_database
from tests.tools import require_tool

CALLGRIND_OUT = """# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  python -m bench.instructions --child spec.json
part: 1

positions: line
events: Ir
summary: 1234567

fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
0 1000

totals: 1234567
"""


def test_the_ir_total_is_read_from_the_totals_line() -> None:
    assert total_ir(CALLGRIND_OUT) == 1_234_567
    # Another event first: the column that `events:` names Ir.
    assert total_ir('events: Dr Ir\ntotals: 5 99\n') == 99
    # An older file with `summary:` only.
    assert total_ir('events: Ir\nsummary: 42\n') == 42


@pytest.mark.parametrize(
    ('text', 'error'),
    [
        ('totals: 5\n', 'no `events:` line naming Ir'),
        ('events: Dr\ntotals: 5\n', 'naming Ir'),
        ('events: Ir\n', 'no `totals:`'),
    ],
)
def test_a_file_without_an_ir_total_is_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        total_ir(text)


def test_a_request_costs_what_the_n_requests_added_over_the_same_warm_up() -> None:
    assert per_action(1_400_000_000, 1_050_000_000, 1000) == 350_000
    # A batch of 100 reads, 10 requests: per read.
    assert per_action(1_300_000_000, 1_080_000_000, 10, 100) == 220_000
    with pytest.raises(ValueError, match='no request measured'):
        per_action(1, 1, 0)


def test_runs_apart_is_the_spread_over_the_smallest() -> None:
    assert spread([100.0, 101.0]) == pytest.approx(0.01)
    assert spread([101.0, 100.0, 100.5]) == pytest.approx(0.01)
    assert spread([7.0]) == 0.0


def test_the_targets_compare_the_app_with_the_bare_app_and_the_runs_with_each_other() -> None:
    results = {
        'read': Result('read', 'read by key', [299_850.0, 300_150.0]),
        'upsert': Result('upsert', 'upsert', [240_000.0, 246_000.0]),
        'bare_read': Result('bare_read', 'bare read', [100_000.0, 100_000.0]),
        'bare_upsert': Result('bare_upsert', 'bare upsert', [100_000.0, 100_000.0]),
    }
    verdicts = {target.what: (target.measured, target.status) for target in judge(results)}
    assert verdicts['read, app / bare read'] == (3.0, 'FAIL')
    assert verdicts['upsert, app / bare upsert'] == (2.43, 'PASS')
    assert verdicts['read, runs apart'] == (0.001001, 'PASS')  # 300 / 299,850
    assert verdicts['upsert, runs apart'] == (0.025, 'FAIL')  # 2.5% apart: not a count to judge by
    assert verdicts['bare_read, runs apart'] == (0.0, 'PASS')


ANNOTATED = """--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
1,500,000 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                 file:function
--------------------------------------------------------------------------------
900,000 (60.00%)  /tmp/build/Python-3.11.7/Python/ceval.c:_PyEval_EvalFrameDefault'2 [/py/libpython3.11.so.1.0]
300,000 (20.00%)  /tmp/build/Python-3.11.7/./Include/object.h:_PyFrame_Clear
200,000 (13.33%)  ???:0x0000000000013cc0 [/v/site-packages/orjson/orjson.cpython-311-x86_64-linux-gnu.so]
100,000 ( 6.67%)  ./string/memmove.S:__memcpy_avx_unaligned_erms [/usr/lib/x86_64-linux-gnu/libc.so.6]
"""


def test_callgrind_annotate_output_gives_each_function_s_cost_per_request() -> None:
    with_requests = annotated_costs(ANNOTATED)
    assert len(with_requests) == 4 and 'PROGRAM TOTALS' not in with_requests
    without = {name: cost // 10 for name, cost in with_requests.items()}  # the warm-up's share
    without['???:0x1 [gone.so]'] = 5  # ran only without the requests: not a cost of theirs
    costs = per_request_costs(with_requests, without, 100)
    assert [round(cost) for _, cost in costs] == [8100, 2700, 1800, 900]
    assert short_name(costs[0][0]) == "Python/ceval.c:_PyEval_EvalFrameDefault'2 [libpython3.11.so.1.0]"
    assert short_name(costs[1][0]) == './Include/object.h:_PyFrame_Clear'
    assert [(library, round(cost)) for library, cost in by_library(costs)] == [
        ('libpython3.11.so.1.0', 8100),
        ('libpython (inlined)', 2700),
        ('orjson.cpython-311-x86_64-linux-gnu.so', 1800),
        ('libc.so.6', 900),
    ]


def test_the_bodies_are_seeded_with_reads_and_writes_on_disjoint_keys() -> None:
    reads, upserts = make_bodies('read', 200), make_bodies('upsert', 200)
    assert reads == make_bodies('read', 200) and upserts == make_bodies('upsert', 200)
    assert make_bodies('read', 5, 'warmup') != reads[:5]
    assert all(READ_KEYS[0] <= json.loads(body)['aid'] <= READ_KEYS[1] for body in reads)
    written = [json.loads(body) for body in upserts]
    assert all(WRITE_KEYS[0] <= row['aid'] <= WRITE_KEYS[1] for row in written)
    assert {len(str(row['abalance'])) for row in written} == {4}  # one width: one cost
    assert all(row['bid'] == (row['aid'] - 1) // 100_000 + 1 for row in written)  # pgbench's branch
    assert {len(body) for body in make_bodies('foo', 50)} == {len(make_bodies('foo', 1)[0])}
    (batch,) = make_bodies('batch_read', 1)
    actions = json.loads(batch)['actions']
    assert len(actions) == 100 and {action['action'] for action in actions} == {'bench/read_tx'}


# A toy under callgrind, no imports: forks children that loop 0 or N times, as the benchmark's
# process forks its counts. Prints each child's pid and loop count.
FORKS = """
import os
def work(n):
    total = 0
    for i in range(n):
        total += i
for n in (0, 3000, 0, 3000):
    pid = os.fork()
    if pid == 0:
        work(n)
        os._exit(0)
    os.waitpid(pid, 0)
    print(pid, n)
"""


def test_two_forks_under_callgrind_count_the_same_loop_alike(tmp_path: Path) -> None:
    valgrind = require_tool(shutil.which('valgrind'), 'valgrind')
    command = [valgrind, '--tool=callgrind', '--separate-threads=yes', '--dump-line=no', '-q']
    command += [f'--callgrind-out-file={tmp_path}/callgrind.%p', sys.executable, '-S', '-c', FORKS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    irs = [
        (int(n), total_ir((tmp_path / f'callgrind.{pid}{MAIN_THREAD}').read_text(encoding='utf-8')))
        for pid, n in (line.split() for line in done.stdout.splitlines())
    ]
    first, second = per_action(irs[1][1], irs[0][1], 3000), per_action(irs[3][1], irs[2][1], 3000)
    # A Python loop step is tens of instructions; counted, not timed, so both pairs agree.
    assert 10 < first < 1000
    assert spread([first, second]) < 0.01


# --- bench/bare.py against the real PostgreSQL --------------------------------------------------

TOKEN = 'bare-token'


@pytest.fixture
def bare_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database with pgbench's accounts table (three rows), and bench.bare pointed at it."""
    name = create_database('dbapi_bare')
    conn = psycopg2.connect(dbname=name, **PG)
    try:
        with conn, conn.cursor() as cursor:
            columns = 'aid integer PRIMARY KEY, bid integer, abalance integer, filler character(84)'
            cursor.execute(f'CREATE TABLE pgbench_accounts ({columns})')
            cursor.execute("INSERT INTO pgbench_accounts SELECT n, 1, 0, '' FROM generate_series(1, 3) AS n")
    finally:
        conn.close()
    env = {'DEFAULT_DB_NAME': name, 'DEFAULT_DB_HOST': PG['host'], 'DEFAULT_DB_PORT': str(PG['port'])}
    for key, value in (env | {'DEFAULT_DB_USER': PG['user'], 'BEARER': TOKEN}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(bare, '_connection', None)  # its first request connects with these settings
    try:
        yield name
    finally:
        if bare._connection is not None:
            bare._connection.conn.close()
        drop_database(name)


def serve(path: str, body: bytes, token: str = TOKEN, method: str = 'POST') -> tuple[str, Any]:
    statuses: list[str] = []
    request = environ(path, body, token) | {'REQUEST_METHOD': method}
    chunks = bare.app(request, lambda status, headers: statuses.append(status))
    return statuses[0], json.loads(b''.join(chunks))


def test_the_bare_app_reads_and_upserts_in_a_transaction(bare_database: str) -> None:
    assert serve('/bench/read', b'{"aid":2}') == ('200 OK', {'aid': 2, 'bid': 1, 'abalance': 0, 'filler': ' ' * 84})
    assert serve('/bench/read', b'{"aid":9}') == ('200 OK', None)
    upserted = {'aid': 9, 'bid': 1, 'abalance': 1234}
    assert serve('/bench/upsert', json.dumps(upserted).encode()) == ('200 OK', upserted)
    assert serve('/bench/upsert', b'{"aid":2,"bid":1,"abalance":-5}') == (
        '200 OK',
        {'aid': 2, 'bid': 1, 'abalance': -5},
    )
    # Committed: another session sees both, and the bare app's connection is back in autocommit.
    conn = psycopg2.connect(dbname=bare_database, **PG)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute('SELECT aid, abalance FROM pgbench_accounts WHERE aid IN (2, 9) ORDER BY aid')
            assert cursor.fetchall() == [(2, -5), (9, 1234)]
    finally:
        conn.close()
    assert bare._connection is not None and bare._connection.conn.autocommit


def test_the_bare_app_checks_the_token_and_the_body(bare_database: str) -> None:
    assert serve('/bench/read', b'{"aid":1}', token='wrong') == ('401 Unauthorized', {'title': 'Unauthorized'})
    request = environ('/bench/read', b'{"aid":1}', TOKEN)
    del request['HTTP_AUTHORIZATION']
    statuses: list[str] = []
    assert bare.app(request, lambda status, headers: statuses.append(status)) and statuses == ['401 Unauthorized']
    for body in (b'{"aid":', b'[1]', b'{"id":1}', b'{"aid":1,"bid":1}'):
        path = '/bench/upsert' if b'bid' in body else '/bench/read'
        assert serve(path, body) == ('400 Bad Request', {'title': 'Bad Request'}), body
    # A failed upsert is rolled back and leaves the connection in autocommit.
    with pytest.raises(psycopg2.errors.NumericValueOutOfRange):
        serve('/bench/upsert', b'{"aid":1,"bid":1,"abalance":99999999999}')
    assert bare._connection is not None and bare._connection.conn.autocommit
    assert serve('/bench/read', b'{"aid":1}')[0] == '200 OK'


def test_the_readiness_probe_needs_no_token_and_no_body(bare_database: str) -> None:
    status, row = serve('/', b'', token='', method='GET')
    assert (status, row['aid']) == ('200 OK', 1)


def test_python_m_bench_instructions_is_the_instruction_count() -> None:
    command = [sys.executable, '-m', 'bench', 'instructions', '--only', 'read,nope']
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and 'bench instructions: error: unknown scenarios: nope' in done.stderr, done.stderr
