"""Schema migrations: numbered SQL files, each applied once per database, in order, under a lock.

Files are `NNNN_description.sql` (four digits or more, then lowercase letters, digits and _):
dbapi's own in `lib/sql/`, a module's in `<its package>/migrations/`. dbapi's run first, then
each module's in MODULES order, each module's by number. docs/migrations.md is the user's guide.

A run (`migrate`) connects directly to PostgreSQL (never through a transaction pooler), takes a
session advisory lock by polling `pg_try_advisory_lock` (a session blocked inside
`pg_advisory_lock` holds a snapshot that `CREATE INDEX CONCURRENTLY` waits for), creates
`dbapi_migrations` if missing, refuses to start when an applied file was edited or a pending
one is numbered below an applied one, then applies each pending file: in one transaction with
its row in `dbapi_migrations` (so a file is applied and recorded, or neither), or, when its
first line is `-- dbapi: no-transaction`, statement by statement in autocommit, then checks
that no index is left invalid before recording it. The first failure stops the run.

Nothing here knows Flask: callers give connection parameters, module import names and a
function that prints a line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import import_module
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2.extensions import TRANSACTION_STATUS_INTRANS
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from lib.core.config import DEFAULT_DATABASE, Config, ConfigError

OWN_MODULE = 'dbapi'  # dbapi's own migrations, recorded under this module name
OWN_DIRECTORY = Path(__file__).resolve().parents[1] / 'sql'  # lib/sql: dbapi's own tables
MODULE_DIRECTORY = 'migrations'
OLD_SCHEMA_FILE = 'schema.sql'  # what modules had before migrations: refused, with the way out
FILE_NAME = re.compile(r'(?P<version>[0-9]{4,})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql')
MIGRATION_NAME = re.compile(r'[a-z0-9][a-z0-9_]*')
DIRECTIVE = '-- dbapi:'
NO_TRANSACTION = '-- dbapi: no-transaction'
# The advisory lock's two int4 keys: 'dbap', 'migr'. pg_locks shows them as classid, objid, objsubid 2.
LOCK_KEYS = {'space': 1684169072, 'key': 1835624306}
LOCK_POLL_SECONDS = 0.1
APPLICATION_NAME = 'dbapi:migrate'
CONNECT_TIMEOUT_SECONDS = 10
TABLE = 'dbapi_migrations'

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS dbapi_migrations (
    module     text        NOT NULL,  -- 'dbapi', or the module's name (the last part of its import name)
    version    integer     NOT NULL,  -- the file's number
    name       text        NOT NULL,  -- the file's name after the number, without .sql
    sha256     text        NOT NULL,  -- hex, of the file's text (line endings as \\n)
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration   interval    NOT NULL,  -- how long the file ran (zero for a baseline)
    applied_by text        NOT NULL,  -- role@host pid of the run
    baseline   boolean     NOT NULL DEFAULT false,  -- recorded by --baseline, not run
    PRIMARY KEY (module, version)
)
"""
SQL_TABLE_EXISTS = 'SELECT to_regclass(%(table)s) IS NOT NULL'
SQL_APPLIED = (
    'SELECT module, version, name, sha256, applied_at, duration, applied_by, baseline'
    ' FROM dbapi_migrations ORDER BY module, version'
)
SQL_RECORD = """
INSERT INTO dbapi_migrations (module, version, name, sha256, duration, applied_by, baseline)
VALUES (%(module)s, %(version)s, %(name)s, %(sha256)s, make_interval(secs => %(seconds)s), %(applied_by)s,
        %(baseline)s)
"""
# One query for readiness: the indexes (in `expected`) of the migrations not recorded.
SQL_PENDING = """
SELECT coalesce(array_agg(e.i ORDER BY e.i), '{}')
FROM unnest(%(modules)s::text[], %(versions)s::integer[]) WITH ORDINALITY AS e(module, version, i)
WHERE NOT EXISTS (SELECT 1 FROM dbapi_migrations a WHERE a.module = e.module AND a.version = e.version)
"""
SQL_TRY_LOCK = 'SELECT pg_try_advisory_lock(%(space)s, %(key)s), pg_backend_pid()'
SQL_LOCK_HOLDER = """
SELECT l.pid, a.application_name, host(a.client_addr), a.backend_start
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = %(space)s AND l.objid = %(key)s AND l.objsubid = 2 AND l.granted
"""
SQL_INVALID_INDEXES = """
SELECT i.indexrelid::regclass::text FROM pg_index i
WHERE NOT i.indisvalid ORDER BY 1
"""
# A statement that ends the transaction a file runs in (END is left to the check after the run:
# it also closes a BEGIN ATOMIC function body, which the splitter does not follow).
TRANSACTION_CONTROL = re.compile(
    r'(begin|start\s+transaction|commit|abort|rollback(?!\s+((work|transaction)\s+)?to\b)|prepare\s+transaction)\b',
    re.IGNORECASE,
)
DOLLAR_TAG = re.compile(r'\$([A-Za-z_][A-Za-z0-9_]*)?\$')
ACTIVE_SQL_TRANSACTION = '25001'  # "cannot run inside a transaction block"

