"""The README's promises about itself: the two commands first, short, and nothing in it that a
new user would find out of date. What it shows of the code, and its runnable blocks, are checked
with the rest of the docs (tests/test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text(encoding='utf-8')
MAX_LINES = 300
# bench/report.py writes the latest run's table between these; issue 28 owns what is inside.
BENCH_BLOCK = re.compile(r'<!-- bench:latest:start -->.*?<!-- bench:latest:end -->', re.S)


def test_the_two_commands_come_first() -> None:
    first_block = README.split('```sh\n', 1)[1].split('```', 1)[0]
    commands = [line.split('#')[0].strip() for line in first_block.splitlines()]
    assert commands == ['scripts/serve.sh', 'scripts/test.sh']


def test_the_readme_is_at_most_300_lines() -> None:
    assert len(README.splitlines()) <= MAX_LINES


def test_outside_the_benchmark_table_nothing_is_dated_and_nothing_fails() -> None:
    text = BENCH_BLOCK.sub('', README)
    assert len(BENCH_BLOCK.findall(README)) == 1, 'the bench markers are kept exactly'
    assert re.findall(r'\b20\d\d-\d\d-\d\d\b|\b\d\d:\d\d UTC\b', text) == []
    assert re.findall(r'\bFAIL', text) == []


def test_every_link_of_the_readme_reaches_a_file() -> None:
    for target in re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', README):
        if not target.startswith(('http://', 'https://')):
            assert (ROOT / target).exists(), target


def test_one_way_to_apply_sql_and_to_run_the_cli() -> None:
    assert re.findall(r'apply-sql|apply_sql|schema\.sql', README) == [], 'flask --app app migrate applies SQL'
    assert re.findall(r'(?<![/\w])flask --app', README) == [], 'the CLI is scripts/flask'
