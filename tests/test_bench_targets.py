"""How the benchmark prints a ratio next to its target."""

from __future__ import annotations

import pytest

from bench.targets import shown


@pytest.mark.parametrize(
    ('ratio', 'limit', 'text'),
    [
        (0.148, 0.15, '0.148'),  # two decimals would print the target it missed
        (0.1502, 0.15, '0.150'),
        (0.15, 0.15, '0.15'),
        (0.163, 0.15, '0.16'),
        (0.597, 0.6, '0.597'),
        (1.15, 1.5, '1.15'),
    ],
)
def test_a_ratio_never_prints_as_its_target_unless_it_is(ratio: float, limit: float, text: str) -> None:
    assert shown(ratio, limit) == text