Say = Callable[[str], None]


class MigrationError(Exception):
    """A migration cannot be found, planned or applied; the message is one line naming the file."""


def shown(path: Path) -> str:
    """The path as a person finds it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True, slots=True)
class Migration:
    module: str
    version: int
    name: str
    path: Path
    text: str  # line endings as \n
    sha256: str
    transactional: bool

    @property
    def key(self) -> tuple[str, int]:
        return (self.module, self.version)

    @property
    def label(self) -> str:
        return f'{self.module} {self.path.stem}'


@dataclass(frozen=True, slots=True)
class Applied:
    """A row of dbapi_migrations."""

    module: str
    version: int
    name: str
    sha256: str
    applied_at: datetime
    duration: timedelta
    applied_by: str
    baseline: bool

    @property
    def label(self) -> str:
        return f'{self.module} {self.version:04d}_{self.name}'


# --- files ---------------------------------------------------------------------------------


def read_migration(module: str, path: Path) -> Migration:
    match = FILE_NAME.fullmatch(path.name)
    if match is None:
        raise MigrationError(
            f'{shown(path)}: not a migration file name: use NNNN_description.sql'
            ' (four digits or more, then lowercase letters, digits and _)'
        )
    try:
        text = path.read_bytes().decode('utf-8').replace('\r\n', '\n')
    except UnicodeDecodeError as error:
        raise MigrationError(f'{shown(path)}: not UTF-8 ({error.reason} at byte {error.start})') from None
    lines = text.split('\n')
    for number, line in enumerate(lines, start=1):
        directive = line.strip()
        if directive.startswith(DIRECTIVE) and (number != 1 or directive != NO_TRANSACTION):
            raise MigrationError(
                f'{shown(path)} line {number}: {directive!r}: the one directive is {NO_TRANSACTION!r},'
                ' as the first line'
            )
    version = int(match['version'])
    if version < 1:
        raise MigrationError(f'{shown(path)}: numbers start at 0001')
    return Migration(
        module=module,
        version=version,
        name=match['name'],
        path=path,
        text=text,
        sha256=hashlib.sha256(text.encode('utf-8')).hexdigest(),
        transactional=lines[0].strip() != NO_TRANSACTION,
    )


def read_directory(module: str, directory: Path) -> list[Migration]:
    """The `.sql` files of `directory` in number order; none when it does not exist."""
    if not directory.is_dir():
        return []
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != '.sql' or not path.is_file():
            continue
        migration = read_migration(module, path)
        other = found.get(migration.version)
        if other is not None:
            raise MigrationError(
                f'{shown(other.path)} and {path.name} have the same number {migration.version:04d}: renumber one'
            )
        found[migration.version] = migration
    return [found[version] for version in sorted(found)]


def module_name(import_name: str) -> str:
    """The name a module's migrations are recorded under: its URL name (`modules.example` → example)."""
    return import_name.rpartition('.')[2]


