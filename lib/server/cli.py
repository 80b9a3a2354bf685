"""Flask CLI commands for module authors, registered on the app by `init_app`:

    flask --app app actions [--json]          every action: its fields, database and autocommit
    flask --app app new-module NAME [--root]  scaffold modules/NAME/ with one action and its test
    flask --app app migrate [--status | --dry-run | --baseline] [--database NAME]
                                              apply the pending migrations (docs/migrations.md)
    flask --app app new-migration MODULE NAME the next numbered migration file of MODULE (or dbapi)
    flask --app app openapi                   the OpenAPI document, as GET /openapi.json serves it
    flask --app app new-token NAME            a new token for caller NAME, and its line for CALLERS_FILE
    flask --app app events [--json]           every declared event: its type, module and data's fields
    flask --app app relay [--database]        deliver the outbox's committed events to RabbitMQ (lib/events)

Everything `actions` shows is read from the app's action registry (lib.contract.registry), the
same records that serve requests, so the listing cannot drift from what is served.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import secrets
from collections.abc import Mapping
from datetime import UTC
from pathlib import Path
from string import Template
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from marshmallow import Schema, fields

from lib.auth.callers import CallersError, check_caller_name, token_digest
from lib.contract.openapi import document
from lib.contract.registry import RESERVED_MODULES, Action, Registry
from lib.core.config import APP_ID, BASE_DIR, DEFAULT_DATABASE, Config, ConfigError
from lib.db.migrations import (
    OWN_DIRECTORY,
    OWN_MODULE,
    Applied,
    Migration,
    MigrationError,
    Plan,
    expected_migrations,
    migrate,
    migrations_directory,
    module_name,
    new_migration,
    shown,
    status,
)
from lib.web.flask_app import CONFIG_KEY, REGISTRY_KEY
from lib.web.infrastructure import health_operations

TEMPLATES = Path(__file__).resolve().parents[1] / 'templates' / 'module'
MODULE_FILES = ('__init__.py', 'routes.py', 'actions.py', 'schemas.py', 'sql.py', 'migrations/0001_initial.sql')
TEST_TEMPLATE = 'test_module.py'
# Paths that are (or are planned as) the service's own, never a module's.
RESERVED_NAMES = RESERVED_MODULES | {'actions'}
# A URL segment and a table prefix (`<name>_items` stays within PostgreSQL's 63 bytes).
MODULE_NAME = re.compile(r'[a-z][a-z0-9_]{0,39}')
NO_VALUE = '-'


def config() -> Config:
    """The current app's configuration."""
    found: Config = current_app.extensions[CONFIG_KEY]
    return found


def registry() -> Registry:
    """The current app's actions."""
    found: Registry = current_app.extensions[REGISTRY_KEY]
    return found


# --- actions -------------------------------------------------------------------------------


def field_type(field: fields.Field[Any]) -> str:
    """The field's class name; a list shows its item type, a nested field its schema."""
    name = type(field).__name__
    if isinstance(field, fields.List):
        return f'{name}[{field_type(field.inner)}]'
    if isinstance(field, fields.Nested):
        nested = field.nested
        label = nested if isinstance(nested, str) else getattr(nested, '__name__', type(nested).__name__)
        return f'{name}[{label}]'
    return name


def schema_fields(schema: Schema | None) -> list[dict[str, Any]]:
    """The fields a body may carry, by their JSON key (dump-only fields are refused on load)."""
    if schema is None:
        return []
    return [
        {'name': field.data_key or name, 'type': field_type(field), 'required': field.required}
        for name, field in schema.fields.items()
        if not field.dump_only
    ]


def describe(action: Action) -> dict[str, Any]:
    """One action as plain data; `database`, `autocommit` and `named` are None without `inject_conn`."""
    spec = action.conn
    return {
        'action': action.name,
        'module': action.module,
        'route': action.route,
        'fields': schema_fields(action.schema),
        'database': spec.database if spec else None,
        'autocommit': spec.autocommit if spec else None,
        'named': spec.named if spec else None,
    }


