"""The documentation as a user meets it: the site builds offline with every page, every code block
it presents as runnable runs as written, and its tables match the code they describe.

The pages are README.md and docs/*.md. A Python or shell block is run by
`test_the_runnable_blocks_of_a_page_run`, against a real gunicorn on a fresh database, unless the
HTML comment on the line before its fence says otherwise:

    <!-- file: PATH -->             the block is the whole file PATH (checked equal)
    <!-- from: PATH -->             the block is a verbatim part of PATH (checked)
    <!-- run by tests/X.py -->      test X reads the block by this marker and runs it
    <!-- excerpt: why -->           shown, not run (a fragment, or it needs Docker, minutes, ...)

Running "as written" changes one thing: the address http://127.0.0.1:8000 is the test service's.
Its token is the one the docs show, `local-dev-token`. A page's Python blocks run in order in
one process, as a reader pastes them into one session; each shell block runs alone, in bash with
errexit and pipefail, at the repository root.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import psycopg2
import pytest
import requests
from click.testing import CliRunner

import lib
from lib.core import config
from lib.server.cli import new_module_command
from tests.conftest import AUTH, LEDGER, query, schema_database
from tests.service import Service, running_service

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
DOCS_URL = 'http://127.0.0.1:8000'
DOCS_TOKEN = 'local-dev-token'
PYTHON = frozenset({'python', 'py'})
SHELL = frozenset({'sh', 'bash', 'shell', 'console'})
FENCE = re.compile(r'^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$', re.M | re.S)
MARKER = re.compile(r'^<!-- (?P<kind>file|from|run by|excerpt)(?::? (?P<arg>.*?))? -->$')
RUN_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str  # the HTML comment on the line before the fence, or ''

    @property
    def runnable(self) -> bool:
        return self.lang in PYTHON | SHELL

    def __str__(self) -> str:
        return f'{self.page.relative_to(ROOT)}:{self.line}'


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding='utf-8')
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip('\n').rsplit('\n', 1)[-1].strip()
        code = '\n'.join(line.removeprefix(match['indent']) for line in match['code'].split('\n'))
        found.append(
            Block(
                page=page,
                line=text.count('\n', 0, match.start()) + 1,
                lang=match['lang'].lower(),
                code=code,
                marker=before if before.startswith('<!--') else '',
            )
        )
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def marked(kind: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if (m := MARKER.match(b.marker)) and m['kind'] == kind]


def marker_arg(block: Block) -> str:
    match = MARKER.match(block.marker)
    assert match is not None and match['arg'], f'{block}: {block.marker!r} names nothing'
    return match['arg']


# --- what every block is -------------------------------------------------------------------


def test_the_pages_hold_runnable_blocks() -> None:
    runnable = [b for b in ALL_BLOCKS if b.runnable]
    assert len(runnable) > 20, [str(b) for b in runnable]  # the parser found the fences


def test_every_comment_before_a_block_is_a_known_marker() -> None:
    """A typo (`<!-- exerpt -->`) must not hide a block from the runner."""
    unknown = [f'{b}: {b.marker}' for b in ALL_BLOCKS if b.marker and not MARKER.match(b.marker)]
    assert unknown == []


def test_file_and_from_blocks_name_files_that_exist() -> None:
    for block in marked('file') + marked('from'):
        assert (ROOT / marker_arg(block)).is_file(), f'{block}: {marker_arg(block)} does not exist'


@pytest.mark.parametrize('block', marked('file'), ids=str)
def test_a_file_block_is_the_whole_file(block: Block) -> None:
    assert block.code == (ROOT / marker_arg(block)).read_text(encoding='utf-8')


@pytest.mark.parametrize('block', marked('from'), ids=str)
def test_a_from_block_is_part_of_its_file(block: Block) -> None:
    assert block.code in (ROOT / marker_arg(block)).read_text(encoding='utf-8')


@pytest.mark.parametrize('block', marked('run by'), ids=str)
def test_a_run_by_block_is_read_by_its_test(block: Block) -> None:
    test = ROOT / marker_arg(block)
    assert test.is_file(), f'{block}: {test} does not exist'
    assert block.marker in test.read_text(encoding='utf-8'), f'{test.name} does not read {block}'


def test_every_excerpt_says_why() -> None:
    assert [str(b) for b in marked('excerpt') if not marker_arg(b).strip()] == []


def test_the_site_shows_every_file_of_the_example_module() -> None:
    shown = sorted(marker_arg(b) for b in marked('file') if b.page.name == 'writing-modules.md')
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / 'modules' / 'example').rglob('*')
        if p.is_file() and '__pycache__' not in p.parts
    )
    assert 'modules/example/migrations/0001_initial.sql' in files
    assert shown == files


# --- what the pages name ------------------------------------------------------------------

HISTORY = 'performance.md'  # the measurement history names the engine's files as they were then
LIB_PATH = re.compile(r'(?<![\w/.-])(lib/[\w/]+\.(?:py|sql))')
LIB_NAME = re.compile(r'(?<![\w/.-])(lib(?:\.[a-z_]+)+)')
GONE = re.compile(r'apply-sql|apply_sql|schema\.sql')  # migrations replaced them (issue 31)
ADOPTING = '## Adopting a database built by `schema.sql`'  # docs/migrations.md: how to leave them


def current_pages() -> list[Path]:
    return [page for page in PAGES if page.name != HISTORY]


def test_the_pages_name_the_engine_s_files_where_they_are_now() -> None:
    """`lib/x.py` exists and is not a 0.1 path kept for one release (lib/_deprecated.py)."""
    for page in current_pages():
        for path in LIB_PATH.findall(page.read_text(encoding='utf-8')):
            assert (ROOT / path).is_file(), f'{page.name} names {path}, which does not exist'
            assert 'lib._deprecated' not in (ROOT / path).read_text(encoding='utf-8'), f'{page.name}: {path} moved'


def longest_module(parts: list[str]) -> int:
    """How many of the dotted `parts` name a module (`lib.db.connections.savepoint`: 3)."""
    for count in range(len(parts), 0, -1):
        try:
            if importlib.util.find_spec('.'.join(parts[:count])) is not None:
                return count
        except ModuleNotFoundError:  # a name inside a module, not a package
            continue
    raise AssertionError(f'{".".join(parts)} names no module')


def test_the_pages_name_modules_and_names_of_lib_that_exist() -> None:
    for page in current_pages():
        for dotted in set(LIB_NAME.findall(page.read_text(encoding='utf-8'))):
            parts = dotted.split('.')
            found = longest_module(parts)
            with warnings.catch_warnings():  # the 0.1 paths the architecture page names warn when imported
                warnings.simplefilter('ignore', DeprecationWarning)
                obj: Any = importlib.import_module('.'.join(parts[:found]))
            for attribute in parts[found:]:
                assert hasattr(obj, attribute), f'{page.name} names {dotted}, which does not exist'
                obj = getattr(obj, attribute)


def test_one_way_to_apply_sql_the_migrations() -> None:
    """apply-sql and schema.sql are gone: only docs/migrations.md names them, to say how to leave them."""
    for page in current_pages():
        text = page.read_text(encoding='utf-8')
        for block in blocks(page):  # a file shown whole or in part is the code's, checked equal to it
            if MARKER.match(block.marker) and block.marker.startswith(('<!-- file:', '<!-- from:')):
                text = text.replace(block.code, '')
        if page.name == 'migrations.md':
            text = text[: text.index(ADOPTING)]
        assert GONE.findall(text) == [], f'{page.relative_to(ROOT)} still names {GONE.findall(text)}'


# --- running the runnable blocks -----------------------------------------------------------


def to_run(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.runnable and not b.marker]


RUN_PAGES = [page for page in PAGES if to_run(page)]


def shown_output(block: Block) -> Any:
    """The JSON a shell block shows as its last line (`# [{"name": ...}]`), or None."""
    last = block.code.rstrip('\n').rsplit('\n', 1)[-1]
    if not last.startswith('# '):
        return None
    try:
        return json.loads(last.removeprefix('# '))
    except ValueError:
        return None


@pytest.fixture(scope='module')
def docs_service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A gunicorn serving the example module with the token the docs show, on a fresh database."""
    with schema_database('dbapi_docs') as database:
        log_dir = str(tmp_path_factory.mktemp('docs-logs'))
        with running_service(database, log_dir, BEARER=DOCS_TOKEN, EXTRA_MODULES='') as service:
            yield service


