"""The Flask CLI commands of lib/server/cli.py, run on the project's app fixtures and, end to end, with
`flask --app app` and pytest in a copy of the working tree."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from click.testing import CliRunner
from flask import Flask
from marshmallow import Schema, fields

from lib import module_blueprint
from lib.contract.declarations import inject_conn, use_schema
from lib.db.connections import POOLS_KEY
from lib.db.migrations import discover
from lib.server.cli import RESERVED_NAMES, new_module_command
from lib.web.blueprints import registry_of
from lib.web.flask_app import REGISTRY_KEY
from tests.conftest import MODULES, PG, create_database, drop_database, make_app, query

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# What the scaffolded module's test needs of the project: the app, lib, the modules, the test
# fixtures and the testing environment.
COPIED = ('app.py', 'settings.py', 'pyproject.toml', 'lib', 'modules', 'env', 'tests/modules')
COPIED_TEST_FILES = ('tests/__init__.py', 'tests/conftest.py', 'tests/figures.py')
SETTINGS_TEXT = """import os

MODULES = [
    'modules.example',
]
MODULES += [name for name in os.getenv('EXTRA', '').split(',') if name]
"""
COLUMNS = re.compile(r'\s{2,}')


def columns(output: str) -> dict[str, list[str]]:
    """The `actions` table by action name: [database, autocommit, fields]."""
    header, *lines = output.splitlines()
    assert COLUMNS.split(header) == ['ACTION', 'DATABASE', 'AUTOCOMMIT', 'FIELDS']
    rows = {}
    for line in lines:
        name, *rest = COLUMNS.split(line, maxsplit=3)
        rows[name] = rest
    return rows


def served_actions(app: Flask) -> set[str]:
    return {action.name for action in registry_of(app)}


# --- actions -------------------------------------------------------------------------------


class ChildSchema(Schema):
    n = fields.Integer()


class OddSchema(Schema):
    ids = fields.List(fields.Integer(), required=True)
    when = fields.DateTime(data_key='at')
    child = fields.Nested(ChildSchema)
    computed = fields.String(dump_only=True)


@use_schema(OddSchema)
@inject_conn('default', named=False, autocommit=True)
def odd(conn: Any, ids: list[int], when: Any = None, child: Any = None) -> None:
    return None


def test_actions_lists_every_action_with_its_fields_database_and_autocommit(app):
    result = app.test_cli_runner().invoke(args=['actions'])
    assert result.exit_code == 0, result.output
    rows = columns(result.output)
    assert set(rows) == served_actions(app)
    assert {'example/', 'example/foo', 'probe/add_item', 'probe/tuples', 'probe/nested/name'} <= set(rows)
    assert rows['example/'] == ['-', '-', '-']
    assert rows['example/foo'] == ['-', '-', 'name (String, required), email (Email)']
    assert rows['probe/add_item'] == [
        'default',
        'no',
        'code (String, required), qty (Integer, required), parent (Integer)',
    ]
    assert rows['probe/tuples'] == ['default', 'no', '-']


def test_actions_shows_autocommit_list_nested_and_json_keys_and_skips_dump_only_fields(app):
    app.register_blueprint(module_blueprint('tests.cli_odd', [dict(route='odd', action=odd)]))
    app.extensions[REGISTRY_KEY] = registry_of(app)  # the registry is built once, by create_app
    runner = app.test_cli_runner()
    rows = columns(runner.invoke(args=['actions']).output)
    assert rows['cli_odd/odd'] == [
        'default',
        'yes',
        'ids (List[Integer], required), at (DateTime), child (Nested[ChildSchema])',
    ]
    listed = {row['action']: row for row in json.loads(runner.invoke(args=['actions', '--json']).output)}
    assert set(listed) == served_actions(app)
    assert listed['cli_odd/odd'] == {
        'action': 'cli_odd/odd',
        'module': 'cli_odd',
        'route': 'odd',
        'fields': [
            {'name': 'ids', 'type': 'List[Integer]', 'required': True},
            {'name': 'at', 'type': 'DateTime', 'required': False},
            {'name': 'child', 'type': 'Nested[ChildSchema]', 'required': False},
        ],
        'database': 'default',
        'autocommit': True,
        'named': False,
    }
    assert listed['example/']['fields'] == []
    assert listed['example/']['database'] is None


# --- new-module ----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A bare project root: modules/, tests/ and a settings.py shaped like the real one."""
    (tmp_path / 'modules' / 'example').mkdir(parents=True)
    (tmp_path / 'tests').mkdir()
    (tmp_path / 'settings.py').write_text(SETTINGS_TEXT, encoding='utf-8')
    return tmp_path


def tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob('*'))


def listed_modules(settings_file: Path) -> list[str]:
    for node in ast.parse(settings_file.read_text(encoding='utf-8')).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == 'MODULES':
            return ast.literal_eval(node.value)
    raise AssertionError(f'{settings_file} has no MODULES = [...]')


def test_new_module_writes_the_package_and_its_test_and_registers_it(app, root):
    result = app.test_cli_runner().invoke(args=['new-module', 'orders', '--root', str(root)])
    assert result.exit_code == 0, result.output
    package = root / 'modules' / 'orders'
    written = ['__init__.py', 'actions.py', 'migrations', 'routes.py', 'schemas.py', 'sql.py']
    assert sorted(path.name for path in package.iterdir()) == written
    assert [path.name for path in (package / 'migrations').iterdir()] == ['0001_initial.sql']
    assert (root / 'tests' / 'test_module_orders.py').is_file()
    assert listed_modules(root / 'settings.py') == ['modules.example', 'modules.orders']
    assert "    'modules.orders',\n]\n" in (root / 'settings.py').read_text(encoding='utf-8')
    assert 'CREATE TABLE orders_items' in (package / 'migrations' / '0001_initial.sql').read_text(encoding='utf-8')
    assert '%(code)s' in (package / 'sql.py').read_text(encoding='utf-8')
    for path in package.glob('*.py'):
        assert 'flask' not in path.read_text(encoding='utf-8').lower(), f'{path.name} imports Flask'
    assert 'created modules/orders/actions.py' in result.output


def test_new_module_refuses_an_existing_name_and_changes_nothing(app, root):
    runner = app.test_cli_runner()
    before = tree(root)
    result = runner.invoke(args=['new-module', 'example', '--root', str(root)])
    assert result.exit_code != 0
    assert result.output.strip() == 'Error: modules/example already exists: choose another module name'
    assert tree(root) == before

    assert runner.invoke(args=['new-module', 'orders', '--root', str(root)]).exit_code == 0
    settings_text = (root / 'settings.py').read_text(encoding='utf-8')
    again = runner.invoke(args=['new-module', 'orders', '--root', str(root)])
    assert again.exit_code != 0
    assert 'modules/orders already exists' in again.output
    assert (root / 'settings.py').read_text(encoding='utf-8') == settings_text


def test_new_module_refuses_a_name_whose_test_file_exists(app, root):
    (root / 'tests' / 'test_module_orders.py').write_text('# mine\n', encoding='utf-8')
    result = app.test_cli_runner().invoke(args=['new-module', 'orders', '--root', str(root)])
    assert result.exit_code != 0
    assert 'tests/test_module_orders.py already exists' in result.output
    assert not (root / 'modules' / 'orders').exists()


