"""Small shared helpers: seed mixing (golden values from before it was shared) and atomic writes."""

from __future__ import annotations

import pytest

from evdm.seeds import mix_seed
from evdm.train import step_seed


def test_step_seed_golden_values():
    # Computed with the inline formula ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63 it replaced.
    cases = [(0, 0, 0), (0, 1, 0), (0, 0, 1), (1234, 3, 98765), (2**40, 7, 10**9), (-5, 2, 3)]
    expected = [0, 1000003, 1, 1234007407109880, 44342205443578325, 9223367036826775772]
    assert [step_seed(*c) for c in cases] == expected


@pytest.mark.parametrize("seed, index", [(0, 0), (0, 5), (7, 0), (1234, 99), (-3, 2)])
def test_batch_seed_matches_the_old_inline_formula(seed, index):
    assert mix_seed(seed, index) == seed * 1_000_003 + index  # sampling.py and evaluate.py used this