def package_directory(import_name: str) -> Path:
    package = import_module(import_name)
    if package.__file__ is None:
        raise MigrationError(f'module {import_name!r} is a namespace package: a module has an __init__.py')
    return Path(package.__file__).resolve().parent


def migrations_directory(import_name: str) -> Path:
    """Where a registered module's migrations are; refuses a module that still has a schema.sql."""
    if module_name(import_name) == OWN_MODULE:
        raise MigrationError(f"module {import_name!r}: the name {OWN_MODULE!r} is dbapi's own: rename the module")
    root = package_directory(import_name)
    if (root / OLD_SCHEMA_FILE).exists():
        directory = shown(root / MODULE_DIRECTORY)
        raise MigrationError(
            f'{shown(root / OLD_SCHEMA_FILE)} is not applied any more: move it to {directory}/0001_initial.sql'
            ' (a database it already built adopts it with `flask --app app migrate --baseline`; docs/migrations.md)'
        )
    return root / MODULE_DIRECTORY


def own_migrations() -> list[Migration]:
    return read_directory(OWN_MODULE, OWN_DIRECTORY)


def module_migrations(import_name: str) -> list[Migration]:
    return read_directory(module_name(import_name), migrations_directory(import_name))


def discover(modules: Iterable[str]) -> list[Migration]:
    """dbapi's own migrations, then each module's, in order: everything for one database."""
    found = own_migrations()
    for import_name in modules:
        found += module_migrations(import_name)
    return found


def injected_databases(import_name: str) -> set[str]:
    """The databases a module's actions inject (`inject_conn(database=...)`), from its blueprint's table."""
    blueprint = getattr(import_module(import_name), 'blueprint', None)
    actions: Mapping[str, Any] = getattr(blueprint, 'actions', None) or {}
    return {action.conn.database for action in actions.values() if getattr(action, 'conn', None) is not None}


def by_database(modules: Sequence[str], databases: Iterable[str], default: str) -> dict[str, list[Migration]]:
    """What each database gets, in `databases` order: a module's migrations go to each configured
    database its actions inject (`default` when none does); dbapi's own to every database that
    any of them go to or any action injects. A database in none of these gets nothing (an action
    injecting one that is not configured fails when called, as before)."""
    configured = list(databases)
    targets: list[tuple[list[Migration], set[str]]] = []
    used = {default}
    for import_name in modules:
        injected = injected_databases(import_name) & set(configured)
        used |= injected
        targets.append((module_migrations(import_name), injected or {default}))
    own = own_migrations()
    planned = {name: list(own) for name in configured if name in used}
    for migrations, names in targets:
        for name in names:
            planned[name] += migrations
    return planned


def new_migration(directory: Path, module: str, name: str) -> Path:
    """Write the next numbered file of `directory` for migration `name`, and return its path."""
    if not MIGRATION_NAME.fullmatch(name):
        raise MigrationError(f'migration name {name!r} is invalid: use lowercase letters, digits and _')
    existing = read_directory(module, directory)
    version = existing[-1].version + 1 if existing else 1
    path = directory / f'{version:04d}_{name}.sql'
    directory.mkdir(exist_ok=True)
    header = (
        f'-- {module} {path.stem}: what this changes, and why.\n'
        '-- Runs once per database, in one transaction, after every earlier file (`flask --app app migrate`;\n'
        '-- docs/migrations.md). Never edit it once applied anywhere: write the next file instead.\n'
    )
    with path.open('x', encoding='utf-8') as file:
        file.write(header)
    return path


# --- SQL text --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    offset: int  # where the statement's text starts in the file
    code: int  # where its first character outside comments and whitespace is
    text: str


def quoted_end(text: str, start: int, quote: str, backslashes: bool) -> int:
    """The index after the string or identifier opened by `text[start]`."""
    index, end = start + 1, len(text)
    while index < end:
        char = text[index]
        if backslashes and char == '\\':
            index += 2
        elif char == quote:
            if text.startswith(quote, index + 1):
                index += 2
            else:
                return index + 1
        else:
            index += 1
    return end


