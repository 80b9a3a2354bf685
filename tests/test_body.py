"""The body step: what a JSON body may hold before validation sees it (lib/body.py)."""

from __future__ import annotations

import pytest

from lib.pipeline.input import parse_body
from tests.conftest import AUTH

JSON = {**AUTH, 'Content-Type': 'application/json'}


@pytest.mark.parametrize(
    'number',
    ['18446744073709551616', '-9223372036854775809', '123456789012345678901234567890'],
)
def test_an_integer_beyond_64_bits_is_a_400_naming_it(client, number: str) -> None:
    response = client.post('/probe/add_item', data=f'{{"code": "x", "qty": {number}}}', headers=JSON)
    assert response.status_code == 400
    assert response.get_json()['detail'] == f'the integer {number} does not fit in 64 bits'


@pytest.mark.parametrize(
    ('data', 'expected'),
    [
        (b'{"n": 18446744073709551615}', {'n': 18446744073709551615}),
        (b'{"n": -9223372036854775808}', {'n': -9223372036854775808}),
        (b'{"s": "123456789012345678901234567890"}', {'s': '123456789012345678901234567890'}),
    ],
)
def test_integers_within_64_bits_and_long_digits_in_strings_are_kept_exactly(data: bytes, expected: dict) -> None:
    assert parse_body(data) == expected
