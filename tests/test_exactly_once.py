"""The proof of issue 20: Idempotency-Key turns an at-least-once client into exactly-once writes.

A client that retries every failed or timed-out request writes 2,000 appends that are not
idempotent by themselves (tests/modules/ledger's `append`, one row per call) through real nginx
and three gunicorn replicas, while one replica is SIGKILLed, its private PostgreSQL restarted,
and another replica frozen longer than the client waits. With a key per append, every append's
row exists exactly once and every answer the client kept is the one stored for its key. The same
run without keys counts the appends written twice or not at all (tests/figures.py: the README
quotes it).
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests

from scripts.topology import Topology, find_nginx, topology
from tests import figures
from tests.conftest import AUTH, LEDGER, apply_migrations
from tests.private_pg import PrivatePostgres, find_bin_dir, private_postgres
from tests.tools import require_tool

pytestmark = pytest.mark.slow

WRITES = 2000
THREADS = 8
REPLICAS = 3
DBNAME = 'dbapi_exactly_once'
CALLER = 'default'  # the caller of the BEARER token
# Short: a request queued on the replica started again after the SIGKILL (its workers still
# booting) expires, is sent again elsewhere, and then runs as well.
CLIENT_TIMEOUT = (1.0, 0.5)  # connect, read (seconds)
BACKOFF = 0.05  # seconds before the first retry, doubled each time up to BACKOFF_MAX
BACKOFF_MAX = 0.5
RUN_DEADLINE = 120.0  # seconds: a run that cannot finish fails instead of hanging
# The faults, by the share of the appends answered when they strike: mid-run, whatever the speed.
KILL_AT = 0.2
PG_RESTART_AT = 0.55
STALL_AT = 0.8
STALL_SECONDS = 1.5  # a replica frozen (a long GC pause, a stalled VM) longer than the client waits
IN_USE = 'urn:dbapi:problem:idempotency-key-in-use'


@pytest.fixture(scope='module')
def pg() -> Iterator[PrivatePostgres]:
    try:
        bin_dir: str | None = str(find_bin_dir())
    except RuntimeError:
        bin_dir = None
    require_tool(bin_dir, 'PostgreSQL')
    with private_postgres() as server:
        apply_migrations(server.create_database(DBNAME), ['modules.example', LEDGER])  # dbapi_idempotency first
        yield server


@pytest.fixture(scope='module')
def top(pg: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require_tool(find_nginx(), 'nginx')
    env = {
        'ENVIRONMENT': 'testing',
        'BEARER': AUTH['Authorization'].split()[1],
        'EXTRA_MODULES': LEDGER,
        'CONNECT_TIMEOUT': '2',
        'POOL_TIMEOUT': '1',
    }
    with topology(REPLICAS, pg.params(DBNAME), tmp_path_factory.mktemp('exactly-once'), **env) as running:
        yield running


@dataclass(frozen=True)
class Kept:
    """The answer the client kept for one append: its first 2xx or 4xx."""

    status: int
    body: bytes
    attempts: int
    replayed: bool  # Idempotent-Replayed: true


@dataclass
class AtLeastOnce:
    """Threads sending one append per note, each retried with the same bytes (and key, if
    `keyed`) after any failure until it gets a 2xx or 4xx; a 409 for a key in use is a failure."""

    url: str
    notes: list[str]
    keyed: bool
    answers: dict[str, Kept] = field(default_factory=dict)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    progress: threading.Condition = field(default_factory=threading.Condition)
    finished: bool = False

    def run(self) -> None:
        pending = iter(self.notes)
        lock = threading.Lock()
        deadline = time.monotonic() + RUN_DEADLINE

        def worker() -> None:
            session = requests.Session()
            while True:
                with lock:
                    note = next(pending, None)
                if note is None:
                    return
                kept = self.send(session, note, deadline)
                with self.progress:
                    if kept is not None:
                        self.answers[note] = kept
                    self.progress.notify_all()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RUN_DEADLINE + 30)
        with self.progress:
            self.finished = True
            self.progress.notify_all()

    def send(self, session: requests.Session, note: str, deadline: float) -> Kept | None:
        """The kept answer; None when the deadline passed first (the test then fails)."""
        headers = {**AUTH, 'Content-Type': 'application/json', 'Accept-Encoding': 'identity'}
        if self.keyed:
            headers['Idempotency-Key'] = note
        body = json.dumps({'note': note}).encode()  # the same bytes every time: the key's body digest
        attempts = 0
        while time.monotonic() < deadline:
            attempts += 1
            try:
                response = session.post(f'{self.url}/ledger/append', data=body, headers=headers, timeout=CLIENT_TIMEOUT)
            except requests.RequestException as error:
                failure = type(error).__name__
            else:
                if not failed(response):
                    return Kept(
                        response.status_code,
                        response.content,
                        attempts,
                        response.headers.get('Idempotent-Replayed') == 'true',
                    )
                failure = str(response.status_code)
            with self.progress:
                self.failures[failure] += 1
            time.sleep(min(BACKOFF * 2 ** (attempts - 1), BACKOFF_MAX) * random.uniform(0.5, 1.0))
        return None

    def wait_answered(self, share: float) -> int:
        """Wait until `share` of the notes are answered (or the run ended); how many are."""
        with self.progress:
            self.progress.wait_for(lambda: self.finished or len(self.answers) >= share * len(self.notes))
            return len(self.answers)

    @property
    def retried(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> str:
        replayed = sum(kept.replayed for kept in self.answers.values())
        return f'{self.retried} retries {dict(self.failures)}, {replayed} answers replayed'


def failed(response: requests.Response) -> bool:
    """Worth sending again: a 5xx (from the app or nginx), or a 409 saying the key is in use."""
    if response.status_code >= 500:
        return True
    if response.status_code == 409:
        return bool(response.json().get('type') == IN_USE)
    return False


@dataclass
class Faults:
    """Mid-run: SIGKILL of one replica's master and workers (started again at once: nginx sends
    elsewhere until it listens), then PostgreSQL restarted (fast mode: sessions ended), then
    another replica frozen (SIGSTOP) for longer than the client waits, and thawed: the requests it
    held time out at the client, are sent again elsewhere, and then run as well."""

    top: Topology
    pg: PrivatePostgres
    victim: int
    struck: dict[str, int] = field(default_factory=dict)  # fault -> appends answered when it struck

    def strike(self, client: AtLeastOnce) -> None:
        replica = self.top.replicas[self.victim]
        self.struck['kill'] = client.wait_answered(KILL_AT)
        replica.kill()
        replica.start(wait=False)
        self.struck['pg-restart'] = client.wait_answered(PG_RESTART_AT)
        self.pg.restart('fast')
        frozen = self.top.replicas[(self.victim + 1) % REPLICAS]
        assert frozen.process is not None
        self.struck['stall'] = client.wait_answered(STALL_AT)
        os.killpg(frozen.process.pid, signal.SIGSTOP)
        try:
            time.sleep(STALL_SECONDS)
        finally:
            os.killpg(frozen.process.pid, signal.SIGCONT)


def run_with_faults(top: Topology, pg: PrivatePostgres, keyed: bool, victim: int) -> AtLeastOnce:
    """Every replica ready, then the run with its faults; the faults must have struck mid-run."""
    for replica in top.replicas:
        replica.wait_ready()
    tag = 'keyed' if keyed else 'bare'
    client = AtLeastOnce(top.url, [f'{tag}-{uuid.uuid4()}' for _ in range(WRITES)], keyed)
    faults = Faults(top, pg, victim)
    striker = threading.Thread(target=faults.strike, args=(client,), daemon=True)
    striker.start()
    client.run()
    striker.join(60)
    assert not striker.is_alive(), 'the faults did not finish'
    assert len(client.answers) == WRITES, f'{WRITES - len(client.answers)} appends unanswered after {RUN_DEADLINE} s'
    assert set(faults.struck) == {'kill', 'pg-restart', 'stall'}, faults.struck
    assert all(answered < WRITES for answered in faults.struck.values()), (
        f'a fault struck after the run: {faults.struck}'
    )
    assert client.retried, 'no request failed: the faults proved nothing'
    return client


def rows_per_note(pg: PrivatePostgres, tag: str) -> dict[str, list[int]]:
    rows = pg.query('SELECT note, id FROM ledger_entries WHERE note LIKE %s ORDER BY id', [f'{tag}-%'], dbname=DBNAME)
    ids: dict[str, list[int]] = collections.defaultdict(list)
    for note, row_id in rows:
        ids[note].append(row_id)
    return ids


def doubled_and_lost(client: AtLeastOnce, ids: dict[str, list[int]]) -> tuple[int, int]:
    """Appends with more than one row, with none; a row of no append sent counts as doubled."""
    doubled = sum(1 for note in client.notes if len(ids.get(note, ())) > 1)
    lost = sum(1 for note in client.notes if not ids.get(note))
    return doubled + len(set(ids) - set(client.notes)), lost


def test_retries_with_keys_write_exactly_once_and_without_keys_do_not(top: Topology, pg: PrivatePostgres) -> None:
    keyed = run_with_faults(top, pg, keyed=True, victim=0)
    ids = rows_per_note(pg, 'keyed')
    keyed_doubled, keyed_lost = doubled_and_lost(keyed, ids)
    print(f'\nwith keys: {keyed_doubled} doubled, {keyed_lost} lost of {WRITES} ({keyed.summary()})')
    # Each append ran exactly once, and answered 200 with its own row.
    assert (keyed_doubled, keyed_lost) == (0, 0), {note: rows for note, rows in ids.items() if len(rows) != 1}
    not_ok = {note: kept for note, kept in keyed.answers.items() if kept.status != 200}
    assert not not_ok, f'{len(not_ok)} appends did not answer 200: {list(not_ok.items())[:3]}'
    # Every kept answer is the stored one, byte for byte, and names the append's own row.
    stored = {
        key: (status, bytes(answer))
        for key, status, answer in pg.query(
            'SELECT key, status, answer FROM dbapi_idempotency WHERE caller = %s', [CALLER], dbname=DBNAME
        )
    }
    assert set(stored) == set(keyed.notes), 'stored answers for other keys, or keys without one'
    differ = {
        note: (kept, stored[note]) for note, kept in keyed.answers.items() if (kept.status, kept.body) != stored[note]
    }
    assert not differ, f'{len(differ)} kept answers differ from the stored ones: {list(differ.items())[:3]}'
    wrong_row = [note for note in keyed.notes if json.loads(stored[note][1]) != {'id': ids[note][0], 'note': note}]
    assert not wrong_row, f'stored answers that do not name their own row: {wrong_row[:3]}'

    # The same client and faults without keys: what the figure in the README counts.
    bare = run_with_faults(top, pg, keyed=False, victim=1)
    doubled, lost = doubled_and_lost(bare, rows_per_note(pg, 'bare'))
    print(f'without keys: {doubled} doubled, {lost} lost of {WRITES} ({bare.summary()})')
    figures.record_exactly_once(WRITES, keyed_doubled, keyed_lost, doubled, lost)
    # Neither run wrote anything else.
    assert pg.query(
        'SELECT count(*) FROM ledger_entries WHERE note NOT LIKE ALL(%s)', [['keyed-%', 'bare-%']], dbname=DBNAME
    ) == [(0,)]