def comment_end(text: str, start: int) -> int:
    """The index after the comment that starts at `start` (`--` to the line's end, `/* */` nested)."""
    if text.startswith('--', start):
        newline = text.find('\n', start)
        return len(text) if newline < 0 else newline + 1
    depth, index = 1, start + 2
    while index < len(text) and depth:
        if text.startswith('/*', index):
            depth, index = depth + 1, index + 2
        elif text.startswith('*/', index):
            depth, index = depth - 1, index + 2
        else:
            index += 1
    return index


def word_character(char: str) -> bool:
    return char.isalnum() or char in '_$'


def split_statements(text: str) -> list[Statement]:
    """The statements of `text`, split at `;` outside strings, quoted identifiers, dollar quotes
    and comments; pieces holding only comments are left out."""
    statements: list[Statement] = []
    start, code, index, end = 0, -1, 0, len(text)
    while index < end:
        char = text[index]
        if text.startswith(('--', '/*'), index):
            index = comment_end(text, index)
            continue
        if char == ';':
            if code >= 0:
                statements.append(Statement(start, code, text[start:index]))
            start, code, index = index + 1, -1, index + 1
            continue
        if code < 0 and not char.isspace():
            code = index
        previous = text[index - 1] if index else ' '
        if char == "'":
            escapes = previous in 'eE' and (index < 2 or not word_character(text[index - 2]))
            index = quoted_end(text, index, "'", escapes)
        elif char == '"':
            index = quoted_end(text, index, '"', False)
        elif char == '$' and not word_character(previous) and (tag := DOLLAR_TAG.match(text, index)):
            closing = text.find(tag.group(0), tag.end())
            index = end if closing < 0 else closing + len(tag.group(0))
        else:
            index += 1
    if code >= 0:
        statements.append(Statement(start, code, text[start:]))
    return statements


def line_of(text: str, offset: int) -> int:
    return text.count('\n', 0, offset) + 1


def transaction_control(migration: Migration) -> Statement | None:
    """The first statement of a transactional file that would end the transaction it runs in."""
    for statement in split_statements(migration.text):
        if TRANSACTION_CONTROL.match(migration.text, statement.code):
            return statement
    return None


# --- the database's record -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """The files of this release against what a database has recorded."""

    migrations: list[Migration]
    applied: dict[tuple[str, int], Applied]

    @property
    def pending(self) -> list[Migration]:
        return [m for m in self.migrations if m.key not in self.applied]

    @property
    def changed(self) -> list[tuple[Migration, Applied]]:
        pairs = [(m, self.applied.get(m.key)) for m in self.migrations]
        return [(m, row) for m, row in pairs if row is not None and row.sha256 != m.sha256]

    @property
    def unknown(self) -> list[Applied]:
        """Applied, with no file here: a newer release's, or a file since removed."""
        known = {m.key for m in self.migrations}
        return [row for key, row in self.applied.items() if key not in known]

    def refusal(self, baseline: bool = False) -> str | None:
        """Why nothing may be applied (or, `baseline`, recorded), or None."""
        for migration, row in self.changed:
            when = row.applied_at.astimezone(UTC)
            return (
                f'{shown(migration.path)} was changed after it was applied ({when:%Y-%m-%d %H:%M} UTC):'
                f' sha256 {row.sha256} applied, {migration.sha256} now; restore it and put the change'
                ' in a new file. Nothing was applied'
            )
        if baseline:
            return None  # it records first files only, of modules with nothing applied: nothing runs
        latest: dict[str, Applied] = {}
        for row in self.applied.values():
            if row.module not in latest or row.version > latest[row.module].version:
                latest[row.module] = row
        for migration in self.pending:
            last = latest.get(migration.module)
            if last is not None and last.version > migration.version:
                return (
                    f'{shown(migration.path)} is pending but {last.label} is already applied:'
                    f' number it after {last.version:04d}. Nothing was applied'
                )
            if not split_statements(migration.text):
                return f'{shown(migration.path)} holds no SQL statement: write the change first. Nothing was applied'
            control = transaction_control(migration) if migration.transactional else None
            if control is not None:
                return (
                    f'{shown(migration.path)} line {line_of(migration.text, control.code)}: a file runs in one'
                    ' transaction that dbapi commits: remove its BEGIN/COMMIT/ROLLBACK, or make'
                    f' {NO_TRANSACTION!r} its first line. Nothing was applied'
                )
        return None

    def baseline(self) -> list[Migration]:
        """What --baseline records: the first file of each module that has none applied."""
        started = {row.module for row in self.applied.values()}
        firsts: dict[str, Migration] = {}
        for migration in self.migrations:
            if migration.module not in started and migration.module not in firsts:
                firsts[migration.module] = migration
        return list(firsts.values())