@pytest.mark.parametrize('name', ['Orders', '1orders', 'my-orders', 'my.orders', 'ördres', '_x', 'a' * 41, ''])
def test_new_module_refuses_an_invalid_name_in_one_line(app, root, name):
    before = tree(root)
    result = app.test_cli_runner().invoke(args=['new-module', name, '--root', str(root)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f'Error: module name {name!r} is invalid: use at most 40 lowercase letters, digits and _, '
        'starting with a letter'
    ]
    assert tree(root) == before


@pytest.mark.parametrize('name', ['class', 'import', 'lambda'])
def test_new_module_refuses_a_python_keyword(app, root, name):
    result = app.test_cli_runner().invoke(args=['new-module', name, '--root', str(root)])
    assert result.exit_code != 0
    assert result.output.strip() == f'Error: module name {name!r} is a Python keyword'


@pytest.mark.parametrize('name', sorted(RESERVED_NAMES))
def test_new_module_refuses_a_reserved_name(app, root, name):
    before = tree(root)
    result = app.test_cli_runner().invoke(args=['new-module', name, '--root', str(root)])
    assert result.exit_code != 0
    assert result.output.strip().startswith(f'Error: module name {name!r} is reserved (reserved: ')
    assert tree(root) == before


def test_reserved_names_are_those_of_the_service():
    assert {'health', 'batch', 'openapi', 'docs', 'metrics', 'actions'} <= RESERVED_NAMES


def test_new_module_refuses_a_root_that_is_not_a_project(app, tmp_path):
    result = app.test_cli_runner().invoke(args=['new-module', 'orders', '--root', str(tmp_path)])
    assert result.exit_code != 0
    assert result.output.strip() == f'Error: {tmp_path} has no modules/ directory: --root must be the project root'


@pytest.mark.parametrize(
    'settings_text',
    [
        "MODULES = ['modules.example']\n",  # the closing bracket shares a line
        "MODULES = [\n    'modules.example'\n]\n",  # no trailing comma: the edit would join two strings
        "BASE = ['modules.example']\nMODULES = BASE + [\n]\n",  # not a literal list
        "MODULES = [\n    'a',\n]\nMODULES = [\n    'b',\n]\n",  # assigned twice
        '# no MODULES here\n',
    ],
)
def test_new_module_prints_the_line_to_add_when_settings_has_another_shape(app, root, settings_text):
    (root / 'settings.py').write_text(settings_text, encoding='utf-8')
    result = app.test_cli_runner().invoke(args=['new-module', 'orders', '--root', str(root)])
    assert result.exit_code == 0, result.output
    assert "settings.py: MODULES is not the expected list; add this line to it:\n    'modules.orders',\n" in (
        result.output
    )
    assert (root / 'settings.py').read_text(encoding='utf-8') == settings_text
    assert (root / 'modules' / 'orders' / 'actions.py').is_file()


def test_new_module_leaves_settings_alone_when_the_module_is_listed(app, root):
    text = SETTINGS_TEXT.replace("    'modules.example',\n", "    'modules.example',\n    'modules.orders',\n")
    (root / 'settings.py').write_text(text, encoding='utf-8')
    result = app.test_cli_runner().invoke(args=['new-module', 'orders', '--root', str(root)])
    assert result.exit_code == 0, result.output
    assert "'modules.orders' is already in MODULES" in result.output
    assert (root / 'settings.py').read_text(encoding='utf-8') == text


# --- the scaffolded module, in a copy of the working tree ----------------------------------

SCAFFOLDED = 'widgets'


@pytest.fixture(scope='module')
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree's app, lib, modules and test fixtures, with `widgets` scaffolded
    into it by `new-module` (the real tree is never written)."""
    target = tmp_path_factory.mktemp('repo')
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    for name in COPIED_TEST_FILES:
        shutil.copy2(ROOT / name, target / name)
    result = CliRunner().invoke(new_module_command, [SCAFFOLDED, '--root', str(target)])
    assert result.exit_code == 0, result.output
    return target


def run_in(copy: Path, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key not in {'PYTHONPATH', 'EXTRA_MODULES'}}
    environment.update(CI='true', ENVIRONMENT='testing', **env)
    return subprocess.run(command, cwd=copy, env=environment, capture_output=True, text=True, timeout=240)


def test_the_scaffolded_module_is_registered_in_the_copy_settings(copy):
    assert listed_modules(copy / 'settings.py')[-1] == f'modules.{SCAFFOLDED}'
    assert (ROOT / 'modules' / SCAFFOLDED).exists() is False


def test_the_scaffolded_module_passes_its_own_test_as_written(copy):
    test = f'tests/test_module_{SCAFFOLDED}.py'
    result = run_in(copy, sys.executable, '-m', 'pytest', test, '-q', '-p', 'no:cacheprovider')
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'\b4 passed\b', result.stdout), result.stdout


def test_the_scaffolded_files_pass_the_project_linters_and_type_checker(copy):
    files = [f'modules/{SCAFFOLDED}', f'tests/test_module_{SCAFFOLDED}.py']
    for command in (['check', '--no-cache'], ['format', '--check', '--no-cache']):
        result = run_in(copy, str(BIN / 'ruff'), *command, *files)
        assert result.returncode == 0, result.stdout + result.stderr
    # mypy checks modules/ (strict, pyproject.toml), not tests/: the package alone, as CI would.
    result = run_in(copy, str(BIN / 'mypy'), '--no-incremental', '--follow-imports=silent', f'modules/{SCAFFOLDED}')
    assert result.returncode == 0, result.stdout + result.stderr


def test_flask_app_actions_lists_the_scaffolded_action(copy):
    result = run_in(copy, str(BIN / 'flask'), '--app', 'app', 'actions')
    assert result.returncode == 0, result.stderr
    assert columns(result.stdout)[f'{SCAFFOLDED}/add_item'] == [
        'default',
        'no',
        'code (String, required), label (String)',
    ]


def test_flask_app_migrate_creates_the_scaffolded_table(copy):
    name = create_database('dbapi_cli')
    try:
        result = run_in(copy, str(BIN / 'flask'), '--app', 'app', 'migrate', DEFAULT_DB_NAME=name)
        assert result.returncode == 0, result.stderr
        assert f'default: applied {SCAFFOLDED} 0001_initial' in without_timings(result.stdout)
        conn = psycopg2.connect(dbname=name, **PG)
        try:
            assert query(conn, 'SELECT to_regclass(%s) IS NOT NULL', [f'{SCAFFOLDED}_items']) == [(True,)]
        finally:
            conn.close()
    finally:
        drop_database(name)


# --- migrate -------------------------------------------------------------------------------


@pytest.fixture
def fresh(log_dir: str) -> Iterator[tuple[Flask, dict[str, Any]]]:
    """An app over a new, empty database, and that database's connection parameters."""
    name = create_database('dbapi_cli')
    params = dict(PG, dbname=name)
    application = make_app(params, log_dir)
    try:
        yield application, params
    finally:
        application.extensions[POOLS_KEY].close()
        drop_database(name)


def tables(params: dict[str, Any]) -> set[str]:
    conn = psycopg2.connect(**params)
    try:
        rows = query(conn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        conn.close()
    return {row[0] for row in rows}


def without_timings(output: str) -> list[str]:
    return [re.sub(r' in \d+ ms$', '', line) for line in output.splitlines()]


def test_migrate_applies_dbapi_own_migrations_then_every_module_s_to_a_fresh_database(fresh):
    app, params = fresh
    assert tables(params) == set()
    runner = app.test_cli_runner()
    result = runner.invoke(args=['migrate'])
    assert result.exit_code == 0, result.output
    served = discover(MODULES)  # dbapi's own files first (more come with later features), then the modules'
    assert [m.module for m in served][-2:] == ['example', 'probe']
    assert without_timings(result.output) == [f'default: applied {m.label}' for m in served]
    assert {'dbapi_migrations', 'dbapi_idempotency', 'users', 'probe_items', 'probe_log'} <= tables(params)
    again = runner.invoke(args=['migrate'])
    assert (again.exit_code, again.output) == (0, f'default: nothing to apply; {len(served)} applied\n')


def test_migrate_status_lists_applied_and_pending_per_module_and_exits_0(fresh):
    app, params = fresh
    runner = app.test_cli_runner()
    before = runner.invoke(args=['migrate', '--status'])
    assert before.exit_code == 0, before.output
    assert [COLUMNS.split(line) for line in before.output.splitlines()] == [
        ['DATABASE', 'MIGRATION', 'STATE'],
        *(
            ['default', m.label, 'pending' + ('' if m.transactional else ' (no-transaction)')]
            for m in discover(MODULES)
        ),
    ]
    assert tables(params) == set()  # --status reads only
    assert runner.invoke(args=['migrate', '--database', 'default']).exit_code == 0
    after = runner.invoke(args=['migrate', '--status'])
    assert after.exit_code == 0
    states = [COLUMNS.split(line)[2] for line in after.output.splitlines()[1:]]
    assert all(re.fullmatch(r'applied \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC in \d+ ms, by .+ pid \d+', s) for s in states)


def test_migrate_refuses_an_unknown_database_naming_it(fresh):
    app, params = fresh
    result = app.test_cli_runner().invoke(args=['migrate', '--database', 'nope'])
    assert result.exit_code != 0
    assert result.output.strip() == "Error: no database named 'nope' (known: default)"
    assert tables(params) == set()


def test_new_migration_writes_the_next_numbered_file_of_the_module(database, tmp_path, monkeypatch):
    package = tmp_path / 'numbered'
    (package / 'migrations').mkdir(parents=True)
    blueprint = 'from lib import module_blueprint\n\nblueprint = module_blueprint(__name__, [])\n'
    (package / '__init__.py').write_text(blueprint, encoding='utf-8')
    (package / 'migrations' / '0007_first.sql').write_text('SELECT 1;\n', encoding='utf-8')
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app(database, str(tmp_path / 'logs'), MODULES=['numbered'])
    runner = app.test_cli_runner()
    result = runner.invoke(args=['new-migration', 'numbered', 'add_email'])
    assert result.exit_code == 0, result.output
    written = package / 'migrations' / '0008_add_email.sql'
    assert result.output.startswith(f'created {written}: write the change')
    assert written.read_text(encoding='utf-8').startswith('-- numbered 0008_add_email: ')
    bad = runner.invoke(args=['new-migration', 'numbered', 'Add-Email'])
    assert bad.exit_code != 0 and "migration name 'Add-Email' is invalid" in bad.output
    unknown = runner.invoke(args=['new-migration', 'nope', 'x'])
    assert unknown.output.strip() == "Error: no module named 'nope' in MODULES (known: dbapi, numbered)"