def fields_text(described: list[dict[str, Any]]) -> str:
    parts = [f'{f["name"]} ({f["type"]}{", required" if f["required"] else ""})' for f in described]
    return ', '.join(parts) or NO_VALUE


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns: ACTION, DATABASE, AUTOCOMMIT, FIELDS (the last one unpadded)."""
    lines = [('ACTION', 'DATABASE', 'AUTOCOMMIT', 'FIELDS')]
    for row in rows:
        autocommit = NO_VALUE if row['autocommit'] is None else ('yes' if row['autocommit'] else 'no')
        lines.append((row['action'], row['database'] or NO_VALUE, autocommit, fields_text(row['fields'])))
    widths = [max(len(line[column]) for line in lines) for column in range(3)]
    return '\n'.join(
        '  '.join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[3]]).rstrip()
        for line in lines
    )


@click.command('actions')
@click.option('--json', 'as_json', is_flag=True, help='Print a JSON list instead of a table.')
@with_appcontext
def actions_command(as_json: bool) -> None:
    """List every action with its fields and database.

    One line per `module/action`: the database its connection comes from and whether it runs
    in autocommit (`-` without `inject_conn`), then the fields its schema loads.
    """
    rows = [describe(action) for action in registry()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(table(rows))
    else:
        click.echo('no actions: MODULES registers no module')


# --- events --------------------------------------------------------------------------------


@click.command('events')
@click.option('--json', 'as_json', is_flag=True, help='Print a JSON list instead of a table.')
@with_appcontext
def events_command(as_json: bool) -> None:
    """List every event the modules declare: its type, module and data's fields.

    What `emit` accepts and the relay publishes to the exchange dbapi.events (routing key = the
    type); GET /asyncapi.json is the same list as an AsyncAPI document.
    """
    rows: list[dict[str, Any]] = [
        {'type': event.type, 'module': event.module, 'fields': schema_fields(event.schema)}
        for event in registry().events
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo('no events: no module declares any (module_blueprint(..., events=[...]))')
        return
    lines: list[tuple[str, str, str]] = [('TYPE', 'MODULE', 'FIELDS')]
    lines += [(row['type'], row['module'], fields_text(row['fields'])) for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(2)]
    for line in lines:
        click.echo(f'{line[0].ljust(widths[0])}  {line[1].ljust(widths[1])}  {line[2]}'.rstrip())


@click.command('relay')
@click.option('--database', default=DEFAULT_DATABASE, show_default=True, help='The database whose outbox to relay.')
@click.option('--exchange', default='dbapi.events', show_default=True, help='The topic exchange to publish to.')
@with_appcontext
def relay_command(database: str, exchange: str) -> None:
    """Deliver the committed events of the outbox to RabbitMQ, until SIGTERM.

    Publishes each event to the durable topic exchange (routing key = its type) with publisher
    confirms, as a CloudEvents JSON document; one or more relays may run (docs/events.md). The
    broker is EVENTS_AMQP_URL; its counters are on EVENTS_METRICS_PORT (0: off).
    """
    from prometheus_client import start_http_server

    from lib.events.metrics import RELAY_REGISTRY
    from lib.events.relay import Relay

    settings = config()
    if not settings.events_amqp_url:
        raise click.ClickException('EVENTS_AMQP_URL is not set: the relay needs the broker to publish to')
    if database not in settings.databases:
        raise click.ClickException(f'no database named {database!r} (known: {", ".join(settings.databases)})')
    if database in settings.pgbouncer:
        raise click.ClickException(
            f'database {database!r} is reached through pgbouncer in transaction mode, where LISTEN cannot work:'
            f' give the relay a direct connection ({database.upper()}_DB_HOST/_PORT of PostgreSQL itself)'
        )
    if settings.events_metrics_port:
        start_http_server(settings.events_metrics_port, registry=RELAY_REGISTRY)
    url, retention = settings.events_amqp_url, settings.events_retention
    relay = Relay(dict(settings.databases[database].params), url, APP_ID, retention, exchange)
    relay.install_signals()
    relay.run()


# --- new-module ----------------------------------------------------------------------------


def check_name(name: str) -> None:
    """Refuse a name that cannot be a module: the error names the value and the rule."""
    if not MODULE_NAME.fullmatch(name):
        raise click.ClickException(
            f'module name {name!r} is invalid: use at most 40 lowercase letters, digits and _, starting with a letter'
        )
    if keyword.iskeyword(name):
        raise click.ClickException(f'module name {name!r} is a Python keyword')
    if name in RESERVED_NAMES:
        raise click.ClickException(f'module name {name!r} is reserved (reserved: {", ".join(sorted(RESERVED_NAMES))})')


def targets(root: Path, name: str) -> dict[Path, str]:
    """Where each template goes under `root`; refuses a name whose files exist already."""
    for folder in ('modules', 'tests'):
        if not (root / folder).is_dir():
            raise click.ClickException(f'{root} has no {folder}/ directory: --root must be the project root')
    package = root / 'modules' / name
    test = root / 'tests' / f'test_module_{name}.py'
    for path in (package, test):
        if path.exists():
            raise click.ClickException(f'{path.relative_to(root)} already exists: choose another module name')
    paths = {package / file: Path(file).name for file in MODULE_FILES}
    paths[test] = TEST_TEMPLATE
    return paths


def render(template: str, name: str) -> str:
    return Template((TEMPLATES / f'{template}.tmpl').read_text(encoding='utf-8')).substitute(module=name)


def modules_list(tree: ast.Module) -> ast.List | None:
    """The one top-level `MODULES = [...]` of string literals, or None when there is no such list."""
    found = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id == 'MODULES'
    ]
    if len(found) != 1 or not isinstance(found[0].value, ast.List):
        return None
    listed = found[0].value
    if not all(isinstance(item, ast.Constant) and isinstance(item.value, str) for item in listed.elts):
        return None
    return listed


def listed_names(listed: ast.List) -> list[str]:
    return [item.value for item in listed.elts if isinstance(item, ast.Constant) and isinstance(item.value, str)]


def register(settings_file: Path, entry: str) -> str | None:
    """Add `entry` to the `MODULES = [` list of `settings_file`, just before its closing `]`.

    Returns what was done, or None when the file has not the expected shape (no such file, no
    single literal list, `]` not on a line of its own) or the edit would not parse back to the
    same list plus `entry`: then the file is left as it was.
    """
    if not settings_file.is_file():
        return None
    text = settings_file.read_text(encoding='utf-8')
    listed = modules_list(ast.parse(text))
    if listed is None or listed.end_lineno is None:
        return None
    before = listed_names(listed)
    if entry in before:
        return f'{entry!r} is already in MODULES'
    lines = text.splitlines(keepends=True)
    closing = listed.end_lineno - 1
    if lines[closing].strip() != ']' or listed.lineno == listed.end_lineno:
        return None
    indent = ' ' * (listed.elts[-1].col_offset if listed.elts else 4)
    lines.insert(closing, f"{indent}'{entry}',\n")
    edited = ''.join(lines)
    after = modules_list(ast.parse(edited))
    if after is None or listed_names(after) != [*before, entry]:
        return None
    settings_file.write_text(edited, encoding='utf-8')
    return f'added {entry!r} to MODULES in {settings_file.name}'


@click.command('new-module')
@click.argument('name')
@click.option(
    '--root',
    type=click.Path(file_okay=False, path_type=Path),
    default=BASE_DIR,
    show_default=True,
    help='The project root holding modules/, tests/ and settings.py.',
)
def new_module_command(name: str, root: Path) -> None:
    """Scaffold modules/NAME/ with an action and a test.

    Writes the module (one insert-or-select action over a table of its own), its test as
    tests/test_module_NAME.py, and adds it to MODULES in settings.py.
    """
    check_name(name)
    root = root.resolve()
    paths = targets(root, name)
    (root / 'modules' / name).mkdir()
    for path, template in paths.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(render(template, name), encoding='utf-8')
        click.echo(f'created {path.relative_to(root)}')
    entry = f'modules.{name}'
    done = register(root / 'settings.py', entry)
    if done is None:
        click.echo(f'settings.py: MODULES is not the expected list; add this line to it:\n    {entry!r},', err=True)
    else:
        click.echo(done)
    # The commands as typed at the project root; a running scripts/serve.sh serves the module within seconds.
    click.echo('next: scripts/flask --app app migrate   (scripts/serve.sh does it for you while it runs)')
    click.echo(f'      scripts/test.sh tests/test_module_{name}.py')
    click.echo(f'      POST /{name}/add_item is the action')


# --- migrate -------------------------------------------------------------------------------


def planned() -> dict[str, list[Migration]]:
    """Each database's migrations for the app's modules (docs/migrations.md, "Which database")."""
    try:
        return expected_migrations(config())
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def applied_text(row: Applied) -> str:
    how = 'recorded by --baseline' if row.baseline else f'in {row.duration.total_seconds() * 1000:.0f} ms'
    return f'applied {row.applied_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC {how}, by {row.applied_by}'


def status_rows(database: str, plan: Plan) -> list[tuple[str, str, str]]:
    """One row per migration, applied or pending, then those applied with no file here."""
    rows = []
    changed = {migration.key for migration, _ in plan.changed}
    for migration in plan.migrations:
        row = plan.applied.get(migration.key)
        if row is None:
            state = 'pending' + ('' if migration.transactional else ' (no-transaction)')
        else:
            state = applied_text(row)
            if migration.key in changed:
                state += f'; CHANGED since: sha256 {row.sha256} applied, {migration.sha256} now'
        rows.append((database, migration.label, state))
    for row in plan.unknown:
        rows.append((database, row.label, f"{applied_text(row)}; no file here (a newer release's?)"))
    return rows


def status_table(rows: list[tuple[str, str, str]]) -> str:
    lines = [('DATABASE', 'MIGRATION', 'STATE'), *rows]
    widths = [max(len(line[column]) for line in lines) for column in range(2)]
    return '\n'.join(f'{line[0].ljust(widths[0])}  {line[1].ljust(widths[1])}  {line[2]}' for line in lines)


def reading_params(name: str) -> Mapping[str, Any]:
    """Where --status and --dry-run read: migrate's address, else (a pooler, no lock needed) the service's."""
    database = config().databases[name]
    try:
        return database.migrate_params()
    except ConfigError:
        return database.params


@click.command('migrate')
@click.option('--status', 'show_status', is_flag=True, help='List applied and pending migrations; change nothing.')
@click.option('--dry-run', is_flag=True, help='Say what would run; change nothing.')
@click.option('--baseline', is_flag=True, help="Record each module's first migration as applied without running it.")
@click.option('--database', default=None, help='One database of DATABASES (default: each that gets migrations).')
@with_appcontext
def migrate_command(show_status: bool, dry_run: bool, baseline: bool, database: str | None) -> None:
    """Apply the pending migrations: dbapi's own, then each module's, in order.

    Each file runs once per database, in one transaction (or outside one when its first line is
    `-- dbapi: no-transaction`), under a lock that makes concurrent runs wait; the first
    failure stops the run. --baseline adopts a database built by the old schema.sql files.
    """
    if show_status and (dry_run or baseline):
        raise click.ClickException('--status lists only: it takes neither --dry-run nor --baseline')
    databases = config().databases
    targets = planned()
    if database is not None:
        if database not in databases:
            raise click.ClickException(f'no database named {database!r} (known: {", ".join(databases)})')
        if database not in targets:
            raise click.ClickException(f"no module's actions use database {database!r}: it gets no migrations")
        targets = {database: targets[database]}
    rows: list[tuple[str, str, str]] = []
    try:
        for name, migrations in targets.items():
            params = reading_params(name) if show_status or dry_run else databases[name].migrate_params()
            if show_status:
                rows += status_rows(name, status(params, migrations, name))
            else:
                migrate(params, migrations, database=name, baseline=baseline, dry_run=dry_run, say=click.echo)
    except (MigrationError, ConfigError) as error:
        raise click.ClickException(str(error)) from None
    if show_status:
        click.echo(status_table(rows))


@click.command('new-migration')
@click.argument('module')
@click.argument('name')
@with_appcontext
def new_migration_command(module: str, name: str) -> None:
    """Write MODULE's next migration file, migrations/NNNN_NAME.sql.

    MODULE is a registered module's name (`example`), or `dbapi` for dbapi's own (lib/sql/).
    """
    modules = {module_name(entry): entry for entry in config().modules}
    try:
        if module == OWN_MODULE:
            directory = OWN_DIRECTORY
        elif module in modules:
            directory = migrations_directory(modules[module])
        else:
            known = ', '.join([OWN_MODULE, *modules])
            raise click.ClickException(f'no module named {module!r} in MODULES (known: {known})')
        path = new_migration(directory, module, name)
    except MigrationError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f'created {shown(path)}: write the change, then flask --app app migrate')


# --- openapi -------------------------------------------------------------------------------


@click.command('openapi')
@with_appcontext
def openapi_command() -> None:
    """Write the OpenAPI document to stdout.

    The same bytes GET /openapi.json serves (whether or not API_DOCS is on): every action of every
    registered module, from the modules' routes tables and schemas. Diff it in CI, or generate a
    client from it.
    """
    click.echo(document(registry(), config(), health_operations(current_app)), nl=False)


# --- new-token -----------------------------------------------------------------------------


@click.command('new-token')
@click.argument('name')
def new_token_command(name: str) -> None:
    """Make a token for caller NAME and print it, once, with its line for CALLERS_FILE.

    The token (256 random bits) is not stored anywhere: give it to the caller. The file holds
    only its SHA-256; to rotate, add the new hash beside the old one, then remove the old one.
    """
    try:
        check_caller_name(name)
    except CallersError as error:
        raise click.ClickException(str(error)) from None
    token = secrets.token_urlsafe(32)
    digest = token_digest(token.encode('ascii')).hex()
    click.echo(f'token for {name} (shown this once; give it to the caller, keep no copy):')
    click.echo(f'  {token}')
    click.echo('for CALLERS_FILE (a caller already there: add the hash to its tokens_sha256):')
    click.echo(f'[callers.{name}]')
    click.echo(f'tokens_sha256 = ["{digest}"]')
    click.echo('scopes = []  # modules or module/actions, e.g. ["orders", "example/foo"]; "*" is everything')


def init_app(app: Flask) -> None:
    commands = (
        actions_command,
        new_module_command,
        migrate_command,
        new_migration_command,
        openapi_command,
        new_token_command,
        events_command,
        relay_command,
    )
    for command in commands:
        app.cli.add_command(command)