def table_exists(cursor: Cursor) -> bool:
    cursor.execute(SQL_TABLE_EXISTS, {'table': TABLE})
    row = cursor.fetchone()
    return bool(row and row[0])


def read_plan(conn: Connection, migrations: Sequence[Migration]) -> Plan:
    with conn.cursor() as cursor:
        if not table_exists(cursor):
            return Plan(list(migrations), {})
        cursor.execute(SQL_APPLIED)
        rows = [Applied(*row) for row in cursor.fetchall()]
    return Plan(list(migrations), {(row.module, row.version): row for row in rows})


def pending_on(conn: Connection, expected: Sequence[Migration]) -> list[Migration]:
    """The migrations of `expected` that the database has not recorded: one query (readiness).
    psycopg2 errors other than a missing table are the caller's."""
    if not expected:
        return []
    params = {'modules': [m.module for m in expected], 'versions': [m.version for m in expected]}
    with conn.cursor() as cursor:
        try:
            cursor.execute(SQL_PENDING, params)
        except psycopg2.errors.UndefinedTable:
            return list(expected)
        row = cursor.fetchone()
    value = next(iter(row.values())) if isinstance(row, Mapping) else row[0] if row else []
    return [expected[i - 1] for i in value]


# --- a run -----------------------------------------------------------------------------------


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def where(params: Mapping[str, Any]) -> str:
    return f'{params.get("host") or "local socket"}:{params.get("port") or 5432}/{params.get("dbname")}'


def connect(params: Mapping[str, Any], database: str) -> Connection:
    try:
        conn: Connection = psycopg2.connect(
            **{'connect_timeout': CONNECT_TIMEOUT_SECONDS, **params, 'application_name': APPLICATION_NAME}
        )
    except psycopg2.Error as error:
        raise MigrationError(f'database {database!r} at {where(params)}: cannot connect: {first_line(error)}') from None
    conn.autocommit = True  # each file's transaction is sent as BEGIN ... COMMIT
    return conn


def behind_pooler(database: str, params: Mapping[str, Any]) -> MigrationError:
    prefix = database.upper()
    return MigrationError(
        f'database {database!r}: migrate reached {where(params)} through a transaction pooler (pgbouncer?):'
        ' its session changed between statements, so a session advisory lock would not hold.'
        f' Set {prefix}_DB_MIGRATE_HOST and {prefix}_DB_MIGRATE_PORT to PostgreSQL itself'
    )


def holder_text(cursor: Cursor) -> str:
    cursor.execute(SQL_LOCK_HOLDER, LOCK_KEYS)
    row = cursor.fetchone()
    if row is None:
        return 'by a session that just let it go'
    pid, application, address, since = row
    started = f', connected {since:%H:%M:%S}' if since else ''
    return f'by pid {pid} ({application or "no application_name"} from {address or "a local socket"}{started})'


def acquire_lock(conn: Connection, database: str, say: Say) -> int:
    """Take the migration lock, polling: no snapshot is held while waiting. The holder's pid."""
    waited = False
    with conn.cursor() as cursor:
        while True:
            cursor.execute(SQL_TRY_LOCK, LOCK_KEYS)
            taken, pid = cursor.fetchone() or (False, 0)
            if taken:
                return int(pid)
            if not waited:
                say(f'{database}: waiting for the migration lock, held {holder_text(cursor)}')
                waited = True
            time.sleep(LOCK_POLL_SECONDS)


