"""The README's promises that code can check: its module example is the example module's code, and its
retrying client writes once against a real gunicorn."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import requests

from tests.conftest import AUTH, LEDGER, query
from tests.service import running_service

REPO = Path(__file__).resolve().parent.parent
README = (REPO / 'README.md').read_text(encoding='utf-8')
EXAMPLE_BLOCK = re.compile(r'<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<code>.*?)```\n', re.DOTALL)
EXAMPLE_FILES = sorted(
    str(path.relative_to(REPO))
    for path in (REPO / 'modules' / 'example').rglob('*')
    if path.is_file() and '__pycache__' not in path.parts
)


def readme_blocks() -> dict[str, str]:
    return {match['path']: match['code'] for match in EXAMPLE_BLOCK.finditer(README)}


def test_the_readme_shows_every_file_of_the_example_module() -> None:
    assert sorted(readme_blocks()) == EXAMPLE_FILES


@pytest.mark.parametrize('path', EXAMPLE_FILES)
def test_each_shown_file_is_the_file(path: str) -> None:
    assert readme_blocks()[path] == (REPO / path).read_text(encoding='utf-8')


def test_the_two_commands_come_first() -> None:
    first_block = README.split('```sh\n', 1)[1].split('```', 1)[0]
    commands = [line.split('#')[0].strip() for line in first_block.splitlines()]
    assert commands == ['scripts/serve.sh', 'scripts/test.sh']


def retrying_example() -> str:
    """The README's at-least-once client, as written under "Retrying safely"."""
    section = README[README.index('## Retrying safely') :]
    start = section.index('```python\n') + len('```python\n')
    return section[start : section.index('```', start)]


def test_the_retrying_example_writes_once_and_answers_what_was_stored(
    ledger_database: dict[str, Any], tmp_path: Path
) -> None:
    """Run against a real gunicorn: the same write sent twice by the example is one row, and a
    stored 409 is answered at once instead of being sent ten times."""
    namespace: dict[str, Any] = {'uuid': uuid, 'time': time, 'requests': requests}
    exec(retrying_example(), namespace)  # noqa: S102  # nosec B102 - the README's own code, checked here
    write_once = namespace['write_once']
    with running_service(ledger_database, str(tmp_path), EXTRA_MODULES=LEDGER) as service:
        api = requests.Session()
        api.headers['Authorization'] = AUTH['Authorization']
        first = write_once(api, f'{service.url}/ledger/add_code', {'note': 'readme', 'code': 'readme-1'})
        clash = write_once(api, f'{service.url}/ledger/add_code', {'note': 'again', 'code': 'readme-1'})
    assert first.status_code == 200
    assert clash.status_code == 409 and clash.json()['type'] == 'urn:dbapi:problem:unique-violation'
    conn = psycopg2.connect(**ledger_database)
    try:
        rows = query(conn, "SELECT note FROM ledger_entries WHERE code = 'readme-1'")
        keys = query(conn, "SELECT status FROM dbapi_idempotency WHERE action = 'ledger/add_code' ORDER BY status")
    finally:
        conn.close()
    assert rows == [('readme',)]
    assert keys == [(200,), (409,)]  # each write's answer stored under its own key
