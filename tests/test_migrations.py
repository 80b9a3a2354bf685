"""Schema migrations (lib/db/migrations.py, `flask --app app migrate`), against the machine's real
PostgreSQL: concurrent runs, refused edits, failing files, dry runs, baselines, concurrent index
builds under write load, and readiness with a real gunicorn."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests
from flask import Flask

from lib.db.connections import POOLS_KEY
from lib.db.migrations import (
    LOCK_KEYS,
    MigrationError,
    Plan,
    discover,
    migrate,
    own_migrations,
    read_directory,
    shown,
    split_statements,
)
from tests.conftest import MODULES, PG, create_database, drop_database, make_app, query, schema_database
from tests.logs import read_lines
from tests.service import Service, running_service
from tests.tools import LoadThreads

ROOT = Path(__file__).resolve().parent.parent
FLASK = Path(sys.executable).parent / 'flask'
WAIT_SECONDS = 60  # the longest any awaited event may take on a loaded machine (not a timing assertion)
MODULE_INIT = 'from lib import module_blueprint\n\nblueprint = module_blueprint(__name__, [])\n'
# What a database of the test modules gets first: dbapi's own files (more come with later
# features), then example's and probe's.
SERVED = discover(MODULES)


def write_module(root: Path, files: dict[str, str]) -> str:
    """A module package of its own under `root` holding `migrations/<files>`; its import name."""
    name = f'mig_{uuid.uuid4().hex[:8]}'
    (root / name / 'migrations').mkdir(parents=True)
    (root / name / '__init__.py').write_text(MODULE_INIT, encoding='utf-8')
    for file, text in files.items():
        (root / name / 'migrations' / file).write_text(text, encoding='utf-8')
    return name


def one_of(params: dict[str, Any], text: str, args: Any = None) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(**params)
    conn.autocommit = True
    try:
        return query(conn, text, args)
    finally:
        conn.close()


def recorded(params: dict[str, Any], module: str) -> list[tuple[Any, ...]]:
    return one_of(params, 'SELECT version, baseline FROM dbapi_migrations WHERE module = %s ORDER BY 1', [module])


def relation(params: dict[str, Any], name: str) -> bool:
    return bool(one_of(params, 'SELECT to_regclass(%s) IS NOT NULL', [name])[0][0])


def without_timings(output: str) -> list[str]:
    return [re.sub(r' in \d+ ms$', '', line) for line in output.splitlines()]


def await_true(check: Any, what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f'{what}: not within {timeout} s')
        time.sleep(0.05)


@pytest.fixture
def fresh() -> Iterator[dict[str, Any]]:
    """A new, empty database, dropped after the test."""
    name = create_database('dbapi_migrate')
    try:
        yield dict(PG, dbname=name)
    finally:
        drop_database(name)


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path for the test's own module packages."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def app_with(fresh: dict[str, Any], log_dir: str) -> Iterator[Any]:
    """`app_with(module)`: an app over the fresh database serving example, probe and `module`."""
    made: list[Flask] = []

    def make(module: str) -> Flask:
        made.append(make_app(fresh, log_dir, MODULES=[*MODULES, module]))
        return made[-1]

    yield make
    for app in made:
        app.extensions[POOLS_KEY].close()


def run_cli(app: Flask, *args: str) -> tuple[int, list[str]]:
    result = app.test_cli_runner().invoke(args=['migrate', *args])
    return result.exit_code, without_timings(result.output)


# --- the SQL text and the files, without a database ---------------------------------------


def test_statements_are_split_at_semicolons_outside_quotes_dollar_quotes_and_comments() -> None:
    text = (
        "-- a; comment\nCREATE TABLE t (a text DEFAULT 'x;''y');\n"
        'CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END $body$;\n'
        "/* nested /* ; */ still; */ SELECT E'\\';', \"odd;name\", $$;$$, a$b FROM t;\n"
        '-- only a comment;\n   ;  '
    )
    statements = split_statements(text)
    assert [s.text[s.code - s.offset :].split()[0] for s in statements] == ['CREATE', 'CREATE', 'SELECT']
    assert statements[0].text.endswith("DEFAULT 'x;''y')")
    assert statements[1].text.endswith('END $body$')
    assert statements[2].text.endswith('a$b FROM t')


def test_file_names_numbers_and_directives_are_checked_naming_the_file(tmp_path: Path) -> None:
    def refused(files: dict[str, str]) -> str:
        directory = tmp_path / uuid.uuid4().hex
        directory.mkdir()
        for file, text in files.items():
            (directory / file).write_text(text, encoding='utf-8')
        with pytest.raises(MigrationError) as caught:
            read_directory('m', directory)
        return str(caught.value)

    assert '1_first.sql: not a migration file name: use NNNN_description.sql' in refused({'1_first.sql': 'x'})
    assert 'have the same number 0002: renumber one' in refused({'0002_a.sql': 'x', '0002_b.sql': 'y'})
    message = refused({'0001_a.sql': '-- a comment\n-- dbapi: no-transaction\nSELECT 1;'})
    assert message.endswith(
        "0001_a.sql line 2: '-- dbapi: no-transaction': the one directive is"
        " '-- dbapi: no-transaction', as the first line"
    )
    plain, concurrent = read_directory(
        'm', write_files(tmp_path, {'0001_a.sql': 'SELECT 1;', '0002_b.sql': '-- dbapi: no-transaction\nSELECT 2;'})
    )
    assert (plain.transactional, concurrent.transactional) == (True, False)
    assert own_migrations()[0].label == 'dbapi 0001_idempotency'


def write_files(root: Path, files: dict[str, str]) -> Path:
    directory = root / uuid.uuid4().hex
    directory.mkdir()
    for file, text in files.items():
        (directory / file).write_text(text, encoding='utf-8')
    return directory


def test_a_module_that_still_has_schema_sql_is_refused_with_the_way_out(packages: Path) -> None:
    name = write_module(packages, {})
    (packages / name / 'schema.sql').write_text('CREATE TABLE x ();', encoding='utf-8')
    with pytest.raises(MigrationError, match=r'schema.sql is not applied any more: move it to .*0001_initial.sql'):
        discover([name])


def test_an_empty_file_or_one_that_commits_is_refused_before_anything_runs(tmp_path: Path) -> None:
    empty, commits = read_directory(
        'm',
        write_files(
            tmp_path,
            {
                '0001_empty.sql': '-- m 0001_empty: what this changes, and why.\n',
                '0002_commits.sql': 'CREATE TABLE a ();\nCOMMIT;\nROLLBACK TO SAVEPOINT s;\n',
            },
        ),
    )
    assert 'holds no SQL statement: write the change first' in str(Plan([empty], {}).refusal())
    assert '0002_commits.sql line 2: a file runs in one transaction that dbapi commits' in str(
        Plan([commits], {}).refusal()
    )


# --- runs against PostgreSQL -------------------------------------------------------------------


def test_three_migrate_processes_started_at_once_apply_each_file_once(
    fresh: dict[str, Any], packages: Path, tmp_path: Path
) -> None:
    """The lock is held by the test until all three wait for it; then one applies everything,
    including a concurrent index build that the two others, polling, must not block."""
    name = write_module(
        packages,
        {
            '0001_counted.sql': "CREATE TABLE mig_runs (file text NOT NULL);\nINSERT INTO mig_runs VALUES ('0001');\n",
            '0002_index.sql': '-- dbapi: no-transaction\nCREATE INDEX CONCURRENTLY mig_runs_file ON mig_runs (file);\n'
            "INSERT INTO mig_runs VALUES ('0002');\n",
            '0003_column.sql': 'ALTER TABLE mig_runs ADD COLUMN at timestamptz;\n'
            "INSERT INTO mig_runs VALUES ('0003');\n",
        },
    )
    env = {
        **os.environ,
        'ENVIRONMENT': 'testing',
        'DEFAULT_DB_HOST': str(PG['host']),
        'DEFAULT_DB_PORT': str(PG['port']),
        'DEFAULT_DB_USER': str(PG['user']),
        'DEFAULT_DB_NAME': fresh['dbname'],
        'EXTRA_MODULES': name,
        'PYTHONPATH': str(packages),
    }
    holder = psycopg2.connect(**fresh)
    holder.autocommit = True
    outputs = [tmp_path / f'migrate-{i}.out' for i in range(3)]
    processes = []
    try:
        query(holder, 'SELECT pg_advisory_lock(%(space)s, %(key)s)', LOCK_KEYS)
        for output in outputs:
            with output.open('w') as out:
                processes.append(
                    subprocess.Popen(
                        [str(FLASK), '--app', 'app', 'migrate'], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                    )
                )
        await_true(
            lambda: all('waiting for the migration lock' in p.read_text() for p in outputs),
            'three runs waiting for the lock',
        )
    finally:
        holder.close()  # the lock goes with the session
        codes = [process.wait(WAIT_SECONDS) for process in processes]
    texts = [without_timings(output.read_text()) for output in outputs]
    assert codes == [0, 0, 0], texts
    assert one_of(fresh, 'SELECT file FROM mig_runs ORDER BY file') == [('0001',), ('0002',), ('0003',)]
    assert recorded(fresh, name) == [(1, False), (2, False), (3, False)]
    assert one_of(fresh, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'mig_runs_file'::regclass") == [(True,)]
    applied = [line for text in texts for line in text if ': applied ' in line]
    files = len(discover(['modules.example'])) + 3  # dbapi's, example's and the module's 3
    assert sorted(applied) == sorted({*applied}) and len(applied) == files, texts
    assert sum(f'default: nothing to apply; {files} applied' in text for text in texts) == 2, texts


def test_an_applied_file_that_was_edited_is_refused_naming_it_and_both_checksums(
    app_with: Any, fresh: dict[str, Any], packages: Path
) -> None:
    name = write_module(packages, {'0001_table.sql': 'CREATE TABLE edited (id int);\n'})
    app = app_with(name)
    assert run_cli(app)[0] == 0
    path = packages / name / 'migrations' / '0001_table.sql'
    before = next(m.sha256 for m in discover([name]) if m.module == name)
    path.write_text('CREATE TABLE edited (id bigint);\n', encoding='utf-8')
    (packages / name / 'migrations' / '0002_next.sql').write_text('CREATE TABLE next_one ();\n', encoding='utf-8')
    after = next(m.sha256 for m in discover([name]) if m.module == name)
    code, lines = run_cli(app)
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith(f'Error: {path} was changed after it was applied'), lines
    assert f'sha256 {before} applied, {after} now' in lines[0] and lines[0].endswith('Nothing was applied')
    assert not relation(fresh, 'next_one') and recorded(fresh, name) == [(1, False)]


def test_a_failing_file_leaves_nothing_of_it_and_stops_the_run(
    app_with: Any, fresh: dict[str, Any], packages: Path
) -> None:
    name = write_module(
        packages,
        {
            '0001_fine.sql': 'CREATE TABLE fine_one (id int);\n',
            '0002_broken.sql': 'CREATE TABLE half_done (id int);\nCREAT TABLE oops ();\n',
            '0003_later.sql': 'CREATE TABLE later_one (id int);\n',
        },
    )
    app = app_with(name)
    code, lines = run_cli(app)
    assert code != 0
    broken = packages / name / 'migrations' / '0002_broken.sql'
    assert lines == [
        *(f'default: applied {migration.label}' for migration in SERVED),
        f'default: applied {name} 0001_fine',
        f'Error: {broken} line 2: syntax error at or near "CREAT"; nothing of it was applied',
    ]
    assert relation(fresh, 'fine_one') and not relation(fresh, 'half_done') and not relation(fresh, 'later_one')
    assert recorded(fresh, name) == [(1, False)]
    broken.write_text('CREATE TABLE half_done (id int);\n', encoding='utf-8')  # fixed: the run goes on from there
    assert run_cli(app) == (0, [f'default: applied {name} 0002_broken', f'default: applied {name} 0003_later'])


def test_an_index_left_invalid_by_a_failed_concurrent_build_fails_the_run_naming_it(
    app_with: Any, fresh: dict[str, Any], packages: Path
) -> None:
    """CREATE UNIQUE INDEX CONCURRENTLY over duplicates fails and leaves an invalid index, which
    the same file run again (IF NOT EXISTS) skips silently: the check after the file sees it."""
    name = write_module(
        packages,
        {
            '0001_dups.sql': "CREATE TABLE dups (code text);\nINSERT INTO dups VALUES ('a'), ('a');\n",
            '0002_unique.sql': '-- dbapi: no-transaction\n'
            'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS dups_code ON dups (code);\n',
        },
    )
    app = app_with(name)
    code, lines = run_cli(app)
    script = packages / name / 'migrations' / '0002_unique.sql'
    assert code != 0 and lines[-1].startswith(f'Error: {script} line 2: could not create unique index "dups_code"')
    code, lines = run_cli(app)
    assert code != 0
    assert lines == [
        f'Error: {script}: index dups_code is invalid (a concurrent build that failed, which IF NOT'
        ' EXISTS then skips): DROP INDEX CONCURRENTLY dups_code, then migrate again; not recorded'
    ]
    assert recorded(fresh, name) == [(1, False)]


def test_dry_run_says_what_would_run_and_changes_nothing(app_with: Any, fresh: dict[str, Any], packages: Path) -> None:
    name = write_module(packages, {'0001_table.sql': 'CREATE TABLE dry_one (id int);\n'})
    app = app_with(name)
    code, lines = run_cli(app, '--dry-run')
    assert code == 0
    assert lines[0] == 'default: would apply dbapi 0001_idempotency (lib/sql/0001_idempotency.sql)'
    assert 'default: would apply example 0001_initial (modules/example/migrations/0001_initial.sql)' in lines
    assert lines == [
        *(
            f'default: would apply {m.label} ({shown(m.path)}{"" if m.transactional else ", outside a transaction"})'
            for m in SERVED
        ),
        f'default: would apply {name} 0001_table ({packages / name / "migrations" / "0001_table.sql"})',
    ]
    assert one_of(fresh, "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace") == [(0,)]
    assert run_cli(app)[0] == 0
    later = packages / name / 'migrations' / '0002_index.sql'
    later.write_text('-- dbapi: no-transaction\nCREATE INDEX CONCURRENTLY dry_index ON dry_one (id);\n')
    rows = one_of(fresh, 'SELECT * FROM dbapi_migrations')
    assert run_cli(app, '--dry-run') == (
        0,
        [f'default: would apply {name} 0002_index ({later}, outside a transaction)'],
    )
    assert one_of(fresh, 'SELECT * FROM dbapi_migrations') == rows and not relation(fresh, 'dry_index')


def test_baseline_adopts_a_database_built_by_the_old_schema_sql_files(
    app_with: Any, fresh: dict[str, Any], packages: Path
) -> None:
    """The old `apply_sql` ran each schema.sql, now each module's 0001, without recording it:
    --baseline records those without running them (this 0001 would fail a second time), and the
    files after them run as usual."""
    name = write_module(
        packages,
        {
            '0001_initial.sql': 'CREATE TABLE legacy_items (id int PRIMARY KEY);\n'
            'INSERT INTO legacy_items VALUES (1);\n',
            '0002_label.sql': "ALTER TABLE legacy_items ADD COLUMN label text NOT NULL DEFAULT '';\n",
        },
    )
    app = app_with(name)
    firsts = [m for m in discover([*MODULES, name]) if m.version == 1]
    conn = psycopg2.connect(**fresh)
    try:
        for migration in firsts:  # what the old apply_sql did: each file in a transaction, nothing recorded
            with conn, conn.cursor() as cursor:
                cursor.execute(migration.text)
    finally:
        conn.close()
    code, lines = run_cli(app, '--baseline')
    assert code == 0, lines
    assert lines == [f'default: recorded {m.label} as applied without running it (baseline)' for m in firsts]
    assert recorded(fresh, name) == [(1, True)] and recorded(fresh, 'dbapi') == [(1, True)]
    assert one_of(fresh, 'SELECT count(*) FROM legacy_items') == [(1,)]
    later_own = [f'default: applied {m.label}' for m in own_migrations()[1:]]  # baseline records each first file only
    assert run_cli(app) == (0, [*later_own, f'default: applied {name} 0002_label'])
    assert one_of(fresh, 'SELECT id, label FROM legacy_items') == [(1, '')]
    status = app.test_cli_runner().invoke(args=['migrate', '--status']).output
    assert re.search(rf'default +{name} 0001_initial +applied .* recorded by --baseline, by ', status), status


# --- with the service running --------------------------------------------------------------------


class Writers(LoadThreads):
    """8 clients inserting through the service, every answer's status kept."""

    threads = 8

    def __init__(self, service: Service) -> None:
        self.service = service
        self.statuses: list[int] = []

    def load(self, index: int) -> None:
        while self.running:
            try:
                status = self.service.post('/probe/write_note', {'note': f'w{index}'}, timeout=30).status_code
            except requests.RequestException:
                status = -1  # no answer at all
            self.statuses.append(status)