def backend_pid(conn: Connection, sql: str = 'SELECT pg_backend_pid()') -> int | None:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return int(row[0]) if row else None


def check_session(conn: Connection, params: Mapping[str, Any], database: str) -> None:
    """Refuse a transaction pooler, before taking the lock (a pooler would keep a lock taken
    through it on a server session after we leave). A second client pins a server session in a
    transaction: directly, it is another backend and ours stays the same; through a pooler it is
    given ours when that is idle (pgbouncer reuses the last one released), or ours moves."""
    before = backend_pid(conn)
    probe = connect(params, database)
    try:
        probed = backend_pid(probe, 'BEGIN; SELECT pg_backend_pid()')
        after = backend_pid(conn)
    finally:
        probe.close()
    if probed == before or after != before:
        raise behind_pooler(database, params)


def applied_by(conn: Connection) -> str:
    return f'{conn.info.user}@{socket.gethostname()} pid {os.getpid()}'


def record(cursor: Cursor, migration: Migration, seconds: float, by: str, baseline: bool = False) -> None:
    cursor.execute(
        SQL_RECORD,
        {
            'module': migration.module,
            'version': migration.version,
            'name': migration.name,
            'sha256': migration.sha256,
            'seconds': seconds,
            'applied_by': by,
            'baseline': baseline,
        },
    )


def failure(migration: Migration, error: psycopg2.Error, statement: Statement | None = None) -> str:
    """One line: the file, the line PostgreSQL points at (else the failing statement's, when
    known), its message."""
    diag = error.diag
    message = diag.message_primary or first_line(error)
    position = diag.statement_position
    offset = statement.offset if statement else 0
    if position:
        line = f' line {line_of(migration.text, offset + int(position) - 1)}'
    else:
        line = f' line {line_of(migration.text, statement.code)}' if statement else ''
    text = f'{shown(migration.path)}{line}: {message}'
    if diag.sqlstate == ACTIVE_SQL_TRANSACTION:
        text += f' (make {NO_TRANSACTION!r} the first line of the file)'
    return text


def rollback(conn: Connection) -> None:
    """End the file's transaction; a connection already lost has ended it."""
    if conn.closed:
        return
    with contextlib.suppress(psycopg2.Error), conn.cursor() as cursor:
        cursor.execute('ROLLBACK')


def apply_in_transaction(conn: Connection, migration: Migration, holder: int, by: str) -> float:
    """The file and its record in one transaction; the seconds it ran."""
    with conn.cursor() as cursor:
        try:
            cursor.execute('BEGIN; SELECT pg_backend_pid()')
            row = cursor.fetchone()
            if not row or row[0] != holder:
                rollback(conn)
                raise MigrationError(
                    f'{shown(migration.path)}: not run: its transaction is not on the session that holds the'
                    ' migration lock (a transaction pooler between migrate and PostgreSQL?)'
                )
            started = time.monotonic()
            cursor.execute(migration.text)
            seconds = time.monotonic() - started
            if conn.info.transaction_status != TRANSACTION_STATUS_INTRANS:
                rollback(conn)
                raise MigrationError(
                    f'{shown(migration.path)} ended the transaction it runs in (COMMIT, END or ROLLBACK):'
                    ' what ran before that is committed but not recorded; remove it, then check the database'
                )
            record(cursor, migration, seconds, by)
            cursor.execute('COMMIT')
        except psycopg2.Error as error:
            rollback(conn)
            raise MigrationError(f'{failure(migration, error)}; nothing of it was applied') from None
    return seconds


def invalid_indexes(cursor: Cursor) -> list[str]:
    cursor.execute(SQL_INVALID_INDEXES)
    return [row[0] for row in cursor.fetchall()]