def runner_env(service: Service) -> dict[str, str]:
    """The service's own settings, so `scripts/flask --app app ...` sees the same database."""
    keep = ('ENVIRONMENT', 'BEARER', 'LOG_DIR', *tuple(k for k in service.env if k.startswith('DEFAULT_DB_')))
    return {**os.environ, **{key: service.env[key] for key in keep}}


def run(block: Block, code: str, service: Service) -> subprocess.CompletedProcess[str]:
    code = code.replace(DOCS_URL, service.url)
    command = [sys.executable, '-c', code] if block.lang in PYTHON else ['bash', '-e', '-o', 'pipefail', '-c', code]
    # A session of its own: on a timeout the whole group goes, whatever the block started.
    process = subprocess.Popen(
        command, cwd=ROOT, env=runner_env(service), stdout=PIPE, stderr=PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f'{block} still ran after {RUN_TIMEOUT_SECONDS} s:\n{stdout}\n{stderr}')
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize('page', RUN_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_runnable_blocks_of_a_page_run(page: Path, docs_service: Service) -> None:
    runnable = to_run(page)
    python = [b for b in runnable if b.lang in PYTHON]
    for block in runnable:
        if block.lang in SHELL:
            done = run(block, block.code, docs_service)
            assert done.returncode == 0, f'{block} failed:\n{block.code}\n{done.stdout}\n{done.stderr}'
            assert 'Traceback' not in done.stderr, f'{block}:\n{done.stderr}'
            shown = shown_output(block)
            if shown is not None:
                assert json.loads(done.stdout) == shown, f'{block} printed {done.stdout!r}'
    if python:
        session = '\n'.join(b.code for b in python)
        done = run(python[0], session, docs_service)
        assert done.returncode == 0, f'{page.name} Python blocks failed:\n{done.stdout}\n{done.stderr}'


def test_a_python_block_is_valid_python_before_anything_runs() -> None:
    for block in ALL_BLOCKS:
        if block.lang in PYTHON:
            ast.parse(block.code, filename=str(block))


# --- the retrying client, against a real gunicorn ------------------------------------------


def retrying_client() -> str:
    """docs/retrying.md's client as written: its first Python block, imports included."""
    return next(b.code for b in blocks(ROOT / 'docs' / 'retrying.md') if b.lang in PYTHON)


def test_the_retrying_client_writes_once_and_answers_what_was_stored(
    ledger_database: dict[str, Any], tmp_path: Path
) -> None:
    """The same write sent twice by the client is one row, and a stored 409 is answered at once
    instead of being sent ten times. Run in an empty namespace: the block imports what it uses."""
    namespace: dict[str, Any] = {}
    exec(retrying_client(), namespace)  # noqa: S102  # nosec B102 - the docs' own code, checked here
    write_once = namespace['write_once']
    with running_service(ledger_database, str(tmp_path), EXTRA_MODULES=LEDGER) as service:
        api = requests.Session()
        api.headers['Authorization'] = AUTH['Authorization']
        first = write_once(api, f'{service.url}/ledger/add_code', {'note': 'docs', 'code': 'docs-1'})
        clash = write_once(api, f'{service.url}/ledger/add_code', {'note': 'again', 'code': 'docs-1'})
    assert first.status_code == 200
    assert clash.status_code == 409 and clash.json()['type'] == 'urn:dbapi:problem:unique-violation'
    conn = psycopg2.connect(**ledger_database)
    try:
        rows = query(conn, "SELECT note FROM ledger_entries WHERE code = 'docs-1'")
        keys = query(conn, "SELECT status FROM dbapi_idempotency WHERE action = 'ledger/add_code' ORDER BY status")
    finally:
        conn.close()
    assert rows == [('docs',)]
    assert keys == [(200,), (409,)]  # each write's answer stored under its own key


# --- what the scaffold prints -------------------------------------------------------------


def test_the_testing_page_shows_what_new_module_prints(tmp_path: Path) -> None:
    for folder in ('modules', 'tests'):
        (tmp_path / folder).mkdir()
    result = CliRunner().invoke(new_module_command, ['orders', '--root', str(tmp_path)])
    assert result.exit_code == 0, result.output
    printed = result.stdout[result.stdout.index('next:') :]
    [shown] = [b.code for b in blocks(ROOT / 'docs' / 'testing-modules.md') if b.code.startswith('next:')]
    assert shown == printed


# --- the configuration table: every setting, and only settings -----------------------------

# One database's setting, as the docs spell it (`DEFAULT_DB_HOST`, `<NAME>_DB_HOST`) and as the
# recording below meets it (`OTHER_DB_HOST`, a second database): one setting of every database.
DATABASE_SETTING = re.compile(r'^(?:DEFAULT|OTHER|<NAME>)_DB_')
DOCUMENTED_NAME = re.compile(r'`((?:<NAME>|[A-Z])[A-Z0-9_]*)`')
# A variable read anywhere but lib.core.config.load() (which the recording covers); not a write.
DIRECT_READ = re.compile(
    r"""(?:os\.getenv|os\.environ\.get)\(\s*'([A-Z][A-Z0-9_]*)'|os\.environ\[\s*'([A-Z][A-Z0-9_]*)'\s*\](?!\s*=[^=])"""
)


def as_setting(name: str) -> str:
    return DATABASE_SETTING.sub('<NAME>_DB_', name)


class Recording(dict[str, Any]):
    """The environment `load()` reads from, noting every name it asks for."""

    asked: set[str]

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)


