"""The README's promises that code can check: its module example is the example module's code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / 'README.md').read_text(encoding='utf-8')
EXAMPLE_BLOCK = re.compile(r'<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<code>.*?)```\n', re.DOTALL)
EXAMPLE_FILES = sorted(
    str(path.relative_to(REPO)) for path in (REPO / 'modules' / 'example').iterdir() if path.is_file()
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
