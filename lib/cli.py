"""Flask CLI commands for module authors, registered on the app by `init_app`:

    flask --app app actions [--json]          every action: its fields, database and autocommit
    flask --app app new-module NAME [--root]  scaffold modules/NAME/ with one action and its test
    flask --app app apply-sql [--database]    apply dbapi's own SQL and every module's schema.sql
    flask --app app openapi                   the OpenAPI document, as GET /openapi.json serves it
    flask --app app new-token NAME            a new token for caller NAME, and its line for CALLERS_FILE

Everything `actions` shows is read from the app's module blueprints (their `actions` tables),
the same records that serve requests, so the listing cannot drift from what is served.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import secrets
from pathlib import Path
from string import Template
from typing import Any

import click
import psycopg2
from flask import Flask, current_app
from flask.cli import with_appcontext
from marshmallow import Schema, fields

import settings
from lib.actions import RESERVED_MODULES, Action, module_actions
from lib.apply_sql import apply_sql, schema_files
from lib.callers import CallersError, check_caller_name, token_digest
from lib.openapi import document

TEMPLATES = Path(__file__).resolve().parent / 'templates' / 'module'
MODULE_FILES = ('__init__.py', 'routes.py', 'actions.py', 'schemas.py', 'sql.py', 'schema.sql')
TEST_TEMPLATE = 'test_module.py'
# Paths that are (or are planned as) the service's own, never a module's.
RESERVED_NAMES = RESERVED_MODULES | {'batch', 'openapi', 'docs', 'metrics', 'actions'}
# A URL segment and a table prefix (`<name>_items` stays within PostgreSQL's 63 bytes).
MODULE_NAME = re.compile(r'[a-z][a-z0-9_]{0,39}')
NO_VALUE = '-'


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
    rows = [describe(action) for action in module_actions(current_app)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(table(rows))
    else:
        click.echo('no actions: MODULES registers no module')


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
    paths = {package / file: file for file in MODULE_FILES}
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
    default=settings.BASE_DIR,
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
        path.write_text(render(template, name), encoding='utf-8')
        click.echo(f'created {path.relative_to(root)}')
    entry = f'modules.{name}'
    done = register(root / 'settings.py', entry)
    if done is None:
        click.echo(f'settings.py: MODULES is not the expected list; add this line to it:\n    {entry!r},', err=True)
    else:
        click.echo(done)
    # The commands as typed at the project root; a running scripts/serve.sh serves the module within seconds.
    click.echo('next: scripts/flask --app app apply-sql   (scripts/serve.sh does it for you while it runs)')
    click.echo(f'      scripts/test.sh tests/test_module_{name}.py')
    click.echo(f'      POST /{name}/add_item is the action')


# --- apply-sql -----------------------------------------------------------------------------


def shown(path: Path) -> str:
    return str(path.relative_to(settings.BASE_DIR) if path.is_relative_to(settings.BASE_DIR) else path)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def sql_line(error: psycopg2.Error) -> str:
    """`, line N` of the statement PostgreSQL points at (libpq's `LINE N:`), when it says."""
    found = re.search(r'^LINE (\d+):', str(error), re.MULTILINE)
    return f', line {found[1]}' if found else ''


@click.command('apply-sql')
@click.option('--database', default=settings.DEFAULT, show_default=True, help='A name from DATABASES.')
@with_appcontext
def apply_sql_command(database: str) -> None:
    """Apply dbapi's own SQL, then every module's schema.sql, to a database.

    The modules are those of MODULES, in order; each file runs in one transaction, and the
    files are written to be re-run (`CREATE ... IF NOT EXISTS`).
    """
    databases = current_app.config['DATABASES']
    if database not in databases:
        raise click.ClickException(f'no database named {database!r} (known: {", ".join(databases)})')
    try:
        for path in apply_sql(databases[database], []):  # dbapi's own tables
            click.echo(f'applied {shown(path)}')
    except psycopg2.Error as error:
        raise click.ClickException(f"dbapi's own SQL not applied: {first_line(error)}") from None
    for module in current_app.config['MODULES']:
        try:
            applied = apply_sql(databases[database], [module], project=False)
        except psycopg2.Error as error:
            [path] = schema_files([module])
            raise click.ClickException(f'{shown(path)}{sql_line(error)}: not applied: {first_line(error)}') from None
        for path in applied:
            click.echo(f'applied {shown(path)}')


# --- openapi -------------------------------------------------------------------------------


@click.command('openapi')
@with_appcontext
def openapi_command() -> None:
    """Write the OpenAPI document to stdout.

    The same bytes GET /openapi.json serves (whether or not API_DOCS is on): every action of every
    registered module, from the modules' routes tables and schemas. Diff it in CI, or generate a
    client from it.
    """
    click.echo(document(current_app), nl=False)


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
    for command in (actions_command, new_module_command, apply_sql_command, openapi_command, new_token_command):
        app.cli.add_command(command)