def read_by_load(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every name `lib.core.config.load()` asks the environment for, with two databases
    configured, in the spelling of the docs."""
    recording = Recording()
    recording.asked = set()
    real = config.environment

    def environment(*args: Any, **kwargs: Any) -> dict[str, str]:
        recording.update(real(*args, **kwargs))
        return recording

    monkeypatch.setattr(config, 'environment', environment)
    environ = {'ENVIRONMENT': 'testing', 'DEFAULT_DB_NAME': 'docs', 'OTHER_DB_NAME': 'other', 'BEARER': 'testing-token'}
    loaded = config.load(environ=environ)
    assert set(loaded.databases) == {'default', 'other'}
    return {as_setting(name) for name in recording.asked}


def read_directly() -> set[str]:
    """Variables read from the process environment outside the configuration object."""
    paths = [ROOT / 'app.py', ROOT / 'settings.py', ROOT / 'gunicorn.conf.py', *sorted((ROOT / 'lib').rglob('*.py'))]
    found = (DIRECT_READ.findall(path.read_text(encoding='utf-8')) for path in paths)
    return {call or item for matches in found for call, item in matches}


def documented(page: Path) -> set[str]:
    """The names in the first column of the page's settings tables, as settings."""
    names = set()
    for line in page.read_text(encoding='utf-8').splitlines():
        cells = line.split('|')
        if len(cells) > 3 and cells[1].strip().startswith('`'):
            names |= {as_setting(name) for name in DOCUMENTED_NAME.findall(cells[1])}
    return names


def every_setting(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """SETTINGS, checked against what the code reads, with the `_FILE` form of each secret."""
    listed = {setting.name for setting in config.SETTINGS}
    read = read_by_load(monkeypatch)
    secrets = {name for name in read if name.endswith('_FILE') and name.removesuffix('_FILE') in listed}
    assert sorted(read - secrets - listed) == [], 'read by load(), not in SETTINGS'
    assert sorted(listed - read) == [], 'in SETTINGS, read by nothing'
    assert sorted(read_directly() - listed) == [], 'read from the environment outside load(), not in SETTINGS'
    return listed | secrets


def test_the_configuration_page_documents_every_setting_and_only_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = every_setting(monkeypatch)
    assert {'BEARER_FILE', '<NAME>_DB_PASS_FILE', 'EVENTS_AMQP_URL_FILE', '<NAME>_DB_HOST', 'BIND'} <= settings
    shown = documented(ROOT / 'docs' / 'configuration.md')
    assert sorted(settings - shown) == [], 'a setting of the code, not on docs/configuration.md'
    assert sorted(shown - settings) == [], 'on docs/configuration.md, not a setting of the code'


def test_the_readme_configuration_table_is_a_part_of_the_full_one() -> None:
    readme = documented(ROOT / 'README.md')
    assert {'ENVIRONMENT', 'BEARER', '<NAME>_DB_HOST', 'WEB_CONCURRENCY'} <= readme
    assert sorted(readme - documented(ROOT / 'docs' / 'configuration.md')) == []


# --- one version ---------------------------------------------------------------------------


def project_version() -> str:
    with (ROOT / 'pyproject.toml').open('rb') as file:
        return str(tomllib.load(file)['project']['version'])


def test_the_deploy_page_tags_the_image_with_the_project_version() -> None:
    text = (ROOT / 'docs' / 'deploy.md').read_text(encoding='utf-8')
    assert re.findall(r'export VERSION=(\S+)', text) == [project_version()]
    assert set(re.findall(r'dbapi:(\S+?)[\s`]', text)) == {'$VERSION'}


def test_scripts_flask_version_names_the_project_version_first() -> None:
    done = subprocess.run(
        ['scripts/flask', '--app', 'app', '--version'], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f'dbapi {project_version()}'
    assert [line.split()[0] for line in done.stdout.splitlines()] == ['dbapi', 'Python', 'Flask', 'Werkzeug']


# --- the site ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `mkdocs build --strict` makes it (a warning is an error), offline."""
    out = tmp_path_factory.mktemp('site')
    env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1'}
    mkdocs = Path(sys.executable).parent / 'mkdocs'
    done = subprocess.run(
        [str(mkdocs), 'build', '--strict', '--site-dir', str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_lib_api_page_shows_every_public_name_with_its_signature(site: Path) -> None:
    page = (site / 'lib-api' / 'index.html').read_text(encoding='utf-8')
    for name in lib.__all__:
        found = re.search(rf'id="lib\.{name}"(.*?)(?=id="lib\.|\Z)', page, re.S)
        assert found, f'lib.{name} is not on docs/lib-api.md'
        entry = re.sub(r'<[^>]+>', '', found[1])
        obj = getattr(lib, name)
        if callable(obj):
            assert re.search(rf'\b{name}\(', entry), f'lib.{name} has no signature on the page'


def test_every_page_is_built_and_fetches_nothing_from_elsewhere(site: Path) -> None:
    for page in (ROOT / 'docs').glob('*.md'):
        built = site / 'index.html' if page.stem == 'index' else site / page.stem / 'index.html'
        assert built.is_file(), f'{page.name} is not in mkdocs.yml nav'
    for html in site.rglob('*.html'):
        text = html.read_text(encoding='utf-8')
        outside = re.findall(r'<(?:link|script|img)\b[^>]*(?:href|src)="(https?://[^"]+)"', text)
        assert outside == [], f'{html.relative_to(site)} loads {outside}'