def apply_outside_transaction(conn: Connection, migration: Migration, by: str) -> float:
    """Each statement in autocommit, then no index may be invalid, then the record."""
    started = time.monotonic()
    with conn.cursor() as cursor:
        for statement in split_statements(migration.text):
            try:
                cursor.execute(statement.text)
            except psycopg2.Error as error:
                raise MigrationError(
                    f'{failure(migration, error, statement)}; not recorded, and the statements before'
                    ' it stay applied (a no-transaction file must be safe to run again)'
                ) from None
        seconds = time.monotonic() - started
        invalid = invalid_indexes(cursor)
        if invalid:
            names = ', '.join(invalid)
            raise MigrationError(
                f'{shown(migration.path)}: index {names} is invalid (a concurrent build that failed, which'
                f' IF NOT EXISTS then skips): DROP INDEX CONCURRENTLY {invalid[0]}, then migrate again; not recorded'
            )
        record(cursor, migration, seconds, by)
    return seconds


def migrate(
    params: Mapping[str, Any],
    migrations: Sequence[Migration],
    *,
    database: str = 'default',
    baseline: bool = False,
    dry_run: bool = False,
    say: Say = print,
) -> list[Migration]:
    """Apply the pending files to one database (or, `baseline`, record each module's first file
    without running it; `dry_run`: only say what would be done). What was (or would be) done."""
    conn = connect(params, database)
    try:
        return run(conn, params, migrations, database, baseline, dry_run, say)
    except psycopg2.Error as error:  # reading the record, the lock, creating the table: not a file's
        raise MigrationError(f'database {database!r} at {where(params)}: {first_line(error)}') from None
    finally:
        conn.close()  # the session's end releases the lock, whatever happened


def run(
    conn: Connection,
    params: Mapping[str, Any],
    migrations: Sequence[Migration],
    database: str,
    baseline: bool,
    dry_run: bool,
    say: Say,
) -> list[Migration]:
    """`migrate` on an open connection (see there)."""
    if dry_run:
        plan = read_plan(conn, migrations)
        return chosen(plan, baseline, database, say, 'would record' if baseline else 'would apply')
    check_session(conn, params, database)
    holder = acquire_lock(conn, database, say)
    with conn.cursor() as cursor:
        cursor.execute(CREATE_TABLE)
    plan = read_plan(conn, migrations)
    todo = chosen(plan, baseline, database, None, '')
    by = applied_by(conn)
    for migration in todo:
        if baseline:
            with conn.cursor() as cursor:
                record(cursor, migration, 0.0, by, baseline=True)
            say(f'{database}: recorded {migration.label} as applied without running it (baseline)')
            continue
        if migration.transactional:
            seconds = apply_in_transaction(conn, migration, holder, by)
        else:
            seconds = apply_outside_transaction(conn, migration, by)
        say(f'{database}: applied {migration.label} in {seconds * 1000:.0f} ms')
    if not todo:
        say(f'{database}: nothing to {"record" if baseline else "apply"}; {len(plan.applied)} applied')
    return todo


def chosen(plan: Plan, baseline: bool, database: str, say: Say | None, verb: str) -> list[Migration]:
    """The files to run (or record), once nothing refuses; `say` tells each with `verb`."""
    refusal = plan.refusal(baseline)
    if refusal is not None:
        raise MigrationError(refusal)
    todo = plan.baseline() if baseline else plan.pending
    if say is not None:
        for migration in todo:
            mode = '' if migration.transactional else ', outside a transaction'
            say(f'{database}: {verb} {migration.label} ({shown(migration.path)}{mode})')
        if not todo:
            say(f'{database}: nothing to {"record" if baseline else "apply"}')
    return todo


def status(params: Mapping[str, Any], migrations: Sequence[Migration], database: str = 'default') -> Plan:
    """What one database has recorded, against `migrations`; changes nothing."""
    conn = connect(params, database)
    try:
        return read_plan(conn, migrations)
    except psycopg2.Error as error:
        raise MigrationError(f'database {database!r} at {where(params)}: {first_line(error)}') from None
    finally:
        conn.close()


def expected_migrations(config: Config) -> dict[str, list[Migration]]:
    """Each configured database's migrations for `config`'s modules; a misnamed file or a
    module's leftover schema.sql is a ConfigError (one line at start, not a traceback)."""
    try:
        return by_database(config.modules, config.databases, DEFAULT_DATABASE)
    except MigrationError as error:
        raise ConfigError(str(error)) from None