def test_an_index_built_concurrently_while_8_writers_insert_answers_them_all(log_dir: str, tmp_path: Path) -> None:
    with schema_database('dbapi_migrate_cic') as params, running_service(params, log_dir) as service:
        directory = write_files(
            tmp_path,
            {
                '0001_note_index.sql': '-- dbapi: no-transaction\n'
                'CREATE INDEX CONCURRENTLY IF NOT EXISTS probe_log_note ON probe_log (note);\n'
            },
        )
        with Writers(service) as writers:
            await_true(lambda: len(writers.statuses) >= 40, 'writes before the build')
            assert migrate(params, read_directory('cic', directory), say=lambda line: None)
            after = len(writers.statuses)
            await_true(lambda: len(writers.statuses) >= after + 40, 'writes after the build')
        assert set(writers.statuses) == {200}, sorted(set(writers.statuses))
        valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'probe_log_note'::regclass"
        assert one_of(params, valid) == [(True,)] and recorded(params, 'cic') == [(1, False)]


def ready_records(log_dir: str) -> list[dict[str, Any]]:
    return [r for r in read_lines(log_dir) if r.get('url.path') == '/health/ready']


def ready(service: Service) -> requests.Response:
    return requests.get(f'{service.url}/health/ready', timeout=10)


def test_readiness_is_503_naming_pending_migrations_then_200_after_migrate_without_a_restart(
    fresh: dict[str, Any], log_dir: str
) -> None:
    with running_service(fresh, log_dir) as service:
        answer = ready(service)
        assert answer.status_code == 503 and answer.headers['Retry-After'] == '1'
        assert answer.json() == {
            'status': 'unavailable',
            'databases': {'default': 'migrations pending'},
            'pending': {'default': [migration.label for migration in SERVED]},
        }
        await_true(lambda: ready_records(log_dir), 'the access record of the probe')
        record = ready_records(log_dir)[0]
        assert (record['http.response.status_code'], record['error.code']) == (503, 'migrations-pending')
        assert "database 'default': migrations pending: dbapi 0001_idempotency" in record['error.message']
        done = subprocess.run(
            [str(FLASK), '--app', 'app', 'migrate'],
            cwd=ROOT,
            env=service.env,
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        await_true(lambda: ready(service).status_code == 200, 'ready after migrate')
        assert ready(service).json() == {'status': 'ok', 'databases': {'default': 'ok'}}
        assert service.post('/probe/write_note', {'note': 'after migrate'}).status_code == 200


def test_migrate_on_start_applies_them_once_when_two_replicas_start_together(
    fresh: dict[str, Any], tmp_path: Path
) -> None:
    services = [
        Service(fresh, str(tmp_path / f'logs-{i}'), MIGRATE_ON_START='1', WEB_CONCURRENCY='1') for i in range(2)
    ]
    for service in services:
        Path(service.log_dir).mkdir()
    starts = [threading.Thread(target=service.start) for service in services]
    try:
        for start in starts:
            start.start()
        for start in starts:
            start.join(WAIT_SECONDS)
        assert [ready(service).status_code for service in services] == [200, 200]
    finally:
        for service in services:
            service.terminate()
    own = [(m.version, False) for m in own_migrations()]
    assert recorded(fresh, 'dbapi') == own and recorded(fresh, 'probe') == [(1, False)]
    lines = [r['message'] for s in services for r in read_lines(s.log_dir) if r['log.logger'] == 'dbapi.startup']
    assert sum(line.startswith('default: applied dbapi 0001_idempotency') for line in lines) == 1, lines
    assert sum(line.startswith('default: nothing to apply') for line in lines) == 1, lines


def test_a_failing_migration_stops_the_start_with_one_line(fresh: dict[str, Any], packages: Path) -> None:
    name = write_module(packages, {'0001_broken.sql': 'CREATE TABLE fine ();\nCREAT TABLE oops ();\n'})
    service = Service(
        fresh, str(packages), MIGRATE_ON_START='1', EXTRA_MODULES=name, PYTHONPATH=str(packages), WEB_CONCURRENCY='1'
    )
    with pytest.raises(RuntimeError, match='gunicorn exited at start'):
        service.start()
    assert service.process is not None and service.process.wait(WAIT_SECONDS) == 3
    broken = packages / name / 'migrations' / '0001_broken.sql'
    said = [line for line in service.stderr().splitlines() if line.startswith('dbapi:')]
    assert said == [
        f'dbapi: migration failed: {broken} line 2: syntax error at or near "CREAT"; nothing of it was applied'
    ]
    assert recorded(fresh, name) == [] and not relation(fresh, 'fine')
