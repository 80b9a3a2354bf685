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
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import psycopg2
import pytest
import requests
from click.testing import CliRunner
from lib.cli import new_module_command

import lib
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
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'modules' / 'example').iterdir() if p.is_file())
    assert shown == files


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

SETTING_READ = re.compile(r"""(?:os\.getenv|os\.environ\.get|_secret)\(\s*'([A-Z][A-Z0-9_]*)'""")
DATABASE_READ = re.compile(r"""f'\{prefix\}(_DB_[A-Z0-9_]+)'""")


def settings_read() -> set[str]:
    """Every variable the service reads: settings.py, gunicorn.conf.py and lib (the master's checks)."""
    names: set[str] = set()
    settings_text = (ROOT / 'settings.py').read_text(encoding='utf-8')
    names |= set(SETTING_READ.findall(settings_text))
    names |= {f'DEFAULT{suffix}' for suffix in DATABASE_READ.findall(settings_text)}
    for prefixed, name in re.findall(r"_secret\(\s*f?'(\{prefix\})?([A-Z0-9_]+)'", settings_text):
        names.add(f'{"DEFAULT" if prefixed else ""}{name}_FILE')  # the Docker-secret form
    for path in [ROOT / 'gunicorn.conf.py', *sorted((ROOT / 'lib').rglob('*.py'))]:
        names |= set(SETTING_READ.findall(path.read_text(encoding='utf-8')))
    return names


def documented(page: Path) -> set[str]:
    """The names in the first column of the page's settings table(s)."""
    names = set()
    for line in page.read_text(encoding='utf-8').splitlines():
        cells = line.split('|')
        if len(cells) > 3 and cells[1].strip().startswith('`'):
            names |= set(re.findall(r'`([A-Z][A-Z0-9_]*)`', cells[1]))
    return names


def test_the_configuration_page_documents_every_setting_and_only_settings() -> None:
    read = settings_read()
    assert {'BEARER_FILE', 'DEFAULT_DB_PASS_FILE', 'DEFAULT_DB_HOST', 'API_REPLICAS', 'BIND'} <= read
    shown = documented(ROOT / 'docs' / 'configuration.md')
    assert sorted(read - shown) == [], 'read by the code, not on docs/configuration.md'
    assert sorted(shown - read) == [], 'on docs/configuration.md, read by nothing'


def test_the_readme_configuration_table_is_a_part_of_the_full_one() -> None:
    readme = documented(ROOT / 'README.md')
    assert {'ENVIRONMENT', 'BEARER', 'DEFAULT_DB_HOST', 'WEB_CONCURRENCY'} <= readme
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
